"""Ladder-Residual against standard-residual tensor parallelism, same weights, side by side.

    python benchmark/bench_ladder.py                                  # ~15 min on the 2-core CPU machine
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

A link probe runs first: two gloo processes (one thread each, as the server ranks) time one TP2 MLP
sub-layer's compute at turbo-tiny's shapes (C) and one all-reduce of its output (M). Then, per topology
and delay, both systems' servers run at once and are measured alternately (A B, B A, ... ``--repeats``
times; only one is busy at a time), so every ratio pairs two runs under the same machine conditions:
decode output tokens/s (``batch`` requests in flight, 32-token prompts, 64 new tokens, greedy, EOS
ignored) and time to first token (256-token prompts, one new token, median of 5). Printed last:
ladder / standard, the median of the paired ratios with their range, next to the per-sub-layer bound
(C + M') / max(C, M') with M' = max(M, delay): what overlapping one all-reduce with the next sub-layer's
compute can give at most. The script also checks that each system's greedy tokens are identical across
topologies, delays and repeats. Writes benchmark/results/ladder/bench_ladder.json and .png.
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
from bench_spec import _cpu_model, flush_cache  # noqa: E402

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


def bound(compute_us: float, comm_us: float) -> float:
    """(C + M) / max(C, M): the most one sub-layer gains when its all-reduce (M) runs beside the next
    sub-layer's compute (C) instead of after it."""
    return (compute_us + comm_us) / max(compute_us, comm_us)


def _probe_rank(rank: int, port: int, batches: list[int], hidden: int, inter: int, out) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    gen = torch.Generator().manual_seed(rank)
    w_up = torch.randn(hidden, inter, generator=gen)  # a TP2 shard of gate+up: 2 * intermediate / 2
    w_down = torch.randn(inter // 2, hidden, generator=gen)
    result = {}
    for b in batches:
        x = torch.randn(b, hidden, generator=gen)
        n = 400
        t0 = time.perf_counter()
        for _ in range(n):
            gate, up = (x @ w_up).chunk(2, dim=-1)
            y = (torch.nn.functional.silu(gate) * up) @ w_down
        compute = (time.perf_counter() - t0) / n
        buf = torch.zeros_like(y)  # zeros stay zeros: no overflow over the repeats
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(n):
            dist.all_reduce(buf)
        comm = (time.perf_counter() - t0) / n
        result[str(b)] = {"compute_us": compute * 1e6, "allreduce_us": comm * 1e6}
    if rank == 0:
        out.put(result)
    dist.destroy_process_group()


def probe_link(batches: list[int], hidden: int = 256, inter: int = 768) -> dict:
    """Per batch size: time of one TP2 MLP sub-layer's compute (turbo-tiny's shapes) and of one gloo
    all-reduce of its output between two processes, one thread each, as the servers run them."""
    import torch.multiprocessing as mp

    from sglang_turbo.server_process import free_port

    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    mp.start_processes(_probe_rank, args=(free_port(), batches, hidden, inter, out), nprocs=2, start_method="spawn")
    return out.get()


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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topologies", default="1node,2nodes", help=f"comma-separated, from {list(TOPOLOGIES)}")
    parser.add_argument("--delays-us", default="0,200,1000", help="comma-separated simulated all-reduce latencies")
    parser.add_argument("--batch", default="1,16", help="comma-separated numbers of requests in flight")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--ttft-prompt-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="paired measurements per configuration")
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

    link = probe_link(batches)
    print("link probe (2 gloo processes, 1 thread each): all-reduce " + "  ".join(
        f"batch {b}: {link[str(b)]['allreduce_us']:.0f} us vs sub-layer compute {link[str(b)]['compute_us']:.0f} us"
        for b in batches), flush=True)

    # Both systems' servers run at once and are measured alternately (A B, B A, ...), so each ratio pairs
    # two runs under the same machine conditions; only one system is active at a time.
    runs: dict[str, list] = {}  # "system/topology/delay" -> one {"batch B": ..., "ttft": ...} per repeat
    for topo in topologies:
        for delay in delays:
            servers = {}
            try:
                for system in SYSTEMS:
                    flags = ["--tp-size", "2", "--max-total-tokens", "16384", "--turbo-allreduce-delay-us", str(delay)]
                    servers[system] = launch_turbo_nodes(
                        models[system], flags, nnodes=TOPOLOGIES[topo], env={"SGLANG_TURBO_THREADS": "1"},
                        log_dir=work / f"{system}-{topo}-{delay}")
                for system, (_, url) in servers.items():
                    decode_run(url, decode_prompts[:2], 8, 2)  # warm-up
                for r in range(args.repeats):
                    order = SYSTEMS if r % 2 == 0 else SYSTEMS[::-1]
                    for system in order:
                        url = servers[system][1]
                        one = {f"batch {b}": decode_run(url, decode_prompts[:b], args.new_tokens, b) for b in batches}
                        one["ttft"] = ttft_run(url, long_prompts)
                        runs.setdefault(f"{system}/{topo}/{delay}", []).append(one)
            finally:
                for procs, _url in servers.values():
                    for proc in procs:
                        kill_server(proc)
            for system in SYSTEMS:
                key = f"{system}/{topo}/{delay}"
                print(f"{key:>24}: " + "  ".join(
                    f"batch {b}: {statistics.median(x[f'batch {b}']['output_tok_s'] for x in runs[key]):6.1f} tok/s"
                    for b in batches) + f"  ttft {statistics.median(x['ttft']['ttft_ms'] for x in runs[key]):.1f} ms",
                    flush=True)

    # Greedy tokens of each system must not depend on topology, delay or repeat.
    identical = {}
    for system in SYSTEMS:
        for b in batches:
            outs = [x[f"batch {b}"]["output_ids"] for t in topologies for d in delays for x in runs[f"{system}/{t}/{d}"]]
            identical[f"{system}/batch {b}"] = all(o == outs[0] for o in outs)

    ratios = {}
    for topo in topologies:
        for delay in delays:
            std, lad = runs[f"standard/{topo}/{delay}"], runs[f"ladder/{topo}/{delay}"]
            ttft = [l["ttft"]["ttft_ms"] / s["ttft"]["ttft_ms"] for s, l in zip(std, lad)]
            for b in batches:
                paired = [l[f"batch {b}"]["output_tok_s"] / s[f"batch {b}"]["output_tok_s"] for s, l in zip(std, lad)]
                ratios[f"{topo}/{delay}/{b}"] = {
                    "decode": statistics.median(paired), "decode_min": min(paired), "decode_max": max(paired),
                    "ttft": statistics.median(ttft),
                    "bound": bound(link[str(b)]["compute_us"], max(link[str(b)]["allreduce_us"], delay)),
                }

    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    result = {
        "command": " ".join(["python benchmark/bench_ladder.py"] + (argv if argv is not None else sys.argv[1:])),
        "git_sha": sha,
        "hardware": {"machine": platform.machine(), "cpu": _cpu_model(), "cores": len(os.sched_getaffinity(0))},
        "model": "turbo-tiny-ladder", "tp_size": 2, "topologies": topologies, "delays_us": delays, "batch": batches,
        "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens,
        "ttft_prompt_tokens": args.ttft_prompt_tokens, "seed": args.seed,
        "link_probe": link,
        "repeats": args.repeats,
        "runs": {k: [{kk: {f: v for f, v in vv.items() if f != "output_ids"} for kk, vv in x.items()} for x in r]
                 for k, r in runs.items()},
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
        print(f"{topo:>6} delay {delay:>5} us batch {b:>2}  ladder/standard: decode tok/s {r['decode']:.2f}x"
              f" [{r['decode_min']:.2f}-{r['decode_max']:.2f}]  (bound {r['bound']:.2f}x)  ttft {r['ttft']:.2f}x")
    return result


if __name__ == "__main__":
    main()
