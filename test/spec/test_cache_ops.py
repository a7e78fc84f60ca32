"""turbo.spec.cache_ops: the KV-slot bookkeeping of a speculative round.

Each vectorized op must equal its brute-force ``_ref`` on random batches, and the edge cases of a
real round must hold: empty ranges, requests that accepted nothing or everything, -1 padding in
``accept_index``, accept lengths capped below the tree depth.
"""

from __future__ import annotations

import random

import pytest
import torch

from turbo.spec import cache_ops as C
from turbo.spec import tree_ops as T

pytestmark = pytest.mark.usefixtures("one_thread")


POOL_ROWS, ROW_LEN, N_SLOTS = 12, 64, 5000



def table(seed: int) -> torch.Tensor:
    """A req_to_token table (int32, as SGLang's ReqToTokenPool) of distinct random slots."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(N_SLOTS, generator=g)[: POOL_ROWS * ROW_LEN].view(POOL_ROWS, ROW_LEN).to(torch.int32)


def requests(rng: random.Random, bs: int):
    return torch.tensor(rng.sample(range(POOL_ROWS), bs), dtype=torch.int64)


BATCH_SIZES = [1, 2, 5, 12]


# ---------------------------------------------------------------------------------------------
# assign_req_to_token_pool


@pytest.mark.parametrize("bs", BATCH_SIZES)  # row writes up to ROW_WRITE_MAX_BS, the batched path above it
def test_assign_req_to_token_pool_writes_each_requests_new_slots_into_its_row(bs):
    assert max(BATCH_SIZES) > C.ROW_WRITE_MAX_BS >= min(BATCH_SIZES)
    rng = random.Random(bs)
    for trial in range(4):
        rpi = requests(rng, bs)
        start = torch.tensor([rng.randrange(0, 40) for _ in range(bs)])
        end = start + torch.tensor([0 if trial == 0 and i == 0 else rng.randrange(0, 9) for i in range(bs)])
        new_slots = torch.randint(0, N_SLOTS, (int((end - start).sum()),))
        got, ref = table(trial), table(trial)
        C.assign_req_to_token_pool(rpi, got, start, end, new_slots, bs)
        C.assign_req_to_token_pool_ref(rpi, ref, start, end, new_slots, bs)
        assert torch.equal(got, ref) and got.dtype == torch.int32
        # the spec, written out
        off = 0
        for i in range(bs):
            s, e = int(start[i]), int(end[i])
            assert got[rpi[i], s:e].tolist() == new_slots[off : off + e - s].tolist()
            off += e - s


@pytest.mark.parametrize("path", ["row writes", "batched"])
def test_assign_req_to_token_pool_touches_nothing_else_and_ignores_rows_past_batch_size(path, monkeypatch):
    if path == "batched":
        monkeypatch.setattr(C, "ROW_WRITE_MAX_BS", 0)
    before = table(0)
    got = before.clone()
    rpi, start, end = torch.tensor([3, 7, 9]), torch.tensor([5, 0, 2]), torch.tensor([8, 2, 6])
    C.assign_req_to_token_pool(rpi, got, start, end, torch.arange(N_SLOTS, N_SLOTS + 5), 2)  # third request not in the batch
    changed = (got != before).nonzero().tolist()
    assert sorted(changed) == [[3, 5], [3, 6], [3, 7], [7, 0], [7, 1]]


# ---------------------------------------------------------------------------------------------
# assign_draft_cache_locs_contiguous


@pytest.mark.parametrize("bs", BATCH_SIZES)
@pytest.mark.parametrize("topk,num_cols", [(1, 1), (1, 3), (1, 8), (2, 3), (4, 5)])
def test_draft_cache_locs_are_the_slots_after_each_prefix(bs, topk, num_cols):
    rng = random.Random(bs * 7 + topk)
    r2t = table(bs)
    rpi = requests(rng, bs)
    seq = torch.tensor([rng.randrange(0, ROW_LEN - topk * num_cols) for _ in range(bs)])
    got = torch.full((bs * topk * num_cols,), -1, dtype=torch.int64)
    ref = got.clone()
    C.assign_draft_cache_locs_contiguous(rpi, r2t, seq, got, topk, num_cols)
    C.assign_draft_cache_locs_contiguous_ref(rpi, r2t, seq, ref, topk, num_cols)
    assert torch.equal(got, ref)
    w = topk * num_cols
    for i in range(bs):
        assert got[i * w : (i + 1) * w].tolist() == r2t[rpi[i], seq[i] : seq[i] + w].tolist()


def test_draft_cache_locs_honour_num_cols_window_for_the_chain_plan():
    """Chain draft with a planned window: num_cols = num_draft_tokens (> num_steps) slots each."""
    r2t = table(3)
    rpi, seq = torch.tensor([4, 1]), torch.tensor([10, 0])
    out = torch.empty(2 * 6, dtype=torch.int64)
    C.assign_draft_cache_locs_contiguous(rpi, r2t, seq, out, 1, 6)
    assert out.view(2, 6).tolist() == [r2t[4, 10:16].tolist(), r2t[1, 0:6].tolist()]


@pytest.mark.parametrize("topk", [1, 3])
def test_draft_cache_locs_write_positions_and_mrope_when_asked(topk):
    r2t, rpi, seq = table(1), torch.tensor([2, 5, 8]), torch.tensor([4, 9, 0])
    out = torch.empty(3 * topk * 2, dtype=torch.int64)
    positions = torch.full((3 * topk,), -1)
    mrope = torch.full((3, 3 * topk), -1)
    ref_p, ref_m = positions.clone(), mrope.clone()
    C.assign_draft_cache_locs_contiguous(rpi, r2t, seq, out, topk, 2, positions=positions, mrope=mrope)
    C.assign_draft_cache_locs_contiguous_ref(rpi, r2t, seq, out.clone(), topk, 2, positions=ref_p, mrope=ref_m)
    assert positions.tolist() == seq.repeat_interleave(topk).tolist() == ref_p.tolist()
    assert mrope.tolist() == [seq.repeat_interleave(topk).tolist()] * 3 == ref_m.tolist()


# ---------------------------------------------------------------------------------------------
# assign_extend_cache_locs (the platform's verify-slots function)


@pytest.mark.parametrize("bs", BATCH_SIZES)
@pytest.mark.parametrize("draft_token_num", [1, 4, 8])
def test_verify_cache_locs_gather_each_window_into_a_new_int64_tensor(bs, draft_token_num):
    rng = random.Random(bs + draft_token_num)
    r2t = table(draft_token_num)
    rpi = requests(rng, bs)
    start = torch.tensor([rng.randrange(0, ROW_LEN - draft_token_num) for _ in range(bs)])
    kwargs = dict(req_pool_indices=rpi, req_to_token=r2t, start_offset=start, end_offset=start + draft_token_num,
                  batch_size=bs, draft_token_num=draft_token_num, device="cpu")  # fmt: skip
    got = C.assign_extend_cache_locs(**kwargs)
    assert got.dtype == torch.int64 and got.shape == (bs * draft_token_num,)
    assert torch.equal(got, C.assign_extend_cache_locs_ref(**kwargs))
    expected = torch.stack([r2t[rpi[i], start[i] : start[i] + draft_token_num] for i in range(bs)]).flatten()
    assert got.tolist() == expected.tolist()


def test_verify_cache_locs_pack_ragged_ranges():
    r2t = table(2)
    rpi, start, end = torch.tensor([1, 2, 3]), torch.tensor([0, 5, 9]), torch.tensor([3, 5, 10])
    got = C.assign_extend_cache_locs(rpi, r2t, start, end, 3, 4, "cpu")
    assert got[:4].tolist() == r2t[1, 0:3].tolist() + r2t[3, 9:10].tolist()
    assert torch.equal(got, C.assign_extend_cache_locs_ref(rpi, r2t, start, end, 3, 4, "cpu"))


# ---------------------------------------------------------------------------------------------
# fill_bonus_tokens


@pytest.mark.parametrize("bs", BATCH_SIZES)
@pytest.mark.parametrize("stride", [1, 2, 4, 7])
def test_bonus_token_is_each_requests_last_accepted_token(bs, stride):
    g = torch.Generator().manual_seed(bs * stride)
    accept_tokens = torch.randint(0, 1000, (bs, stride), generator=g, dtype=torch.int32)
    accept_lens = torch.randint(1, stride + 1, (bs,), generator=g, dtype=torch.int32)
    accept_lens[0] = stride  # all accepted
    accept_lens[-1] = 1  # only the bonus
    got = torch.full((bs,), -1, dtype=torch.int32)
    ref = got.clone()
    C.fill_bonus_tokens(accept_tokens, accept_lens, got, stride, bs)
    C.fill_bonus_tokens_ref(accept_tokens, accept_lens, ref, stride, bs)
    assert torch.equal(got, ref) and got.dtype == torch.int32
    assert got.tolist() == [int(accept_tokens[i, accept_lens[i] - 1]) for i in range(bs)]


def test_bonus_token_follows_an_accept_length_capped_below_the_tree_depth():
    """A request stopped early (e.g. max_new_tokens reached inside an accepted run) has a smaller
    accept length; its bonus is the token at that length, whatever follows in the row."""
    accept_tokens = torch.tensor([[5, 6, 7, 8], [1, 2, 3, 4]], dtype=torch.int32)
    bonus = torch.empty(2, dtype=torch.int32)
    C.fill_bonus_tokens(accept_tokens, torch.tensor([2, 4], dtype=torch.int32), bonus, 4, 2)
    assert bonus.tolist() == [6, 4]


# ---------------------------------------------------------------------------------------------
# fill_front_out_cache_loc / fill_accept_out_cache_loc / move_kv_rows


@pytest.mark.parametrize("bs", BATCH_SIZES)
@pytest.mark.parametrize("width", [1, 3, 8])
def test_front_slots_are_the_first_num_front_of_each_window(bs, width):
    g = torch.Generator().manual_seed(bs + width)
    out_cache_loc = torch.randperm(N_SLOTS, generator=g)[: bs * width]
    num_front = torch.randint(1, width + 1, (bs,), generator=g)
    num_front[0] = width
    got = torch.zeros(bs * width, dtype=torch.int64)
    ref = got.clone()
    C.fill_front_out_cache_loc(num_front, out_cache_loc, got)
    C.fill_front_out_cache_loc_ref(num_front, out_cache_loc, ref)
    assert torch.equal(got, ref)
    window = out_cache_loc.view(bs, width)
    assert got[: int(num_front.sum())].tolist() == sum((window[i, : num_front[i]].tolist() for i in range(bs)), [])
    assert (got[int(num_front.sum()) :] == 0).all()  # the padded tail is left as it was


def accept_index_batch(rng: random.Random, bs: int, depth: int, n: int, cap_some: bool):
    """Rows as a tree verifier writes them: root index, accepted node indices (increasing, inside
    the request's window of n), then -1 padding. With ``cap_some`` a few rows are cut short."""
    rows = []
    for b in range(bs):
        accepted = sorted(rng.sample(range(1, n), rng.randrange(0, min(depth, n))))
        if cap_some and accepted and rng.random() < 0.5:
            accepted = accepted[: rng.randrange(len(accepted))]
        row = [b * n] + [b * n + a for a in accepted]
        rows.append(row + [-1] * (depth - len(row)))
    return torch.tensor(rows, dtype=torch.int32)


@pytest.mark.parametrize("bs", BATCH_SIZES)
@pytest.mark.parametrize("depth,n", [(1, 1), (2, 4), (4, 8), (6, 6)])
@pytest.mark.parametrize("cap_some", [False, True])
def test_accept_slots_pack_the_slots_of_accepted_nodes_skipping_padding(bs, depth, n, cap_some):
    rng = random.Random(bs * 13 + depth)
    accept_index = accept_index_batch(rng, bs, depth, n, cap_some)
    out_cache_loc = torch.randperm(N_SLOTS)[: bs * n]
    size = bs * depth
    got = torch.zeros(size, dtype=torch.int64)
    ref = got.clone()
    C.fill_accept_out_cache_loc(accept_index, out_cache_loc, got, size)
    C.fill_accept_out_cache_loc_ref(accept_index, out_cache_loc, ref, size)
    assert torch.equal(got, ref)
    kept = accept_index.flatten()
    kept = kept[kept >= 0]
    assert got[: kept.numel()].tolist() == out_cache_loc[kept.long()].tolist()


def test_accept_slots_all_rejected_and_all_accepted():
    out_cache_loc = torch.arange(100, 112)
    none_accepted = torch.tensor([[0, -1, -1], [4, -1, -1], [8, -1, -1]], dtype=torch.int32)
    all_accepted = torch.tensor([[0, 1, 3], [4, 5, 6], [8, 10, 11]], dtype=torch.int32)
    got = torch.zeros(9, dtype=torch.int64)
    C.fill_accept_out_cache_loc(none_accepted, out_cache_loc, got, 9)
    assert got.tolist() == [100, 104, 108] + [0] * 6
    C.fill_accept_out_cache_loc(all_accepted, out_cache_loc, got, 9)
    assert got.tolist() == [100, 101, 103, 104, 105, 106, 108, 110, 111]


def test_move_kv_rows_reads_every_source_before_writing():
    g = torch.Generator().manual_seed(0)
    k = [torch.randn(20, 2, 3, generator=g) for _ in range(3)]
    v = [torch.randn(20, 2, 3, generator=g) for _ in range(3)]
    tgt = torch.tensor([4, 5, 6, 0])
    src = torch.tensor([5, 7, 4, 0])  # 4 <- 5 while 5 <- 7 and 6 <- 4: a rotation; (0, 0) is padding
    k_ref, v_ref = [x.clone() for x in k], [x.clone() for x in v]
    before = k[1].clone()
    C.move_kv_rows(k, v, tgt, src)
    C.move_kv_rows_ref(k_ref, v_ref, tgt, src)
    assert all(torch.equal(a, b) for a, b in zip(k + v, k_ref + v_ref))
    assert torch.equal(k[1][4], before[5]) and torch.equal(k[1][6], before[4])


def test_a_verified_tree_path_ends_up_at_the_front_of_each_window():
    """End to end, as ``move_accept_tokens_to_target_kvcache`` chains them: greedy verify ->
    front slots (targets) + accepted-node slots (sources) -> KV move. Afterwards slot j of each
    window holds the KV of the j-th node on the accepted path."""
    bs, n, depth = 3, 6, 4
    parents = [[-1, 0, 0, 1, 2, 3], [-1, 0, 1, 1, 0, 3], [-1, 0, 0, 0, 1, 2]]
    cand = torch.tensor([[0, 7, 8, 9, 10, 11], [0, 7, 8, 9, 10, 11], [0, 7, 8, 9, 10, 11]])
    links = [[], []]
    for par in parents:
        nxt, sib = [-1] * n, [-1] * n
        for i in range(n - 1, 0, -1):  # first child = smallest index, as build_tree links them
            if nxt[par[i]] != -1:
                sib[i] = nxt[par[i]]
            nxt[par[i]] = i
        links[0].append(nxt)
        links[1].append(sib)
    nxt, sib = torch.tensor(links[0]), torch.tensor(links[1])
    # request 0 accepts node 2 then 4 (cap: 3 drafts max), request 1 node 1, 3, 5; request 2 nothing
    target = torch.tensor([[8, 0, 10, 0, 0, 0], [7, 9, 0, 11, 0, 0], [1, 0, 0, 0, 0, 0]])
    predicts = torch.zeros(bs * n, dtype=torch.int32)
    accept_index = torch.full((bs, depth), -1, dtype=torch.int32)
    num = torch.empty(bs, dtype=torch.int32)
    T.verify_tree_greedy(predicts, accept_index, num, cand, torch.arange(bs * n).view(bs, n), nxt, sib, target)
    assert num.tolist() == [2, 3, 0]

    out_cache_loc = torch.arange(1000, 1000 + bs * n)
    k = [torch.arange(2000, dtype=torch.float32)[:, None].repeat(1, 2)]  # a slot's KV = its own id
    v = [x.clone() for x in k]
    size = bs * depth
    tgt, src = torch.zeros(size, dtype=torch.int64), torch.zeros(size, dtype=torch.int64)
    C.fill_front_out_cache_loc(num + 1, out_cache_loc, tgt)
    C.fill_accept_out_cache_loc(accept_index, out_cache_loc, src, size)
    C.move_kv_rows(k, v, tgt, src)
    for b in range(bs):
        path = [a for a in accept_index[b].tolist() if a >= 0]
        window = out_cache_loc.view(bs, n)[b]
        assert k[0][window[: len(path)], 0].tolist() == [float(out_cache_loc[a]) for a in path]
