"""The SGLang-facing TP helpers of python/sglang_turbo/distributed.py, without a server: how cores are
split between ranks, which defaults a TP launch gets, and the slow-link hook on upstream's all-reduce."""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

import pytest

from sglang_turbo import distributed


@pytest.mark.parametrize("n_ranks, cpus, want", [
    (2, [0, 1], [[0], [1]]),
    (2, [0, 1, 2, 3, 4], [[0, 1, 2], [3, 4]]),
    (1, [0, 1], [[0, 1]]),
    (3, [4, 5], [[4], [5], [4]]),
])
def test_cores_are_split_into_contiguous_groups_one_per_rank(n_ranks, cpus, want):
    got = distributed.cpu_rank_split(n_ranks, cpus)
    assert got == want, f"{n_ranks=} {cpus=}: {got=}"


def server_args(**kw):
    base = dict(tp_size=1, pp_size=1, dp_size=1, enable_dp_attention=False, nnodes=1)
    return SimpleNamespace(**{**base, **kw})


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("SGLANG_CPU_OMP_THREADS_BIND", "SGLANG_TURBO_THREADS"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_tp2_on_one_node_binds_one_share_of_the_cores_per_rank(clean_env):
    clean_env.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    distributed.apply_cpu_tp_defaults(server_args(tp_size=2))
    assert os.environ["SGLANG_CPU_OMP_THREADS_BIND"] == "0,1|2,3", os.environ["SGLANG_CPU_OMP_THREADS_BIND"]
    assert os.environ["SGLANG_TURBO_THREADS"] == "2", os.environ["SGLANG_TURBO_THREADS"]


def test_one_rank_per_node_keeps_all_cores_and_still_passes_upstreams_numa_check(clean_env):
    """Two nodes of TP2: each node runs one rank, which gets every core of its node."""
    clean_env.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    distributed.apply_cpu_tp_defaults(server_args(tp_size=2, nnodes=2))
    assert os.environ["SGLANG_CPU_OMP_THREADS_BIND"] == "0,1", os.environ["SGLANG_CPU_OMP_THREADS_BIND"]
    assert "SGLANG_TURBO_THREADS" not in os.environ, "a node's only rank must keep the default (all cores)"


def test_a_single_rank_server_gets_no_tp_defaults(clean_env):
    distributed.apply_cpu_tp_defaults(server_args())
    assert "SGLANG_CPU_OMP_THREADS_BIND" not in os.environ and "SGLANG_TURBO_THREADS" not in os.environ


def test_the_users_own_binding_and_threads_win(clean_env):
    clean_env.setenv("SGLANG_CPU_OMP_THREADS_BIND", "0-7|8-15")
    clean_env.setenv("SGLANG_TURBO_THREADS", "8")
    distributed.apply_cpu_tp_defaults(server_args(tp_size=2))
    assert (os.environ["SGLANG_CPU_OMP_THREADS_BIND"], os.environ["SGLANG_TURBO_THREADS"]) == ("0-7|8-15", "8")


def test_upstreams_all_reduce_takes_at_least_the_simulated_delay():
    group = SimpleNamespace(world_size=2)
    t0 = time.perf_counter()
    out = distributed.slowed_all_reduce(0.03)(lambda g, x: x + 1, group, 1)
    elapsed = time.perf_counter() - t0
    assert out == 2 and elapsed >= 0.03, f"{out=} {elapsed=}"


def test_a_single_rank_group_is_never_delayed():
    t0 = time.perf_counter()
    distributed.slowed_all_reduce(1.0)(lambda g, x: x, SimpleNamespace(world_size=1), 1)
    assert time.perf_counter() - t0 < 0.5, "a 1-rank 'all-reduce' is no communication and must not wait"


@pytest.mark.parametrize("raw", ["-5", "fast"])
def test_a_bad_delay_value_is_refused_with_the_variables_name(monkeypatch, raw):
    from sglang_turbo import env

    monkeypatch.setenv("SGLANG_TURBO_ALLREDUCE_DELAY_US", raw)
    with pytest.raises(ValueError, match="SGLANG_TURBO_ALLREDUCE_DELAY_US"):
        env.allreduce_delay_s()
