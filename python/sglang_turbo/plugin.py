"""The one registration door: SGLang calls :func:`register` (entry point group
``sglang.srt.plugins``, name ``turbo``) once in every process it starts.

Every name we hand SGLang is listed in docs/plugins.md.
"""

from __future__ import annotations

import functools


def portable_platform_active() -> bool:
    """True in processes where SGLang runs on our TurboCpuPlatform (not CUDA, not upstream's CPU engine)."""
    from sglang.srt.platforms import current_platform

    from .platform import TurboCpuPlatform

    return isinstance(current_platform, TurboCpuPlatform)


@functools.cache  # SGLang calls this in every process; a second call is a no-op
def register() -> None:
    from . import attention, distributed, models, speculative, threads, validation
    from .models import mamba_ops

    attention.register()  # --attention-backend turbo_native
    models.register()  # LadderLlamaForCausalLM, LlamaMamba2ForCausalLM (+ its config, in every process)
    distributed.register()  # --turbo-allreduce-delay-us: the simulated slow interconnect
    validation.register()  # request checks upstream lacks
    speculative.register_algorithm()  # --speculative-algorithm TURBO
    if portable_platform_active():
        speculative.register()  # draft backends and torch kernels for the speculative workers
        mamba_ops.register()  # torch Mamba2 ops for the hybrid's mixers
        threads.register()  # small decode steps and the scheduler's bookkeeping on one thread
