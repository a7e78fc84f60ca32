"""Ladder-Residual against standard-residual tensor parallelism, same weights, side by side.

    python benchmark/bench_ladder.py                                  # ~12 min on the 2-core CPU machine
    python benchmark/bench_ladder.py --topologies 1node --delays-us 0,1000 --batch 1

Systems (both TP2, on the portable platform, gloo all-reduce):
- "standard": upstream's ``LlamaForCausalLM`` serving turbo-tiny-ladder's weights under the Llama
  architecture (the all-reduce after every attention and MLP is waited on at once);
- "ladder": ``LadderLlamaForCausalLM`` serving the same weights (each all-reduce waited on one
  sub-layer later). The two compute different functions of the same weights: the point is the time.
Topologies: "1node" (one launcher, two ranks sharing the 2 cores), "2nodes" (``--nnodes 2``, two
launchers on this machine, one core each). Interconnect: the real loopback link, plus a simulated slower
one (``--turbo-allreduce-delay-us D``: every TP all-reduce takes at least D from issue to result, on
both systems alike).

Per system, topology, delay and batch: decode output tokens/s (``batch`` requests in flight, 32-token
prompts, 64 new tokens, greedy, EOS ignored) and time to first token (256-token prompts, one new token,
median). Each run flushes the radix cache and uses seeded prompts shared by every system. Printed last:
ladder / standard for each, next to the bound (T0 + n d) / (max(T0, m d) + (n - m) d): T0 is the
standard system's measured time per decode step at delay 0, n = 2L + 1 all-reduces per step (one per
attention and MLP, one in the embedding), m = 2L - 1 of which the ladder can overlap (not the embedding's,
not the last sub-layer's). The script also checks that each system's greedy tokens are identical across
topologies and delays. Writes benchmark/results/ladder/bench_ladder.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmark" / "results" / "ladder"
sys.path.insert(0, str(REPO / "benchmark"))
from bench_spec import flush_cache  # noqa: E402  (same retrying flush)

SYSTEMS = ("standard", "ladder")
TOPOLOGIES = {"1node": 1, "2nodes": 2}


def _post(url: str, payload: dict, timeout: float = 600) -> dict:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def standard_copy(ladder_dir: Path, out: Path) -> Path:
    """The ladder checkpoint's weights under the plain Llama architecture."""
    out.mkdir(parents=True, exist_ok=True)
    for f in ladder_dir.iterdir():
        if f.is_file() and f.name != "config.json":
            shutil.copyfile(f, out / f.name)
    cfg = json.loads((ladder_dir / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg.pop("ladder_start_layer", None)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(16, vocab) for _ in range(length)] for _ in range(n)]


def decode_run(url: str, batch_prompts: list[list[int]], n_new: int, batch: int) -> dict:
    flush_cache(url)

    def one(ids):
        return _post(f"{url}/generate", {"input_ids": ids, "sampling_params": {
            "max_new_tokens": n_new, "min_new_tokens": n_new, "temperature": 0, "ignore_eos": True}})

    t0 = time.perf_counter()
    with ThreadPoolExecutor(batch) as pool:
        outs = list(pool.map(one, batch_prompts))
    wall = time.perf_counter() - t0
    tokens = sum(o["meta_info"]["completion_tokens"] for o in outs)
    return {"output_tok_s": tokens / wall, "wall_s": wall, "output_tokens": tokens,
            "step_ms": 1000 * wall / (tokens / batch), "output_ids": [o["output_ids"] for o in outs]}


def ttft_run(url: str, long_prompts: list[list[int]]) -> dict:
    flush_cache(url)
    samples = []
    for ids in long_prompts:
        t0 = time.perf_counter()
        _post(f"{url}/generate", {"input_ids": ids, "sampling_params": {"max_new_tokens": 1, "temperature": 0}})
        samples.append(1000 * (time.perf_counter() - t0))
    return {"ttft_ms": statistics.median(samples), "samples_ms": samples}


def bound(t0_ms: float, delay_ms: float, n_layers: int) -> float:
    """(T0 + n d) / (max(T0, m d) + (n - m) d): the most a one-sub-layer overlap can give."""
    n, m = 2 * n_layers + 1, 2 * n_layers - 1
    return (t0_ms + n * delay_ms) / (max(t0_ms, m * delay_ms) + (n - m) * delay_ms)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(result["topologies"]), figsize=(5.5 * len(result["topologies"]), 3.8), squeeze=False)
    for ax, topo in zip(axes[0], result["topologies"]):
        for batch in result["batch"]:
            ratios = [result["ratios"][f"{topo}/{d}/{batch}"]["decode"] for d in result["delays_us"]]
            ax.plot(result["delays_us"], ratios, marker="o", label=f"ladder/standard, batch {batch}")
            bounds = [result["ratios"][f"{topo}/{d}/{batch}"]["bound"] for d in result["delays_us"]]
            ax.plot(result["delays_us"], bounds, linestyle="--", alpha=0.6, label=f"bound, batch {batch}")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set(xlabel="simulated all-reduce latency (us)", ylabel="decode tokens/s ratio", title=f"TP2, {topo}")
        ax.legend(fontsize=7)
    fig.suptitle("turbo-tiny-ladder on CPU: Ladder-Residual vs standard TP2 (same weights)", fontsize=10)
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
    parser.add_argument("--topologies", default="1node,2nodes", help=f"comma-separated, from {list(TOPOLOGIES)}")
    parser.add_argument("--delays-us", default="0,200,1000", help="comma-separated simulated all-reduce latencies")
    parser.add_argument("--batch", default="1,16", help="comma-separated numbers of requests in flight")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--ttft-prompt-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--full", action="store_true", help="delays 0,100,300,1000,3000 us")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_ladder.json")
    args = parser.parse_args(argv)

    from sglang_turbo.server_process import kill_server, launch_turbo_nodes
    from turbo.zoo.presets import zoo_path

    topologies = args.topologies.split(",")
    if unknown := [t for t in topologies if t not in TOPOLOGIES]:
        parser.error(f"unknown topologies {unknown}; choose from {list(TOPOLOGIES)}")
    delays = [0, 100, 300, 1000, 3000] if args.full else [int(d) for d in args.delays_us.split(",")]
    batches = [int(b) for b in args.batch.split(",")]
    ladder_dir = zoo_path("turbo-tiny-ladder")
    cfg = json.loads((ladder_dir / "config.json").read_text())
    work = Path(tempfile.mkdtemp(prefix="bench-ladder-"))
    models = {"ladder": ladder_dir, "standard": standard_copy(ladder_dir, work / "standard")}
    decode_prompts = prompts(max(batches), args.prompt_tokens, cfg["vocab_size"], args.seed)
    long_prompts = prompts(5, args.ttft_prompt_tokens, cfg["vocab_size"], args.seed + 1)

    runs: dict[str, dict] = {}  # "system/topology/delay" -> {"batch B": decode figures, "ttft": ...}
    for topo in topologies:
        for delay in delays:
            for system in SYSTEMS:
                key = f"{system}/{topo}/{delay}"
                env = {"SGLANG_TURBO_THREADS": "1"}  # one core per rank in both topologies
                flags = ["--tp-size", "2", "--max-total-tokens", "16384", "--turbo-allreduce-delay-us", str(delay)]
                procs, url = launch_turbo_nodes(models[system], flags, nnodes=TOPOLOGIES[topo], env=env,
                                                log_dir=work / key.replace("/", "-"))
                try:
                    decode_run(url, decode_prompts[:2], 8, 2)  # warm-up
                    runs[key] = {f"batch {b}": decode_run(url, decode_prompts[:b], args.new_tokens, b) for b in batches}
                    runs[key]["ttft"] = ttft_run(url, long_prompts)
                finally:
                    for p in procs:
                        kill_server(p)
                print(f"{key:>24}: " + "  ".join(
                    f"batch {b}: {runs[key][f'batch {b}']['output_tok_s']:6.1f} tok/s" for b in batches)
                    + f"  ttft {runs[key]['ttft']['ttft_ms']:.1f} ms", flush=True)

    # Greedy tokens of each system must not depend on topology or delay.
    identical = {}
    for system in SYSTEMS:
        for b in batches:
            outs = [runs[f"{system}/{t}/{d}"][f"batch {b}"]["output_ids"] for t in topologies for d in delays]
            identical[f"{system}/batch {b}"] = all(o == outs[0] for o in outs)

    ratios = {}
    for topo in topologies:
        t0 = {b: runs[f"standard/{topo}/{delays[0]}"][f"batch {b}"]["step_ms"] for b in batches}
        for delay in delays:
            std, lad = runs[f"standard/{topo}/{delay}"], runs[f"ladder/{topo}/{delay}"]
            for b in batches:
                ratios[f"{topo}/{delay}/{b}"] = {
                    "decode": lad[f"batch {b}"]["output_tok_s"] / std[f"batch {b}"]["output_tok_s"],
                    "ttft": lad["ttft"]["ttft_ms"] / std["ttft"]["ttft_ms"],
                    "bound": bound(t0[b], delay / 1000, cfg["num_hidden_layers"]) if delays[0] == 0 else None,
                }

    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    result = {
        "command": " ".join(["python benchmark/bench_ladder.py"] + (argv if argv is not None else sys.argv[1:])),
        "git_sha": sha,
        "hardware": {"machine": platform.machine(), "cpu": _cpu_model(), "cores": len(os.sched_getaffinity(0))},
        "model": "turbo-tiny-ladder", "tp_size": 2, "topologies": topologies, "delays_us": delays, "batch": batches,
        "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens,
        "ttft_prompt_tokens": args.ttft_prompt_tokens, "seed": args.seed,
        "runs": {k: {kk: {f: v for f, v in vv.items() if f != "output_ids"} for kk, vv in r.items()} for k, r in runs.items()},
        "greedy_identical_across_topologies_and_delays": identical,
        "ratios": ratios,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out.with_suffix(".png"))
    shutil.rmtree(work, ignore_errors=True)

    print(f"greedy tokens identical across topologies and delays: {identical}")
    for key, r in ratios.items():
        topo, delay, b = key.split("/")
        bound_txt = f"  (bound {r['bound']:.2f}x)" if r["bound"] else ""
        print(f"{topo:>6} delay {delay:>5} us batch {b:>2}  ladder/standard: decode tok/s {r['decode']:.2f}x"
              f"{bound_txt}  ttft {r['ttft']:.2f}x")
    return result


if __name__ == "__main__":
    main()
