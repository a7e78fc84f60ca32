"""Command-line parsing: every upstream ``launch_server`` flag, plus turbo's own group.

We build upstream's parser (``ServerArgs.add_cli_args``) and add a ``turbo``
argument group to it, so ``--help`` shows both and a misspelled flag gets
argparse's own error naming it. Turbo flags are then split off and the rest is
handed, unchanged, to upstream's ``prepare_server_args``.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from turbo.spec.controller import POLICIES
from turbo.zoo.presets import DEFAULT_MODEL, PRESETS, zoo_names, zoo_path

# Flags whose value may name an embedded model instead of a path.
MODEL_PATH_FLAGS = ("--model-path", "--model", "--tokenizer-path", "--speculative-draft-model-path")


@dataclass(frozen=True)
class TurboServeConfig:
    """Turbo's own serving flags (``--turbo-*``) that reach the server; ``--turbo-list-models``
    is answered by the launcher before parsing."""

    kv_budget_gb: float | None = None  # --turbo-kv-budget-gb  <->  SGLANG_TURBO_KV_BUDGET_GB
    allreduce_delay_us: float | None = None  # --turbo-allreduce-delay-us  <->  SGLANG_TURBO_ALLREDUCE_DELAY_US
    # TURBO speculator (turbo.spec.adaptive_config.AdaptiveSpecConfig validates them)
    speculator_dir: str | None = None  # --turbo-speculator-dir  <->  SGLANG_TURBO_SPECULATOR_DIR
    replay_tokens: int | None = None  # --turbo-replay-tokens  <->  SGLANG_TURBO_REPLAY_TOKENS
    update_interval: int | None = None  # --turbo-update-interval  <->  SGLANG_TURBO_UPDATE_INTERVAL
    disable_learning: bool = False  # --turbo-disable-learning  <->  SGLANG_TURBO_LEARNING=off
    controller: str | None = None  # --turbo-controller  <->  SGLANG_TURBO_CONTROLLER

    def __post_init__(self) -> None:
        if self.kv_budget_gb is not None and self.kv_budget_gb <= 0:
            raise ValueError(f"--turbo-kv-budget-gb must be > 0, got {self.kv_budget_gb}")
        if self.allreduce_delay_us is not None and self.allreduce_delay_us < 0:
            raise ValueError(f"--turbo-allreduce-delay-us must be >= 0, got {self.allreduce_delay_us}")
        from turbo.spec.adaptive_config import AdaptiveSpecConfig

        defaults = AdaptiveSpecConfig()
        AdaptiveSpecConfig(  # raises ValueError naming the flag
            replay_tokens=defaults.replay_tokens if self.replay_tokens is None else self.replay_tokens,
            update_interval=defaults.update_interval if self.update_interval is None else self.update_interval,
            controller=defaults.controller if self.controller is None else self.controller,
        )

    def environment(self) -> dict[str, str]:
        """The variables that carry these flags to every process SGLang starts (read in env.py)."""
        env = {}
        if self.kv_budget_gb is not None:
            env["SGLANG_TURBO_KV_BUDGET_GB"] = str(self.kv_budget_gb)
        if self.allreduce_delay_us is not None:
            env["SGLANG_TURBO_ALLREDUCE_DELAY_US"] = str(self.allreduce_delay_us)
        if self.speculator_dir is not None:
            env["SGLANG_TURBO_SPECULATOR_DIR"] = os.path.abspath(os.path.expanduser(self.speculator_dir))
        if self.replay_tokens is not None:
            env["SGLANG_TURBO_REPLAY_TOKENS"] = str(self.replay_tokens)
        if self.update_interval is not None:
            env["SGLANG_TURBO_UPDATE_INTERVAL"] = str(self.update_interval)
        if self.disable_learning:
            env["SGLANG_TURBO_LEARNING"] = "off"
        if self.controller is not None:
            env["SGLANG_TURBO_CONTROLLER"] = self.controller
        return env


def add_turbo_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("turbo", "sglang-turbo options (everything above is upstream SGLang's)")
    group.add_argument(
        "--turbo-list-models", action="store_true",
        help="Print the embedded models (usable as --model-path NAME) and exit.",
    )
    group.add_argument(
        "--turbo-kv-budget-gb", type=float, default=None, metavar="GB",
        help="On the portable CPU platform, memory the KV pool may take when --max-total-tokens "
        "is not given (default 1; env SGLANG_TURBO_KV_BUDGET_GB).",
    )
    group.add_argument(
        "--turbo-allreduce-delay-us", type=float, default=None, metavar="US",
        help="Simulate a slower interconnect: every tensor-parallel all-reduce takes at least US microseconds "
        "from issue to result (upstream's synchronous ones and the ladder's asynchronous ones alike; "
        "default 0, the real link; docs/ladder.md).",
    )
    spec = parser.add_argument_group(
        "turbo speculator", "the adaptive speculator of --speculative-algorithm TURBO (docs/adaptive_spec.md)"
    )
    spec.add_argument(
        "--turbo-controller", choices=POLICIES, default=None,
        help="auto (default): per round, the head with the higher recent accept length drafts, the lookahead "
        "follows acceptance, and plain decoding takes over while speculation is slower; static / adaptive: "
        "always that head at --speculative-num-steps, never falling back; plain: never speculate (plain "
        "decoding while the learner still trains on the traffic).",
    )
    spec.add_argument(
        "--turbo-speculator-dir", default=None, metavar="DIR",
        help="Where learned speculator versions are written (atomically) and restored from on restart "
        "(default: not persisted).",
    )
    spec.add_argument(
        "--turbo-replay-tokens", type=int, default=None, metavar="N",
        help="Replay buffer size in token positions; the oldest are evicted first (default 65536).",
    )
    spec.add_argument(
        "--turbo-update-interval", type=int, default=None, metavar="N",
        help="New replay positions between published speculator versions (default 1024).",
    )
    spec.add_argument(
        "--turbo-disable-learning", action="store_true",
        help="Serve TURBO without training: the static head, or the newest version restored from "
        "--turbo-speculator-dir, still chosen by the controller.",
    )


def build_parser(prog: str) -> argparse.ArgumentParser:
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser(
        prog=prog,
        description="Launch SGLang with the Turbo layer. Without --model-path, serves the embedded "
        f"model {DEFAULT_MODEL!r}.",
    )
    ServerArgs.add_cli_args(parser)
    add_turbo_args(parser)
    return parser


def _flag_value_index(argv: list[str], flags: tuple[str, ...]) -> list[tuple[int, str]]:
    """Positions of ``--flag VALUE`` / ``--flag=VALUE`` in argv for the given flags: (index, flag)."""
    hits = []
    for i, arg in enumerate(argv):
        name = arg.split("=", 1)[0]
        if name in flags:
            hits.append((i, name))
    return hits


def resolve_model_names(argv: list[str]) -> list[str]:
    """Replaces embedded model names (``turbo-tiny``...) by their shipped directories.

    A value that is an existing path is left alone, so a local directory named like
    an embedded model still wins.
    """
    known = set(zoo_names()) | set(PRESETS)
    out = list(argv)
    for i, flag in _flag_value_index(out, MODEL_PATH_FLAGS):
        if "=" in out[i]:
            value, write = out[i].split("=", 1)[1], (lambda v, i=i, f=flag: out.__setitem__(i, f"{f}={v}"))
        elif i + 1 < len(out):
            value, write = out[i + 1], (lambda v, i=i: out.__setitem__(i + 1, v))
        else:
            continue
        if value in known and not os.path.exists(value):
            write(str(zoo_path(value)))
    return out


def split_turbo_args(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[TurboServeConfig, list[str]]:
    """Parses argv with the full parser (exits with a clear error on a bad flag) and
    returns turbo's config plus argv without the turbo flags."""
    ns = parser.parse_args(argv)
    try:
        cfg = TurboServeConfig(
            kv_budget_gb=ns.turbo_kv_budget_gb, allreduce_delay_us=ns.turbo_allreduce_delay_us,
            speculator_dir=ns.turbo_speculator_dir,
            replay_tokens=ns.turbo_replay_tokens, update_interval=ns.turbo_update_interval,
            disable_learning=ns.turbo_disable_learning, controller=ns.turbo_controller,
        )
    except ValueError as e:
        parser.error(str(e))  # exits 2 with usage, like any other bad flag
    # Arity of every turbo flag, read from the parser so a new flag needs no change here.
    arity = {
        opt: (0 if action.nargs == 0 else 1)
        for action in parser._actions
        if action.dest.startswith("turbo_")
        for opt in action.option_strings
    }
    upstream_argv, i = [], 0
    while i < len(argv):
        name = argv[i].split("=", 1)[0]
        if name in arity:
            i += 1 + (arity[name] if "=" not in argv[i] else 0)
            continue
        upstream_argv.append(argv[i])
        i += 1
    return cfg, upstream_argv
