"""Durable versions of the adaptive draft head: ``v{version:06d}.safetensors`` files in one directory.

Each file is the head's state dict (without the embedding SGLang shares with the target), and its
safetensors metadata key ``turbo`` holds a JSON string: version, fingerprint (the head's shape and
config, ``head_fingerprint``), created time (unix seconds) and the caller's meta.

Crash safety: a save writes ``.v{version:06d}.safetensors.{pid}.tmp``, fsyncs it, renames it over the final
name (atomic on POSIX) and fsyncs the directory, so a final name only ever holds a complete file. A
process killed mid-write leaves only its temp file; temp files of processes that are no longer running
are deleted whenever a store opens the directory or loads. A damaged file under a final name (disk
corruption, a copy gone wrong) is skipped by ``load_latest`` with one warning.

Resuming: ``latest = store.load_latest(); head.load_state_dict(latest.state_dict, strict=False)`` (strict
off: the embedding is not stored) and continue at ``latest.version``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .eagle3 import ARCHITECTURE, Eagle3Config, Eagle3Head

logger = logging.getLogger(__name__)

# NOTE: SGLang rebinds the draft's embed_tokens to the target's (EAGLEWorkerV2.init_lm_head), so a
# published head never carries it.
SHARED_KEYS = ("model.embed_tokens.weight",)
STORE_FORMAT = 1  # bump when the file layout changes; part of the fingerprint
_FINAL = re.compile(r"^v(\d{6,})\.safetensors$")
_TEMP = re.compile(r"^\.v(\d{6,})\.safetensors\.(\d+)\.tmp$")


def head_fingerprint(cfg: Eagle3Config) -> dict:
    """What must match for a stored state dict to be loadable into (and meaningful for) a head of ``cfg``:
    every config field (shapes, RoPE, aux layers), JSON-normalised."""
    return json.loads(json.dumps({"architecture": ARCHITECTURE, "store_format": STORE_FORMAT, **asdict(cfg)}))


def head_shapes(cfg: Eagle3Config, exclude: tuple[str, ...] = SHARED_KEYS) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of a head of ``cfg`` as stored (``exclude`` left out); built on the meta device."""
    with torch.device("meta"):
        head = Eagle3Head(cfg)
    return {k: tuple(v.shape) for k, v in head.state_dict().items() if k not in exclude}


@dataclass
class StoredVersion:
    version: int
    state_dict: dict[str, torch.Tensor]  # CPU tensors, as saved
    meta: dict  # the caller's meta given to save
    path: Path


class SpeculatorStore:
    """Numbered versions of one head in ``directory``; thread-safe (one lock), one writer process."""

    def __init__(self, directory: str | os.PathLike, fingerprint: dict, keep: int = 5,
                 expected: dict[str, tuple[int, ...]] | None = None) -> None:
        """fingerprint: ``head_fingerprint(cfg)`` of the head being stored; keep: newest versions kept on disk
        (>= 1); expected: {name: shape} a loaded state dict must have exactly (``head_shapes(cfg)``; None:
        no check beyond the fingerprint)."""
        assert keep >= 1, f"keep must be >= 1 (the newest version is always kept), got {keep}"
        self.directory = Path(directory)
        self.fingerprint = json.loads(json.dumps(fingerprint))  # tuples -> lists, as read back from a file
        self.keep = keep
        self.expected = expected
        self._lock = threading.Lock()
        self.directory.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._clean_temp_files()

    def path_of(self, version: int) -> Path:
        return self.directory / f"v{version:06d}.safetensors"

    def versions(self) -> list[int]:
        """Versions with a file under their final name, ascending (readable or not)."""
        found = (_FINAL.match(p.name) for p in self.directory.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    # ----------------------------------------------------------------------- write

    def save(self, version: int, state_dict: dict[str, torch.Tensor], meta: dict | None = None) -> Path:
        """Writes ``version`` atomically and prunes to the newest ``keep``; returns its path.

        Raises ValueError when a newer version is already stored (pruning would delete the new file at
        once): resume from ``load_latest().version`` or use a fresh directory.
        """
        from safetensors.torch import save

        header = {"version": version, "fingerprint": self.fingerprint, "created": time.time(), "meta": meta or {}}
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
        data = save(tensors, metadata={"turbo": json.dumps(header)})
        with self._lock:
            newer = [v for v in self.versions() if v > version]
            if newer:
                raise ValueError(f"{self.directory} already holds version {newer[-1]} > {version}; resume with "
                                 "start_version=store.load_latest().version, or use a fresh directory")
            final = self.path_of(version)
            tmp = self.directory / f".{final.name}.{os.getpid()}.tmp"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, final)
            finally:
                tmp.unlink(missing_ok=True)
            self._fsync_directory()
            for old in self.versions()[: -self.keep]:
                self.path_of(old).unlink(missing_ok=True)
        return final

    def _fsync_directory(self) -> None:
        # The rename is durable only once the directory entry is on disk.
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _clean_temp_files(self) -> None:
        """Deletes temp files whose writer process is gone (killed mid-save); another live process's are kept.
        Call with the lock held."""
        for p in self.directory.iterdir():
            m = _TEMP.match(p.name)
            if m and not _process_alive(int(m.group(2))):
                logger.info("removing %s, left by an interrupted save", p)
                p.unlink(missing_ok=True)

    # ----------------------------------------------------------------------- read

    def load_latest(self, expected: dict[str, tuple[int, ...]] | None = None) -> StoredVersion | None:
        """The newest version that reads back whole and matches this store; None when there is none.

        Newest first, a file is skipped, with one warning naming it and the reason, when it does not parse
        (truncated, corrupt), its fingerprint differs from this store's (another head config), or its tensors
        differ from ``expected`` (this call's, else the constructor's) in names or shapes.
        """
        expected = expected if expected is not None else self.expected
        with self._lock:
            self._clean_temp_files()
            for version in reversed(self.versions()):
                path = self.path_of(version)
                try:
                    return self._read(path, version, expected)
                except Exception as e:  # noqa: BLE001 - any unreadable file is skipped, never fatal
                    logger.warning("skipping speculator version %s: %s", path, e)
        return None

    def _read(self, path: Path, version: int, expected: dict | None) -> StoredVersion:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if "turbo" not in metadata:
                raise ValueError("no 'turbo' metadata: not written by SpeculatorStore")
            header = json.loads(metadata["turbo"])
            if header.get("version") != version:
                raise ValueError(f"metadata says version {header.get('version')}, file name says {version}")
            if header.get("fingerprint") != self.fingerprint:
                diff = _diff(header.get("fingerprint"), self.fingerprint)
                raise ValueError(f"fingerprint differs (another head config): {diff}")
            state_dict = {k: f.get_tensor(k) for k in f.keys()}
        if expected is not None:
            shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
            want = {k: tuple(v) for k, v in expected.items()}
            if shapes != want:
                raise ValueError(f"tensors differ from the expected ones: {_diff(shapes, want)}")
        return StoredVersion(version=version, state_dict=state_dict, meta=header.get("meta", {}), path=path)


def _diff(got: dict | None, want: dict) -> str:
    """A short description of how ``got`` differs from ``want`` (first 3 keys)."""
    got = got if isinstance(got, dict) else {}
    keys = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
    return ", ".join(f"{k}: file {got.get(k, '<missing>')} vs expected {want.get(k, '<missing>')}"
                     for k in keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        # Our pid, yet not a save of ours (saves hold the store lock, as does every cleaning): a previous
        # process with the same pid, common in containers where the server restarts as the same pid.
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True
