"""Draft-model attention for EAGLE / EAGLE3 / STANDALONE on the portable platform.

SEAM: ``DraftBackendFactory`` (sglang/srt/speculative/draft_utils.py) picks the draft
runner's backends from a hard-coded map of upstream names and raises "EAGLE is not
supported in decode attention backend turbo_native" for anything else. An AROUND hook on
its ``_create_backend`` adds our entry to the map it is given; every other backend name
goes through untouched.
"""

from __future__ import annotations

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from ..attention import BACKEND_NAME

FACTORY_TARGET = "sglang.srt.speculative.draft_utils.DraftBackendFactory._create_backend"


def _turbo_entry(factory, backend_name: str):
    """The (stamp, backend) maker SGLang's map expects, for the decode or the extend role."""
    from ..attention.backend import TurboNativeAttnBackend, TurboNativeMultiStepDraftBackend

    runner = factory.draft_model_runner
    if backend_name == "decode_attention_backend":
        return lambda: (
            BACKEND_NAME,
            TurboNativeMultiStepDraftBackend(runner, factory.topk, factory.speculative_num_steps),
        )
    return lambda: (BACKEND_NAME, TurboNativeAttnBackend(runner))


def _around_create_backend(original, factory, backend_name, backend_map, error_template, *args, **kwargs):
    backend_map = {**backend_map, BACKEND_NAME: _turbo_entry(factory, backend_name)}
    return original(factory, backend_name, backend_map, error_template, *args, **kwargs)


def register() -> None:
    HookRegistry.register(FACTORY_TARGET, _around_create_backend, HookType.AROUND)
