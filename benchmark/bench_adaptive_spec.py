"""The adaptive speculator under a domain shift: no speculation, static EAGLE-3 and TURBO, one stream.

    python benchmark/bench_adaptive_spec.py                  # 40 code then 160 records requests
    python benchmark/bench_adaptive_spec.py --shifted 500    # the issue's 500 requests on the new domain

The static head is ``turbo-tiny-eagle3-code``: trained like the shipped head but on code only, so
the second domain (generated records, which turbo-tiny itself handles well) is one it never saw.
It is a benchmark fixture, trained on first use into benchmark/heads/ (about 7 minutes, once):
``python -m turbo.spec.eagle3_train --preset turbo-tiny-eagle3-code --out benchmark/heads/turbo-tiny-eagle3-code``.

The same request stream (seeded held-out prompts: ``--first`` code, then ``--shifted`` records; 64
prompt tokens, ``--new-tokens`` greedy tokens, EOS ignored, one request at a time, streamed) goes
through four servers in turn: ``none``; ``static`` (EAGLE3, the code head, 4 steps); ``turbo``
(TURBO with the same head, auto controller, a fresh speculator directory, learning on);
``turbo-adaptive`` (the same, but the adaptive head always drafts at 4 steps: the learning effect on
accept length, without the controller's fallback). Per
request: accept length (completion tokens / verify rounds), output tokens/s, and the gaps between
streamed chunks (per-token latency: a chunk of k tokens after a gap g gives k tokens of g / k).
Printed last: each TURBO system / static, accept length and tokens/s, on the first domain and on
the last fifth of the shifted domain, and p99 per-token latency of each. Writes
benchmark/results/spec/bench_adaptive_spec.json and .png.
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_spec import _cpu_model, flush_cache, make_prompts  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmark" / "results" / "spec"
HEAD_PRESET = "turbo-tiny-eagle3-code"
DEFAULT_HEAD = REPO / "benchmark" / "heads" / HEAD_PRESET


def systems(head: Path, speculator_dir: str, update_interval: int) -> dict[str, list[str]]:
    spec = ["--speculative-draft-model-path", str(head), "--speculative-num-steps", "4"]
    return {
        "none": [],
        "static": ["--speculative-algorithm", "EAGLE3", *spec, "--speculative-eagle-topk", "1",
                   "--speculative-num-draft-tokens", "5"],
        "turbo": ["--speculative-algorithm", "TURBO", *spec, "--turbo-speculator-dir", f"{speculator_dir}/auto",
                  "--turbo-update-interval", str(update_interval)],
        # the adaptive head always drafting at full lookahead: what learning does to the accept length
        "turbo-adaptive": ["--speculative-algorithm", "TURBO", *spec, "--turbo-speculator-dir",
                           f"{speculator_dir}/adaptive", "--turbo-update-interval", str(update_interval),
                           "--turbo-controller", "adaptive"],
    }


def ensure_head(path: Path) -> Path:
    if not (path / "config.json").is_file():
        print(f"training the benchmark's static head into {path} (once, ~7 min)", flush=True)
        subprocess.run([sys.executable, "-m", "turbo.spec.eagle3_train", "--preset", HEAD_PRESET, "--out", str(path)],
                       cwd=REPO, check=True)
    return path


def stream_one(base_url: str, ids: list[int], n_new: int) -> dict:
    """One streamed greedy request: accept length, tokens/s and per-token latencies."""
    payload = {"input_ids": ids, "stream": True,
               "sampling_params": {"max_new_tokens": n_new, "min_new_tokens": n_new, "temperature": 0,
                                   "ignore_eos": True}}
    req = urllib.request.Request(f"{base_url}/generate", data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    last_t, last_n, per_token, meta = t0, 0, [], {}
    with urllib.request.urlopen(req, timeout=600) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            meta = json.loads(line[5:])["meta_info"]
            now, n = time.perf_counter(), meta["completion_tokens"]
            if n > last_n:
                if last_n > 0:  # the first chunk's gap is time to first token, not decoding
                    per_token += [(now - last_t) / (n - last_n)] * (n - last_n)
                last_t, last_n = now, n
    wall = time.perf_counter() - t0
    rounds = meta.get("spec_verify_ct") or 0
    return {"accept_length": meta["completion_tokens"] / rounds if rounds else 1.0,
            "tok_s": meta["completion_tokens"] / wall, "per_token_s": per_token, "t": time.time()}


def turbo_status(base_url: str) -> dict:
    with urllib.request.urlopen(f"{base_url}/turbo/speculator", timeout=30) as resp:
        return json.loads(resp.read())


def p99(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=100)[98] if len(xs) >= 100 else max(xs)


def summarize(reqs: list[dict]) -> dict:
    lat = [x for r in reqs for x in r["per_token_s"]]
    return {"accept_length": statistics.mean(r["accept_length"] for r in reqs),
            "tok_s": statistics.mean(r["tok_s"] for r in reqs),
            "p99_per_token_ms": 1e3 * p99(lat), "median_per_token_ms": 1e3 * statistics.median(lat)}


def plot(result: dict, path: Path, window: int = 10) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for name, reqs in result["requests"].items():
        for ax, key in zip(axes, ("accept_length", "tok_s")):
            xs = [r[key] for r in reqs]
            smooth = [statistics.mean(xs[max(0, i - window + 1) : i + 1]) for i in range(len(xs))]
            ax.plot(range(1, len(xs) + 1), smooth, label=name)
    for ax, label in zip(axes, ("accept length", "output tokens/s")):
        ax.axvline(result["first"] + 0.5, color="grey", ls="--", lw=1)
        ax.set_ylabel(f"{label} (mean of {window})")
        ax.legend(fontsize=8)
    axes[1].set_xlabel(f"request (1-{result['first']}: code, then records)")
    axes[0].set_title("turbo-tiny on CPU: static EAGLE-3 head vs TURBO under a domain shift")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--first", type=int, default=40, help="requests in the static head's domain (code)")
    parser.add_argument("--shifted", type=int, default=160, help="requests in the new domain (records)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--update-interval", type=int, default=256, help="TURBO's --turbo-update-interval")
    parser.add_argument("--systems", default="none,static,turbo,turbo-adaptive")
    parser.add_argument("--static-head", type=Path, default=DEFAULT_HEAD)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_adaptive_spec.json")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from sglang_turbo.server_process import kill_server, launch_turbo_server
    from turbo.zoo.presets import zoo_path

    head = ensure_head(args.static_head)
    target = zoo_path("turbo-tiny")
    tok = AutoTokenizer.from_pretrained(target)
    stream = (make_prompts(tok, "code", args.first, args.prompt_tokens, args.seed)
              + make_prompts(tok, "records", args.shifted, args.prompt_tokens, args.seed))
    speculator_dir = tempfile.mkdtemp(prefix="bench_adaptive_spec_")
    all_systems = systems(head, speculator_dir, args.update_interval)
    names = args.systems.split(",")
    requests: dict[str, list[dict]] = {}
    final_status: dict[str, dict] = {}
    for name in names:
        proc, url = launch_turbo_server(target, all_systems[name])
        try:
            flush_cache(url)
            requests[name] = []
            for i, ids in enumerate(stream):
                requests[name].append(stream_one(url, ids, args.new_tokens))
                if (i + 1) % 20 == 0:
                    recent = summarize(requests[name][-20:])
                    extra = ""
                    if name.startswith("turbo"):
                        s = turbo_status(url)
                        extra = f"  version {s['version']} mode {s['mode']} heads {s['accept_length']}"
                    print(f"{name:>7} {i + 1:4d}/{len(stream)}: accept {recent['accept_length']:.2f}, "
                          f"{recent['tok_s']:.1f} tok/s{extra}", flush=True)
            if name.startswith("turbo"):
                final_status[name] = turbo_status(url)
        finally:
            kill_server(proc)

    tail = max(1, args.shifted // 5)
    phases = {"first_domain": slice(0, args.first), "shifted_last_fifth": slice(len(stream) - tail, len(stream))}
    summary = {name: {phase: summarize(reqs[sl]) for phase, sl in phases.items()} for name, reqs in requests.items()}
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    result = {
        "command": " ".join(["python benchmark/bench_adaptive_spec.py"] + (argv if argv is not None else sys.argv[1:])),
        "git_sha": sha,
        "hardware": {"machine": platform.machine(), "cpu": _cpu_model(), "cores": len(os.sched_getaffinity(0))},
        "server_args": {n: all_systems[n] for n in names},
        "first": args.first, "shifted": args.shifted, "new_tokens": args.new_tokens,
        "prompt_tokens": args.prompt_tokens, "seed": args.seed,
        "summary": summary, "turbo_final_status": final_status,
        "requests": {n: [{k: v for k, v in r.items() if k != "per_token_s"} for r in reqs]
                     for n, reqs in requests.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out.with_suffix(".png"))

    for phase in phases:
        for name in names:
            s = summary[name][phase]
            print(f"{phase:>19} {name:>7}: accept {s['accept_length']:.2f}  {s['tok_s']:6.1f} tok/s  "
                  f"per-token p99 {s['p99_per_token_ms']:.1f} ms (median {s['median_per_token_ms']:.1f})")
    for turbo in [n for n in names if n.startswith("turbo")]:
        if "static" not in summary:
            break
        for phase in phases:
            t, s = summary[turbo][phase], summary["static"][phase]
            print(f"{turbo} / static, {phase}: accept length {t['accept_length'] / s['accept_length']:.2f}x, "
                  f"tokens/s {t['tok_s'] / s['tok_s']:.2f}x, p99 per-token latency "
                  f"{t['p99_per_token_ms']:.1f} vs {s['p99_per_token_ms']:.1f} ms")
    return result


if __name__ == "__main__":
    main()
