"""turbo-tiny-hybrid served by SGLang on its own hybrid machinery (hybrid request pool, Mamba state pool,
Mamba radix cache) with the portable PyTorch Mamba2 ops, against the plain-PyTorch reference
(turbo/hybrid/model.py): greedy tokens and log-probabilities for prefill and decode, chunked prefill
(``--chunked-prefill-size 32``, prompts up to ~100 tokens), 8 concurrent requests, a radix-cache hit that
restores a saved Mamba state, the same output with ``--disable-radix-cache``, and TP2. Two servers share the
module, each with a small KV pool and the default state pool: "radix" decodes through CPU graphs (the portable
platform's default: the Mamba mixers' conv and scan step are ``turbo::mamba2_decode_step`` inside the compiled
forward), "no-radix" adds ``--disable-cuda-graph`` and decodes eagerly through SGLang's ``MambaMixer2``; both
are checked against the reference.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch
from tokenizers import Tokenizer

from sglang_turbo import cpu_defaults
from sglang_turbo.server_process import ServerStartError, kill_server, launch_turbo_server
from turbo.hybrid.model import load_model
from turbo.zoo.presets import zoo_path

MODEL = "turbo-tiny-hybrid"
N_NEW = 16
FLAGS = ["--max-total-tokens", "8192", "--chunked-prefill-size", "32"]
PROMPTS = {
    "fibonacci": "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "record": "name: Ada Lovelace\nborn: 1815\ncity:",
    "one-token": "def",
    "long": "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n"
            "        self.items.append(item)\n\n    def pop(self):\n        return self.items.pop()\n\n"
            "    def peek(self):\n        return self.items[-1]\n\n    def __len__(self):\n",
}


@pytest.fixture(scope="module")
def model_path():
    return zoo_path(MODEL)


@pytest.fixture(scope="module")
def tokenizer(model_path):
    return Tokenizer.from_file(str(model_path / "tokenizer.json"))


@pytest.fixture(scope="module")
def reference(model_path):
    return load_model(model_path)


def _serve(model_path, flags, tmp_path_factory, name):
    try:
        proc, url = launch_turbo_server(model_path, flags, log_dir=tmp_path_factory.mktemp(name))
    except ServerStartError as e:
        pytest.fail(str(e), pytrace=False)
    return proc, url


class Servers(dict):
    """Server name -> URL; ``logs``: server name -> its log file."""

    logs: dict[str, str]


@pytest.fixture(scope="module")
def servers(model_path, tmp_path_factory):
    """{"radix": url, "no-radix": url}: both up for the whole module."""
    procs, urls = [], Servers()
    urls.logs = {}
    try:
        for name, extra in (("radix", []), ("no-radix", ["--disable-radix-cache", "--disable-cuda-graph"])):
            proc, urls[name] = _serve(model_path, [*FLAGS, *extra], tmp_path_factory, name)
            urls.logs[name] = proc.log_path
            procs.append(proc)
        yield urls
    finally:
        for proc in procs:
            kill_server(proc)


def _generate(url: str, ids: list[int], n_new: int = N_NEW) -> dict:
    r = requests.post(f"{url}/generate", timeout=300, json={
        "input_ids": ids, "return_logprob": True,
        "sampling_params": {"max_new_tokens": n_new, "temperature": 0, "ignore_eos": True}})
    assert r.status_code == 200, r.text[:500]
    return r.json()


def _reference_tokens_and_logprobs(model, ids: list[int], n_new: int = N_NEW):
    out = model.greedy(ids, n_new)
    with torch.no_grad():
        logp = model(torch.tensor([ids + out])).logits[0].log_softmax(-1)
    return out, [logp[len(ids) - 1 + i, t].item() for i, t in enumerate(out)]


def _check(result: dict, want: list[int], want_logprobs: list[float], what: str) -> None:
    got = result["output_ids"]
    assert got == want, f"{what}: served {got} != reference {want}"
    served_lp = [lp for lp, _tok, _ in result["meta_info"]["output_token_logprobs"]]
    worst = max(abs(a - b) for a, b in zip(served_lp, want_logprobs))
    assert worst < 1e-3, f"{what}: log-probabilities differ from the reference by {worst:.2e}"


@pytest.mark.parametrize("cache", ["radix", "no-radix"])
@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_prefill_and_decode_equal_the_reference(servers, tokenizer, reference, cache, prompt):
    """Prompts of 1 to ~100 tokens; those over 32 tokens are prefilled in chunks of 32 (a Mamba state
    carried from chunk to chunk)."""
    ids = tokenizer.encode(PROMPTS[prompt]).ids
    want, want_lp = _reference_tokens_and_logprobs(reference, ids)
    _check(_generate(servers[cache], ids), want, want_lp, f"{cache} {prompt} ({len(ids)} prompt tokens)")


def test_the_long_prompt_is_longer_than_a_prefill_chunk(tokenizer):
    assert len(tokenizer.encode(PROMPTS["long"]).ids) > 2 * 32  # at least 3 chunks


def test_eight_concurrent_requests_each_equal_the_reference(servers, tokenizer, reference):
    prompts = [f"def f{i}(x):\n    return x * {i} +" for i in range(8)]
    ids = [tokenizer.encode(p).ids for p in prompts]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda row: _generate(servers["radix"], row), ids))
    for row, result in zip(ids, results):
        want, want_lp = _reference_tokens_and_logprobs(reference, row)
        _check(result, want, want_lp, f"concurrent {tokenizer.decode(row)!r}")


def test_a_radix_cache_hit_restores_the_saved_mamba_state(servers, tokenizer, reference):
    """A second request that extends the first's whole sequence matches it in the radix tree: its prefix
    is not recomputed (cached tokens reported) and the Mamba state saved with it continues exactly."""
    first = tokenizer.encode("import json\n\n\ndef load(path):\n    with open(path) as f:\n").ids
    out1 = _generate(servers["radix"], first)
    second = first + out1["output_ids"] + tokenizer.encode("\n\ndef save(path, data):\n").ids
    out2 = _generate(servers["radix"], second)
    cached = out2["meta_info"]["cached_tokens"]
    assert cached >= len(first), f"expected a radix hit of >= {len(first)} tokens, got {cached}"
    want, want_lp = _reference_tokens_and_logprobs(reference, second)
    _check(out2, want, want_lp, "after a radix-cache hit")


def test_radix_cache_on_and_off_give_the_same_greedy_output(servers, tokenizer):
    for text in PROMPTS.values():
        ids = tokenizer.encode(text).ids
        on, off = (_generate(servers[c], ids)["output_ids"] for c in ("radix", "no-radix"))
        assert on == off, f"{text[:30]!r}: radix {on} != no radix {off}"


def test_decode_runs_compiled_with_radix_cache_and_eagerly_without(servers):
    # SGLang logs a decode batch every 40 steps, saying whether it ran as a graph.
    for name in servers:
        _generate(servers[name], [5, 6, 7], n_new=100)
    logs = {name: open(log, errors="replace").read() for name, log in servers.logs.items()}
    # 3 graphs, as for a Llama (graph_runner.WARMUP_BATCH_SIZES): more would mean the mixer broke the graph.
    assert "(3 graphs, weights frozen) in" in logs["radix"], logs["radix"][-3000:]
    assert "cpu graph: True" in logs["radix"], logs["radix"][-3000:]
    assert "cpu graph: True" not in logs["no-radix"] and "cpu graph: False" in logs["no-radix"], \
        logs["no-radix"][-3000:]


def test_the_state_pool_gets_the_portable_default_size(servers, model_path):
    info = requests.get(f"{servers['radix']}/server_info", timeout=30).json()
    want = cpu_defaults.default_mamba_cache_size(str(model_path))
    assert want is not None and info["max_mamba_cache_size"] == want, (info.get("max_mamba_cache_size"), want)


def test_a_layer_list_that_does_not_fit_the_model_fails_the_launch_naming_it(model_path, tmp_path):
    bad = tmp_path / "bad-hybrid"
    shutil.copytree(model_path, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["attention_layers"] = [2, 9]  # a 6-layer model
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ServerStartError, match=r"attention_layers must be distinct ascending layer indices"):
        launch_turbo_server(bad, FLAGS, timeout_s=120, log_dir=tmp_path / "logs")


def test_tensor_parallel_2_equals_the_reference(model_path, tokenizer, reference, tmp_path_factory):
    """Upstream's MambaMixer2 sharding (2 of the 4 heads and groups a rank) with the portable ops, and the
    attention layers' TP, on the two cores: greedy tokens and log-probabilities as at TP1."""
    proc, url = _serve(model_path, [*FLAGS, "--tp-size", "2"], tmp_path_factory, "tp2")
    try:
        for name in ("fibonacci", "long"):
            ids = tokenizer.encode(PROMPTS[name]).ids
            want, want_lp = _reference_tokens_and_logprobs(reference, ids)
            _check(_generate(url, ids), want, want_lp, f"TP2 {name}")
    finally:
        kill_server(proc)
