"""Model classes we add to SGLang's model registry (see docs/plugins.md).

Each module here defines ``EntryClass``; ``ModelRegistry.register("sglang_turbo.models", strict=True)``
maps its class name (a config.json architecture) to it. Registration is deferred to the first model
lookup: ``sglang.srt.models.registry`` imports every upstream model at import time, which only the
processes that load a model (the schedulers) should pay for.
"""

from __future__ import annotations

import functools

PACKAGE = __name__

# SEAM: the registry has no lazy entry point for an out-of-tree package other than the
# SGLANG_EXTERNAL_MODEL_PACKAGE variable (which would take the user's own); a BEFORE hook on the one
# function every model load goes through registers ours first.
ARCHITECTURE_TARGET = "sglang.srt.model_loader.utils.get_model_architecture"


@functools.cache
def register_models() -> None:
    """Adds our architectures to SGLang's ModelRegistry (once per process; strict: import errors raise)."""
    from sglang.srt.models.registry import ModelRegistry

    ModelRegistry.register(PACKAGE, strict=True)


def _before_get_model_architecture(model_config, *args, **kwargs):
    from ..graph_runner import route_draft_head

    register_models()
    route_draft_head(model_config)  # an EAGLE3 head under the CPU graphs' class override
    return None  # the same arguments, model_config possibly corrected in place


def register() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from . import llama_mamba2_config

    HookRegistry.register(ARCHITECTURE_TARGET, _before_get_model_architecture, HookType.BEFORE)
    # Configs are read in every process (the launcher resolves server arguments from them): registered now.
    llama_mamba2_config.register()
