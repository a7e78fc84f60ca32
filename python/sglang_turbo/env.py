"""Every environment variable sglang-turbo reads, in one place.

| variable | meaning | default |
| --- | --- | --- |
| ``SGLANG_TURBO_PLATFORM`` | ``off`` keeps the portable CPU platform from activating | on |
| ``SGLANG_TURBO_KV_BUDGET_GB`` | memory the CPU KV pool may take when ``--max-total-tokens`` is unset | 1 |
| ``SGLANG_TURBO_THREADS`` | torch threads of the scheduler process on CPU | cores the process may use |
| ``SGLANG_TURBO_SPECULATOR_DIR`` | TURBO: where learned speculator versions persist | none |
| ``SGLANG_TURBO_REPLAY_TOKENS`` | TURBO: replay buffer size in positions | 65536 |
| ``SGLANG_TURBO_UPDATE_INTERVAL`` | TURBO: new replay positions between published versions | 1024 |
| ``SGLANG_TURBO_LEARNING`` | TURBO: ``off`` serves without training | on |
| ``SGLANG_TURBO_CONTROLLER`` | TURBO: ``auto``, ``static``, ``adaptive`` or ``plain`` | auto |
| ``SGLANG_TURBO_PLAIN_ROUNDS`` | TURBO: ``off`` runs lookahead-0 rounds as upstream's one-token verify instead of a plain decode step | on |
| ``SGLANG_TURBO_PARALLEL_ATTENTION_KEYS`` | a decode step with a request over at least this many keys runs its attention on every thread, also when the CPU graph runs the step on one | 4096 |
| ``SGLANG_TURBO_FROZEN_WEIGHTS`` | ``off``: CPU graphs read the weights as inputs instead of holding packed copies, so online weight updates (``/update_weights_from_disk`` ...) work, at the speed of unpacked GEMMs | on |
| ``SGLANG_TURBO_OVERLAP_SCHEDULE`` | ``on`` keeps upstream's overlap scheduler on the CPU platform (off by default there: a CPU runs the forward synchronously, so the overlap loop only adds its bookkeeping; cpu_defaults.py) | off |
| ``SGLANG_TURBO_DISABLE_KERNELS`` | ``1`` runs the torch references instead of sgl-kernel's CPU kernels (read in ``turbo/kernels.py``) | 0 |
| ``SGLANG_TURBO_ALLREDUCE_DELAY_US`` | simulated interconnect: every tensor-parallel all-reduce takes at least this long | 0 |
| ``SGLANG_TURBO_LADDER_TRACE`` | tests: ladder models write one forward's compute/all-reduce event order to ``PATH.rankN.json`` | none |
| ``SGLANG_TURBO_LEARNER_FAULT`` | tests only: ``crash@N`` / ``hang@N`` injects a learner fault at step N | none |
| ``GOMP_SPINCOUNT`` (libgomp's own) | set to 5000 for SGLang's child processes unless it or ``OMP_WAIT_POLICY`` is set | |
"""

from __future__ import annotations

import os


def _on(name: str, default: str = "on") -> bool:
    return os.environ.get(name, default).strip().lower() not in ("off", "0", "false", "no")


def platform_enabled() -> bool:
    return _on("SGLANG_TURBO_PLATFORM")


def frozen_weights() -> bool:
    return _on("SGLANG_TURBO_FROZEN_WEIGHTS")


def overlap_schedule() -> bool:
    return _on("SGLANG_TURBO_OVERLAP_SCHEDULE", "off")


def plain_rounds() -> bool:
    return _on("SGLANG_TURBO_PLAIN_ROUNDS")


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
    return _positive_int("SGLANG_TURBO_THREADS", max(1, len(os.sched_getaffinity(0))))


def parallel_attention_keys() -> int:
    return _positive_int("SGLANG_TURBO_PARALLEL_ATTENTION_KEYS", 4096)


OMP_SPIN_COUNT = "5000"


def bound_omp_spin() -> None:
    """Let idle OpenMP threads spin only briefly before sleeping; inherited by processes started after this.

    libgomp's default spins 300,000 rounds between parallel regions, fast alone and
    ruinous beside busy processes; ``OMP_WAIT_POLICY=PASSIVE`` is safe but slow alone.
    A (16, 256) @ (256, 768) ``F.linear`` on 2 threads, 2 cores, measured 2026-11-25:

    | wait policy         | alone  | beside two busy processes |
    | ------------------- | ------ | ------------------------- |
    | libgomp default     | 75 us  | 15,982 us                 |
    | PASSIVE             | 193 us | 183 us                    |
    | GOMP_SPINCOUNT=5000 | 63 us  | 180 us                    |
    """
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", OMP_SPIN_COUNT)


def _positive_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{name} must be a positive integer, got {raw!r}")
    return int(raw)


def adaptive_spec_config():
    """The TURBO speculator's settings, as the launcher's ``--turbo-*`` flags left them."""
    from turbo.spec.adaptive_config import AdaptiveSpecConfig

    return AdaptiveSpecConfig(
        speculator_dir=os.environ.get("SGLANG_TURBO_SPECULATOR_DIR") or None,
        replay_tokens=_positive_int("SGLANG_TURBO_REPLAY_TOKENS", 65_536),
        update_interval=_positive_int("SGLANG_TURBO_UPDATE_INTERVAL", 1024),
        learning=os.environ.get("SGLANG_TURBO_LEARNING", "on").strip().lower() not in ("off", "0", "false", "no"),
        controller=os.environ.get("SGLANG_TURBO_CONTROLLER", "auto").strip().lower(),
    )


def allreduce_delay_s() -> float:
    """Seconds every tensor-parallel all-reduce takes at least, from issue to result (0: the real link)."""
    raw = os.environ.get("SGLANG_TURBO_ALLREDUCE_DELAY_US", "0").strip() or "0"
    try:
        us = float(raw)
    except ValueError:
        raise ValueError(f"SGLANG_TURBO_ALLREDUCE_DELAY_US must be a number of microseconds, got {raw!r}") from None
    if us < 0:
        raise ValueError(f"SGLANG_TURBO_ALLREDUCE_DELAY_US must be >= 0, got {raw!r}")
    return us * 1e-6


def ladder_trace_path() -> str | None:
    return os.environ.get("SGLANG_TURBO_LADDER_TRACE") or None


def learner_fault() -> str | None:
    return os.environ.get("SGLANG_TURBO_LEARNER_FAULT") or None
