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

import argparse
import json
import logging
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

from turbo.zoo.finetune import FinetuneConfig, finetune_toward_teacher, record_run
from turbo.zoo.presets import PRESETS, WEIGHTS_DIR, zoo_path
from turbo.zoo.train import build_streams, perplexity, start_run

from .convert import convert
from .model import load_hf_config, load_model, save_model

logger = logging.getLogger(__name__)


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
    started = start_run(cfg, out_dir, threads)
    base_dir = zoo_path(cfg.base)
    base_preset = replace(PRESETS[cfg.base], seq_len=cfg.seq_len, batch_size=cfg.batch_size)

    # 1-2. convert, and the base model's streams
    convert(base_dir, out_dir, cfg.ladder_start_layer)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(base_dir / "tokenizer.json"))
    _, stream, heldout = build_streams(PRESETS[cfg.base], out_dir, tok=tok)

    # 3. perplexity before
    teacher = load_model(base_dir)
    student = load_model(out_dir)
    ppl_base = {d: perplexity(teacher, s, base_preset.seq_len) for d, s in heldout.items()}
    ppl_converted = {d: perplexity(student, s, base_preset.seq_len) for d, s in heldout.items()}
    logger.info("held-out perplexity: base %s, converted before adaptation %s", ppl_base, ppl_converted)

    # 4. fine-tune
    losses = finetune_toward_teacher(student, teacher, stream, cfg, desc=f"adapt {cfg.name}")

    # 5. perplexity after, and save
    ppl_adapted = {d: perplexity(student, s, base_preset.seq_len) for d, s in heldout.items()}
    save_model(student, out_dir, load_hf_config(base_dir))
    return record_run(out_dir, cfg, started, losses, {
        "heldout_perplexity": ppl_adapted,
        "heldout_perplexity_base": ppl_base,
        "heldout_perplexity_converted_before_adaptation": ppl_converted,
    }, title=f"{cfg.name}: adaptation loss")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="turbo-tiny-ladder", choices=sorted(LADDER_PRESETS))
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: the shipped one)")
    parser.add_argument("--steps", type=int, default=None, help="override the preset's step count")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = LADDER_PRESETS[args.preset]
    if args.steps is not None:
        cfg = replace(cfg, steps=args.steps)
    results = adapt(cfg, args.out or WEIGHTS_DIR / cfg.name, threads=args.threads)
    json.dump({k: v for k, v in results.items() if k.startswith("heldout")}, sys.stdout)
    print()


if __name__ == "__main__":
    main()
