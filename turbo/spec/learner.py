"""The online learner of the adaptive speculator: a background thread that keeps training the draft head on
what the target verified in live traffic, and publishes numbered versions of it.

The loop, step by step:
1. Drain the inbox (``submit`` from the scheduler thread) into the replay buffer.
2. Once the buffer holds ``min_tokens`` positions and ``update_interval_tokens`` new ones arrived since the
   last publish, run ``steps_per_update`` ``Eagle3Trainer`` steps on replay samples (draining between
   steps, so the inbox does not fill while training runs).
3. Publish version + 1: a copy of the head's weights without the shared embedding, saved through the store
   (if any) and handed to the next ``poll``.
4. Idle: sleep ``idle_sleep_s`` (woken early by ``stop``).

Failure isolation: an exception in the loop is logged with its traceback and leaves the learner dead
(``status()["state"] == "crashed"``); the server keeps running on the last version it swapped in, and
``submit`` keeps returning at once. A loop that stops beating for ``heartbeat_timeout_s`` reads "hung".

Not done (weighting positions the draft got wrong more, as in OSD, https://arxiv.org/abs/2310.07177): the
trainer's loss takes a boolean mask, not weights. A cheap variant would bias ``ReplayBuffer.sample``'s
window starts towards the positions just after each span (where the round's first rejected draft was).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field

import torch

from .eagle3 import Eagle3Head
from .eagle3_train import Eagle3Trainer, RecordBatch, TTTConfig
from .replay import ReplayBuffer, ReplayConfig, SpanInbox, VerifiedSpan
from .speculator_store import SHARED_KEYS, SpeculatorStore

logger = logging.getLogger(__name__)

FAULT_KINDS = ("crash", "hang")


def _online_ttt() -> TTTConfig:
    # Fine-tuning a trained head on a stream: a lower lr than the offline recipe (3e-3), a short warm-up so
    # the first versions are not noise, no decay (the stream has no end).
    return TTTConfig(lr=1e-3, warmup_steps=8, total_steps=None, n_steps=4)


@dataclass(frozen=True)
class LearnerConfig:
    update_interval_tokens: int = 1024  # new replay positions between published versions
    steps_per_update: int = 8  # optimizer steps run per interval
    batch_size: int = 8  # replay windows per optimizer step
    min_tokens: int = 128  # no training before the replay holds this many positions
    ttt: TTTConfig = field(default_factory=_online_ttt)
    # Intra-op threads of the learner thread only (None: leave torch's setting alone). See _use_threads:
    # with torch's OpenMP backend torch.set_num_threads is per calling thread, except for the default new
    # threads start with, which the learner restores.
    threads: int | None = 1
    # Linux nice value of the learner thread (per thread on Linux): serving threads come first on a busy
    # CPU; None leaves it alone.
    nice: int | None = 19
    heartbeat_timeout_s: float = 30.0  # no loop progress for this long reads as "hung"
    idle_sleep_s: float = 0.05  # wait between inbox checks when there is nothing to train on
    inbox_tokens: int = 16_384  # positions the inbox holds between drains; more are dropped
    seed: int = 0  # replay sampling
    fault: str | None = None  # test-only: "crash@N" raises, "hang@N" blocks (until stop) at optimizer step N

    def __post_init__(self) -> None:
        for name in ("update_interval_tokens", "steps_per_update", "batch_size", "inbox_tokens"):
            assert getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}"
        assert self.min_tokens >= 2, \
            f"min_tokens must be >= 2 (a training row needs two positions), got {self.min_tokens}"
        assert self.threads is None or self.threads >= 1, \
            f"threads must be >= 1, or None to leave torch's setting alone, got {self.threads}"
        assert self.heartbeat_timeout_s > 0, f"heartbeat_timeout_s must be > 0, got {self.heartbeat_timeout_s}"
        _ = self.fault_at  # validates the fault string

    @property
    def fault_at(self) -> tuple[str, int] | None:
        """("crash" | "hang", optimizer step index counted from 0) or None."""
        if self.fault is None:
            return None
        kind, _, step = self.fault.partition("@")
        assert kind in FAULT_KINDS and step.isdigit(), (
            f"fault must be 'crash@N' or 'hang@N' with N an optimizer step >= 0, got {self.fault!r}")
        return kind, int(step)


@dataclass
class PublishedVersion:
    version: int
    state_dict: dict[str, torch.Tensor]  # CPU copy of the head's weights, without SHARED_KEYS
    metrics: dict  # this update: steps, mean loss, mean top-1 per draft step, replay size, seconds


class Learner:
    """Trains ``head`` in a daemon thread from submitted spans; ``poll`` hands out each new version.

    The learner owns ``head`` while running (it is trained in place); the server gets copies via ``poll``.
    ``submit``, ``poll`` and ``status`` may be called from any thread at any time.
    """

    def __init__(self, cfg: LearnerConfig, replay_cfg: ReplayConfig, head: Eagle3Head,
                 store: SpeculatorStore | None = None, start_version: int = 0) -> None:
        self.cfg, self.head, self.store = cfg, head, store
        self._aux_dim = head.cfg.n_aux * head.cfg.target_hidden_size
        self.replay = ReplayBuffer(replay_cfg, aux_dim=self._aux_dim)  # learner thread only
        self.inbox = SpanInbox(cfg.inbox_tokens)
        self.trainer = Eagle3Trainer(head, cfg.ttt)
        self._gen = torch.Generator().manual_seed(cfg.seed)
        self._device = next(head.parameters()).device

        # ---- shared with other threads: written under _lock (or single atomic assignments), read by status
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._published: PublishedVersion | None = None  # newest version not yet polled
        self._version = start_version
        self._state = "stopped"
        self._error: str | None = None
        self._beat = time.monotonic()
        self._steps = 0
        self._tokens_seen = 0
        self._since_publish = 0
        self._last_loss: float | None = None
        self._last_top1: list[float] = []
        self._rejected = 0
        self._store_errors = 0
        self._threads_used: int | None = None

    # ----------------------------------------------------------------------- other threads

    def start(self) -> None:
        """Starts the learner thread; raises RuntimeError when it was already started."""
        if self._thread is not None:
            raise RuntimeError("Learner.start() called twice; create a new Learner to restart")
        self._state = "idle"
        self._beat = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="turbo-spec-learner", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 10.0) -> bool:
        """Asks the loop to end and waits up to ``timeout`` s; True when the thread has ended."""
        self._stop.set()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def submit(self, span: VerifiedSpan) -> bool:
        """Hands ``span`` to the learner without blocking; False when it was not taken: the inbox is full,
        the learner has crashed, or the span's feature width is not the head's (counted, never raised)."""
        if span.aux_hidden.shape[-1] != self._aux_dim:
            with self._lock:
                self._rejected += 1
                first = self._rejected == 1
            if first:
                logger.warning("learner: rejecting spans with aux width %d (head expects %d = n_aux * hidden); "
                               "check the target's captured layers", span.aux_hidden.shape[-1], self._aux_dim)
            return False
        if self._error is not None:
            return False
        return self.inbox.put(span)

    def poll(self) -> PublishedVersion | None:
        """The newest version published since the last poll (each at most once), or None."""
        with self._lock:
            published, self._published = self._published, None
        return published

    def status(self) -> dict:
        """A snapshot; ``state`` is "idle", "training", "crashed", "hung" (no beat for heartbeat_timeout_s)
        or "stopped" (not started, or ended); ``alive`` is True only for a running loop that beats."""
        with self._lock:
            thread_alive = self._thread is not None and self._thread.is_alive()
            state = self._state
            if self._error is not None:
                state = "crashed"
            elif not thread_alive:
                state = "stopped"
            elif time.monotonic() - self._beat > self.cfg.heartbeat_timeout_s:
                state = "hung"
            return {
                "alive": state in ("idle", "training"),
                "state": state,
                "error": self._error,
                "steps": self._steps,
                "version": self._version,
                "replay_tokens": self.replay.tokens,
                "replay_sequences": self.replay.n_sequences,
                "dropped_spans": self.inbox.dropped,
                "rejected_spans": self._rejected,
                "tokens_seen": self._tokens_seen,
                "last_loss": self._last_loss,
                "last_top1": list(self._last_top1),
                "store_errors": self._store_errors,
                "threads": self._threads_used,
            }

    # ----------------------------------------------------------------------- the learner thread

    def _run(self) -> None:
        try:
            self._threads_used = _use_threads(self.cfg.threads)
            _lower_priority(self.cfg.nice)
            while not self._stop.is_set():
                self._beat = time.monotonic()
                got = self._drain()
                if self._due():
                    self._update()
                elif not got:
                    self._stop.wait(self.cfg.idle_sleep_s)
            with self._lock:
                self._state = "stopped"
        except BaseException as e:  # noqa: BLE001 - the learner must never take the server down
            logger.exception("speculator learner crashed; serving continues with the last swapped-in head")
            with self._lock:
                self._error = f"{type(e).__name__}: {e}"
                self._state = "crashed"

    def _drain(self) -> int:
        """Step 1: inbox -> replay; returns positions moved."""
        n = 0
        for span in self.inbox.drain():
            self.replay.add(span)
            n += span.n_tokens
        if n:
            with self._lock:
                self._tokens_seen += n
                self._since_publish += n
        return n

    def _due(self) -> bool:
        return (self.replay.tokens >= self.cfg.min_tokens
                and self._since_publish >= self.cfg.update_interval_tokens)

    def _update(self) -> None:
        """Steps 2 and 3."""
        started = time.monotonic()
        with self._lock:
            self._state, self._since_publish = "training", 0  # what arrives while training counts for the next
        losses, top1s = [], []
        for _ in range(self.cfg.steps_per_update):
            self._maybe_fault()
            if self._stop.is_set():
                break
            batch = self.replay.sample(self.cfg.batch_size, self._gen)
            if batch is None:  # no sequence has two positions yet
                break
            metrics = self.trainer.step(_to(batch, self._device))
            losses.append(metrics["loss"])
            top1s.append(metrics["top1"])
            with self._lock:
                self._steps += 1
                self._last_loss, self._last_top1 = metrics["loss"], metrics["top1"]
            self._beat = time.monotonic()
            self._drain()
        with self._lock:
            self._state = "idle"
        if losses:
            self._publish({
                "steps": self._steps, "update_steps": len(losses), "loss": sum(losses) / len(losses),
                "top1": [sum(col) / len(col) for col in zip(*top1s)], "replay_tokens": self.replay.tokens,
                "tokens_seen": self._tokens_seen, "train_seconds": round(time.monotonic() - started, 3),
            })

    def _publish(self, metrics: dict) -> None:
        """Step 3: a CPU copy of the weights, to the store (failures logged) and to ``poll``."""
        version = self._version + 1
        state_dict = {k: v.detach().to("cpu", copy=True) for k, v in self.head.state_dict().items()
                      if k not in SHARED_KEYS}
        if self.store is not None:
            try:
                self.store.save(version, state_dict, meta=metrics)
            except Exception:  # noqa: BLE001 - a full disk must not stop learning or serving
                logger.warning("speculator store failed to save version %d; serving it anyway", version,
                               exc_info=True)
                with self._lock:
                    self._store_errors += 1
        with self._lock:
            self._version = version
            self._published = PublishedVersion(version, state_dict, metrics)

    def _maybe_fault(self) -> None:
        fault = self.cfg.fault_at
        if fault is None or self._steps != fault[1]:
            return
        if fault[0] == "crash":
            raise RuntimeError(f"injected fault: crash at optimizer step {self._steps}")
        self._stop.wait()  # "hang": a stand-in for a deadlock; unlike a real one, stop() ends it


def _to(batch: RecordBatch, device: torch.device) -> RecordBatch:
    if device.type == "cpu":
        return batch
    return RecordBatch(**{k: None if v is None else v.to(device, non_blocking=True) for k, v in vars(batch).items()})


_warned_threads = False


def _lower_priority(nice: int | None) -> None:
    """Sets the calling thread's nice value (Linux schedules threads, so this leaves the rest of the
    process alone); a platform without per-thread priorities keeps its default, logged once."""
    if nice is None:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (AttributeError, OSError) as e:
        logger.info("learner thread keeps its priority (%s)", e)


def _use_threads(n: int | None) -> int | None:
    """Limits the calling thread to ``n`` intra-op threads without changing the process's default; returns
    the calling thread's count afterwards (None when left alone).

    Investigated on torch 2.14, OpenMP backend (``torch.__config__.parallel_info()``):
    ``torch.set_num_threads`` sets the calling thread's OpenMP ``nthreads`` ICV and MKL's thread-local count
    (per thread: other running threads keep theirs), but also a process-wide default that every thread
    adopts the first time it runs an op. So: set it here, in the learner thread, then restore the default
    from a throwaway thread (its own setting dies with it). A thread that starts its first op in between
    adopts ``n``; harmless. With the native thread pool backend the setting is process-wide, so nothing is
    changed there (warned once): the caller must size torch's threads.
    """
    global _warned_threads
    if n is None:
        return None
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        if not _warned_threads:
            _warned_threads = True
            logger.warning("learner threads=%d ignored: torch.set_num_threads is process-wide on this build", n)
        return torch.get_num_threads()
    default = torch.get_num_threads()  # this thread's first op: initialised from the process default
    torch.set_num_threads(n)
    restore = threading.Thread(target=torch.set_num_threads, args=(default,), name="turbo-threads-restore")
    restore.start()
    restore.join()
    return torch.get_num_threads()
