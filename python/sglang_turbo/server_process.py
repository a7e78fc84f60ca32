"""Start and stop an sglang-turbo server as a child process (for tests and benchmarks)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(base_url: str, api_key: str | None) -> bool:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        req = urllib.request.Request(f"{base_url}/health", headers=headers)
        with urllib.request.urlopen(req, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def launch_turbo_server(
    model_path: str | Path,
    extra_args: list[str] | None = None,
    timeout_s: float = 240,
    env: dict[str, str] | None = None,
    log_path: str | Path | None = None,
    api_key: str | None = None,
) -> tuple[subprocess.Popen, str]:
    """Runs ``python -m sglang_turbo.launch_server`` on 127.0.0.1 and waits for /health.

    Returns (process, base_url). Raises RuntimeError with the log's tail if the
    server exits or is not healthy within ``timeout_s``.
    """
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    args = [sys.executable, "-m", "sglang_turbo.launch_server", "--model-path", str(model_path),
            "--host", "127.0.0.1", "--port", str(port)] + list(extra_args or [])
    if api_key:
        args += ["--api-key", api_key]
    if log_path is None:
        log_path = Path(tempfile.mkdtemp(prefix="sglang-turbo-")) / "server.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            break
        if _healthy(base_url, api_key):
            return proc, base_url
        time.sleep(1)
    kill_server(proc)
    tail = Path(log_path).read_bytes()[-4000:].decode(errors="replace")
    raise RuntimeError(f"sglang-turbo server did not become healthy in {timeout_s}s; log {log_path}:\n{tail}")


def kill_server(proc: subprocess.Popen) -> None:
    """Kills the server and every process it started (scheduler, detokenizer)."""
    from sglang.srt.utils import kill_process_tree

    if proc.poll() is None:
        kill_process_tree(proc.pid)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
