"""Batched attention over a token-paged KV cache, in plain PyTorch.

SGLang keeps K and V of every cached token in one pool of slots,
``k_cache[slot] -> (n_kv_heads, head_dim)``; a request's tokens live at the slots
listed in its row of ``req_to_token``. Upstream's ``torch_native`` backend runs
one SDPA call per request in a Python loop. Here a whole batch is one call:

1. ``PagedBatch.build`` (once per forward, shared by every layer) pads each
   request's slot list to the longest request and builds one boolean mask that
   encodes causality, each request's cached prefix and the padding.
2. ``paged_attention`` (once per layer) gathers K/V with ``index_select`` into a
   :class:`GatherWorkspace` that lives across layers and forwards, folds the query
   heads that share a KV head into rows so GQA needs no K/V expansion, and calls
   SDPA once.

Why the workspace: on CPU a fresh multi-MB gather result is new memory, and its
page faults cost more than the copy. Gathering 11,152 scattered slots of
(2, 64) float32, 2 threads (2026-11-25): 2,640 us into a new tensor, 306 us into
a reused one (3D ``index_select`` into a new tensor is also 4x slower than 2D).

Decode is the special case of one query token per request. It goes to the
``paged_decode_attention`` kernel (turbo/kernels.py, sgl-kernel/), which reads each
request's keys and values straight from the pool: no gather, no padding, no mask
(batch 16 over up to 768 tokens, 2 cores: 4.6 ms a layer gathered + SDPA, 0.7 ms
the kernel). Without the kernel, a single request decoding over slots that happen
to be consecutive (the common case: SGLang hands one request's tokens out from
the head of its free list) still skips the gather and the mask: K/V are a view of
the pool (``PagedBatch.kv_start``; 1,500 slots: 24 us gather + mask vs a 2 us view).

Speculative decoding adds two shapes: verifying a draft *tree* (``block_mask``: each new
token sees the cached prefix and only its own ancestors among the new tokens)
and draft steps whose rows read slots that are not one ``req_to_token`` row
(``PagedBatch.from_slots``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch.nn.functional import scaled_dot_product_attention

from turbo import kernels


@dataclass
class PagedBatch:
    """Per-forward layout of a batch, shared by all layers.

    kv_slots:  (bsz, max_kv) long, pool slots of each request's tokens; past ``kv_lens[i]`` a row
               holds whatever its source held (the decode kernel reads only the first kv_lens[i])
    kv_lens:   (bsz,) long, how many of each row's slots are keys
    q_dest:    (n_tokens,) long, row of each packed query token in the padded (bsz * max_q) layout,
               or None when every request has exactly one query token (decode)
    bsz, max_q, group: padded sizes; group = n_heads // n_kv_heads

    Built on first use, because the decode kernel needs none of them (``from_slots`` at batch 1,
    700 keys: 34 -> 7 us, 2026-12-03): ``gather_slots`` (padding pointed at slot 0), ``kv_start``
    and ``mask``.
    """

    kv_slots: torch.Tensor
    kv_lens: torch.Tensor
    q_dest: torch.Tensor | None
    bsz: int
    max_q: int
    group: int
    q_lens: list[int] = field(default_factory=list, repr=False)
    causal: bool = field(default=True, repr=False)
    block_mask: torch.Tensor | None = field(default=None, repr=False)
    _additive: dict[torch.dtype, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def is_decode(self) -> bool:
        """One query token per request, every key before it visible (the decode kernel's case)."""
        return self.q_dest is None and self.causal and self.block_mask is None

    def additive_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """``mask`` as 0 / -inf in ``dtype``, made once per forward: SDPA on CPU would otherwise
        convert the boolean mask in every layer (decode, batch 16: 740 us -> 570 us a layer)."""
        if dtype not in self._additive:
            self._additive[dtype] = torch.zeros(self.mask.shape, dtype=dtype, device=self.mask.device).masked_fill_(
                ~self.mask, float("-inf")
            )
        return self._additive[dtype]

    @cached_property
    def kv_start(self) -> int | None:
        """First slot when the batch is one decode query over consecutive slots
        ``kv_start .. kv_start + max_kv - 1`` (K/V are then a view and no mask is needed), else None."""
        if self.bsz == 1 and self.max_q == 1 and self.block_mask is None and _consecutive(self.kv_slots[0]):
            return int(self.kv_slots[0, 0])
        return None

    @cached_property
    def in_kv(self) -> torch.Tensor:
        """(bsz, max_kv) bool, True where a row's slot is one of its keys rather than padding."""
        return torch.arange(self.kv_slots.shape[1], device=self.kv_slots.device)[None, :] < self.kv_lens[:, None]

    @cached_property
    def gather_slots(self) -> torch.Tensor:
        """``kv_slots`` with every padding entry pointed at slot 0, safe to gather: (bsz, max_kv)."""
        return torch.where(self.in_kv, self.kv_slots, torch.zeros_like(self.kv_slots))

    @cached_property
    def mask(self) -> torch.Tensor:
        device, bsz, max_q, max_kv = self.kv_slots.device, self.bsz, self.max_q, self.kv_slots.shape[1]
        if self.kv_start is not None:
            return torch.ones(1, 1, self.group, max_kv, dtype=torch.bool, device=device)
        q_len_t = torch.tensor(self.q_lens, device=device)
        kv_len_t = self.kv_lens
        kv_pos = torch.arange(max_kv, device=device)  # (max_kv,)
        q_idx = torch.arange(max_q, device=device)  # (max_q,)
        mask = self.in_kv[:, None, :].expand(bsz, max_q, max_kv)  # (bsz, max_q, max_kv)
        if self.causal and self.block_mask is None:
            q_pos = (kv_len_t - q_len_t)[:, None] + q_idx[None, :]  # (bsz, max_q) absolute positions
            mask = mask & (kv_pos[None, None, :] <= q_pos[:, :, None])
        elif self.causal:
            # Column of each key inside its request's new block (negative: cached prefix).
            rel = kv_pos[None, :] - (kv_len_t - q_len_t)[:, None]  # (bsz, max_kv)
            block_cols = rel.clamp(0, max_q - 1)[:, None, :].expand(bsz, max_q, max_kv)
            in_tree = torch.gather(self.block_mask[:, :max_q, :max_q].to(torch.bool), 2, block_cols)
            mask = mask & ((rel < 0)[:, None, :] | in_tree)
        # Padded query rows attend to key 0 so their softmax stays finite; their output is dropped.
        q_pad = q_idx[None, :] >= q_len_t[:, None]  # (bsz, max_q)
        mask = mask | (q_pad[:, :, None] & (kv_pos == 0)[None, None, :])
        return mask.repeat_interleave(self.group, dim=1).unsqueeze(1)  # (bsz, 1, max_q * group, max_kv)

    @classmethod
    def build(
        cls,
        req_to_token: torch.Tensor,
        req_pool_indices: torch.Tensor,
        q_lens: list[int],
        kv_lens: list[int],
        group: int,
        causal: bool = True,
        block_mask: torch.Tensor | None = None,
    ) -> "PagedBatch":
        """``q_lens[i]`` new tokens of request i attend to its first ``kv_lens[i]`` cached tokens
        (the new ones are the last ``q_lens[i]`` of those), read from its row of ``req_to_token``."""
        kv_slots = req_to_token[req_pool_indices, : max(kv_lens)].to(torch.long)
        return cls.from_slots(kv_slots, q_lens, kv_lens, group, causal, block_mask)

    @classmethod
    def from_slots(
        cls,
        kv_slots: torch.Tensor,
        q_lens: list[int],
        kv_lens: list[int],
        group: int,
        causal: bool = True,
        block_mask: torch.Tensor | None = None,
    ) -> "PagedBatch":
        """Like :meth:`build`, with each request's slots given directly: ``kv_slots[i, :kv_lens[i]]``.

        block_mask: optional (bsz, max_q, max_q) bool. Speculative verification of a draft tree:
                    query ``a`` of request i sees the whole cached prefix but, among the request's own
                    new tokens, only those ``b`` with ``block_mask[i, a, b]`` (its tree ancestors and
                    itself). Replaces causality inside the new block; needs ``causal``.
        """
        if block_mask is not None and not causal:
            raise ValueError("block_mask refines causal attention; it cannot be combined with causal=False")
        device = kv_slots.device
        bsz, max_q, max_kv = len(q_lens), max(q_lens), max(kv_lens)
        kv_slots = kv_slots[:, :max_kv]
        kv_len_t = torch.tensor(kv_lens, device=device)
        layout = dict(bsz=bsz, max_q=max_q, group=group, q_lens=list(q_lens), causal=causal, block_mask=block_mask)
        q_dest = None
        if max_q > 1 or min(q_lens) != 1:
            q_dest = torch.cat([torch.arange(n, device=device) + i * max_q for i, n in enumerate(q_lens)])
        return cls(kv_slots=kv_slots, kv_lens=kv_len_t, q_dest=q_dest, **layout)


def _consecutive(slots: torch.Tensor) -> bool:
    """True when ``slots`` is ``a, a + 1, ..., a + n - 1``."""
    return slots.numel() == 1 or bool((slots[1:] - slots[:-1] == 1).all())


def block_mask_from_full_layout(flat: torch.Tensor, prefix_lens: list[int], n_new: int) -> torch.Tensor:
    """The (bsz, n_new, n_new) new-token block of a flat "full" tree mask.

    The full layout (what SGLang's tree builders write by default) stores, request after
    request, a row-major (n_new, prefix_len + n_new) visibility matrix. Its prefix columns
    are all True, so the block of the last ``n_new`` columns is all that varies.
    """
    device = flat.device
    prefix = torch.tensor(prefix_lens, device=device)
    row_len = prefix + n_new  # (bsz,)
    starts = torch.cumsum(n_new * row_len, 0) - n_new * row_len  # (bsz,) first cell of each request
    rows = torch.arange(n_new, device=device)
    cols = torch.arange(n_new, device=device)
    idx = starts[:, None, None] + rows[None, :, None] * row_len[:, None, None] + (prefix[:, None, None] + cols)
    needed = int(starts[-1] + n_new * row_len[-1]) if prefix_lens else 0
    if flat.numel() < needed:
        raise ValueError(f"tree mask has {flat.numel()} cells, the full layout of {prefix_lens=} needs {needed}")
    return flat[idx].to(torch.bool)


class GatherWorkspace:
    """Grow-only buffers that receive the gathered K and V; reused by every layer and forward.

    Safe because a layer's attention finishes with its K/V before the next gather
    (one forward at a time per workspace: give each model runner its own).
    """

    def __init__(self) -> None:
        self._k = torch.empty(0)
        self._v = torch.empty(0)

    @staticmethod
    def _fit(buf: torch.Tensor, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        n = math.prod(shape)
        if buf.numel() < n or buf.dtype != like.dtype or buf.device != like.device:
            buf = torch.empty(n, dtype=like.dtype, device=like.device)
        return buf

    def gather(self, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor):
        """``(k_cache[slots], v_cache[slots])`` written into the reused buffers."""
        k_shape, v_shape = (slots.numel(), *k_cache.shape[1:]), (slots.numel(), *v_cache.shape[1:])
        self._k, self._v = self._fit(self._k, k_shape, k_cache), self._fit(self._v, v_shape, v_cache)
        k = self._k[: math.prod(k_shape)].view(k_shape)
        v = self._v[: math.prod(v_shape)].view(v_shape)
        torch.index_select(k_cache, 0, slots, out=k)
        torch.index_select(v_cache, 0, slots, out=v)
        return k, v


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: PagedBatch,
    scale: float,
    workspace: GatherWorkspace | None = None,
) -> torch.Tensor:
    """Attention of packed queries against the paged cache.

    q:         (n_tokens, n_heads, head_dim), the batch's new tokens packed request after request
    k_cache:   (n_slots, n_kv_heads, head_dim); v_cache likewise with its own head_dim
    workspace: where the gathered K/V go; a throwaway one when None
    returns:   (n_tokens, n_heads, v_head_dim)
    """
    n_tokens, n_heads, head_dim = q.shape
    n_kv_heads, v_dim = k_cache.shape[1], v_cache.shape[2]
    if batch.is_decode and q.device.type == "cpu" and k_cache.dtype == q.dtype and kernels.cpu_kernels_available():
        return kernels.paged_decode_attention(q, k_cache, v_cache, batch.kv_slots, batch.kv_lens, scale)
    bsz, max_q, group = batch.bsz, batch.max_q, batch.group
    max_kv = batch.kv_slots.shape[1]
    if batch.q_dest is None:
        q_pad = q  # decode: already (bsz * 1, n_heads, head_dim)
    else:
        q_pad = q.new_zeros(bsz * max_q, n_heads, head_dim)
        q_pad[batch.q_dest] = q
    # Rows of one KV head: its `group` query heads for every query position.
    q_rows = q_pad.view(bsz, max_q, n_kv_heads, group, head_dim).permute(0, 2, 1, 3, 4)
    q_rows = q_rows.reshape(bsz, n_kv_heads, max_q * group, head_dim)  # (bsz, n_kv_heads, rows, head_dim)
    if batch.kv_start is not None:  # one request, consecutive slots: a view, and every key is visible
        k, v = k_cache.narrow(0, batch.kv_start, max_kv), v_cache.narrow(0, batch.kv_start, max_kv)
        mask = None
    else:
        k, v = (workspace or GatherWorkspace()).gather(k_cache, v_cache, batch.gather_slots.view(-1))
        mask = batch.additive_mask(q.dtype)
    k = k.view(bsz, max_kv, n_kv_heads, head_dim).transpose(1, 2)
    v = v.view(bsz, max_kv, n_kv_heads, v_dim).transpose(1, 2)
    if k.dtype != q.dtype:
        k, v = k.to(q.dtype), v.to(q.dtype)
    out = scaled_dot_product_attention(q_rows, k, v, attn_mask=mask, scale=scale)
    # out: (bsz, n_kv_heads, rows, v_dim) -> packed (n_tokens, n_heads, v_dim)
    out = out.view(bsz, n_kv_heads, max_q, group, v_dim).permute(0, 2, 1, 3, 4).reshape(bsz * max_q, n_heads, v_dim)
    return out if batch.q_dest is None else out[batch.q_dest]


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: list[int],
    q_lens: list[int],
    kv_lens: list[int],
    scale: float,
    causal: bool = True,
    block_masks: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Brute-force reference: one request and one head at a time, softmax written out.

    block_masks[r]: (q_lens[r], q_lens[r]) bool; query a sees new token b iff block_masks[r][a, b]."""
    n_heads, n_kv_heads = q.shape[1], k_cache.shape[1]
    group = n_heads // n_kv_heads
    out = q.new_empty(q.shape[0], n_heads, v_cache.shape[2])
    start = 0
    for r, (pool_idx, n_q, n_kv) in enumerate(zip(req_pool_indices, q_lens, kv_lens)):
        slots = req_to_token[pool_idx, :n_kv].long()
        for h in range(n_heads):
            k = k_cache[slots, h // group].float()  # (n_kv, head_dim)
            v = v_cache[slots, h // group].float()
            for i in range(n_q):
                prefix = n_kv - n_q
                if not causal:
                    keys = list(range(n_kv))
                elif block_masks is None:
                    keys = list(range(prefix + i + 1))
                else:
                    keys = list(range(prefix)) + [prefix + b for b in range(n_q) if block_masks[r][i, b]]
                scores = (k[keys] @ q[start + i, h].float()) * scale
                out[start + i, h] = (torch.softmax(scores, dim=0) @ v[keys]).to(out.dtype)
        start += n_q
    return out
