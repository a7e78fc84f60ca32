"""turbo.spec.speculator_store: numbered head versions that survive crashes and refuse the wrong head."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from turbo.spec.eagle3 import Eagle3Config, Eagle3Head
from turbo.spec.speculator_store import SHARED_KEYS, SpeculatorStore, head_fingerprint, head_shapes

CFG = Eagle3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                   num_key_value_heads=1, head_dim=16, aux_layer_ids=(0, 1, 2), target_num_layers=4)
LOGGER = "turbo.spec.speculator_store"


def state_dict(seed: int, cfg: Eagle3Config = CFG) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v for k, v in Eagle3Head(cfg).state_dict().items() if k not in SHARED_KEYS}


def open_store(directory: Path, keep: int = 5, cfg: Eagle3Config = CFG) -> SpeculatorStore:
    return SpeculatorStore(directory, head_fingerprint(cfg), keep=keep, expected=head_shapes(cfg))


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_saved_version_loads_back_with_its_tensors_and_meta(tmp_path):
    store = open_store(tmp_path)
    sd = state_dict(0)
    path = store.save(3, sd, meta={"loss": 1.5})
    got = store.load_latest()
    assert path.name == "v000003.safetensors" and got.path == path, f"{path=} {got.path=}"
    assert got.version == 3 and got.meta == {"loss": 1.5} and same_tensors(got.state_dict, sd), (
        f"{got.version=} {got.meta=} keys {sorted(got.state_dict)[:3]}...")


def test_an_empty_directory_has_no_latest_version(tmp_path):
    assert open_store(tmp_path / "new").load_latest() is None


def test_stored_head_loads_into_a_head_of_the_same_config(tmp_path):
    """The stored dict is the head without the embedding SGLang shares: load_state_dict(strict=False)."""
    store = open_store(tmp_path)
    store.save(1, state_dict(0))
    head = Eagle3Head(CFG)
    result = head.load_state_dict(store.load_latest().state_dict, strict=False)
    assert list(result.missing_keys) == list(SHARED_KEYS) and not result.unexpected_keys, f"{result=}"


def test_only_the_newest_keep_versions_stay_on_disk(tmp_path):
    store = open_store(tmp_path, keep=3)
    for v in range(1, 7):
        store.save(v, state_dict(v))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["v000004.safetensors", "v000005.safetensors", "v000006.safetensors"], f"{names=}"
    assert same_tensors(store.load_latest().state_dict, state_dict(6)), "the newest is the one loaded"


def test_saving_a_version_older_than_a_stored_one_is_refused(tmp_path):
    """Otherwise pruning would delete the new file at once and load_latest would return the old run."""
    store = open_store(tmp_path)
    store.save(10, state_dict(0))
    with pytest.raises(ValueError, match="start_version=store.load_latest"):
        store.save(1, state_dict(1))
    assert store.versions() == [10], f"{store.versions()=}"


def test_a_crash_leftover_and_a_corrupt_newest_file_fall_back_to_the_previous_version(tmp_path, caplog):
    """kill -9 mid-write leaves a temp file (ignored, then deleted); a truncated file under a final name
    is skipped with exactly one warning naming it."""
    store = open_store(tmp_path)
    store.save(1, state_dict(1))
    store.save(2, state_dict(2))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = tmp_path / f".v000003.safetensors.{int(dead.stdout)}.tmp"  # a writer killed mid-save
    leftover.write_bytes(store.path_of(2).read_bytes()[:100])
    newest = store.path_of(2)
    newest.write_bytes(newest.read_bytes()[:-50])  # truncated under its final name
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        got = store.load_latest()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert got is not None and got.version == 1 and same_tensors(got.state_dict, state_dict(1)), f"{got=}"
    assert len(warnings) == 1 and "v000002.safetensors" in warnings[0].getMessage(), (
        f"{[r.getMessage() for r in warnings]}")
    assert not leftover.exists(), "the dead writer's temp file is cleaned"


def test_a_live_writers_temp_file_is_left_alone(tmp_path):
    """Another process saving into the directory right now must not lose its file."""
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        in_flight = tmp_path / f".v000001.safetensors.{writer.pid}.tmp"
        in_flight.write_bytes(b"partial")
        open_store(tmp_path).load_latest()
        assert in_flight.exists(), "a temp file of a running process was deleted"
    finally:
        writer.kill()
        writer.wait()


def test_a_failed_write_leaves_the_previous_version_and_no_partial_file(tmp_path, monkeypatch):
    store = open_store(tmp_path)
    store.save(1, state_dict(1))

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError):
        store.save(2, state_dict(2))
    monkeypatch.undo()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["v000001.safetensors"] and store.load_latest().version == 1, f"{names=}"


def test_a_version_of_another_head_config_is_rejected_with_a_warning(tmp_path, caplog):
    """Same directory, a head with another shape: its file is never loaded into this head."""
    other = replace(CFG, intermediate_size=96)
    open_store(tmp_path, cfg=other).save(5, state_dict(0, other))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        got = open_store(tmp_path).load_latest()
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert got is None, f"{got=}"
    assert len(messages) == 1 and "v000005.safetensors" in messages[0] and "fingerprint" in messages[0] \
        and "intermediate_size" in messages[0], f"{messages=}"


def test_tensors_with_unexpected_shapes_are_rejected_even_with_a_matching_fingerprint(tmp_path, caplog):
    store = SpeculatorStore(tmp_path, head_fingerprint(CFG))  # no shape check when saving
    sd = state_dict(0)
    sd["lm_head.weight"] = sd["lm_head.weight"][:10]
    store.save(1, sd)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        got = store.load_latest(expected=head_shapes(CFG))
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert got is None and len(messages) == 1 and "lm_head.weight" in messages[0], f"{got=} {messages=}"


def test_head_fingerprint_tells_configs_apart():
    assert head_fingerprint(CFG) == head_fingerprint(replace(CFG)), "equal configs, equal fingerprints"
    assert head_fingerprint(CFG) != head_fingerprint(replace(CFG, aux_layer_ids=(0, 2))), "aux layers differ"
    assert head_shapes(CFG)["model.fc.weight"] == (32, 96), f"{head_shapes(CFG)['model.fc.weight']=}"


WRITER = """
import sys, torch
from turbo.spec.eagle3 import Eagle3Config, Eagle3Head
from turbo.spec.speculator_store import SpeculatorStore, head_fingerprint
cfg = Eagle3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                   num_key_value_heads=1, head_dim=16, aux_layer_ids=(0, 1, 2), target_num_layers=4)
store = SpeculatorStore(sys.argv[1], head_fingerprint(cfg), keep=3)
sd = {k: v for k, v in Eagle3Head(cfg).state_dict().items() if k != "model.embed_tokens.weight"}
v = 0
while True:
    v += 1
    store.save(v, sd, meta={"v": v})
"""


@pytest.mark.slow
def test_a_writer_killed_mid_save_leaves_a_loadable_newest_version(tmp_path, caplog):
    """SIGKILL a process that saves as fast as it can; the directory still loads, without warnings."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 60
    while len([p for p in tmp_path.iterdir() if p.name.startswith("v")]) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    store = open_store(tmp_path, keep=3)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        got = store.load_latest()
    stored = store.versions()
    assert got is not None and got.version == stored[-1] and got.meta == {"v": got.version}, f"{got=} {stored=}"
    assert not caplog.records and not any(p.name.endswith(".tmp") for p in tmp_path.iterdir()), (
        f"{[r.getMessage() for r in caplog.records]} {sorted(p.name for p in tmp_path.iterdir())}")
