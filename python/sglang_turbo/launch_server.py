"""``python -m sglang_turbo.launch_server``: upstream's launcher with the Turbo layer.

Every flag of ``python -m sglang.launch_server`` works with the same meaning.
What this adds, in order:
1. SGLang's plugins are loaded (ours registers the portable platform and hooks).
2. Embedded model names (``turbo-tiny``) become their shipped directories; no
   ``--model-path`` means the default embedded model. On the portable CPU
   platform, ``--device cpu`` is supplied when not given.
3. Turbo flags (``--turbo-*``) are parsed and split off; bad flags exit with argparse's error.
4. Upstream's ``prepare_server_args`` resolves the flags; speculative flags that cannot work
   (no draft model, a draft of another vocabulary, an impossible tree shape) exit here with a
   usage error (``speculative/checks.py``).
5. Upstream's ``run_server`` takes over.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

from turbo.zoo.presets import DEFAULT_MODEL, zoo_names, zoo_path, zoo_role

from . import args as turbo_args

logger = logging.getLogger(__name__)


def _has_flag(argv: list[str], *flags: str) -> bool:
    return any(a.split("=", 1)[0] in flags for a in argv)


def print_models() -> None:
    """One line per embedded model or draft head shipped in this checkout: NAME<tab>DIRECTORY<tab>ROLE."""
    for name in zoo_names():
        print(f"{name}\t{zoo_path(name)}\t{zoo_role(name)}")


def prepare_argv(argv: list[str]) -> list[str]:
    """Step 2: argv with the default model, shipped directories and the device filled in."""
    from . import platform as turbo_platform

    argv = list(argv)
    if not _has_flag(argv, "--model-path", "--model"):
        argv = ["--model-path", DEFAULT_MODEL] + argv
    argv = turbo_args.resolve_model_names(argv)
    # Asked of activate() itself, not of SGLang's cached current_platform: the same answer, without
    # depending on whether (and how) something in this process resolved the platform already.
    if turbo_platform.activate() is not None and not _has_flag(argv, "--device"):
        argv += ["--device", "cpu"]
    return argv


def _print_usage_when_ready(base_url: str, model: str, api_key: str | None, timeout_s: float = 900) -> None:
    """Waits for /health, then tells the user how to call the server."""
    import urllib.request

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            req = urllib.request.Request(f"{base_url}/health", headers=headers)
            with urllib.request.urlopen(req, timeout=2) as resp:
                if resp.status == 200:
                    break
        except OSError:
            pass
        time.sleep(1)
    else:
        return
    auth = f" -H 'Authorization: Bearer {api_key}'" if api_key else ""
    sys.stderr.write(
        f"\nsglang-turbo is serving {model} at {base_url}\n"
        f"  curl {base_url}/generate{auth} -H 'Content-Type: application/json' \\\n"
        "       -d '{\"text\": \"def fibonacci(n):\", \"sampling_params\": {\"max_new_tokens\": 48, \"temperature\": 0}}'\n"
        f"  curl {base_url}/v1/chat/completions{auth} -H 'Content-Type: application/json' \\\n"
        "       -d '{\"model\": \"default\", \"messages\": [{\"role\": \"user\", \"content\": \"What is 12 + 30?\"}]}'\n"
        "  python -m sglang.bench_serving --backend sglang --dataset-name random-ids "
        f"--base-url {base_url} --num-prompts 32\n\n"
    )
    sys.stderr.flush()


def main(argv: list[str] | None = None, prog: str = "python -m sglang_turbo.launch_server") -> None:
    from sglang.srt.plugins import load_plugins

    argv = sys.argv[1:] if argv is None else list(argv)
    load_plugins()  # step 1

    # Step 2 before parsing, so that a misspelled flag, not a missing --model-path, is what argparse reports.
    if _has_flag(argv, "--turbo-list-models"):
        print_models()
        return
    if not _has_flag(argv, "-h", "--help"):  # help needs no model on disk
        try:
            argv = prepare_argv(argv)
        except FileNotFoundError as e:  # an embedded model that is not shipped in this checkout
            sys.exit(f"{prog}: error: {e}")
    parser = turbo_args.build_parser(prog)
    cfg, upstream_argv = turbo_args.split_turbo_args(parser, argv)  # step 3
    os.environ.update(cfg.environment())  # read by env.py in every process SGLang starts

    from sglang.launch_server import run_server
    from sglang.srt.arg_groups.overrides import resolving_view

    from .graph_runner import check_cpu_graph_args
    from .plugin import portable_platform_active
    from .speculative.checks import check_draft_model_args, check_speculative_args
    from sglang.srt.server_args import prepare_server_args
    from sglang.srt.utils import kill_process_tree

    server_args = prepare_server_args(upstream_argv)  # step 4
    try:
        # Upstream's run_server resolves too (once); doing it here turns a bad combination into a usage
        # error in this process instead of a traceback from a scheduler child.
        check_draft_model_args(server_args)
        server_args.resolve_once()
        check_speculative_args(resolving_view(server_args))
        check_cpu_graph_args(resolving_view(server_args), portable=portable_platform_active())
    except ValueError as e:
        parser.error(str(e))
    model = str(server_args.model_path)
    if server_args.node_rank == 0:  # other nodes serve no HTTP API, only upstream's health probe
        threading.Thread(
            target=_print_usage_when_ready,
            args=(server_args.url(), os.path.basename(model.rstrip("/")), server_args.api_key),
            daemon=True,
        ).start()
    try:
        run_server(server_args)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)


if __name__ == "__main__":
    main()
