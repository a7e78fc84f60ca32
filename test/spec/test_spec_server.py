"""Speculative decoding served on the portable platform gives exactly the target's output.

One server per speculative configuration (upstream's flags, unchanged), started one at a
time; the session's plain server (no speculation, same target) is the reference:

- greedy: token-identical to the plain server, one request at a time, 8 at once, and
  through a radix-cache hit;
- sampling (temperature 1, top-k 3): the 3-token continuations follow the target's own
  distribution, computed exactly with transformers (chi-square test);
- every configuration's target verify runs the compiled forward (CPU graphs; an EAGLE3 target's
  also returns its aux-layer hidden states), and so do the draft's steps and extend (STANDALONE's
  Llama, the EAGLE3 head; test_compiled_draft.py checks they draft as eagerly), all compiled at
  start-up, none while serving;
- ``meta_info`` carries ``spec_verify_ct`` and ``spec_accept_length`` as upstream defines
  them (accept length = completion tokens / verify rounds).
"""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

pytestmark = pytest.mark.slow

N_NEW = 40
PROMPTS = {
    "fibonacci": "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "class": "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    "imports": "import os\nimport sys\nfrom pathlib import Path\n\n\ndef main(argv):\n",
    "records": "id,name,city\n1,Alice,Paris\n2,Bob,Berlin\n3,",
    "repeats": "x = 1\ny = 2\nx = 1\ny = 2\nx = 1\ny = 2\nx = 1\n",
    "one-token": "def",
}

# name -> upstream flags; drafts are embedded model names the launcher resolves.
SPEC_CONFIGS = {
    "standalone-chain": ["--speculative-algorithm", "STANDALONE", "--speculative-draft-model-path", "turbo-tiny-draft",
                         "--speculative-num-steps", "3", "--speculative-eagle-topk", "1",
                         "--speculative-num-draft-tokens", "4"],
    "standalone-tree": ["--speculative-algorithm", "STANDALONE", "--speculative-draft-model-path", "turbo-tiny-draft",
                        "--speculative-num-steps", "3", "--speculative-eagle-topk", "2",
                        "--speculative-num-draft-tokens", "5"],
    "eagle3-chain": ["--speculative-algorithm", "EAGLE3", "--speculative-draft-model-path", "turbo-tiny-eagle3",
                     "--speculative-num-steps", "4", "--speculative-eagle-topk", "1",
                     "--speculative-num-draft-tokens", "5"],
    "eagle3-tree": ["--speculative-algorithm", "EAGLE3", "--speculative-draft-model-path", "turbo-tiny-eagle3",
                    "--speculative-num-steps", "3", "--speculative-eagle-topk", "3",
                    "--speculative-num-draft-tokens", "6"],
    "ngram": ["--speculative-algorithm", "NGRAM"],
    # TURBO never speculating: every round is python/sglang_turbo/speculative/worker.py's plain round (the
    # target's decode step in place of upstream's one-token verify), the learner fed by it
    "turbo-plain": ["--speculative-algorithm", "TURBO", "--speculative-draft-model-path", "turbo-tiny-eagle3",
                    "--speculative-num-steps", "4", "--turbo-controller", "plain"],
}


@pytest.fixture(scope="module", params=list(SPEC_CONFIGS), ids=list(SPEC_CONFIGS))
def spec_handle(request, turbo_server_factory):
    with turbo_server_factory(SPEC_CONFIGS[request.param]) as handle:
        yield request.param, handle


@pytest.fixture(scope="module")
def spec_server(spec_handle) -> str:
    return spec_handle[1].base_url


@pytest.fixture(scope="module")
def prompt_ids(tokenizer) -> dict[str, list[int]]:
    return {name: tokenizer(text).input_ids for name, text in PROMPTS.items()}


def greedy_payload(ids: list[int], n_new: int = N_NEW) -> dict:
    # min_new_tokens + ignore_eos: both servers take the argmax at every one of the n_new steps.
    return {
        "input_ids": ids,
        "sampling_params": {"max_new_tokens": n_new, "min_new_tokens": n_new, "temperature": 0, "ignore_eos": True},
    }


@pytest.fixture(scope="module")
def plain_greedy(server, post_generate, prompt_ids) -> dict[str, list[int]]:
    """The target without speculation (the session's plain server)."""
    return {name: post_generate(server, greedy_payload(ids))["output_ids"] for name, ids in prompt_ids.items()}


def test_greedy_output_is_identical_to_the_target_alone(spec_server, post_generate, prompt_ids, plain_greedy):
    for name, ids in prompt_ids.items():
        got = post_generate(spec_server, greedy_payload(ids))["output_ids"]
        assert got == plain_greedy[name], f"prompt {name!r}: speculative {got} != plain {plain_greedy[name]}"


def test_greedy_output_is_identical_with_8_concurrent_requests(spec_server, post_generate, prompt_ids, plain_greedy):
    names = list(itertools.islice(itertools.cycle(prompt_ids), 8))
    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda n: post_generate(spec_server, greedy_payload(prompt_ids[n]))["output_ids"], names))
    wrong = [n for n, out in zip(names, outs) if out != plain_greedy[n]]
    assert not wrong, f"prompts whose concurrent speculative output differs from the plain server's: {wrong}"


def test_greedy_output_is_identical_through_a_radix_cache_hit(spec_server, server, post_generate, prompt_ids):
    """A prompt extending an already-served one reuses its cached prefix, and still decodes identically."""
    base = prompt_ids["class"]
    post_generate(spec_server, greedy_payload(base, 8))  # caches the prefix
    longer = base + prompt_ids["fibonacci"][1:]
    out = post_generate(spec_server, greedy_payload(longer))
    assert out["meta_info"]["cached_tokens"] >= len(base) - 1, f"no radix hit: {out['meta_info']}"
    assert out["output_ids"] == post_generate(server, greedy_payload(longer))["output_ids"]


def test_verify_runs_compiled_on_the_platforms_default_cpu_graphs(spec_handle):
    """So every greedy and sampling test here checks the compiled verify forward, and the compiled
    draft steps of every algorithm with a draft model (all but NGRAM)."""
    name, handle = spec_handle
    with open(handle.log_path, errors="replace") as f:
        log = f.read()
    compiled = "target verify runs the compiled forward" in log
    assert compiled, f"{name}: verify ran eagerly; log tail {log[-2000:]}"
    draft_compiled = "draft's decode steps and extend run the compiled forward" in log
    assert draft_compiled == (name != "ngram"), f"{name}: compiled draft {draft_compiled}"
    # every graph the greedy tests above ran was compiled at start-up: a compile while serving stalls
    # every request for seconds (TURBO's plain round once fed int32 ids to the int64 decode graphs)
    assert "compiling for an unforeseen" not in log, f"{name}: a graph compiled while serving"


def test_meta_info_reports_verify_rounds_and_accept_length(spec_handle, spec_server, post_generate, prompt_ids,
                                                           wait_for):
    meta = post_generate(spec_server, greedy_payload(prompt_ids["repeats"]))["meta_info"]
    rounds, accept = meta["spec_verify_ct"], meta["spec_accept_length"]
    assert 0 < rounds <= meta["completion_tokens"], meta
    assert accept == pytest.approx(meta["completion_tokens"] / rounds), meta
    if spec_handle[0] == "turbo-plain":
        # one round per token after the prefill's, each a plain decode step; what they verified reaches the learner
        assert rounds == meta["completion_tokens"] - 1, meta
        def status() -> dict:
            return requests.get(f"{spec_server}/turbo/speculator", timeout=30).json()

        assert status()["mode"] == "fallback" and status()["plain_rounds"] >= rounds, status()
        # the learner drains its inbox in the background
        wait_for(lambda: status()["replay_buffer_tokens"] >= rounds, 30, "plain rounds to feed the learner", 0.2)
    else:
        assert accept > 1.0, f"a repetitive prompt accepted no draft token at all: {meta}"


# ---------------------------------------------------------------- sampling preserves the distribution
SAMPLE_PROMPT = "def main():\n    "
SAMPLE_TOKENS, SAMPLE_TOP_K, N_SAMPLES = 3, 3, 600


@pytest.fixture(scope="module")
def target_continuation_probs(model_path, tokenizer) -> dict[tuple[int, ...], float]:
    """Exact probability of every 3-token continuation under temperature 1, top-k 3 (transformers, float32)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    prompt = tokenizer(SAMPLE_PROMPT).input_ids
    probs: dict[tuple[int, ...], float] = {(): 1.0}
    with torch.no_grad():
        for _ in range(SAMPLE_TOKENS):
            grown = {}
            for seq, p in probs.items():
                logits = model(torch.tensor([prompt + list(seq)])).logits[0, -1]
                top = torch.topk(logits, SAMPLE_TOP_K)
                for tok, q in zip(top.indices.tolist(), torch.softmax(top.values, -1).tolist()):
                    grown[seq + (tok,)] = p * q
            probs = grown
    return probs


def test_sampling_follows_the_targets_distribution(spec_server, post_generate, tokenizer, target_continuation_probs):
    from scipy.stats import chisquare

    payload = {
        "input_ids": [tokenizer(SAMPLE_PROMPT).input_ids] * N_SAMPLES,
        "sampling_params": {"max_new_tokens": SAMPLE_TOKENS, "min_new_tokens": SAMPLE_TOKENS, "ignore_eos": True,
                            "temperature": 1.0, "top_k": SAMPLE_TOP_K},
    }
    samples = [tuple(out["output_ids"]) for out in post_generate(spec_server, payload, timeout=600)]
    outside = [s for s in samples if s not in target_continuation_probs]
    assert not outside, f"continuations the target gives probability 0 (outside top-{SAMPLE_TOP_K}): {outside[:5]}"
    # Pool continuations expected fewer than 5 times into one cell, as chi-square needs.
    cells = sorted(target_continuation_probs, key=target_continuation_probs.get, reverse=True)
    big = [c for c in cells if target_continuation_probs[c] * N_SAMPLES >= 5]
    small = [c for c in cells if c not in big]
    observed = [samples.count(c) for c in big] + [sum(samples.count(c) for c in small)]
    expected = [target_continuation_probs[c] * N_SAMPLES for c in big] + [
        sum(target_continuation_probs[c] for c in small) * N_SAMPLES
    ]
    if expected[-1] == 0:
        observed, expected = observed[:-1], expected[:-1]
    expected = [e * N_SAMPLES / sum(expected) for e in expected]  # float rounding: sums must agree exactly
    p_value = chisquare(observed, expected).pvalue
    assert p_value > 1e-3, f"samples do not follow the target (p={p_value:.2e}): {observed=} {expected=}"
