"""Distil a Llama-Mamba2 hybrid from its Llama: ``python -m turbo.hybrid.distill --preset turbo-tiny-hybrid``.

The recipe, step by step (MambaInLlama's, on the embedded family's corpus):
1. Convert the base zoo model (convert.py: Mamba2 mixers initialised from the attention they replace,
   the ``attention_layers`` kept).
2. Rebuild the base model's training and held-out token streams (turbo.zoo.train, the base's tokenizer).
3. Measure held-out perplexity of the base and of the converted hybrid before distillation.
4. Fine-tune the hybrid toward the base (turbo.zoo.finetune: kl_weight * KL(base || hybrid) +
   (1 - kl_weight) * CE, AdamW, warm-up and cosine decay, bfloat16 autocast on CPU).
5. Measure held-out perplexity again; save the checkpoint, loss curve (PNG) and recipe.json.

Seeded end to end: the same preset on the same Python and torch gives the same weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from turbo.ladder.model import load_model as load_llama
from turbo.zoo.finetune import FinetuneConfig, recipe_main, run_conversion_recipe

from .convert import convert
from .model import save_model


@dataclass(frozen=True)
class HybridDistillConfig(FinetuneConfig):
    """A hybrid conversion of a zoo model and the distillation that recovers its quality."""

    recipe_module: ClassVar[str] = "turbo.hybrid.distill"

    steps: int = 600
    warmup_steps: int = 30
    kl_weight: float = 0.9  # MambaInLlama weighs the teacher's KL and the data's CE; here mostly KL
    seed: int = 2
    attention_layers: tuple[int, ...] = field(default_factory=lambda: (2, 5))


HYBRID_PRESETS: dict[str, HybridDistillConfig] = {
    # 4 of turbo-tiny's 6 attention layers become Mamba2 (layers 2 and 5 keep attention).
    "turbo-tiny-hybrid": HybridDistillConfig(name="turbo-tiny-hybrid"),
    # A seconds-long run for tests of the recipe itself; never shipped.
    "turbo-tiny-hybrid-smoke": HybridDistillConfig(
        name="turbo-tiny-hybrid-smoke", steps=3, warmup_steps=1, batch_size=2, seq_len=64,
    ),
}


def distill(cfg: HybridDistillConfig, out_dir: Path, threads: int | None = None) -> dict:
    """Runs the whole recipe into ``out_dir``; returns the results written to recipe.json."""

    def convert_base(base_dir: Path, out: Path):
        return convert(base_dir, out, list(cfg.attention_layers), seed=cfg.seed)

    def save_student(student, base_dir: Path, out: Path) -> None:
        save_model(student, out, json.loads((base_dir / "config.json").read_text()))

    return run_conversion_recipe(cfg, out_dir, threads, "distillation", convert_base, load_llama, save_student)


def main(argv: list[str] | None = None) -> None:
    recipe_main(argv, __doc__.splitlines()[0], HYBRID_PRESETS, "turbo-tiny-hybrid", distill)


if __name__ == "__main__":
    main()
