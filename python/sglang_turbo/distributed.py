"""Tensor parallelism through SGLang's own groups: the ladder's asynchronous all-reduce, the simulated
slow interconnect, and the portable platform's per-rank CPU split.

- :class:`TensorParallelCommunicator` is ``turbo.ladder.residual.Communicator`` over SGLang's TP group:
  ``torch.distributed.all_reduce(async_op=True)`` on the group's device group (gloo on CPU, NCCL on
  GPUs), so the ladder can wait on it one sub-layer later.
- ``SGLANG_TURBO_ALLREDUCE_DELAY_US`` (``--turbo-allreduce-delay-us``) makes every TP all-reduce take at
  least that long from issue to result: upstream's synchronous ``GroupCoordinator.all_reduce`` through
  an AROUND hook, the ladder's asynchronous ones through ``turbo.ladder.comm.SlowLinkCommunicator``.
  The same latency model on both paths, so standard and ladder TP can be compared on a slower link.
- :func:`cpu_rank_split`: on the portable platform each rank of a node gets its share of the cores.
"""

from __future__ import annotations

import os
import time

import torch

from turbo.ladder.comm import SlowLinkCommunicator, sleep_until_ready
from turbo.ladder.residual import Communicator, Done, LocalCommunicator, Pending

from . import env

# SEAM: every upstream TP all-reduce (RowParallelLinear, VocabParallelEmbedding, layer boundaries) ends
# in GroupCoordinator.all_reduce; no registry exists for communicators, so an AROUND hook adds the delay.
ALL_REDUCE_TARGET = "sglang.srt.distributed.parallel_state.GroupCoordinator.all_reduce"


class _WorkPending:
    def __init__(self, work, tensor: torch.Tensor) -> None:
        self.work, self.tensor = work, tensor

    def wait(self) -> torch.Tensor:
        self.work.wait()
        return self.tensor  # reduced in place


class TensorParallelCommunicator:
    """Asynchronous sum over an SGLang ``GroupCoordinator``'s ranks (in place on the partial tensor)."""

    def __init__(self, group) -> None:
        self.group = group

    def start(self, partial: torch.Tensor) -> Pending:
        if self.group.world_size == 1:
            return Done(partial)
        work = torch.distributed.all_reduce(partial, group=self.group.device_group, async_op=True)
        return _WorkPending(work, partial)


def create_tp_communicator() -> Communicator:
    """The communicator a ladder model uses in this process: SGLang's TP group, slowed if asked."""
    from sglang.srt.runtime_context import get_parallel

    group = get_parallel().tp_group
    if group.world_size == 1:
        return LocalCommunicator()
    comm: Communicator = TensorParallelCommunicator(group)
    delay = env.allreduce_delay_s()
    return SlowLinkCommunicator(comm, delay) if delay > 0 else comm


def slowed_all_reduce(delay_s: float):
    """An AROUND hook for ``GroupCoordinator.all_reduce``: the result is returned no earlier than
    ``delay_s`` after the call (one-rank groups, which communicate nothing, are never delayed)."""

    def around(original, group, input_, *args, **kwargs):
        if group.world_size == 1:
            return original(group, input_, *args, **kwargs)
        ready_at = time.perf_counter() + delay_s
        out = original(group, input_, *args, **kwargs)
        sleep_until_ready(ready_at)
        return out

    return around


def register() -> None:
    """Installs the delay hook only where a delay is asked for; the delay is read once, here, not on
    every all-reduce."""
    delay = env.allreduce_delay_s()
    if delay > 0:
        from sglang.srt.plugins.hook_registry import HookRegistry, HookType

        HookRegistry.register(ALL_REDUCE_TARGET, slowed_all_reduce(delay), HookType.AROUND)


def world_ranks(args) -> int:
    """Scheduler processes of the whole deployment (tensor x pipeline x data parallel), as upstream counts."""
    return args.tp_size * args.pp_size * (1 if args.enable_dp_attention else args.dp_size)


def cpu_rank_split(n_ranks: int, cpus: list[int]) -> list[list[int]]:
    """``cpus`` in ``n_ranks`` contiguous groups as even as possible; ranks share cores when fewer."""
    if n_ranks <= len(cpus):
        size, extra = divmod(len(cpus), n_ranks)
        groups, start = [], 0
        for r in range(n_ranks):
            end = start + size + (1 if r < extra else 0)
            groups.append(cpus[start:end])
            start = end
        return groups
    return [[cpus[r % len(cpus)]] for r in range(n_ranks)]


def apply_cpu_tp_defaults(args) -> None:
    """With more than one rank, tell upstream which cores each rank of this node owns, and with more than
    one on this node give each rank's torch that many threads; a user's ``SGLANG_CPU_OMP_THREADS_BIND`` /
    ``SGLANG_TURBO_THREADS`` wins. Without this, upstream asserts one NUMA node per rank of the whole
    deployment (``numa_utils.init_threads_binding``), which fails on any single-socket CPU."""
    if world_ranks(args) == 1:
        return
    on_this_node = max(1, world_ranks(args) // max(1, args.nnodes))
    groups = cpu_rank_split(on_this_node, sorted(os.sched_getaffinity(0)))
    os.environ.setdefault("SGLANG_CPU_OMP_THREADS_BIND", "|".join(",".join(map(str, g)) for g in groups))
    if on_this_node > 1:
        os.environ.setdefault("SGLANG_TURBO_THREADS", str(min(len(g) for g in groups)))
