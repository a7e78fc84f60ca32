"""``LadderLlamaForCausalLM``: a Llama whose layers run the Ladder-Residual schedule, served by SGLang.

Everything but the residual wiring is upstream's Llama: the same decoder layers (``QKVParallelLinear``,
``RowParallelLinear``, ``RadixAttention``, rotary, RMSNorm), the same TP groups, the same weight
loading, logits processor, radix cache and chunked prefill. Upstream's layers already leave the
attention and MLP outputs unreduced (``reduce_results=False``; its layer boundaries reduce them), so
this model calls each layer's attention and MLP as two residual branches and hands them to
``turbo.ladder.residual.residual_stream``, which issues each branch's all-reduce asynchronously and
waits on it one branch later (``python/sglang_turbo/distributed.py``).

The checkpoint is a transformers Llama checkpoint whose config.json says
``"architectures": ["LadderLlamaForCausalLM"]`` and ``"ladder_start_layer": K`` (see turbo/ladder/model.py).
"""

from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path

import torch
from sglang.srt.models.llama import LlamaForCausalLM, LlamaModel

from turbo.ladder.comm import TraceLog, TracingCommunicator, traced
from turbo.ladder.residual import SubLayer, residual_stream

from .. import env
from ..distributed import create_tp_communicator

logger = logging.getLogger(__name__)


def ladder_start_layer(config) -> int:
    """The config's ``ladder_start_layer``, checked against its layer count (ValueError names the field)."""
    n_layers = config.num_hidden_layers
    start = getattr(config, "ladder_start_layer", 0)
    if not isinstance(start, int) or not 0 <= start <= n_layers:
        raise ValueError(
            f"config.json: ladder_start_layer must be an integer in [0, {n_layers}] for this "
            f"{n_layers}-layer model, got {start!r}"
        )
    return start


class TurboLadderLlamaModel(LlamaModel):
    """Upstream's ``LlamaModel`` with the ladder's residual stream in ``forward``."""

    def __init__(self, config, quant_config=None, prefix: str = "") -> None:
        super().__init__(config, quant_config=quant_config, prefix=prefix)
        if self.pp_group.world_size > 1:
            raise ValueError("LadderLlamaForCausalLM supports tensor parallelism only; run it with --pp-size 1")
        self.ladder_start_layer = ladder_start_layer(config)
        for layer in self.layers:
            # NOTE: the ladder reduces these itself; a reducing layer would sum them twice.
            assert not layer.self_attn.o_proj.reduce_results and not layer.mlp.down_proj.reduce_results, (
                "upstream's Llama layers now reduce their own outputs; the ladder model needs them unreduced"
            )
        self.comm = create_tp_communicator()
        self._trace_path = env.ladder_trace_path()

    @staticmethod
    def _attention(layer, positions, forward_batch, x: torch.Tensor) -> torch.Tensor:
        return layer.self_attn(positions=positions, hidden_states=layer.input_layernorm(x), forward_batch=forward_batch)

    @staticmethod
    def _mlp(layer, forward_batch, x: torch.Tensor) -> torch.Tensor:
        return layer.mlp(layer.post_attention_layernorm(x), forward_batch=forward_batch)

    def sublayers(self, positions, forward_batch) -> list[SubLayer]:
        out = []
        for i in range(self.start_layer, self.end_layer):
            layer, deferred = self.layers[i], i >= self.ladder_start_layer
            out.append(SubLayer(partial(self._attention, layer, positions, forward_batch), deferred))
            out.append(SubLayer(partial(self._mlp, layer, forward_batch), deferred))
        return out

    def forward(self, input_ids, positions, forward_batch, input_embeds=None, pp_proxy_tensors=None):
        if self.layers_to_capture:
            raise NotImplementedError("LadderLlamaForCausalLM does not capture hidden states (EAGLE3 target)")
        x = self.embed_tokens(input_ids) if input_embeds is None else input_embeds  # (n_tokens, hidden)
        sublayers, comm = self.sublayers(positions, forward_batch), self.comm
        log = None
        if self._trace_path and x.shape[0] > 0:
            log = TraceLog()
            sublayers, comm = traced(sublayers, log), TracingCommunicator(comm, log)
        x = residual_stream(x, sublayers, comm)
        if log is not None:
            self._write_trace(log, len(sublayers))
        return self.norm(x)

    def _write_trace(self, log: TraceLog, n_sublayers: int) -> None:
        """Writes one forward's event order for tests, then stops tracing."""
        from sglang.srt.runtime_context import get_parallel

        path = Path(f"{self._trace_path}.rank{get_parallel().tp_rank}.json")
        payload = {"n_sublayers": n_sublayers, "ladder_start_layer": self.ladder_start_layer,
                   "tp_size": get_parallel().tp_size, "events": log.events}
        path.write_text(json.dumps(payload))
        self._trace_path = None


class LadderLlamaForCausalLM(LlamaForCausalLM):
    """Served like ``LlamaForCausalLM``; only the residual stream differs."""

    def _init_model(self, config, quant_config=None, prefix: str = ""):
        return TurboLadderLlamaModel(config, quant_config=quant_config, prefix=prefix)

    def forward_split_prefill(self, *args, **kwargs):
        raise NotImplementedError("LadderLlamaForCausalLM has no split prefill (upstream's runs the standard residual)")

    def set_eagle3_layers_to_capture(self, layer_ids=None):
        raise NotImplementedError("LadderLlamaForCausalLM cannot be an EAGLE3 target yet; use STANDALONE or NGRAM")


EntryClass = LadderLlamaForCausalLM
