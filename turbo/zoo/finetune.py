"""Fine-tune a student that starts from its teacher's weights back toward the teacher.

The loop a converted model's recovery needs (the ladder adaptation, the hybrid distillation): seeded
random windows of a token stream; loss = kl_weight * KL(teacher || student) + (1 - kl_weight) *
cross-entropy on the data (``distill.distill_loss``), the teacher under no_grad; AdamW with train.py's
warm-up and cosine decay, clipping at 1.0, bfloat16 autocast on CPU.

``cfg`` is any recipe config with the fields ``steps, batch_size, seq_len, lr, warmup_steps,
weight_decay, kl_weight, seed``.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .distill import distill_loss
from .train import create_optimizer, lr_at, plot_losses, sample_windows


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
