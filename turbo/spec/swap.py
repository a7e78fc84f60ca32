"""Hot swap of a draft head's weights in memory: named weight slots of one live module.

A slot is one tensor per parameter. Activating a slot re-points every parameter at that slot's
tensors (``param.data = tensor``): no copy, microseconds, so the controller can change heads
between any two scheduler steps. Writing a new version into a slot goes through the module's own
loader while that slot is active (for SGLang, ``load_weights`` maps checkpoint names onto fused
parameters), so the loader never needs to know about slots.

``in_place=True`` is for a module whose forward is captured in a graph (CUDA graphs hold the
parameters' addresses): the bound tensors never change; activating a slot copies it into them.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn


class WeightSlots:
    """Slots of ``module``'s parameters, except names containing any of ``exclude`` (shared ones)."""

    def __init__(self, module: nn.Module, exclude: tuple[str, ...] = ("embed_tokens",), in_place: bool = False) -> None:
        self.params = {n: p for n, p in module.named_parameters() if not any(e in n for e in exclude)}
        self.in_place = in_place
        self.slots: dict[str, dict[str, torch.Tensor]] = {}
        self.active: str | None = None

    def capture(self, name: str) -> None:
        """The module's current weights become slot ``name`` (by reference, or a copy when in place),
        and it is active."""
        self.slots[name] = {n: p.data.clone() if self.in_place else p.data for n, p in self.params.items()}
        self.active = name

    def add_copy(self, name: str, source: str) -> None:
        """Slot ``name`` starts as a copy of slot ``source``."""
        self.slots[name] = {n: t.clone() for n, t in self.slots[source].items()}

    def activate(self, name: str) -> None:
        if name == self.active:
            return
        slot = self.slots[name]
        with torch.no_grad():
            for n, p in self.params.items():
                if self.in_place:
                    p.data.copy_(slot[n])
                else:
                    p.data = slot[n]
        self.active = name

    def write(self, name: str, load: Callable[[], None]) -> float:
        """Runs ``load()`` (which writes the module's parameters in place) into slot ``name``, leaving
        the active slot active; returns the seconds it took."""
        started = time.perf_counter()
        previous = self.active
        self.activate(name)
        try:
            with torch.no_grad():
                load()
                if self.in_place:  # the bound tensors hold the new weights: keep them in the slot
                    for n, p in self.params.items():
                        self.slots[name][n].copy_(p.data)
        finally:
            self.active = name
            self.activate(previous)
        return time.perf_counter() - started
