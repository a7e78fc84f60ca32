"""Fixtures of the server tests that compare greedy output with transformers (see greedy.py)."""

from __future__ import annotations

import pytest
from greedy import PROMPTS, transformers_greedy


@pytest.fixture(scope="session")
def prompt_ids(tokenizer) -> dict[str, list[int]]:
    ids = {name: tokenizer(text).input_ids for name, text in PROMPTS.items()}
    empty = [name for name, i in ids.items() if not i]
    assert not empty, f"prompts that tokenize to nothing: {empty}"
    return ids


@pytest.fixture(scope="session")
def hf_greedy(model_path, prompt_ids) -> dict[str, list[int]]:
    return transformers_greedy(model_path, prompt_ids)
