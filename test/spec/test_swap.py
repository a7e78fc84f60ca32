"""Weight slots: a head's versions live side by side and a swap changes what the module computes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from turbo.spec.swap import WeightSlots


def make_module() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(8, 4), nn.Linear(4, 4))  # "0.weight": a shared embedding, excluded


def forward(m: nn.Module) -> torch.Tensor:
    return m(torch.arange(8))


@pytest.mark.parametrize("in_place", [False, True])
def test_a_written_slot_changes_the_output_only_while_active(in_place):
    m = make_module()
    slots = WeightSlots(m, exclude=("0.",), in_place=in_place)
    slots.capture("static")
    slots.add_copy("adaptive", "static")
    before = forward(m)
    slots.write("adaptive", lambda: m[1].weight.mul_(2.0))
    assert slots.active == "static"
    assert torch.equal(forward(m), before), "writing a slot does not touch the active weights"
    slots.activate("adaptive")
    assert not torch.allclose(forward(m), before)
    slots.activate("static")
    assert torch.equal(forward(m), before)


def test_re_pointing_swaps_without_copying_and_in_place_keeps_addresses():
    m = make_module()
    slots = WeightSlots(m, exclude=("0.",))
    slots.capture("static")
    slots.add_copy("adaptive", "static")
    slots.activate("adaptive")
    assert m[1].weight.data_ptr() == slots.slots["adaptive"]["1.weight"].data_ptr()

    m = make_module()
    slots = WeightSlots(m, exclude=("0.",), in_place=True)
    address = m[1].weight.data_ptr()
    slots.capture("static")
    slots.add_copy("adaptive", "static")
    slots.write("adaptive", lambda: m[1].weight.add_(1.0))
    slots.activate("adaptive")
    assert m[1].weight.data_ptr() == address, "a graph-captured module keeps its parameter addresses"


def test_excluded_parameters_are_never_swapped():
    m = make_module()
    slots = WeightSlots(m, exclude=("0.",))
    assert set(slots.params) == {"1.weight", "1.bias"}
