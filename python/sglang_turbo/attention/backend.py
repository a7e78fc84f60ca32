"""``turbo_native``: SGLang attention backend that runs turbo/attention/paged.py.

Registered through SGLang's attention registry (``--attention-backend turbo_native``)
and the portable CPU platform's default. Only wiring lives here: it turns a
``ForwardBatch`` into a :class:`turbo.attention.paged.PagedBatch` once per
forward and calls :func:`turbo.attention.paged.paged_attention` per layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
from sglang.srt.layers.radix_attention import AttentionType
from sglang.srt.mem_cache.memory_pool import KVWriteLoc

from turbo.attention.paged import GatherWorkspace, PagedBatch, paged_attention

from . import BACKEND_NAME

if TYPE_CHECKING:
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch
    from sglang.srt.model_executor.model_runner import ModelRunner


class TurboNativeAttnBackend(AttentionBackend):
    """Batched torch-native attention for extend (prefill) and decode."""

    def __init__(self, model_runner: ModelRunner):
        super().__init__()
        self.device = model_runner.device
        self.req_to_token_pool = model_runner.req_to_token_pool
        self.token_to_kv_pool = model_runner.token_to_kv_pool
        self._layout: tuple[list[int], list[int], torch.Tensor] | None = None
        self._batches: dict[tuple[int, bool], PagedBatch] = {}
        self._workspace = GatherWorkspace()  # this runner's gathered K/V, reused by every layer

    # ------------------------------------------------------------------ per forward
    def init_forward_metadata(self, forward_batch: ForwardBatch):
        mode = forward_batch.forward_mode
        kv_lens = forward_batch.seq_lens_cpu.tolist()
        if mode.is_decode():
            q_lens = [1] * len(kv_lens)
        elif mode.is_extend():
            q_lens = list(forward_batch.extend_seq_lens_cpu)
        else:
            raise NotImplementedError(
                f"{BACKEND_NAME} does not serve forward mode {mode.name} yet; "
                "use --attention-backend torch_native for it"
            )
        self._layout = (q_lens, kv_lens, forward_batch.req_pool_indices)
        self._batches.clear()  # built lazily per (group, causal), shared by all layers

    def _paged_batch(self, group: int, causal: bool) -> PagedBatch:
        key = (group, causal)
        if key not in self._batches:
            q_lens, kv_lens, pool_indices = self._layout
            self._batches[key] = PagedBatch.build(
                self.req_to_token_pool.req_to_token, pool_indices, q_lens, kv_lens, group, causal
            )
        return self._batches[key]

    # ------------------------------------------------------------------ per layer
    def _forward(self, q, k, v, layer: RadixAttention, forward_batch: ForwardBatch, save_kv_cache: bool):
        if layer.is_cross_attention or (layer.sliding_window_size is not None and layer.sliding_window_size > -1):
            raise NotImplementedError(
                f"{BACKEND_NAME} serves full self-attention only (layer {layer.layer_id} is "
                "cross- or sliding-window attention); use --attention-backend torch_native"
            )
        if save_kv_cache and k is not None and v is not None:
            self.token_to_kv_pool.set_kv_buffer(layer, KVWriteLoc(forward_batch.out_cache_loc, None), k, v)
        causal = layer.attn_type != AttentionType.ENCODER_ONLY
        batch = self._paged_batch(layer.tp_q_head_num // layer.tp_k_head_num, causal)
        out = paged_attention(
            q.view(-1, layer.tp_q_head_num, layer.qk_head_dim),
            self.token_to_kv_pool.get_key_buffer(layer.layer_id),
            self.token_to_kv_pool.get_value_buffer(layer.layer_id),
            batch,
            layer.scaling,
            self._workspace,
        )
        return out.reshape(-1, layer.tp_q_head_num * layer.v_head_dim)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        return self._forward(q, k, v, layer, forward_batch, save_kv_cache)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        return self._forward(q, k, v, layer, forward_batch, save_kv_cache)

    def support_triton(self):
        return False
