"""The transformers config of a Llama-Mamba2 hybrid (``model_type: llama_mamba2``) and what SGLang's hybrid
machinery reads from it.

SGLang decides a model is a Mamba hybrid, sizes its state pool and turns on the Mamba radix cache from
three attributes of the config (``mamba2_cache_params``, ``full_attention_layer_ids``, ``mamba_chunk_size``)
once the config class is in its linear-attention registry; :func:`register` puts it there, and in
transformers' ``AutoConfig`` (which SGLang's config loader calls), in every process.

The fields are those of turbo/hybrid/model.py's checkpoint format; that module's
``HybridLlamaConfig`` is the one check of them, so a layer list that does not fit the model fails as
the config loads, with the field named.
"""

from __future__ import annotations

import functools
import os

import torch
from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, LlamaConfig

from turbo.hybrid.model import ARCHITECTURE, MAMBA_FIELDS, MODEL_TYPE, HybridLlamaConfig

# SGLang's Mamba2 backend: our config opts in through LinearAttnModelSpec, not by subclassing a model.
MAMBA2_BACKEND = "sglang.srt.layers.attention.hybrid_linear_attn_backend.Mamba2AttnBackend"


@strict
class LlamaMamba2Config(LlamaConfig):
    """A Llama config plus ``attention_layers`` and the ``mamba_*`` fields of turbo's ``HybridLlamaConfig``
    (which gives each absent one its default)."""

    model_type = MODEL_TYPE

    attention_layers: list[int] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.attention_layers = list(self.attention_layers or [])
        try:
            reference = self.reference_config()
        except ValueError as e:
            raise ValueError(f"{MODEL_TYPE} config.json: {e}") from None
        for name in MAMBA_FIELDS:
            setattr(self, name, getattr(reference, name))

    def reference_config(self) -> HybridLlamaConfig:
        """The same fields as turbo's reference config (raises ValueError for a shape that cannot be)."""
        return HybridLlamaConfig.from_hf_dict(self.to_dict())

    @property
    def full_attention_layer_ids(self) -> list[int]:
        return list(self.attention_layers)

    @property
    def mamba_layer_ids(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if i not in self.attention_layers]

    @property
    def mamba2_cache_params(self):
        from sglang.srt.configs.mamba_utils import (
            Mamba2CacheParams,
            Mamba2StateDType,
            Mamba2StateShape,
            mamba2_state_dtype,
        )
        from sglang.srt.runtime_context import get_parallel

        shape = Mamba2StateShape.create(
            tp_world_size=get_parallel().attn_tp_size,
            intermediate_size=self.mamba_n_heads * self.mamba_head_dim,
            n_groups=self.mamba_n_groups,
            num_heads=self.mamba_n_heads,
            head_dim=self.mamba_head_dim,
            state_size=self.mamba_d_state,
            conv_kernel=self.mamba_d_conv,
        )
        dtype = mamba2_state_dtype(self)
        if "SGLANG_MAMBA_CONV_DTYPE" not in os.environ:
            # Upstream keeps the conv window in bfloat16 by default; float32 keeps the served model equal to
            # the reference (a window is 3 inputs a channel: the memory is small either way).
            dtype = Mamba2StateDType(conv=torch.float32, temporal=dtype.temporal)
        return Mamba2CacheParams(shape=shape, layers=self.mamba_layer_ids, dtype=dtype)


@functools.cache
def register() -> None:
    """AutoConfig and SGLang's linear-attention registry learn ``llama_mamba2`` (once per process)."""
    from sglang.srt.configs.linear_attn_model_registry import LinearAttnModelSpec, register_linear_attn_model

    AutoConfig.register(MODEL_TYPE, LlamaMamba2Config)
    # SEAM: SGLang's out-of-tree hybrid registry. no extra buffer: its state tracking is Triton-only, and
    # no_buffer (page 1, overlap off) is what the portable platform runs.
    register_linear_attn_model(LinearAttnModelSpec(
        config_class=LlamaMamba2Config,
        backend_class_name=MAMBA2_BACKEND,
        arch_names=[ARCHITECTURE],
        uses_mamba_radix_cache=True,
        support_mamba_cache=True,
        support_mamba_cache_extra_buffer=False,
    ))
