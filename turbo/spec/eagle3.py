"""EAGLE-3 draft head (https://arxiv.org/abs/2503.01840) in plain PyTorch, checkpoint-compatible with
SGLang's ``LlamaForCausalLMEagle3`` (``sglang/srt/models/llama_eagle3.py``, sglang 0.5.23).

What the head computes, step by step (one draft decoder layer, as SGLang runs it):
1. Target features: the target's residual stream after each layer in ``aux_layer_ids``, concatenated
   (``n_aux * target_hidden``) and projected by ``fc`` to ``hidden_size``. SGLang captures them at the
   *input* of target layer ``id + 1`` (``set_eagle3_layers_to_capture``: ``layers_to_capture = id + 1``),
   which is transformers' ``output_hidden_states[id + 1]``; ``id + 1`` must be a real layer (< n_layers).
2. At position p the layer reads ``[input_layernorm(embed(x[p+1])), hidden_norm(h[p])]`` (``2 * hidden``
   wide) into q/k/v, where ``h[p]`` is the projected target feature of position p (draft extend) or
   the head's own output at the previous position (chain steps >= 1, where ``fc`` is skipped).
3. ``r = h + o_proj(attn)``; ``out = r + mlp(post_attention_layernorm(r))``: ``out`` (pre-norm) is the
   hidden state SGLang feeds back to the next draft step, and ``lm_head(norm(out))`` are the logits.

Embedding and head in SGLang: ``EAGLEWorkerV2.init_lm_head`` always rebinds ``embed_tokens`` to the
target's embedding (``set_embed``; the draft must have ``hidden_size == target_hidden_size``), so it is
frozen here and saved only as a copy of the target's. ``lm_head`` is the draft's own (config
``tie_word_embeddings: false`` with ``draft_vocab_size`` set), trained, over the full target vocab, so no
``d2t``/``t2d`` hot-token map is shipped (SGLang then leaves ``hot_token_id`` as None).

Parameter names are the checkpoint names: ``model.layers.0.self_attn.q_proj.weight`` etc. SGLang's
``load_weights`` stacks q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj`` by name.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from turbo.llama import MLP

ARCHITECTURE = "LlamaForCausalLMEagle3"
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


@dataclass(frozen=True)
class Eagle3Config:
    """Shape of an EAGLE-3 head; ``to_hf_dict`` is the config.json SGLang reads."""

    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 768
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 64
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000.0
    max_position_embeddings: int = 4096
    aux_layer_ids: tuple[int, ...] = (0, 2, 4)  # target layers whose outputs feed fc, ascending
    target_num_layers: int = 6  # only checked: SGLang can capture the output of layers 0 .. n-2
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        ids = list(self.aux_layer_ids)
        assert ids == sorted(set(ids)), f"aux_layer_ids must be ascending and distinct, got {ids}"
        # NOTE: SGLang captures at the input of layer id + 1; the last layer's output is never captured.
        assert 0 <= ids[0] and ids[-1] + 1 < self.target_num_layers, (
            f"aux_layer_ids {ids} out of range for a {self.target_num_layers}-layer target: "
            f"SGLang captures the output of layers 0..{self.target_num_layers - 2} only"
        )
        assert self.num_attention_heads % self.num_key_value_heads == 0, "GQA needs n_heads % n_kv_heads == 0"

    @property
    def n_aux(self) -> int:
        return len(self.aux_layer_ids)

    @property
    def target_hidden_size(self) -> int:
        # NOTE: equal by construction: SGLang shares the target's embedding only when they match.
        return self.hidden_size

    def to_hf_dict(self) -> dict:
        return {
            "architectures": [ARCHITECTURE],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "draft_vocab_size": self.vocab_size,  # full vocab: no d2t/t2d map
            "hidden_size": self.hidden_size,
            "target_hidden_size": self.target_hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": 1,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
            "max_position_embeddings": self.max_position_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": False,  # own lm_head; embed_tokens comes from the target
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "dtype": "float32",
            "eagle_config": {
                "eagle_aux_hidden_state_layer_ids": list(self.aux_layer_ids),
                "use_aux_hidden_state": True,
            },
            "target_num_hidden_layers": self.target_num_layers,  # ours; SGLang ignores it
        }

    @classmethod
    def from_hf_dict(cls, d: dict) -> Eagle3Config:
        """Inverse of ``to_hf_dict``; raises ValueError for a config this head cannot represent."""
        if d.get("architectures") != [ARCHITECTURE] or d.get("num_hidden_layers") != 1:
            raise ValueError(f"not a one-layer {ARCHITECTURE} config: {d.get('architectures')}, "
                             f"num_hidden_layers={d.get('num_hidden_layers')}")
        if d.get("draft_vocab_size", d["vocab_size"]) != d["vocab_size"] or d.get("tie_word_embeddings"):
            raise ValueError("only full-vocab, untied heads are supported (no d2t map, own lm_head)")
        rope = d.get("rope_parameters") or {"rope_theta": d.get("rope_theta", 10_000.0)}
        aux_ids = tuple(d["eagle_config"]["eagle_aux_hidden_state_layer_ids"])
        names = {f.name for f in fields(cls)} - {"rope_theta", "aux_layer_ids", "target_num_layers"}
        return cls(**{k: v for k, v in d.items() if k in names}, rope_theta=rope["rope_theta"],
                   aux_layer_ids=aux_ids, target_num_layers=d.get("target_num_hidden_layers", max(aux_ids) + 2))

    @classmethod
    def from_target(cls, target: dict, aux_layer_ids: tuple[int, ...], intermediate_size: int | None = None):
        """The head for a transformers Llama target config (a config.json dict)."""
        rope = target.get("rope_parameters") or {"rope_theta": target.get("rope_theta", 10_000.0)}
        return cls(
            vocab_size=target["vocab_size"], hidden_size=target["hidden_size"],
            intermediate_size=intermediate_size or target["intermediate_size"],
            num_attention_heads=target["num_attention_heads"], num_key_value_heads=target["num_key_value_heads"],
            head_dim=target.get("head_dim") or target["hidden_size"] // target["num_attention_heads"],
            rms_norm_eps=target["rms_norm_eps"], rope_theta=rope["rope_theta"],
            max_position_embeddings=target["max_position_embeddings"], aux_layer_ids=tuple(aux_layer_ids),
            target_num_layers=target["num_hidden_layers"], bos_token_id=target["bos_token_id"],
            eos_token_id=target["eos_token_id"], pad_token_id=target["pad_token_id"],
        )


# --------------------------------------------------------------------------- building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Llama (neox-style, rotate-half) rotary embedding; x (bsz, n_heads, seqlen, head_dim),
    positions (seqlen,) or (bsz, seqlen)."""
    head_dim = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=x.device) / head_dim)
    angles = positions.float()[..., None] * inv_freq  # (..., seqlen, head_dim/2)
    if angles.dim() == 3:
        angles = angles[:, None]  # (bsz, 1, seqlen, head_dim/2)
    cos, sin = torch.cat([angles.cos()] * 2, dim=-1), torch.cat([angles.sin()] * 2, dim=-1)
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated * sin).to(x.dtype)


@dataclass
class DraftKVCache:
    """Keys/values of every draft position run so far (one request batch, equal lengths).

    keys/values (bsz, n_kv_heads, n_cached, head_dim); positions (n_cached,): the RoPE position of each
    key. A query attends to every cached key whose position is <= its own (SGLang's chain drafting).
    """

    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    positions: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))

    def append(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        self.keys = k if self.keys is None else torch.cat([self.keys, k], dim=2)
        self.values = v if self.values is None else torch.cat([self.values, v], dim=2)
        self.positions = torch.cat([self.positions.to(positions.device), positions])


class Eagle3Attention(nn.Module):
    def __init__(self, cfg: Eagle3Config) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.rope_theta = cfg.rope_theta
        in_dim = 2 * cfg.hidden_size  # [embeds, hidden] concatenated
        self.q_proj = nn.Linear(in_dim, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(in_dim, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(in_dim, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def qkv(self, x: torch.Tensor, positions: torch.Tensor):
        """q (bsz, n_heads, seqlen, head_dim), k and v (bsz, n_kv_heads, seqlen, head_dim), RoPE applied."""
        bsz, seqlen, _ = x.shape
        q = self.q_proj(x).view(bsz, seqlen, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(q, positions, self.rope_theta), apply_rope(k, positions, self.rope_theta), v

    def expand_kv(self, t: torch.Tensor) -> torch.Tensor:
        """(bsz, n_kv_heads, n, head_dim) -> (bsz, n_heads, n, head_dim): query head h reads kv head h // rep."""
        return t.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)

    def out(self, attn: torch.Tensor) -> torch.Tensor:
        bsz, _, seqlen, _ = attn.shape
        return self.o_proj(attn.transpose(1, 2).reshape(bsz, seqlen, self.n_heads * self.head_dim))


class Eagle3DecoderLayer(nn.Module):
    def __init__(self, cfg: Eagle3Config) -> None:
        super().__init__()
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Eagle3Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)  # Llama's SwiGLU: Eagle3Config has its hidden and intermediate sizes

    def attn_input(self, embeds: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Step 2: (bsz, seqlen, 2 * hidden), embeddings first (SGLang's ``torch.cat([embeds, hidden])``)."""
        return torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)

    def finish(self, hidden: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Step 3: residual adds around o_proj and the MLP; returns the pre-norm output."""
        r = hidden + self.self_attn.out(attn)
        return r + self.mlp(self.post_attention_layernorm(r))


class Eagle3Backbone(nn.Module):
    """Checkpoint prefix ``model.``: embed_tokens, fc, layers.0, norm."""

    def __init__(self, cfg: Eagle3Config) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.fc = nn.Linear(cfg.n_aux * cfg.target_hidden_size, cfg.hidden_size, bias=False)
        self.layers = nn.ModuleList([Eagle3DecoderLayer(cfg)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


@dataclass
class Eagle3Output:
    logits: torch.Tensor  # (bsz, seqlen, vocab)
    hidden: torch.Tensor  # (bsz, seqlen, hidden): pre-norm output, fed back at the next draft step


# --------------------------------------------------------------------------- the head


class Eagle3Head(nn.Module):
    def __init__(self, cfg: Eagle3Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = Eagle3Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @property
    def layer(self) -> Eagle3DecoderLayer:
        return self.model.layers[0]

    def project(self, aux_hidden: torch.Tensor) -> torch.Tensor:
        """Step 1: (bsz, seqlen, n_aux * target_hidden) target features -> (bsz, seqlen, hidden)."""
        return self.model.fc(aux_hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model.norm(hidden))

    def forward(self, input_ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
                cache: DraftKVCache | None = None) -> Eagle3Output:
        """One draft forward as SGLang runs it: a draft extend over seqlen positions, or one chain step.

        input_ids (bsz, seqlen): the token *after* each position (x[p+1]); hidden (bsz, seqlen, n_aux *
        target_hidden) target features, or (bsz, seqlen, hidden) the head's own previous output (then
        ``fc`` is skipped, as in SGLang); positions (seqlen,). Appends this call's keys to ``cache`` (a
        fresh one when None) and attends causally by position over everything cached.
        """
        if hidden.shape[-1] != self.cfg.hidden_size:
            hidden = self.project(hidden)
        cache = cache if cache is not None else DraftKVCache()
        x = self.layer.attn_input(self.model.embed_tokens(input_ids), hidden)
        q, k, v = self.layer.self_attn.qkv(x, positions)
        cache.append(k, v, positions)
        attn_ = self.layer.self_attn
        mask = cache.positions[None, :] <= positions[:, None]  # (seqlen, n_cached)
        attn = F.scaled_dot_product_attention(q, attn_.expand_kv(cache.keys), attn_.expand_kv(cache.values),
                                              attn_mask=mask)
        out = self.layer.finish(hidden, attn)
        return Eagle3Output(self.logits(out), out)

    def ttt_unroll(self, input_ids: torch.Tensor, aux_hidden: torch.Tensor, n_steps: int,
                   feed_draft_tokens: bool = False) -> list[Eagle3Output]:
        """Training-time test: ``n_steps`` chained draft steps from every position at once.

        input_ids (bsz, seqlen) x[0..T-1] and aux_hidden (bsz, seqlen, n_aux * target_hidden) f[0..T-1]
        of one record. Row p of step i is the draft of token x[p+2+i] started at p, exactly what SGLang
        computes at chain step i after a draft extend that ended at p:
          - step 0 reads (x[p+1], fc(f[p])) at RoPE position p and attends to step-0 keys at 0..p;
          - step i reads (token i, the head's own step i-1 output at row p) at RoPE position p+i and
            attends to step-0 keys at 0..p plus its own row's keys of steps 1..i (positions p+1..p+i).
        Token i is the record's x[p+1+i] (zero past the end: those rows have no target and must be
        masked by the loss), or with ``feed_draft_tokens`` the head's own step i-1 argmax. Conditional on
        the earlier drafts being accepted under greedy verification the two agree whenever the record
        follows the target's greedy path. Returns one output per step, each (bsz, seqlen-1, ...).
        """
        bsz, seqlen = input_ids.shape
        n = seqlen - 1
        attn_ = self.layer.self_attn
        positions = torch.arange(n, device=input_ids.device)
        hidden = self.project(aux_hidden[:, :n])
        k0 = v0 = None
        diag_k, diag_v = [], []  # steps >= 1: (bsz, n_heads, n, head_dim), key j of row p at position p+j
        causal = torch.ones(n, n, dtype=torch.bool, device=input_ids.device).tril()
        outputs: list[Eagle3Output] = []
        for i in range(n_steps):
            if i == 0:
                ids = input_ids[:, 1:]
            elif feed_draft_tokens:
                ids = outputs[-1].logits.argmax(-1)
            else:
                ids = F.pad(input_ids[:, 1 + i:], (0, i), value=0)  # (bsz, n)
            x = self.layer.attn_input(self.model.embed_tokens(ids), hidden)
            q, k, v = attn_.qkv(x, positions + i)
            if i == 0:
                k0, v0 = attn_.expand_kv(k), attn_.expand_kv(v)  # (bsz, n_heads, n, head_dim)
            else:
                diag_k.append(attn_.expand_kv(k))
                diag_v.append(attn_.expand_kv(v))
            scale = 1.0 / math.sqrt(attn_.head_dim)
            scores = (q @ k0.transpose(-1, -2) * scale).masked_fill(~causal, float("-inf"))  # (bsz, h, n, n)
            diag = [(q * kj).sum(-1, keepdim=True) * scale for kj in diag_k]  # each (bsz, h, n, 1)
            probs = torch.cat([scores, *diag], dim=-1).softmax(-1, dtype=torch.float32).to(q.dtype)
            attn = probs[..., :n] @ v0
            for j, vj in enumerate(diag_v):
                attn = attn + probs[..., n + j : n + j + 1] * vj
            hidden = self.layer.finish(hidden, attn)
            outputs.append(Eagle3Output(self.logits(hidden), hidden))
        return outputs

    # ----------------------------------------------------------------------- files

    def save(self, out_dir: Path) -> None:
        """Writes config.json and model.safetensors (every parameter, embed_tokens included)."""
        from safetensors.torch import save_file

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / CONFIG_FILE).write_text(json.dumps(self.cfg.to_hf_dict(), indent=2) + "\n")
        tensors = {name: p.detach().float().contiguous() for name, p in self.state_dict().items()}
        save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})

    @classmethod
    def load(cls, path: Path) -> Eagle3Head:
        """The head saved in directory ``path``; raises FileNotFoundError naming the recipe when absent."""
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"no EAGLE-3 head at {path}; train one: "
                                    "python -m turbo.spec.eagle3_train --preset turbo-tiny-eagle3")
        head = cls(Eagle3Config.from_hf_dict(json.loads((path / CONFIG_FILE).read_text())))
        head.load_state_dict(load_file(str(path / WEIGHTS_FILE)))
        return head.eval()
