"""``LlamaMamba2ForCausalLM``: the Llama-Mamba2 hybrid of turbo/hybrid/model.py, served by SGLang.

Layers in ``attention_layers`` are upstream's ``LlamaDecoderLayer`` (``RadixAttention``, rotary, KV in the
token pool, built by turbo_llama.py's plain-residual model); the others are a Llama layer whose token
mixer is upstream's ``MambaMixer2``, run through
the ``Mamba2AttnBackend`` that SGLang wraps next to the attention backend for a registered hybrid (see
llama_mamba2_config.py). Each request's conv window and scan state live in SGLang's Mamba state pool, and
the Mamba radix cache saves them with a cached prefix. The residual stream is written out in
``TurboLlamaModel`` (each sub-layer reduces its own output under TP), the same arithmetic as the reference.

On the portable platform the mixer's ops are mamba_ops.py's PyTorch ones; on CUDA, upstream's kernels.
Under CPU graphs (graph_runner.py) a Mamba layer's decode arithmetic compiles with the rest of the layer;
reading and writing its rows of the state pool are opaque ops (``turbo::mamba2_read_state`` /
``turbo::mamba2_write_state``), the way attention is ``turbo::paged_attention``.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from sglang.srt.layers.attention.mamba.mamba import MambaMixer2
from sglang.srt.layers.layernorm import RMSNorm
from sglang.srt.model_executor.forward_context import get_attn_backend
from sglang.srt.models.llama import LlamaForCausalLM, LlamaMLP
from sglang.srt.utils import add_prefix
from torch import nn

from turbo.hybrid import varlen_ops
from turbo.hybrid.ssd import ssd_step

from ..plugin import portable_platform_active
from . import mamba_ops
from .turbo_llama import TurboLlamaForCausalLM, TurboLlamaModel

# Mamba layers by id(layer), for the compiled op to find its layer (the graph runner's warm-up builds them all).
_LIVE_MAMBA_LAYERS: dict[int, "LlamaMamba2Layer"] = {}


class LlamaMamba2Layer(nn.Module):
    """A Llama layer with a Mamba2 mixer in place of attention (MambaInLlama's ``MambaDecoderLayer``)."""

    def __init__(self, config, layer_id: int, quant_config=None, prefix: str = "") -> None:
        super().__init__()
        self.layer_id = layer_id
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mamba = MambaMixer2(
            cache_params=config.mamba2_cache_params,
            hidden_size=config.hidden_size,
            use_conv_bias=True,
            use_bias=False,
            n_groups=config.mamba_n_groups,
            rms_norm_eps=config.rms_norm_eps,
            activation="silu",
            quant_config=quant_config,
            reduce_results=True,
            prefix=add_prefix("mamba", prefix),
        )
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = LlamaMLP(config.hidden_size, config.intermediate_size, config.hidden_act,
                            quant_config=quant_config, prefix=add_prefix("mlp", prefix))
        self.state_params = config.mamba2_cache_params  # one request's state shapes and dtypes (this rank's)
        _LIVE_MAMBA_LAYERS[id(self)] = self

    def mix(self, h: torch.Tensor, forward_batch) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self.mix_decode_compiled(h)
        # The backend holds this batch's Mamba metadata and hands the mixer its layer's state pool.
        backend = get_attn_backend().linear_attn_backend
        return backend.forward(mixer=self.mamba, hidden_states=h, output=None, layer_id=self.layer_id,
                               forward_batch=forward_batch)

    def mix_decode_compiled(self, h: torch.Tensor) -> torch.Tensor:
        """``MambaMixer2.forward`` for a decode batch (one token a request) as CPU graphs trace it: all the
        arithmetic compiles (the conv at one position and turbo/hybrid/ssd.py's ``ssd_step``, the reference's
        own decode step); reading and writing the requests' rows of the state pool are the opaque
        ``turbo::mamba2_read_state`` / ``turbo::mamba2_write_state``."""
        m = self.mamba
        heads, groups = m.num_heads // m.tp_size, m.n_groups // m.tp_size
        projected, _ = m.in_proj(h)
        gate, xBC, dt = torch.split(
            projected, [m.intermediate_size // m.tp_size, m.conv_dim // m.tp_size, heads], dim=-1
        )
        window, ssm = torch.ops.turbo.mamba2_read_state(xBC, id(self))
        # The conv at one position: the window of past inputs, then this token's.
        full = torch.cat([window.to(xBC.dtype), xBC[:, :, None]], dim=-1)  # (batch, conv_dim, d_conv)
        conv_weight = m.conv1d.weight.view(m.conv1d.weight.size(0), m.conv1d.weight.size(2))
        xBC = F.silu((full * conv_weight).sum(-1) + m.conv1d.bias)
        x, B, C = torch.split(xBC, [m.intermediate_size // m.tp_size, m.groups_ssm_state_size // m.tp_size,
                                    m.groups_ssm_state_size // m.tp_size], dim=-1)
        y, ssm = ssd_step(
            x.unflatten(-1, (heads, m.head_dim)).float(),
            F.softplus(dt.float() + m.dt_bias.float()),
            m.A.float(),  # A = -exp(A_log), applied by the weight loader
            B.unflatten(-1, (groups, -1)).float(),
            C.unflatten(-1, (groups, -1)).float(),
            m.D.float(),
            ssm.float(),
        )
        y = torch.ops.turbo.mamba2_write_state(y.flatten(1).to(h.dtype), full[..., 1:], ssm, id(self))
        out, _ = m.out_proj(m.norm(y, gate))
        return out

    def state_rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(conv pool, scan-state pool, this step's request rows in them) of this layer."""
        backend = get_attn_backend().linear_attn_backend
        cache = backend.req_to_token_pool.mamba2_layer_cache(self.layer_id)
        return cache.conv[0], cache.temporal, backend.forward_metadata.mamba_cache_indices.long()


class LlamaMamba2Model(TurboLlamaModel):
    """turbo_llama's plain-residual Llama with a Mamba2 mixer in the layers outside ``attention_layers``."""

    def __init__(self, config, quant_config=None, prefix: str = "") -> None:
        if portable_platform_active():
            mamba_ops.bind_conv_ops()
        self._attention_layers = set(config.full_attention_layer_ids)
        super().__init__(config, quant_config=quant_config, prefix=prefix)

    def make_layer(self, config, layer_id: int, quant_config, prefix: str) -> nn.Module:
        if layer_id in self._attention_layers:
            return super().make_layer(config, layer_id, quant_config, prefix)
        return LlamaMamba2Layer(config, layer_id, quant_config=quant_config, prefix=prefix)

    def mix_tokens(self, layer, h, positions, forward_batch):
        if isinstance(layer, LlamaMamba2Layer):
            return layer.mix(h, forward_batch)  # no positions: the scan is ordered
        return super().mix_tokens(layer, h, positions, forward_batch)


class LlamaMamba2ForCausalLM(LlamaForCausalLM):
    """Served like ``LlamaForCausalLM`` (logits, sampling, radix cache); the layers differ."""

    def _init_model(self, config, quant_config=None, prefix: str = ""):
        return LlamaMamba2Model(config, quant_config=quant_config, prefix=prefix)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Llama's names plus ``model.layers.i.mamba.*``; a name that fits no parameter, or a parameter no
        checkpoint tensor filled, is an error (a wrong layer list would otherwise load silently)."""
        from sglang.srt.model_loader.weight_utils import default_weight_loader

        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name or (self.config.tie_word_embeddings and name == "lm_head.weight"):
                continue
            if name.endswith(".mamba.A_log"):
                name = name[: -len("A_log")] + "A"  # the parameter's loader applies A = -exp(A_log)
            for fused, part, shard in self.stacked_params_mapping:
                if part in name:
                    target = name.replace(part, fused)
                    if target not in params:
                        raise ValueError(f"checkpoint tensor {name} has no parameter {target} in this model")
                    params[target].weight_loader(params[target], tensor, shard)
                    loaded.add(target)
                    break
            else:
                if name not in params:
                    raise ValueError(f"checkpoint tensor {name} fits no parameter of this model "
                                     f"(attention layers {self.config.full_attention_layer_ids})")
                getattr(params[name], "weight_loader", default_weight_loader)(params[name], tensor)
                loaded.add(name)
        missing = sorted(set(params) - loaded)
        if missing:
            raise ValueError(f"checkpoint leaves parameters unset: {missing[:8]}{' ...' if len(missing) > 8 else ''}")

    # What the CPU graph runner turns the compiled body's output into logits with (never aux states here).
    logits_from_body = TurboLlamaForCausalLM.logits_from_body

    def forward_split_prefill(self, *args, **kwargs):
        raise NotImplementedError("LlamaMamba2ForCausalLM has no split prefill")

    def set_eagle3_layers_to_capture(self, layer_ids=None):
        raise NotImplementedError("LlamaMamba2ForCausalLM cannot be an EAGLE3 target")


# ``turbo::mamba2_read_state`` / ``turbo::mamba2_write_state``: a Mamba layer's state-pool rows for the decode
# step inside a compiled forward, gathered before its arithmetic and written back after. Plain library API, as
# for turbo::paged_attention (custom_op's wrapper costs ~100 us a call). Rows equal to the pad slot (-1) read
# slot 0 and are not written, as in turbo/hybrid/varlen_ops.py.
_LIBRARY = torch.library.Library("turbo", "FRAGMENT")
_LIBRARY.define("mamba2_read_state(Tensor xBC, int layer_key) -> (Tensor, Tensor)")
_LIBRARY.define("mamba2_write_state(Tensor y, Tensor conv_window, Tensor ssm_state, int layer_key) -> Tensor")


def _mamba2_read_state_op(xBC: torch.Tensor, layer_key: int) -> tuple[torch.Tensor, torch.Tensor]:
    conv, ssm, slots = _LIVE_MAMBA_LAYERS[layer_key].state_rows()
    rows = slots.clamp(min=0)
    return conv[rows], ssm[rows]


def _mamba2_write_state_op(y: torch.Tensor, conv_window: torch.Tensor, ssm_state: torch.Tensor,
                           layer_key: int) -> torch.Tensor:
    """Writes the step's new conv windows and scan states into SGLang's Mamba pool, a side effect the graph
    does not see; returns a copy of ``y`` so that what follows depends on the write (and keeps it)."""
    conv, ssm, slots = _LIVE_MAMBA_LAYERS[layer_key].state_rows()
    live = slots != varlen_ops.PAD_SLOT_ID
    conv[slots[live]] = conv_window[live].to(conv.dtype)
    ssm[slots[live]] = ssm_state[live].to(ssm.dtype)
    return y.clone()


_LIBRARY.impl("mamba2_read_state", _mamba2_read_state_op, "CompositeExplicitAutograd")
_LIBRARY.impl("mamba2_write_state", _mamba2_write_state_op, "CompositeExplicitAutograd")


@torch.library.register_fake("turbo::mamba2_read_state")
def _(xBC, layer_key):
    params = _LIVE_MAMBA_LAYERS[layer_key].state_params  # not the pool: a fake must not touch real tensors
    return (xBC.new_empty((xBC.shape[0], *params.shape.conv[0]), dtype=params.dtype.conv),
            xBC.new_empty((xBC.shape[0], *params.shape.temporal), dtype=params.dtype.temporal))


@torch.library.register_fake("turbo::mamba2_write_state")
def _(y, conv_window, ssm_state, layer_key):
    return torch.empty_like(y)


EntryClass = LlamaMamba2ForCausalLM
