"""turbo.spec.learner: a background thread that learns from verified spans, publishes versions, and fails alone."""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import replace

import pytest
import torch

from turbo.spec.eagle3 import Eagle3Config, Eagle3Head
from turbo.spec.eagle3_train import RecordBatch, draft_matches
from turbo.spec.learner import Learner, LearnerConfig
from turbo.spec.replay import ReplayConfig, VerifiedSpan
from turbo.spec.speculator_store import SHARED_KEYS, SpeculatorStore, head_fingerprint, head_shapes

CFG = Eagle3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                   num_key_value_heads=1, head_dim=16, aux_layer_ids=(0, 1, 2), target_num_layers=4)
AUX = CFG.n_aux * CFG.hidden_size
K = 4
REPLAY = ReplayConfig(capacity_tokens=4096, window=16, topk=K)
FAST = LearnerConfig(update_interval_tokens=64, steps_per_update=2, batch_size=4, min_tokens=32,
                     idle_sleep_s=0.005, heartbeat_timeout_s=10.0)
DEADLINE_S = 30.0


# --------------------------------------------------------------------------- a fixed synthetic task


class Task:
    """A target that always continues x with perm[x]: features are a fixed vector per token, the target's
    top-k puts all its mass on perm[x] (log-prob 0, the other k-1 columns -9)."""

    def __init__(self, seed: int = 0, n_sequences: int = 8, length: int = 24) -> None:
        g = torch.Generator().manual_seed(seed)
        self.perm = torch.randperm(CFG.vocab_size, generator=g)
        self.features = torch.randn(CFG.vocab_size, AUX, generator=g)  # (vocab, A)
        self.others = torch.randint(0, CFG.vocab_size, (CFG.vocab_size, K - 1), generator=g)
        starts = torch.randint(0, CFG.vocab_size, (n_sequences,), generator=g).tolist()
        self.sequences = [self.continue_from(s, length) for s in starts]

    def continue_from(self, token: int, n: int) -> torch.Tensor:
        tokens = [token]
        for _ in range(n - 1):
            tokens.append(int(self.perm[tokens[-1]]))
        return torch.tensor(tokens)  # (n,)

    def span(self, rid: str, tokens: torch.Tensor) -> VerifiedSpan:
        ids = torch.cat([self.perm[tokens][:, None], self.others[tokens]], dim=1)  # (n, k)
        logprobs = torch.tensor([0.0] + [-9.0] * (K - 1)).expand(len(tokens), K).clone()
        return VerifiedSpan(rid=rid, token_ids=tokens, aux_hidden=self.features[tokens], topk_ids=ids,
                            topk_logprobs=logprobs, n_accepted_drafts=len(tokens) - 1)

    def spans(self, wave: int, sizes=(1, 4, 2, 3)) -> list[VerifiedSpan]:
        """Every sequence once, as requests named after ``wave``, cut into spans of 1..4 positions."""
        out = []
        for i, seq in enumerate(self.sequences):
            p, j = 0, 0
            while p < len(seq):
                n = sizes[(i + j) % len(sizes)]
                out.append(self.span(f"w{wave}-r{i}", seq[p : p + n]))
                p, j = p + n, j + 1
        return out

    def batch(self) -> RecordBatch:
        """All sequences as one record batch (teacher-forced evaluation)."""
        spans = [self.span("eval", s) for s in self.sequences]
        return RecordBatch(input_ids=torch.stack([s.token_ids for s in spans]),
                           aux_hidden=torch.stack([s.aux_hidden for s in spans]),
                           target_topk_ids=torch.stack([s.topk_ids for s in spans]),
                           target_topk_logprobs=torch.stack([s.topk_logprobs for s in spans]))


def top1(head: Eagle3Head, batch: RecordBatch, n_steps: int = 4) -> float:
    """Teacher-forced agreement of the head's draft with the target's argmax over every draft step."""
    head.eval()
    with torch.no_grad():
        match, complete = draft_matches(head.ttt_unroll(batch.input_ids, batch.aux_hidden, n_steps), batch)
    return match[complete].float().mean().item()


def spans_of_tokens(task: Task, rid: str, n: int) -> list[VerifiedSpan]:
    """n positions of one request, one span per position."""
    tokens = task.continue_from(0, n)
    return [task.span(rid, tokens[p : p + 1]) for p in range(n)]


def wait_for(predicate, what: str, timeout: float = DEADLINE_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.005)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
def make_learner():
    """Learner(cfg, REPLAY, a seeded tiny head, store) factory; stops every learner it made."""
    made: list[Learner] = []

    def make(cfg: LearnerConfig = FAST, store=None, start: bool = True, seed: int = 0) -> Learner:
        torch.manual_seed(seed)
        learner = Learner(cfg, REPLAY, Eagle3Head(CFG), store=store)
        made.append(learner)
        if start:
            learner.start()
        return learner

    yield make
    for learner in made:
        learner.stop(timeout=5)


# --------------------------------------------------------------------------- publishing


def test_a_version_is_published_each_update_interval(make_learner, one_thread):
    learner = make_learner()
    task = Task()
    for s in spans_of_tokens(task, "a", 64):
        assert learner.submit(s), "the inbox takes spans while there is room"
    first = wait_for(learner.poll, "version 1")
    assert first.version == 1 and first.metrics["update_steps"] == 2, f"{first.version=} {first.metrics=}"
    for s in spans_of_tokens(task, "b", 63):
        learner.submit(s)
    wait_for(lambda: learner.status()["tokens_seen"] == 127, "63 more positions drained")
    time.sleep(0.1)
    assert learner.poll() is None, f"63 < 64 new positions must not publish: {learner.status()}"
    learner.submit(spans_of_tokens(task, "c", 1)[0])
    second = wait_for(learner.poll, "version 2")
    status = learner.status()
    assert second.version == 2 and status["steps"] == 4 and status["version"] == 2, f"{second.version=} {status=}"
    assert status["alive"] and status["state"] == "idle", f"{status=}"


def test_poll_returns_only_the_newest_version_and_each_version_once(make_learner, one_thread):
    learner = make_learner(replace(FAST, update_interval_tokens=32))
    task = Task()
    for wave, version in ((0, 1), (1, 2)):
        for s in spans_of_tokens(task, f"r{wave}", 32):
            learner.submit(s)
        wait_for(lambda: learner.status()["version"] == version, f"version {version}")
    got = learner.poll()
    assert got is not None and got.version == 2, f"{got and got.version}"
    assert learner.poll() is None, "a version is handed out once"


def test_nothing_is_trained_before_min_tokens(make_learner, one_thread):
    learner = make_learner(replace(FAST, update_interval_tokens=8, min_tokens=100))
    task = Task()
    for s in spans_of_tokens(task, "a", 50):
        learner.submit(s)
    wait_for(lambda: learner.status()["replay_tokens"] == 50, "50 positions in the replay")
    time.sleep(0.1)
    assert learner.status()["steps"] == 0 and learner.poll() is None, f"{learner.status()=}"
    for s in spans_of_tokens(task, "b", 50):
        learner.submit(s)
    assert wait_for(learner.poll, "version 1 once 100 positions are held").version == 1


def test_a_published_version_is_a_copy_without_the_shared_embedding(make_learner, one_thread):
    learner = make_learner(replace(FAST, update_interval_tokens=32))
    task = Task()
    for s in spans_of_tokens(task, "a", 32):
        learner.submit(s)
    v1 = wait_for(learner.poll, "version 1")
    kept = {k: v.clone() for k, v in v1.state_dict.items()}
    for s in spans_of_tokens(task, "b", 32):
        learner.submit(s)
    v2 = wait_for(learner.poll, "version 2")
    assert set(v1.state_dict) == set(head_shapes(CFG)) and not set(SHARED_KEYS) & set(v1.state_dict), (
        f"{sorted(set(v1.state_dict) ^ set(head_shapes(CFG)))}")
    assert all(torch.equal(kept[k], v1.state_dict[k]) for k in kept), "training went on inside a published copy"
    assert not torch.equal(v1.state_dict["lm_head.weight"], v2.state_dict["lm_head.weight"]), "v2 learned more"


def test_each_version_is_saved_through_the_store(make_learner, tmp_path, one_thread):
    store = SpeculatorStore(tmp_path, head_fingerprint(CFG), keep=5, expected=head_shapes(CFG))
    learner = make_learner(replace(FAST, update_interval_tokens=32), store=store)
    for s in spans_of_tokens(Task(), "a", 32):
        learner.submit(s)
    published = wait_for(learner.poll, "version 1")
    stored = store.load_latest()
    assert stored.version == 1 and stored.meta["update_steps"] == 2, f"{stored.version=} {stored.meta=}"
    assert all(torch.equal(stored.state_dict[k], v) for k, v in published.state_dict.items()), "stored == published"


def test_a_failing_store_is_logged_and_learning_goes_on(make_learner, caplog, one_thread):
    class FullDisk:
        def save(self, version, state_dict, meta):
            raise OSError(28, "No space left on device")

    learner = make_learner(replace(FAST, update_interval_tokens=32), store=FullDisk())
    task = Task()
    with caplog.at_level(logging.WARNING, logger="turbo.spec.learner"):
        for wave in range(2):
            for s in spans_of_tokens(task, f"r{wave}", 32):
                learner.submit(s)
            wait_for(lambda: learner.status()["version"] == wave + 1, f"version {wave + 1}")
    status = learner.status()
    assert status["alive"] and status["store_errors"] == 2 and learner.poll().version == 2, f"{status=}"
    assert any("failed to save version 1" in r.getMessage() for r in caplog.records), f"{caplog.records=}"


# --------------------------------------------------------------------------- failure isolation


def test_a_crash_marks_the_learner_dead_and_submit_still_returns(make_learner, caplog, one_thread):
    learner = make_learner(replace(FAST, fault="crash@1"))
    task = Task()
    with caplog.at_level(logging.ERROR, logger="turbo.spec.learner"):
        for s in spans_of_tokens(task, "a", 64):
            learner.submit(s)
        wait_for(lambda: learner.status()["state"] == "crashed", "the injected crash")
    status = learner.status()
    assert not status["alive"] and "injected fault" in status["error"] and status["steps"] == 1, f"{status=}"
    assert any(r.exc_info for r in caplog.records), "the crash is logged with its traceback"
    t0 = time.monotonic()
    taken = [learner.submit(s) for s in spans_of_tokens(task, "b", 200)]
    assert not any(taken) and time.monotonic() - t0 < 1.0, "a dead learner refuses spans at once, never raises"
    assert learner.poll() is None, "nothing half-trained is published"


def test_a_hang_is_reported_after_the_heartbeat_timeout(make_learner, one_thread):
    learner = make_learner(replace(FAST, fault="hang@0", heartbeat_timeout_s=0.2))
    for s in spans_of_tokens(Task(), "a", 64):
        learner.submit(s)
    wait_for(lambda: learner.status()["state"] == "hung", "the hang to be noticed")
    status = learner.status()
    assert not status["alive"] and status["steps"] == 0 and status["error"] is None, f"{status=}"
    assert learner.stop(timeout=5) and learner.status()["state"] == "stopped", f"{learner.status()=}"


def test_an_idle_learner_is_alive_and_not_hung(make_learner):
    learner = make_learner(replace(FAST, heartbeat_timeout_s=0.2))
    time.sleep(0.5)  # > heartbeat timeout, nothing to do
    status = learner.status()
    assert status["alive"] and status["state"] == "idle", f"{status=}"


@pytest.mark.skipif(not hasattr(os, "getpriority"), reason="per-thread nice values are a Linux feature")
def test_the_learner_thread_runs_at_a_lower_priority_than_the_caller(make_learner):
    learner = make_learner(replace(FAST, nice=19))
    wait_for(lambda: learner.status()["state"] == "idle", "the learner to start")
    time.sleep(0.2)
    assert os.getpriority(os.PRIO_PROCESS, learner._thread.native_id) == 19
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) < 19, "the caller keeps its priority"


def test_spans_of_another_feature_width_are_refused_without_raising(make_learner):
    learner = make_learner(start=False)
    bad = VerifiedSpan(rid="x", token_ids=torch.tensor([1, 2]), aux_hidden=torch.zeros(2, AUX + 1),
                       topk_ids=torch.zeros(2, K, dtype=torch.long), topk_logprobs=torch.zeros(2, K),
                       n_accepted_drafts=1)
    assert not learner.submit(bad) and learner.status()["rejected_spans"] == 1, f"{learner.status()=}"


def test_fault_strings_are_validated():
    with pytest.raises(AssertionError, match="'crash@N' or 'hang@N'"):
        LearnerConfig(fault="crash")


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 cores to tell 1 thread from the default")
def test_the_learner_threads_setting_does_not_leak_into_other_threads(make_learner):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        learner = make_learner(replace(FAST, threads=1))
        wait_for(lambda: learner.status()["threads"] is not None, "the learner thread to start")
        seen = []
        fresh = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        fresh.start()
        fresh.join()
        assert learner.status()["threads"] == 1 and torch.get_num_threads() == 2 and seen == [2], (
            f"learner {learner.status()['threads']}, caller {torch.get_num_threads()}, new thread {seen}")
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- learning


def test_the_published_head_learns_a_repeated_task(make_learner, one_thread):
    """Waves of the same 8 sequences: teacher-forced top-1 goes from chance to near perfect."""
    cfg = LearnerConfig(update_interval_tokens=96, steps_per_update=25, batch_size=8, min_tokens=64,
                        idle_sleep_s=0.005)  # the online TTT defaults (lr 1e-3, 4 draft steps)
    learner = make_learner(cfg, start=False)
    task = Task(seed=1)
    eval_batch = task.batch()
    before = top1(learner.head, eval_batch)
    learner.start()
    wave, latest = 0, None
    deadline = time.monotonic() + DEADLINE_S
    while (latest is None or latest.version < 8) and time.monotonic() < deadline:
        for s in task.spans(wave):
            learner.submit(s)
        wave += 1
        latest = wait_for(learner.poll, f"a version after wave {wave}") or latest
    assert latest is not None and latest.version >= 8, f"{latest and latest.version} after {wave} waves"
    served = Eagle3Head(CFG)  # what a server would load: the published weights + the target's embedding
    served.load_state_dict({**latest.state_dict, **{k: learner.head.state_dict()[k] for k in SHARED_KEYS}})
    after = top1(served, eval_batch)
    assert before < 0.3 and after > 0.8, f"top-1 {before=:.3f} -> {after=:.3f} at version {latest.version}"
