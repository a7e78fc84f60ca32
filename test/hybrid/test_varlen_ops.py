"""The portable Mamba2 ops (turbo/hybrid/varlen_ops.py), in SGLang's varlen / state-pool calling form,
equal the naive sequential scan run one sequence at a time: prefill of a mixed batch (fresh sequences
and sequences continuing from a saved state), decode steps, and pad slots left untouched."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from turbo.hybrid import varlen_ops
from turbo.hybrid.mamba2 import causal_conv1d_ref
from turbo.hybrid.ssd import ssd_sequential_ref

H, P, G, N, WIDTH = 4, 8, 2, 16, 4  # heads, head_dim, groups, d_state, conv width
DIM = H * P + 2 * G * N  # conv channels: x, B, C
POOL = 6
LENGTHS = [7, 1, 19]  # sequences of one prefill batch
SLOTS = [4, 1, 2]  # their pool rows
HAS_STATE = [False, True, True]  # the 2nd and 3rd continue from a saved state (chunked prefill, radix hit)


def _params(gen):
    A = -torch.rand(H, generator=gen) * 2 - 0.1
    D = torch.randn(H, generator=gen)
    dt_bias = torch.randn(H, generator=gen) * 0.5
    weight = torch.randn(DIM, WIDTH, generator=gen) * 0.5
    bias = torch.randn(DIM, generator=gen) * 0.1
    return A, D, dt_bias, weight, bias


def _sequential_conv(x, weight, bias, window):
    """One sequence x (dim, T) through the conv one position at a time, from ``window`` (dim, width-1)."""
    outs = []
    for t in range(x.shape[1]):
        full = torch.cat([window, x[:, t : t + 1]], dim=1)  # (dim, width)
        outs.append((full * weight).sum(1) + bias)
        window = full[:, 1:]
    return F.silu(torch.stack(outs, dim=1)), window


def test_prefill_conv_and_scan_of_a_mixed_batch_equal_the_sequential_reference():
    gen = torch.Generator().manual_seed(0)
    A, D, dt_bias, weight, bias = _params(gen)
    T = sum(LENGTHS)
    conv_states = torch.randn(POOL, DIM, WIDTH - 1, generator=gen)
    ssm_states = torch.randn(POOL, H, P, N, generator=gen) * 0.1
    conv_before, ssm_before = conv_states.clone(), ssm_states.clone()
    xbc = torch.randn(DIM, T, generator=gen)
    dt = torch.randn(1, T, H, generator=gen)
    starts = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    slots = torch.tensor(SLOTS, dtype=torch.int32)
    has_state = torch.tensor(HAS_STATE)

    conv_out = varlen_ops.causal_conv1d_fn(xbc, weight, bias, query_start_loc=starts, cache_indices=slots,
                                           has_initial_state=has_state, conv_states=conv_states, activation="silu")
    x, B, C = conv_out.T.split([H * P, G * N, G * N], dim=-1)
    initial = torch.where(has_state[:, None, None, None], ssm_before[slots.long()], 0)
    y = torch.empty(1, T, H, P)
    _, final, _ = varlen_ops.mamba_chunk_scan_combined(
        x.reshape(1, T, H, P), dt, A, B.reshape(1, T, G, N), C.reshape(1, T, G, N), chunk_size=8, D=D,
        dt_bias=dt_bias, initial_states=initial, cu_seqlens=starts, dt_softplus=True, out=y,
        return_varlen_states=True, return_track_states=True)

    for i, (s, e) in enumerate(zip(starts[:-1].tolist(), starts[1:].tolist())):
        window = conv_before[SLOTS[i]] if HAS_STATE[i] else torch.zeros(DIM, WIDTH - 1)
        want_conv, want_window = _sequential_conv(xbc[:, s:e], weight, bias, window)
        torch.testing.assert_close(conv_out[:, s:e], want_conv, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(conv_states[SLOTS[i]], want_window)
        xs, Bs, Cs = want_conv.T.split([H * P, G * N, G * N], dim=-1)
        want_y, want_state = ssd_sequential_ref(
            xs.reshape(1, e - s, H, P), F.softplus(dt[:, s:e] + dt_bias), A, Bs.reshape(1, e - s, G, N),
            Cs.reshape(1, e - s, G, N), D, initial[i : i + 1])
        torch.testing.assert_close(y[:, s:e], want_y, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(final[i], want_state[0], rtol=1e-4, atol=1e-4)
    untouched = [r for r in range(POOL) if r not in SLOTS]
    torch.testing.assert_close(conv_states[untouched], conv_before[untouched])


def test_decode_steps_equal_the_recurrence_and_skip_pad_slots():
    gen = torch.Generator().manual_seed(1)
    A, D, dt_bias, weight, bias = _params(gen)
    conv_states = torch.randn(POOL, DIM, WIDTH - 1, generator=gen)
    ssm_states = torch.randn(POOL, H, P, N, generator=gen) * 0.1
    slots = torch.tensor([3, varlen_ops.PAD_SLOT_ID, 0], dtype=torch.int32)
    live = [0, 2]
    conv_ref, ssm_ref = conv_states.clone(), ssm_states.clone()
    for step in range(3):
        xbc = torch.randn(3, DIM, generator=gen)
        dt = torch.randn(3, H, generator=gen)
        out_conv = varlen_ops.causal_conv1d_update(xbc, conv_states, weight, bias, "silu",
                                                   conv_state_indices=slots)
        x, B, C = out_conv.split([H * P, G * N, G * N], dim=-1)
        y = torch.full((3, H, P), 7.0)
        # MambaMixer2's decode call: dt, dt_bias, D repeated over head_dim; A over (head_dim, d_state).
        varlen_ops.selective_state_update(
            ssm_states, x.reshape(3, H, P), dt[:, :, None].expand(-1, -1, P), A[:, None, None].expand(-1, P, N),
            B.reshape(3, G, N), C.reshape(3, G, N), D[:, None].expand(-1, P), dt_bias=dt_bias[:, None].expand(-1, P),
            dt_softplus=True, state_batch_indices=slots, out=y)
        for b in live:
            slot = int(slots[b])
            want_conv, window = causal_conv1d_ref(xbc[b][None, :, None], weight, bias, conv_ref[slot][None])
            conv_ref[slot] = window[0]
            torch.testing.assert_close(out_conv[b], F.silu(want_conv[0, :, 0]), rtol=1e-5, atol=1e-5)
            xs, Bs, Cs = F.silu(want_conv[0, :, 0]).split([H * P, G * N, G * N])
            want_y, ssm_ref[slot : slot + 1] = ssd_sequential_ref(
                xs.reshape(1, 1, H, P), F.softplus(dt[b] + dt_bias).reshape(1, 1, H), A, Bs.reshape(1, 1, G, N),
                Cs.reshape(1, 1, G, N), D, ssm_ref[slot : slot + 1])
            torch.testing.assert_close(y[b], want_y[0, 0], rtol=1e-4, atol=1e-4)
        assert torch.all(y[1] == 0), f"a pad row's output must be zero, got {y[1]}"
        torch.testing.assert_close(ssm_states, ssm_ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(conv_states, conv_ref)


def test_what_the_portable_ops_do_not_implement_raises():
    x = torch.zeros(2, 3, H, P)  # several tokens per request: speculative verify
    with pytest.raises(NotImplementedError, match="speculative verify"):
        varlen_ops.selective_state_update(torch.zeros(POOL, H, P, N), x, x, torch.zeros(H, P, N),
                                          torch.zeros(2, 3, G, N), torch.zeros(2, 3, G, N))
    with pytest.raises(NotImplementedError, match="no_buffer"):
        varlen_ops.mamba_chunk_scan_combined(torch.zeros(1, 4, H, P), torch.zeros(1, 4, H), torch.zeros(H),
                                             torch.zeros(1, 4, G, N), torch.zeros(1, 4, G, N), 8,
                                             track_seq_idx=torch.zeros(1))
    with pytest.raises(NotImplementedError, match="activation"):
        varlen_ops.causal_conv1d_update(torch.zeros(1, DIM), torch.zeros(1, DIM, WIDTH - 1),
                                        torch.zeros(DIM, WIDTH), activation="relu")
