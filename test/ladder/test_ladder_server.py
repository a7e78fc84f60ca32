"""Tensor parallelism on the portable platform, served by SGLang: the ladder model at TP1, TP2 and TP2
across two nodes (two launchers on this machine), and the plain Llama at TP2.

Every configuration is checked against the plain-PyTorch reference of the same checkpoint
(``turbo.ladder.model``; for the plain Llama it equals transformers, test_model.py): greedy tokens,
per-token log-probabilities, 8 concurrent requests, chunked prefill (``--chunked-prefill-size 32``
with longer prompts) and a radix-cache hit. One configuration's servers run at a time (module-scoped,
parametrized fixture), each with a small KV pool.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import torch

from sglang_turbo.server_process import ServerStartError, kill_server, launch_turbo_nodes
from turbo.ladder.comm import TraceLog, overlapped
from turbo.ladder.model import load_model
from turbo.zoo.presets import zoo_path

N_NEW = 24
COMMON_FLAGS = ["--max-total-tokens", "8192", "--chunked-prefill-size", "32"]
PROMPTS = {
    "fibonacci": "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "imports": "import os\nimport sys\n",
    "record": "name: Ada Lovelace\nborn: 1815\ncity:",
    "long": "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n"
            "        self.items.append(item)\n\n    def pop(self):\n        return self.items.pop()\n\n"
            "    def peek(self):\n",
}


@dataclass(frozen=True)
class Config:
    model: str
    tp_size: int
    nnodes: int = 1

    @property
    def ladder(self) -> bool:
        return self.model == "turbo-tiny-ladder"


CONFIGS = {
    "ladder-tp1": Config("turbo-tiny-ladder", 1),
    "ladder-tp2": Config("turbo-tiny-ladder", 2),
    "ladder-tp2-two-nodes": Config("turbo-tiny-ladder", 2, nnodes=2),
    "llama-tp2": Config("turbo-tiny", 2),
}


@dataclass
class Served:
    config: Config
    url: str
    trace_prefix: Path


@pytest.fixture(scope="module", params=list(CONFIGS))
def served(request, tmp_path_factory):
    cfg = CONFIGS[request.param]
    log_dir = tmp_path_factory.mktemp(request.param)
    trace_prefix = log_dir / "trace"
    env = {"SGLANG_TURBO_LADDER_TRACE": str(trace_prefix)}
    if cfg.nnodes > 1:
        env["SGLANG_TURBO_THREADS"] = "1"  # two "nodes" on one machine: one core each, as two hosts would
    flags = ["--tp-size", str(cfg.tp_size), *COMMON_FLAGS]
    try:
        procs, url = launch_turbo_nodes(zoo_path(cfg.model), flags, nnodes=cfg.nnodes, env=env, log_dir=log_dir)
    except ServerStartError as e:
        pytest.fail(str(e), pytrace=False)
    try:
        yield Served(cfg, url, trace_prefix)
    finally:
        for p in procs:
            kill_server(p)


@pytest.fixture(scope="module")
def tokenizer_ids():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(zoo_path("turbo-tiny"))
    return {name: tok(text).input_ids for name, text in PROMPTS.items()}


@pytest.fixture(scope="module")
def references():
    """{model: {prompt: (greedy tokens, their log-probabilities)}} from the plain-PyTorch reference."""
    return {}


def reference(references, tokenizer_ids, model: str, name: str):
    if model not in references:
        ref = load_model(zoo_path(model))
        out = {}
        for prompt, ids in tokenizer_ids.items():
            tokens = ref.greedy(ids, N_NEW)
            with torch.no_grad():
                logp = torch.log_softmax(ref(torch.tensor([ids + tokens])).logits[0].float(), -1)
            out[prompt] = (tokens, [logp[len(ids) - 1 + i, t].item() for i, t in enumerate(tokens)])
        references[model] = out
    return references[model][name]


def generate(url: str, ids: list[int], logprobs: bool = False) -> dict:
    payload = {"input_ids": ids, "return_logprob": logprobs,
               "sampling_params": {"max_new_tokens": N_NEW, "temperature": 0, "ignore_eos": True}}
    r = requests.post(f"{url}/generate", json=payload, timeout=300)
    assert r.status_code == 200, f"/generate answered {r.status_code}: {r.text[:500]}"
    return r.json()


@pytest.mark.parametrize("name", list(PROMPTS))
def test_served_greedy_tokens_equal_the_reference(served, tokenizer_ids, references, name):
    want, _ = reference(references, tokenizer_ids, served.config.model, name)
    got = generate(served.url, tokenizer_ids[name])["output_ids"]
    assert got == want, f"{served.config}: {name}\n{got=}\n{want=}"


def test_served_logprobs_are_within_tolerance_of_the_reference(served, tokenizer_ids, references):
    for name in PROMPTS:
        _, want = reference(references, tokenizer_ids, served.config.model, name)
        got = [lp for lp, _tok, *_ in generate(served.url, tokenizer_ids[name], True)["meta_info"]["output_token_logprobs"]]
        worst = max(abs(a - b) for a, b in zip(got, want))
        assert len(got) == len(want) and worst < 1e-3, f"{served.config}: {name} log-prob off by {worst}"


def test_concurrent_requests_each_equal_the_reference(served, tokenizer_ids, references):
    names = list(PROMPTS) * 2
    with ThreadPoolExecutor(max_workers=len(names)) as pool:
        got = list(pool.map(lambda n: generate(served.url, tokenizer_ids[n])["output_ids"], names))
    for name, out in zip(names, got):
        want, _ = reference(references, tokenizer_ids, served.config.model, name)
        assert out == want, f"{served.config}: concurrent {name}\n{out=}\n{want=}"


def test_a_radix_cache_hit_gives_the_same_output(served, tokenizer_ids, references):
    ids = tokenizer_ids["long"]
    requests.post(f"{served.url}/flush_cache", timeout=30)
    first = generate(served.url, ids)
    second = generate(served.url, ids)
    want, _ = reference(references, tokenizer_ids, served.config.model, "long")
    assert second["meta_info"]["cached_tokens"] >= len(ids) - 1, f"no radix hit: {second['meta_info']}"
    assert first["output_ids"] == second["output_ids"] == want, f"{served.config}: {first['output_ids']=} {second['output_ids']=}"


def test_ladder_all_reduces_are_waited_on_one_sublayer_later_in_every_rank(served):
    """The trace each rank wrote of one served forward: for the ladder model every all-reduce but the
    last is waited on after the next sub-layer's compute; the plain Llama never takes the ladder path."""
    traces = sorted(served.trace_prefix.parent.glob(served.trace_prefix.name + ".rank*.json"))
    if not served.config.ladder:
        assert traces == [], f"the plain Llama wrote ladder traces: {traces}"
        return
    assert len(traces) == served.config.tp_size, f"{traces=}"  # both "nodes" share this machine's disk
    for path in traces:
        trace = json.loads(path.read_text())
        assert trace["tp_size"] == served.config.tp_size, f"{path.name}: {trace['tp_size']=}"
        got = overlapped(TraceLog([tuple(e) for e in trace["events"]]), trace["n_sublayers"])
        assert got == [True] * (trace["n_sublayers"] - 1), f"{path.name}: overlap per sub-layer {got}"
