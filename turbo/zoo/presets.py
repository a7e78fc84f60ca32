"""Named recipes of the embedded model family and where their weights live.

A preset fixes everything that decides the weights: architecture, corpus mix,
optimiser schedule and seed. ``python -m turbo.zoo.train --preset NAME`` turns a
preset into the directory that ``zoo_path(NAME)`` returns.
"""

from __future__ import annotations

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

    def __post_init__(self) -> None:
        assert self.hidden_size % self.num_attention_heads == 0, f"{self.hidden_size=} % {self.num_attention_heads=}"
        assert self.num_attention_heads % self.num_key_value_heads == 0, "GQA needs n_heads % n_kv_heads == 0"
        assert 0.0 <= self.records_fraction < 1.0, f"records_fraction must be in [0, 1), got {self.records_fraction}"
        assert self.seq_len <= self.max_position_embeddings

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, TinyLlamaConfig] = {
    "turbo-tiny": TinyLlamaConfig(name="turbo-tiny"),
    # A seconds-long recipe for tests of the trainer itself; never shipped.
    "turbo-smoke": TinyLlamaConfig(
        name="turbo-smoke", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, seq_len=64, batch_size=4, steps=20, warmup_steps=2,
    ),
}


def zoo_names() -> list[str]:
    """Names of the models shipped in this checkout (those with weights on disk)."""
    if not WEIGHTS_DIR.is_dir():
        return []
    return sorted(p.name for p in WEIGHTS_DIR.iterdir() if (p / "config.json").is_file())


def zoo_path(name: str) -> Path:
    """The shipped directory of model ``name``; raises FileNotFoundError naming the recipe if absent."""
    path = WEIGHTS_DIR / name
    if not (path / "config.json").is_file():
        hint = f"python -m turbo.zoo.train --preset {name}" if name in PRESETS else f"shipped: {zoo_names()}"
        raise FileNotFoundError(f"embedded model {name!r} not found at {path}; {hint}")
    return path
