"""Upstream's serving benchmark runs against the shared server, offline (random-ids needs no dataset)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

NUM_PROMPTS = 16

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bench(server, model_path, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("bench")
    output_file = out_dir / "bench.jsonl"
    cmd = [
        sys.executable, "-m", "sglang.bench_serving",
        "--backend", "sglang", "--base-url", server,
        "--dataset-name", "random-ids", "--tokenizer", model_path,
        "--num-prompts", str(NUM_PROMPTS), "--random-input-len", "64", "--random-output-len", "16",
        "--random-range-ratio", "0.5", "--seed", "1",
        "--output-file", str(output_file), "--output-details", "--disable-tqdm",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=out_dir)
    lines = output_file.read_text().splitlines() if output_file.exists() else []
    result = json.loads(lines[-1]) if lines else None
    return proc, result


def test_bench_serving_exits_with_code_zero(bench):
    proc, _ = bench
    assert proc.returncode == 0, f"{proc.returncode=}\n--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-3000:]}"


def test_bench_serving_completes_every_request(bench):
    proc, result = bench
    completed = result and result.get("completed")
    assert completed == NUM_PROMPTS, f"{completed=} {NUM_PROMPTS=}\n{proc.stderr[-2000:]}"


def test_bench_serving_reports_no_request_errors(bench):
    proc, result = bench
    errors = [e for e in (result or {}).get("errors", [None]) if e]
    assert result is not None and "errors" in result and not errors, \
        f"{errors=} {'errors' in (result or {})=}\n{proc.stderr[-2000:]}"


def test_bench_serving_generates_tokens_for_every_request(bench):
    _, result = bench
    output_lens = (result or {}).get("output_lens")
    assert output_lens and len(output_lens) == NUM_PROMPTS and all(n > 0 for n in output_lens), f"{output_lens=}"
