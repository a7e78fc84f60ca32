"""Mamba2's state-space scan (SSD, Dao & Gu 2024, https://arxiv.org/abs/2405.21060) in plain PyTorch.

The recurrence, per head h with a scalar decay A_h < 0 and a state of (head_dim, d_state):

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * x_t B_t^T        (1) state update
    y_t = h_t C_t + D * x_t                                 (2) readout

``ssd_sequential_ref`` runs (1)-(2) one position at a time: the definition, and the decode step.
``ssd_chunked`` computes the same thing the way prefill does (the paper's SSD algorithm, section 7):
split the sequence into chunks of ``chunk_size`` and
  step 1: outputs inside each chunk, from the chunk's own inputs (a masked, decayed attention-like product);
  step 2: each chunk's final state as if it started from zero;
  step 3: pass states from chunk to chunk (a short recurrence over chunks, with the initial state);
  step 4: outputs from the state each chunk started with.
Both take an ``initial_state`` and return the final state, which is what prefix caching saves.

Shapes: x (bsz, seqlen, n_heads, head_dim); dt (bsz, seqlen, n_heads), already positive (softplus'd);
A (n_heads,); B, C (bsz, seqlen, n_groups, d_state), head h reading group h // (n_heads // n_groups);
D (n_heads,); state (bsz, n_heads, head_dim, d_state).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _heads_of_groups(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(bsz, seqlen, n_groups, d_state) -> (bsz, seqlen, n_heads, d_state): each group's rows repeated."""
    n_groups = t.shape[2]
    assert n_heads % n_groups == 0, f"n_heads {n_heads} is not a multiple of n_groups {n_groups}"
    return t.repeat_interleave(n_heads // n_groups, dim=2)


def ssd_step(x, dt, A, B, C, D, state):
    """One position of (1)-(2): x (bsz, n_heads, head_dim), dt (bsz, n_heads), B/C (bsz, n_groups, d_state),
    state (bsz, n_heads, head_dim, d_state) -> (y (bsz, n_heads, head_dim), new state)."""
    n_heads = x.shape[1]
    B, C = _heads_of_groups(B[:, None], n_heads)[:, 0], _heads_of_groups(C[:, None], n_heads)[:, 0]
    decay = torch.exp(dt * A)[..., None, None]  # (bsz, n_heads, 1, 1)
    state = decay * state + (dt[..., None] * x)[..., None] * B[:, :, None, :]
    y = torch.einsum("bhpn,bhn->bhp", state, C) + D[:, None] * x
    return y, state


def ssd_sequential_ref(x, dt, A, B, C, D, initial_state=None):
    """(1)-(2) position by position; returns (y like x, final state)."""
    bsz, seqlen, n_heads, head_dim = x.shape
    d_state = B.shape[-1]
    state = x.new_zeros(bsz, n_heads, head_dim, d_state) if initial_state is None else initial_state
    ys = []
    for t in range(seqlen):
        y, state = ssd_step(x[:, t], dt[:, t], A, B[:, t], C[:, t], D, state)
        ys.append(y)
    return torch.stack(ys, dim=1), state


def segsum(a: torch.Tensor) -> torch.Tensor:
    """(..., L) -> (..., L, L): out[i, j] = a[j+1] + ... + a[i] for i >= j, -inf above the diagonal,
    so exp(out) is the decay from position j to position i."""
    L = a.shape[-1]
    cs = torch.cumsum(a, dim=-1)
    out = cs[..., :, None] - cs[..., None, :]
    mask = torch.tril(torch.ones(L, L, dtype=torch.bool, device=a.device))
    return out.masked_fill(~mask, float("-inf"))


def ssd_chunked(x, dt, A, B, C, D, chunk_size: int = 64, initial_state=None):
    """The chunked SSD scan; same result as :func:`ssd_sequential_ref` (tested), in O(seqlen * chunk) work
    of batched matmuls instead of a loop over positions. Returns (y like x, final state)."""
    bsz, seqlen, n_heads, head_dim = x.shape
    d_state = B.shape[-1]
    B, C = _heads_of_groups(B, n_heads), _heads_of_groups(C, n_heads)
    # Pad to whole chunks with dt = 0: a padded position neither decays nor writes the state.
    pad = (-seqlen) % chunk_size
    if pad:
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    n_chunks = x.shape[1] // chunk_size

    def chunks(t):  # (bsz, n_chunks * L, ...) -> (bsz, n_chunks, L, ...)
        return t.reshape(bsz, n_chunks, chunk_size, *t.shape[2:])

    x, B, C, dt = chunks(x), chunks(B), chunks(C), chunks(dt)
    a = (dt * A).permute(0, 3, 1, 2)  # (bsz, n_heads, n_chunks, L): log-decay per position
    a_cum = torch.cumsum(a, dim=-1)  # (bsz, n_heads, n_chunks, L)
    xdt = x * dt[..., None]  # (bsz, n_chunks, L, n_heads, head_dim): the input term of (1)

    # step 1: within each chunk, y_i = sum_{j <= i} (C_i . B_j) exp(a_{j+1} + ... + a_i) dt_j x_j
    decay_in_chunk = torch.exp(segsum(a))  # (bsz, n_heads, n_chunks, L, L)
    y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, decay_in_chunk, xdt)

    # step 2: each chunk's final state from its own inputs: sum_j exp(a_{j+1} + ... + a_L) dt_j x_j B_j^T
    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum)  # (bsz, n_heads, n_chunks, L)
    chunk_states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, decay_to_end, xdt)

    # step 3: the state each chunk starts with, from the initial state and the chunks before it
    if initial_state is None:
        initial_state = x.new_zeros(bsz, n_heads, head_dim, d_state)
    states = torch.cat([initial_state[:, None], chunk_states], dim=1)  # (bsz, n_chunks + 1, n_heads, p, n)
    chunk_decay = torch.exp(segsum(F.pad(a_cum[..., -1], (1, 0))))  # (bsz, n_heads, n_chunks + 1, n_chunks + 1)
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)
    starts, final_state = states[:, :-1], states[:, -1]

    # step 4: the contribution of the state a chunk started with: y_i += exp(a_1 + ... + a_i) C_i h_start
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, starts, torch.exp(a_cum))

    y = (y_diag + y_off).reshape(bsz, n_chunks * chunk_size, n_heads, head_dim)[:, :seqlen]
    y = y + D[:, None] * x.reshape(bsz, n_chunks * chunk_size, n_heads, head_dim)[:, :seqlen]
    return y, final_state
