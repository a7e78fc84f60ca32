"""sglang-turbo vs transformers ``generate``: the same model and requests, side by side.

    python benchmark/bench_serving_vs_hf.py                # turbo-tiny, 32 requests, concurrency 1 and 16
    python benchmark/bench_serving_vs_hf.py --num-prompts 64 --concurrency 1,4,16
    python benchmark/bench_serving_vs_hf.py --systems compiled   # only the --enable-torch-compile server
    python benchmark/bench_serving_vs_hf.py --systems compiled,compiled-overlap   # upstream's overlap scheduler beside

Systems: ``compiled`` (sglang-turbo's CPU default for a Llama checkpoint: CPU graphs,
``--enable-torch-compile``, see docs/serving.md), ``eager`` (the same with
``--disable-cuda-graph``: decode runs layer by layer in Python), ``compiled-overlap``
(``compiled`` with upstream's overlap scheduler, which the CPU platform turns off) and
``transformers``.
Every server starts first and idles (it sleeps, see docs/serving.md) while another
system runs; then, for each of ``--rounds`` rounds and each concurrency, every
system runs the workload in turn, in reverse order every other round. Interleaving
matters on a shared 2-core machine, whose speed drifts by 20% over minutes: systems
measured minutes apart would compare the machine, not the systems. Figures sum each
system's rounds.

Workload (seeded): prompt lengths uniform in [32, 512] tokens, output lengths
uniform in [16, 256] tokens, EOS ignored, greedy. For each concurrency C:
- sglang-turbo: the server gets C requests in flight at a time (continuous batching,
  radix cache flushed before each run);
- transformers: C == 1 runs ``generate`` request by request; C > 1 runs static
  batches of C (left-padded, as a ``generate`` user would), each batch running to its
  longest output; only the tokens each request asked for are counted.
Figures: output tokens/s (requested output tokens / wall time) and mean time per
output token (mean over requests of latency / output tokens). Ratios last, with
each round's ratio beside the pooled one so the spread is visible.
Writes benchmark/results/serving/bench_serving_vs_hf.json and .png.
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
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmark" / "results" / "serving"


def make_workload(n: int, vocab_size: int, seed: int, first_id: int = 16) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "input_ids": [rng.randrange(first_id, vocab_size) for _ in range(rng.randint(32, 512))],
            "max_new_tokens": rng.randint(16, 256),
        }
        for _ in range(n)
    ]


# ----------------------------------------------------------------------------- sglang-turbo


def _post(url: str, payload: dict, timeout: float = 600) -> bytes:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.read()


def run_server(base_url: str, workload: list[dict], concurrency: int) -> dict:
    _post(f"{base_url}/flush_cache", {})  # answers plain text

    def one(item: dict) -> tuple[float, int]:
        t0 = time.perf_counter()
        out = json.loads(_post(f"{base_url}/generate", {
            "input_ids": item["input_ids"],
            "sampling_params": {"max_new_tokens": item["max_new_tokens"], "temperature": 0, "ignore_eos": True},
        }))
        n_out = out["meta_info"]["completion_tokens"]
        assert n_out == item["max_new_tokens"], f"server returned {n_out} tokens, asked {item['max_new_tokens']}"
        return time.perf_counter() - t0, n_out

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        samples = list(pool.map(one, workload))
    return _summarise(samples, time.perf_counter() - t0)


# ----------------------------------------------------------------------------- transformers


def run_hf(model, workload: list[dict], concurrency: int, pad_id: int) -> dict:
    samples, t_start = [], time.perf_counter()
    for start in range(0, len(workload), concurrency):
        batch = workload[start : start + concurrency]
        width = max(len(r["input_ids"]) for r in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attn = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):  # left padding
            ids[i, width - len(r["input_ids"]) :] = torch.tensor(r["input_ids"])
            attn[i, width - len(r["input_ids"]) :] = 1
        n_new = max(r["max_new_tokens"] for r in batch)
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=n_new, min_new_tokens=n_new,
                           do_sample=False, pad_token_id=pad_id)
        latency = time.perf_counter() - t0  # every request of a static batch finishes with it
        samples += [(latency, r["max_new_tokens"]) for r in batch]
    return _summarise(samples, time.perf_counter() - t_start)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _pool(rounds: list[dict]) -> dict:
    """One system's rounds at one concurrency, as one run: summed tokens and wall time, all samples."""
    samples = [(x["latency_s"], x["output_tokens"]) for r in rounds for x in r["samples"]]
    pooled = _summarise(samples, sum(r["wall_s"] for r in rounds))
    pooled["rounds_output_tok_s"] = [r["output_tok_s"] for r in rounds]
    return pooled


def _summarise(samples: list[tuple[float, int]], wall_s: float) -> dict:
    out_tokens = sum(n for _, n in samples)
    return {
        "output_tok_s": out_tokens / wall_s,
        "mean_tpot_ms": 1e3 * statistics.mean(lat / n for lat, n in samples),
        "wall_s": wall_s,
        "output_tokens": out_tokens,
        "samples": [{"latency_s": lat, "output_tokens": n} for lat, n in samples],
    }


# ----------------------------------------------------------------------------- report


# name -> (launch flags, environment)
SERVER_SYSTEMS = {
    "eager": (["--disable-cuda-graph"], {}),
    "compiled": (["--enable-torch-compile"], {}),
    # upstream's overlap scheduler, which the CPU platform turns off by default (cpu_defaults.py)
    "compiled-overlap": (["--enable-torch-compile"], {"SGLANG_TURBO_OVERLAP_SCHEDULE": "on"}),
}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    concs = [str(c) for c in result["concurrency"]]
    systems = list(result["runs"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(systems)
    for i, system in enumerate(systems):
        vals = [result["runs"][system][c]["output_tok_s"] for c in concs]
        ax.bar([j + (i - (len(systems) - 1) / 2) * width for j in range(len(concs))], vals, width, label=system)
    ax.set_xticks(range(len(concs)), [f"concurrency {c}" for c in concs])
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"{result['model_name']}: serving vs transformers generate")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="turbo-tiny", help="embedded model name or checkpoint directory")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--concurrency", default="1,16", help="comma-separated concurrency levels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of every system (see above)")
    parser.add_argument("--systems", default="eager,compiled", help=f"sglang-turbo servers, of {list(SERVER_SYSTEMS)}")
    parser.add_argument("--server-args", default="", help="extra launch_server flags for every server, one string")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_serving_vs_hf.json")
    args = parser.parse_args(argv)

    from transformers import AutoConfig, AutoModelForCausalLM

    from sglang_turbo.server_process import kill_server, launch_turbo_server
    from turbo.zoo.presets import PRESETS, zoo_path

    model_path = zoo_path(args.model) if args.model in PRESETS else Path(args.model)
    concurrency = [int(c) for c in args.concurrency.split(",")]
    config = AutoConfig.from_pretrained(model_path)
    workload = make_workload(args.num_prompts, config.vocab_size, args.seed)
    warmup = make_workload(2, config.vocab_size, args.seed + 1)

    systems = args.systems.split(",")
    unknown = [s for s in systems if s not in SERVER_SYSTEMS]
    if unknown:
        parser.error(f"--systems: unknown {unknown}; choose from {list(SERVER_SYSTEMS)}")

    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
    names = [f"sglang-turbo {s}" for s in systems] + ["transformers"]
    rounds: dict[str, dict[str, list[dict]]] = {name: {str(c): [] for c in concurrency} for name in names}
    servers: dict[str, tuple] = {}
    try:
        for system in systems:
            flags, env = SERVER_SYSTEMS[system]
            servers[f"sglang-turbo {system}"] = launch_turbo_server(model_path, flags + args.server_args.split(), env=env)
        run_hf(hf, warmup, 2, pad_id)
        for _, url in servers.values():
            run_server(url, warmup, 2)
        order = ["transformers", *servers]
        for r in range(args.rounds):
            for c in concurrency:
                # Every other round in reverse: a system that always ran right after another would
                # inherit its after-effects (measured: two servers 11% apart in a fixed order were 3% apart,
                # the other way, alternating).
                for name in order if r % 2 == 0 else order[::-1]:
                    if name == "transformers":
                        rounds[name][str(c)].append(run_hf(hf, workload, c, pad_id))
                    else:
                        rounds[name][str(c)].append(run_server(servers[name][1], workload, c))
    finally:
        for proc, _ in servers.values():
            kill_server(proc)
    runs = {name: {c: _pool(r) for c, r in by_c.items()} for name, by_c in rounds.items()}

    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    result = {
        "command": " ".join(["python benchmark/bench_serving_vs_hf.py"] + sys.argv[1:]),
        "git_sha": sha,
        "hardware": {"machine": platform.machine(), "cpu": _cpu_model(), "cores": len(os.sched_getaffinity(0))},
        "model_name": args.model,
        "seed": args.seed,
        "rounds": args.rounds,
        "num_prompts": args.num_prompts,
        "concurrency": concurrency,
        "server_args": args.server_args,
        "systems": {s: {"flags": SERVER_SYSTEMS[s][0], "env": SERVER_SYSTEMS[s][1]} for s in systems},
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out.with_suffix(".png"))

    for c in concurrency:
        for name, run in runs.items():
            r = run[str(c)]
            print(f"concurrency {c:>3}  {name:<22} tok/s {r['output_tok_s']:8.1f}  tpot_ms {r['mean_tpot_ms']:7.2f}")
    for c in concurrency:
        h = runs["transformers"][str(c)]
        for system in systems:
            t = runs[f"sglang-turbo {system}"][str(c)]
            per_round = " ".join(
                f"{a / b:.2f}x" for a, b in zip(t["rounds_output_tok_s"], h["rounds_output_tok_s"])
            )
            print(f"concurrency {c:>3}  sglang-turbo {system:<8} / transformers: tok/s "
                  f"{t['output_tok_s'] / h['output_tok_s']:.2f}x (rounds: {per_round})  "
                  f"tpot_ms {t['mean_tpot_ms'] / h['mean_tpot_ms']:.2f}x")
    return result


if __name__ == "__main__":
    main()
