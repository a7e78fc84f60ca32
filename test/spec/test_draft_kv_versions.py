"""TURBO's record of which head version wrote the draft KV of each KV slot (worker._tag_slots): the
table behind /turbo/speculator's draft_kv_stale_prefix_tokens and draft_kv_hole_prefix_tokens."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from sglang_turbo.speculative.worker import TurboEagle3Worker


def _worker(table_slots: int):
    return SimpleNamespace(slot_version=torch.full((table_slots,), -1, dtype=torch.int32))


def test_tagged_slots_take_the_version_and_others_keep_theirs():
    w = _worker(8)
    TurboEagle3Worker._tag_slots(w, torch.tensor([1, 3]), 2)
    TurboEagle3Worker._tag_slots(w, torch.tensor([3, 4]), 6)  # slot 3 rewritten by a newer version
    assert w.slot_version.tolist() == [-1, 2, -1, 6, 6, -1, -1, -1]
    TurboEagle3Worker._tag_slots(w, torch.tensor([4]), -1)  # a plain round wrote no draft KV there
    assert w.slot_version.tolist() == [-1, 2, -1, 6, -1, -1, -1, -1]


def test_a_slot_past_the_table_grows_it_and_keeps_what_was_tagged():
    w = _worker(4)
    TurboEagle3Worker._tag_slots(w, torch.tensor([1]), 5)
    TurboEagle3Worker._tag_slots(w, torch.tensor([2, 9]), 7)  # 9 lies past the 4-slot table
    assert w.slot_version.numel() >= 10
    assert w.slot_version[[1, 2, 9]].tolist() == [5, 7, 7]
    assert int((w.slot_version >= 0).sum()) == 3


def test_no_slots_change_nothing():
    w = _worker(4)
    TurboEagle3Worker._tag_slots(w, torch.zeros(0, dtype=torch.int64), 3)
    assert w.slot_version.tolist() == [-1, -1, -1, -1]
