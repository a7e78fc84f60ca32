"""The Mamba2 mixer in plain PyTorch: what replaces an attention layer in the Llama-Mamba2 hybrid.

One mixer, step by step (Dao & Gu 2024; parameter names are mamba_ssm's / MambaInLlama's):
1. ``in_proj`` maps the normed hidden state to [z, x, B, C, dt] (gate, input, state in/out maps, step).
2. x, B and C go through a causal depthwise conv of width ``d_conv`` and SiLU; its state is the last
   ``d_conv - 1`` inputs.
3. dt = softplus(dt + dt_bias); A = -exp(A_log); the SSD scan (turbo/hybrid/ssd.py) turns (x, dt, A, B, C, D)
   into y and the scan state, chunked over a prompt, one step per decoded token.
4. y = RMSNorm_per_group(y * silu(z)) * norm.weight (mamba_ssm's grouped norm: d_inner / n_groups channels
   a group), then ``out_proj``.

The state a request carries between forwards (and a prefix cache saves) is :class:`Mamba2State`: the conv
window and the scan state, fixed-size whatever the sequence length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .ssd import ssd_chunked, ssd_step


@dataclass(frozen=True)
class Mamba2Config:
    hidden_size: int
    n_heads: int
    head_dim: int
    n_groups: int
    d_state: int
    d_conv: int = 4
    chunk_size: int = 64
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.n_heads % self.n_groups:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_groups ({self.n_groups})")
        if self.d_conv < 1:
            raise ValueError(f"d_conv must be >= 1, got {self.d_conv}")

    @property
    def d_inner(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        """Channels through the conv: x, B and C."""
        return self.d_inner + 2 * self.n_groups * self.d_state

    @property
    def in_proj_dim(self) -> int:
        return 2 * self.d_inner + 2 * self.n_groups * self.d_state + self.n_heads  # z, x, B, C, dt


@dataclass
class Mamba2State:
    conv: torch.Tensor  # (bsz, conv_dim, d_conv - 1): the last inputs of the conv
    ssm: torch.Tensor  # (bsz, n_heads, head_dim, d_state)

    @classmethod
    def zeros(cls, cfg: Mamba2Config, bsz: int, dtype=torch.float32) -> Mamba2State:
        return cls(torch.zeros(bsz, cfg.conv_dim, cfg.d_conv - 1, dtype=dtype),
                   torch.zeros(bsz, cfg.n_heads, cfg.head_dim, cfg.d_state, dtype=dtype))


def causal_conv1d_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, window: torch.Tensor):
    """Depthwise causal conv: x (bsz, channels, seqlen), weight (channels, d_conv), window (bsz, channels,
    d_conv - 1) the inputs before x. Returns (out (bsz, channels, seqlen), the new window)."""
    full = torch.cat([window, x], dim=-1)  # (bsz, channels, d_conv - 1 + seqlen)
    out = F.conv1d(full, weight[:, None, :], bias, groups=weight.shape[0])
    return out, full[..., full.shape[-1] - window.shape[-1]:]


def gated_rms_norm(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, group_size: int, eps: float):
    """RMSNorm of y * silu(z) over each group of ``group_size`` channels, times ``weight``: (..., d_inner)."""
    g = (y * F.silu(z)).float()
    g = g.unflatten(-1, (-1, group_size))
    g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)
    return g.flatten(-2).to(y.dtype) * weight


class Mamba2Mixer(nn.Module):
    def __init__(self, cfg: Mamba2Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.in_proj = nn.Linear(cfg.hidden_size, cfg.in_proj_dim, bias=False)
        self.conv1d = nn.Conv1d(cfg.conv_dim, cfg.conv_dim, cfg.d_conv, groups=cfg.conv_dim, bias=True)
        self.dt_bias = nn.Parameter(torch.zeros(cfg.n_heads))
        self.A_log = nn.Parameter(torch.zeros(cfg.n_heads))
        self.D = nn.Parameter(torch.ones(cfg.n_heads))
        self.norm = nn.Module()
        self.norm.weight = nn.Parameter(torch.ones(cfg.d_inner))
        self.out_proj = nn.Linear(cfg.d_inner, cfg.hidden_size, bias=False)

    def forward(self, h: torch.Tensor, state: Mamba2State | None = None) -> tuple[torch.Tensor, Mamba2State]:
        """h: (bsz, seqlen, hidden). ``state`` None starts from zeros (a fresh request). Returns the output
        (bsz, seqlen, hidden) and the state after the last position."""
        cfg = self.cfg
        bsz, seqlen, _ = h.shape
        state = state or Mamba2State.zeros(cfg, bsz, h.dtype)
        # 1. projections
        z, xbc, dt = self.in_proj(h).split([cfg.d_inner, cfg.conv_dim, cfg.n_heads], dim=-1)
        # 2. causal conv + SiLU over x, B, C
        xbc, conv_window = causal_conv1d_ref(xbc.transpose(1, 2), self.conv1d.weight[:, 0], self.conv1d.bias, state.conv)
        xbc = F.silu(xbc.transpose(1, 2))  # (bsz, seqlen, conv_dim)
        x, B, C = xbc.split([cfg.d_inner, cfg.n_groups * cfg.d_state, cfg.n_groups * cfg.d_state], dim=-1)
        x = x.unflatten(-1, (cfg.n_heads, cfg.head_dim))  # (bsz, seqlen, n_heads, head_dim)
        B, C = B.unflatten(-1, (cfg.n_groups, cfg.d_state)), C.unflatten(-1, (cfg.n_groups, cfg.d_state))
        # 3. the scan
        dt = F.softplus(dt + self.dt_bias)  # (bsz, seqlen, n_heads)
        A = -torch.exp(self.A_log.float())
        if seqlen == 1:
            y, ssm = ssd_step(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], self.D, state.ssm)
            y = y[:, None]
        else:
            y, ssm = ssd_chunked(x, dt, A, B, C, self.D, cfg.chunk_size, state.ssm)
        # 4. gate, norm, out
        y = gated_rms_norm(y.flatten(-2), z, self.norm.weight, cfg.d_inner // cfg.n_groups, cfg.norm_eps)
        return self.out_proj(y), Mamba2State(conv_window, ssm)
