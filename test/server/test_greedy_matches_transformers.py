"""Greedy decoding on the server is token-identical to Hugging Face transformers on the same weights.

The reference is ``AutoModelForCausalLM.generate(do_sample=False, max_new_tokens=N,
min_new_tokens=N)`` in float32 (the server's CPU default dtype). ``min_new_tokens``
makes transformers mask the EOS logit for all N steps and never stop; the server
is given the same two conditions (``min_new_tokens: N`` masks the EOS logit,
``ignore_eos: true`` keeps it from stopping), so both sides take the argmax
over the same logits at every step, whatever the model is.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

N_NEW = 32
PROMPTS = {
    "fibonacci": "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "class": "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    "imports": "import os\nimport sys\nfrom pathlib import Path\n\n\ndef main(argv):\n",
    "loop": "total = 0\nfor i in range(10):\n    total += i\nprint(",
    "dict": "config = {\n    'name': 'turbo',\n    'layers': 6,\n",
    "one-token": "def",
}


@pytest.fixture(scope="module")
def prompt_ids(tokenizer) -> dict[str, list[int]]:
    ids = {name: tokenizer(text).input_ids for name, text in PROMPTS.items()}
    empty = [name for name, i in ids.items() if not i]
    assert not empty, f"prompts that tokenize to nothing: {empty}"
    return ids


@pytest.fixture(scope="module")
def hf_greedy(model_path, prompt_ids) -> dict[str, list[int]]:
    """Reference continuations from transformers, one prompt at a time (no padding effects)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    out = {}
    with torch.no_grad():
        for name, ids in prompt_ids.items():
            seq = model.generate(
                torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                do_sample=False, max_new_tokens=N_NEW, min_new_tokens=N_NEW,
            )
            out[name] = seq[0, len(ids):].tolist()
    del model
    return out


def server_greedy(post_generate, url: str, ids: list[int]) -> list[int]:
    payload = {
        "input_ids": ids,
        "sampling_params": {"max_new_tokens": N_NEW, "min_new_tokens": N_NEW, "temperature": 0, "ignore_eos": True},
    }
    return post_generate(url, payload)["output_ids"]


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


@pytest.mark.parametrize("name", list(PROMPTS))
def test_server_greedy_output_equals_transformers_greedy_output(server, post_generate, prompt_ids, hf_greedy, name):
    got = server_greedy(post_generate, server, prompt_ids[name])
    want = hf_greedy[name]
    assert got == want, f"{name}: first difference at {first_difference(got, want)}\n{got=}\n{want=}"


def test_concurrent_server_greedy_outputs_equal_transformers_greedy_outputs(server, post_generate, prompt_ids, hf_greedy):
    names = list(PROMPTS)
    with ThreadPoolExecutor(max_workers=len(names)) as pool:
        got = dict(zip(names, pool.map(lambda n: server_greedy(post_generate, server, prompt_ids[n]), names)))
    mismatches = {n: (first_difference(got[n], hf_greedy[n]), got[n], hf_greedy[n]) for n in names if got[n] != hf_greedy[n]}
    assert not mismatches, f"name: (first difference, server, transformers): {mismatches}"


def test_native_batch_greedy_outputs_equal_transformers_greedy_outputs(server, post_generate, prompt_ids, hf_greedy):
    """One /generate call carrying every prompt: the scheduler batches them together."""
    names = list(PROMPTS)
    payload = {
        "input_ids": [prompt_ids[n] for n in names],
        "sampling_params": {"max_new_tokens": N_NEW, "min_new_tokens": N_NEW, "temperature": 0, "ignore_eos": True},
    }
    got = {n: o["output_ids"] for n, o in zip(names, post_generate(server, payload))}
    mismatches = {n: (first_difference(got[n], hf_greedy[n]), got[n], hf_greedy[n]) for n in names if got[n] != hf_greedy[n]}
    assert not mismatches, f"name: (first difference, server, transformers): {mismatches}"
