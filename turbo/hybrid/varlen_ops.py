"""Mamba2's four ops in the form SGLang's ``MambaMixer2`` calls them, in plain PyTorch.

SGLang serves a batch as one flat token axis (prefill sequences concatenated, ``query_start_loc`` /
``cu_seqlens`` marking where each starts) and keeps every request's Mamba state in a pool indexed by a
slot number (``cache_indices`` / ``state_batch_indices``; ``pad_slot_id`` marks a row to skip). Its GPU
kernels (Triton, CUDA) do that in one launch. Here prefill loops over sequences, each through the
reference functions of :mod:`turbo.hybrid.mamba2` and :mod:`turbo.hybrid.ssd`; decode writes the same
one-step recurrence out for the whole batch (it runs once per layer per token, so fewer ops matter). All
four are tested against the sequential scan (test/hybrid/test_varlen_ops.py).

| op | SGLang's (GPU) | prefill / decode |
| --- | --- | --- |
| :func:`causal_conv1d_fn` | ``sglang.srt.layers.attention.mamba.causal_conv1d.causal_conv1d_fn`` | prefill |
| :func:`causal_conv1d_update` | ``...causal_conv1d.causal_conv1d_update`` | decode |
| :func:`mamba_chunk_scan_combined` | ``sglang.kernels.ops.mamba.triton_ops.ssd_combined.mamba_chunk_scan_combined`` | prefill |
| :func:`selective_state_update` | ``sglang.kernels.ops.mamba.triton_ops.ssu_dispatch.selective_state_update`` | decode |

The scan runs in float32 whatever the activations' dtype, as the GPU kernels do. Speculative verify
(a draft tree through the state) and the extra-buffer state tracking are not implemented: they raise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .mamba2 import causal_conv1d_ref
from .ssd import ssd_chunked

PAD_SLOT_ID = -1
_ACTIVATIONS = (None, "silu", "swish")


def _activate(x: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation not in _ACTIVATIONS:
        raise NotImplementedError(f"causal conv activation must be one of {_ACTIVATIONS}, got {activation!r}")
    return x if activation is None else F.silu(x)


def _spans(query_start_loc: torch.Tensor) -> list[tuple[int, int]]:
    starts = query_start_loc.tolist()
    return list(zip(starts[:-1], starts[1:]))


def causal_conv1d_fn(x, weight, bias=None, query_start_loc=None, cache_indices=None, has_initial_state=None,
                     conv_states=None, activation="silu", pad_slot_id=PAD_SLOT_ID, **_unused):
    """Prefill conv over a varlen batch. x (dim, n_tokens); weight (dim, width); conv_states
    (pool, dim, width - 1), read for a sequence whose ``has_initial_state`` is set (a cached prefix or an
    earlier chunk) and overwritten with each sequence's last ``width - 1`` inputs. Returns (dim, n_tokens)."""
    if query_start_loc is None:
        raise NotImplementedError("causal_conv1d_fn: only the varlen form (query_start_loc given) is implemented")
    out = torch.zeros_like(x)
    window_len = weight.shape[1] - 1
    for i, (start, end) in enumerate(_spans(query_start_loc)):
        slot = int(cache_indices[i]) if cache_indices is not None else i
        if slot == pad_slot_id:
            continue
        if has_initial_state is not None and bool(has_initial_state[i]):
            window = conv_states[slot].to(x.dtype)
        else:
            window = x.new_zeros(x.shape[0], window_len)
        y, new_window = causal_conv1d_ref(x[None, :, start:end], weight, bias, window[None])
        out[:, start:end] = _activate(y[0], activation)
        if conv_states is not None:
            conv_states[slot] = new_window[0].to(conv_states.dtype)
    return out


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None,
                         conv_state_indices=None, pad_slot_id=PAD_SLOT_ID):
    """Decode conv, one token per request. x (batch, dim); conv_state (pool, dim, width - 1), rows
    ``conv_state_indices`` (or 0..batch-1) shifted by one input in place. Returns (batch, dim)."""
    if cache_seqlens is not None:
        raise NotImplementedError("causal_conv1d_update: the circular-buffer form (cache_seqlens) is not implemented")
    if x.dim() != 2:
        raise NotImplementedError("causal_conv1d_update: one token per request (x of shape (batch, dim)) only")
    _activate(x[:0], activation)  # refuses an unknown activation before any state changes
    slots = conv_state_indices.long() if conv_state_indices is not None else torch.arange(x.shape[0])
    rows = slots.clamp(min=0)  # pad rows compute on slot 0's window and write nothing
    window = torch.cat([conv_state[rows].to(x.dtype), x[:, :, None]], dim=-1)  # (batch, dim, width)
    y = (window * weight).sum(-1)  # causal_conv1d_ref at one position, without a conv launch per step
    if bias is not None:
        y = y + bias
    live = slots != pad_slot_id
    conv_state[rows[live]] = window[live, :, 1:].to(conv_state.dtype)
    return torch.where(live[:, None], _activate(y, activation), 0.0)


def _skip_term(D: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """D * x for D of shape (n_heads,) or (n_heads, head_dim), x (..., n_heads, head_dim)."""
    if D is None:
        return torch.zeros_like(x)
    return x * (D[:, None] if D.dim() == 1 else D)


def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                              seq_idx=None, chunk_indices=None, chunk_offsets=None, cu_seqlens=None,
                              dt_softplus=False, dt_limit=(0.0, float("inf")), out=None,
                              return_final_states=False, return_varlen_states=False,
                              return_intermediate_states=False, state_dtype=None, return_track_states=False,
                              track_seq_idx=None, track_end_locs=None):
    """Prefill scan over a varlen batch: x (1, n_tokens, n_heads, head_dim), dt (1, n_tokens, n_heads),
    A (n_heads,), B/C (1, n_tokens, n_groups, d_state), ``cu_seqlens`` the sequence starts,
    ``initial_states`` (n_seqs, n_heads, head_dim, d_state) or None. Writes y into ``out`` (like x).

    Returns what ``MambaMixer2`` unpacks: with ``return_track_states`` (its call) the triple
    (None, final states (n_seqs, ...), None): the chunk states and tracked states only feed the
    extra-buffer radix cache, which the portable platform does not run."""
    if z is not None:
        raise NotImplementedError("mamba_chunk_scan_combined: the z gate inside the scan is not implemented")
    if track_seq_idx is not None or track_end_locs is not None:
        raise NotImplementedError("mamba_chunk_scan_combined: state tracking (extra_buffer radix cache) is not "
                                  "implemented on the portable platform; use --mamba-radix-cache-strategy no_buffer")
    if return_intermediate_states:
        raise NotImplementedError("mamba_chunk_scan_combined: intermediate chunk states are not implemented")
    if x.shape[0] != 1 and cu_seqlens is not None:
        raise ValueError(f"varlen scan wants batch 1 (sequences concatenated), got x of shape {tuple(x.shape)}")
    if cu_seqlens is None:
        cu_seqlens = torch.tensor([0, x.shape[1]])
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    A = A.float()
    spans = _spans(cu_seqlens)
    n_heads, head_dim, d_state = x.shape[2], x.shape[3], B.shape[-1]
    final = x.new_zeros(len(spans), n_heads, head_dim, d_state, dtype=torch.float32)
    y_all = torch.empty(x.shape, dtype=torch.float32)
    no_skip = torch.zeros(n_heads)
    for i, (start, end) in enumerate(spans):
        init = None if initial_states is None else initial_states[i : i + 1].float()
        xs = x[:, start:end].float()
        y, state = ssd_chunked(xs, dt[:, start:end], A, B[:, start:end].float(), C[:, start:end].float(),
                               no_skip, chunk_size, init)
        y_all[:, start:end] = y + _skip_term(D.float() if D is not None else None, xs)
        final[i] = state[0]
    if out is not None:
        out.copy_(y_all.to(out.dtype))
    final = final.to(state_dtype or torch.float32)
    if return_track_states:
        return None, final, None
    if return_varlen_states:
        return (None, final) if return_final_states else final
    if return_final_states:
        return final[-1:]
    return None if out is not None else y_all.to(x.dtype)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                           state_batch_indices=None, pad_slot_id=PAD_SLOT_ID, out=None, disable_state_update=False,
                           intermediate_states_buffer=None, cache_steps=None, retrieve_parent_token=None,
                           intermediate_state_indices=None):
    """One decode step of the scan for each request, in place on ``state`` (pool, n_heads, head_dim, d_state)
    rows ``state_batch_indices``. x/dt (batch, n_heads, head_dim) (dt repeated over head_dim, as
    MambaMixer2 passes it), A (n_heads, head_dim, d_state), B/C (batch, n_groups, d_state), D and
    dt_bias (n_heads, head_dim). Writes y (batch, n_heads, head_dim) into ``out``."""
    if x.dim() != 3 or intermediate_states_buffer is not None or disable_state_update:
        raise NotImplementedError("selective_state_update: speculative verify (several tokens per request, "
                                  "intermediate states) is not implemented on the portable platform")
    batch, n_heads, _ = x.shape
    slots = state_batch_indices.long() if state_batch_indices is not None else torch.arange(batch)
    rows = slots.clamp(min=0)  # pad rows compute on slot 0's state and write nothing
    xs, dts = x.float(), dt.float()
    if dt_bias is not None:
        dts = dts + dt_bias.float()
    if dt_softplus:
        dts = F.softplus(dts)
    rep = n_heads // B.shape[1]
    Bh = B.float().repeat_interleave(rep, dim=1) if rep > 1 else B.float()  # (batch, n_heads, d_state)
    Ch = C.float().repeat_interleave(rep, dim=1) if rep > 1 else C.float()
    h = state[rows].float() * torch.exp(dts[..., None] * A.float())  # (batch, n_heads, head_dim, d_state)
    h = h + (dts * xs)[..., None] * Bh[:, :, None, :]
    y = (h @ Ch[..., None])[..., 0] + _skip_term(D.float() if D is not None else None, xs)
    if z is not None:
        y = y * F.silu(z.float())
    live = slots != pad_slot_id
    state[rows[live]] = h[live].to(state.dtype)
    if out is not None:
        out.copy_(torch.where(live[:, None, None], y, 0.0).to(out.dtype))
    return None
