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

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

from turbo.ladder.model import load_model as load_llama
from turbo.zoo.finetune import FinetuneConfig, finetune_toward_teacher, record_run
from turbo.zoo.presets import PRESETS, WEIGHTS_DIR, zoo_path
from turbo.zoo.train import build_streams, perplexity, start_run

from .convert import convert

logger = logging.getLogger(__name__)


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
    from tokenizers import Tokenizer

    started = start_run(cfg, out_dir, threads)
    base_dir = zoo_path(cfg.base)
    # 1-2. convert, and the base model's streams
    student = convert(base_dir, out_dir, list(cfg.attention_layers), seed=cfg.seed)
    tok = Tokenizer.from_file(str(base_dir / "tokenizer.json"))
    _, stream, heldout = build_streams(PRESETS[cfg.base], out_dir, tok=tok)
    # 3. perplexity before
    teacher = load_llama(base_dir)
    ppl_base = {d: perplexity(teacher, s, cfg.seq_len) for d, s in heldout.items()}
    ppl_converted = {d: perplexity(student, s, cfg.seq_len) for d, s in heldout.items()}
    logger.info("held-out perplexity: base %s, converted before distillation %s", ppl_base, ppl_converted)
    # 4. distil
    losses = finetune_toward_teacher(student, teacher, stream, cfg, desc=f"distill {cfg.name}")
    # 5. perplexity after, and save
    ppl = {d: perplexity(student, s, cfg.seq_len) for d, s in heldout.items()}
    from .model import save_model

    save_model(student.eval(), out_dir, json.loads((base_dir / "config.json").read_text()))
    return record_run(out_dir, cfg, started, losses, {
        "heldout_perplexity": ppl,
        "heldout_perplexity_base": ppl_base,
        "heldout_perplexity_converted_before_distillation": ppl_converted,
    }, title=f"{cfg.name}: distillation loss")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="turbo-tiny-hybrid", choices=sorted(HYBRID_PRESETS))
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: the shipped one)")
    parser.add_argument("--steps", type=int, default=None, help="override the preset's step count")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = HYBRID_PRESETS[args.preset]
    if args.steps is not None:
        cfg = replace(cfg, steps=args.steps)
    results = distill(cfg, args.out or WEIGHTS_DIR / cfg.name, threads=args.threads)
    json.dump({k: v for k, v in results.items() if k.startswith("heldout")}, sys.stdout)
    print()


if __name__ == "__main__":
    main()
