"""turbo.spec.replay: verified spans become contiguous per-request sequences, sampled as RecordBatch windows."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from turbo.spec.eagle3 import Eagle3Config, Eagle3Head
from turbo.spec.eagle3_train import Eagle3Trainer, TTTConfig
from turbo.spec.replay import AUX_DTYPE, PAD_LOGPROB, ReplayBuffer, ReplayConfig, SpanInbox, VerifiedSpan

AUX = 12  # feature width A of these tests
K = 4


def make_sequence(n: int, seed: int, aux: int = AUX, k: int = K) -> dict[str, torch.Tensor]:
    """One request's n positions: distinct token ids (position-identifying), features, top-k."""
    g = torch.Generator().manual_seed(seed)
    return {
        "token_ids": 1000 * (seed + 1) + torch.arange(n),  # (n,) tells where every position came from
        "aux_hidden": torch.randn(n, aux, generator=g),  # (n, A)
        "topk_ids": torch.randint(0, 100, (n, k), generator=g),  # (n, k)
        "topk_logprobs": torch.randn(n, k, generator=g).log_softmax(-1).sort(-1, descending=True).values,
    }


def spans_of(rid: str, seq: dict[str, torch.Tensor], sizes: list[int]) -> list[VerifiedSpan]:
    """``seq`` cut into consecutive spans of ``sizes`` positions (a span of n = n_accepted_drafts + 1)."""
    assert sum(sizes) == seq["token_ids"].shape[0], f"{sizes=} do not cover {seq['token_ids'].shape[0]} positions"
    out, p = [], 0
    for n in sizes:
        out.append(VerifiedSpan(rid=rid, n_accepted_drafts=n - 1, **{k: v[p : p + n] for k, v in seq.items()}))
        p += n
    return out


def sizes_for(n: int, seed: int) -> list[int]:
    """Random span sizes 1..5 covering n positions."""
    g = torch.Generator().manual_seed(seed)
    sizes = []
    while sum(sizes) < n:
        sizes.append(min(int(torch.randint(1, 6, (1,), generator=g)), n - sum(sizes)))
    return sizes


def test_a_span_whose_shapes_disagree_is_rejected_at_construction():
    """n = n_accepted_drafts + 1 positions, aux and top-k row-aligned, or ValueError."""
    seq = make_sequence(3, seed=0)
    with pytest.raises(ValueError, match="n_accepted_drafts"):
        VerifiedSpan(rid="r", n_accepted_drafts=1, **seq)
    bad = dict(seq, aux_hidden=seq["aux_hidden"][:2])
    with pytest.raises(ValueError, match="aux_hidden"):
        VerifiedSpan(rid="r", n_accepted_drafts=2, **bad)
    span = VerifiedSpan(rid="r", n_accepted_drafts=2, **seq)
    assert span.n_tokens == 3, f"{span.n_tokens=}"


def test_config_errors_say_the_fix():
    with pytest.raises(AssertionError, match="raise capacity_tokens or lower window"):
        ReplayConfig(capacity_tokens=16, window=64)


def test_spans_of_one_request_concatenate_in_arrival_order():
    """Interleaved spans of two requests: each request's positions come back in its own order."""
    buf = ReplayBuffer(ReplayConfig(capacity_tokens=1000, window=8, topk=K))
    a, b = make_sequence(23, seed=1), make_sequence(17, seed=2)
    spans_a, spans_b = spans_of("a", a, sizes_for(23, 1)), spans_of("b", b, sizes_for(17, 2))
    for i in range(max(len(spans_a), len(spans_b))):
        for spans in (spans_a, spans_b):
            if i < len(spans):
                buf.add(spans[i])
    tokens_a, aux_a = buf.sequence("a")
    tokens_b, _ = buf.sequence("b")
    assert torch.equal(tokens_a, a["token_ids"]) and torch.equal(tokens_b, b["token_ids"]), (
        f"{tokens_a.tolist()=} {tokens_b.tolist()=}")
    assert torch.equal(aux_a, a["aux_hidden"].to(AUX_DTYPE)), "features are kept position-aligned, in bf16"
    assert (buf.tokens, buf.n_sequences) == (40, 2), f"{buf.tokens=} {buf.n_sequences=}"


def test_aux_features_are_stored_in_bf16():
    """Half the memory of fp32; bf16 is what SGLang's bf16 targets capture anyway."""
    buf = ReplayBuffer(ReplayConfig(capacity_tokens=100, window=4, topk=K))
    buf.add(spans_of("a", make_sequence(4, seed=0), [4])[0])
    _, aux = buf.sequence("a")
    assert aux.dtype == torch.bfloat16, f"{aux.dtype=}"


def test_a_sampled_window_is_a_slice_of_the_concatenated_sequence():
    """Every row equals positions s .. s+window-1 of one request: tokens, features, top-k, all real."""
    window = 10
    buf = ReplayBuffer(ReplayConfig(capacity_tokens=1000, window=window, topk=K))
    seqs = {"a": make_sequence(40, seed=1), "b": make_sequence(25, seed=2)}
    for rid, seq in seqs.items():
        for span in spans_of(rid, seq, sizes_for(seq["token_ids"].shape[0], seed=len(rid))):
            buf.add(span)
    batch = buf.sample(16, torch.Generator().manual_seed(0))
    assert batch.input_ids.shape == (16, window) and batch.aux_hidden.dtype == torch.float32, (
        f"{batch.input_ids.shape=} {batch.aux_hidden.dtype=}")
    for row in range(16):
        first = int(batch.input_ids[row, 0])
        seq = seqs["a"] if first < 3000 else seqs["b"]  # ids 2000.. and 3000..
        s = first - int(seq["token_ids"][0])
        want = slice(s, s + window)
        assert torch.equal(batch.input_ids[row], seq["token_ids"][want]), f"row {row}: {batch.input_ids[row]}"
        assert torch.equal(batch.aux_hidden[row], seq["aux_hidden"][want].to(AUX_DTYPE).float()), f"row {row}"
        assert torch.equal(batch.target_topk_ids[row], seq["topk_ids"][want]), f"row {row}"
        assert torch.equal(batch.target_topk_logprobs[row], seq["topk_logprobs"][want]), f"row {row}"
    assert batch.loss_mask.all(), f"windows inside long sequences have no padding: {batch.loss_mask}"


def test_a_sequence_shorter_than_the_window_is_right_padded_with_loss_mask_false():
    buf = ReplayBuffer(ReplayConfig(capacity_tokens=1000, window=8, topk=K))
    seq = make_sequence(5, seed=3)
    for span in spans_of("short", seq, [2, 3]):
        buf.add(span)
    batch = buf.sample(2, torch.Generator().manual_seed(0))
    want_mask = torch.tensor([True] * 5 + [False] * 3)
    assert torch.equal(batch.loss_mask[0], want_mask), f"{batch.loss_mask[0]=}"
    assert torch.equal(batch.input_ids[0, :5], seq["token_ids"]), f"{batch.input_ids[0]=}"
    assert (batch.input_ids[0, 5:] == 0).all() and (batch.aux_hidden[0, 5:] == 0).all(), "padding is token 0, zero aux"


def test_padded_rows_train_to_a_finite_loss(one_thread):
    """Padding and padded top-k columns (zero probability) must not put NaN into the KL."""
    cfg = Eagle3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=16, aux_layer_ids=(0, 1, 2), target_num_layers=4)
    buf = ReplayBuffer(ReplayConfig(capacity_tokens=1000, window=12, topk=K))
    seq = make_sequence(6, seed=4, aux=3 * 32, k=2)  # fewer columns than topk: padded with PAD_LOGPROB
    seq["token_ids"] %= 64
    seq["topk_ids"] %= 64
    seq["topk_logprobs"][:, 1] = float("-inf")  # a masked-out vocabulary entry, as a server may report
    for span in spans_of("a", seq, [3, 3]):
        buf.add(span)
    batch = buf.sample(2, torch.Generator().manual_seed(0))
    assert (batch.target_topk_logprobs[0, :6, 2:] == PAD_LOGPROB).all(), f"{batch.target_topk_logprobs[0]}"
    torch.manual_seed(0)
    metrics = Eagle3Trainer(Eagle3Head(cfg), TTTConfig(n_steps=2, warmup_steps=1)).step(batch)
    assert torch.isfinite(torch.tensor(metrics["loss"])), f"{metrics=}"


def test_sample_is_none_until_a_sequence_has_two_positions():
    """A row needs a token and its successor; single positions of different requests cannot be joined."""
    buf = ReplayBuffer(ReplayConfig(capacity_tokens=100, window=4, topk=K))
    assert buf.sample(4) is None, "empty buffer"
    for i in range(3):
        buf.add(spans_of(f"r{i}", make_sequence(1, seed=i), [1])[0])
    assert buf.sample(4) is None, f"{buf.n_sequences} one-position sequences"
    buf.add(spans_of("r0", make_sequence(1, seed=9), [1])[0])
    assert buf.sample(4) is not None, "r0 now has two positions"


def test_sampling_weights_sequences_by_length():
    """Rows come from each sequence in proportion to its length (every position about equally likely)."""
    buf = ReplayBuffer(ReplayConfig(capacity_tokens=1000, window=10, topk=K))
    buf.add(spans_of("long", make_sequence(300, seed=0), [300])[0])  # token ids 1000..
    buf.add(spans_of("short", make_sequence(100, seed=1), [100])[0])  # token ids 2000..
    batch = buf.sample(4000, torch.Generator().manual_seed(0))
    share_long = (batch.input_ids[:, 0] < 2000).float().mean().item()
    assert abs(share_long - 0.75) < 0.03, f"{share_long=} (expected 300 / 400)"
    starts = batch.input_ids[batch.input_ids[:, 0] < 2000, 0] - 1000
    assert starts.min() == 0 and starts.max() == 290, f"starts span 0 .. len - window: {starts.min()}..{starts.max()}"


def test_eviction_drops_the_oldest_positions_first_and_keeps_tokens_within_capacity():
    """Over capacity, the front of the first-arrived sequence goes first; emptied sequences disappear."""
    buf = ReplayBuffer(ReplayConfig(capacity_tokens=20, window=4, topk=K))
    first, second, third = make_sequence(12, seed=0), make_sequence(8, seed=1), make_sequence(6, seed=2)
    for span in spans_of("first", first, [4, 4, 4]) + spans_of("second", second, [4, 4]):
        buf.add(span)
        assert buf.tokens <= 20, f"{buf.tokens=} after adding a span"
    buf.add(spans_of("first", make_sequence(3, seed=5), [3])[0])  # the oldest request keeps growing
    tokens, _ = buf.sequence("first")
    assert tokens[:9].tolist() == first["token_ids"][3:].tolist(), f"its 3 oldest positions were dropped: {tokens}"
    for span in spans_of("third", third, [3, 3]):
        buf.add(span)
    tokens, _ = buf.sequence("first")
    assert buf.tokens == 20 and tokens.shape[0] == 6, f"{buf.tokens=} first has {tokens.shape[0]} left"
    buf.add(spans_of("fourth", make_sequence(10, seed=3), [10])[0])
    with pytest.raises(KeyError):
        buf.sequence("first")
    assert (buf.tokens, buf.n_sequences) == (20, 3), f"first evicted whole: {buf.tokens=} {buf.n_sequences=}"
    assert buf.sequence("second")[0].tolist() == second["token_ids"][4:].tolist(), "second lost its front next"


def test_a_span_after_a_gap_starts_a_new_sequence():
    """Positions around a lost span are not consecutive: they must never share a training window."""
    buf = ReplayBuffer(ReplayConfig(capacity_tokens=100, window=4, topk=K))
    seq = make_sequence(6, seed=0)
    a, _lost, c = spans_of("r", seq, [2, 2, 2])
    buf.add(a)
    c.after_gap = True
    buf.add(c)
    assert buf.n_sequences == 2 and buf.sequence("r")[0].tolist() == seq["token_ids"][4:].tolist(), (
        f"{buf.n_sequences=} {buf.sequence('r')[0]=}")


def test_the_inbox_drops_instead_of_blocking_when_full():
    inbox = SpanInbox(max_tokens=10)
    spans = spans_of("r", make_sequence(16, seed=0), [4, 4, 4, 4])
    t0 = time.monotonic()
    accepted = [inbox.put(s) for s in spans]
    elapsed = time.monotonic() - t0
    assert accepted == [True, True, False, False] and inbox.dropped == 2, f"{accepted=} {inbox.dropped=}"
    assert elapsed < 0.5, f"put took {elapsed:.3f}s: it must never wait for room"
    drained = inbox.drain()
    assert [id(s) for s in drained] == [id(s) for s in spans[:2]] and inbox.drain() == [] and inbox.tokens == 0, (
        f"{len(drained)=} {inbox.tokens=}")


def test_the_inbox_marks_the_span_after_a_drop_as_after_gap():
    inbox = SpanInbox(max_tokens=4)
    s0, s1, s2 = spans_of("r", make_sequence(12, seed=0), [4, 4, 4])
    assert inbox.put(s0) and not inbox.put(s1), "the second span does not fit"
    inbox.drain()
    assert inbox.put(s2) and s2.after_gap and not s0.after_gap, f"{s0.after_gap=} {s2.after_gap=}"


def test_the_inbox_hands_over_across_threads_without_loss_or_reordering():
    inbox = SpanInbox(max_tokens=1_000_000)
    seq = make_sequence(2000, seed=0, aux=2)
    spans = spans_of("r", seq, sizes_for(2000, seed=0))
    got: list[VerifiedSpan] = []
    done = threading.Event()

    def consume():
        while not done.is_set() or inbox.tokens:
            got.extend(inbox.drain())
            time.sleep(0.0005)

    consumer = threading.Thread(target=consume)
    consumer.start()
    for s in spans:
        inbox.put(s)
    done.set()
    consumer.join(10)
    got.extend(inbox.drain())
    assert [id(s) for s in got] == [id(s) for s in spans], f"{len(got)=} of {len(spans)}, order kept"
