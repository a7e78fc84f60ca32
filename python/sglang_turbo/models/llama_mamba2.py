"""``LlamaMamba2ForCausalLM``: the Llama-Mamba2 hybrid of turbo/hybrid/model.py, served by SGLang.

Layers in ``attention_layers`` are upstream's ``LlamaDecoderLayer`` (``RadixAttention``, rotary, KV in the
token pool, built by turbo_llama.py's plain-residual model); the others are a Llama layer whose token
mixer is upstream's ``MambaMixer2``, run through
the ``Mamba2AttnBackend`` that SGLang wraps next to the attention backend for a registered hybrid (see
llama_mamba2_config.py). Each request's conv window and scan state live in SGLang's Mamba state pool, and
the Mamba radix cache saves them with a cached prefix. The residual stream is written out in
``TurboLlamaModel`` (each sub-layer reduces its own output under TP), the same arithmetic as the reference.

On the portable platform the mixer's ops are mamba_ops.py's PyTorch ones; on CUDA, upstream's kernels.
Under CPU graphs (graph_runner.py) a Mamba layer's projections and gated norm compile with the rest of the
layer, and its conv and scan step, which read and write the state pool, are one opaque op,
``turbo::mamba2_decode_step``, the way attention is ``turbo::paged_attention``.
"""

from __future__ import annotations

from typing import Iterable

import torch
from sglang.srt.layers.attention.mamba.mamba import MambaMixer2
from sglang.srt.layers.layernorm import RMSNorm
from sglang.srt.model_executor.forward_context import get_attn_backend
from sglang.srt.models.llama import LlamaForCausalLM, LlamaMLP
from sglang.srt.utils import add_prefix
from torch import nn

from turbo.hybrid import varlen_ops

from ..plugin import portable_platform_active
from . import mamba_ops
from .turbo_llama import TurboLlamaModel

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
        _LIVE_MAMBA_LAYERS[id(self)] = self

    def mix(self, h: torch.Tensor, forward_batch) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self.mix_decode_compiled(h)
        # The backend holds this batch's Mamba metadata and hands the mixer its layer's state pool.
        backend = get_attn_backend().linear_attn_backend
        return backend.forward(mixer=self.mamba, hidden_states=h, output=None, layer_id=self.layer_id,
                               forward_batch=forward_batch)

    def mix_decode_compiled(self, h: torch.Tensor) -> torch.Tensor:
        """``MambaMixer2.forward`` for a decode batch (one token a request) as CPU graphs trace it: the
        projections and the gated norm compile; the conv and scan step, which read and write the state
        pool, are the opaque ``turbo::mamba2_decode_step``. Same arithmetic as the eager mixer."""
        m = self.mamba
        projected, _ = m.in_proj(h)
        gate, xBC, dt = torch.split(
            projected, [m.intermediate_size // m.tp_size, m.conv_dim // m.tp_size, m.num_heads // m.tp_size], dim=-1
        )
        y = torch.ops.turbo.mamba2_decode_step(xBC, dt, id(self))  # (batch, local heads * head_dim)
        out, _ = m.out_proj(m.norm(y, gate))
        return out

    def decode_step(self, xBC: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
        """The conv and the scan's state update for this step's decode batch, on the layer's pool rows."""
        m = self.mamba
        backend = get_attn_backend().linear_attn_backend
        slots = backend.forward_metadata.mamba_cache_indices
        cache = backend.req_to_token_pool.mamba2_layer_cache(self.layer_id)
        conv_weight = m.conv1d.weight.view(m.conv1d.weight.size(0), m.conv1d.weight.size(2))
        xBC = varlen_ops.causal_conv1d_update(xBC, cache.conv[0], conv_weight, m.conv1d.bias, m.activation,
                                              conv_state_indices=slots)
        heads, groups = m.num_heads // m.tp_size, m.n_groups // m.tp_size
        x, B, C = torch.split(xBC, [m.intermediate_size // m.tp_size, m.groups_ssm_state_size // m.tp_size,
                                    m.groups_ssm_state_size // m.tp_size], dim=-1)
        y = xBC.new_empty(xBC.shape[0], heads, m.head_dim)
        varlen_ops.selective_state_update(
            cache.temporal,
            x.view(-1, heads, m.head_dim),
            dt[:, :, None].expand(-1, -1, m.head_dim),
            m.A[:, None, None].expand(-1, m.head_dim, m.ssm_state_size).float(),
            B.view(-1, groups, B.shape[1] // groups),
            C.view(-1, groups, C.shape[1] // groups),
            m.D[:, None].expand(-1, m.head_dim),
            dt_bias=m.dt_bias[:, None].expand(-1, m.head_dim),
            dt_softplus=True,
            state_batch_indices=slots,
            out=y,
        )
        return y.view(xBC.shape[0], -1)


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

    def forward_split_prefill(self, *args, **kwargs):
        raise NotImplementedError("LlamaMamba2ForCausalLM has no split prefill")

    def set_eagle3_layers_to_capture(self, layer_ids=None):
        raise NotImplementedError("LlamaMamba2ForCausalLM cannot be an EAGLE3 target")


# ``turbo::mamba2_decode_step``: one Mamba layer's conv and scan step inside a compiled forward, run eagerly on
# the step's Mamba metadata (plain library API, as for turbo::paged_attention: custom_op's wrapper costs ~100 us).
_LIBRARY = torch.library.Library("turbo", "FRAGMENT")
_LIBRARY.define("mamba2_decode_step(Tensor xBC, Tensor dt, int layer_key) -> Tensor")


def _mamba2_decode_step_op(xBC: torch.Tensor, dt: torch.Tensor, layer_key: int) -> torch.Tensor:
    """Updates the layer's conv window and scan state in SGLang's Mamba pool, a side effect the graph does
    not see; nothing in the graph reads the pool, so no reordering can observe it."""
    return _LIVE_MAMBA_LAYERS[layer_key].decode_step(xBC, dt)


_LIBRARY.impl("mamba2_decode_step", _mamba2_decode_step_op, "CompositeExplicitAutograd")


@torch.library.register_fake("turbo::mamba2_decode_step")
def _(xBC, dt, layer_key):
    mixer = _LIVE_MAMBA_LAYERS[layer_key].mamba
    return xBC.new_empty(xBC.shape[0], mixer.num_heads // mixer.tp_size * mixer.head_dim)


EntryClass = LlamaMamba2ForCausalLM
