"""``TurboLlamaForCausalLM``: upstream's Llama with its residual stream written out, for CPU graphs.

Upstream's ``LlamaDecoderLayer`` hands its residual to SGLang's stage-boundary machinery
(``layers/layer_boundary``), which fuses the add, the norm and the all-reduce on GPUs. Its
``Contribution`` objects stop ``torch.compile``: 44 graph breaks per decode forward of turbo-tiny,
and the compiled forward was *slower* than eager (68 vs 77 tok/s at batch 1, measured
2026-12-02). Here the same layers are built with ``stage_boundaries=False`` (each sub-layer
reduces its own output under TP) and the model adds the residual itself, which dynamo traces as
one graph. Same parameters, same weight names, same arithmetic; upstream's ``LlamaForCausalLM``
supplies the rest (weight loading, logits, sampling).

It is not registered under upstream's name: cpu_defaults.py points a ``LlamaForCausalLM``
checkpoint at it only under ``--enable-torch-compile`` on the portable platform. The
Llama-Mamba2 hybrid (llama_mamba2.py) is this model with some token mixers swapped.
"""

from __future__ import annotations

import torch
from sglang.srt.layers.layernorm import RMSNorm
from sglang.srt.layers.vocab_parallel_embedding import VocabParallelEmbedding
from sglang.srt.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from sglang.srt.runtime_context import get_parallel
from sglang.srt.utils import add_prefix
from torch import nn

ARCHITECTURE = "TurboLlamaForCausalLM"


class TurboLlamaModel(nn.Module):
    """Embedding, the layers, the final norm; ``forward`` returns the normed hidden states."""

    def __init__(self, config, quant_config=None, prefix: str = "") -> None:
        super().__init__()
        if get_parallel().pp_group.world_size > 1:
            raise ValueError(f"{type(self).__name__} supports tensor parallelism only; run it with --pp-size 1")
        self.config = config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, quant_config=quant_config,
                                                   prefix=add_prefix("embed_tokens", prefix))
        self.layers = nn.ModuleList(
            self.make_layer(config, i, quant_config, add_prefix(f"layers.{i}", prefix))
            for i in range(config.num_hidden_layers)
        )
        self.start_layer, self.end_layer = 0, config.num_hidden_layers  # what LlamaForCausalLM's loader reads
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.layers_to_capture: list[int] = []

    def make_layer(self, config, layer_id: int, quant_config, prefix: str) -> nn.Module:
        # Plain residual: each sub-layer reduces its own output, no stage boundaries.
        return LlamaDecoderLayer(config, layer_id=layer_id, quant_config=quant_config, prefix=prefix,
                                 stage_boundaries=False)

    def mix_tokens(self, layer: nn.Module, h: torch.Tensor, positions: torch.Tensor, forward_batch) -> torch.Tensor:
        """The layer's token mixer on its normed input: attention here."""
        return layer.self_attn(positions=positions, hidden_states=h, forward_batch=forward_batch)

    def graph_inputs(self, forward_batch) -> tuple:
        """What the CPU graph runner passes to ``forward`` (its compiled body) for ``forward_batch``."""
        return forward_batch.input_ids, forward_batch.positions, forward_batch

    def forward(self, input_ids, positions, forward_batch, input_embeds=None, pp_proxy_tensors=None):
        """The normed hidden states; with ``layers_to_capture`` set (an EAGLE3 target), also the
        residual stream entering each of those layers, as upstream's Llama captures it."""
        x = self.embed_tokens(input_ids) if input_embeds is None else input_embeds  # (n_tokens, hidden)
        aux = []
        for i, layer in enumerate(self.layers):
            if i in self.layers_to_capture:
                aux.append(x)  # x is rebound below, never written in place: no copy needed
            x = x + self.mix_tokens(layer, layer.input_layernorm(x), positions, forward_batch)
            x = x + layer.mlp(layer.post_attention_layernorm(x), forward_batch=forward_batch)
        return (self.norm(x), aux) if aux else self.norm(x)


class CompiledBody:
    """Mixin for a causal LM whose body the CPU graph runner (graph_runner.py) compiles.

    Forwards that SGLang runs through its eager path rather than through the runner (a speculative
    target's verify batches, a draft's decode steps and extend) take the compiled body when their
    mode is one it serves; the logits processor stays eager either way.
    """

    # Set by graph_runner.py. upstream's set_eagle3_layers_to_capture (an EAGLE3 target) works
    # unchanged: it sets capture_aux_hidden_states and model.layers_to_capture, which the body reads.
    compiled_body = None  # forward_batch -> the body's output, run by the compiled graphs
    compiled_modes: tuple = ()  # the ForwardModes it serves

    def forward(self, input_ids, positions, forward_batch, input_embeds=None, get_embedding=False,
                pp_proxy_tensors=None):
        if forward_batch.forward_mode in self.compiled_modes and input_embeds is None:
            return self.logits_from_body(input_ids, self.compiled_body(forward_batch), forward_batch)
        return super().forward(input_ids, positions, forward_batch, input_embeds, get_embedding, pp_proxy_tensors)

    def logits_from_body(self, input_ids, body_output, forward_batch):
        """The logits processor's output for what the body returned: the normed hidden states, and
        with ``capture_aux_hidden_states`` the captured ones."""
        hidden, aux = body_output if self.capture_aux_hidden_states else (body_output, None)
        return self.logits_processor(input_ids, hidden, self.lm_head, forward_batch, aux)


class TurboLlamaForCausalLM(CompiledBody, LlamaForCausalLM):
    """Served like ``LlamaForCausalLM``; only the residual stream is written differently."""

    def _init_model(self, config, quant_config=None, prefix: str = ""):
        return TurboLlamaModel(config, quant_config=quant_config, prefix=prefix)

    def forward_split_prefill(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} has no split prefill")


EntryClass = TurboLlamaForCausalLM
