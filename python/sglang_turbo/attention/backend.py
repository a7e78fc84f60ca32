"""``turbo_native``: SGLang attention backend that runs turbo/attention/paged.py.

Registered through SGLang's attention registry (``--attention-backend turbo_native``)
and the portable CPU platform's default. Only wiring lives here: it turns a
``ForwardBatch`` into a :class:`turbo.attention.paged.PagedBatch` once per
forward and calls :func:`turbo.attention.paged.paged_attention` per layer.

Under ``--enable-torch-compile`` (CPU graphs: the decode forward compiled at start-up,
sglang_turbo/graph_runner.py) a layer's attention is the opaque op
``turbo::paged_attention``: its layout changes every step (request lengths, slots),
so it must run eagerly, read at call time, while everything around it (projections,
rotary, norms, MLP) is fused by inductor.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
from sglang.srt.layers.radix_attention import AttentionType
from sglang.srt.mem_cache.memory_pool import KVWriteLoc

from turbo import kernels
from turbo.attention.paged import GatherWorkspace, PagedBatch, block_mask_from_full_layout, paged_attention

from .. import env
from . import BACKEND_NAME

if TYPE_CHECKING:
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch
    from sglang.srt.model_executor.model_runner import ModelRunner

logger = logging.getLogger(__name__)


@dataclass
class BatchLayout:
    """What one forward's attention needs besides the layers' tensors (see PagedBatch)."""

    q_lens: list[int]
    kv_lens: list[int]
    kv_slots: torch.Tensor  # (bsz, >= max(kv_lens)) pool slots of each row's keys
    block_mask: torch.Tensor | None = None  # (bsz, q, q) draft-tree visibility, verify only
    out_cache_loc: torch.Tensor | None = None  # where this forward's new K/V go (read by the compiled op)


# Layers by KV pool and layer id, for the compiled op (a graph can hold ints, not modules). Shared by all
# backends over one pool: a draft's per-step backends serve the same layers.
_LAYERS_BY_POOL: "weakref.WeakKeyDictionary[object, dict[int, RadixAttention]]" = weakref.WeakKeyDictionary()


class TurboNativeAttnBackend(AttentionBackend):
    """Batched torch-native attention for every forward mode SGLang's workers use.

    extend / decode (plain serving), and for speculative decoding: TARGET_VERIFY (the draft
    tokens over the committed prefix, with the draft tree's mask), DRAFT_EXTEND_V2 (the draft
    model re-reading the accepted window). Multi-step draft decoding is
    :class:`TurboNativeMultiStepDraftBackend`, one of these per step.
    """

    def __init__(self, model_runner: ModelRunner):
        super().__init__()
        self.device = model_runner.device
        self.req_to_token_pool = model_runner.req_to_token_pool
        self.token_to_kv_pool = model_runner.token_to_kv_pool
        # Read by EAGLE's tree build to size a full-layout mask when it has no seq_lens_sum.
        self.max_context_len = model_runner.model_config.context_len
        self._layout: BatchLayout | None = None
        self._batches: dict[tuple[int, bool], PagedBatch] = {}
        self._workspace = GatherWorkspace()  # this runner's gathered K/V, reused by every layer
        self._layers = _LAYERS_BY_POOL.setdefault(self.token_to_kv_pool, {})  # by layer id, for the compiled op
        # Long-context decode attention runs on every thread the process has (see attention_threads).
        self._process_threads = torch.get_num_threads()
        self._parallel_keys = env.parallel_attention_keys()
        self._wide_attention = False
        self._logged_wide = False
        if str(self.device) == "cpu":
            kernels.cpu_kernels_available()  # build the decode kernel at start-up, not in the first request

    # ------------------------------------------------------------------ per forward
    def init_forward_metadata(self, forward_batch: ForwardBatch):
        mode = forward_batch.forward_mode
        if mode.is_idle():
            self.set_layout(None)
            return
        prefix_lens = _cpu_list(forward_batch.seq_lens_cpu, forward_batch.seq_lens)
        block_mask = None
        if mode.is_decode():
            q_lens, kv_lens = [1] * len(prefix_lens), prefix_lens
        elif mode.is_target_verify():
            spec = forward_batch.spec_info
            n_draft = spec.draft_token_num
            q_lens, kv_lens = [n_draft] * len(prefix_lens), [n + n_draft for n in prefix_lens]
            # A chain (tree_topk == 1) is exactly causal; trees (EAGLE topk > 1, NGRAM -1) need their mask.
            if getattr(spec, "tree_topk", -1) != 1 and spec.custom_mask is not None:
                block_mask = block_mask_from_full_layout(spec.custom_mask, prefix_lens, n_draft)
        elif mode.is_extend(include_draft_extend_v2=True):
            # forward_batch.seq_lens already counts the new tokens (DRAFT_EXTEND_V2 included).
            q_lens = _cpu_list(forward_batch.extend_seq_lens_cpu, forward_batch.extend_seq_lens)
            kv_lens = prefix_lens
        else:
            raise NotImplementedError(f"{BACKEND_NAME} does not serve forward mode {mode.name}")
        self._wide_attention = mode.is_decode() and max(kv_lens) >= self._parallel_keys
        kv_slots = self.req_to_token_pool.req_to_token[forward_batch.req_pool_indices, : max(kv_lens)]
        self.set_layout(BatchLayout(q_lens, kv_lens, kv_slots.to(torch.long), block_mask, forward_batch.out_cache_loc))

    def set_layout(self, layout: BatchLayout | None) -> None:
        self._layout = layout
        self._batches.clear()  # built lazily per (group, causal), shared by all layers

    def _paged_batch(self, group: int, causal: bool) -> PagedBatch:
        key = (group, causal)
        if key not in self._batches:
            lay = self._layout
            self._batches[key] = PagedBatch.from_slots(
                lay.kv_slots, lay.q_lens, lay.kv_lens, group, causal, lay.block_mask if causal else None
            )
        return self._batches[key]

    # ------------------------------------------------------------------ per layer
    def _forward(self, q, k, v, layer: RadixAttention, forward_batch: ForwardBatch, save_kv_cache: bool):
        if torch.compiler.is_compiling():
            out_width = layer.tp_q_head_num * layer.v_head_dim
            return torch.ops.turbo.paged_attention(q, k, v, layer.layer_id, out_width, save_kv_cache)
        self._layers[layer.layer_id] = layer  # the graph runner's eager warm-up fills this before compiling
        return self._attend(q, k, v, layer, forward_batch.out_cache_loc, save_kv_cache)

    def _attend(self, q, k, v, layer: RadixAttention, out_cache_loc: torch.Tensor, save_kv_cache: bool):
        if layer.is_cross_attention or (layer.sliding_window_size is not None and layer.sliding_window_size > -1):
            raise NotImplementedError(
                f"{BACKEND_NAME} serves full self-attention only (layer {layer.layer_id} is "
                "cross- or sliding-window attention); use --attention-backend torch_native"
            )
        if save_kv_cache and k is not None and v is not None:
            self.token_to_kv_pool.set_kv_buffer(layer, KVWriteLoc(out_cache_loc, None), k, v)
        causal = layer.attn_type != AttentionType.ENCODER_ONLY
        batch = self._paged_batch(layer.tp_q_head_num // layer.tp_k_head_num, causal)
        step_threads = torch.get_num_threads()
        threads = attention_threads(self._wide_attention, step_threads, self._process_threads)
        if threads != step_threads:
            if not self._logged_wide:
                self._logged_wide = True
                logger.info("decode attention of requests over >= %d keys runs on %d threads "
                            "(SGLANG_TURBO_PARALLEL_ATTENTION_KEYS)", self._parallel_keys, threads)
            torch.set_num_threads(threads)
        try:
            out = paged_attention(
                q.view(-1, layer.tp_q_head_num, layer.qk_head_dim),
                self.token_to_kv_pool.get_key_buffer(layer.layer_id),
                self.token_to_kv_pool.get_value_buffer(layer.layer_id),
                batch,
                layer.scaling,
                self._workspace,
            )
        finally:
            if threads != step_threads:
                torch.set_num_threads(step_threads)
        return out.reshape(-1, layer.tp_q_head_num * layer.v_head_dim)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        return self._forward(q, k, v, layer, forward_batch, save_kv_cache)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        return self._forward(q, k, v, layer, forward_batch, save_kv_cache)

    def support_triton(self):
        return False


# ``turbo::paged_attention``: one layer's attention inside a compiled forward, run eagerly with the
# layout of the backend the forward in progress runs on (SGLang's forward context), so one graph
# serves every backend instance: a draft's per-step backends, the target's. Defined with the plain library API rather than ``torch.library.custom_op``,
# whose autograd wrapper cost ~100 us a call on this CPU (7% of a decode step at batch 1).
_LIBRARY = torch.library.Library("turbo", "DEF")
_LIBRARY.define(
    "paged_attention(Tensor q, Tensor k, Tensor v, int layer_id, int out_width, bool save_kv_cache) -> Tensor"
)


def _step_backend() -> TurboNativeAttnBackend:
    """The backend of the forward in progress; a hybrid model's context holds a wrapper around ours."""
    from sglang.srt.model_executor.forward_context import get_forward_context

    backend = get_forward_context().attn_backend
    return getattr(backend, "full_attn_backend", backend)


def _paged_attention_op(q, k, v, layer_id: int, out_width: int, save_kv_cache: bool):
    """Writes the layer's new K/V into the pool, a side effect the graph does not see; nothing in
    the graph reads the pool, so no reordering can observe it."""
    backend = _step_backend()
    layer = backend._layers[layer_id]
    return backend._attend(q, k, v, layer, backend._layout.out_cache_loc, save_kv_cache)


_LIBRARY.impl("paged_attention", _paged_attention_op, "CompositeExplicitAutograd")


@torch.library.register_fake("turbo::paged_attention")
def _(q, k, v, layer_id, out_width, save_kv_cache):
    return q.new_empty(q.shape[0], out_width)


def attention_threads(wide: bool, step_threads: int, process_threads: int) -> int:
    """Threads for one layer's attention. The CPU graph runner runs small decode batches on one thread
    (threads.ONE_THREAD_MAX_BS: their ~50 tiny kernels a step lose more to a descheduled second thread
    than they gain), but attention over thousands of keys is one kernel with enough work for every core:
    the decode kernel at batch 1 over 16k keys took 2.36 ms on one thread and 0.78 ms on two (2026-12-04,
    alone on this 2-core machine). The kernel splits work by (request, KV head), so its output does not
    depend on the thread count (the torch fallback's may, by rounding)."""
    return max(step_threads, process_threads) if wide else step_threads


def _cpu_list(cpu_values, values) -> list[int]:
    """A batch field as a Python list, from its CPU mirror when SGLang filled one."""
    if cpu_values is not None:
        return cpu_values.tolist() if isinstance(cpu_values, torch.Tensor) else list(cpu_values)
    return values.tolist()


class TurboNativeMultiStepDraftBackend:
    """Attention for EAGLE-style multi-step drafting: one backend per draft step after the first.

    The draft batch holds ``bsz * topk`` rows (request b, branch k). At step i a row attends to
    its request's committed prefix and then to the i + 1 tokens its branch has drafted so far,
    whose slots SGLang laid out in ``out_cache_loc`` as (bsz, topk, num_steps). Like upstream's
    draft backends, a branch reads its own column, not its tree ancestors: the draft is a guess,
    and verification applies the exact tree.
    """

    def __init__(self, model_runner: ModelRunner, topk: int, speculative_num_steps: int):
        self.topk = topk
        self.speculative_num_steps = speculative_num_steps
        self.req_to_token = model_runner.req_to_token_pool.req_to_token
        self.attn_backends = [TurboNativeAttnBackend(model_runner) for _ in range(speculative_num_steps - 1)]

    def init_forward_metadata(self, forward_batch: ForwardBatch) -> None:
        bsz, topk, steps = forward_batch.batch_size, self.topk, self.speculative_num_steps
        prefix = torch.tensor(_cpu_list(forward_batch.seq_lens_cpu, forward_batch.seq_lens)).repeat_interleave(topk)
        pool_rows = forward_batch.req_pool_indices.repeat_interleave(topk)
        branch_slots = forward_batch.out_cache_loc.view(bsz, topk, steps).reshape(bsz * topk, steps).to(torch.long)
        max_prefix = int(prefix.max())
        for i, backend in enumerate(self.attn_backends):
            width = max_prefix + i + 1
            kv_slots = self.req_to_token[pool_rows, :width].to(torch.long)  # a copy: safe to overwrite
            cols = prefix[:, None] + torch.arange(i + 1)  # (rows, i + 1) where the drafted tokens go
            kv_slots.scatter_(1, cols, branch_slots[:, : i + 1])
            kv_lens = (prefix + i + 1).tolist()
            # out_cache_loc: where step i's token goes (upstream's per-step slice), read by the compiled op.
            backend.set_layout(BatchLayout([1] * len(kv_lens), kv_lens, kv_slots, None, branch_slots[:, i]))
