"""The passkey task (turbo/hybrid/passkey.py): seeded cases of exactly the asked length, the key assigned at
the top and asked for at the end, scored on the whole key."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer

from turbo.hybrid.passkey import passkey_cases
from turbo.zoo.presets import zoo_path


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_file(str(zoo_path("turbo-tiny") / "tokenizer.json"))


@pytest.mark.parametrize("length", [512, 4096, 16384])
def test_a_case_is_exactly_the_length_with_the_key_at_the_top_and_the_question_at_the_end(tok, length):
    for case in passkey_cases(tok, length, n=3):
        assert len(case.prompt_ids) == length
        text = tok.decode(case.prompt_ids)
        assert text.startswith(f"PASSKEY = {case.key}\n") and text.endswith("\n\nPASSKEY =")
        assert text.count(str(case.key)) == 1, "the key must appear only in the needle"
        assert tok.decode(case.answer_ids).strip() == str(case.key)


def test_cases_are_seeded_and_differ_between_seeds(tok):
    assert passkey_cases(tok, 1024, 4) == passkey_cases(tok, 1024, 4)
    assert [c.key for c in passkey_cases(tok, 1024, 4, seed=1)] != [c.key for c in passkey_cases(tok, 1024, 4)]


def test_only_the_whole_key_counts(tok):
    case = passkey_cases(tok, 512, 1)[0]
    assert case.retrieved(case.answer_ids + [7, 8])
    assert not case.retrieved(case.answer_ids[:-1])
    assert not case.retrieved([])


def test_a_length_the_filler_cannot_fill_is_refused(tok):
    with pytest.raises(ValueError, match="passkey length must be in"):
        passkey_cases(tok, 10_000_000, 1)
