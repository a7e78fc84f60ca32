"""The HTTP API of the shared server: native /generate, the OpenAI-compatible
endpoints (plain and streaming), /model_info, the radix cache and concurrency.

Every generation is greedy with ``ignore_eos`` so lengths and repeatability do
not depend on what the (possibly random) model says.
"""

from __future__ import annotations

import json
import os
import random
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests

from sglang_turbo.graph_runner import COMPILED_ARCHITECTURES

MAX_NEW = 8
GREEDY = {"max_new_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="none", timeout=120, max_retries=0)


def random_ids(seed: int, n: int, vocab: int = 4096) -> list[int]:
    """Prompt ids no other test sends (ids >= 3 skip pad/bos/eos)."""
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(n)]


# --- /generate -------------------------------------------------------------------------------


def test_generate_with_text_returns_max_new_tokens_tokens(server, post_generate):
    out = post_generate(server, {"text": "def add(a, b):", "sampling_params": GREEDY})
    n = len(out["output_ids"])
    assert n == MAX_NEW, f"{n=} {MAX_NEW=} {out=}"


def test_generate_with_text_reports_completion_tokens_equal_to_the_output_ids(server, post_generate):
    out = post_generate(server, {"text": "def add(a, b):", "sampling_params": GREEDY})
    completion = out["meta_info"]["completion_tokens"]
    assert completion == len(out["output_ids"]), f"{completion=} {out['output_ids']=}"


def test_generate_with_text_returns_the_detokenized_output_ids(server, post_generate, tokenizer):
    out = post_generate(server, {"text": "class Stack:", "sampling_params": GREEDY})
    decoded = tokenizer.decode(out["output_ids"], skip_special_tokens=True)
    assert out["text"] == decoded, f"{out['text']=} {decoded=} {out['output_ids']=}"


def test_generate_with_input_ids_reports_their_count_as_prompt_tokens(server, post_generate):
    ids = [1, 533, 291, 13, 93, 330]
    out = post_generate(server, {"input_ids": ids, "sampling_params": GREEDY})
    prompt_tokens = out["meta_info"]["prompt_tokens"]
    assert prompt_tokens == len(ids), f"{prompt_tokens=} {len(ids)=}"


def test_generate_with_input_ids_returns_max_new_tokens_tokens_in_the_vocabulary(server, post_generate):
    out = post_generate(server, {"input_ids": [1, 533, 291, 13, 93, 330], "sampling_params": GREEDY})
    ids = out["output_ids"]
    assert len(ids) == MAX_NEW and all(0 <= t < 4096 for t in ids), f"{ids=} {MAX_NEW=}"


def test_generate_with_text_equals_generate_with_the_texts_token_ids(server, post_generate, tokenizer):
    text = "for i in range(10):\n    print(i)"
    ids = tokenizer(text).input_ids
    by_text = post_generate(server, {"text": text, "sampling_params": GREEDY})["output_ids"]
    by_ids = post_generate(server, {"input_ids": ids, "sampling_params": GREEDY})["output_ids"]
    assert by_text == by_ids, f"{by_text=} {by_ids=} {ids=}"


def test_generate_with_a_batch_of_texts_returns_one_result_per_text(server, post_generate):
    out = post_generate(server, {"text": ["import os", "x = 1", "return"], "sampling_params": GREEDY})
    assert isinstance(out, list), f"{out=}"
    lengths = [len(o["output_ids"]) for o in out]
    assert lengths == [MAX_NEW] * 3, f"{lengths=}"


def test_generate_streaming_concatenates_to_the_non_streaming_text(server, post_generate):
    payload = {"text": "while True:", "sampling_params": GREEDY}
    whole = post_generate(server, payload)["text"]
    r = requests.post(f"{server}/generate", json={**payload, "stream": True}, stream=True, timeout=120)
    assert r.status_code == 200, f"{r.status_code=} {r.text[:500]=}"
    last = None
    for line in r.iter_lines(decode_unicode=True):
        if line and line.startswith("data:") and line != "data: [DONE]":
            last = json.loads(line[len("data:"):])
    # Native streaming sends the cumulative text in each chunk (not incremental).
    streamed = last["text"] if last else None
    assert streamed == whole, f"{streamed=} {whole=}"


# --- OpenAI-compatible endpoints -------------------------------------------------------------


def test_completions_returns_max_tokens_completion_tokens(client):
    resp = client.completions.create(
        model="default", prompt="def mul(a, b):", max_tokens=MAX_NEW, temperature=0, extra_body={"ignore_eos": True}
    )
    assert resp.usage.completion_tokens == MAX_NEW, f"{resp.usage=} {MAX_NEW=}"


def test_completions_streaming_concatenates_to_the_non_streaming_text(client):
    kwargs = dict(model="default", prompt="def mul(a, b):", max_tokens=MAX_NEW, temperature=0,
                  extra_body={"ignore_eos": True})
    whole = client.completions.create(**kwargs).choices[0].text
    streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(stream=True, **kwargs)
                       if chunk.choices)
    assert streamed == whole, f"{streamed=} {whole=}"


def test_chat_completions_answers_as_the_assistant(client):
    resp = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Write a loop."}],
        max_tokens=MAX_NEW, temperature=0, extra_body={"ignore_eos": True},
    )
    message = resp.choices[0].message
    assert message.role == "assistant" and isinstance(message.content, str), f"{message=}"


def test_chat_completions_returns_max_tokens_completion_tokens(client):
    resp = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Write a loop."}],
        max_tokens=MAX_NEW, temperature=0, extra_body={"ignore_eos": True},
    )
    assert resp.usage.completion_tokens == MAX_NEW, f"{resp.usage=} {MAX_NEW=}"


def test_chat_completions_prompt_is_the_models_chat_template(client, tokenizer):
    messages = [{"role": "user", "content": "Write a loop."}]
    resp = client.chat.completions.create(
        model="default", messages=messages, max_tokens=1, temperature=0, extra_body={"ignore_eos": True}
    )
    expected = len(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
    assert resp.usage.prompt_tokens == expected, f"{resp.usage.prompt_tokens=} {expected=}"


def test_chat_completions_streaming_concatenates_to_the_non_streaming_content(client):
    kwargs = dict(model="default", messages=[{"role": "user", "content": "Sort a list."}],
                  max_tokens=MAX_NEW, temperature=0, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(stream=True, **kwargs)
                       if chunk.choices)
    assert streamed == whole, f"{streamed=} {whole=}"


def test_models_endpoint_lists_the_served_model(client, model_path):
    ids = [m.id for m in client.models.list().data]
    assert model_path in ids, f"{ids=} {model_path=}"


# --- /model_info -----------------------------------------------------------------------------


def test_model_info_reports_a_local_directory(server):
    info = requests.get(f"{server}/model_info", timeout=30).json()
    assert os.path.isdir(info["model_path"]), f"{info['model_path']=}"


def test_model_info_directory_loads_with_transformers_autoconfig(server):
    from transformers import AutoConfig

    info = requests.get(f"{server}/model_info", timeout=30).json()
    config = AutoConfig.from_pretrained(info["model_path"])
    # Under CPU graphs (the default here) the checkpoint is served by its traceable class, and
    # /model_info names the class that serves (upstream reports the overridden architectures).
    served = [COMPILED_ARCHITECTURES[a] for a in config.architectures]
    assert info["architectures"] == served, f"{config.architectures=} {info['architectures']=}"


# --- radix cache -----------------------------------------------------------------------------


def test_repeating_a_long_prompt_reuses_its_prefix_from_the_radix_cache(server, post_generate):
    payload = {"input_ids": random_ids(seed=20240601, n=200), "sampling_params": {"max_new_tokens": 1, "temperature": 0}}
    first = post_generate(server, payload)["meta_info"]["cached_tokens"]
    second = post_generate(server, payload)["meta_info"]["cached_tokens"]
    assert first == 0 and second > 0, f"{first=} {second=}"


# --- concurrency -----------------------------------------------------------------------------


def test_concurrent_requests_each_equal_their_sequential_greedy_output(server, post_generate):
    prompts = [random_ids(seed=1000 + i, n=16 + 8 * i) for i in range(4)] * 2  # 8 requests, each prompt twice
    payloads = [{"input_ids": p, "sampling_params": GREEDY} for p in prompts]
    sequential = [post_generate(server, p)["output_ids"] for p in payloads[:4]] * 2
    with ThreadPoolExecutor(max_workers=8) as pool:
        concurrent = list(pool.map(lambda p: post_generate(server, p)["output_ids"], payloads))
    mismatches = [(i, s, c) for i, (s, c) in enumerate(zip(sequential, concurrent)) if s != c]
    assert not mismatches, f"(index, sequential, concurrent): {mismatches}"
