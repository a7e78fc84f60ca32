"""CPU graphs: the decode forward through ``torch.compile`` (``--enable-torch-compile``, which the
portable platform turns on by default where it applies: ``cpu_graphs_by_default``).

SGLang's decode-graph seam (``SRTPlatform.get_graph_runner_cls``) asks the platform
for a runner with ``can_run_graph(forward_batch)`` and ``execute(forward_batch)``.
Upstream's ``CPUGraphRunner`` needs sgl_kernel's CPU operators (it registers fake
implementations for them), which the PyPI wheel does not ship, and compiles one
static graph per batch size. This runner is the portable form:

* one compiled forward with a dynamic batch dimension (plus the batch-1 graph that
  dynamo always specialises), compiled at start-up by warm-up batches, so serving
  never waits for a compile and start-up does not grow with the number of sizes;
* attention is ``turbo::paged_attention`` (``attention/backend.py``), opaque to the
  compiler, so the per-step layout (request lengths, slots) is read at call time
  and no live batch needs padding to a captured size;
* inductor fuses what is left of the layers: projections, rotary, norms, the MLP;
  the logits processor and sampling stay eager.

Why it pays on CPU: a tiny model's decode step is dominated by Python in SGLang's
layer code, not by arithmetic (docs/benchmarks.md); a compiled graph runs as
generated C++ behind one short guard check per step.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import types
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .attention import BACKEND_NAME as ATTENTION_BACKEND
from .threads import ONE_THREAD_MAX_BS, threads_for_decode

if TYPE_CHECKING:
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch
    from sglang.srt.model_executor.model_runner import ModelRunner

logger = logging.getLogger(__name__)

# Checkpoint architectures the compiled path serves, and the class it serves them with.
COMPILED_ARCHITECTURES = {
    "LlamaForCausalLM": "TurboLlamaForCausalLM",
    "TurboLlamaForCausalLM": "TurboLlamaForCausalLM",
    "LlamaMamba2ForCausalLM": "LlamaMamba2ForCausalLM",  # its layers are turbo_llama's; mixers are ops
}


# Draft heads served by a compiled class under CPU graphs (route_draft_head).
COMPILED_DRAFT_HEADS = {"LlamaForCausalLMEagle3": "TurboLlamaForCausalLMEagle3"}

# Speculative algorithms whose target verify forward runs compiled (an EAGLE3 / TURBO target's body
# also returns the aux-layer residual streams its draft head reads; the logits processor stays eager).
COMPILED_VERIFY_ALGORITHMS = ("NGRAM", "STANDALONE", "EAGLE", "EAGLE3", "TURBO")


def _architecture(model_path: str) -> str | None:
    try:
        archs = json.loads((Path(model_path) / "config.json").read_text()).get("architectures") or [None]
    except (OSError, ValueError):
        return None
    return archs[0]


def route_to_compiled_model(args) -> None:
    """Under ``--enable-torch-compile``, serve a ``LlamaForCausalLM`` checkpoint with
    models/turbo_llama.py's class (upstream's layers stop the compiler), through upstream's own
    ``--json-model-override-args``; an ``architectures`` the user put there wins."""
    if not getattr(args, "enable_torch_compile", False) or not args.model_path:
        return
    arch = _architecture(str(args.model_path))
    target = COMPILED_ARCHITECTURES.get(arch or "")
    if target is None or target == arch:
        return  # refused at launch (check_cpu_graph_args), or served by its own class
    overrides = json.loads(args.json_model_override_args or "{}")
    if "architectures" not in overrides:
        overrides["architectures"] = [target]
        args.json_model_override_args = json.dumps(overrides)


def route_draft_head(model_config) -> None:
    """Serve an EAGLE3 head with its compiled class when the compile routing renamed it.

    ``--json-model-override-args`` is applied to the draft's config as well as the target's: the
    ``TurboLlamaForCausalLM`` that route_to_compiled_model puts there is right for a Llama draft
    (STANDALONE, whose draft then compiles too) but would load an EAGLE3 head as a Llama. The head
    gets its own architecture back, or the compiled class for it (``COMPILED_DRAFT_HEADS``).
    """
    config = model_config.hf_config
    turbo_llama = COMPILED_ARCHITECTURES["LlamaForCausalLM"]
    if not model_config.is_draft_model or getattr(config, "architectures", None) != [turbo_llama]:
        return
    own = _architecture(str(model_config.model_path))
    if own is not None and COMPILED_ARCHITECTURES.get(own) != turbo_llama:
        config.architectures = [COMPILED_DRAFT_HEADS.get(own, own)]


def cpu_graph_obstacle(cfg) -> str | None:
    """Why ``cfg`` (server args) cannot run CPU graphs on the portable platform, or None when it can."""
    arch = _architecture(str(cfg.model_path)) if cfg.model_path else None
    overrides = json.loads(cfg.json_model_override_args or "{}")
    # The class that will serve it: the override's, else what route_to_compiled_model picks.
    served = overrides["architectures"][0] if "architectures" in overrides else COMPILED_ARCHITECTURES.get(arch)
    if served not in COMPILED_ARCHITECTURES.values():
        if arch in COMPILED_ARCHITECTURES:  # a Llama checkpoint, steered elsewhere by the user's override
            return (
                f"--enable-torch-compile with --json-model-override-args architectures {served}: compiled "
                "decode on the portable CPU platform needs TurboLlamaForCausalLM (upstream's Llama layers stop "
                "torch.compile); drop the override"
            )
        return (
            f"--enable-torch-compile: on the portable CPU platform sglang-turbo compiles Llama checkpoints "
            f"(architecture LlamaForCausalLM); {cfg.model_path} is {arch}, which is served eagerly: drop the flag"
        )
    if cfg.speculative_algorithm and str(cfg.speculative_algorithm).upper() not in COMPILED_VERIFY_ALGORITHMS:
        return (
            "--enable-torch-compile on the portable CPU platform compiles plain decode and the target's verify "
            f"forward of {'/'.join(COMPILED_VERIFY_ALGORITHMS)}, not {cfg.speculative_algorithm}; drop "
            "--enable-torch-compile"
        )
    if cfg.tp_size > 1 or cfg.pp_size > 1:
        return "--enable-torch-compile on the portable CPU platform runs one rank; drop it or --tp-size/--pp-size"
    backend = getattr(cfg, "attention_backend", None)
    if backend is not None and backend != ATTENTION_BACKEND:
        return (
            f"--enable-torch-compile on the portable CPU platform needs --attention-backend {ATTENTION_BACKEND} "
            f"(not {backend})"
        )
    return None


def check_cpu_graph_args(cfg, portable: bool) -> None:
    """Launch-time refusals (``cfg``: resolved server args), so a bad combination is a usage error
    rather than a scheduler that dies while compiling. ``portable``: serving on TurboCpuPlatform."""
    if not cfg.enable_torch_compile or not portable:
        return  # on CUDA, upstream's graphs and compile path
    obstacle = cpu_graph_obstacle(cfg)
    if obstacle:
        raise ValueError(obstacle)


def cpu_graphs_by_default(args) -> str | None:
    """CPU graphs are the portable platform's default where they apply (``args``: the launch command's
    arguments, after the other CPU defaults); returns why not, or None to turn them on.
    ``--disable-cuda-graph`` (upstream's "no graphs") keeps decode eager."""
    if getattr(args, "disable_cuda_graph", False):
        return "--disable-cuda-graph"
    if getattr(args, "enable_lora", False) or getattr(args, "lora_paths", None):
        return "LoRA adapters are served eagerly"
    if not cpp_compiler():
        return "no C++ compiler (g++, or $CXX) for inductor's generated code"
    return cpu_graph_obstacle(args)


def cpp_compiler() -> str | None:
    """The C++ compiler inductor would use ($CXX, else g++ / c++ on PATH), or None: a bare machine may
    have none, and the default must then stay eager rather than fail at start-up."""
    return shutil.which(os.environ.get("CXX", "")) or shutil.which("g++") or shutil.which("c++")


# Warm-up sizes: 1 (dynamo specialises size 1), then more so the batch dimension is compiled as
# dynamic (automatic dynamic shapes mark a dimension once it changes), on each thread count a step
# can run with (the thread count is part of dynamo's guards: another one is another graph). That is
# 3 graphs (batch 1; batch >= 2 on one thread; on two): the log line counts them. Marking the batch
# dimension dynamic up front compiles the same 3 and starts no faster (26 s cold, 16 s warm, 2026-12-03).
WARMUP_BATCH_SIZES = (1, 2, 3, ONE_THREAD_MAX_BS + 1, ONE_THREAD_MAX_BS + 2)


# Inductor checks the size, stride and alignment of every graph input and every opaque op's output on
# each call; with an attention op per layer that was 7% of a batch-1 decode step (py-spy, 2026-12-02).
# The shapes are fixed by the model and checked once by the warm-up; the op's fake says what it returns.
INDUCTOR_OPTIONS = {"size_asserts": False, "alignment_asserts": False, "scalar_asserts": False}

# Inductor's freezing folds the weights into the graph as constants and packs the linear layers' for
# its GEMMs. Unpacked, MKL re-packs a weight on every call with more than one row (its sgemm copy
# routine was 23% of a 5-token verify forward, py-spy 2026-12-07): a (3, 256) @ (256, 4096) took 307 us
# against 109 for one row. Frozen, verify went from 7.9 to 6.3 ms and batch-1 decode from 4.7 to 4.2
# (TIMING of one server each, same run). Frozen constants are copies: an online weight update would
# not reach them, so the model refuses one (upstream's ``_derived_weight_cache_error``), and a head
# whose weights are swapped while serving (TURBO's draft) is never frozen.
FROZEN_WEIGHTS_ERROR = (
    "Online weight updates are not supported under CPU graphs with frozen weights: the compiled forward "
    "holds packed copies of the weights. Restart with SGLANG_TURBO_FROZEN_WEIGHTS=off (CPU graphs that "
    "read the weights as inputs) or --disable-cuda-graph."
)


def freezes_weights(model_runner: ModelRunner) -> bool:
    """Whether this runner's graphs hold the model's weights as packed constants."""
    from . import env

    swapped_while_serving = model_runner.is_draft_worker and model_runner.spec_algorithm.name == "TURBO"
    return env.frozen_weights() and not swapped_while_serving


def _own_frame(fn):
    """``fn`` called from a function with a code object of its own. Dynamo keeps its graphs per code
    object, and every no_grad-wrapped body shares one (torch's wrapper): a STANDALONE draft's decode
    steps then ran on its target's graphs once guards were skipped (accept length 1.0, measured)."""

    def body(*args):
        return fn(*args)

    return types.FunctionType(body.__code__.replace(), body.__globals__, body.__name__, None, body.__closure__)


def _compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


class TurboCpuGraphRunner:
    """Runs decode batches of at most ``max_bs`` requests through the compiled forward.

    The same graphs serve what SGLang runs through its eager path (the model's ``compiled_body``):
    the target-verify batches of a speculative target, and a STANDALONE draft's decode steps
    (``compile_draft_decode``); their token count is the only shape that differs.
    """

    def __init__(self, model_runner: ModelRunner, attn_backend=None, speculative_num_steps=None,
                 speculative_num_draft_tokens=None):
        """The keyword arguments are upstream's for a speculative lookahead's own runner (an adaptive
        state, ``build_adaptive_runtime_state``): it shares the graphs already compiled for the model
        and runs them with that state's attention backend, which the graphs read from SGLang's forward
        context, so its verify shape (draft tokens) needs no graph of its own."""
        from sglang.srt.model_executor.forward_batch_info import ForwardMode
        from sglang.srt.runtime_context import get_exec, get_spec

        compiled = getattr(getattr(model_runner.model, "compiled_body", None), "__self__", None)
        if isinstance(compiled, TurboCpuGraphRunner) and compiled.model_runner is model_runner:
            self.__dict__.update(compiled.__dict__)
            self.backend = attn_backend if attn_backend is not None else compiled.backend
            return
        self.model_runner = model_runner
        algorithm = model_runner.spec_algorithm
        if not (algorithm.is_none() or algorithm.name in COMPILED_VERIFY_ALGORITHMS):
            raise ValueError(
                "--enable-torch-compile on the portable CPU platform compiles plain decode and the target's "
                f"verify forward of {'/'.join(COMPILED_VERIFY_ALGORITHMS)}; drop it or drop --speculative-algorithm"
            )
        from .attention.backend import TurboNativeAttnBackend

        # A hybrid model's backend wraps the attention backend beside its Mamba backend; a draft
        # runner's own backend is not built (its steps run on the draft worker's), so warm up on one.
        backend = model_runner.attn_backend if not model_runner.is_draft_worker else TurboNativeAttnBackend(model_runner)
        attention = getattr(backend, "full_attn_backend", backend)
        if not isinstance(attention, TurboNativeAttnBackend):
            raise ValueError(
                f"--enable-torch-compile on the portable CPU platform needs --attention-backend {ATTENTION_BACKEND}"
            )
        self.backend = backend
        self.capture_bs = sorted(set(get_exec().graph.cuda_graph_config.decode.bs))
        self.max_bs = max(self.capture_bs)
        self.bs = None  # read by SGLang's logging: this runner never pads a batch
        model = model_runner.model
        # The layers are compiled, the logits processor is not: it branches on per-request options
        # (logprobs, hidden states) that would each be a guard and a recompile. A body may say what it
        # compiles (``graph_body``, else its forward) and with what (``graph_inputs``).
        self._graph_inputs = model.model.graph_inputs
        self._eager_body = torch.no_grad()(getattr(model.model, "graph_body", model.model.forward))
        self._body = self._eager_body
        self._warm = False  # guards are evaluated until every graph has been compiled
        self.frozen = freezes_weights(model_runner)
        if self.frozen:
            model._derived_weight_cache_error = FROZEN_WEIGHTS_ERROR  # read by upstream's weight updater
        self._run(self._warmup_batch(1))  # eager: the attention backend learns its layers
        self._body = torch.compile(_own_frame(self._eager_body), dynamic=None, options=INDUCTOR_OPTIONS)
        tic, graphs_before = time.perf_counter(), _compiled_graphs()
        for bs in WARMUP_BATCH_SIZES:
            if bs <= self.max_bs:
                self._run(self._warmup_batch(bs))
        if model_runner.is_draft_worker and (draft_tokens := get_spec().speculative_num_draft_tokens or 1) > 1:
            self._warm_up_draft_extend(draft_tokens)
        self._warm = True
        # Forwards that reach the model through SGLang's eager path rather than through execute().
        if model_runner.is_draft_worker:
            model.compiled_body, model.compiled_modes = self._run_body, (ForwardMode.DECODE, ForwardMode.DRAFT_EXTEND_V2)
            logger.info("CPU graph: the %s draft's decode steps and extend run the compiled forward", algorithm.name)
        elif not algorithm.is_none():
            model.compiled_body, model.compiled_modes = self._run_body, (ForwardMode.TARGET_VERIFY,)
            logger.info("CPU graph: %s target verify runs the compiled forward", algorithm.name)
        logger.info(
            "CPU graph: decode forward%s compiled for batch sizes 1..%d (%d graphs, weights %s) in %.1f s",
            " and draft extend" if model_runner.is_draft_worker else "",
            self.max_bs, _compiled_graphs() - graphs_before,
            "frozen" if self.frozen else "read as inputs", time.perf_counter() - tic,
        )

    def can_run_graph(self, forward_batch: ForwardBatch) -> bool:
        return forward_batch.forward_mode.is_decode() and forward_batch.batch_size <= self.max_bs

    def execute(self, forward_batch: ForwardBatch, pp_proxy_tensors=None):
        if pp_proxy_tensors is not None:
            raise NotImplementedError("CPU graphs do not run pipeline parallelism")
        return self._run(forward_batch)

    def _run(self, forward_batch: ForwardBatch):
        from sglang.srt.model_executor.forward_context import ForwardContext, forward_context

        backend = self.backend
        backend.init_forward_metadata(forward_batch)
        model = self.model_runner.model
        # While serving, the run_batch hook (threads.py) has already set the step's threads; the warm-up
        # sets them here, so that each thread count a step can run with gets its graph.
        with threads_for_decode(forward_batch.batch_size):
            with forward_context(ForwardContext(attn_backend=backend), forward_batch=forward_batch):
                # Once every graph exists, dynamo checks only what tells them apart (batch 1 or not):
                # the full guard set cost ~0.6 ms a step, and nothing else here varies between steps.
                return model.logits_from_body(forward_batch.input_ids, self._compiled_body(forward_batch), forward_batch)

    def _run_body(self, forward_batch: ForwardBatch):
        """The body's output (hidden states, and an EAGLE3 target's aux list) for a batch whose
        attention layout SGLang's eager path has set."""
        with threads_for_decode(forward_batch.batch_size):
            return self._compiled_body(forward_batch)

    def _compiled_body(self, forward_batch: ForwardBatch):
        args = self._graph_inputs(forward_batch)
        if not self._warm:
            with self._compile_config():
                return self._body(*args)
        try:
            with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                return self._body(*args)
        except RuntimeError as e:  # a batch the warm-up did not foresee: compile for it, guards on
            if "Recompilation triggered" not in str(e):
                raise
            logger.warning("CPU graph: compiling for an unforeseen decode batch (batch size %d)", forward_batch.batch_size)
            with self._compile_config():
                return self._body(*args)

    def _compile_config(self):
        """Inductor's settings for a call that may compile. Freezing is a global setting inductor reads
        when it compiles (``options=`` does not reach it), so it is set around those calls only."""
        import torch._inductor.config

        return torch._inductor.config.patch(freezing=self.frozen)

    def _warm_up_draft_extend(self, tokens_per_req: int) -> None:
        """Compiles a draft's extend (each request's verified tokens, ``tokens_per_req`` of them) at
        start-up, on every thread count and with a dynamic token count, as decode is compiled."""
        from sglang.srt.model_executor.forward_context import ForwardContext, forward_context

        for bs in WARMUP_BATCH_SIZES:
            if bs <= self.max_bs:
                forward_batch = self._warmup_batch(bs, tokens_per_req)
                self.backend.init_forward_metadata(forward_batch)
                with forward_context(ForwardContext(attn_backend=self.backend), forward_batch=forward_batch):
                    self._run_body(forward_batch)

    def _warmup_batch(self, bs: int, tokens_per_req: int = 1) -> ForwardBatch:
        """A batch of ``bs`` requests on the reserved request row 0 and KV slot 0: a decode batch of one
        token each, or with ``tokens_per_req`` > 1 a draft extend (DRAFT_EXTEND_V2) of that many."""
        from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode, ForwardBatch, ForwardMode
        from sglang.srt.speculative.eagle_info import EagleDraftInput

        from .models.turbo_llama_eagle3 import TurboEagle3Model

        extend = tokens_per_req > 1
        mode = ForwardMode.DRAFT_EXTEND_V2 if extend else ForwardMode.DECODE
        n_tokens = bs * tokens_per_req
        zeros = torch.zeros(n_tokens, dtype=torch.int64)
        lens = torch.full((bs,), tokens_per_req, dtype=torch.int64)
        forward_batch = ForwardBatch(
            forward_mode=mode,
            batch_size=bs,
            input_ids=zeros.clone(),
            req_pool_indices=torch.zeros(bs, dtype=torch.int64),
            seq_lens=lens.clone(),
            seq_lens_cpu=lens.clone(),
            out_cache_loc=zeros.clone(),
            seq_lens_sum=n_tokens,
            return_logprob=False,
            positions=torch.arange(tokens_per_req).repeat(bs) if extend else zeros.clone(),
            spec_algorithm=self.model_runner.spec_algorithm,
            capture_hidden_mode=CaptureHiddenMode.NULL,
            global_forward_mode=mode,
        )
        if extend:
            forward_batch.extend_seq_lens, forward_batch.extend_seq_lens_cpu = lens.clone(), lens.tolist()
            forward_batch.extend_prefix_lens = torch.zeros(bs, dtype=torch.int64)
            forward_batch.extend_start_loc = torch.arange(0, n_tokens, tokens_per_req)
        model = self.model_runner.model
        if isinstance(model.model, TurboEagle3Model):
            # A head's draft step reads its own previous hidden state, its extend the target's features.
            width = model.model.fc.in_features if extend else model.config.hidden_size
            hidden = torch.zeros(n_tokens, width, dtype=model.lm_head.weight.dtype)
            forward_batch.spec_info = EagleDraftInput(hidden_states=hidden, capture_hidden_mode=CaptureHiddenMode.NULL)
        self.model_runner.kv_index_translator.bind_runner_slots(forward_batch)
        return forward_batch


def compile_draft_decode(model_runner: ModelRunner) -> None:
    """CPU graphs for a draft's decode steps and extend (``model_runner``: the draft's), once, when the
    server runs CPU graphs and the draft is served by a traceable class: a STANDALONE Llama draft
    (``TurboLlamaForCausalLM``) or an EAGLE3 / TURBO head (``TurboLlamaForCausalLMEagle3``)."""
    from sglang.srt.runtime_context import get_flags

    from .models.turbo_llama import CompiledBody

    model = model_runner.model
    # The draft runner's own server args have compile off; the server's flag is the global one.
    if (str(model_runner.device) != "cpu" or not get_flags().capture.enable_torch_compile
            or not isinstance(model, CompiledBody) or model.compiled_body is not None
            or getattr(model.model, "is_mrope_enabled", False)):
        return
    TurboCpuGraphRunner(model_runner)
