"""How many torch threads a scheduler step runs on: one policy for the whole process.

On 2 cores shared with the tokenizer and detokenizer processes, a small decode step (~50 tiny kernels
per forward) loses more to a second OpenMP thread waiting on a descheduled partner than it gains
(batch-1 SDPA: 40 us on 1 thread, ~350 us on 2 inside the server, 2026-12-02). A speculative decode
step is several such forwards (draft steps, verify, draft extend) plus top-k and tree bookkeeping
between them, so the policy covers the whole step, not only the compiled forwards. Prefill and larger
batches have enough work per kernel to gain from every core.

The scheduler's bookkeeping around a step (building the next batch: slot allocation, the speculative
paths' req_to_token writes; processing the result) is tiny tensor ops at any batch size: it always runs
on one thread. On two threads one such op took 2-3 ms instead of 30 us while another process held the
second core (turbo/spec/cache_ops._ranges at batch 8, 2026-12-08).
"""

from __future__ import annotations

import contextlib

import torch

# Decode steps of at most this many requests run on one thread.
ONE_THREAD_MAX_BS = 4

RUN_BATCH_TARGET = "sglang.srt.managers.scheduler.Scheduler.run_batch"
# The scheduler's stages around run_batch in its event loop
BOOKKEEPING_TARGETS = (
    "sglang.srt.managers.scheduler.Scheduler.get_next_batch_to_run",
    "sglang.srt.managers.scheduler.Scheduler.process_batch_result",
)


def decode_threads(batch_size: int, process_threads: int) -> int:
    """Threads for a decode step of ``batch_size`` requests in a process configured for ``process_threads``."""
    return 1 if batch_size <= ONE_THREAD_MAX_BS else process_threads


@contextlib.contextmanager
def running_on(threads: int):
    """Runs the block on ``threads`` torch threads, restoring the process's count after."""
    before = torch.get_num_threads()
    if threads == before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def threads_for_decode(batch_size: int):
    """Runs the block on :func:`decode_threads` threads, restoring the process's count after."""
    return running_on(decode_threads(batch_size, torch.get_num_threads()))


def around_bookkeeping(original, scheduler, *args, **kwargs):
    """An AROUND hook for the scheduler's stages before and after a step: one thread."""
    with running_on(1):
        return original(scheduler, *args, **kwargs)


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
    for target in BOOKKEEPING_TARGETS:
        HookRegistry.register(target, around_bookkeeping, HookType.AROUND)
