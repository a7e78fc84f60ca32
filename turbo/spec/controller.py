"""Which head drafts and how far ahead: decided each round from what speculation measurably buys.

ATLAS's idea, made concrete for a server whose cost per round we can only measure, not predict:

1. Each head's quality is its per-draft acceptance ``p``: a round that accepted ``a`` of ``s``
   drafts saw ``a`` accepted drafts and, when ``a < s``, one rejected; ``p`` = EMA(accepted) /
   EMA(accepted + rejected). Unlike the accept length, this does not depend on the lookahead the
   round ran with, so heads measured at different lookaheads compare fairly. Reported accept
   length = ``1 + p + ... + p^max_steps`` (what the head would give at the full lookahead).
2. Two heads draft the same way: ``static`` (the shipped head) and ``adaptive`` (the learner's
   newest version, once one exists). The head with the higher ``p`` drafts; the other is probed
   for a few rounds every ``probe_every`` rounds, and a switch needs a ``head_margin`` lead in
   accept length (hysteresis, so noise does not flip heads every probe).
3. Lookahead: ``round(p / (1 - p)) + 1`` steps (one beyond the expected run of accepted drafts),
   within ``[1, max_steps]`` (the user's ``--speculative-num-steps``); probes run at ``max_steps``.
4. Fail-safe: the controller measures output tokens per second per request in speculative rounds
   and in plain rounds (lookahead 0: the target verifies only its own last token, i.e. a plain
   decode step). When speculation is slower than plain decoding by ``fallback_margin`` it falls
   back to plain decoding and probes speculation again: when a request starts decoding (its
   draft state is whole then: a server that skips the draft's catch-up in plain rounds leaves
   holes in the draft KV of requests decoded plainly, which would make a mid-request probe read
   low), at most every ``request_probe_gap`` rounds, and otherwise every ``fallback_probe_every``.
   Plain decoding is itself re-measured every ``plain_probe_every`` rounds (load changes it).
   Each rate is the tokens over the time of the last ``rate_window`` timed rounds of its kind,
   recent ones weighted more, stalls left out, and a round that switches between plain and
   speculative decoding is not timed (it pays the switch: runtime state, the draft's catch-up).
   Both were measured to matter: an EMA of rates fed one 3.5 s stall held the plain rate at a
   tenth of its value for several probes, and plain rounds right after speculative ones read
   ~6 ms against ~3.5 ms in steady fallback, which tilted the comparison toward speculating.

Nothing here changes what is generated: verification decides every token. The controller only
sees accept counts and round times, so it is plain Python and tested without a server.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass

HEADS = ("static", "adaptive")
POLICIES = ("auto", "static", "adaptive", "plain")


@dataclass(frozen=True)
class ControllerConfig:
    max_steps: int  # the user's --speculative-num-steps: lookahead never exceeds it
    # acceptance figures; at 0.25 a lucky probe of a worse head took over in 5 of 20 seeds of
    # test_controller's simulated server, at 0.15 in 1 (0.1 was slower to follow and no steadier)
    ema_alpha: float = 0.15
    rate_window: int = 16  # timed rounds a tokens/s figure is taken over ...
    rate_decay: float = 0.85  # ... each weighted this much less than the next newer one
    warmup_rounds: int = 8  # rounds on the static head at max_steps before the first decision
    min_timed_rounds: int = 8  # timed speculative rounds of a head before it may be judged slower than plain
    probe_rounds: int = 3  # rounds per probe (the other head, plain decoding, or speculation in fallback)
    probe_every: int = 24  # rounds between probes of the head not drafting
    plain_probe_every: int = 96  # rounds between re-measurements of plain decoding while speculating
    fallback_probe_every: int = 256  # plain rounds before speculation is tried again mid-request
    request_probe_gap: int = 16  # fewest rounds between probes at request starts
    head_margin: float = 0.1  # accept-length lead the other head needs to take over
    fallback_margin: float = 0.05  # relative speed gap that enters (and, mirrored, leaves) fallback
    # "auto"; "static" / "adaptive": that head (static until a version exists), max_steps, no fallback;
    # "plain": never speculate (every round lookahead 0), the learner still fed by the plain rounds
    policy: str = "auto"

    def __post_init__(self) -> None:
        assert self.max_steps >= 1, f"max_steps must be >= 1 (--speculative-num-steps), got {self.max_steps}"
        assert 0.0 < self.ema_alpha <= 1.0, f"ema_alpha must be in (0, 1], got {self.ema_alpha}"
        # a probe's first round switches between plain and speculative decoding: it is not timed
        assert self.probe_rounds >= 2, f"probe_rounds must be >= 2, got {self.probe_rounds}"
        assert self.rate_window >= 1, f"rate_window must be >= 1, got {self.rate_window}"
        assert self.policy in POLICIES, f"policy must be one of {POLICIES}, got {self.policy!r}"


@dataclass(frozen=True)
class RoundPlan:
    head: str  # "static" or "adaptive"
    steps: int  # draft steps this round; 0 = plain decoding
    probe: bool = False  # a measurement round, not the current best choice


class _Ema:
    def __init__(self, alpha: float) -> None:
        self.alpha, self.value = alpha, None

    def update(self, x: float) -> None:
        self.value = x if self.value is None else (1 - self.alpha) * self.value + self.alpha * x


class _RoundRate:
    """Output tokens per second of a kind of round: its last ``window`` timed rounds' tokens over
    their time, each round weighted by ``decay`` per newer round (recent load counts most), and
    stalls left out: rounds over ``STALL_FACTOR`` times the lower median time (a GC pause, a weight
    swap, a graph compile), which would otherwise weigh like hundreds of rounds."""

    STALL_FACTOR = 3.0

    def __init__(self, decay: float, window: int) -> None:
        self.decay = decay
        self.rounds: deque[tuple[float, float]] = deque(maxlen=window)

    def update(self, tokens: float, seconds: float) -> None:
        self.rounds.append((tokens, seconds))

    @property
    def value(self) -> float | None:
        if not self.rounds:
            return None
        limit = self.STALL_FACTOR * statistics.median_low(s for _, s in self.rounds)
        tokens = seconds = 0.0
        for age, (t, s) in enumerate(reversed(self.rounds)):
            if s <= limit:
                w = self.decay**age
                tokens, seconds = tokens + w * t, seconds + w * s
        return tokens / seconds


class SpeculatorController:
    """``plan()`` once per decode round, then ``observe()`` that round's outcome."""

    def __init__(self, cfg: ControllerConfig) -> None:
        self.cfg = cfg
        self.hits = {h: _Ema(cfg.ema_alpha) for h in HEADS}  # accepted drafts per request per round
        self.trials = {h: _Ema(cfg.ema_alpha) for h in HEADS}  # accepted + rejected drafts per request per round
        # output tokens / s / request, speculating with each head, and decoding plainly
        self.rate_spec = {h: _RoundRate(cfg.rate_decay, cfg.rate_window) for h in HEADS}
        self.rate_plain = _RoundRate(cfg.rate_decay, cfg.rate_window)
        self._last_steps: int | None = None  # lookahead of the previous observed round
        self.timed_rounds = {h: 0 for h in HEADS}  # speculative rounds whose time was measured
        self.head = "static"
        self.fallback = False
        self.adaptive_ready = False
        self.rounds = 0
        self._probe: list[RoundPlan] = []  # queued measurement rounds
        self._last_head_probe = 0
        self._last_plain_probe = 0
        self._fallback_since = 0
        self._fallback_probe_head = "adaptive"
        self._request_started = False

    # ------------------------------------------------------------------ inputs

    def set_adaptive_ready(self, ready: bool = True) -> None:
        """A new adaptive version is in place (published or restored): measure it at the next
        opportunity. Its predecessor's figure is kept as the starting point (versions follow each
        other closely; forgetting it left each version with a few noisy probe rounds, measured)."""
        self.adaptive_ready = ready
        self._last_head_probe = -self.cfg.probe_every
        if not ready and self.head == "adaptive":
            self.head = "static"

    def note_request_start(self) -> None:
        """A request was prefilled: its next rounds draft from a whole draft state."""
        self._request_started = True

    def observe(self, plan: RoundPlan, accepted_drafts: list[int], seconds: float | None) -> None:
        """One round's outcome: accepted drafts per request and, when the round was timed back to
        back with the next one, its wall time (None: not comparable, e.g. a prefill ran between)."""
        if not accepted_drafts:
            return
        mean_accepted = sum(accepted_drafts) / len(accepted_drafts)
        if plan.steps > 0:
            rejected = sum(1 for a in accepted_drafts if a < plan.steps) / len(accepted_drafts)
            self.hits[plan.head].update(mean_accepted)
            self.trials[plan.head].update(mean_accepted + rejected)
        switched = self._last_steps is not None and (self._last_steps > 0) != (plan.steps > 0)
        self._last_steps = plan.steps
        if seconds is not None and seconds > 0 and not switched:
            rate = self.rate_spec[plan.head] if plan.steps > 0 else self.rate_plain
            rate.update(mean_accepted + 1, seconds)
            if plan.steps > 0:
                self.timed_rounds[plan.head] += 1
        if self.cfg.policy == "auto" and (not plan.probe or not self._probe):
            self._decide()

    # ------------------------------------------------------------------ decision

    def plan(self) -> RoundPlan:
        self.rounds += 1
        if self.cfg.policy == "plain":
            return RoundPlan(self.head, 0)
        if self.cfg.policy != "auto":
            head = "adaptive" if self.cfg.policy == "adaptive" and self.adaptive_ready else "static"
            self.head = head
            return RoundPlan(head, self.cfg.max_steps)
        if self.rounds <= self.cfg.warmup_rounds:
            return RoundPlan("static", self.cfg.max_steps, probe=True)
        if self._probe:
            return self._probe.pop(0)
        if self.fallback:
            unmeasured = self.adaptive_ready and self.p("adaptive") is None
            since = self.rounds - self._fallback_since
            at_request_start, self._request_started = self._request_started, False
            if (at_request_start and (unmeasured or since >= self.cfg.request_probe_gap)) \
                    or since >= self.cfg.fallback_probe_every:
                self._fallback_since = self.rounds
                # alternate the probed head, so a head that became good is found whichever it is
                head = self._other(self._fallback_probe_head) if self.adaptive_ready else "static"
                head = "adaptive" if unmeasured else head
                self._fallback_probe_head = head
                self._queue(RoundPlan(head, self.cfg.max_steps, probe=True))
                return self._probe.pop(0)
            return RoundPlan(self.head, 0)
        if self.rate_plain.value is None or self.rounds - self._last_plain_probe >= self.cfg.plain_probe_every:
            self._last_plain_probe = self.rounds
            self._queue(RoundPlan(self.head, 0, probe=True))
            return self._probe.pop(0)
        other = self._other(self.head)
        if self.adaptive_ready and self.rounds - self._last_head_probe >= self.cfg.probe_every:
            self._last_head_probe = self.rounds
            self._queue(RoundPlan(other, self.cfg.max_steps, probe=True))
            return self._probe.pop(0)
        return RoundPlan(self.head, self._lookahead(self.head))

    def _queue(self, plan: RoundPlan) -> None:
        self._probe = [plan] * self.cfg.probe_rounds

    def p(self, head: str) -> float | None:
        """Per-draft acceptance of ``head`` (None before it has drafted)."""
        hits, trials = self.hits[head].value, self.trials[head].value
        if hits is None or not trials:
            return None if hits is None else 1.0
        return hits / trials

    def accept_length(self, head: str) -> float | None:
        """Expected tokens per round at the full lookahead, from ``p``."""
        p = self.p(head)
        return None if p is None else 1.0 + sum(p**i for i in range(1, self.cfg.max_steps + 1))

    def _lookahead(self, head: str) -> int:
        p = self.p(head)
        if p is None or p >= 0.999:
            return self.cfg.max_steps
        return max(1, min(self.cfg.max_steps, round(p / (1 - p)) + 1))

    @staticmethod
    def _other(head: str) -> str:
        return "adaptive" if head == "static" else "static"

    def _decide(self) -> None:
        # 1. the better head, with hysteresis
        if self.adaptive_ready:
            other = self._other(self.head)
            mine, theirs = self.accept_length(self.head), self.accept_length(other)
            if theirs is not None and (mine is None or theirs > mine + self.cfg.head_margin):
                self.head = other
        # 2. speculate or not, mirrored margins so one noisy round does not toggle
        spec, plain = self.rate_spec[self.head].value, self.rate_plain.value
        if spec is None or plain is None:
            return
        if not self.fallback and self.timed_rounds[self.head] < self.cfg.min_timed_rounds:
            return  # too few rounds to call speculation slower
        if not self.fallback and spec < plain * (1 - self.cfg.fallback_margin):
            self.fallback, self._fallback_since = True, self.rounds
        elif self.fallback and spec > plain * (1 + self.cfg.fallback_margin):
            self.fallback = False

    # ------------------------------------------------------------------ readout

    @property
    def mode(self) -> str:
        return "fallback" if self.fallback or self.cfg.policy == "plain" else self.head

    def status(self) -> dict:
        def r(x):
            return None if x is None else round(x, 4)

        return {
            "mode": self.mode,
            "lookahead": 0 if self.mode == "fallback" else self._lookahead(self.head),
            "max_steps": self.cfg.max_steps,
            "rounds": self.rounds,
            "accept_length": {h: r(self.accept_length(h)) for h in HEADS},
            "draft_acceptance": {h: r(self.p(h)) for h in HEADS},
            "tokens_per_s_per_request": {**{h: r(e.value) for h, e in self.rate_spec.items()},
                                         "plain": r(self.rate_plain.value)},
        }
