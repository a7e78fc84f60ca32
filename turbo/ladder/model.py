"""A Llama in plain PyTorch whose layers run the standard or the Ladder-Residual schedule.

Single process, gpt-fast style: the math of one decoder layer, then the layers wired by
``turbo.ladder.residual.residual_stream``. Parameter names are the transformers checkpoint names
(``model.layers.0.self_attn.q_proj.weight`` ...), so a Llama checkpoint loads as is and a ladder
checkpoint is a Llama checkpoint whose config says which layers are ladder:

    config.json: "architectures": ["LadderLlamaForCausalLM"], "ladder_start_layer": K

Layers ``K .. n-1`` are ladder (each of their two sub-layers feeds the stream one sub-layer late),
layers ``0 .. K-1`` standard. ``K = n`` (or a plain ``LlamaForCausalLM`` config) is exactly Llama.

No KV cache: the reference recomputes the whole sequence (tiny models; it is the thing tests compare
the served model against, and what the adaptation recipe trains).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from turbo.llama import MLP, Attention, LlamaShape, LMOutput, RMSNorm, greedy_recompute, rope_tables

from .residual import Communicator, LocalCommunicator, SubLayer, residual_stream

ARCHITECTURE = "LadderLlamaForCausalLM"
LLAMA_ARCHITECTURE = "LlamaForCausalLM"
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


@dataclass(frozen=True)
class LadderLlamaConfig(LlamaShape):
    """A Llama's shape plus ``ladder_start_layer``."""

    ladder_start_layer: int = 0  # layers >= this run the ladder schedule; num_hidden_layers = plain Llama

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.ladder_start_layer <= self.num_hidden_layers:
            raise ValueError(
                f"ladder_start_layer must be in [0, {self.num_hidden_layers}] for a {self.num_hidden_layers}-layer "
                f"model, got {self.ladder_start_layer}"
            )

    @property
    def ladder_layers(self) -> list[int]:
        return list(range(self.ladder_start_layer, self.num_hidden_layers))

    @classmethod
    def from_hf_dict(cls, cfg: dict) -> LadderLlamaConfig:
        """From a transformers Llama config.json (plain Llama configs give ``ladder_start_layer = n``)."""
        fields = LlamaShape.hf_fields(cfg)
        is_ladder = ARCHITECTURE in (cfg.get("architectures") or [])
        start = int(cfg.get("ladder_start_layer", 0)) if is_ladder else fields["num_hidden_layers"]
        return cls(**fields, ladder_start_layer=start)


class DecoderLayer(nn.Module):
    """A Llama decoder layer as two residual branches; the schedule decides how they join the stream."""

    def __init__(self, cfg: LadderLlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def attention_branch(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return self.self_attn(self.input_layernorm(x), cos, sin)

    def mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: LadderLlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LadderLlama(nn.Module):
    """``forward(input_ids)`` -> ``LMOutput(logits)``; layers from ``cfg.ladder_start_layer`` on are ladder."""

    def __init__(self, cfg: LadderLlamaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def sublayers(self, cos: torch.Tensor, sin: torch.Tensor) -> list[SubLayer]:
        """The residual branches in order: attention_0, mlp_0, attention_1, ..."""
        out = []
        for i, layer in enumerate(self.model.layers):
            deferred = i >= self.cfg.ladder_start_layer
            out.append(SubLayer(lambda x, layer=layer: layer.attention_branch(x, cos, sin), deferred))
            out.append(SubLayer(layer.mlp_branch, deferred))
        return out

    def forward(self, input_ids: torch.Tensor, comm: Communicator | None = None) -> LMOutput:
        """input_ids: (bsz, seqlen). ``comm`` None is one process (the all-reduce is the identity)."""
        cos, sin = rope_tables(input_ids.shape[1], self.cfg.head_dim, self.cfg.rope_theta)
        x = self.model.embed_tokens(input_ids)  # (bsz, seqlen, hidden)
        x = residual_stream(x, self.sublayers(cos, sin), comm or LocalCommunicator())
        return LMOutput(self.lm_head(self.model.norm(x)))

    def greedy(self, input_ids: list[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation of one prompt (the whole sequence recomputed each step)."""
        return greedy_recompute(self, input_ids, max_new_tokens)


def load_hf_config(model_dir: str | Path) -> dict:
    return json.loads((Path(model_dir) / CONFIG_FILE).read_text())


def load_model(model_dir: str | Path, ladder_start_layer: int | None = None) -> LadderLlama:
    """A Llama or ladder checkpoint directory as a :class:`LadderLlama` in float32.

    ``ladder_start_layer`` overrides the checkpoint's (a plain Llama checkpoint loads as plain Llama).
    """
    from dataclasses import replace

    from safetensors.torch import load_file

    cfg = LadderLlamaConfig.from_hf_dict(load_hf_config(model_dir))
    if ladder_start_layer is not None:
        cfg = replace(cfg, ladder_start_layer=ladder_start_layer)
    model = LadderLlama(cfg)
    state = load_file(str(Path(model_dir) / WEIGHTS_FILE))
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise ValueError(f"{model_dir}: checkpoint does not fit the config: missing {missing}, unexpected {unexpected}")
    return model.eval()


def save_model(model: LadderLlama, out_dir: str | Path, base_hf_config: dict) -> None:
    """Writes ``model`` as a transformers-format ladder checkpoint: ``base_hf_config`` with the ladder
    architecture and ``ladder_start_layer``, and the weights under their Llama names."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_word_embeddings:
        state.pop("lm_head.weight")  # transformers re-ties it from the embedding
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    hf = dict(base_hf_config, architectures=[ARCHITECTURE], ladder_start_layer=model.cfg.ladder_start_layer)
    (out / CONFIG_FILE).write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
