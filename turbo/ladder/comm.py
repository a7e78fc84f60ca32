"""Communicators that wrap another one: a simulated slow interconnect, and an event trace.

``SlowLinkCommunicator`` models a link whose all-reduce takes at least ``delay_s`` from the moment it
is issued and runs beside compute (as NCCL does on its own stream, or a NIC does across nodes): a
result is ready at ``max(real completion, issue time + delay_s)``. The standard schedule waits at once
and pays the whole delay; the ladder schedule waits one sub-layer later and pays only what the next
sub-layer's compute does not cover. ``sleep_until_ready`` is the same model for an all-reduce that is
issued and waited on in one call (upstream's synchronous path), so both schedules see the same link.

``TracingCommunicator`` and ``traced`` record the order of compute, issue and wait, the evidence that
the overlap happens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .residual import Communicator, Pending, SubLayer


def sleep_until_ready(ready_at: float) -> None:
    """Sleeps until ``time.perf_counter() >= ready_at`` (no-op if already past)."""
    remaining = ready_at - time.perf_counter()
    if remaining > 0:
        time.sleep(remaining)


class _DelayedPending:
    def __init__(self, inner: Pending, ready_at: float) -> None:
        self.inner, self.ready_at = inner, ready_at

    def wait(self) -> torch.Tensor:
        value = self.inner.wait()
        sleep_until_ready(self.ready_at)
        return value


class SlowLinkCommunicator:
    """``inner`` with every all-reduce taking at least ``delay_s`` seconds from issue to result."""

    def __init__(self, inner: Communicator, delay_s: float) -> None:
        if delay_s < 0:
            raise ValueError(f"delay_s must be >= 0, got {delay_s}")
        self.inner, self.delay_s = inner, delay_s

    def start(self, partial: torch.Tensor) -> Pending:
        ready_at = time.perf_counter() + self.delay_s
        return _DelayedPending(self.inner.start(partial), ready_at)


@dataclass
class TraceLog:
    """Events in order: ``(kind, index)`` with kind in compute_begin, compute_end, start, wait."""

    events: list[tuple[str, int]] = field(default_factory=list)

    def position(self, kind: str, index: int) -> int:
        return self.events.index((kind, index))


class _TracedPending:
    def __init__(self, inner: Pending, log: TraceLog, index: int) -> None:
        self.inner, self.log, self.index = inner, log, index

    def wait(self) -> torch.Tensor:
        value = self.inner.wait()
        self.log.events.append(("wait", self.index))
        return value


class TracingCommunicator:
    """``inner`` that logs each all-reduce's issue and wait; the n-th started is index n."""

    def __init__(self, inner: Communicator, log: TraceLog) -> None:
        self.inner, self.log, self._count = inner, log, 0

    def start(self, partial: torch.Tensor) -> Pending:
        index, self._count = self._count, self._count + 1
        self.log.events.append(("start", index))
        return _TracedPending(self.inner.start(partial), self.log, index)


def traced(sublayers: list[SubLayer], log: TraceLog) -> list[SubLayer]:
    """The same sub-layers, logging the begin and end of each one's compute."""

    def wrap(index: int, sub: SubLayer) -> SubLayer:
        def fn(x: torch.Tensor) -> torch.Tensor:
            log.events.append(("compute_begin", index))
            out = sub.fn(x)
            log.events.append(("compute_end", index))
            return out

        return SubLayer(fn, sub.deferred)

    return [wrap(i, sub) for i, sub in enumerate(sublayers)]


def overlapped(log: TraceLog, n_sublayers: int) -> list[bool]:
    """For each sub-layer but the last: True when its all-reduce was waited on only after the next
    sub-layer's compute ended (the ladder's overlap), False when it was waited on before that compute
    began (the standard schedule)."""
    out = []
    for k in range(n_sublayers - 1):
        waited, next_done = log.position("wait", k), log.position("compute_end", k + 1)
        out.append(waited > next_done)
    return out
