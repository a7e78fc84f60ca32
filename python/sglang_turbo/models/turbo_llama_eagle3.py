"""``TurboLlamaForCausalLMEagle3``: upstream's EAGLE3 head with a body the CPU graph runner compiles.

An EAGLE3 head's forward is one decoder layer, but served eagerly it pays SGLang's per-forward Python
at every draft step: on 2 cores its steps and draft extend took more of a round than the compiled
target's verify (py-spy, EAGLE3 chain, batch 1, 2026-12-07); compiled, what is left of a step is
mostly its arithmetic, whose weight bytes bound it (docs/speculative.md, Speed). Upstream's ``LlamaModel.forward``
(models/llama_eagle3.py) reads the target's features from ``forward_batch.spec_info`` and branches on
multimodal inputs inside it; here the features are an argument, read outside the compiled region, and
the body is only the arithmetic: features projected by ``fc`` when they are the target's (3 x hidden
wide, in draft extend) rather than the head's own (draft steps), the layers, the final norm.

Same modules, parameters, weight names and loader as upstream's class; the graph runner serves a
``LlamaForCausalLMEagle3`` checkpoint with it only under CPU graphs on the portable platform
(graph_runner.COMPILED_DRAFT_HEADS). Multimodal or M-RoPE heads keep upstream's forward.
"""

from __future__ import annotations

import torch
from sglang.srt.models.llama_eagle3 import LlamaForCausalLMEagle3, LlamaModel

from .turbo_llama import CompiledBody

ARCHITECTURE = "TurboLlamaForCausalLMEagle3"


class TurboEagle3Model(LlamaModel):
    """Upstream's head body; ``body`` is what compiles, ``forward`` is the eager path SGLang calls."""

    def graph_inputs(self, forward_batch) -> tuple:
        """What the CPU graph runner passes to ``graph_body`` for ``forward_batch``."""
        return forward_batch.input_ids, forward_batch.positions, forward_batch.spec_info.hidden_states, forward_batch

    def graph_body(self, input_ids, positions, hidden_states, forward_batch):
        """(normed hidden states, [the hidden state the next draft step reads]) for ``input_ids``
        following ``hidden_states``: the target's concatenated aux layers or the head's own output."""
        embeds = self.embed_tokens(input_ids)
        if hidden_states.shape[-1] != embeds.shape[-1]:  # the target's features: project them
            if self.input_norm is not None:
                hidden_states = self.input_norm(hidden_states)
            if self.fc_norm is not None:
                chunks = hidden_states.chunk(self.num_aux_hidden_states, dim=-1)
                hidden_states = torch.cat([norm(c) for norm, c in zip(self.fc_norm, chunks)], dim=-1)
            hidden_states = self.fc(hidden_states)
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, embeds, hidden_states, forward_batch, residual)
        normed, pre_norm = self.norm(hidden_states, residual)
        return normed, [normed if self.norm_output else pre_norm]

    def forward(self, input_ids, positions, forward_batch, input_embeds=None, pp_proxy_tensors=None):
        if (input_embeds is not None or self.is_mrope_enabled or forward_batch.mm_input_embeds is not None
                or forward_batch.spec_info.hidden_states.shape[0] == 0):
            return super().forward(input_ids, positions, forward_batch, input_embeds, pp_proxy_tensors)
        return self.graph_body(input_ids, positions, forward_batch.spec_info.hidden_states, forward_batch)


class TurboLlamaForCausalLMEagle3(CompiledBody, LlamaForCausalLMEagle3):
    """Served like ``LlamaForCausalLMEagle3``; the draft's forwards can run a compiled body."""

    def __init__(self, config, quant_config=None, prefix: str = "") -> None:
        super().__init__(config, quant_config=quant_config, prefix=prefix)
        # Upstream builds its LlamaModel in __init__ with no factory to override; the subclass adds
        # methods only (no state), so the built module takes its class rather than being built twice.
        self.model.__class__ = TurboEagle3Model


EntryClass = TurboLlamaForCausalLMEagle3
