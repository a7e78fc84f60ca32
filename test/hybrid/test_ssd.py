"""Mamba2's scan (turbo/hybrid/ssd.py): the chunked prefill algorithm against the position-by-position
definition, in float64 so that any real difference shows; and the state hand-off prefix caching needs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from turbo.hybrid.ssd import segsum, ssd_chunked, ssd_sequential_ref, ssd_step

TOL = 1e-10  # float64


def inputs(bsz=2, seqlen=37, n_heads=4, head_dim=8, n_groups=2, d_state=16, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    x = r(bsz, seqlen, n_heads, head_dim)
    dt = F.softplus(r(bsz, seqlen, n_heads))
    A = -torch.rand(n_heads, generator=g, dtype=torch.float64) * 2
    return x, dt, A, r(bsz, seqlen, n_groups, d_state), r(bsz, seqlen, n_groups, d_state), r(n_heads)


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def test_segsum_is_the_sum_between_two_positions():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    s = segsum(a)
    assert s[3, 1] == 3.0 + 4.0 and s[2, 2] == 0.0 and s[1, 3] == float("-inf"), f"{s=}"


@pytest.mark.parametrize("chunk_size", [1, 5, 8, 37, 64])
@pytest.mark.parametrize("with_initial_state", [False, True])
def test_chunked_scan_equals_the_sequential_definition(chunk_size, with_initial_state):
    x, dt, A, B, C, D = inputs()
    s0 = torch.randn(2, 4, 8, 16, dtype=torch.float64) if with_initial_state else None
    y_ref, h_ref = ssd_sequential_ref(x, dt, A, B, C, D, s0)
    y, h = ssd_chunked(x, dt, A, B, C, D, chunk_size, s0)
    assert max_diff(y, y_ref) < TOL and max_diff(h, h_ref) < TOL, f"y {max_diff(y, y_ref)} state {max_diff(h, h_ref)}"


@pytest.mark.parametrize("n_groups", [1, 4])
def test_groups_are_shared_by_consecutive_heads(n_groups):
    x, dt, A, B, C, D = inputs(n_groups=n_groups)
    y_ref, _ = ssd_sequential_ref(x, dt, A, B, C, D)
    y, _ = ssd_chunked(x, dt, A, B, C, D, 16)
    assert max_diff(y, y_ref) < TOL, f"{n_groups=}: {max_diff(y, y_ref)}"


def test_a_prefix_state_continues_exactly_like_the_whole_sequence():
    """What a radix-cache hit of a saved state relies on: scan(prefix) then scan(rest, from its state)
    equals scan(whole)."""
    x, dt, A, B, C, D = inputs(seqlen=50)
    y_all, h_all = ssd_chunked(x, dt, A, B, C, D, 16)
    cut = 21
    y1, h1 = ssd_chunked(x[:, :cut], dt[:, :cut], A, B[:, :cut], C[:, :cut], D, 16)
    y2, h2 = ssd_chunked(x[:, cut:], dt[:, cut:], A, B[:, cut:], C[:, cut:], D, 16, initial_state=h1)
    assert max_diff(torch.cat([y1, y2], 1), y_all) < TOL and max_diff(h2, h_all) < TOL


def test_decode_steps_after_a_prefill_equal_the_whole_scan():
    x, dt, A, B, C, D = inputs(seqlen=30)
    y_all, _ = ssd_chunked(x, dt, A, B, C, D, 8)
    _, h = ssd_chunked(x[:, :26], dt[:, :26], A, B[:, :26], C[:, :26], D, 8)
    for t in range(26, 30):
        y_t, h = ssd_step(x[:, t], dt[:, t], A, B[:, t], C[:, t], D, h)
        assert max_diff(y_t, y_all[:, t]) < TOL, f"step {t}: {max_diff(y_t, y_all[:, t])}"


def test_a_zero_dt_position_leaves_the_state_untouched():
    """Padding relies on it: dt = 0 neither decays the state nor writes to it."""
    x, dt, A, B, C, D = inputs(bsz=1, seqlen=1)
    h0 = torch.randn(1, 4, 8, 16, dtype=torch.float64)
    _, h = ssd_step(x[:, 0], torch.zeros_like(dt[:, 0]), A, B[:, 0], C[:, 0], D, h0)
    assert torch.equal(h, h0)
