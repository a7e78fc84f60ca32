"""What a TURBO server reports: ``GET /turbo/speculator`` (JSON) and ``sglang_turbo_*`` on ``/metrics``.

The figures live in the scheduler process (``TurboEagle3Worker.turbo_status``); the HTTP server
runs in the launcher process, where a BEFORE hook on ``http_server.launch_server`` adds the route. They meet through upstream's internal-state request (the one behind
``/server_info``): SEAM, an AFTER hook on ``Scheduler.get_internal_state`` adds our entry, because
upstream has no registry for scheduler-side status. ``/metrics`` needs no round trip: the
scheduler sets Prometheus gauges in multiprocess mode, which upstream's ``/metrics`` collects.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

STATUS_KEY = "turbo_speculator"
ROUTE = "/turbo/speculator"
INTERNAL_STATE_TARGET = "sglang.srt.managers.scheduler.Scheduler.get_internal_state"

MODES = ("static", "adaptive", "fallback")


def _add_turbo_status(result, scheduler, *args, **kwargs):
    status = getattr(scheduler.draft_worker, "turbo_status", None)
    if status is not None:
        result.internal_state[STATUS_KEY] = status()
    return result


async def _speculator_endpoint():
    from fastapi.responses import JSONResponse
    from sglang.srt.entrypoints.http_server import _global_state

    states = await _global_state.tokenizer_manager.get_internal_state()
    found = [s[STATUS_KEY] for s in states if STATUS_KEY in s]
    if not found:
        return JSONResponse(
            {"error": "this server does not run --speculative-algorithm TURBO"}, status_code=404
        )
    return found[0] if len(found) == 1 else {"ranks": found}


def _before_launch_server(*args, **kwargs):
    from sglang.srt.entrypoints import http_server

    if not any(getattr(r, "path", None) == ROUTE for r in http_server.app.routes):
        http_server.app.add_api_route(ROUTE, _speculator_endpoint, methods=["GET"])


# SEAM: the FastAPI app is a module global built at import; launch_server is the last public call
# before it serves (the same seam as validation.py's middleware).
LAUNCH_TARGET = "sglang.srt.entrypoints.http_server.launch_server"


def register() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(INTERNAL_STATE_TARGET, _add_turbo_status, HookType.AFTER)
    HookRegistry.register(LAUNCH_TARGET, _before_launch_server, HookType.BEFORE)


class SpeculatorGauges:
    """``sglang_turbo_*`` Prometheus series; created only with ``--enable-metrics`` (upstream has set
    ``PROMETHEUS_MULTIPROC_DIR`` by then, so the launcher's ``/metrics`` collects them)."""

    def __init__(self) -> None:
        from prometheus_client import Gauge

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()):
            return Gauge(f"sglang_turbo_{name}", doc, labelnames=labels, multiprocess_mode="mostrecent")

        self.version = gauge("speculator_version", "Published adaptive speculator version in use.")
        self.mode = gauge("speculator_mode", "1 for the controller's current mode.", ("mode",))
        self.accept_length = gauge("accept_length", "Recent accept length (tokens per verify round).", ("head",))
        self.lookahead = gauge("lookahead", "Draft steps per round (0 in fallback).")
        self.replay_tokens = gauge("replay_buffer_tokens", "Positions held by the replay buffer.")
        self.learner_steps = gauge("learner_steps", "Optimizer steps the learner has run.")
        self.learner_alive = gauge("learner_alive", "1 while the learner is running and responsive.")

    def update(self, status: dict) -> None:
        self.version.set(status["version"])
        for mode in MODES:
            self.mode.labels(mode=mode).set(1.0 if status["mode"] == mode else 0.0)
        for head, value in status["accept_length"].items():
            if value is not None:
                self.accept_length.labels(head=head).set(value)
        self.lookahead.set(status["lookahead"])
        self.replay_tokens.set(status["replay_buffer_tokens"])
        self.learner_steps.set(status["learner_steps"])
        self.learner_alive.set(1.0 if status["learner_alive"] else 0.0)
