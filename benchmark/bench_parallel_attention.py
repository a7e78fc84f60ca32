"""Long-context decode with attention on one thread vs on every thread (SGLANG_TURBO_PARALLEL_ATTENTION_KEYS).

    python benchmark/bench_parallel_attention.py                       # 2k, 4k, 16k tokens; ~10 min
    python benchmark/bench_parallel_attention.py --lengths 4096 --trials 2

CPU graphs run decode batches of up to 4 requests on one thread (sglang_turbo.threads.ONE_THREAD_MAX_BS); a request
over SGLANG_TURBO_PARALLEL_ATTENTION_KEYS keys runs the step's attention on every thread. Four servers run side by
side: turbo-tiny and turbo-tiny-hybrid, each with the threshold off ("one": attention stays on the step's
thread) and at ``--parallel-keys`` ("wide"). For each length, ``--trials`` random-token prompts at batch 1 (the
systems' order alternating) and one batch of 4, 48 new tokens each; prints decode tokens/s (median at batch 1)
and wide / one. Writes nothing.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmark"))
from bench_hybrid_long_context import concurrent_generate, decode_tok_s, streamed_generate  # noqa: E402
from bench_spec import flush_cache  # noqa: E402

MODELS = ("turbo-tiny", "turbo-tiny-hybrid")
NEVER = "1000000000"  # a threshold no request reaches: attention stays on the step's thread
NEW_TOKENS = 48


def main(argv: list[str] | None = None) -> None:
    from sglang_turbo.server_process import kill_server, launch_turbo_server
    from turbo.zoo.presets import zoo_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="2048,4096,16384", help="comma-separated prompt tokens")
    parser.add_argument("--trials", type=int, default=6, help="batch-1 prompts per length and system")
    parser.add_argument("--parallel-keys", type=int, default=4096, help="the 'wide' servers' threshold")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    lengths = [int(n) for n in args.lengths.split(",")]
    positions = max(lengths) + NEW_TOKENS + 64
    flags = ["--json-model-override-args", json.dumps({"max_position_embeddings": positions}),
             "--max-total-tokens", str(4 * positions + 1024)]
    systems = {f"{m}/{mode}": (m, keys) for m in MODELS for mode, keys in (("one", NEVER), ("wide", str(args.parallel_keys)))}

    servers = {}
    try:
        for name, (model, keys) in systems.items():
            servers[name] = launch_turbo_server(zoo_path(model), flags, timeout_s=600, log_dir=tempfile.mkdtemp(),
                                                env={"SGLANG_TURBO_PARALLEL_ATTENTION_KEYS": keys})
        rng = random.Random(args.seed)
        for n in lengths:
            b1 = {name: [] for name in systems}
            for t in range(args.trials):
                ids = [rng.randrange(5, 4000) for _ in range(n)]
                for name in (list(systems) if t % 2 == 0 else list(systems)[::-1]):
                    flush_cache(servers[name][1])
                    b1[name].append(decode_tok_s([streamed_generate(servers[name][1], ids, NEW_TOKENS)]))
            prompts = [[rng.randrange(5, 4000) for _ in range(n)] for _ in range(4)]
            b4 = {}
            for name in systems:
                flush_cache(servers[name][1])
                b4[name] = decode_tok_s(concurrent_generate(servers[name][1], prompts, NEW_TOKENS))
            for model in MODELS:
                one, wide = f"{model}/one", f"{model}/wide"
                m1, w1 = statistics.median(b1[one]), statistics.median(b1[wide])
                print(f"{n:>6} tokens {model:<18} decode tok/s batch 1: one {m1:6.1f} wide {w1:6.1f} ({w1 / m1:.2f}x)"
                      f"   batch 4: one {b4[one]:6.1f} wide {b4[wide]:6.1f} ({b4[wide] / b4[one]:.2f}x)", flush=True)
    finally:
        for proc, _url in servers.values():
            kill_server(proc)


if __name__ == "__main__":
    main()
