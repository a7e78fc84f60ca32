"""SGLang finds the portable CPU platform through its entry point, and stands it aside when it must.

Platform selection is cached at import time, so each case runs in a fresh interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys

from sglang_turbo import platform as turbo_platform

WHICH_PLATFORM = (
    "from sglang.srt.platforms import current_platform as p; "
    "print(type(p).__module__ + '.' + type(p).__qualname__)"
)


def chosen_platform(env_overrides: dict[str, str]) -> str:
    env = {**os.environ, **env_overrides}
    proc = subprocess.run([sys.executable, "-c", WHICH_PLATFORM], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, f"{proc.returncode=}\n{proc.stderr[-3000:]}"
    return proc.stdout.strip().splitlines()[-1]


def test_sglang_chooses_the_turbo_platform_exactly_when_there_is_no_accelerator():
    chosen = chosen_platform({})
    if turbo_platform.accelerator_present():  # a GPU machine: upstream's own platform (CUDA, ROCm...)
        assert chosen != turbo_platform.PLATFORM_QUALNAME, f"{chosen=}"
    else:
        assert chosen == turbo_platform.PLATFORM_QUALNAME, f"{chosen=}"


def test_turbo_platform_off_leaves_sglang_to_its_own_choice():
    assert chosen_platform({"SGLANG_TURBO_PLATFORM": "off"}) != turbo_platform.PLATFORM_QUALNAME


def test_the_platform_stands_aside_when_an_accelerator_is_present(monkeypatch):
    monkeypatch.setattr(turbo_platform, "accelerator_present", lambda: True)
    assert turbo_platform.activate() is None


def test_the_platform_stands_aside_when_upstreams_cpu_engine_is_requested(monkeypatch):
    monkeypatch.setattr(turbo_platform, "accelerator_present", lambda: False)
    monkeypatch.setenv("SGLANG_USE_CPU_ENGINE", "1")
    assert turbo_platform.activate() is None


def test_the_platform_activates_on_a_plain_cpu(monkeypatch):
    monkeypatch.setattr(turbo_platform, "accelerator_present", lambda: False)
    monkeypatch.delenv("SGLANG_USE_CPU_ENGINE", raising=False)
    monkeypatch.delenv("SGLANG_TURBO_PLATFORM", raising=False)
    assert turbo_platform.activate() == turbo_platform.PLATFORM_QUALNAME


def test_the_platforms_device_is_the_plain_string_cpu():
    """Upstream calls ``get_device().split(...)``-style string operations on it."""
    assert turbo_platform.TurboCpuPlatform().get_device() == "cpu"


def test_the_platforms_default_attention_backend_is_turbo_native():
    from sglang_turbo.attention import BACKEND_NAME

    assert turbo_platform.TurboCpuPlatform().get_default_attention_backend() == BACKEND_NAME
