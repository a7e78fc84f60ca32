"""After a hot swap of the draft head (A -> B), is A's draft KV of a cached prompt prefix good enough for B?

    python benchmark/bench_draft_kv_staleness.py            # ~4 min on 1 thread
    python benchmark/bench_draft_kv_staleness.py --quick    # under a minute
    python benchmark/bench_draft_kv_staleness.py --head-b DIR

A radix-cache hit skips the draft extend over the cached prefix, so after TURBO swaps in head B a request
that hits a prefix cached under head A drafts with B's queries over A's keys and values there. This
measures what that costs in accept length, against recomputing the prefix's draft KV with B.

Method, plain PyTorch (no server), step by step:
1. Target turbo-tiny; ``--prompts`` held-out prompts per domain (``heldout_streams``: stdlib code never
   trained on, records of the held-out seed), the target's greedy continuation of each, and the target's
   aux features and next-token argmax over the whole sequence (``TargetRecorder``).
2. Head pairs (A, B): "shipped": A = turbo-tiny-eagle3, B = ``--head-b`` or a copy of A fine-tuned for
   ``--finetune-steps`` steps on the target's records training stream with ``Eagle3Trainer`` and the
   online learner's TTT settings (seeded); "code-only", when ``--code-head`` exists (train it:
   ``python -m turbo.spec.eagle3_train --preset turbo-tiny-eagle3-code --out benchmark/heads/turbo-tiny-eagle3-code``):
   A = that head, which never saw records, B = its records fine-tune: the realistic TURBO case.
3. Greedy chain speculation (4 steps, topk 1) over each continuation, as SGLang runs the draft
   (``Eagle3Head.forward`` with a ``DraftKVCache``): a draft extend over the prompt, then per round 3 chain
   steps on a scratch copy of the cache (each feeds back the head's own hidden state and argmax), greedy
   verification against the target's argmax, and a draft extend over the accepted tokens. Variants:
   "A" (A throughout: no swap), "stale" (the cached prefix, every prompt position but the last, which a
   radix hit always recomputes, extended by A; everything after by B), "fresh" (B throughout) and, to
   bound how much the prefix's draft KV matters at all, "no-prefix" (B, the cached prefix left out).
4. The price of freshening, per prefix token: B's draft extend, B's KV alone (the keys of a position
   depend only on its token, its target feature, its position and the weights), and the target forward
   that would recompute the aux features, which SGLang's radix cache does not keep.

Writes benchmark/results/spec/draft_kv_staleness.json (raw per-round accept lengths included) and .png.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: turbo/ is imported from the checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_spec import _cpu_model  # noqa: E402

from turbo.spec.eagle3 import DraftKVCache, Eagle3Head, apply_rope  # noqa: E402
from turbo.spec.eagle3_train import (  # noqa: E402
    PRESETS,
    Eagle3Trainer,
    TargetRecorder,
    chain_replay,
    corpus_streams,
    load_target,
    training_batches,
)
from turbo.spec.learner import LearnerConfig  # noqa: E402
from turbo.spec.replay import ReplayConfig  # noqa: E402

RESULTS = REPO / "benchmark" / "results" / "spec"
CODE_HEAD = REPO / "benchmark" / "heads" / "turbo-tiny-eagle3-code"
N_STEPS = 4  # SGLang --speculative-num-steps 4 --speculative-eagle-topk 1
VARIANTS = ("A", "stale", "fresh", "no-prefix")


# --------------------------------------------------------------------------- step 1: workload


def make_workload(recorder: TargetRecorder, heldout: dict[str, torch.Tensor], n_prompts: int, prompt_len: int,
                  n_new: int, seed: int) -> dict[str, dict[str, torch.Tensor]]:
    """{domain: {"ids" (n, prompt_len + n_new), "aux" (n, seqlen, n_aux * hidden), "top" (n, seqlen)}}:
    seeded prompts of held-out text, the target's greedy continuation, its features and argmax there."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for domain, stream in heldout.items():
        starts = torch.randint(0, stream.numel() - prompt_len, (n_prompts,), generator=gen).tolist()
        prompts = torch.stack([stream[s : s + prompt_len] for s in starts])  # (n, prompt_len)
        ids = recorder.greedy_continue(prompts, n_new)  # (n, seqlen)
        aux, logits = recorder.aux_hidden(ids)
        out[domain] = {"ids": ids, "aux": aux, "top": logits.argmax(-1)}
    return out


# --------------------------------------------------------------------------- step 2: heads


def finetune_on_records(head_a: Eagle3Head, recorder: TargetRecorder, records: torch.Tensor, steps: int,
                        seed: int) -> Eagle3Head:
    """A copy of ``head_a`` after ``steps`` Eagle3Trainer steps on ``records``, the target's records training
    stream.

    Rows are shaped as the online learner's (LearnerConfig's TTT settings and batch, ReplayConfig's window),
    half of them the target's greedy continuations of records prompts (the text a greedy server verifies).
    """
    preset = replace(PRESETS["turbo-tiny-eagle3"], name="records-finetune", domains=("records",),
                     seq_len=ReplayConfig().window,
                     batch_size=LearnerConfig().batch_size, prompt_len=16, greedy_fraction=0.5, seed=seed,
                     ttt=LearnerConfig().ttt)
    torch.manual_seed(seed)
    head = copy.deepcopy(head_a)
    trainer = Eagle3Trainer(head, preset.ttt)
    batches = training_batches(preset, records, recorder, torch.Generator().manual_seed(seed))
    for _ in range(steps):
        trainer.step(next(batches))
    return head.eval()


# --------------------------------------------------------------------------- step 3: replay


@torch.no_grad()
def replay(prefix_head: Eagle3Head | None, head: Eagle3Head, ids: torch.Tensor, aux: torch.Tensor, top: torch.Tensor,
           n_cached: int, start: int) -> list[int]:
    """Accept lengths of the greedy chain rounds a server runs on one sequence.

    ids (seqlen,) prompt and the target's greedy continuation; aux (seqlen, n_aux * hidden) and top
    (seqlen,) the target's features and argmax at each position. Positions 0..n_cached-1 (the cached
    prefix) are draft-extended by ``prefix_head`` (None: left out of the cache), everything later by
    ``head``, which also drafts. Round 1 drafts after the extend that ends at ``start`` (the last prompt
    position); a round ending at p drafts x[p+2..p+1+N_STEPS] and accepts a leading matches plus the
    target's token, so the next round's extend ends at p+a+1.
    """
    assert 0 <= n_cached <= start, f"the cached prefix ({n_cached}) must end before the first draft ({start})"
    seqlen = ids.numel()
    last = seqlen - 1 - N_STEPS  # the last round whose drafts all have a target argmax (chain_replay's)
    cache = DraftKVCache()
    if n_cached and prefix_head is not None:
        prefix_head(ids[None, 1 : n_cached + 1], aux[None, :n_cached], torch.arange(n_cached), cache)
    lengths, done, p = [], n_cached, start
    while p <= last:
        # Draft extend over the positions committed since the last round (the prompt's uncached tail first).
        out = head(ids[None, done + 1 : p + 2], aux[None, done : p + 1], torch.arange(done, p + 1), cache)
        done = p + 1
        # NOTE: chain steps append to a scratch cache: SGLang overwrites their slots with the next extend.
        scratch = DraftKVCache(cache.keys, cache.values, cache.positions)
        draft, hidden, accepted = out.logits[0, -1].argmax(), out.hidden[:, -1:], 0
        for i in range(N_STEPS):
            if i:
                out = head(draft.view(1, 1), hidden, torch.tensor([p + i]), scratch)
                draft, hidden = out.logits[0, -1].argmax(), out.hidden
            if draft != top[p + 1 + i]:
                break  # later drafts cannot be accepted: stop drafting (the accept length is the same)
            accepted += 1
        lengths.append(accepted + 1)
        p += accepted + 1
    return lengths


def run_pair(head_a: Eagle3Head, head_b: Eagle3Head, work: dict, prompt_len: int) -> dict:
    """{domain: {variant: [per-sequence list of round accept lengths]}}."""
    heads = {"A": (head_a, head_a), "stale": (head_a, head_b), "fresh": (head_b, head_b), "no-prefix": (None, head_b)}
    out = {}
    for domain, w in work.items():
        out[domain] = {v: [replay(*heads[v], w["ids"][i], w["aux"][i], w["top"][i], prompt_len - 1, prompt_len - 1)
                           for i in range(w["ids"].shape[0])] for v in VARIANTS}
    return out


@torch.no_grad()
def agrees_with_chain_replay(head: Eagle3Head, w: dict, prompt_len: int, rounds: list[list[int]]) -> bool:
    """Self-check: the fresh replay equals eagle3_train's teacher-forced unroll + chain_replay."""
    seqlen = w["ids"].shape[1]
    outputs = head.ttt_unroll(w["ids"], w["aux"], N_STEPS)  # step i, row p: drafts x[p+2+i], target top[p+1+i]
    match = torch.stack([o.logits.argmax(-1) == F.pad(w["top"][:, 1 + i :], (0, i), value=-1)
                         for i, o in enumerate(outputs)], dim=-1)  # (n, seqlen-1, N_STEPS)
    expected = [chain_replay(m, prompt_len - 1, seqlen - 1 - N_STEPS) for m in match]
    return expected == rounds


# --------------------------------------------------------------------------- step 4: cost


def prefix_kv(head: Eagle3Head, ids: torch.Tensor, aux: torch.Tensor, positions: torch.Tensor):
    """(k, v), each (bsz, n_kv_heads, seqlen, head_dim): the draft KV of extended positions, nothing else.

    ids (bsz, seqlen) the token after each position, aux (bsz, seqlen, n_aux * hidden).
    """
    attn = head.layer.self_attn
    x = head.layer.attn_input(head.model.embed_tokens(ids), head.project(aux))  # (bsz, seqlen, 2 * hidden)
    bsz, seqlen, _ = x.shape
    k = attn.k_proj(x).view(bsz, seqlen, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(bsz, seqlen, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
    return apply_rope(k, positions, attn.rope_theta), v


@torch.no_grad()
def kv_rel_diff(head_a: Eagle3Head, head_b: Eagle3Head, w: dict, n_cached: int) -> float:
    """||KV_A - KV_B|| / ||KV_B|| over the cached prefixes of ``w``: how far the swap moved the prefix's KV."""
    tok, feat, pos = w["ids"][:, 1 : n_cached + 1], w["aux"][:, :n_cached], torch.arange(n_cached)
    a, b = torch.cat(prefix_kv(head_a, tok, feat, pos)), torch.cat(prefix_kv(head_b, tok, feat, pos))
    return ((a - b).norm() / b.norm()).item()


def _median_s(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def recompute_cost(head: Eagle3Head, recorder: TargetRecorder, ids: torch.Tensor, aux: torch.Tensor,
                   n_cached: int, repeats: int) -> dict:
    """Microseconds per prefix token (batch 1, median of ``repeats``) of the ways to freshen a prefix.

    ``draft_forward_us``: ``Eagle3Head.forward`` over the prefix (an upper bound: it computes logits at every
    position, SGLang's extend only at the last); ``draft_kv_only_us``: ``prefix_kv``, all a recompute
    needs; ``target_forward_us``: the target over the prefix, the price of aux features nobody kept.
    """
    tok, feat, pos = ids[None, 1 : n_cached + 1], aux[None, :n_cached], torch.arange(n_cached)
    cache = DraftKVCache()
    head(tok, feat, pos, cache)
    k, v = prefix_kv(head, tok, feat, pos)
    # NOTE: the premise of KV-only recomputation: an extend's cached keys are a per-position function.
    assert torch.allclose(cache.keys, k, atol=1e-5) and torch.allclose(cache.values, v, atol=1e-5), \
        "draft KV is not a per-position function of (token, feature, position)"
    per_tok = {
        "draft_forward_us": _median_s(lambda: head(tok, feat, pos, DraftKVCache()), repeats),
        "draft_kv_only_us": _median_s(lambda: prefix_kv(head, tok, feat, pos), repeats),
        "target_forward_us": _median_s(lambda: recorder.aux_hidden(ids[None, :n_cached]), repeats),
    }
    cfg, tcfg = head.cfg, recorder.target.config
    target_kv = 2 * tcfg.num_hidden_layers * tcfg.num_key_value_heads * (tcfg.head_dim or cfg.head_dim)
    return {**{k_: round(s * 1e6 / n_cached, 2) for k_, s in per_tok.items()}, "prefix_tokens": n_cached,
            "draft_kv_floats_per_token": 2 * cfg.num_key_value_heads * cfg.head_dim,
            "aux_feature_floats_per_token": cfg.n_aux * cfg.target_hidden_size,
            "target_kv_floats_per_token": target_kv}


# --------------------------------------------------------------------------- report


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def summarise(rounds: dict, first: int) -> dict:
    """Per domain and variant: mean accept length over all rounds and over each sequence's first rounds."""
    return {d: {v: {"accept": round(_mean([a for seq in r[v] for a in seq]), 4),
                    f"accept_first{first}": round(_mean([a for seq in r[v] for a in seq[:first]]), 4),
                    "rounds": sum(len(seq) for seq in r[v])} for v in VARIANTS} for d, r in rounds.items()}


def table(pairs: dict, first: int) -> list[str]:
    lines = [f"{'pair':<10} {'domain':<8} {'A':>6} {'stale':>6} {'fresh':>6} {'no-pfx':>6} {'rounds':>6}  "
             f"{'first' + str(first) + ' A/stale/fresh':>22}  {'kv diff':>7} {'gain kept':>9} {'stale/fresh':>11}"]
    for name, pair in pairs.items():
        for d, s in pair["summary"].items():
            a, st, fr, none = (s[v]["accept"] for v in VARIANTS)
            f_ = "/".join(f"{s[v][f'accept_first{first}']:.2f}" for v in VARIANTS[:3])
            # Share of the swap's gain that survives a stale prefix; "-" when the swap gained nothing here.
            kept = f"{(st - a) / (fr - a):9.2f}" if fr - a >= 0.05 else f"{'-':>9}"
            lines.append(f"{name:<10} {d:<8} {a:6.3f} {st:6.3f} {fr:6.3f} {none:6.3f} {s['fresh']['rounds']:6d}  "
                         f"{f_:>22}  {pair['prefix_kv_rel_diff'][d]:7.3f} {kept} {st / fr:11.3f}")
    return lines


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [(p, d) for p, pair in result["pairs"].items() for d in pair["summary"]]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    width = 0.8 / len(VARIANTS)
    labels = {"A": "A (no swap)", "stale": "B, prefix KV by A", "fresh": "B, prefix KV by B",
              "no-prefix": "B, no prefix KV"}
    for i, v in enumerate(VARIANTS):
        vals = [result["pairs"][p]["summary"][d][v]["accept"] for p, d in keys]
        ax.bar([j + (i - (len(VARIANTS) - 1) / 2) * width for j in range(len(keys))], vals, width, label=labels[v])
    ax.set_xticks(range(len(keys)), [f"{p}\n{d}" for p, d in keys])
    ax.set_ylabel("mean accept length (4-step chain)")
    ax.set_title(f"draft KV of a {result['prompt_len'] - 1}-token cached prefix after a head swap A -> B")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-a", type=Path, default=None, help="A of the shipped pair (default turbo-tiny-eagle3)")
    parser.add_argument("--head-b", type=Path, default=None, help="B of the shipped pair (default: A fine-tuned)")
    parser.add_argument("--code-head", type=Path, default=CODE_HEAD, help="A of the code-only pair, run if present")
    parser.add_argument("--finetune-steps", type=int, default=200)
    parser.add_argument("--prompts", type=int, default=16, help="prompts per domain")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--first-rounds", type=int, default=4, help="also report the first rounds alone")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 prompts, short sequences, 20 steps")
    parser.add_argument("--out", type=Path, default=RESULTS / "draft_kv_staleness.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.finetune_steps, args.prompts, args.prompt_len, args.new_tokens = 20, 2, 48, 32
    torch.set_num_threads(args.threads)
    started = time.time()

    from turbo.zoo.presets import zoo_path

    target, tok, _ = load_target("turbo-tiny")
    recorder = TargetRecorder(target, PRESETS["turbo-tiny-eagle3"].aux_layer_ids)
    # B's fine-tuning stream (the records the target was trained on) and the held-out streams of both domains.
    records, heldout = corpus_streams(replace(PRESETS["turbo-tiny-eagle3"], domains=("records",)), tok)
    work = make_workload(recorder, heldout, args.prompts, args.prompt_len, args.new_tokens, args.seed)

    specs = {"shipped": (args.head_a or zoo_path("turbo-tiny-eagle3"), args.head_b)}
    if (args.code_head / "config.json").is_file():
        specs["code-only"] = (args.code_head, None)
    else:
        print(f"no code-only head at {args.code_head}: running the shipped pair only", file=sys.stderr)
    pairs: dict[str, dict] = {}
    for name, (path_a, path_b) in specs.items():
        head_a = Eagle3Head.load(path_a)
        t0 = time.time()
        head_b = Eagle3Head.load(path_b) if path_b else finetune_on_records(head_a, recorder, records,
                                                                            args.finetune_steps, args.seed)
        finetune_s = time.time() - t0
        rounds = run_pair(head_a, head_b, work, args.prompt_len)
        checks = {d: agrees_with_chain_replay(head_b, work[d], args.prompt_len, rounds[d]["fresh"]) for d in work}
        pairs[name] = {"head_a": str(path_a), "head_b": str(path_b) if path_b else
                       f"head_a + {args.finetune_steps} records fine-tune steps (seed {args.seed})",
                       "finetune_seconds": round(finetune_s, 1), "fresh_matches_chain_replay": checks,
                       "prefix_kv_rel_diff": {d: round(kv_rel_diff(head_a, head_b, work[d], args.prompt_len - 1), 4)
                                              for d in work},
                       "summary": summarise(rounds, args.first_rounds), "rounds": rounds}
        print(f"{name}: B ready in {finetune_s:.0f} s; fresh replay == chain_replay: {checks}", flush=True)

    w = work["code"]
    cost = recompute_cost(Eagle3Head.load(specs["shipped"][0]), recorder, w["ids"][0], w["aux"][0],
                          args.prompt_len - 1, repeats=5 if args.quick else 20)
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                         text=True).stdout.strip()
    given = argv if argv is not None else sys.argv[1:]
    result = {
        "command": " ".join(["python benchmark/bench_draft_kv_staleness.py", *given]),
        "git_sha": sha,
        "hardware": {"machine": platform.machine(), "cpu": _cpu_model(), "cores": len(os.sched_getaffinity(0)),
                     "threads": torch.get_num_threads()},
        "seed": args.seed, "prompts_per_domain": args.prompts, "prompt_len": args.prompt_len,
        "cached_prefix": args.prompt_len - 1, "new_tokens": args.new_tokens, "n_steps": N_STEPS, "topk": 1,
        "finetune_steps": args.finetune_steps, "recompute_cost": cost, "pairs": pairs,
        "wall_seconds": round(time.time() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out.with_suffix(".png"))

    print("\n".join(table(pairs, args.first_rounds)))
    print(f"recompute per prefix token (batch 1, {cost['prefix_tokens']} tokens): draft forward "
          f"{cost['draft_forward_us']:.1f} us, draft KV only {cost['draft_kv_only_us']:.1f} us, target forward "
          f"for the aux features {cost['target_forward_us']:.1f} us; floats per token: draft KV "
          f"{cost['draft_kv_floats_per_token']}, aux features {cost['aux_feature_floats_per_token']}, target KV "
          f"{cost['target_kv_floats_per_token']}")
    for name, pair in pairs.items():
        s = pair["summary"]
        print(f"stale/fresh accept ratio ({name}): " + ", ".join(
            f"{d} {s[d]['stale']['accept'] / s[d]['fresh']['accept']:.3f}" for d in s))
    return result


if __name__ == "__main__":
    main()
