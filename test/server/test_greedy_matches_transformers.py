"""Greedy decoding on the server is token-identical to Hugging Face transformers on the same weights
(the reference and its conditions: greedy.py)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from greedy import GREEDY, PROMPTS, first_difference, server_greedy


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
    payload = {"input_ids": [prompt_ids[n] for n in names], "sampling_params": GREEDY}
    got = {n: o["output_ids"] for n, o in zip(names, post_generate(server, payload))}
    mismatches = {n: (first_difference(got[n], hf_greedy[n]), got[n], hf_greedy[n]) for n in names if got[n] != hf_greedy[n]}
    assert not mismatches, f"name: (first difference, server, transformers): {mismatches}"
