"""Start and stop an sglang-turbo server as a child process (for tests and benchmarks)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

LOG_TAIL_CHARS = 6000


class ServerStartError(RuntimeError):
    """The server exited or never became healthy; the message carries the command and the log's tail."""


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(log_path: str | os.PathLike, chars: int = LOG_TAIL_CHARS) -> str:
    try:
        return Path(log_path).read_text(errors="replace")[-chars:]
    except OSError as e:
        return f"<no log at {log_path}: {e}>"


def _health_status(base_url: str, api_key: str | None) -> str:
    """'200', another HTTP status (503 while upstream's warmup request runs), or the error's name."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        req = urllib.request.Request(f"{base_url}/health", headers=headers)
        with urllib.request.urlopen(req, timeout=5) as resp:
            return str(resp.status)
    except urllib.error.HTTPError as e:
        return str(e.code)
    except OSError as e:
        return type(e).__name__


def launcher_command(model_path: str | os.PathLike, port: int, extra_args) -> list[str]:
    """``python -m sglang_turbo.launch_server`` for ``model_path`` on 127.0.0.1:``port``."""
    return [sys.executable, "-m", "sglang_turbo.launch_server", "--model-path", str(model_path),
            "--host", "127.0.0.1", "--port", str(port), *extra_args]


def launch_turbo_server(
    model_path: str | os.PathLike,
    extra_args: list[str] | tuple[str, ...] = (),
    timeout_s: float = 240,
    env: dict[str, str] | None = None,
    log_dir: str | os.PathLike | None = None,
    api_key: str | None = None,
) -> tuple[subprocess.Popen, str]:
    """Runs ``python -m sglang_turbo.launch_server`` on a free port of 127.0.0.1 and waits for /health.

    Returns ``(process, base_url)``; ``process.log_path`` names the log
    (``server-PORT.log`` in ``log_dir``, a fresh temporary directory by default).
    ``api_key`` is passed as ``--api-key`` and used for the readiness probe.
    Raises :class:`ServerStartError` (after killing what started) if the server
    exits or is not healthy within ``timeout_s``.
    """
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="sglang-turbo-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"server-{port}.log"
    cmd = launcher_command(model_path, port, extra_args)
    if api_key:
        cmd += ["--api-key", api_key]
    with open(log_path, "wb") as log:
        # A new session: a Ctrl-C in the parent does not reach the server half-way through a test.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                start_new_session=True)
    proc.log_path = str(log_path)

    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    while proc.poll() is None and time.monotonic() < deadline:
        last = _health_status(base_url, api_key)
        if last == "200":
            return proc, base_url
        time.sleep(1)
    why = (f"exited with code {proc.returncode}" if proc.poll() is not None
           else f"not healthy after {timeout_s:.0f}s (last /health: {last})")
    kill_server(proc)
    raise ServerStartError(f"sglang-turbo server {why}\ncommand: {' '.join(cmd)}\n"
                           f"--- tail of {log_path} ---\n{log_tail(log_path)}")


def launch_turbo_nodes(
    model_path: str | os.PathLike,
    extra_args: list[str] | tuple[str, ...] = (),
    nnodes: int = 1,
    timeout_s: float = 300,
    env: dict[str, str] | None = None,
    log_dir: str | os.PathLike | None = None,
) -> tuple[list[subprocess.Popen], str]:
    """Like :func:`launch_turbo_server`, as ``nnodes`` launchers on this machine (``--nnodes N --node-rank
    i --dist-init-addr 127.0.0.1:PORT``), as a multi-node deployment runs one per host.

    Returns ``(processes, base_url of node 0)``; nodes 1.. are started first (node 0 is healthy only once
    they joined). On failure every node is killed and :class:`ServerStartError` names the logs.
    """
    if nnodes == 1:
        proc, url = launch_turbo_server(model_path, extra_args, timeout_s=timeout_s, env=env, log_dir=log_dir)
        return [proc], url
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="sglang-turbo-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    node_flags = [*extra_args, "--nnodes", str(nnodes), "--dist-init-addr", f"127.0.0.1:{free_port()}"]
    others = []
    for rank in range(1, nnodes):
        log_path = log_dir / f"node{rank}.log"
        cmd = launcher_command(model_path, free_port(), [*node_flags, "--node-rank", str(rank)])
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                    start_new_session=True)
        proc.log_path = str(log_path)
        others.append(proc)
    try:
        proc, url = launch_turbo_server(model_path, [*node_flags, "--node-rank", "0"], timeout_s=timeout_s,
                                        env=env, log_dir=log_dir)
    except ServerStartError as e:
        for p in others:
            kill_server(p)
        tails = "".join(f"\n--- tail of {p.log_path} ---\n{log_tail(p.log_path, 2000)}" for p in others)
        raise ServerStartError(f"{e}{tails}") from None
    return [proc, *others], url


def kill_server(proc: subprocess.Popen | None, timeout_s: float = 20) -> None:
    """Stops a launched server and every process it spawned (scheduler, detokenizer).

    Descendants are collected before the parent is signalled, so children that get
    re-parented when the launcher exits are still found. SIGTERM first lets
    upstream clean up its IPC files; SIGKILL whatever is left.
    """
    import psutil

    if proc is None:
        return
    try:
        parent = psutil.Process(proc.pid)
        procs = [parent] + parent.children(recursive=True)
    except psutil.NoSuchProcess:
        procs = []
    with contextlib.suppress(ProcessLookupError, OSError):
        proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=timeout_s / 2)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    _, still_alive = psutil.wait_procs(alive, timeout=timeout_s / 2)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=1)
    if still_alive:
        raise RuntimeError(f"server processes survived SIGKILL: {[p.pid for p in still_alive]}")
