"""Train an embedded model from its preset: ``python -m turbo.zoo.train --preset turbo-tiny``.

The recipe, step by step:
1. Build the corpus (stdlib source + generated records; see corpus.py) and split it.
2. Train a byte-level BPE tokenizer on the training split.
3. Pack the training documents into one token stream (<|bos|> doc <|eos|> ...).
4. Train a transformers ``LlamaForCausalLM`` on seeded random windows of that stream
   (AdamW, linear warm-up, cosine decay, bf16 autocast on CPU).
5. Measure held-out perplexity per domain, then save weights, tokenizer, the loss
   curve (PNG) and ``recipe.json`` (the preset, the interpreter, the results).

Seeded end to end: the same preset on the same Python and torch gives the same weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import random
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .corpus import BOS, EOS, Document, code_documents, record_documents
from .presets import PRESETS, WEIGHTS_DIR, TinyLlamaConfig
from .tokenizer import save_tokenizer, train_tokenizer

logger = logging.getLogger(__name__)

RECORD_SEED_HELD_OUT = 10_000_019  # a different stream from training's records


def encode_stream(tok, docs: list[Document]) -> torch.Tensor:
    """Documents packed into one token stream: <|bos|> doc <|eos|> <|bos|> doc <|eos|> ..."""
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    ids: list[int] = []
    for enc in tok.encode_batch([d.text for d in docs], add_special_tokens=False):
        ids.append(bos)
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def training_documents(cfg: TinyLlamaConfig) -> list[Document]:
    """Step 1: the training split, stdlib code files then the generated records."""
    code_train = list(code_documents("train", cfg.held_out_fraction))
    return code_train + list(record_documents(cfg.seed, n_records_for(cfg, code_train)))


def build_streams(cfg: TinyLlamaConfig, out_dir: Path, tok=None):
    """Steps 1-3: returns (tokenizer, train stream, {domain: held-out stream}).

    ``tok`` None trains a new tokenizer on the training split and saves it into ``out_dir``;
    a given tokenizer (a distilled student reuses its teacher's) only encodes, nothing is written.
    """
    docs = training_documents(cfg)
    if tok is None:
        tok = train_tokenizer((d.text for d in docs), cfg.vocab_size)
        save_tokenizer(tok, out_dir, cfg.max_position_embeddings)
    train = encode_stream(tok, docs)
    heldout = heldout_streams(cfg, tok, sum(d.domain == "records" for d in docs))
    logger.info("train tokens %d, held-out tokens %s", train.numel(), {k: v.numel() for k, v in heldout.items()})
    return tok, train, heldout


def n_records_for(cfg: TinyLlamaConfig, code_train: list[Document]) -> int:
    """How many generated records go with these code files to make ``cfg.records_fraction`` of the tokens."""
    # Records are short; aim the character share at the token share wanted.
    code_chars = sum(len(d.text) for d in code_train)
    return max(1, int(code_chars * cfg.records_fraction / (1 - cfg.records_fraction) / 220))


def heldout_streams(cfg: TinyLlamaConfig, tok, n_train_records: int) -> dict[str, torch.Tensor]:
    """Token streams never trained on: held-out stdlib files, and records from another seed."""
    code = list(code_documents("heldout", cfg.held_out_fraction))
    records = list(record_documents(RECORD_SEED_HELD_OUT + cfg.seed, max(50, n_train_records // 30)))
    return {"code": encode_stream(tok, code), "records": encode_stream(tok, records)}


def evaluate(cfg: TinyLlamaConfig, model_dir: Path) -> dict[str, float]:
    """Held-out perplexity per domain of the model saved in ``model_dir``."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    n_records = n_records_for(cfg, list(code_documents("train", cfg.held_out_fraction)))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return {domain: perplexity(model, s, cfg.seq_len) for domain, s in heldout_streams(cfg, tok, n_records).items()}


def create_model(cfg: TinyLlamaConfig, tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=tok.token_to_id(BOS),
        eos_token_id=tok.token_to_id(EOS),
        pad_token_id=tok.token_to_id("<|pad|>"),
        torch_dtype="float32",
    )
    return LlamaForCausalLM(config)


def lr_at(cfg: TinyLlamaConfig, step: int) -> float:
    """Linear warm-up to ``cfg.lr``, then cosine decay to a tenth of it at ``cfg.steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def create_optimizer(cfg: TinyLlamaConfig, model) -> torch.optim.AdamW:
    """AdamW (betas 0.9/0.95), weight decay on matrices only."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95),
    )


def sample_windows(cfg: TinyLlamaConfig, stream: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``cfg.batch_size`` seeded random windows of ``cfg.seq_len + 1`` tokens: (bsz, seqlen+1)."""
    starts = torch.randint(0, stream.numel() - cfg.seq_len - 1, (cfg.batch_size,), generator=gen)
    return torch.stack([stream[s : s + cfg.seq_len + 1] for s in starts.tolist()])


@torch.no_grad()
def perplexity(model, stream: torch.Tensor, seq_len: int, max_windows: int = 256) -> float:
    """exp(mean next-token loss) over consecutive non-overlapping windows of ``stream``."""
    model.eval()
    n = min(max_windows, (stream.numel() - 1) // seq_len)
    assert n > 0, f"held-out stream of {stream.numel()} tokens is shorter than one window of {seq_len}"
    windows = stream[: n * seq_len + 1]
    total, count = 0.0, 0
    for i in range(0, n, 8):
        rows = torch.stack([windows[j * seq_len : (j + 1) * seq_len + 1] for j in range(i, min(n, i + 8))])
        logits = model(rows[:, :-1]).logits.float()  # (bsz, seqlen, vocab)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten(), reduction="sum")
        total, count = total + loss.item(), count + rows[:, 1:].numel()
    model.train()
    return math.exp(total / count)


def start_run(cfg: TinyLlamaConfig, out_dir: Path, threads: int | None) -> float:
    """What every recipe run does first (trainer and distiller): threads, seeds, output directory;
    returns the start time."""
    if threads:
        torch.set_num_threads(threads)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    return time.time()


def train(cfg: TinyLlamaConfig, out_dir: Path, threads: int | None = None) -> dict:
    """Runs the whole recipe into ``out_dir``; returns the results written to recipe.json."""
    started = start_run(cfg, out_dir, threads)

    tok, stream, heldout = build_streams(cfg, out_dir)
    model = create_model(cfg, tok)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("%s: %.2fM parameters", cfg.name, n_params / 1e6)

    opt = create_optimizer(cfg, model)
    gen = torch.Generator().manual_seed(cfg.seed)
    losses: list[float] = []
    model.train()
    bar = tqdm(range(cfg.steps), desc=f"train {cfg.name}", unit="step")
    for step in bar:
        rows = sample_windows(cfg, stream, gen)  # (bsz, seqlen+1)
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(rows[:, :-1]).logits  # (bsz, seqlen, vocab)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")

    ppl = {domain: perplexity(model, s, cfg.seq_len) for domain, s in heldout.items()}
    model.save_pretrained(out_dir, safe_serialization=True)
    results = {
        "preset": cfg.to_dict(),
        "parameters": n_params,
        "train_tokens_seen": cfg.steps * cfg.tokens_per_step,
        "train_stream_tokens": stream.numel(),
        "heldout_perplexity": ppl,
        "final_train_loss": sum(losses[-50:]) / len(losses[-50:]),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "wall_seconds": round(time.time() - started, 1),
        "command": f"python -m turbo.zoo.train --preset {cfg.name}",
    }
    (out_dir / "recipe.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "loss.json").write_text(json.dumps(losses) + "\n")
    plot_losses(losses, out_dir / "loss.png", title=f"{cfg.name}: training loss")
    return results


def plot_losses(losses: list[float], path: Path, title: str, ylabel: str = "cross-entropy (nats)") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses, linewidth=0.6, alpha=0.4, label="step")
    window = 25
    if len(losses) >= window:
        smooth = [sum(losses[i - window : i]) / window for i in range(window, len(losses) + 1)]
        ax.plot(range(window - 1, len(losses)), smooth, linewidth=1.5, label=f"mean of {window}")
    ax.set(xlabel="step", ylabel=ylabel, title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    trained = sorted(name for name, cfg in PRESETS.items() if not cfg.teacher)  # the others: turbo.zoo.distill
    parser.add_argument("--preset", default="turbo-tiny", choices=trained)
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: the shipped one)")
    parser.add_argument("--steps", type=int, default=None, help="override the preset's step count")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--eval-only", action="store_true",
                        help="re-measure held-out perplexity of the saved model and update recipe.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = PRESETS[args.preset]
    if args.steps is not None:
        from dataclasses import replace

        cfg = replace(cfg, steps=args.steps)
    out_dir = args.out or WEIGHTS_DIR / cfg.name
    if args.eval_only:
        results = json.loads((out_dir / "recipe.json").read_text())
        results["heldout_perplexity"] = evaluate(cfg, out_dir)
        (out_dir / "recipe.json").write_text(json.dumps(results, indent=2) + "\n")
    else:
        results = train(cfg, out_dir, threads=args.threads)
    json.dump(results["heldout_perplexity"], sys.stdout)
    print()


if __name__ == "__main__":
    main()
