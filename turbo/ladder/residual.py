"""The residual schedules of a tensor-parallel transformer: standard and Ladder-Residual.

Ladder Residual (Zhang et al., https://arxiv.org/abs/2501.06589) in the paper's terms: a transformer is a
sequence of sub-layers ``f_1, f_2, ...`` (attention, MLP, attention, MLP, ...) on one residual stream.

    standard:  x_k = x_{k-1} + AllReduce(f_k(x_{k-1}))
    ladder:    x_k = x_{k-1} + AllReduce(f_{k-1}(x_{k-2}))     (each f_k reads a stream one output behind)

Under tensor parallelism every f_k ends in a partial sum that must be all-reduced. In the standard
schedule nothing can run until that all-reduce returns. In the ladder schedule f_k's input does not need
f_{k-1}'s output, so f_{k-1}'s all-reduce is issued asynchronously, f_k is computed while it is in
flight, and the result is waited on and added only after f_k's compute. The last output is waited on
before the final norm.

This module holds only that schedule, written once over callables, so the single-process reference
(``turbo/ladder/model.py``) and the SGLang model (``python/sglang_turbo/models/ladder_llama.py``) run the
same code and differ only in their ``Communicator``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch


class Pending(Protocol):
    """An all-reduce in flight."""

    def wait(self) -> torch.Tensor:
        """Blocks until the reduced tensor is ready and returns it."""


class Communicator(Protocol):
    """Starts the all-reduce of one sub-layer's partial output (sum over the tensor-parallel ranks)."""

    def start(self, partial: torch.Tensor) -> Pending:
        ...


class Done:
    """A Pending that has already completed (single process: the partial output is the whole sum)."""

    def __init__(self, value: torch.Tensor) -> None:
        self.value = value

    def wait(self) -> torch.Tensor:
        return self.value


class LocalCommunicator:
    """One rank: the all-reduce is the identity."""

    def start(self, partial: torch.Tensor) -> Pending:
        return Done(partial)


@dataclass(frozen=True)
class SubLayer:
    """One residual branch: ``fn(x)`` returns the branch's (partial, not yet all-reduced) output.

    ``deferred`` True is the ladder: the output joins the stream one sub-layer later, so its all-reduce
    overlaps the next sub-layer's compute. False is the standard residual.
    """

    fn: Callable[[torch.Tensor], torch.Tensor]
    deferred: bool


def residual_stream(x: torch.Tensor, sublayers: Sequence[SubLayer], comm: Communicator) -> torch.Tensor:
    """Runs ``sublayers`` on the residual stream ``x`` and returns the stream after the last one.

    With every ``deferred`` False this is the standard pre-norm transformer; with every ``deferred`` True
    it is the Ladder Transformer; a mix is a partially converted model (the paper adapts the upper layers).
    # NOTE: a deferred output is waited on exactly one sub-layer later, after that sub-layer's compute.
    """
    in_flight: Pending | None = None  # the previous sub-layer's deferred all-reduce
    for sub in sublayers:
        partial = sub.fn(x)  # reads x, which lacks only a deferred predecessor's output
        if in_flight is not None:
            x = x + in_flight.wait()
            in_flight = None
        handle = comm.start(partial)
        if sub.deferred:
            in_flight = handle
        else:
            x = x + handle.wait()
    if in_flight is not None:
        x = x + in_flight.wait()
    return x
