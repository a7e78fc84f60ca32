"""Every environment variable sglang-turbo reads, in one place.

| variable | meaning | default |
| --- | --- | --- |
| ``SGLANG_TURBO_PLATFORM`` | ``off`` keeps the portable CPU platform from activating | on |
| ``SGLANG_TURBO_KV_BUDGET_GB`` | memory the CPU KV pool may take when ``--max-total-tokens`` is unset | 1 |
| ``SGLANG_TURBO_THREADS`` | torch threads of the scheduler process on CPU | cores the process may use |
| ``OMP_WAIT_POLICY`` (OpenMP's own) | set to ``PASSIVE`` for SGLang's child processes unless already set | |
"""

from __future__ import annotations

import os


def platform_enabled() -> bool:
    return os.environ.get("SGLANG_TURBO_PLATFORM", "on").strip().lower() not in ("off", "0", "false", "no")


def upstream_cpu_engine_requested() -> bool:
    # Upstream's own switch; honoured so users can still pick the in-tree CPU engine.
    return os.environ.get("SGLANG_USE_CPU_ENGINE", "0") == "1"


def kv_budget_bytes() -> int:
    raw = os.environ.get("SGLANG_TURBO_KV_BUDGET_GB", "1")
    try:
        gb = float(raw)
    except ValueError:
        raise ValueError(f"SGLANG_TURBO_KV_BUDGET_GB must be a number of gigabytes, got {raw!r}") from None
    if gb <= 0:
        raise ValueError(f"SGLANG_TURBO_KV_BUDGET_GB must be > 0, got {raw!r}")
    return int(gb * (1 << 30))


def torch_threads() -> int:
    raw = os.environ.get("SGLANG_TURBO_THREADS")
    if raw:
        if not raw.isdigit() or int(raw) < 1:
            raise ValueError(f"SGLANG_TURBO_THREADS must be a positive integer, got {raw!r}")
        return int(raw)
    return max(1, len(os.sched_getaffinity(0)))


def prefer_passive_omp_wait() -> None:
    """Make OpenMP threads sleep, not spin, while waiting; inherited by processes started after this.

    Measured on 2 cores (2026-11-25): with another busy process, a 1x256 @ 256x768 ``F.linear``
    on 2 OpenMP threads took 5-9 ms under libgomp's default (spinning) policy and 38 us with
    ``PASSIVE``; the scheduler shares the cores with the tokenizer and detokenizer processes.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
