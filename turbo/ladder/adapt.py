"""Adapt a converted Ladder-Residual model: ``python -m turbo.ladder.adapt --preset turbo-tiny-ladder``.

Conversion (convert.py) keeps every weight but changes what the model computes, so quality drops; a
short fine-tune recovers it (the paper adapts Llama-3.1-8B with 3B tokens). The recipe, step by step:
1. Convert the base zoo model (same weights, ladder architecture from ``ladder_start_layer`` on).
2. Rebuild the base model's training and held-out token streams (turbo.zoo.train, the base's tokenizer).
3. Measure held-out perplexity of the base and of the converted model before adaptation.
4. Fine-tune the ladder model on seeded random windows of the training stream:
   loss = kl_weight * KL(base || ladder) + (1 - kl_weight) * cross-entropy on the data, the base (the
   standard-residual original) as teacher under no_grad; AdamW, warm-up and cosine decay of train.py,
   bfloat16 autocast on CPU.
5. Measure held-out perplexity again; save the ladder checkpoint, the loss curve (PNG) and recipe.json
   (the preset, the three perplexities, the command).

Seeded end to end: the same preset on the same Python and torch gives the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from turbo.zoo.finetune import FinetuneConfig, recipe_main, run_conversion_recipe

from .convert import convert
from .model import load_hf_config, load_model, save_model


@dataclass(frozen=True)
class LadderAdaptConfig(FinetuneConfig):
    """A ladder conversion of a zoo model and the fine-tune that recovers its quality."""

    recipe_module: ClassVar[str] = "turbo.ladder.adapt"

    ladder_start_layer: int = 0  # layers >= this are ladder


LADDER_PRESETS: dict[str, LadderAdaptConfig] = {
    # ~15 min on the 2-core CPU machine (2.2 s/step); 3.3M tokens, 0.4x of turbo-tiny's own training.
    "turbo-tiny-ladder": LadderAdaptConfig(name="turbo-tiny-ladder"),
    # A seconds-long run for tests of the recipe itself; never shipped.
    "turbo-tiny-ladder-smoke": LadderAdaptConfig(
        name="turbo-tiny-ladder-smoke", steps=3, warmup_steps=1, batch_size=2, seq_len=64,
    ),
}


def adapt(cfg: LadderAdaptConfig, out_dir: Path, threads: int | None = None) -> dict:
    """Runs the whole recipe into ``out_dir``; returns the results written to recipe.json."""

    def convert_base(base_dir: Path, out: Path):
        convert(base_dir, out, cfg.ladder_start_layer)
        return load_model(out)

    def save_student(student, base_dir: Path, out: Path) -> None:
        save_model(student, out, load_hf_config(base_dir))

    return run_conversion_recipe(cfg, out_dir, threads, "adaptation", convert_base, load_model, save_student)


def main(argv: list[str] | None = None) -> None:
    recipe_main(argv, __doc__.splitlines()[0], LADDER_PRESETS, "turbo-tiny-ladder", adapt)


if __name__ == "__main__":
    main()
