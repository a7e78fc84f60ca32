"""The Llama-Mamba2 hybrid against its attention model at long context, side by side.

    python benchmark/bench_hybrid_long_context.py                         # ~20 min on the 2-core CPU machine
    python benchmark/bench_hybrid_long_context.py --lengths 1024,4096 --trials 2

Systems, both served by sglang-turbo on the portable platform, both up at once:
- "attention": turbo-tiny (6 attention layers);
- "hybrid": turbo-tiny-hybrid (turbo-tiny distilled with 4 of its 6 attention layers turned into Mamba2).
Both get ``max_position_embeddings`` raised to fit the longest context (``--json-model-override-args``):
they trained on 512-token windows, and the point is what they do past that.

At each context length, ``--trials`` passkey cases (turbo/hybrid/passkey.py: a value assigned at the top of
a long file of held-out code and asked for at the end) go to each system, alternating which goes first.
Each case is one streamed greedy request of ``--new-tokens`` tokens, from which come: whether the key was
retrieved, the time to first token (the prefill of the whole context), and decode tokens/s at batch 1
(tokens after the first over the time after the first). Then ``--batch`` requests of the length go at once
and decode tokens/s is counted while all of them decode together (what a server holding several long
requests delivers). Memory per request is what the server's pools hold for one
request of that length: KV bytes of every attention layer, plus the hybrid's fixed Mamba state (conv
window + scan state of every Mamba layer), from each model's config as the pools are sized
(sglang_turbo/cpu_defaults.py). Prints a table, writes benchmark/results/hybrid/bench_hybrid_long_context.json
and .png, and prints a summary line last: passkey accuracy at 8x the training length, and at 16k
tokens the hybrid / attention decode tokens/s (batch 1 and ``--batch``) and memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmark" / "results" / "hybrid"
sys.path.insert(0, str(REPO / "benchmark"))
from bench_spec import _cpu_model, flush_cache  # noqa: E402

SYSTEMS = {"attention": "turbo-tiny", "hybrid": "turbo-tiny-hybrid"}
TRAINING_LENGTH = 512  # the window turbo-tiny trained on and turbo-tiny-hybrid was distilled on


def streamed_generate(url: str, ids: list[int], n_new: int) -> dict:
    """One greedy request, streamed: its tokens, the time it was sent and the arrival time of each token."""
    payload = {"input_ids": ids, "stream": True,
               "sampling_params": {"max_new_tokens": n_new, "temperature": 0, "ignore_eos": True}}
    req = urllib.request.Request(f"{url}/generate", data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    sent, arrivals, output_ids = time.perf_counter(), [], []
    with urllib.request.urlopen(req, timeout=3600) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            ids_so_far = json.loads(line[len("data:"):]).get("output_ids", output_ids)
            now = time.perf_counter()
            arrivals += [now] * (len(ids_so_far) - len(output_ids))
            output_ids = ids_so_far
    return {"output_ids": output_ids, "sent": sent, "arrivals": arrivals}


def decode_tok_s(streams: list[dict]) -> float:
    """Tokens/s while every request of ``streams`` decodes: from the last first token to the first last token
    (SGLang runs the waiting prefills before resuming decode, so that window is the batch decoding together)."""
    begin, end = max(s["arrivals"][0] for s in streams), min(s["arrivals"][-1] for s in streams)
    tokens = sum(sum(begin < t <= end for t in s["arrivals"]) for s in streams)
    return tokens / (end - begin) if end > begin else float("nan")


def concurrent_generate(url: str, prompts: list[list[int]], n_new: int) -> list[dict]:
    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(lambda ids: streamed_generate(url, ids, n_new), prompts))


def memory_per_request(model_dir: Path, length: int) -> dict:
    from sglang_turbo.cpu_defaults import kv_bytes_per_token, mamba_state_bytes_per_request

    kv = kv_bytes_per_token(str(model_dir), "float32") * length
    state = mamba_state_bytes_per_request(str(model_dir)) or 0
    return {"kv_bytes": kv, "state_bytes": state, "total_bytes": kv + state}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = result["lengths"]
    fig, axes = plt.subplots(1, 5, figsize=(21, 4))
    panels = [("passkey_accuracy", "passkey accuracy"), ("decode_tok_s", "decode tokens/s (batch 1)"),
              (f"decode_tok_s_batch_{result['batch']}", f"decode tokens/s (batch {result['batch']})"),
              ("ttft_s", "time to first token (s)"), ("memory_mb", "KV + state MB per request")]
    for ax, (key, label) in zip(axes, panels):
        for system in result["systems"]:
            ax.plot(lengths, [result["table"][system][str(n)][key] for n in lengths], marker="o", label=system)
        if key == "passkey_accuracy":
            ax.set_ylim(-0.05, 1.05)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context tokens")
        ax.set_title(label)
        ax.axvline(TRAINING_LENGTH, color="grey", lw=0.8, ls=":")
        ax.legend()
    fig.suptitle(f"turbo-tiny-hybrid vs turbo-tiny ({result['hardware']['cores']} CPU cores, git {result['git_sha']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="512,1024,2048,4096,8192,16384", help="comma-separated context tokens")
    parser.add_argument("--trials", type=int, default=5, help="passkey cases per length and system")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4,
                        help="also measure decode tokens/s with this many requests of each length at once (1: off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_hybrid_long_context.json")
    args = parser.parse_args(argv)

    from tokenizers import Tokenizer

    from sglang_turbo.server_process import kill_server, launch_turbo_server
    from turbo.hybrid.passkey import passkey_cases
    from turbo.zoo.presets import zoo_path

    lengths = sorted(int(n) for n in args.lengths.split(","))
    dirs = {system: zoo_path(name) for system, name in SYSTEMS.items()}
    tok = Tokenizer.from_file(str(dirs["attention"] / "tokenizer.json"))
    cases = {n: passkey_cases(tok, n, args.trials, seed=args.seed) for n in lengths}
    positions = max(lengths) + args.new_tokens + 64
    flags = ["--json-model-override-args", json.dumps({"max_position_embeddings": positions}),
             "--max-total-tokens", str(max(1, args.batch) * positions + 1024)]
    work = Path(tempfile.mkdtemp(prefix="bench-hybrid-"))

    runs: dict[str, dict[int, list[dict]]] = {s: {n: [] for n in lengths} for s in SYSTEMS}
    batch_tok_s: dict[str, dict[int, float]] = {s: {} for s in SYSTEMS}
    servers = {}
    try:
        for system, path in dirs.items():
            servers[system] = launch_turbo_server(path, flags, timeout_s=600, log_dir=work / system)
        for system, (_, url) in servers.items():
            streamed_generate(url, cases[lengths[0]][0].prompt_ids[:64], 4)  # warm-up
        for n in lengths:
            for i, case in enumerate(cases[n]):
                order = list(SYSTEMS) if i % 2 == 0 else list(SYSTEMS)[::-1]
                for system in order:
                    url = servers[system][1]
                    flush_cache(url)
                    one = streamed_generate(url, case.prompt_ids, args.new_tokens)
                    runs[system][n].append({"retrieved": case.retrieved(one["output_ids"]),
                                            "ttft_s": one["arrivals"][0] - one["sent"], "decode_tok_s": decode_tok_s([one])})
            if args.batch > 1:
                prompts = [c.prompt_ids for c in passkey_cases(tok, n, args.batch, seed=args.seed + 1)]
                for system in (list(SYSTEMS) if n % 2 else list(SYSTEMS)[::-1]):
                    flush_cache(servers[system][1])
                    batch_tok_s[system][n] = decode_tok_s(concurrent_generate(servers[system][1], prompts, args.new_tokens))
            print(f"{n:>6} tokens: " + "  ".join(
                f"{s} passkey {sum(r['retrieved'] for r in runs[s][n])}/{len(runs[s][n])}"
                f" ttft {statistics.median(r['ttft_s'] for r in runs[s][n]):.2f}s"
                f" decode {statistics.median(r['decode_tok_s'] for r in runs[s][n]):.1f} tok/s"
                + (f" (batch {args.batch}: {batch_tok_s[s][n]:.1f})" if args.batch > 1 else "") for s in SYSTEMS),
                flush=True)
    finally:
        for proc, _url in servers.values():
            kill_server(proc)

    table = {s: {} for s in SYSTEMS}
    for s in SYSTEMS:
        for n in lengths:
            mem = memory_per_request(dirs[s], n)
            table[s][str(n)] = {
                "passkey_accuracy": sum(r["retrieved"] for r in runs[s][n]) / len(runs[s][n]),
                "ttft_s": statistics.median(r["ttft_s"] for r in runs[s][n]),
                "decode_tok_s": statistics.median(r["decode_tok_s"] for r in runs[s][n]),
                f"decode_tok_s_batch_{args.batch}": batch_tok_s[s].get(n, float("nan")),
                "memory_mb": mem["total_bytes"] / 2**20, **mem,
            }
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    result = {
        "command": " ".join(["python benchmark/bench_hybrid_long_context.py"] + (argv if argv is not None else sys.argv[1:])),
        "git_sha": sha,
        "hardware": {"machine": platform.machine(), "cpu": _cpu_model(), "cores": len(os.sched_getaffinity(0))},
        "systems": SYSTEMS, "training_length": TRAINING_LENGTH, "lengths": lengths, "trials": args.trials,
        "new_tokens": args.new_tokens, "batch": args.batch, "seed": args.seed, "table": table,
        "runs": {s: {str(n): r for n, r in v.items()} for s, v in runs.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out.with_suffix(".png"))

    batch_key = f"decode_tok_s_batch_{args.batch}"
    print(f"\n{'tokens':>7} {'x train':>7} | " + " | ".join(
        f"{s:>9} passkey  ttft s  tok/s b1  tok/s b{args.batch}  MB/req" for s in SYSTEMS)
        + f" | hybrid/attention tok/s b1, b{args.batch}, memory")
    for n in lengths:
        a, h = table["attention"][str(n)], table["hybrid"][str(n)]
        print(f"{n:>7} {n / TRAINING_LENGTH:>6g}x | " + " | ".join(
            f"{table[s][str(n)]['passkey_accuracy']:>17.0%} {table[s][str(n)]['ttft_s']:>7.2f} "
            f"{table[s][str(n)]['decode_tok_s']:>9.1f} {table[s][str(n)][batch_key]:>9.1f} "
            f"{table[s][str(n)]['memory_mb']:>7.1f}" for s in SYSTEMS)
            + f" | {h['decode_tok_s'] / a['decode_tok_s']:.2f}x, {h[batch_key] / a[batch_key]:.2f}x,"
            f" {h['total_bytes'] / a['total_bytes']:.2f}x")
    at8 = str(8 * TRAINING_LENGTH) if 8 * TRAINING_LENGTH in lengths else None
    longest = str(lengths[-1])
    a, h = table["attention"][longest], table["hybrid"][longest]
    summary = (f"summary: at {longest} tokens hybrid/attention decode tok/s {h['decode_tok_s'] / a['decode_tok_s']:.2f}x"
               f" at batch 1, {h[batch_key] / a[batch_key]:.2f}x at batch {args.batch} (goal >= 2x), memory/request {h['total_bytes'] / a['total_bytes']:.2f}x (goal <= 0.5x), ttft"
               f" {h['ttft_s'] / a['ttft_s']:.2f}x")
    if at8:
        summary += (f"; passkey at 8x training length ({at8} tokens): hybrid {table['hybrid'][at8]['passkey_accuracy']:.0%},"
                    f" attention {table['attention'][at8]['passkey_accuracy']:.0%} (goal >= 90%)")
    print(summary)
    return result


if __name__ == "__main__":
    main()
