"""How many torch threads a scheduler step runs on: one policy for the whole process.

On 2 cores shared with the tokenizer and detokenizer processes, a small decode step (~50 tiny kernels
per forward) loses more to a second OpenMP thread waiting on a descheduled partner than it gains
(batch-1 SDPA: 40 us on 1 thread, ~350 us on 2 inside the server, 2026-12-02). A speculative decode
step is several such forwards (draft steps, verify, draft extend) plus top-k and tree bookkeeping
between them, so the policy covers the whole step, not only the compiled forwards. Prefill and larger
batches have enough work per kernel to gain from every core.
"""

from __future__ import annotations

import contextlib

import torch

# Decode steps of at most this many requests run on one thread.
ONE_THREAD_MAX_BS = 4

RUN_BATCH_TARGET = "sglang.srt.managers.scheduler.Scheduler.run_batch"


def decode_threads(batch_size: int, process_threads: int) -> int:
    """Threads for a decode step of ``batch_size`` requests in a process configured for ``process_threads``."""
    return 1 if batch_size <= ONE_THREAD_MAX_BS else process_threads


@contextlib.contextmanager
def threads_for_decode(batch_size: int):
    """Runs the block on :func:`decode_threads` threads, restoring the process's count after."""
    threads = torch.get_num_threads()
    wanted = decode_threads(batch_size, threads)
    if wanted == threads:
        yield
        return
    torch.set_num_threads(wanted)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def around_run_batch(original, scheduler, batch, *args, **kwargs):
    """An AROUND hook for ``Scheduler.run_batch``: a decode step (plain or speculative) of a small
    batch runs on one thread from its first kernel to its last."""
    if not batch.forward_mode.is_decode():
        return original(scheduler, batch, *args, **kwargs)
    with threads_for_decode(batch.batch_size()):
        return original(scheduler, batch, *args, **kwargs)


def register() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(RUN_BATCH_TARGET, around_run_batch, HookType.AROUND)
