"""The step thread policy (sglang_turbo/threads.py): a small decode step, plain or speculative, runs on
one thread from its first kernel to its last; prefill and larger batches keep the process's threads; the
scheduler's bookkeeping before and after a step runs on one thread at any batch size."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from sglang_turbo.threads import (
    ONE_THREAD_MAX_BS,
    around_bookkeeping,
    around_run_batch,
    decode_threads,
    threads_for_decode,
)


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _batch(decode: bool, size: int):
    mode = SimpleNamespace(is_decode=lambda: decode)
    return SimpleNamespace(forward_mode=mode, batch_size=lambda: size)


def _threads_seen_by_run_batch(batch) -> int:
    seen = []
    around_run_batch(lambda scheduler, b: seen.append(torch.get_num_threads()), object(), batch)
    return seen[0]


def test_small_decode_batches_run_on_one_thread(two_threads):
    assert _threads_seen_by_run_batch(_batch(decode=True, size=1)) == 1
    assert _threads_seen_by_run_batch(_batch(decode=True, size=ONE_THREAD_MAX_BS)) == 1
    assert torch.get_num_threads() == 2, "the process's count comes back after the step"


def test_larger_decode_batches_and_prefill_keep_every_thread(two_threads):
    assert _threads_seen_by_run_batch(_batch(decode=True, size=ONE_THREAD_MAX_BS + 1)) == 2
    assert _threads_seen_by_run_batch(_batch(decode=False, size=1)) == 2


def test_the_thread_count_comes_back_when_the_step_raises(two_threads):
    def failing(scheduler, batch):
        raise RuntimeError("step failed")

    with pytest.raises(RuntimeError, match="step failed"):
        around_run_batch(failing, object(), _batch(decode=True, size=1))
    assert torch.get_num_threads() == 2


def test_bookkeeping_around_a_step_runs_on_one_thread_at_any_batch_size(two_threads):
    seen = []
    around_bookkeeping(lambda scheduler, *a, **k: seen.append((torch.get_num_threads(), a, k)), object(),
                       _batch(decode=True, size=ONE_THREAD_MAX_BS * 8), running_batch=None)
    assert seen[0][0] == 1
    assert seen[0][2] == {"running_batch": None}, "arguments pass through"
    assert torch.get_num_threads() == 2


def test_a_nested_forward_keeps_the_steps_single_thread(two_threads):
    """A speculative step's draft forwards may count more rows (topk per request) than the step has
    requests: inside a one-thread step they stay on one thread."""
    with threads_for_decode(1):
        with threads_for_decode(ONE_THREAD_MAX_BS * 2):
            assert torch.get_num_threads() == 1
    assert decode_threads(ONE_THREAD_MAX_BS * 2, 2) == 2


WIRING = r"""
import torch
from sglang.srt.plugins.hook_registry import HookRegistry
from sglang_turbo import threads
threads.register()
HookRegistry.apply_hooks()  # what load_plugins() does after running the plugins
from sglang.srt.managers.scheduler import Scheduler
from types import SimpleNamespace

class Stop(Exception):
    pass

class FirstAttributeRecordsThreads:
    # each stage reads an attribute of the scheduler first: that is where the stage has begun
    def __getattr__(self, name):
        raise Stop(torch.get_num_threads())

torch.set_num_threads(2)
batch = SimpleNamespace(forward_mode=SimpleNamespace(is_decode=lambda: True), batch_size=lambda: 1)
for stage, args in (("run_batch", (batch,)), ("get_next_batch_to_run", ()), ("process_batch_result", (batch, None))):
    try:
        getattr(Scheduler, stage)(FirstAttributeRecordsThreads(), *args)
        print(stage, "ran without reading an attribute")
    except Stop as seen:
        print(f"threads inside {stage}:", seen.args[0], "after:", torch.get_num_threads())
"""


def test_the_hook_reaches_upstreams_scheduler():
    out = subprocess.run([sys.executable, "-c", WIRING], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    for stage in ("run_batch", "get_next_batch_to_run", "process_batch_result"):
        assert f"threads inside {stage}: 1 after: 2" in out.stdout, out.stdout + out.stderr[-3000:]
