"""The KV pool of the portable platform: upstream's MHA pool without its Triton KV copy.

Speculative decoding builds its pools with ``enable_kv_cache_copy`` so that accepted tree
nodes can be moved to the front of the request's slots. Upstream prepares (and warms up,
at construction) a Triton tiled copy for that; on a CPU without Triton it cannot run.
SEAM: ``SRTPlatform.get_kv_pool_cls(kind="mha")`` hands SGLang this subclass, whose
move is upstream's own indexed copy (``move_kv_cache_native``).
"""

from __future__ import annotations

import torch
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, move_kv_cache_native


class TurboMHATokenToKVPool(MHATokenToKVPool):
    def _init_kv_copy_and_warmup(self) -> None:
        self._kv_copy_config = None  # no Triton copy to configure or warm up

    def _move_kv_cache_impl(self, tgt_loc: torch.Tensor, src_loc: torch.Tensor) -> None:
        move_kv_cache_native(self.k_buffer, self.v_buffer, tgt_loc, src_loc)
