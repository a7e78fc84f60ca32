"""Mamba2's ops on the portable platform: SGLang's ``MambaMixer2`` runs turbo/hybrid/varlen_ops.py's
PyTorch ops instead of its Triton and CUDA kernels.

| name ``MambaMixer2.forward`` calls | on CUDA | here | seam |
| --- | --- | --- | --- |
| ``mamba_chunk_scan_combined`` (prefill scan) | Triton | ``varlen_ops.mamba_chunk_scan_combined`` | HookRegistry REPLACE on the defining module |
| ``selective_state_update`` (decode step) | Triton / FlashInfer | ``varlen_ops.selective_state_update`` | HookRegistry REPLACE on the defining module |
| ``causal_conv1d_fn`` (prefill conv) | CUDA JIT | ``varlen_ops.causal_conv1d_fn`` | setattr on ``mamba.mamba`` |
| ``causal_conv1d_update`` (decode conv) | CUDA JIT | ``varlen_ops.causal_conv1d_update`` | setattr on ``mamba.mamba`` |

Why two seams: the scan and the state update are real functions in every process, so REPLACE rebinds
them and every copy (``mamba.mamba`` imports them by name). The conv functions are imported by
``mamba.mamba`` only under ``if is_cuda() / is_npu() / is_xpu()``, so on this platform the names do not
exist and there is nothing for a hook to resolve; they are set on that module, and only where absent.
The gated RMSNorm needs nothing: SGLang's ``Mixer2RMSNormGated`` dispatches to its torch-native form on an
out-of-tree platform. Nothing here runs when a GPU platform is active.
"""

from __future__ import annotations

import functools
import importlib
import logging

from turbo.hybrid import varlen_ops

logger = logging.getLogger(__name__)

# SEAM: HookRegistry REPLACE; applied by load_plugins right after our register().
REPLACE_HOOKS = {
    "sglang.kernels.ops.mamba.triton_ops.ssd_combined.mamba_chunk_scan_combined": varlen_ops.mamba_chunk_scan_combined,
    "sglang.kernels.ops.mamba.triton_ops.ssu_dispatch.selective_state_update": varlen_ops.selective_state_update,
}

# SEAM: names absent on a non-CUDA/NPU/XPU machine, set on the module whose functions look them up.
MIXER_MODULE = "sglang.srt.layers.attention.mamba.mamba"
ABSENT_NAMES = {
    "causal_conv1d_fn": varlen_ops.causal_conv1d_fn,
    "causal_conv1d_update": varlen_ops.causal_conv1d_update,
}


def register() -> None:
    """Registers the REPLACE hooks (the portable platform's plugin ``register`` calls this)."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    for target, ours in REPLACE_HOOKS.items():
        HookRegistry.register(target, ours, HookType.REPLACE)


@functools.cache
def bind_conv_ops() -> None:
    """Sets the conv names on SGLang's mixer module where they are absent (once per process; the hybrid
    model calls it as it is built on the portable platform)."""
    module = importlib.import_module(MIXER_MODULE)
    for name, ours in ABSENT_NAMES.items():
        if getattr(module, name, None) is None:
            setattr(module, name, ours)
        else:
            logger.warning("%s.%s exists on this platform; keeping SGLang's", MIXER_MODULE, name)
