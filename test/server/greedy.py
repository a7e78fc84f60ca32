"""The greedy reference the server tests compare against: transformers ``generate`` on the same weights.

The reference is ``AutoModelForCausalLM.generate(do_sample=False, max_new_tokens=N,
min_new_tokens=N)`` in float32 (the server's CPU default dtype). ``min_new_tokens``
makes transformers mask the EOS logit for all N steps and never stop; the server
is given the same two conditions (``min_new_tokens: N`` masks the EOS logit,
``ignore_eos: true`` keeps it from stopping), so both sides take the argmax
over the same logits at every step, whatever the model is. The fixtures
``prompt_ids`` and ``hf_greedy`` are in this folder's conftest.py.
"""

from __future__ import annotations

N_NEW = 32
PROMPTS = {
    "fibonacci": "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "class": "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    "imports": "import os\nimport sys\nfrom pathlib import Path\n\n\ndef main(argv):\n",
    "loop": "total = 0\nfor i in range(10):\n    total += i\nprint(",
    "dict": "config = {\n    'name': 'turbo',\n    'layers': 6,\n",
    "one-token": "def",
}
GREEDY = {"max_new_tokens": N_NEW, "min_new_tokens": N_NEW, "temperature": 0, "ignore_eos": True}


def server_greedy(post_generate, url: str, ids: list[int]) -> list[int]:
    return post_generate(url, {"input_ids": ids, "sampling_params": GREEDY})["output_ids"]


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def transformers_greedy(model_path: str, prompt_ids: dict[str, list[int]]) -> dict[str, list[int]]:
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
    return out
