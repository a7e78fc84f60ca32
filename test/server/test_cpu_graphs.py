"""CPU graphs (``--enable-torch-compile``, the portable platform's default for Llama checkpoints):
compiled decode, same greedy tokens as transformers.

The server compiles turbo-tiny's decode forward at start-up (sglang_turbo/graph_runner.py), serving it
with models/turbo_llama.py's class; attention stays the eager ``turbo::paged_attention`` op. Batches up
to ``--torch-compile-max-bs`` run compiled (1 to 4 requests on one thread, more on two: separate
graphs), bigger ones eagerly; the tokens must be the same either way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
from greedy import GREEDY, PROMPTS, first_difference, server_greedy, transformers_greedy

from sglang_turbo.graph_runner import (
    check_cpu_graph_args,
    cpu_graphs_by_default,
    route_draft_head,
    route_to_compiled_model,
)
from sglang_turbo.threads import ONE_THREAD_MAX_BS
from turbo.attention import paged
from turbo.zoo.presets import zoo_path

MAX_BS = 8
PARALLEL_KEYS = 2048


@pytest.fixture(scope="module")
def compiled_server(turbo_server_factory):
    # Attention goes wide from 2048 keys here: the default, 4096, is all of turbo-tiny's positions.
    env = {"SGLANG_TURBO_PARALLEL_ATTENTION_KEYS": str(PARALLEL_KEYS)}
    with turbo_server_factory(["--enable-torch-compile", "--torch-compile-max-bs", str(MAX_BS)], env=env) as handle:
        yield handle


def _log(handle) -> str:
    with open(handle.log_path, errors="replace") as f:
        return f.read()


def test_server_compiles_decode_at_start_up(compiled_server):
    log = _log(compiled_server)
    # One graph for batch 1, one dynamic-batch graph per thread count: WARMUP_BATCH_SIZES, no more.
    assert f"CPU graph: decode forward compiled for batch sizes 1..{MAX_BS} (3 graphs, weights frozen)" in log, log[-3000:]
    assert "TurboLlamaForCausalLM" in log, "a LlamaForCausalLM checkpoint is served by the traceable class"


@pytest.mark.parametrize("name", list(PROMPTS))
def test_compiled_greedy_output_equals_transformers(compiled_server, post_generate, prompt_ids, hf_greedy, name):
    got = server_greedy(post_generate, compiled_server.base_url, prompt_ids[name])
    want = hf_greedy[name]
    assert got == want, f"{name}: first difference at {first_difference(got, want)}\n{got=}\n{want=}"


def test_decode_steps_take_the_compiled_path(compiled_server, post_generate):
    # SGLang logs a decode batch every 40 steps, saying whether it ran as a graph.
    post_generate(compiled_server.base_url, {"input_ids": [5, 6, 7], "sampling_params": {
        "max_new_tokens": 100, "temperature": 0, "ignore_eos": True}})
    assert "cpu graph: True" in _log(compiled_server), _log(compiled_server)[-3000:]


def test_concurrent_requests_on_the_two_thread_graph_equal_transformers(compiled_server, post_generate, prompt_ids,
                                                                        hf_greedy):
    names = list(PROMPTS)
    assert len(names) > ONE_THREAD_MAX_BS, "the batch must be big enough for the two-thread graph"
    with ThreadPoolExecutor(max_workers=len(names)) as pool:
        got = dict(zip(names, pool.map(
            lambda n: server_greedy(post_generate, compiled_server.base_url, prompt_ids[n]), names)))
    bad = {n: first_difference(got[n], hf_greedy[n]) for n in names if got[n] != hf_greedy[n]}
    assert not bad, f"name: first difference: {bad}"


def test_batch_beyond_the_compiled_sizes_runs_eagerly_with_the_same_tokens(compiled_server, post_generate,
                                                                         prompt_ids, hf_greedy):
    names = list(PROMPTS) * 2
    assert len(names) > MAX_BS
    payload = {"input_ids": [prompt_ids[n] for n in names], "sampling_params": GREEDY}
    outs = post_generate(compiled_server.base_url, payload)
    bad = [n for n, o in zip(names, outs) if o["output_ids"] != hf_greedy[n]]
    assert not bad, f"differ from transformers: {bad}"
    assert "compiling for an unforeseen decode batch" not in _log(compiled_server), "warm-up missed a graph"


def test_a_long_context_runs_attention_on_every_thread_with_the_same_tokens(compiled_server, post_generate,
                                                                         tokenizer, model_path):
    # Past SGLANG_TURBO_PARALLEL_ATTENTION_KEYS keys, a batch-1 step (one thread) runs its attention on all.
    ids = tokenizer(Path(paged.__file__).read_text()).input_ids[: PARALLEL_KEYS + 250]
    assert len(ids) == PARALLEL_KEYS + 250, "the prompt must be longer than the threshold"
    got = server_greedy(post_generate, compiled_server.base_url, ids)
    want = transformers_greedy(model_path, {"long": ids})["long"]
    assert got == want, f"first difference at {first_difference(got, want)}\n{got=}\n{want=}"
    cores = len(os.sched_getaffinity(0))  # the server's threads (SGLANG_TURBO_THREADS unset)
    if cores > 1:
        line = f"decode attention of requests over >= {PARALLEL_KEYS} keys runs on {cores} threads"
        assert line in _log(compiled_server), _log(compiled_server)[-3000:]


# ----------------------------------------------------------------------------- launch-time routing and refusals


def test_an_online_weight_update_is_refused_and_the_server_keeps_its_weights(compiled_server, post_generate,
                                                                            prompt_ids, hf_greedy, model_path):
    """The frozen graphs hold copies of the weights that an update would not reach: the update is refused
    with the way out, before any weight is written, and the server answers as before."""
    r = requests.post(f"{compiled_server.base_url}/update_weights_from_disk", json={"model_path": str(model_path)},
                      timeout=60)
    body = r.json()
    assert not body.get("success"), body
    assert "SGLANG_TURBO_FROZEN_WEIGHTS=off" in body.get("message", ""), body
    name = next(iter(PROMPTS))
    assert server_greedy(post_generate, compiled_server.base_url, prompt_ids[name]) == hf_greedy[name]


def _args(**overrides):
    args = dict(enable_torch_compile=True, model_path=str(zoo_path("turbo-tiny")), json_model_override_args="{}",
                speculative_algorithm=None, tp_size=1, pp_size=1, attention_backend="turbo_native",
                disable_cuda_graph=False, enable_lora=False, lora_paths=None)
    return SimpleNamespace(**{**args, **overrides})


def test_cpu_graphs_are_the_default_for_a_plain_llama_server():
    assert cpu_graphs_by_default(_args(enable_torch_compile=False)) is None


@pytest.mark.parametrize("algorithm", ["NGRAM", "STANDALONE", "EAGLE", "EAGLE3", "TURBO"])
def test_cpu_graphs_are_the_default_for_every_speculative_algorithm_served_here(algorithm):
    """The target's verify forward is the compiled body; an EAGLE3 / TURBO target's body also returns the
    aux-layer hidden states its head reads (test/spec/test_spec_server.py, test_adaptive_server.py)."""
    assert cpu_graphs_by_default(_args(enable_torch_compile=False, speculative_algorithm=algorithm)) is None
    check_cpu_graph_args(_args(speculative_algorithm=algorithm), portable=True)


def test_cpu_graphs_default_off_without_a_cpp_compiler(monkeypatch):
    """A machine with Python and nothing else serves eagerly instead of failing to compile."""
    monkeypatch.setattr("sglang_turbo.graph_runner.cpp_compiler", lambda: None)
    assert "no C++ compiler" in cpu_graphs_by_default(_args(enable_torch_compile=False))


@pytest.mark.parametrize("overrides,reason", [
    (dict(disable_cuda_graph=True), "--disable-cuda-graph"),
    (dict(model_path=str(zoo_path("turbo-tiny-ladder"))), "served eagerly"),
    (dict(speculative_algorithm="DFLASH"), "not DFLASH"),
    (dict(tp_size=2), "one rank"),
    (dict(attention_backend="torch_native"), "needs --attention-backend turbo_native"),
    (dict(enable_lora=True), "LoRA"),
    (dict(json_model_override_args='{"architectures": ["LlamaForCausalLM"]}'), "drop the override"),
])
def test_cpu_graphs_default_off_where_they_do_not_apply(overrides, reason):
    why_not = cpu_graphs_by_default(_args(enable_torch_compile=False, **overrides))
    assert why_not is not None and reason in why_not, why_not


def test_a_llama_checkpoint_is_routed_to_the_traceable_class():
    args = _args()
    route_to_compiled_model(args)
    assert json.loads(args.json_model_override_args) == {"architectures": ["TurboLlamaForCausalLM"]}
    check_cpu_graph_args(args, portable=True)


def test_a_hybrid_checkpoint_compiles_as_its_own_class():
    """LlamaMamba2ForCausalLM's layers are already the traceable ones; its mixers run as opaque ops."""
    assert cpu_graphs_by_default(_args(enable_torch_compile=False, model_path=str(zoo_path("turbo-tiny-hybrid")))) is None
    args = _args(model_path=str(zoo_path("turbo-tiny-hybrid")))
    route_to_compiled_model(args)
    assert args.json_model_override_args == "{}"
    check_cpu_graph_args(args, portable=True)


@pytest.mark.parametrize("draft,is_draft,served", [
    ("turbo-tiny-eagle3", True, "TurboLlamaForCausalLMEagle3"),  # an EAGLE3 head: its compiled class
    ("turbo-tiny-draft", True, "TurboLlamaForCausalLM"),  # a Llama draft: the target's override is right
    ("turbo-tiny-eagle3", False, "TurboLlamaForCausalLM"),  # only a draft's config is corrected
])
def test_a_draft_under_the_targets_override_is_served_by_its_own_compiled_class(draft, is_draft, served):
    """Upstream applies --json-model-override-args to the draft's config too (the TurboLlamaForCausalLM
    route_to_compiled_model put there for the target)."""
    config = SimpleNamespace(hf_config=SimpleNamespace(architectures=["TurboLlamaForCausalLM"]),
                             is_draft_model=is_draft, model_path=str(zoo_path(draft)))
    route_draft_head(config)
    assert config.hf_config.architectures == [served]


def test_routing_keeps_the_users_overrides_and_needs_the_flag():
    args = _args(json_model_override_args='{"rope_theta": 5.0}')
    route_to_compiled_model(args)
    assert json.loads(args.json_model_override_args) == {"rope_theta": 5.0, "architectures": ["TurboLlamaForCausalLM"]}
    mine = _args(json_model_override_args='{"architectures": ["LlamaForCausalLM"]}')
    route_to_compiled_model(mine)
    assert json.loads(mine.json_model_override_args) == {"architectures": ["LlamaForCausalLM"]}
    eager = _args(enable_torch_compile=False)
    route_to_compiled_model(eager)
    assert eager.json_model_override_args == "{}"


@pytest.mark.parametrize("overrides,message", [
    (dict(model_path=str(zoo_path("turbo-tiny-ladder"))), "is LadderLlamaForCausalLM, which is served eagerly"),
    (dict(json_model_override_args='{"architectures": ["LlamaForCausalLM"]}'), "needs TurboLlamaForCausalLM"),
    (dict(speculative_algorithm="DFLASH"), "not DFLASH; drop --enable-torch-compile"),
    (dict(tp_size=2), "runs one rank"),
])
def test_combinations_it_cannot_compile_are_refused(overrides, message):
    args = _args(**overrides)
    route_to_compiled_model(args)
    with pytest.raises(ValueError, match=message):
        check_cpu_graph_args(args, portable=True)


def test_launcher_exits_2_for_a_model_it_cannot_compile():
    proc = subprocess.run(
        [sys.executable, "-m", "sglang_turbo.launch_server", "--model-path", "turbo-tiny-ladder",
         "--enable-torch-compile"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, f"{proc.returncode=} {proc.stderr[-2000:]}"
    assert "--enable-torch-compile" in proc.stderr and "served eagerly" in proc.stderr, proc.stderr[-2000:]
