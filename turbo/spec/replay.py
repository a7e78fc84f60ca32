"""Replay of live speculative traffic: what the target verified, kept as training records for the draft head.

After each verify round the server hands over one ``VerifiedSpan`` per request: the committed positions
(the round's input token, then the drafts the target accepted), the target's captured aux features there,
and the target's top-k next-token distribution there. Consecutive spans of one request are consecutive
positions of one sequence, so ``ReplayBuffer`` concatenates them per request and samples fixed-width
windows as the ``RecordBatch`` rows ``Eagle3Trainer.step`` learns from.

Threads: the scheduler thread only ever calls ``SpanInbox.put`` (never blocks); the learner thread drains
the inbox into its own ``ReplayBuffer`` (no lock: one owner).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .eagle3_train import RecordBatch

# NOTE: bf16 rather than fp16: lossless for the bf16 targets SGLang serves (the features arrive in bf16),
# and no overflow on the large outlier activations of a residual stream (fp16 tops out at 65504).
AUX_DTYPE = torch.bfloat16
# Log-prob given to top-k columns a span does not have: exp() is exactly 0 in fp32, yet finite, so a
# KL term p * (log p - log q) is 0 rather than NaN (0 * -inf).
PAD_LOGPROB = -1e4


@dataclass
class VerifiedSpan:
    """One request's committed positions after one verify round (CPU tensors; ``add`` moves any others).

    token_ids (n,) int64: the token x_p at each committed position p, the round's input token first;
    aux_hidden (n, A) any float dtype: the target's captured aux-layer features at p; topk_ids (n, k) int64
    and topk_logprobs (n, k) float: the target's distribution of x_{p+1} at p (top-k, log-probs);
    n_accepted_drafts: drafts accepted this round, n = n_accepted_drafts + 1. after_gap: positions of this
    request were lost just before this span (``SpanInbox`` sets it when it dropped one; a server that skips
    a round sets it too), so the span starts a new sequence instead of continuing the previous one.
    Raises ValueError when the shapes disagree.
    """

    rid: str
    token_ids: torch.Tensor
    aux_hidden: torch.Tensor
    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    n_accepted_drafts: int
    after_gap: bool = False

    def __post_init__(self) -> None:
        n = self.n_accepted_drafts + 1
        if self.n_accepted_drafts < 0 or tuple(self.token_ids.shape) != (n,):
            raise ValueError(f"span {self.rid!r}: token_ids must be (n_accepted_drafts + 1,) = ({n},), "
                             f"got {tuple(self.token_ids.shape)}")
        if self.aux_hidden.dim() != 2 or self.aux_hidden.shape[0] != n:
            raise ValueError(f"span {self.rid!r}: aux_hidden must be (n, A) with n = {n}, "
                             f"got {tuple(self.aux_hidden.shape)}")
        if self.topk_ids.dim() != 2 or self.topk_ids.shape != self.topk_logprobs.shape or self.topk_ids.shape[0] != n:
            raise ValueError(f"span {self.rid!r}: topk_ids and topk_logprobs must both be (n, k) with n = {n}, "
                             f"got {tuple(self.topk_ids.shape)} and {tuple(self.topk_logprobs.shape)}")

    @property
    def n_tokens(self) -> int:
        return self.n_accepted_drafts + 1


@dataclass(frozen=True)
class ReplayConfig:
    capacity_tokens: int = 65_536  # positions held; ~100 MB of bf16 aux at A = 768
    window: int = 64  # positions per training row
    topk: int = 8  # target distribution columns kept per position

    def __post_init__(self) -> None:
        assert self.capacity_tokens >= self.window, (
            f"capacity_tokens ({self.capacity_tokens}) must hold at least one window ({self.window}): "
            "raise capacity_tokens or lower window")
        assert self.window >= 2, f"window must be >= 2 (a row needs a token and its successor), got {self.window}"
        assert self.topk >= 1, f"topk must be >= 1, got {self.topk}"


class _Sequence:
    """One request's positions in growable tensors; positions ``[lo, hi)`` are live.

    Appends are amortised O(1) (capacity doubles on overflow); evicting from the front only moves ``lo``,
    the dead prefix is reclaimed at the next reallocation.
    """

    def __init__(self, aux_dim: int, topk: int) -> None:
        self.aux_dim, self.topk = aux_dim, topk
        self.lo = self.hi = 0
        self._alloc(0)

    def _alloc(self, cap: int) -> None:
        self.tokens = torch.zeros(cap, dtype=torch.int64)  # (cap,)
        self.aux = torch.zeros(cap, self.aux_dim, dtype=AUX_DTYPE)  # (cap, A)
        self.topk_ids = torch.zeros(cap, self.topk, dtype=torch.int64)  # (cap, k)
        self.topk_logprobs = torch.zeros(cap, self.topk, dtype=torch.float32)  # (cap, k)

    def __len__(self) -> int:
        return self.hi - self.lo

    def append(self, tokens, aux, topk_ids, topk_logprobs) -> None:
        n = tokens.shape[0]
        if self.hi + n > self.tokens.shape[0]:
            live = len(self)
            old = [self.tokens, self.aux, self.topk_ids, self.topk_logprobs]
            self._alloc(max(16, 2 * (live + n)))
            for new, src in zip([self.tokens, self.aux, self.topk_ids, self.topk_logprobs], old):
                new[:live] = src[self.lo : self.hi]
            self.lo, self.hi = 0, live
        s = slice(self.hi, self.hi + n)
        self.tokens[s], self.aux[s], self.topk_ids[s], self.topk_logprobs[s] = tokens, aux, topk_ids, topk_logprobs
        self.hi += n

    def drop_front(self, n: int) -> None:
        self.lo += min(n, len(self))

    def window(self, start: int, width: int):
        """(tokens, aux, topk_ids, topk_logprobs) of live positions start .. start+width-1 (fewer at the end)."""
        s = slice(self.lo + start, min(self.hi, self.lo + start + width))
        return self.tokens[s], self.aux[s], self.topk_ids[s], self.topk_logprobs[s]


class ReplayBuffer:
    """Verified positions of recent requests, one sequence per request, sampled as training windows.

    Eviction: whenever more than ``capacity_tokens`` positions are held, the oldest positions go first:
    the front of the sequence that arrived first (whole sequences, oldest first, until one is only
    trimmed); emptied sequences are removed. A long-running request therefore loses its oldest positions
    while staying contiguous. Memory: positions * (2 * A + 12 * topk + 8) bytes, at most about twice that
    while the growable per-sequence tensors have slack.

    Not thread-safe: one owner (the learner thread) calls everything.
    """

    def __init__(self, cfg: ReplayConfig, aux_dim: int | None = None) -> None:
        """aux_dim: the feature width A every span must have (None: taken from the first span)."""
        self.cfg = cfg
        self.aux_dim = aux_dim
        self._seqs: OrderedDict[int, _Sequence] = OrderedDict()  # arrival order of each sequence's first span
        self._seq_of_rid: dict[str, int] = {}  # rid -> the sequence its next span continues
        self._rid_of_seq: dict[int, str] = {}
        self._next_id = 0
        self._tokens = 0

    @property
    def tokens(self) -> int:
        """Positions held."""
        return self._tokens

    @property
    def n_sequences(self) -> int:
        return len(self._seqs)

    def add(self, span: VerifiedSpan) -> None:
        """Appends ``span`` to its request's sequence (a new one for a new rid or ``after_gap``), then
        evicts down to capacity. Raises ValueError when the feature width differs from ``aux_dim``."""
        if self.aux_dim is None:
            self.aux_dim = span.aux_hidden.shape[1]
        if span.aux_hidden.shape[1] != self.aux_dim:
            raise ValueError(f"span {span.rid!r} has aux width {span.aux_hidden.shape[1]}, this buffer holds "
                             f"{self.aux_dim}: the target's captured layers must match the draft head's fc input")
        tokens = span.token_ids.detach().to("cpu", torch.int64)
        aux = span.aux_hidden.detach().to("cpu", AUX_DTYPE)
        ids, logprobs = self._topk_columns(span.topk_ids.detach().cpu(), span.topk_logprobs.detach().cpu())
        if tokens.shape[0] > self.cfg.capacity_tokens:  # only the newest positions could survive eviction
            keep = self.cfg.capacity_tokens
            tokens, aux, ids, logprobs = tokens[-keep:], aux[-keep:], ids[-keep:], logprobs[-keep:]
        seq_id = self._seq_of_rid.get(span.rid)
        if seq_id is None or span.after_gap:
            seq_id = self._new_sequence(span.rid)
        self._seqs[seq_id].append(tokens, aux, ids, logprobs)
        self._tokens += tokens.shape[0]
        self._evict()

    def _topk_columns(self, ids: torch.Tensor, logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, topk) ids and fp32 log-probs: the ``topk`` most likely columns, or all of them padded with
        zero-probability columns (id 0, ``PAD_LOGPROB``) when the span has fewer."""
        logprobs = logprobs.float().clamp(min=PAD_LOGPROB)  # -inf (masked vocab) would give NaN in the KL
        k = self.cfg.topk
        if ids.shape[1] > k:
            logprobs, order = logprobs.topk(k, dim=-1)
            ids = ids.gather(-1, order)
        elif ids.shape[1] < k:
            pad = k - ids.shape[1]
            ids = torch.cat([ids, ids.new_zeros(ids.shape[0], pad)], dim=1)
            logprobs = torch.cat([logprobs, logprobs.new_full((logprobs.shape[0], pad), PAD_LOGPROB)], dim=1)
        return ids.to(torch.int64), logprobs

    def _new_sequence(self, rid: str) -> int:
        seq_id, self._next_id = self._next_id, self._next_id + 1
        old = self._seq_of_rid.get(rid)
        if old is not None:  # after a gap the old positions stay, as a sequence no rid continues
            del self._rid_of_seq[old]
        self._seqs[seq_id] = _Sequence(self.aux_dim, self.cfg.topk)
        self._seq_of_rid[rid], self._rid_of_seq[seq_id] = seq_id, rid
        return seq_id

    def _evict(self) -> None:
        while self._tokens > self.cfg.capacity_tokens:
            seq_id, seq = next(iter(self._seqs.items()))
            n = min(len(seq), self._tokens - self.cfg.capacity_tokens)
            seq.drop_front(n)
            self._tokens -= n
            if len(seq) == 0:
                del self._seqs[seq_id]
                rid = self._rid_of_seq.pop(seq_id, None)
                if rid is not None:
                    del self._seq_of_rid[rid]

    def sequence(self, rid: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(token_ids (n,), aux_hidden (n, A) in ``AUX_DTYPE``) currently held for ``rid``'s live sequence;
        raises KeyError for an unknown or evicted rid. For inspection and tests."""
        seq = self._seqs[self._seq_of_rid[rid]]
        return seq.tokens[seq.lo : seq.hi].clone(), seq.aux[seq.lo : seq.hi].clone()

    def sample(self, bsz: int, generator: torch.Generator | None = None) -> RecordBatch | None:
        """``bsz`` training rows of ``window`` consecutive positions; None when no sequence has >= 2 positions.

        A row's sequence is drawn with probability proportional to its length, then its start uniformly
        among the sequence's windows (0 .. len - window), so every held position is about equally likely
        to be trained on. Position j of a row: token x_p, features f_p, the target's distribution of
        x_{p+1} (``RecordBatch``'s convention). Sequences shorter than the window are right-padded with
        token 0, zero features and a zero-log-prob top-k, all with loss_mask False.
        """
        seqs = [s for s in self._seqs.values() if len(s) >= 2]
        if not seqs:
            return None
        w, k = self.cfg.window, self.cfg.topk
        lengths = torch.tensor([len(s) for s in seqs], dtype=torch.float64)
        picks = torch.multinomial(lengths, bsz, replacement=True, generator=generator).tolist()
        u = torch.rand(bsz, generator=generator, dtype=torch.float64).tolist()
        input_ids = torch.zeros(bsz, w, dtype=torch.int64)  # (bsz, window)
        aux = torch.zeros(bsz, w, self.aux_dim, dtype=torch.float32)  # (bsz, window, A)
        topk_ids = torch.zeros(bsz, w, k, dtype=torch.int64)  # (bsz, window, k)
        topk_logprobs = torch.zeros(bsz, w, k, dtype=torch.float32)  # (bsz, window, k)
        loss_mask = torch.zeros(bsz, w, dtype=torch.bool)  # (bsz, window)
        for row, (i, r) in enumerate(zip(picks, u)):
            seq = seqs[i]
            n_starts = max(0, len(seq) - w) + 1
            tok, f, ids, lps = seq.window(min(int(r * n_starts), n_starts - 1), w)
            n = tok.shape[0]
            input_ids[row, :n], aux[row, :n], topk_ids[row, :n], topk_logprobs[row, :n] = tok, f, ids, lps
            loss_mask[row, :n] = True
        return RecordBatch(input_ids=input_ids, aux_hidden=aux, target_topk_ids=topk_ids,
                           target_topk_logprobs=topk_logprobs, loss_mask=loss_mask)


class SpanInbox:
    """Bounded hand-off of spans from the scheduler thread to the learner thread.

    Bounded in tokens (positions), not spans, because memory is per position (spans hold 1 .. n_steps + 1
    of them). ``put`` never blocks beyond a short lock: a span that does not fit is dropped and counted,
    and the next span of that request is marked ``after_gap`` so the replay does not join positions that
    are not consecutive.
    """

    _MAX_GAP_RIDS = 65_536  # rids remembered as having lost a span; a finished request's entry ages out

    def __init__(self, max_tokens: int) -> None:
        assert max_tokens >= 1, f"max_tokens must be >= 1, got {max_tokens}"
        self.max_tokens = max_tokens
        self._lock = threading.Lock()
        self._spans: list[VerifiedSpan] = []
        self._tokens = 0
        self._gap_rids: OrderedDict[str, None] = OrderedDict()
        self.dropped = 0  # spans dropped because the inbox was full
        self.dropped_tokens = 0

    @property
    def tokens(self) -> int:
        return self._tokens

    def put(self, span: VerifiedSpan) -> bool:
        """Queues ``span``; False (and counted in ``dropped``) when it does not fit. Never blocks."""
        n = span.n_tokens
        with self._lock:
            if self._tokens + n > self.max_tokens:
                self.dropped += 1
                self.dropped_tokens += n
                self._gap_rids[span.rid] = None
                self._gap_rids.move_to_end(span.rid)
                if len(self._gap_rids) > self._MAX_GAP_RIDS:
                    self._gap_rids.popitem(last=False)
                return False
            if span.rid in self._gap_rids:
                del self._gap_rids[span.rid]
                span.after_gap = True
            self._spans.append(span)
            self._tokens += n
            return True

    def drain(self) -> list[VerifiedSpan]:
        """Every queued span, in arrival order; empties the inbox."""
        with self._lock:
            spans, self._spans, self._tokens = self._spans, [], 0
        return spans
