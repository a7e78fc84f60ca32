"""CPU graphs for a STANDALONE draft's decode steps on the portable platform.

SEAM: ``EagleDraftWorker._capture_cuda_graphs`` (sglang/srt/speculative/eagle_worker_v2.py) captures
the draft's graphs, and returns at once on a CPU. An AROUND hook runs it, then compiles the draft
model's body with the CPU graph runner (``graph_runner.compile_draft_decode``: only under CPU graphs,
only for a draft served by the traceable Llama class, once). The draft worker's steps keep calling
the draft's model runner as upstream wrote them; the model hands DECODE forwards to the graphs.
"""

from __future__ import annotations

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

CAPTURE_TARGET = "sglang.srt.speculative.eagle_worker_v2.EagleDraftWorker._capture_cuda_graphs"


def _around_capture(original, worker, *args, **kwargs):
    from ..graph_runner import compile_draft_decode

    result = original(worker, *args, **kwargs)
    compile_draft_decode(worker.draft_runner)
    return result


def register() -> None:
    HookRegistry.register(CAPTURE_TARGET, _around_capture, HookType.AROUND)
