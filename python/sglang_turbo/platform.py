"""The portable CPU platform: unmodified SGLang serving on a machine without CUDA.

SGLang finds this module through its platform entry point (group
``sglang.srt.platforms``, name ``turbo_cpu``) and calls :func:`activate` in every
process. On a machine with an accelerator it returns None, so upstream's own
platform (CUDA, ROCm, ...) is chosen exactly as without sglang-turbo.

Why an out-of-tree platform rather than upstream's ``CpuSRTPlatform``: the
in-tree CPU engine is built around sgl_kernel's CPU ops (``intel_amx``
attention, fused MoE, thread binding), which the PyPI wheel does not ship.
``PlatformEnum.OOT`` keeps SGLang off those paths; the device-level answers
(memory from psutil, gloo, no pinned memory) come from upstream's
``CpuDeviceMixin``, so we do not restate them.
"""

from __future__ import annotations

import logging

from sglang.srt.platforms.cpu import CpuDeviceMixin
from sglang.srt.platforms.device_mixin import PlatformEnum
from sglang.srt.platforms.interface import PlatformCapabilities, SRTPlatform

from . import env
from .cpu_defaults import apply_cpu_defaults

logger = logging.getLogger(__name__)

PLATFORM_QUALNAME = "sglang_turbo.platform.TurboCpuPlatform"


def accelerator_present() -> bool:
    """True when upstream SGLang has a platform of its own for this machine."""
    import torch

    if torch.cuda.is_available():  # CUDA and ROCm
        return True
    for name in ("xpu", "npu", "mps"):
        module = getattr(torch, name, None)
        if module is not None and getattr(module, "is_available", lambda: False)():
            return True
    return False


def activate() -> str | None:
    """Entry point of group ``sglang.srt.platforms``: our platform's qualname, or None to stand aside.

    Stands aside when an accelerator is present, when the user asked for
    upstream's own CPU engine (``SGLANG_USE_CPU_ENGINE=1``), or when
    ``SGLANG_TURBO_PLATFORM=off``.
    """
    if not env.platform_enabled() or env.upstream_cpu_engine_requested():
        return None
    if accelerator_present():
        return None
    return PLATFORM_QUALNAME


class TurboCpuPlatform(CpuDeviceMixin, SRTPlatform):
    """SGLang's SRT platform for a plain CPU, in torch-native code only."""

    _enum = PlatformEnum.OOT
    device_name = "cpu"
    device_type = "cpu"
    # No Triton: every kernel path SGLang picks is torch-native. graph_capture lets
    # --enable-torch-compile reach get_graph_runner_cls (our compiled decode, graph_runner.py);
    # without that flag SGLang captures nothing on CPU.
    capabilities = PlatformCapabilities(graph_capture=True)

    def is_pin_memory_available(self, device=None) -> bool:
        return False

    def get_device(self, device_id: int = 0) -> str:
        # A string: server-args resolution strips an index with ``.split(":")``.
        return "cpu"

    def init_backend(self) -> None:
        """Runs once in each scheduler process, before the model loads."""
        import torch

        torch.set_num_threads(env.torch_threads())

    def get_default_attention_backend(self) -> str:
        from .attention import BACKEND_NAME

        return BACKEND_NAME  # batched; upstream's torch_native loops over requests in Python

    def get_default_speculative_draft_attention_backend(self, algorithm: str) -> str:
        return self.get_default_attention_backend()

    # ------------------------------------------------------------------ speculative decoding
    def supports_speculative_algorithm(self, algorithm: str) -> bool:
        from .speculative import SUPPORTED_ALGORITHMS

        return algorithm.upper() in SUPPORTED_ALGORITHMS

    def get_graph_runner_cls(self):
        """Decode through torch.compile under ``--enable-torch-compile`` (graph_runner.py), else None.

        None matters: SGLang also asks here outside plain decode (the adaptive EAGLE runtime builds
        a target-verify runner whenever ``graph_capture`` is set), and None runs those eagerly."""
        from sglang.srt.runtime_context import get_flags

        if not get_flags().capture.enable_torch_compile:
            return None
        from .graph_runner import TurboCpuGraphRunner

        return TurboCpuGraphRunner

    def get_kv_pool_cls(self, *, kind):
        if kind != "mha":
            return None
        from .speculative.kv_pool import TurboMHATokenToKVPool

        return TurboMHATokenToKVPool  # upstream's pool minus the Triton KV copy speculation sets up

    def get_speculative_cache_locs_fn(self):
        from turbo.spec.cache_ops import assign_extend_cache_locs

        return assign_extend_cache_locs

    def apply_server_args_defaults(self, server_args) -> None:
        apply_cpu_defaults(server_args)

    def get_dispatch_key_name(self) -> str:
        return "native"
