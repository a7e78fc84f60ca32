"""``python -m sglang_turbo.launch_server`` and ``sglang-turbo``: upstream's flags, turbo's group,
clear errors for bad flags, embedded model names, and the no-argument main job."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from sglang_turbo import args as turbo_args
from sglang_turbo.launch_server import prepare_argv
from sglang_turbo.server_process import kill_server, log_tail
from turbo.zoo.presets import DEFAULT_MODEL, zoo_path

LAUNCHER = [sys.executable, "-m", "sglang_turbo.launch_server"]
DEFAULT_URL = "http://127.0.0.1:30000"


def run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def help_text() -> str:
    proc = run(LAUNCHER + ["--help"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


# --- --help ------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--model-path", "--tp-size", "--speculative-algorithm", "--api-key",
                                  "--max-total-tokens", "--attention-backend", "--disable-radix-cache"])
def test_help_lists_upstream_launch_server_flags(help_text, flag):
    assert flag in help_text, f"{flag} missing from --help"


def test_help_shows_turbos_own_group_with_its_flags(help_text):
    group = help_text[help_text.index("turbo:"):] if "turbo:" in help_text else ""
    missing = [f for f in ("--turbo-list-models", "--turbo-kv-budget-gb", "--turbo-allreduce-delay-us") if f not in group]
    assert group and not missing, f"turbo group present: {bool(group)}; flags missing from it: {missing}"


def test_help_of_the_console_script_serve_command_is_the_launchers():
    exe = shutil.which("sglang-turbo") or str(Path(sys.executable).parent / "sglang-turbo")
    proc = run([exe, "serve", "--help"])
    assert proc.returncode == 0 and "--turbo-kv-budget-gb" in proc.stdout and "--model-path" in proc.stdout, \
        f"{proc.returncode=} {proc.stderr[-1000:]=}"


# --- bad flags ---------------------------------------------------------------------------------


@pytest.mark.parametrize("argv,named", [
    (["--modle-path", "x"], "--modle-path"),
    (["--turbo-kv-budget", "1"], "--turbo-kv-budget"),
    (["--tp-size", "two"], "--tp-size"),
    (["--turbo-kv-budget-gb", "-1"], "--turbo-kv-budget-gb"),
    (["--turbo-allreduce-delay-us", "-3"], "--turbo-allreduce-delay-us"),
], ids=["misspelled-upstream-flag", "misspelled-turbo-flag", "bad-upstream-value", "bad-turbo-value", "negative-delay"])
def test_a_bad_flag_is_a_cli_error_naming_the_flag(argv, named):
    proc = run(LAUNCHER + ["--model-path", "/models/any"] + argv)
    assert proc.returncode == 2 and named in proc.stderr and "Traceback" not in proc.stderr, \
        f"{proc.returncode=}\n{proc.stderr[-1500:]}"


def test_an_unknown_console_script_command_is_an_error_naming_it():
    proc = run([sys.executable, "-m", "sglang_turbo.cli", "srve"])
    assert proc.returncode != 0 and "srve" in proc.stderr, f"{proc.returncode=} {proc.stderr=}"


# --- embedded models ---------------------------------------------------------------------------


@pytest.mark.parametrize("cmd", [
    LAUNCHER + ["--turbo-list-models"], [sys.executable, "-m", "sglang_turbo.cli", "models"],
], ids=["launcher-flag", "console-script"])
def test_list_models_prints_the_default_model_and_its_directory(cmd):
    proc = run(cmd)
    rows = {line.split("\t")[0]: line.split("\t")[1:] for line in proc.stdout.splitlines() if "\t" in line}
    assert proc.returncode == 0 and rows.get(DEFAULT_MODEL) == [str(zoo_path(DEFAULT_MODEL)), "model"], \
        f"{proc.returncode=} {rows=} {proc.stderr[-1000:]=}"
    assert rows.get("turbo-tiny-eagle3", [None, None])[1] == "EAGLE3 head of turbo-tiny", rows
    assert rows.get("turbo-tiny-draft", [None, None])[1] == "draft model of turbo-tiny", rows


@pytest.mark.parametrize("argv", [
    ["--model-path", "turbo-tiny"], ["--model-path=turbo-tiny"], ["--model", "turbo-tiny"],
])
def test_an_embedded_model_name_becomes_its_shipped_directory(argv):
    resolved = turbo_args.resolve_model_names(argv + ["--port", "1234"])
    flag = argv[0].split("=")[0]
    want = [flag, str(zoo_path("turbo-tiny")), "--port", "1234"] if len(argv) == 2 \
        else [f"{flag}={zoo_path('turbo-tiny')}", "--port", "1234"]
    assert resolved == want, f"{resolved=} {want=}"


def test_an_existing_directory_named_like_an_embedded_model_wins(tmp_path, monkeypatch):
    (tmp_path / "turbo-tiny").mkdir()
    monkeypatch.chdir(tmp_path)
    resolved = turbo_args.resolve_model_names(["--model-path", "turbo-tiny"])
    assert resolved == ["--model-path", "turbo-tiny"], f"{resolved=}"


def test_other_paths_are_left_alone():
    argv = ["--model-path", "/some/where/llama", "--tokenizer-path", "org/name"]
    assert turbo_args.resolve_model_names(argv) == argv


def test_no_model_path_means_the_default_embedded_model_on_cpu():
    argv = prepare_argv(["--port", "1234"])
    assert argv[:2] == ["--model-path", str(zoo_path(DEFAULT_MODEL))] and argv[-2:] == ["--device", "cpu"], f"{argv=}"


def test_an_explicit_device_is_kept():
    argv = prepare_argv(["--model-path", "turbo-tiny", "--device", "cpu"])
    assert argv.count("--device") == 1, f"{argv=}"


# --- the main job: no arguments at all ---------------------------------------------------------


@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    """``python -m sglang_turbo.launch_server`` with no flags: 127.0.0.1:30000, turbo-tiny."""
    try:
        requests.get(f"{DEFAULT_URL}/health", timeout=2)
        pytest.fail(f"something already listens on {DEFAULT_URL}; this test needs the default port free")
    except requests.ConnectionError:
        pass
    log_path = tmp_path_factory.mktemp("default") / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(LAUNCHER, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ})
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            # The banner is printed after /health turns 200, so wait for the banner.
            if "sglang-turbo is serving" in log_path.read_text(errors="replace"):
                break
            time.sleep(1)
        else:
            pytest.fail(f"default server not up (exit code {proc.poll()}):\n{log_tail(log_path)}")
        yield proc, log_path
    finally:
        kill_server(proc)


def test_no_arguments_serves_the_default_model_on_port_30000(default_server):
    info = requests.get(f"{DEFAULT_URL}/model_info", timeout=30).json()
    assert info["model_path"] == str(zoo_path(DEFAULT_MODEL)), f"{info=}"


def test_no_arguments_server_answers_generate(default_server):
    r = requests.post(f"{DEFAULT_URL}/generate", timeout=120,
                      json={"text": "def f():", "sampling_params": {"max_new_tokens": 3, "ignore_eos": True}})
    assert r.status_code == 200 and r.json()["meta_info"]["completion_tokens"] == 3, f"{r.status_code=} {r.text[:300]}"


def test_no_arguments_server_prints_how_to_call_it(default_server):
    _, log_path = default_server
    log = log_path.read_text(errors="replace")
    assert f"curl {DEFAULT_URL}/generate" in log and f"curl {DEFAULT_URL}/v1/chat/completions" in log, \
        f"usage banner missing:\n{log[-3000:]}"
