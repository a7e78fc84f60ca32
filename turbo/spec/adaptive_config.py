"""The adaptive speculator's settings: one frozen dataclass, each field one ``--turbo-*`` flag."""

from __future__ import annotations

from dataclasses import dataclass

from .controller import POLICIES


@dataclass(frozen=True)
class AdaptiveSpecConfig:
    """How a TURBO server learns (flags in python/sglang_turbo/args.py, env in env.py).

    speculator_dir: where published versions persist and are restored from (None: no persistence);
    replay_tokens: positions the replay buffer holds (oldest evicted first);
    update_interval: new replay positions between published versions;
    learning: False serves the static head (and any restored version) without training;
    controller: ``auto`` lets turbo.spec.controller pick head and lookahead; ``static`` / ``adaptive``
    pin that head at the full lookahead with no fallback (for comparisons and tests); ``plain`` never
    speculates: plain decoding while the learner trains on what it verifies;
    topk: target log-probs kept per position, the learner's distillation target.
    """

    speculator_dir: str | None = None  # --turbo-speculator-dir
    replay_tokens: int = 65_536  # --turbo-replay-tokens
    update_interval: int = 1024  # --turbo-update-interval
    learning: bool = True  # --turbo-disable-learning sets False
    controller: str = "auto"  # --turbo-controller: auto | static | adaptive (fixed head, full lookahead) | plain
    topk: int = 8

    def __post_init__(self) -> None:
        if self.controller not in POLICIES:
            raise ValueError(f"--turbo-controller must be one of {', '.join(POLICIES)}, got {self.controller!r}")
        if self.replay_tokens < 64:
            raise ValueError(f"--turbo-replay-tokens must be >= 64, got {self.replay_tokens}")
        if self.update_interval < 1:
            raise ValueError(f"--turbo-update-interval must be >= 1 token, got {self.update_interval}")
        if self.update_interval > self.replay_tokens:
            raise ValueError(
                f"--turbo-update-interval {self.update_interval} exceeds --turbo-replay-tokens "
                f"{self.replay_tokens}: a version would train on data already evicted; lower the interval"
            )
