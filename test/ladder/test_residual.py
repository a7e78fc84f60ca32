"""The residual schedules (turbo/ladder/residual.py) and the communicator wrappers (turbo/ladder/comm.py).

CPU, no server, no SGLang. Sub-layers here are small known functions, so what each one read can be
checked exactly against the paper's equations.
"""

from __future__ import annotations

import time

import pytest
import torch

from turbo.ladder.comm import SlowLinkCommunicator, TraceLog, TracingCommunicator, overlapped, traced
from turbo.ladder.residual import LocalCommunicator, SubLayer, residual_stream

N_SUB = 6  # three layers of (attention, MLP)


def recording_sublayers(deferred: list[bool], seen: list[torch.Tensor]) -> list[SubLayer]:
    """Sub-layer k returns (k + 1) * tanh(x): distinct, nonlinear, and it records the stream it read."""

    def make(k: int):
        def fn(x):
            seen.append(x.clone())
            return (k + 1) * torch.tanh(x)

        return fn

    return [SubLayer(make(k), d) for k, d in enumerate(deferred)]


def test_standard_schedule_is_the_pre_norm_residual_recurrence():
    """x_k = x_{k-1} + f_k(x_{k-1}) for every k."""
    x0 = torch.randn(3, 8)
    got = residual_stream(x0, recording_sublayers([False] * N_SUB, []), LocalCommunicator())
    want = x0
    for k in range(N_SUB):
        want = want + (k + 1) * torch.tanh(want)
    assert torch.allclose(got, want), f"max diff {(got - want).abs().max().item()}"


def test_ladder_sublayer_reads_the_stream_without_its_predecessors_output():
    """Ladder: f_k reads x_0 + f_1 + ... + f_{k-2} (every output but the immediately preceding one);
    the returned stream holds all outputs."""
    x0 = torch.randn(3, 8)
    seen: list[torch.Tensor] = []
    got = residual_stream(x0, recording_sublayers([True] * N_SUB, seen), LocalCommunicator())
    outputs: list[torch.Tensor] = []
    for k in range(N_SUB):
        want_input = x0 + sum(outputs[: max(0, k - 1)], torch.zeros_like(x0))
        assert torch.allclose(seen[k], want_input), f"sub-layer {k} read a stream off by {(seen[k] - want_input).abs().max()}"
        outputs.append((k + 1) * torch.tanh(seen[k]))
    want = x0 + sum(outputs, torch.zeros_like(x0))
    assert torch.allclose(got, want), f"final stream off by {(got - want).abs().max().item()}"


def test_ladder_matches_the_papers_block_form():
    """The reference code's block form: residual += prev_attn; attn = A(residual); residual += prev_mlp;
    mlp = M(residual); after the last block residual += attn + mlp."""
    torch.manual_seed(0)
    x0 = torch.randn(2, 8)
    attn_w, mlp_w = [torch.randn(8, 8) * 0.3 for _ in range(3)], [torch.randn(8, 8) * 0.3 for _ in range(3)]
    subs = []
    for a, m in zip(attn_w, mlp_w):
        subs += [SubLayer(lambda x, a=a: torch.tanh(x @ a), True), SubLayer(lambda x, m=m: torch.tanh(x @ m), True)]
    got = residual_stream(x0, subs, LocalCommunicator())

    residual, prev_attn, prev_mlp = x0, None, None
    for a, m in zip(attn_w, mlp_w):
        if prev_attn is not None:
            residual = residual + prev_attn
        prev_attn = torch.tanh(residual @ a)
        if prev_mlp is not None:
            residual = residual + prev_mlp
        prev_mlp = torch.tanh(residual @ m)
    want = residual + prev_attn + prev_mlp
    assert torch.allclose(got, want, atol=1e-6), f"max diff {(got - want).abs().max().item()}"


@pytest.mark.parametrize("deferred", [[True] * N_SUB, [False] * N_SUB, [False, False, True, True, True, True]],
                         ids=["ladder", "standard", "upper-two-layers-ladder"])
def test_a_deferred_all_reduce_is_waited_on_after_the_next_sublayers_compute(deferred):
    """The overlap itself: a deferred output's all-reduce is still in flight while the next sub-layer
    computes; a standard one is waited on before the next sub-layer starts."""
    log = TraceLog()
    subs = traced(recording_sublayers(deferred, []), log)
    residual_stream(torch.randn(2, 4), subs, TracingCommunicator(LocalCommunicator(), log))
    got = overlapped(log, N_SUB)
    assert got == deferred[:-1], f"overlap per sub-layer {got}, expected {deferred[:-1]}\nevents {log.events}"
    for k in range(N_SUB):
        assert log.position("start", k) > log.position("compute_end", k), f"all-reduce {k} issued before its compute"


def test_every_deferred_all_reduce_is_waited_on_exactly_once():
    log = TraceLog()
    subs = traced(recording_sublayers([True] * N_SUB, []), log)
    residual_stream(torch.randn(2, 4), subs, TracingCommunicator(LocalCommunicator(), log))
    waits = sorted(i for kind, i in log.events if kind == "wait")
    assert waits == list(range(N_SUB)), f"{waits=}"


def test_slow_link_result_is_never_ready_before_the_delay():
    """The simulated link: issue -> result takes at least delay_s (a lower bound, so no flakiness)."""
    delay = 0.05
    comm = SlowLinkCommunicator(LocalCommunicator(), delay)
    t0 = time.perf_counter()
    out = comm.start(torch.ones(3)).wait()
    elapsed = time.perf_counter() - t0
    assert elapsed >= delay, f"{elapsed=} < {delay=}"
    assert torch.equal(out, torch.ones(3)), f"{out=}"


def test_slow_link_delay_runs_while_the_caller_computes():
    """Time spent between issue and wait counts toward the delay: waiting after a long compute is free."""
    delay = 0.02
    comm = SlowLinkCommunicator(LocalCommunicator(), delay)
    pending = comm.start(torch.ones(3))
    time.sleep(delay)  # stands in for the next sub-layer's compute
    t0 = time.perf_counter()
    pending.wait()
    waited = time.perf_counter() - t0
    assert waited < delay, f"waited {waited:.4f}s after {delay}s of compute: the delay was not overlapped"


def test_slow_link_rejects_a_negative_delay():
    with pytest.raises(ValueError, match="delay_s must be >= 0"):
        SlowLinkCommunicator(LocalCommunicator(), -1.0)
