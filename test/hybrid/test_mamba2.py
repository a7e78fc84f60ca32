"""The Mamba2 mixer (turbo/hybrid/mamba2.py): decode steps continue a prefill exactly, the conv against a
position-by-position loop, and configuration errors. float64, random weights."""

from __future__ import annotations

import pytest
import torch

from turbo.hybrid.mamba2 import Mamba2Config, Mamba2Mixer, causal_conv1d_ref

TOL = 1e-10


def mixer(chunk_size=8, seed=0) -> Mamba2Mixer:
    torch.manual_seed(seed)
    m = Mamba2Mixer(Mamba2Config(hidden_size=32, n_heads=4, head_dim=8, n_groups=2, d_state=16,
                                 chunk_size=chunk_size)).double()
    with torch.no_grad():
        m.A_log.uniform_(-1, 1)
        m.dt_bias.normal_()
        m.D.normal_()
        m.norm.weight.normal_()
    return m


def test_causal_conv_equals_a_loop_over_positions():
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(2, 6, 11, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g, dtype=torch.float64),
               torch.randn(6, generator=g, dtype=torch.float64))
    window = torch.randn(2, 6, 3, generator=g, dtype=torch.float64)
    out, new_window = causal_conv1d_ref(x, w, b, window)
    full = torch.cat([window, x], -1)
    want = torch.stack([(full[..., t : t + 4] * w).sum(-1) + b for t in range(11)], -1)
    assert (out - want).abs().max() < TOL and torch.equal(new_window, x[..., -3:]), f"{(out - want).abs().max()=}"


def test_decode_steps_continue_a_prefill_exactly():
    m = mixer()
    h = torch.randn(2, 21, 32, dtype=torch.float64)
    with torch.no_grad():
        y_all, s_all = m(h)
        y, s = m(h[:, :13])
        ys = [y]
        for t in range(13, 21):
            y_t, s = m(h[:, t : t + 1], s)
            ys.append(y_t)
    diff = (torch.cat(ys, 1) - y_all).abs().max().item()
    assert diff < TOL and (s.ssm - s_all.ssm).abs().max() < TOL and (s.conv - s_all.conv).abs().max() < TOL, f"{diff=}"


def test_a_chunked_prefill_from_a_saved_state_equals_one_prefill():
    """Chunked prefill and radix-cache hits hand the state of the first part to the second."""
    m = mixer()
    h = torch.randn(1, 40, 32, dtype=torch.float64)
    with torch.no_grad():
        y_all, _ = m(h)
        y1, s = m(h[:, :17])
        y2, _ = m(h[:, 17:], s)
    assert (torch.cat([y1, y2], 1) - y_all).abs().max() < TOL


def test_the_output_does_not_depend_on_the_chunk_size():
    h = torch.randn(2, 30, 32, dtype=torch.float64)
    with torch.no_grad():
        outs = [mixer(chunk_size=c)(h)[0] for c in (1, 7, 64)]
    assert max((o - outs[0]).abs().max().item() for o in outs) < TOL


def test_the_mixer_is_causal():
    m = mixer()
    h = torch.randn(1, 12, 32, dtype=torch.float64)
    h2 = h.clone()
    h2[:, 8:] += 1.0
    with torch.no_grad():
        a, b = m(h)[0], m(h2)[0]
    assert torch.equal(a[:, :8], b[:, :8]) and not torch.equal(a[:, 8:], b[:, 8:])


@pytest.mark.parametrize("kw, match", [({"n_groups": 3}, "multiple of n_groups"), ({"d_conv": 0}, "d_conv")])
def test_a_bad_shape_is_refused_naming_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        Mamba2Config(**{**dict(hidden_size=32, n_heads=4, head_dim=8, n_groups=2, d_state=16), **kw})
