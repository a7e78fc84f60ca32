"""SGLang wiring of speculative decoding on the portable platform (map: docs/speculative.md).

Upstream's EAGLE / EAGLE3 / STANDALONE / NGRAM workers run unchanged; what is swapped is
what cannot run without CUDA or Triton: the draft attention backends, the KV pool's copy,
and the tree / verify / cache-location kernels (plain PyTorch from ``turbo.spec``).
"""

from __future__ import annotations

# Algorithms the portable platform serves (SRTPlatform.supports_speculative_algorithm).
SUPPORTED_ALGORITHMS = frozenset({"EAGLE", "EAGLE3", "STANDALONE", "NGRAM", "TURBO"})

# SEAM: upstream wraps the per-step top-k of tree drafting in torch.compile (Inductor). On a CPU
# that means a C++ build at the first request (over a minute on 2 cores, and a compiler to
# install) for ~10 tensor ops; we run upstream's own function eagerly instead.
TOPK_TARGET = "sglang.srt.speculative.spec_utils._select_top_k_tokens_later"


def _eager(compiled):
    return getattr(compiled, "_torchdynamo_orig_callable", compiled)


def register_algorithm() -> None:
    """``--speculative-algorithm TURBO`` (every platform: on CUDA it runs on upstream's kernels)."""
    from . import algorithm, observability

    algorithm.register()
    observability.register()


def register() -> None:
    """What upstream's speculative workers need on the portable platform."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType
    from sglang.srt.speculative import spec_utils

    from . import draft_backends, draft_graphs, kernels

    draft_backends.register()
    draft_graphs.register()
    kernels.install_kernel_fallbacks()
    HookRegistry.register(TOPK_TARGET, _eager(spec_utils._select_top_k_tokens_later), HookType.REPLACE)
