"""A Llama whose attention layers, all but a chosen few, are Mamba2 mixers (MambaInLlama,
https://arxiv.org/abs/2408.15237), in plain PyTorch.

Every layer keeps Llama's pre-norm residual structure and MLP; layer i's token mixer is Llama attention
(with RoPE) when i is in ``attention_layers``, else a :class:`~turbo.hybrid.mamba2.Mamba2Mixer` (no
positional encoding: the scan is ordered). Checkpoint names are Llama's, with ``model.layers.i.mamba.*``
in place of ``model.layers.i.self_attn.*`` for the Mamba layers. config.json is a Llama config plus:

    "architectures": ["LlamaMamba2ForCausalLM"], "model_type": "llama_mamba2",
    "attention_layers": [2, 5], "mamba_n_heads": 4, "mamba_head_dim": 64, "mamba_n_groups": 4,
    "mamba_d_state": 64, "mamba_d_conv": 4, "mamba_chunk_size": 64

No caches: the reference recomputes the whole sequence (it is what tests compare the served model
against, and what distillation trains).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from turbo.llama import MLP, Attention, LlamaShape, LMOutput, RMSNorm, greedy_recompute, rope_tables

from .mamba2 import Mamba2Config, Mamba2Mixer

ARCHITECTURE = "LlamaMamba2ForCausalLM"
MODEL_TYPE = "llama_mamba2"
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
# The mixer-shape fields of config.json, each an int with HybridLlamaConfig's default when absent.
MAMBA_FIELDS = ("mamba_n_heads", "mamba_head_dim", "mamba_n_groups", "mamba_d_state", "mamba_d_conv", "mamba_chunk_size")


@dataclass(frozen=True)
class HybridLlamaConfig(LlamaShape):
    """A Llama's shape, which layers keep attention, and the Mamba2 mixers' shape."""

    attention_layers: tuple[int, ...] = field(default_factory=tuple)
    mamba_n_heads: int = 4
    mamba_head_dim: int = 64
    mamba_n_groups: int = 4
    mamba_d_state: int = 64
    mamba_d_conv: int = 4
    mamba_chunk_size: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        layers = list(self.attention_layers)
        n = self.num_hidden_layers
        if layers != sorted(set(layers)) or any(not 0 <= i < n for i in layers):
            raise ValueError(
                f"attention_layers must be distinct ascending layer indices of this {n}-layer model "
                f"(0..{n - 1}), got {layers}"
            )
        _ = self.mamba  # Mamba2Config raises ValueError for an impossible mixer shape

    @property
    def mamba_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if i not in self.attention_layers]

    @property
    def mamba(self) -> Mamba2Config:
        return Mamba2Config(hidden_size=self.hidden_size, n_heads=self.mamba_n_heads, head_dim=self.mamba_head_dim,
                            n_groups=self.mamba_n_groups, d_state=self.mamba_d_state, d_conv=self.mamba_d_conv,
                            chunk_size=self.mamba_chunk_size, norm_eps=self.rms_norm_eps)

    @classmethod
    def from_hf_dict(cls, cfg: dict) -> HybridLlamaConfig:
        extra = {k: int(cfg[k]) for k in MAMBA_FIELDS if k in cfg}
        return cls(**LlamaShape.hf_fields(cfg), attention_layers=tuple(cfg.get("attention_layers", ())), **extra)

    def hf_fields(self) -> dict:
        """The config.json entries a hybrid adds to its Llama config."""
        return {"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, "attention_layers": list(self.attention_layers),
                **{k: getattr(self, k) for k in MAMBA_FIELDS}}


class HybridLayer(nn.Module):
    def __init__(self, cfg: HybridLlamaConfig, layer_id: int) -> None:
        super().__init__()
        self.is_attention = layer_id in cfg.attention_layers
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if self.is_attention:
            self.self_attn = Attention(cfg)
        else:
            self.mamba = Mamba2Mixer(cfg.mamba)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = self.input_layernorm(x)
        x = x + (self.self_attn(h, cos, sin) if self.is_attention else self.mamba(h)[0])
        return x + self.mlp(self.post_attention_layernorm(x))


class HybridBackbone(nn.Module):
    def __init__(self, cfg: HybridLlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(HybridLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class HybridLlama(nn.Module):
    """``forward(input_ids)`` -> ``LMOutput(logits)``."""

    def __init__(self, cfg: HybridLlamaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = HybridBackbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor) -> LMOutput:
        cos, sin = rope_tables(input_ids.shape[1], self.cfg.head_dim, self.cfg.rope_theta)
        x = self.model.embed_tokens(input_ids)  # (bsz, seqlen, hidden)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        return LMOutput(self.lm_head(self.model.norm(x)))

    def greedy(self, input_ids: list[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation of one prompt (the whole sequence recomputed each step)."""
        return greedy_recompute(self, input_ids, max_new_tokens)


def load_model(model_dir: str | Path) -> HybridLlama:
    """A hybrid checkpoint directory as a :class:`HybridLlama` in float32."""
    from safetensors.torch import load_file

    cfg = HybridLlamaConfig.from_hf_dict(json.loads((Path(model_dir) / CONFIG_FILE).read_text()))
    model = HybridLlama(cfg)
    state = {k: v.float() for k, v in load_file(str(Path(model_dir) / WEIGHTS_FILE)).items()}
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{model_dir}: checkpoint does not fit the config: missing {missing}, unexpected {unexpected}")
    return model.eval()


def save_model(model: HybridLlama, out_dir: str | Path, base_hf_config: dict) -> None:
    """Writes ``model`` as a hybrid checkpoint: the Llama ``base_hf_config`` plus the hybrid's fields."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_word_embeddings:
        state.pop("lm_head.weight")
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    hf = dict(base_hf_config, **model.cfg.hf_fields())
    (out / CONFIG_FILE).write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
