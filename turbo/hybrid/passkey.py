"""A passkey-retrieval task in the embedded family's own domain (Python source), at any context length.

One case: a file that opens by assigning a five-digit value, ``PASSKEY = 48213``, runs on through held-out
standard-library code (documents the zoo models never trained on), and ends by starting the same
assignment again, ``PASSKEY =``. The model retrieves the value if its greedy continuation is exactly the
value's tokens: for the line to be completed right, the model has to look back across the whole file.
Cases are seeded: the same (length, seed) gives the same prompt on every machine.

    cases = passkey_cases(tokenizer, length=4096, n=10)
    accuracy = sum(case.retrieved(generate(case.prompt_ids, len(case.answer_ids))) for case in cases) / len(cases)
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

NEEDLE = "PASSKEY = {key}\n\n"
QUESTION = "\n\nPASSKEY ="  # no trailing space: the BPE merges it into the key's first token


@dataclass(frozen=True)
class PasskeyCase:
    key: int
    prompt_ids: list[int]  # exactly the requested length
    answer_ids: list[int]  # the key's tokens, as they follow the question

    def retrieved(self, generated_ids: list[int]) -> bool:
        """True when the continuation begins with the whole key."""
        return list(generated_ids[: len(self.answer_ids)]) == self.answer_ids


@functools.cache
def _filler_ids(tokenizer) -> tuple[int, ...]:
    from turbo.zoo.corpus import code_documents

    text = "\n\n".join(doc.text for doc in code_documents("heldout"))
    return tuple(tokenizer.encode(text).ids)


def passkey_cases(tokenizer, length: int, n: int, seed: int = 0) -> list[PasskeyCase]:
    """``n`` cases of ``length`` prompt tokens (a ``tokenizers.Tokenizer``); raises ValueError for a length the
    held-out filler (~25k tokens) cannot fill."""
    filler = _filler_ids(tokenizer)
    question = tokenizer.encode(QUESTION).ids
    rng = random.Random(f"passkey/{length}/{seed}")
    cases = []
    for _ in range(n):
        key = rng.randint(10_000, 99_999)
        needle = tokenizer.encode(NEEDLE.format(key=key)).ids
        body_len = length - len(needle) - len(question)
        if body_len < 0 or body_len > len(filler):
            raise ValueError(f"passkey length must be in [{len(needle) + len(question)}, "
                             f"{len(filler) + len(needle) + len(question)}] tokens, got {length}")
        start = rng.randint(0, len(filler) - body_len)
        with_answer = tokenizer.encode(f"{QUESTION} {key}").ids
        assert with_answer[: len(question)] == question, "the question's tokens must not merge with the key's"
        answer = with_answer[len(question):]
        cases.append(PasskeyCase(key, needle + list(filler[start : start + body_len]) + question, answer))
    return cases
