"""Speculative decoding on the portable platform: every algorithm against none, side by side.

    python benchmark/bench_spec.py            # 16 prompts per domain, 128 new tokens, batch 1 and 8
    python benchmark/bench_spec.py --systems none,eagle3-chain --domains records --batch 1

Systems (by default): no speculation, EAGLE3 chain and tree, STANDALONE, NGRAM, and TURBO (the adaptive
speculator, in-domain here: benchmark/bench_adaptive_spec.py measures it under a domain shift). On
request: ``turbo-plain`` / ``turbo-plain-upstream-rounds``, TURBO never speculating, its rounds run as the
target's decode step or as upstream's one-token verify (docs/adaptive_speculator.md):

    python benchmark/bench_spec.py --systems none,turbo-plain,turbo-plain-upstream-rounds --batch 1 --domains code

and ``none-overlap``, no speculation on upstream's overlap scheduler (off on the CPU platform, serving.md).
``turbo-plain-no-learning`` and ``turbo-plain-feed-only`` (the learner fed but never training) split
what learning costs TURBO in fallback.

Workload (seeded, in-domain, held out: never seen by turbo-tiny, its draft or its EAGLE3 head in
training), one per domain: "code", 96-token windows of held-out standard-library files, and
"records", 96-token windows of generated records (JSON lines, CSV, configs, arithmetic, chat)
of the held-out seed, each starting at a line; each asks for 128 new tokens, greedy, EOS ignored. For each system one server is
started (upstream's speculative flags, unchanged) beside a server without speculation that stays up;
the two take turns for ``--rounds`` rounds (this host's speed drifts by 20% within minutes), the
radix cache is flushed before each run, and requests run with ``batch`` in flight at a time.
Figures per system, domain and batch: output tokens/s, mean accept length (completion tokens /
verify rounds, from ``meta_info``), and the tokens/s ratio to the runs of no speculation taken
beside it (pooled, and per round), printed last.
Writes benchmark/results/spec/bench_spec.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmark" / "results" / "spec"

TURBO = ["--speculative-algorithm", "TURBO", "--speculative-draft-model-path", "turbo-tiny-eagle3"]
SYSTEMS = {
    "none": [],
    "eagle3-chain": ["--speculative-algorithm", "EAGLE3", "--speculative-draft-model-path", "turbo-tiny-eagle3",
                     "--speculative-num-steps", "4", "--speculative-eagle-topk", "1",
                     "--speculative-num-draft-tokens", "5"],
    "eagle3-tree": ["--speculative-algorithm", "EAGLE3", "--speculative-draft-model-path", "turbo-tiny-eagle3",
                    "--speculative-num-steps", "4", "--speculative-eagle-topk", "4",
                    "--speculative-num-draft-tokens", "8"],
    "standalone": ["--speculative-algorithm", "STANDALONE", "--speculative-draft-model-path", "turbo-tiny-draft",
                   "--speculative-num-steps", "3", "--speculative-eagle-topk", "1",
                   "--speculative-num-draft-tokens", "4"],
    "ngram": ["--speculative-algorithm", "NGRAM"],
    # the adaptive speculator (docs/adaptive_speculator.md) with its defaults: the shipped head, learning
    # on, the controller choosing the head and the lookahead (at most 4 steps); nothing persisted
    "turbo": TURBO,
    # TURBO never speculating (still learning): every round is a lookahead-0 round, run as the target's decode
    # step, or (SYSTEM_ENV) as upstream's one-token verify
    "turbo-plain": TURBO + ["--turbo-controller", "plain"],
    "turbo-plain-upstream-rounds": TURBO + ["--turbo-controller", "plain"],
    # ... with learning off, and with the learner's feed but no training (SYSTEM_ENV: the learner blocks
    # before its first step): with turbo-plain, what the learner's feed and its training each cost
    "turbo-plain-no-learning": TURBO + ["--turbo-controller", "plain", "--turbo-disable-learning"],
    "turbo-plain-feed-only": TURBO + ["--turbo-controller", "plain"],
    "none-overlap": [],  # no speculation on upstream's overlap scheduler (SYSTEM_ENV), which the CPU platform turns off
}
# Environment a system's server gets on top of this process's
SYSTEM_ENV = {"turbo-plain-upstream-rounds": {"SGLANG_TURBO_PLAIN_ROUNDS": "off"},
              "turbo-plain-feed-only": {"SGLANG_TURBO_LEARNER_FAULT": "hang@0"},
              "none-overlap": {"SGLANG_TURBO_OVERLAP_SCHEDULE": "on"}}
DEFAULT_SYSTEMS = ("none", "eagle3-chain", "eagle3-tree", "standalone", "ngram", "turbo")


def make_prompts(tok, domain: str, n: int, prompt_tokens: int, seed: int) -> list[list[int]]:
    """``n`` prompts of held-out text of ``domain`` ("code": stdlib files; "records": generated records
    of the held-out seed), each ``prompt_tokens`` long and starting at a line."""
    from turbo.zoo.corpus import code_documents, record_documents
    from turbo.zoo.train import RECORD_SEED_HELD_OUT

    rng = random.Random(seed)
    if domain == "code":
        docs = [d.text for d in code_documents("heldout")]
    else:  # records are short: join them into documents long enough for a prompt and its continuation
        records = [d.text for d in record_documents(RECORD_SEED_HELD_OUT, 400)]
        docs = ["".join(records[i : i + 20]) for i in range(0, len(records), 20)]
    prompts = []
    while len(prompts) < n:
        text = rng.choice(docs)
        lines = text.splitlines(keepends=True)
        start = rng.randrange(max(1, len(lines) - 40))
        ids = tok("".join(lines[start:])).input_ids[:prompt_tokens]
        if len(ids) == prompt_tokens:
            prompts.append(ids)
    return prompts


def _post(url: str, payload: dict, timeout: float = 600) -> bytes:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.read()


def flush_cache(base_url: str, timeout_s: float = 10.0) -> None:
    """Empties the radix cache; the server refuses (400) while a finished request is still being released."""
    deadline = time.time() + timeout_s
    while True:
        try:
            _post(f"{base_url}/flush_cache", {})
            return
        except urllib.error.HTTPError:
            if time.time() > deadline:
                raise
            time.sleep(0.2)


def run(base_url: str, prompts: list[list[int]], n_new: int, batch: int) -> dict:
    flush_cache(base_url)

    def one(ids: list[int]) -> dict:
        out = json.loads(_post(f"{base_url}/generate", {
            "input_ids": ids,
            "sampling_params": {"max_new_tokens": n_new, "min_new_tokens": n_new, "temperature": 0, "ignore_eos": True},
        }))
        return out["meta_info"]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(batch) as pool:
        metas = list(pool.map(one, prompts))
    wall = time.perf_counter() - t0
    tokens = sum(m["completion_tokens"] for m in metas)
    rounds = [m.get("spec_verify_ct") or 0 for m in metas]
    return {
        "output_tok_s": tokens / wall,
        "wall_s": wall,
        "output_tokens": tokens,
        # upstream's definition, per request: completion tokens / verify rounds; None without speculation
        "mean_accept_length": statistics.mean(m["completion_tokens"] / r for m, r in zip(metas, rounds)) if all(rounds) else None,
    }


def pooled(samples: list[dict]) -> dict:
    """One figure for several runs of the same requests: tokens over wall time, mean accept length."""
    accept = [s["mean_accept_length"] for s in samples]
    tokens, wall = sum(s["output_tokens"] for s in samples), sum(s["wall_s"] for s in samples)
    return {"output_tok_s": tokens / wall, "wall_s": wall, "output_tokens": tokens,
            "mean_accept_length": statistics.mean(accept) if all(accept) else None}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = result["systems"]
    batches = [f"{d}/{b}" for d in result["domains"] for b in result["batch"]]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    width = 0.8 / len(systems)
    for i, name in enumerate(systems):
        vals = [result["runs"][name][b]["output_tok_s"] for b in batches]
        bars = ax.bar([j + (i - (len(systems) - 1) / 2) * width for j in range(len(batches))], vals, width, label=name)
        for bar, b in zip(bars, batches):
            acc = result["runs"][name][b]["mean_accept_length"]
            if acc:
                ax.annotate(f"{acc:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                            va="bottom", fontsize=7)
    ax.set_xticks(range(len(batches)), [f"{k.split('/')[0]}, batch {k.split('/')[1]}" for k in batches])
    ax.set_ylabel("output tokens/s (label: accept length)")
    ax.set_title("turbo-tiny on CPU: speculative decoding")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS), help=f"comma-separated, from {list(SYSTEMS)}")
    parser.add_argument("--batch", default="1,8", help="comma-separated numbers of requests in flight")
    parser.add_argument("--domains", default="code,records", help="comma-separated, from code,records")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=96)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=2, help="runs of each system, alternating with runs of none")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_spec.json")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from sglang_turbo.server_process import kill_server, launch_turbo_server
    from turbo.zoo.presets import zoo_path

    systems = args.systems.split(",")
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        parser.error(f"unknown systems {unknown}; choose from {list(SYSTEMS)}")
    batches = [int(b) for b in args.batch.split(",")]
    domains = args.domains.split(",")
    target = zoo_path("turbo-tiny")
    tok = AutoTokenizer.from_pretrained(target)
    prompts = {d: make_prompts(tok, d, args.num_prompts, args.prompt_tokens, args.seed) for d in domains}
    keys = [f"{d}/{b}" for d in domains for b in batches]

    def measure(url: str) -> dict:
        return {f"{d}/{b}": run(url, prompts[d], args.new_tokens, b) for d in domains for b in batches}

    # samples[system][key]: one run per round. "none" stays up on a server of its own and each other
    # system's rounds alternate with runs of it, so every ratio compares runs seconds apart: this host
    # drifts by 20% within minutes, and systems measured minutes apart compare the machine.
    samples: dict[str, dict[str, list]] = {name: {k: [] for k in keys} for name in systems}
    paired_none: dict[str, dict[str, list]] = {}  # system -> key -> the none runs beside its own
    baseline = launch_turbo_server(target, SYSTEMS["none"]) if "none" in systems else None
    try:
        if baseline:
            run(baseline[1], prompts[domains[0]][:2], 16, 2)  # warm-up
        for name in [s for s in systems if s != "none"] or ["none"]:
            proc, url = baseline if name == "none" else launch_turbo_server(target, SYSTEMS[name],
                                                                          env=SYSTEM_ENV.get(name))
            try:
                run(url, prompts[domains[0]][:2], 16, 2)  # warm-up
                paired_none[name] = {k: [] for k in keys}
                turns = [(name, url)] + ([("none", baseline[1])] if baseline and name != "none" else [])
                for r in range(args.rounds):
                    for who, where in turns if r % 2 == 0 else turns[::-1]:
                        for key, figures in measure(where).items():
                            samples[who][key].append(figures)
                            if who != name:
                                paired_none[name][key].append(figures)
            finally:
                if name != "none":  # none's server is the baseline, stopped last
                    kill_server(proc)
            print(f"{name:>13}: " + "  ".join(
                f"{key}: {pooled(samples[name][key])['output_tok_s']:6.1f} tok/s, "
                f"accept {pooled(samples[name][key])['mean_accept_length'] or 1:.2f}" for key in keys), flush=True)
    finally:
        if baseline:
            kill_server(baseline[0])
    runs = {name: {key: pooled(samples[name][key]) for key in keys} for name in systems}
    # each system against the runs of none interleaved with its own
    ratios = {name: {key: pooled(samples[name][key])["output_tok_s"] / pooled(paired_none[name][key])["output_tok_s"]
                     for key in keys}
              for name in systems if name != "none" and "none" in systems}

    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    result = {
        "command": " ".join(["python benchmark/bench_spec.py"] + sys.argv[1:]),
        "git_sha": sha,
        "hardware": {"machine": platform.machine(), "cpu": _cpu_model(), "cores": len(os.sched_getaffinity(0))},
        "systems": systems,
        "server_args": {s: SYSTEMS[s] for s in systems},
        "server_env": {s: SYSTEM_ENV[s] for s in systems if s in SYSTEM_ENV},
        "batch": batches,
        "domains": domains,
        "num_prompts": args.num_prompts,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "seed": args.seed,
        "rounds": args.rounds,
        "runs": runs,  # pooled over rounds; "none" over every run of it
        "ratios": ratios,
        "samples": samples,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out.with_suffix(".png"))

    for key in keys:
        for name, by_key in ratios.items():
            per_round = " ".join(f"{a['output_tok_s'] / b['output_tok_s']:.2f}"
                                 for a, b in zip(samples[name][key], paired_none[name][key]))
            accept = runs[name][key]["mean_accept_length"]
            print(f"{key:>10}  {name:>13}/none: tok/s {by_key[key]:.2f}x  (rounds {per_round}; "
                  f"accept length {'-' if accept is None else f'{accept:.2f}'})")
    return result


if __name__ == "__main__":
    main()
