"""Does a zoo model copy from its own context? The capability passkey retrieval stands on.

    python benchmark/probe_in_context_copying.py                      # every zoo language model, ~1 min
    python benchmark/probe_in_context_copying.py --models turbo-tiny --lengths 64,256

A model with induction heads predicts the second copy of a repeated span far better than the first: it
finds the earlier occurrence and copies what followed it. For each model and span length, the probe
feeds ``--trials`` spans twice in a row, ``x x``, and reports the mean next-token loss (nats) on each
copy; the copy gain is first minus second. Two kinds of span: held-out standard-library code (text in
the model's domain it never trained on) and uniformly random tokens (nothing to predict but by copying,
so a model that copies takes the second copy's loss toward 0 and one that does not stays near
ln(vocab)). Loads the models with transformers; turbo-tiny-hybrid, which transformers cannot load, is
left out. Prints a table and a summary line last; writes nothing.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from turbo.zoo.presets import zoo_language_models, zoo_path  # noqa: E402


@torch.no_grad()
def copy_losses(model, span: torch.Tensor) -> tuple[float, float]:
    """Mean next-token loss on the first copy (after its first token) and on the second copy of ``span``."""
    n = span.numel()
    rows = torch.cat([span, span]).unsqueeze(0)
    losses = torch.nn.functional.cross_entropy(model(rows).logits[0, :-1].float(), rows[0, 1:], reduction="none")
    return losses[: n - 1].mean().item(), losses[n - 1 :].mean().item()


def main(argv: list[str] | None = None) -> list[dict]:
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    from turbo.zoo.train import encode_stream
    from turbo.zoo.corpus import code_documents

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None, help="comma-separated zoo names or paths (default: the zoo's LMs)")
    parser.add_argument("--lengths", default="32,128,512", help="comma-separated span lengths in tokens")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    names = args.models.split(",") if args.models else [m for m in zoo_language_models() if m != "turbo-tiny-hybrid"]
    torch.set_num_threads(max(1, torch.get_num_threads()))

    rows = []
    for name in names:
        path = zoo_path(name) if not Path(name).exists() else Path(name)
        tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        heldout = encode_stream(tok, list(code_documents("heldout")))
        vocab = model.config.vocab_size
        gen = torch.Generator().manual_seed(args.seed)
        for length in (int(x) for x in args.lengths.split(",")):
            for kind in ("code", "random"):
                first, second = [], []
                for _ in range(args.trials):
                    if kind == "code":
                        start = int(torch.randint(0, heldout.numel() - length, (1,), generator=gen))
                        span = heldout[start : start + length]
                    else:  # ids past the special tokens
                        span = torch.randint(len(tok.get_added_tokens_decoder()), vocab, (length,), generator=gen)
                    a, b = copy_losses(model, span)
                    first.append(a)
                    second.append(b)
                row = {"model": name, "span": kind, "length": length,
                       "first": sum(first) / len(first), "second": sum(second) / len(second)}
                rows.append(row)
                print(f"{name:18s} {kind:6s} {length:5d} tokens: loss first copy {row['first']:6.3f}, "
                      f"second copy {row['second']:6.3f}, gain {row['first'] - row['second']:+.3f} nats", flush=True)
    gains = {name: max(r["first"] - r["second"] for r in rows if r["model"] == name and r["span"] == "random")
             for name in names}
    print("summary: largest copy gain on random spans, per model: "
          + ", ".join(f"{name} {gain:+.2f}" for name, gain in gains.items())
          + f" nats (a model that copies gains several nats, up to ln vocab = {math.log(vocab):.2f})")
    return rows


if __name__ == "__main__":
    main()
