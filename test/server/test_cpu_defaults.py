"""The portable CPU platform's server-argument defaults (python/sglang_turbo/cpu_defaults.py),
read back from ``GET /server_info``, and that explicit flags win over them."""

from __future__ import annotations

import time
import types

import psutil
import pytest
import requests

from sglang_turbo import cpu_defaults
from sglang_turbo.attention import BACKEND_NAME


def server_info(url: str) -> dict:
    r = requests.get(f"{url}/server_info", timeout=30)
    assert r.status_code == 200, f"{r.status_code=} {r.text[:300]=}"
    return r.json()


def process_tree(pid: int) -> list[psutil.Process]:
    """The launcher and every process it started (scheduler, detokenizer, ...)."""
    return [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)


@pytest.fixture(scope="module")
def info(server) -> dict:
    return server_info(server)


@pytest.fixture(scope="module")
def explicit_server(turbo_server_factory):
    with turbo_server_factory(["--max-total-tokens", "20000", "--dtype", "bfloat16", "--attention-backend", "torch_native"]) as handle:
        yield handle.base_url


@pytest.fixture(scope="module")
def explicit_info(explicit_server) -> dict:
    return server_info(explicit_server)


# --- defaults on the shared plain server -----------------------------------------------------


def test_default_dtype_is_float32(info):
    assert info["dtype"] == "float32", f"{info['dtype']=}"


def test_default_device_is_cpu(info):
    assert info["device"] == "cpu", f"{info['device']=}"


def test_sleep_on_idle_is_on_by_default(info):
    assert info["sleep_on_idle"] is True, f"{info['sleep_on_idle']=}"


def test_default_attention_backend_is_turbos_batched_native_backend(info):
    assert info["attention_backend"] == BACKEND_NAME == "turbo_native", f"{info['attention_backend']=}"


def test_default_kv_pool_is_bounded(info):
    bound = cpu_defaults.MAX_DEFAULT_POOL_TOKENS
    assert info["max_total_tokens"] is not None and 0 < info["max_total_tokens"] <= bound, \
        f"{info['max_total_tokens']=} {bound=}"


def test_default_kv_pool_is_the_one_the_kv_budget_gives(info, model_path):
    expected = cpu_defaults.default_pool_tokens(model_path, "float32")
    assert info["max_total_tokens"] == expected, f"{info['max_total_tokens']=} {expected=}"


def test_idle_server_uses_little_cpu(server_handle, server):
    """Upstream's scheduler busy-polls (100% of a core); with sleep_on_idle it must idle near 0."""
    requests.post(f"{server}/generate", json={"text": "x", "sampling_params": {"max_new_tokens": 1}}, timeout=60)
    time.sleep(2)  # let the request's tail (detokenizer, logging) finish
    procs = process_tree(server_handle.proc.pid)

    def cpu_seconds() -> float:
        total = 0.0
        for p in procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    start_cpu, start = cpu_seconds(), time.monotonic()
    time.sleep(2.5)
    percent = 100 * (cpu_seconds() - start_cpu) / (time.monotonic() - start)
    names = [p.name() for p in procs]
    assert percent < 30, f"idle server tree used {percent:.1f}% of one core; processes {names}"


def test_a_server_takes_under_a_quarter_of_a_24_gb_machine(server_handle):
    """Two servers plus the test process must fit in 24 GB; upstream's defaults took 17 GB for one.

    Measured 2026-11-25 for turbo-tiny: 3.7 GiB PSS in all (scheduler 2.0, launcher 0.85, detokenizer 0.84).
    """
    procs = process_tree(server_handle.proc.pid)
    pss = {f"{p.pid}:{p.name()}": p.memory_full_info().pss / 2**30 for p in procs}
    assert sum(pss.values()) < 6.0, f"server tree PSS {sum(pss.values()):.2f} GiB: {pss}"


def test_overlap_scheduler_is_off_by_default(info):
    """On a CPU the overlap loop only adds bookkeeping to a synchronous forward (cpu_defaults.py)."""
    assert info["disable_overlap_schedule"] is True, f"{info['disable_overlap_schedule']=}"


def test_cpu_graphs_are_on_by_default_for_a_llama_checkpoint(info):
    """The default server compiles its decode forward (docs/serving.md, CPU graphs)."""
    assert info["enable_torch_compile"] is True, f"{info['enable_torch_compile']=}"


# --- explicit flags win ----------------------------------------------------------------------


def test_explicit_max_total_tokens_wins_over_the_default(explicit_info):
    assert explicit_info["max_total_tokens"] == 20000, f"{explicit_info['max_total_tokens']=}"


def test_explicit_dtype_wins_over_the_default(explicit_info):
    assert explicit_info["dtype"] == "bfloat16", f"{explicit_info['dtype']=}"


def test_explicit_attention_backend_wins_over_the_default(explicit_info):
    assert explicit_info["attention_backend"] == "torch_native", f"{explicit_info['attention_backend']=}"


def test_cpu_graphs_stay_off_with_an_attention_backend_they_cannot_compile(explicit_info):
    assert explicit_info["enable_torch_compile"] is False, f"{explicit_info['enable_torch_compile']=}"


def test_explicit_flags_leave_the_other_defaults_in_place(explicit_info):
    got = {k: explicit_info[k] for k in ("device", "sleep_on_idle", "sampling_backend")}
    want = {"device": "cpu", "sleep_on_idle": True, "sampling_backend": "pytorch"}
    assert got == want, f"{got=} {want=}"


def test_server_with_explicit_bfloat16_generates(explicit_server):
    r = requests.post(f"{explicit_server}/generate", timeout=120, json={
        "text": "def f(x):", "sampling_params": {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True}})
    n = len(r.json().get("output_ids", [])) if r.status_code == 200 else None
    assert r.status_code == 200 and n == 4, f"{r.status_code=} {n=} {r.text[:300]=}"


# --- the KV budget -----------------------------------------------------------------------------


def test_kv_budget_sets_the_default_pool_from_the_models_bytes_per_token(model_path, monkeypatch):
    per_token = cpu_defaults.kv_bytes_per_token(model_path, "float32")
    monkeypatch.setenv("SGLANG_TURBO_KV_BUDGET_GB", "0.25")
    want = max(cpu_defaults.MIN_DEFAULT_POOL_TOKENS, int(0.25 * 2**30) // per_token)
    got = cpu_defaults.default_pool_tokens(model_path, "float32")
    assert got == want, f"{got=} {want=} {per_token=}"


def test_bfloat16_pool_holds_twice_the_tokens_of_float32(model_path, monkeypatch):
    monkeypatch.setenv("SGLANG_TURBO_KV_BUDGET_GB", "0.25")
    f32, bf16 = (cpu_defaults.default_pool_tokens(model_path, d) for d in ("float32", "bfloat16"))
    assert abs(bf16 - 2 * f32) <= 1, f"{f32=} {bf16=}"  # integer division rounds each down


@pytest.mark.parametrize("value, disabled", [(None, True), ("off", True), ("on", False), ("1", False)])
def test_overlap_scheduler_stays_upstreams_only_when_the_environment_asks(value, disabled, monkeypatch):
    if value is None:
        monkeypatch.delenv("SGLANG_TURBO_OVERLAP_SCHEDULE", raising=False)
    else:
        monkeypatch.setenv("SGLANG_TURBO_OVERLAP_SCHEDULE", value)
    args = types.SimpleNamespace(disable_overlap_schedule=False)  # upstream's default
    cpu_defaults.apply_overlap_default(args)
    assert args.disable_overlap_schedule is disabled, f"{value=} {args.disable_overlap_schedule=}"


def test_an_explicit_disable_overlap_schedule_stays_with_the_environment_set(monkeypatch):
    monkeypatch.setenv("SGLANG_TURBO_OVERLAP_SCHEDULE", "on")
    args = types.SimpleNamespace(disable_overlap_schedule=True)  # --disable-overlap-schedule given
    cpu_defaults.apply_overlap_default(args)
    assert args.disable_overlap_schedule is True
