"""Shared helpers and fixtures of the sglang-turbo test suite.

The model every server test uses comes from one place, :func:`test_model_path`:
the embedded ``turbo-tiny`` (``turbo.zoo.presets.zoo_path``), unless the
environment variable ``SGLANG_TURBO_TEST_MODEL`` names another directory of the
same architecture (e.g. a randomly initialised copy while the real weights are
being trained). Tests never depend on what the model says, only on behaviour.

Servers are real ``python -m sglang_turbo.launch_server`` processes
(``sglang_turbo.server_process``). One plain server is shared by the whole
session (fixture ``server``); modules that need other flags start their own
through the ``turbo_server_factory`` fixture, which kills what it started.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from sglang_turbo.server_process import ServerStartError, kill_server, launch_turbo_server

MODEL_ENV = "SGLANG_TURBO_TEST_MODEL"
STARTUP_TIMEOUT_S = 240


def test_model_path() -> str:
    """Directory of the model the tests serve: $SGLANG_TURBO_TEST_MODEL, else the embedded turbo-tiny."""
    override = os.environ.get(MODEL_ENV)
    if override:
        if not (Path(override) / "config.json").is_file():
            raise FileNotFoundError(f"{MODEL_ENV}={override!r} is not a model directory (no config.json)")
        return str(Path(override).resolve())
    from turbo.zoo.presets import zoo_path

    return str(zoo_path("turbo-tiny"))  # raises FileNotFoundError naming the training recipe


test_model_path.__test__ = False  # a helper, not a test, though its name starts with "test"


@dataclass(frozen=True)
class ServerHandle:
    proc: subprocess.Popen
    base_url: str
    log_path: str


@pytest.fixture(scope="session")
def model_path() -> str:
    try:
        return test_model_path()
    except FileNotFoundError as e:
        pytest.fail(f"no model to test with: {e} (or set {MODEL_ENV})", pytrace=False)


@pytest.fixture(scope="session")
def tokenizer(model_path):
    """The served model's tokenizer, as transformers loads it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


@pytest.fixture(scope="session")
def turbo_server_factory(model_path, tmp_path_factory):
    """``with turbo_server_factory([...flags]) as handle:`` starts a server and always kills it."""

    @contextlib.contextmanager
    def factory(extra_args=(), env=None, api_key=None, timeout_s=STARTUP_TIMEOUT_S):
        log_dir = tmp_path_factory.mktemp("server")
        try:
            proc, url = launch_turbo_server(
                model_path, list(extra_args), timeout_s=timeout_s, env=env, log_dir=log_dir, api_key=api_key
            )
        except ServerStartError as e:
            pytest.fail(str(e), pytrace=False)
        try:
            yield ServerHandle(proc, url, proc.log_path)
        finally:
            kill_server(proc)

    return factory


@pytest.fixture(scope="session")
def server_handle(turbo_server_factory):
    """The one plain server (upstream and platform defaults) shared by the whole session."""
    with turbo_server_factory() as handle:
        yield handle


@pytest.fixture(scope="session")
def server(server_handle) -> str:
    """Base URL of the shared plain server, e.g. ``http://127.0.0.1:PORT``."""
    return server_handle.base_url


def generate(base_url: str, payload: dict, timeout: float = 120) -> requests.Response:
    return requests.post(f"{base_url}/generate", json=payload, timeout=timeout)


@pytest.fixture(scope="session")
def post_generate():
    """``post_generate(url, payload)`` -> JSON of a /generate call that must answer 200."""

    def call(base_url: str, payload: dict, timeout: float = 120) -> dict:
        r = generate(base_url, payload, timeout)
        assert r.status_code == 200, f"/generate {payload=} answered {r.status_code}: {r.text[:1000]}"
        return r.json()

    return call


@pytest.fixture(scope="session")
def kernel_tolerance():
    """Largest absolute error a kernel may show against its torch reference, by dtype (inputs ~N(0, 1))."""
    import torch

    return {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
