"""KV-slot bookkeeping of speculative decoding, in plain PyTorch.

SGLang keeps, for each request row ``r`` of ``req_to_token``, the pool slot of
every token: ``req_to_token[r, pos] -> slot``. A speculative round allocates
slots for the draft/verify tokens, writes them into that table, reads windows of
it back, and after verification moves the KV of the accepted tree nodes to the
front of each request's window. These ops are that bookkeeping. Each one has the
signature and in-place contract of the SGLang function it stands in for (named
in its docstring) and is paired with ``<op>_ref``: a per-request Python loop that
says the same thing slowly and obviously.

Addressing is flat, as in the kernels they replace: ``req_to_token[r, c]`` is
element ``r * row_len + c`` of the contiguous table.
"""

from __future__ import annotations

import torch

__all__ = [
    "assign_req_to_token_pool",
    "assign_req_to_token_pool_ref",
    "assign_draft_cache_locs_contiguous",
    "assign_draft_cache_locs_contiguous_ref",
    "assign_extend_cache_locs",
    "assign_extend_cache_locs_ref",
    "fill_bonus_tokens",
    "fill_bonus_tokens_ref",
    "fill_front_out_cache_loc",
    "fill_front_out_cache_loc_ref",
    "fill_accept_out_cache_loc",
    "fill_accept_out_cache_loc_ref",
    "move_kv_rows",
    "move_kv_rows_ref",
]


def _ranges(start: torch.Tensor, end: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenation of the integer ranges ``[start[i], end[i])``: (owner i, value) per element.

    Element k of the output belongs to range ``seg[k]`` and has value ``val[k]``; ranges follow
    each other in order, so k is also the packed output offset the kernels compute as a prefix sum.
    """
    start = start.to(torch.int64)
    lens = (end.to(torch.int64) - start).clamp_(min=0)
    seg = torch.repeat_interleave(torch.arange(lens.numel(), device=lens.device), lens)
    first = torch.cumsum(lens, 0) - lens  # packed offset of each range's first element
    val = start[seg] + torch.arange(seg.numel(), device=lens.device) - first[seg]
    return seg, val


# ---------------------------------------------------------------------------------------------
# req_to_token writes and reads


# Batches up to this size write req_to_token row by row: between two forwards, with the caches cold, the
# batched path's ~12 small tensor ops took 175 us a call at batch 1 in the server (30 us in a warm loop),
# the row writes 35 us (turbo-tiny, TURBO never speculating, 2026-12-08). In a warm loop the row writes
# are faster up to batch 8 and slower from batch 64 on.
ROW_WRITE_MAX_BS = 8


def assign_req_to_token_pool(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    batch_size: int,
) -> None:
    """Stand-in for ``sglang.srt.mem_cache.allocation.assign_req_to_token_pool_func``.

    Writes the newly allocated slots into the table, request after request:
    ``req_to_token[rpi[i], start[i]:end[i]] = out_cache_loc[off[i] : off[i] + end[i] - start[i]]``
    with ``off`` the exclusive prefix sum of ``end - start``. ``req_to_token`` is written in place.
    """
    if batch_size <= ROW_WRITE_MAX_BS:
        off = 0
        for row, start, end in zip(req_pool_indices[:batch_size].tolist(), start_offset[:batch_size].tolist(),
                                   end_offset[:batch_size].tolist()):
            if end > start:
                req_to_token[row, start:end] = out_cache_loc[off : off + end - start]
                off += end - start
        return
    seg, col = _ranges(start_offset[:batch_size], end_offset[:batch_size])
    rows = req_pool_indices[:batch_size].to(torch.int64)[seg]
    flat = req_to_token.view(-1)
    flat[rows * req_to_token.shape[1] + col] = out_cache_loc[: seg.numel()].to(req_to_token.dtype)


def assign_req_to_token_pool_ref(req_pool_indices, req_to_token, start_offset, end_offset, out_cache_loc, batch_size):
    off = 0
    for i in range(batch_size):
        s, e = int(start_offset[i]), int(end_offset[i])
        for c in range(s, e):
            req_to_token[int(req_pool_indices[i]), c] = out_cache_loc[off]
            off += 1


def assign_draft_cache_locs_contiguous(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    seq_lens: torch.Tensor,
    out_cache_loc: torch.Tensor,
    topk: int,
    num_cols: int,
    positions: torch.Tensor | None = None,
    mrope: torch.Tensor | None = None,
) -> None:
    """Stand-in for ``sglang.kernels.ops.speculative.cache_locs.assign_draft_cache_locs_contiguous_func``.

    Request i's draft slots are the ``topk * num_cols`` table entries that follow its committed
    prefix: ``out_cache_loc.view(bs, topk * num_cols)[i] = req_to_token[rpi[i], seq_lens[i] : + topk * num_cols]``
    (``num_cols`` is ``speculative_num_steps``, or the whole verify window when the chain
    draft plans it). When given, ``positions[i * topk + k] = seq_lens[i]`` for ``k < topk`` and
    each of ``mrope``'s 3 axes gets the same. Writes ``out_cache_loc`` (and ``positions``,
    ``mrope``) in place.
    """
    bs = seq_lens.shape[0]
    width = topk * num_cols
    starts = seq_lens.to(torch.int64)
    base = req_pool_indices[:bs].to(torch.int64) * req_to_token.shape[1] + starts
    idx = base[:, None] + torch.arange(width, device=seq_lens.device)
    out_cache_loc[: bs * width].view(bs, width).copy_(req_to_token.view(-1)[idx])
    if positions is not None:
        positions.view(-1)[: bs * topk].copy_(starts.repeat_interleave(topk))
        if mrope is not None:
            mrope.view(3, -1)[:, : bs * topk].copy_(starts.repeat_interleave(topk).expand(3, -1))


def assign_draft_cache_locs_contiguous_ref(
    req_pool_indices, req_to_token, seq_lens, out_cache_loc, topk, num_cols, positions=None, mrope=None
):
    width = topk * num_cols
    for i in range(seq_lens.shape[0]):
        for c in range(width):
            out_cache_loc[i * width + c] = req_to_token[int(req_pool_indices[i]), int(seq_lens[i]) + c]
        if positions is not None:
            for k in range(topk):
                positions.view(-1)[i * topk + k] = seq_lens[i]
                if mrope is not None:
                    for axis in range(3):
                        mrope.view(3, -1)[axis, i * topk + k] = seq_lens[i]


def assign_extend_cache_locs(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    batch_size: int,
    draft_token_num: int,
    device,
) -> torch.Tensor:
    """The platform's verify-slots function (``SRTPlatform.get_speculative_cache_locs_fn``).

    ``sglang.kernels.ops.speculative.cache_locs.assign_extend_cache_locs_func`` calls it with these
    keyword arguments. Returns a new int64 tensor of ``batch_size * draft_token_num`` slots holding,
    packed request after request, ``req_to_token[rpi[i], start[i]:end[i]]``; if the ranges are
    shorter than ``draft_token_num`` the tail is 0 (upstream leaves it uninitialised).
    """
    out = torch.zeros(batch_size * draft_token_num, dtype=torch.int64, device=device)
    seg, col = _ranges(start_offset[:batch_size], end_offset[:batch_size])
    rows = req_pool_indices[:batch_size].to(torch.int64)[seg]
    out[: seg.numel()] = req_to_token.view(-1)[rows * req_to_token.shape[1] + col].to(device)
    return out


def assign_extend_cache_locs_ref(
    req_pool_indices, req_to_token, start_offset, end_offset, batch_size, draft_token_num, device
):
    out = torch.zeros(batch_size * draft_token_num, dtype=torch.int64, device=device)
    off = 0
    for i in range(batch_size):
        for c in range(int(start_offset[i]), int(end_offset[i])):
            out[off] = req_to_token[int(req_pool_indices[i]), c]
            off += 1
    return out


# ---------------------------------------------------------------------------------------------
# After verification


def fill_bonus_tokens(
    accept_tokens: torch.Tensor,
    accept_lens: torch.Tensor,
    bonus_tokens: torch.Tensor,
    accept_stride: int,
    batch_size: int,
) -> None:
    """Stand-in for ``sglang.kernels.ops.speculative.eagle.fill_bonus_tokens_func``.

    ``accept_tokens`` is (bs, accept_stride) (flat reads, like the kernel); ``accept_lens`` counts
    the bonus token, so each request's bonus is its last accepted token:
    ``bonus_tokens[i] = accept_tokens.flat[i * accept_stride + accept_lens[i] - 1]``.
    Writes ``bonus_tokens`` in place (int32 at the call site).
    """
    last = accept_lens[:batch_size].to(torch.int64) - 1
    idx = torch.arange(batch_size, device=accept_lens.device) * accept_stride + last
    bonus_tokens[:batch_size] = accept_tokens.reshape(-1)[idx].to(bonus_tokens.dtype)


def fill_bonus_tokens_ref(accept_tokens, accept_lens, bonus_tokens, accept_stride, batch_size):
    for i in range(batch_size):
        bonus_tokens[i] = accept_tokens.reshape(-1)[i * accept_stride + int(accept_lens[i]) - 1]


def fill_front_out_cache_loc(
    num_front: torch.Tensor,
    out_cache_loc: torch.Tensor,
    front_out_cache_loc: torch.Tensor,
) -> None:
    """Stand-in for ``sglang.kernels.ops.speculative.cache_locs.fill_front_out_cache_loc_func``.

    ``out_cache_loc`` holds one equal-width window of verify slots per request; the accepted path
    of request i is moved to the first ``num_front[i]`` of them, so those are the move targets:
    ``front_out_cache_loc`` = concatenation over i of ``out_cache_loc.view(bs, -1)[i, :num_front[i]]``.
    Only that packed prefix of ``front_out_cache_loc`` is written (in place).
    """
    bs = num_front.numel()
    width = out_cache_loc.numel() // bs if bs else 0
    seg, col = _ranges(torch.zeros_like(num_front), num_front)
    front_out_cache_loc[: seg.numel()] = out_cache_loc.view(-1)[seg * width + col].to(front_out_cache_loc.dtype)


def fill_front_out_cache_loc_ref(num_front, out_cache_loc, front_out_cache_loc):
    window = out_cache_loc.view(num_front.numel(), -1)
    k = 0
    for i in range(num_front.numel()):
        for c in range(int(num_front[i])):
            front_out_cache_loc[k] = window[i, c]
            k += 1


def fill_accept_out_cache_loc(
    accept_index: torch.Tensor,
    out_cache_loc: torch.Tensor,
    accept_out_cache_loc: torch.Tensor,
    size: int,
) -> None:
    """Stand-in for ``sglang.kernels.ops.speculative.eagle.fill_accept_out_cache_loc_func``.

    The move sources: the slots of the accepted tree nodes, packed. Over the first ``size``
    entries of flat ``accept_index`` (-1 = padding after each request's accepted path), entry
    ``a >= 0`` at flat position p writes ``accept_out_cache_loc[#(entries != -1 before p)] =
    out_cache_loc[a]``. Written in place.
    """
    ai = accept_index.reshape(-1)[:size].to(torch.int64)
    dst = torch.cumsum(ai != -1, 0) - (ai != -1).to(torch.int64)  # exclusive count, as the kernel
    keep = ai > -1
    accept_out_cache_loc[dst[keep]] = out_cache_loc[ai[keep]].to(accept_out_cache_loc.dtype)


def fill_accept_out_cache_loc_ref(accept_index, out_cache_loc, accept_out_cache_loc, size):
    ai = accept_index.reshape(-1)
    dst = 0
    for p in range(size):
        a = int(ai[p])
        if a > -1:
            accept_out_cache_loc[dst] = out_cache_loc[a]
        if a != -1:
            dst += 1


def move_kv_rows(k_buffers, v_buffers, tgt: torch.Tensor, src: torch.Tensor) -> None:
    """Per layer, ``k[tgt] = k[src]`` and ``v[tgt] = v[src]`` (the accepted-path KV compaction).

    The right-hand side is gathered before anything is written, so targets may overlap sources
    (they do: both lie in the same verify window). Padding pairs (0, 0) are harmless.
    """
    if tgt.numel() == 0:
        return
    tgt, src = tgt.reshape(-1).to(torch.int64), src.reshape(-1).to(torch.int64)
    for k, v in zip(k_buffers, v_buffers):
        k[tgt] = k[src]
        v[tgt] = v[src]


def move_kv_rows_ref(k_buffers, v_buffers, tgt, src):
    for k, v in zip(k_buffers, v_buffers):
        k_old, v_old = k.clone(), v.clone()
        for t, s in zip(tgt.tolist(), src.tolist()):
            k[t] = k_old[s]
            v[t] = v_old[s]
