"""Fine-tune a student that starts from its teacher's weights back toward the teacher.

The loop a converted model's recovery needs (the ladder adaptation, the hybrid distillation): seeded
random windows of a token stream; loss = kl_weight * KL(teacher || student) + (1 - kl_weight) *
cross-entropy on the data (``distill.distill_loss``), the teacher under no_grad; AdamW with train.py's
warm-up and cosine decay, clipping at 1.0, bfloat16 autocast on CPU.

A recipe's config derives from :class:`FinetuneConfig` and adds what its conversion needs.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, ClassVar

import torch
from tqdm import tqdm

from .distill import distill_loss
from .presets import PRESETS, zoo_path
from .train import build_streams, create_optimizer, lr_at, perplexity, plot_losses, sample_windows, start_run

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneConfig:
    """A fine-tune of a model converted from the zoo model ``base``, toward ``base``."""

    recipe_module: ClassVar[str] = ""  # the ``python -m`` module that runs the recipe

    name: str
    base: str = "turbo-tiny"  # the zoo model converted; also the teacher
    steps: int = 400
    batch_size: int = 16
    seq_len: int = 512
    lr: float = 1e-3
    warmup_steps: int = 20
    weight_decay: float = 0.1
    kl_weight: float = 0.5  # loss = kl_weight * KL(base || student) + (1 - kl_weight) * CE on data
    seed: int = 1  # window sampling; the base trained with its own seed on the same stream

    def __post_init__(self) -> None:
        assert self.base in PRESETS, f"base must be a zoo preset, got {self.base!r}"
        assert 0.0 <= self.kl_weight <= 1.0, f"kl_weight must be in [0, 1], got {self.kl_weight}"
        assert self.steps > 0 and self.warmup_steps < self.steps, f"{self.steps=} {self.warmup_steps=}"

    @property
    def recipe_command(self) -> str:
        return f"python -m {self.recipe_module} --preset {self.name}"

    def to_dict(self) -> dict:
        return asdict(self)


def teacher_loss(student, teacher, rows: torch.Tensor, kl_weight: float) -> torch.Tensor:
    """The loss on one batch of windows ``rows``: (bsz, seqlen + 1)."""
    inputs, targets = rows[:, :-1], rows[:, 1:]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = student(inputs).logits  # (bsz, seqlen, vocab)
        with torch.no_grad():
            teacher_logits = teacher(inputs).logits
    loss, _kl = distill_loss(logits, teacher_logits, targets, ce_weight=1.0 - kl_weight)
    return loss


def finetune_toward_teacher(student, teacher, stream: torch.Tensor, cfg, desc: str) -> list[float]:
    """Trains ``student`` in place for ``cfg.steps`` steps; returns the loss of every step."""
    student.train()
    teacher.eval()
    opt = create_optimizer(cfg, student)
    gen = torch.Generator().manual_seed(cfg.seed)
    losses: list[float] = []
    bar = tqdm(range(cfg.steps), desc=desc, unit="step")
    for step in bar:
        rows = sample_windows(cfg, stream, gen)  # (bsz, seqlen+1)
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        loss = teacher_loss(student, teacher, rows, cfg.kl_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return losses


def record_run(out_dir: Path, cfg, started: float, losses: list[float], perplexities: dict, title: str) -> dict:
    """Writes recipe.json (the preset, the held-out perplexities given, the run's facts), loss.json and
    loss.png of a fine-tune into ``out_dir``; returns what recipe.json holds."""
    results = {
        "preset": cfg.to_dict(),
        "base": cfg.base,
        **perplexities,
        "train_tokens_seen": cfg.steps * cfg.batch_size * cfg.seq_len,
        "final_train_loss": sum(losses[-50:]) / len(losses[-50:]),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "wall_seconds": round(time.time() - started, 1),
        "command": cfg.recipe_command,
    }
    (out_dir / "recipe.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "loss.json").write_text(json.dumps(losses) + "\n")
    plot_losses(losses, out_dir / "loss.png", title=title,
                ylabel=f"{cfg.kl_weight:g} KL + {1 - cfg.kl_weight:g} CE (nats)")
    return results


def run_conversion_recipe(cfg: FinetuneConfig, out_dir: Path, threads: int | None, stage: str,
                          convert_base: Callable, load_teacher: Callable, save_student: Callable) -> dict:
    """The steps every conversion recipe shares, into ``out_dir``; returns what recipe.json holds.

    1. ``convert_base(base_dir, out_dir)`` -> the converted student; 2. the base's training and held-out
    streams with its tokenizer; 3. held-out perplexity of ``load_teacher(base_dir)`` and of the student;
    4. :func:`finetune_toward_teacher`; 5. perplexity again, ``save_student(student, base_dir, out_dir)``,
    :func:`record_run`. ``stage`` names step 4 in the logs, the loss plot and recipe.json's keys.
    """
    from tokenizers import Tokenizer

    started = start_run(cfg, out_dir, threads)
    base_dir = zoo_path(cfg.base)
    student = convert_base(base_dir, out_dir)
    tok = Tokenizer.from_file(str(base_dir / "tokenizer.json"))
    _, stream, heldout = build_streams(PRESETS[cfg.base], out_dir, tok=tok)
    teacher = load_teacher(base_dir)
    ppl_base = {d: perplexity(teacher, s, cfg.seq_len) for d, s in heldout.items()}
    ppl_converted = {d: perplexity(student, s, cfg.seq_len) for d, s in heldout.items()}
    logger.info("held-out perplexity: base %s, converted before %s %s", ppl_base, stage, ppl_converted)
    losses = finetune_toward_teacher(student, teacher, stream, cfg, desc=f"{stage} {cfg.name}")
    ppl = {d: perplexity(student, s, cfg.seq_len) for d, s in heldout.items()}
    save_student(student.eval(), base_dir, out_dir)
    return record_run(out_dir, cfg, started, losses, {
        "heldout_perplexity": ppl,
        "heldout_perplexity_base": ppl_base,
        f"heldout_perplexity_converted_before_{stage}": ppl_converted,
    }, title=f"{cfg.name}: {stage} loss")


def recipe_main(argv: list[str] | None, description: str, presets: dict, default: str, run: Callable,
                report: tuple[str, ...] | None = None) -> None:
    """The command line of a recipe that makes a model from a zoo model (conversions, drafts):
    ``--preset NAME [--out DIR] [--steps N] [--threads N]``; prints the results named in ``report`` as JSON
    (default: every held-out perplexity)."""
    import argparse
    import sys
    from dataclasses import replace

    from .presets import WEIGHTS_DIR

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--preset", default=default, choices=sorted(presets))
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: the shipped one)")
    parser.add_argument("--steps", type=int, default=None, help="override the preset's step count")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = presets[args.preset]
    if args.steps is not None:
        cfg = replace(cfg, steps=args.steps)
    results = run(cfg, args.out or WEIGHTS_DIR / cfg.name, threads=args.threads)
    keys = report or [k for k in results if k.startswith("heldout")]
    json.dump({k: results[k] for k in keys}, sys.stdout)
    print()
