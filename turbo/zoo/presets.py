"""Named recipes of the embedded model family and where their weights live.

A preset fixes everything that decides the weights: architecture, corpus mix,
optimiser schedule and seed. ``python -m turbo.zoo.train --preset NAME`` turns a
preset into the directory that ``zoo_path(NAME)`` returns.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_MODEL = "turbo-tiny"


@dataclass(frozen=True)
class TinyLlamaConfig:
    """A Llama-architecture causal LM and the recipe that trains it."""

    name: str
    # architecture (transformers LlamaConfig fields)
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 4096
    rope_theta: float = 10_000.0
    tie_word_embeddings: bool = True
    # corpus
    records_fraction: float = 0.2  # share of training tokens from the generated records domain
    held_out_fraction: float = 0.03  # share of stdlib files kept out of training
    # optimisation
    seq_len: int = 512
    batch_size: int = 16
    steps: int = 1000  # ~33 min on 2 CPU cores (2 s/step); 8.2M training tokens
    lr: float = 3e-3
    warmup_steps: int = 60
    weight_decay: float = 0.1
    seed: int = 0
    # distillation: None trains on the data alone (turbo.zoo.train); a zoo name makes the student learn
    # that shipped model's next-token distribution on its corpus, with its tokenizer (turbo.zoo.distill)
    teacher: str | None = None
    ce_weight: float = 0.0  # loss = (1 - ce_weight) * KL(teacher || student) + ce_weight * cross-entropy on data

    def __post_init__(self) -> None:
        assert self.hidden_size % self.num_attention_heads == 0, f"{self.hidden_size=} % {self.num_attention_heads=}"
        assert self.num_attention_heads % self.num_key_value_heads == 0, "GQA needs n_heads % n_kv_heads == 0"
        assert 0.0 <= self.records_fraction < 1.0, f"records_fraction must be in [0, 1), got {self.records_fraction}"
        assert self.seq_len <= self.max_position_embeddings
        assert 0.0 <= self.ce_weight <= 1.0, f"ce_weight must be in [0, 1], got {self.ce_weight}"
        assert self.teacher is not None or self.ce_weight == 0.0, "ce_weight only means something with a teacher"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def recipe_command(self) -> str:
        """The command that makes this preset's weights."""
        return f"python -m turbo.zoo.{'distill' if self.teacher else 'train'} --preset {self.name}"

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, TinyLlamaConfig] = {
    "turbo-tiny": TinyLlamaConfig(name="turbo-tiny"),
    # A seconds-long recipe for tests of the trainer itself; never shipped.
    "turbo-smoke": TinyLlamaConfig(
        name="turbo-smoke", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, seq_len=64, batch_size=4, steps=20, warmup_steps=2,
    ),
    # turbo-tiny's draft for speculative decoding (SGLang STANDALONE), distilled from its logits;
    # ~12 min on the 2-core CPU machine at 1 thread (1.3 s/step), 1.8M training tokens.
    "turbo-tiny-draft": TinyLlamaConfig(
        name="turbo-tiny-draft", teacher="turbo-tiny", hidden_size=192, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=3, num_key_value_heads=1, batch_size=8, steps=450, warmup_steps=30,
    ),
    # A seconds-long distillation for tests of the distiller itself; never shipped.
    "turbo-tiny-draft-smoke": TinyLlamaConfig(
        name="turbo-tiny-draft-smoke", teacher="turbo-tiny", ce_weight=0.1, hidden_size=64, intermediate_size=128,
        num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1, seq_len=64, batch_size=4, steps=20,
        warmup_steps=2,
    ),
}


def zoo_names() -> list[str]:
    """Names of everything shipped in this checkout (directories with weights on disk): language
    models and speculative draft heads alike; each name works wherever SGLang takes a model path."""
    if not WEIGHTS_DIR.is_dir():
        return []
    return sorted(p.name for p in WEIGHTS_DIR.iterdir() if (p / "config.json").is_file())


def zoo_language_models() -> list[str]:
    """The shipped names that are language models made by a preset here (servable with --model-path)."""
    return [name for name in zoo_names() if name in PRESETS]


def zoo_role(name: str) -> str:
    """What a shipped name is, in a few words: "model", "draft model of X", "EAGLE3 head of X",
    "Ladder-Residual model adapted from X" or "Llama-Mamba2 hybrid distilled from X"."""
    if name in PRESETS:
        teacher = PRESETS[name].teacher
        return f"draft model of {teacher}" if teacher else "model"
    path = zoo_path(name)
    config = json.loads((path / "config.json").read_text())
    archs = config.get("architectures") or []
    recipe = json.loads((path / "recipe.json").read_text()) if (path / "recipe.json").is_file() else {}
    if any("Eagle3" in arch for arch in archs):
        return f"EAGLE3 head of {recipe.get('target') or 'an unrecorded target'}"
    if "LadderLlamaForCausalLM" in archs:
        return f"Ladder-Residual model adapted from {recipe.get('base') or 'an unrecorded model'}"
    if "LlamaMamba2ForCausalLM" in archs:
        return f"Llama-Mamba2 hybrid distilled from {recipe.get('base') or 'an unrecorded model'}"
    return "model"


def zoo_path(name: str) -> Path:
    """The shipped directory of model ``name``; raises FileNotFoundError naming the recipe if absent."""
    path = WEIGHTS_DIR / name
    if not (path / "config.json").is_file():
        hint = PRESETS[name].recipe_command if name in PRESETS else f"shipped: {zoo_names()}"
        raise FileNotFoundError(f"embedded model {name!r} not found at {path}; {hint}")
    return path


def model_dir(name_or_path: str | Path) -> Path:
    """A command-line model argument as a directory: an existing path as given, else a shipped name."""
    path = Path(name_or_path)
    return path if path.exists() else zoo_path(str(name_or_path))
