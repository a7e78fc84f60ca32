"""The training corpus of the turbo-tiny family, built offline on any machine.

Two domains, so that later features (the adaptive speculator, retrieval) have a
distribution to shift between:

1. ``code``: the Python standard library's own source (the running interpreter's
   ``Lib/``, tests excluded), split into train / held-out by a hash of the path.
2. ``records``: seeded, generated structured text: JSON records, CSV tables,
   key = value configs, arithmetic drills, and chat turns that ask for them.

Everything is deterministic given the seed and the interpreter's version, which
the recipe records next to the weights.
"""

from __future__ import annotations

import hashlib
import json
import random
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# Chat roles of the embedded template; one special token each.
CHAT_ROLES = ("system", "user", "assistant")
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = [PAD, BOS, EOS] + [f"<|{role}|>" for role in CHAT_ROLES]

_EXCLUDED_DIRS = {"site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__"}


@dataclass(frozen=True)
class Document:
    domain: str  # "code" or "records"
    text: str


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _is_held_out(key: str, held_out_fraction: float) -> bool:
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:4], "little") / 2**32 < held_out_fraction


def code_documents(split: str, held_out_fraction: float = 0.03) -> Iterator[Document]:
    """Standard-library source files, sorted by path; ``split`` is "train" or "heldout".

    Files are assigned by a hash of their path. Held-out keeps only files that
    measure generalisation: one whose text also occurs in training (identical
    ``__init__.py`` stubs) is dropped, and so are the generated codec tables
    (``encodings/cp737.py``...), which differ from the training ones only in
    their numbers and made held-out perplexity look far better than the model is.
    """
    root = stdlib_dir()
    train_texts: set[str] = set()
    held_out: list[str] = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _EXCLUDED_DIRS.intersection(rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip():
            continue
        if _is_held_out(str(rel), held_out_fraction):
            held_out.append(text)
        elif split == "train":
            yield Document("code", text)
        else:
            train_texts.add(text)
    if split == "heldout":
        yield from (Document("code", t) for t in held_out if t not in train_texts and not _is_codec_table(t))


def _is_codec_table(text: str) -> bool:
    return "Character Mapping Codec" in text[:200] and "gencodec.py" in text[:300]


# --------------------------------------------------------------------------- records domain

_NAMES = ["apple", "banana", "cherry", "delta", "echo", "falcon", "garnet", "harbor", "indigo", "juniper",
          "kiwi", "lemon", "mango", "nectar", "olive", "pepper", "quartz", "raven", "saffron", "tulip",
          "umber", "violet", "walnut", "xenon", "yarrow", "zinnia"]
_CITIES = ["Paris", "Lima", "Oslo", "Cairo", "Tokyo", "Quito", "Dakar", "Hanoi", "Perth", "Riga"]
_FIELDS = ["host", "port", "timeout", "retries", "user", "mode", "level", "path", "workers", "cache"]


def _record(rng: random.Random) -> dict:
    return {
        "id": rng.randint(1, 9999),
        "name": rng.choice(_NAMES),
        "city": rng.choice(_CITIES),
        "price": rng.randint(1, 500),
        "quantity": rng.randint(0, 99),
        "active": rng.random() < 0.5,
    }


def _json_lines(rng: random.Random) -> str:
    return "\n".join(json.dumps(_record(rng)) for _ in range(rng.randint(3, 12))) + "\n"


def _csv_table(rng: random.Random) -> str:
    rows = [_record(rng) for _ in range(rng.randint(3, 15))]
    header = list(rows[0])
    lines = [",".join(header)] + [",".join(str(r[h]) for h in header) for r in rows]
    return "\n".join(lines) + "\n"


def _config(rng: random.Random) -> str:
    section = rng.choice(_NAMES)
    lines = [f"[{section}]"]
    for field in rng.sample(_FIELDS, rng.randint(3, len(_FIELDS))):
        value = rng.choice([str(rng.randint(1, 65535)), rng.choice(_NAMES), rng.choice(["true", "false"])])
        lines.append(f"{field} = {value}")
    return "\n".join(lines) + "\n"


def _arithmetic(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(4, 12)):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        op = rng.choice("+-*")
        lines.append(f"{a} {op} {b} = {eval(f'{a} {op} {b}')}")  # noqa: S307 (two ints, one operator)
    return "\n".join(lines) + "\n"


def _chat(rng: random.Random) -> str:
    """One chat exchange in the embedded template's format (see tokenizer.CHAT_TEMPLATE)."""
    kind = rng.randrange(3)
    if kind == 0:
        rec = _record(rng)
        question = f"Write item {rec['name']} from {rec['city']} with price {rec['price']} as JSON."
        answer = json.dumps({"name": rec["name"], "city": rec["city"], "price": rec["price"]})
    elif kind == 1:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        question, answer = f"What is {a} + {b}?", f"{a} + {b} = {a + b}"
    else:
        n, k = rng.randint(2, 12), rng.randint(3, 8)
        question = f"List the first {k} multiples of {n}."
        answer = ", ".join(str(n * i) for i in range(1, k + 1))
    return f"<|user|>\n{question}{EOS}<|assistant|>\n{answer}{EOS}"


_GENERATORS = (_json_lines, _csv_table, _config, _arithmetic, _chat)


def record_documents(seed: int, count: int) -> Iterator[Document]:
    rng = random.Random(seed)
    for _ in range(count):
        yield Document("records", rng.choice(_GENERATORS)(rng))
