"""turbo.spec.tree_ops: draft-tree build, greedy and sampling verification, renorms, NGRAM links.

Each vectorized op must equal its brute-force ``_ref`` on random trees, and the references must
say what upstream's kernels define (hand-worked examples below). Sampling verification must also
emit tokens that follow the target distribution.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from turbo.spec import tree_ops as T

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# helpers


def eagle_draft(seed: int, bs: int, topk: int, steps: int, num_draft: int):
    """(parent_list, top_scores_index) as EAGLE's draft loop and ``organize_draft_results`` make them.

    Step 0 keeps the root's topk children (score indices 0..topk-1, parents_list [-1, 0..topk-1]);
    step i >= 1 expands each of the topk beams by topk children (score indices
    topk + topk^2*(i-1) + beam*topk + k) and keeps the best topk as the next beams.
    """
    g = torch.Generator().manual_seed(seed)
    scores = [torch.rand(bs, topk, generator=g)]
    parents = [torch.arange(-1, topk).expand(bs, -1)]
    beams = scores[0]
    for i in range(1, steps):
        expand = beams[:, :, None] * torch.rand(bs, topk, topk, generator=g)
        scores.append(expand.flatten(1))
        beams, cs_index = expand.flatten(1).topk(topk, dim=-1)
        parents.append(cs_index + topk * topk * (i - 1) + topk)
    flat = torch.cat(scores, 1)
    top = flat.topk(num_draft - 1, dim=-1).indices.sort().values
    parent_list = torch.cat(parents[:-1], 1) if steps > 1 else torch.empty(bs, 0, dtype=torch.long)
    return parent_list, top


def mask_buffer(mode: int, seq_lens: torch.Tensor, n: int, dtype=torch.bool):
    """The tree_mask buffer as ``eagle_utils.build_tree_kernel_efficient`` prepares it."""
    bs = seq_lens.numel()
    if mode == T.FULL_MASK:
        return torch.ones(int(seq_lens.sum()) * n + n * n * bs, dtype=dtype)
    if mode == T.QLEN_ONLY:
        return torch.ones(n * n * bs, dtype=dtype)
    packed = {1: torch.uint8, 2: torch.uint16, 4: torch.uint32}[T.packed_mask_bytes(n)]
    return torch.zeros(n * bs, dtype=packed)


def run_build(fn, parent_list, top, seq_lens, topk, steps, n, mode, dtype=torch.bool, garbage=False):
    bs = seq_lens.numel()
    mask = mask_buffer(mode, seq_lens, n, dtype)
    if garbage:  # bytes the op must overwrite (or, for packed bytes past the first, OR into)
        raw = mask.view(-1).view(torch.uint8)
        raw.copy_(torch.randint(0, 256 if mode == T.QLEN_ONLY_BITPACKING else 2, raw.shape, generator=torch.Generator().manual_seed(9)))
    positions = torch.full((bs * n,), -7, dtype=torch.long)
    links = torch.full((3, bs, n), -1, dtype=torch.long)
    fn(parent_list, top, seq_lens, mask, positions, links[0], links[1], links[2], topk, steps, n, mode)
    return mask, positions, links


def links_from_parents(parents: list[int], rng: random.Random | None = None):
    """next_token / next_sibling of one tree given parent[i] (parent[0] = -1); sibling order
    ascending, or shuffled with ``rng`` (the verifiers must follow the links, not index order)."""
    n = len(parents)
    nxt, sib = [-1] * n, [-1] * n
    for p in range(n):
        kids = [i for i in range(1, n) if parents[i] == p]
        if rng is not None:
            rng.shuffle(kids)
        if kids:
            nxt[p] = kids[0]
            for a, b in zip(kids, kids[1:]):
                sib[a] = b
    return nxt, sib


def random_tree(rng: random.Random, n: int, chain: bool = False) -> list[int]:
    return [-1] + [i - 1 if chain else rng.randrange(i) for i in range(1, n)]


def tree_batch(rng: random.Random, bs: int, n: int, vocab: int, shuffle: bool, chain: bool = False):
    parents, nxt, sib = [], [], []
    for _ in range(bs):
        par = random_tree(rng, n, chain)
        a, b = links_from_parents(par, rng if shuffle else None)
        parents.append(par)
        nxt.append(a)
        sib.append(b)
    candidates = torch.tensor([[rng.randrange(vocab) for _ in range(n)] for _ in range(bs)])
    retrieve_index = torch.arange(bs * n).view(bs, n)
    return parents, candidates, retrieve_index, torch.tensor(nxt), torch.tensor(sib)


def verify_buffers(bs: int, n: int, depth_cap: int):
    predicts = torch.full((bs * n,), -5, dtype=torch.int32)
    accept_index = torch.full((bs, depth_cap), -1, dtype=torch.int32)
    accept_num = torch.full((bs,), 99, dtype=torch.int32)
    return predicts, accept_index, accept_num


# ---------------------------------------------------------------------------------------------
# build_tree_kernel_efficient


# Hand-worked: topk=2, 3 steps, 5 verify tokens. parent_list = [-1, 0, 1, 2, 4]: the root's
# children have score indices 0, 1; step 1 kept beams with score indices 2 and 4 (children of
# node-score 0 and 1). Request 0 selects scores [0, 1, 2, 6]: nodes 1, 2 hang off the root,
# node 3 (score 2, group 1 -> parent score 0) under node 1, node 4 (score 6, group 3 ->
# parent score 2) under node 3. Request 1 selects [0, 1, 3, 4]: node 3 under node 1, node 4
# (score 4, group 2 -> parent score 1) under node 2.
HAND_PARENT_LIST = torch.tensor([[-1, 0, 1, 2, 4], [-1, 0, 1, 2, 4]])
HAND_TOP = torch.tensor([[0, 1, 2, 6], [0, 1, 3, 4]])
HAND_SEQ = torch.tensor([10, 3])
HAND_VISIBLE = [
    torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 1, 0, 1, 0], [1, 1, 0, 1, 1]]),
    torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 1, 0, 1, 0], [1, 0, 1, 0, 1]]),
]


@pytest.mark.parametrize("fn", [T.build_tree_kernel_efficient, T.build_tree_kernel_efficient_ref])
def test_build_tree_hand_worked_example_gives_upstreams_links_and_positions(fn):
    _, positions, links = run_build(fn, HAND_PARENT_LIST, HAND_TOP, HAND_SEQ, 2, 3, 5, T.QLEN_ONLY)
    assert positions.tolist() == [10, 11, 11, 12, 13, 3, 4, 4, 5, 5]
    assert links[0].tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]  # retrieve_index = b * n + i
    assert links[1].tolist() == [[1, 3, -1, 4, -1], [1, 3, 4, -1, -1]]  # first child
    assert links[2].tolist() == [[-1, 2, -1, -1, -1], [-1, 2, -1, -1, -1]]  # next sibling


@pytest.mark.parametrize("fn", [T.build_tree_kernel_efficient, T.build_tree_kernel_efficient_ref])
def test_build_tree_hand_worked_masks_in_every_layout(fn):
    full, _, _ = run_build(fn, HAND_PARENT_LIST, HAND_TOP, HAND_SEQ, 2, 3, 5, T.FULL_MASK)
    expected_full = torch.cat(
        [torch.cat([torch.ones(5, s, dtype=torch.long), v], 1).flatten() for s, v in zip([10, 3], HAND_VISIBLE)]
    )
    assert full.long().tolist() == expected_full.tolist()  # n x (seq_len + n) per request, prefix columns True

    qlen, _, _ = run_build(fn, HAND_PARENT_LIST, HAND_TOP, HAND_SEQ, 2, 3, 5, T.QLEN_ONLY)
    assert qlen.long().tolist() == torch.stack(HAND_VISIBLE).flatten().tolist()  # n x n per request

    packed, _, _ = run_build(fn, HAND_PARENT_LIST, HAND_TOP, HAND_SEQ, 2, 3, 5, T.QLEN_ONLY_BITPACKING)
    assert packed.tolist() == [0b1, 0b11, 0b101, 0b1011, 0b11011, 0b1, 0b11, 0b101, 0b1011, 0b10101]  # bit j = column j


@pytest.mark.parametrize("mode", [T.FULL_MASK, T.QLEN_ONLY, T.QLEN_ONLY_BITPACKING])
def test_build_tree_chain_topk1_is_a_causal_chain(mode):
    """topk = 1: node i's parent is node i-1, so positions count up and the mask is lower-triangular."""
    steps, n = 4, 5
    parent_list, top = eagle_draft(0, 2, 1, steps, n)
    assert top.tolist() == [[0, 1, 2, 3]] * 2
    seq = torch.tensor([7, 1])
    mask, positions, links = run_build(T.build_tree_kernel_efficient, parent_list, top, seq, 1, steps, n, mode)
    assert positions.tolist() == [7, 8, 9, 10, 11, 1, 2, 3, 4, 5]
    assert links[1].tolist() == [[1, 2, 3, 4, -1]] * 2
    assert links[2].tolist() == [[-1] * 5] * 2
    tril = torch.ones(n, n).tril().long()
    if mode == T.QLEN_ONLY:
        assert mask.long().view(2, n, n).tolist() == [tril.tolist()] * 2
    if mode == T.QLEN_ONLY_BITPACKING:
        assert mask.tolist() == [(1 << (i + 1)) - 1 for i in range(n)] * 2


@pytest.mark.parametrize("mode", [T.FULL_MASK, T.QLEN_ONLY, T.QLEN_ONLY_BITPACKING])
@pytest.mark.parametrize(
    "bs,topk,steps,num_draft",
    [(2, 1, 1, 1), (1, 1, 1, 2), (1, 1, 3, 4), (3, 1, 5, 6), (1, 2, 1, 3), (2, 2, 3, 5), (4, 4, 3, 8), (3, 3, 4, 12), (2, 4, 5, 20)],
)
def test_build_tree_matches_reference_on_random_eagle_drafts(bs, topk, steps, num_draft, mode):
    for seed in range(2):
        parent_list, top = eagle_draft(seed, bs, topk, steps, num_draft)
        seq = torch.randint(0, 9, (bs,), generator=torch.Generator().manual_seed(seed))
        args = (parent_list, top, seq, topk, steps, num_draft, mode)
        got = run_build(T.build_tree_kernel_efficient, *args, garbage=seed == 1)
        ref = run_build(T.build_tree_kernel_efficient_ref, *args, garbage=seed == 1)
        for a, b in zip(got, ref):
            assert torch.equal(a, b)


def test_build_tree_full_mask_leaves_prefix_columns_to_the_caller():
    """FULL_MASK writes only the n tree columns of each row; a caller that skips the prefix fill
    (``fill_prefix_mask=False``) sees its own bytes there."""
    n, seq = 4, torch.tensor([3, 2])
    parent_list, top = eagle_draft(1, 2, 2, 2, n)
    mask = torch.zeros(int(seq.sum()) * n + n * n * 2, dtype=torch.uint8).fill_(7)
    links = torch.full((3, 2, n), -1)
    T.build_tree_kernel_efficient(parent_list, top, seq, mask, torch.empty(2 * n, dtype=torch.long), *links, 2, 2, n, T.FULL_MASK)
    rows0 = mask[: n * (3 + n)].view(n, 3 + n)
    rows1 = mask[n * (3 + n) :].view(n, 2 + n)
    assert (rows0[:, :3] == 7).all() and (rows1[:, :2] == 7).all()
    assert set(rows0[:, 3:].unique().tolist()) <= {0, 1} and (rows0[:, 3] == 1).all()


def test_build_tree_bitpacking_widths_follow_draft_count():
    assert [T.packed_mask_bytes(n) for n in (2, 8, 9, 16, 17, 32)] == [1, 1, 2, 2, 4, 4]
    with pytest.raises(ValueError):
        T.packed_mask_bytes(33)


def test_build_tree_node_with_unselected_parent_gets_no_link_and_depth_one():
    """Upstream's "invalid eagle tree" case (e.g. NaN scores): the node is skipped when linking,
    and its mask row/position stop at itself (as the XPU Triton twin does)."""
    parent_list = torch.tensor([[-1, 0, 1, 2, 4]])
    orphan = torch.tensor([[0, 1, 8]])  # score 8: parent score 4 (beam of step 1) was not selected
    got = run_build(T.build_tree_kernel_efficient, parent_list, orphan, torch.tensor([5]), 2, 3, 4, T.QLEN_ONLY)
    ref = run_build(T.build_tree_kernel_efficient_ref, parent_list, orphan, torch.tensor([5]), 2, 3, 4, T.QLEN_ONLY)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    mask, positions, links = run_build(T.build_tree_kernel_efficient, parent_list, orphan, torch.tensor([5]), 2, 3, 4, T.QLEN_ONLY)
    assert positions.tolist() == [5, 6, 6, 6]
    assert links[1].tolist() == [[1, -1, -1, -1]] and links[2].tolist() == [[-1, 2, -1, -1]]
    assert mask.view(4, 4)[3].long().tolist() == [1, 0, 0, 1]


# ---------------------------------------------------------------------------------------------
# verify_tree_greedy


def run_greedy(fn, candidates, retrieve_index, nxt, sib, target, depth_cap, topk=-1):
    bs, n = candidates.shape
    predicts, accept_index, accept_num = verify_buffers(bs, n, depth_cap)
    out = fn(predicts, accept_index, accept_num, candidates, retrieve_index, nxt, sib, target, topk=topk)
    assert out[0] is predicts and out[1] is accept_index and out[2] is accept_num
    return predicts, accept_index, accept_num


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("bs,n,depth_cap", [(1, 2, 2), (1, 6, 4), (3, 8, 4), (4, 12, 6), (2, 5, 5), (5, 16, 9)])
def test_verify_greedy_matches_reference_on_random_trees(bs, n, depth_cap, shuffle):
    rng = random.Random(bs * 100 + n)
    for trial in range(3):
        _, cand, ridx, nxt, sib = tree_batch(rng, bs, n, vocab=3, shuffle=shuffle, chain=trial == 0)
        target = torch.randint(0, 3, (bs, n), generator=torch.Generator().manual_seed(trial))
        got = run_greedy(T.verify_tree_greedy, cand, ridx, nxt, sib, target, depth_cap)
        ref = run_greedy(T.verify_tree_greedy_ref, cand, ridx, nxt, sib, target, depth_cap)
        for a, b in zip(got, ref):
            assert torch.equal(a, b)


@pytest.mark.parametrize("bs,n,depth_cap", [(1, 2, 2), (1, 5, 5), (3, 8, 4), (2, 5, 8), (4, 5, 1), (6, 5, 5)])
def test_verify_greedy_of_a_chain_topk1_matches_the_tree_walk(bs, n, depth_cap):
    """topk 1 (upstream's tree_topk of an EAGLE chain) takes the chain path: same writes as the walk,
    including a chain the target agrees with everywhere and depth caps on both sides of n."""
    rng = random.Random(bs * 10 + n + depth_cap)
    for trial in range(12):
        _, cand, ridx, nxt, sib = tree_batch(rng, bs, n, vocab=2 + trial % 3, shuffle=False, chain=True)
        target = torch.randint(0, 2 + trial % 3, (bs, n), generator=torch.Generator().manual_seed(trial))
        if trial % 4 == 0:
            target[:, :-1] = cand[:, 1:]  # every draft agrees
        got = run_greedy(T.verify_tree_greedy, cand, ridx, nxt, sib, target, depth_cap, topk=1)
        ref = run_greedy(T.verify_tree_greedy_ref, cand, ridx, nxt, sib, target, depth_cap)
        for a, b in zip(got, ref):
            assert torch.equal(a, b)


def test_verify_greedy_hand_worked_example():
    """Tree 0 -> {1, 2}, 1 -> {3}; drafts [., 5, 6, 7]; target argmax at nodes [6, 7, 8, 9]:
    the root predicts 6 -> node 2 (node 1 drafted 5) -> node 2 is a leaf, its prediction 8 is the bonus."""
    cand = torch.tensor([[4, 5, 6, 7]])
    nxt, sib = torch.tensor([[1, 3, -1, -1]]), torch.tensor([[-1, 2, -1, -1]])
    target = torch.tensor([[6, 7, 8, 9]])
    predicts, accept_index, num = run_greedy(T.verify_tree_greedy, cand, torch.arange(4).view(1, 4), nxt, sib, target, 3)
    assert accept_index.tolist() == [[0, 2, -1]] and num.tolist() == [1]
    assert predicts.tolist() == [6, -5, 8, -5]  # only accepted-path entries are written


def test_verify_greedy_all_drafts_rejected_emits_only_the_bonus():
    bs, n = 3, 6
    _, cand, ridx, nxt, sib = tree_batch(random.Random(1), bs, n, vocab=4, shuffle=False)
    target = torch.full((bs, n), 9)  # no draft is ever 9
    predicts, accept_index, num = run_greedy(T.verify_tree_greedy, cand, ridx, nxt, sib, target, 4)
    assert num.tolist() == [0] * bs
    assert accept_index[:, 0].tolist() == [0, 6, 12] and (accept_index[:, 1:] == -1).all()
    assert predicts.view(bs, n)[:, 0].tolist() == [9] * bs


def test_verify_greedy_accepts_a_whole_chain_but_stops_at_the_depth_cap():
    """A chain that the target agrees with everywhere: accept_index.shape[1] - 1 drafts are accepted
    (the request's step budget), the bonus is the target's argmax after the last one."""
    n = 6
    cand = torch.tensor([[0, 11, 12, 13, 14, 15]])
    target = torch.tensor([[11, 12, 13, 14, 15, 16]])
    nxt, sib = torch.tensor([[1, 2, 3, 4, 5, -1]]), torch.full((1, n), -1)
    for cap, accepted in [(6, 5), (4, 3), (1, 0)]:
        predicts, accept_index, num = run_greedy(T.verify_tree_greedy, cand, torch.arange(n).view(1, n), nxt, sib, target, cap)
        assert num.tolist() == [accepted]
        assert accept_index[0, : accepted + 1].tolist() == list(range(accepted + 1))
        assert predicts[: accepted + 1].tolist() == target[0, : accepted + 1].tolist()


# ---------------------------------------------------------------------------------------------
# tree_speculative_sampling_target_only


def run_sampling(fn, cand, ridx, nxt, sib, coins, final_coins, target_probs, depth_cap, draft_probs=None, **kw):
    bs, n = cand.shape
    predicts, accept_index, accept_num = verify_buffers(bs, n, depth_cap)
    draft_probs = torch.zeros_like(target_probs) if draft_probs is None else draft_probs.clone()  # upstream passes zeros
    fn(
        predicts=predicts,
        accept_index=accept_index,
        accept_token_num=accept_num,
        candidates=cand,
        retrive_index=ridx,
        retrive_next_token=nxt,
        retrive_next_sibling=sib,
        uniform_samples=coins,
        uniform_samples_for_final_sampling=final_coins,
        target_probs=target_probs,
        draft_probs=draft_probs,
        deterministic=True,
        **kw,
    )
    return predicts, accept_index, accept_num, draft_probs


def random_probs(g, bs, n, vocab, zero_frac=0.3):
    logits = torch.randn(bs, n, vocab, generator=g)
    logits[torch.rand(bs, n, vocab, generator=g) < zero_frac] = -float("inf")
    logits[..., 0] = logits[..., 0].clamp(min=-5)  # at least one token with mass
    return torch.softmax(logits, -1)


@pytest.mark.parametrize("thresholds", [(1.0, 1.0), (0.4, 1.0), (1.0, 0.6)])
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("bs,n,depth_cap,vocab", [(1, 2, 2, 3), (1, 6, 4, 5), (3, 8, 4, 4), (4, 10, 6, 6), (2, 5, 5, 3)])
def test_sampling_verify_matches_reference_on_random_trees(bs, n, depth_cap, vocab, shuffle, thresholds):
    rng = random.Random(bs * 31 + n)
    g = torch.Generator().manual_seed(n)
    for trial in range(3):
        _, cand, ridx, nxt, sib = tree_batch(rng, bs, n, vocab, shuffle, chain=trial == 0)
        probs = random_probs(g, bs, n, vocab)
        coins, final = torch.rand(bs, n, generator=g), torch.rand(bs, generator=g)
        kw = dict(threshold_single=thresholds[0], threshold_acc=thresholds[1])
        if trial == 2:  # non-zero draft_probs: the residual subtracts them, except after a capped run
            kw["draft_probs"] = torch.rand(bs, n, vocab, generator=g) * 0.2
        got = run_sampling(T.tree_speculative_sampling_target_only, cand, ridx, nxt, sib, coins, final, probs, depth_cap, **kw)
        ref = run_sampling(T.tree_speculative_sampling_target_only_ref, cand, ridx, nxt, sib, coins, final, probs, depth_cap, **kw)
        for a, b in zip(got, ref):
            assert torch.equal(a, b)


def test_sampling_verify_zero_coins_accept_every_draft_with_mass_up_to_the_cap():
    """Coin 0 accepts the first child with p > 0; a capped run samples its bonus from the full p
    (there is no draft distribution at the bonus position, whatever draft_probs holds)."""
    cand = torch.tensor([[0, 1, 2, 3]])
    nxt, sib = torch.tensor([[1, 2, 3, -1]]), torch.full((1, 4), -1)
    probs = torch.full((1, 4, 5), 0.2)
    for fn in (T.tree_speculative_sampling_target_only, T.tree_speculative_sampling_target_only_ref):
        predicts, accept_index, num, draft = run_sampling(
            fn, cand, torch.arange(4).view(1, 4), nxt, sib,
            torch.zeros(1, 4), torch.tensor([0.0]), probs, 3, draft_probs=probs,
        )
        assert num.tolist() == [2] and accept_index.tolist() == [[0, 1, 2]]
        assert predicts[:3].tolist() == [1, 2, 0]  # drafts 1, 2 then the bonus: first token of the full p at node 2
        assert torch.equal(draft, probs)  # nothing rejected, nothing written


def test_sampling_verify_never_accepts_a_draft_the_target_gives_no_mass():
    cand = torch.tensor([[0, 3, 4]])
    nxt, sib = torch.tensor([[1, -1, -1]]), torch.tensor([[-1, 2, -1]])
    probs = torch.tensor([[0.5, 0.5, 0.0, 0.0, 0.0]]).expand(3, -1)[None].clone()
    predicts, accept_index, num, draft = run_sampling(
        T.tree_speculative_sampling_target_only, cand, torch.arange(3).view(1, 3), nxt, sib,
        torch.zeros(1, 3), torch.tensor([0.7]), probs, 3,
    )
    assert num.tolist() == [0] and accept_index.tolist() == [[0, -1, -1]]
    assert predicts[0].item() == 1  # resampled from p: 0.7 of the mass lies past token 0


def test_sampling_verify_rejected_drafts_are_removed_from_the_residual():
    """Coin just below 1 rejects every child: their tokens get draft_probs = p and can't be resampled."""
    cand = torch.tensor([[9, 0, 1]])
    nxt, sib = torch.tensor([[1, -1, -1]]), torch.tensor([[-1, 2, -1]])
    p_root = torch.tensor([0.3, 0.3, 0.2, 0.2])
    probs = torch.stack([p_root, p_root, p_root])[None]
    for final in (0.0, 0.49, 0.51, 0.999):
        predicts, _, num, draft = run_sampling(
            T.tree_speculative_sampling_target_only, cand, torch.arange(3).view(1, 3), nxt, sib,
            torch.full((1, 3), 0.9999), torch.tensor([final]), probs, 3,
        )
        assert num.tolist() == [0]
        assert predicts[0].item() == (2 if final < 0.5 else 3)
        assert draft[0, 0].tolist() == [0.30000001192092896, 0.30000001192092896, 0.0, 0.0]


def emitted_paths(predicts, accept_index, num, n):
    """Per trial, the emitted tokens as a tuple: predicts at each accepted-path node (the last is the bonus)."""
    pred, index, counts = predicts.tolist(), accept_index.tolist(), num.tolist()
    return [tuple(pred[x] for x in row[: c + 1]) for row, c in zip(index, counts)]


# Statistical check. One tree per trial: root -> node 1 (token 1), node 2 (token 3); node 1 -> node 3
# (token 2). Depth cap 3. Under correct speculative sampling the emitted prefix has probability
# p0(x0) * p_node(x0)(x1) * ..., each factor the target distribution at the node reached.
N_TRIALS, VOCAB = 20000, 4
P_NODES = torch.tensor([[0.1, 0.3, 0.2, 0.4], [0.25, 0.05, 0.5, 0.2], [0.6, 0.1, 0.1, 0.2], [0.3, 0.3, 0.3, 0.1]])
STAT_CAND = torch.tensor([0, 1, 3, 2])
STAT_NEXT, STAT_SIB = torch.tensor([1, 3, -1, -1]), torch.tensor([-1, 2, -1, -1])


def expected_path_distribution() -> dict[tuple, float]:
    p0, p1, p2, p3 = P_NODES
    dist = {}
    for x0 in range(VOCAB):
        if x0 == 1:  # accepted node 1
            for x1 in range(VOCAB):
                if x1 == 2:  # accepted node 3 (depth cap reached): bonus from p3
                    for x2 in range(VOCAB):
                        dist[(1, 2, x2)] = float(p0[1] * p1[2] * p3[x2])
                else:
                    dist[(1, x1)] = float(p0[1] * p1[x1])
        elif x0 == 3:  # accepted node 2, a leaf: bonus from p2
            for x1 in range(VOCAB):
                dist[(3, x1)] = float(p0[3] * p2[x1])
        else:
            dist[(x0,)] = float(p0[x0])
    return dist


def tv_bound(num_categories: int, n: int, delta: float = 1e-6) -> float:
    """Total-variation radius that the empirical distribution of n samples exceeds with probability
    < delta (Bretagnolle-Huber-Carol: P(||p_hat - p||_1 >= eps) <= (2^k - 2) exp(-n eps^2 / 2))."""
    l1 = math.sqrt(2 * (num_categories * math.log(2) + math.log(1 / delta)) / n)
    return l1 / 2


def sample_paths(verify, seed: int):
    g = torch.Generator().manual_seed(seed)
    bs, n = N_TRIALS, 4
    cand = STAT_CAND.expand(bs, n).contiguous()
    ridx = torch.arange(bs * n).view(bs, n)
    probs = P_NODES.expand(bs, n, VOCAB).contiguous()
    coins, final = torch.rand(bs, n, generator=g), torch.rand(bs, generator=g)
    predicts, accept_index, num, _ = run_sampling(
        verify, cand, ridx, STAT_NEXT.expand(bs, n), STAT_SIB.expand(bs, n), coins, final, probs, 3
    )
    return emitted_paths(predicts, accept_index, num, n)


def total_variation(paths) -> tuple[float, float]:
    expected = expected_path_distribution()
    counts: dict[tuple, int] = {}
    for p in paths:
        counts[p] = counts.get(p, 0) + 1
    keys = set(expected) | set(counts)
    tv = 0.5 * sum(abs(counts.get(k, 0) / len(paths) - expected.get(k, 0.0)) for k in keys)
    return tv, tv_bound(len(expected), len(paths))


def test_sampling_verify_emits_tokens_with_the_target_distribution():
    tv, bound = total_variation(sample_paths(T.tree_speculative_sampling_target_only, seed=0))
    assert tv < bound, f"TV {tv:.4f} >= {bound:.4f}"


def test_the_distribution_check_catches_lossy_verifiers():
    """The statistical test has teeth: accepting every draft (threshold_single=0, upstream's lossy
    knob) and resampling from the full p instead of the residual both fail it."""

    def always_accept(**kw):
        T.tree_speculative_sampling_target_only(**{**kw, "threshold_single": 0.0})

    def full_p_resample(**kw):
        T.tree_speculative_sampling_target_only(**kw)
        rejected_at_root = kw["accept_token_num"] == 0
        g = torch.Generator().manual_seed(5)
        fresh = torch.multinomial(kw["target_probs"][:, 0], 1, generator=g).squeeze(1)
        root = kw["retrive_index"][:, 0]
        kw["predicts"][root[rejected_at_root]] = fresh[rejected_at_root].to(torch.int32)

    for wrong in (always_accept, full_p_resample):
        tv, bound = total_variation(sample_paths(wrong, seed=0))
        assert tv > bound, f"{wrong.__name__}: TV {tv:.4f} <= {bound:.4f}"


# ---------------------------------------------------------------------------------------------
# renorms


@pytest.mark.parametrize("bs,vocab", [(1, 1), (1, 7), (5, 16), (8, 33)])
def test_top_k_renorm_matches_reference(bs, vocab):
    g = torch.Generator().manual_seed(vocab)
    probs = torch.softmax(torch.randn(bs, vocab, generator=g), -1)
    probs[0, : min(3, vocab)] = probs[0, 0]  # ties at the pivot
    probs = probs / probs.sum(-1, keepdim=True)
    for top_k in (1, 2, vocab, 1 << 30, torch.randint(1, vocab + 2, (bs,), generator=g, dtype=torch.int32)):
        got = T.top_k_renorm_prob(probs, top_k)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, T.top_k_renorm_prob_ref(probs, top_k))
        torch.testing.assert_close(got.sum(-1), torch.ones(bs))


def test_top_k_renorm_keeps_ties_and_the_k_largest():
    probs = torch.tensor([[0.1, 0.4, 0.2, 0.2, 0.1]])
    assert T.top_k_renorm_prob(probs, 2).tolist() == [[0.0, 0.5, 0.25, 0.25, 0.0]]  # both 0.2s stay
    assert T.top_k_renorm_prob(probs, 1).tolist() == [[0.0, 1.0, 0.0, 0.0, 0.0]]


@pytest.mark.parametrize("bs,vocab", [(1, 1), (1, 7), (5, 16), (8, 33)])
def test_top_p_renorm_matches_reference(bs, vocab):
    g = torch.Generator().manual_seed(vocab + 1)
    probs = torch.softmax(2 * torch.randn(bs, vocab, generator=g), -1)
    for top_p in (0.05, 0.5, 0.9, 1.0, torch.rand(bs, generator=g) * 0.9 + 0.1):
        got = T.top_p_renorm_prob(probs, top_p)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, T.top_p_renorm_prob_ref(probs, top_p))
        torch.testing.assert_close(got.sum(-1), torch.ones(bs))


def test_top_p_renorm_keeps_the_smallest_top_set_reaching_p():
    probs = torch.tensor([[0.05, 0.5, 0.25, 0.2]])
    out = T.top_p_renorm_prob(probs, 0.7)  # 0.5 + 0.25 = 0.75 >= 0.7
    torch.testing.assert_close(out, torch.tensor([[0.0, 2 / 3, 1 / 3, 0.0]]))
    torch.testing.assert_close(T.top_p_renorm_prob(probs, 1.0), probs)


# ---------------------------------------------------------------------------------------------
# reconstruct_indices_from_tree_mask (NGRAM)


def ngram_mask(parents_batch: list[list[int]], noise: bool, rng: random.Random) -> torch.Tensor:
    """(bs*n*n,) bool: row i marks i itself and its ancestors; with ``noise`` the ignored upper
    triangle gets random bits."""
    bs, n = len(parents_batch), len(parents_batch[0])
    m = torch.zeros(bs, n, n, dtype=torch.bool)
    for b, parents in enumerate(parents_batch):
        for i in range(n):
            j = i
            while j != -1:
                m[b, i, j] = True
                j = parents[j]
            if noise:
                for j in range(i + 1, n):
                    m[b, i, j] = rng.random() < 0.5
    return m.flatten()


def run_reconstruct(fn, mask, seq, bs, n):
    positions = torch.full((bs * n,), -3, dtype=torch.long)
    links = torch.full((3, bs, n), -3, dtype=torch.long)
    fn(mask, seq, positions, links[0], links[1], links[2], bs, n)
    return positions, links


@pytest.mark.parametrize("noise", [False, True])
@pytest.mark.parametrize("bs,n", [(1, 1), (1, 4), (3, 8), (2, 16)])
def test_reconstruct_matches_reference(bs, n, noise):
    rng = random.Random(n)
    for trial in range(3):
        parents = [random_tree(rng, n, chain=trial == 0) for _ in range(bs)]
        mask = ngram_mask(parents, noise, rng)
        seq = torch.randint(0, 50, (bs,))
        got = run_reconstruct(T.reconstruct_indices_from_tree_mask, mask, seq, bs, n)
        ref = run_reconstruct(T.reconstruct_indices_from_tree_mask_ref, mask, seq, bs, n)
        for a, b in zip(got, ref):
            assert torch.equal(a, b)


def test_reconstruct_recovers_the_tree_of_an_ancestor_mask():
    """Tree 0 -> {1, 4}, 1 -> {2, 3}: links, depths and retrieve indices as upstream's docstring defines."""
    parents = [-1, 0, 1, 1, 0]
    positions, links = run_reconstruct(T.reconstruct_indices_from_tree_mask, ngram_mask([parents, parents], False, None), torch.tensor([20, 0]), 2, 5)
    assert positions.tolist() == [20, 21, 22, 22, 21, 0, 1, 2, 2, 1]
    assert links[0].tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert links[1].tolist() == [[1, 2, -1, -1, -1]] * 2
    assert links[2].tolist() == [[-1, 4, 3, -1, -1]] * 2
    # and the links drive greedy verification like EAGLE's
    nxt, sib = links_from_parents(parents)
    assert links[1][0].tolist() == nxt and links[2][0].tolist() == sib


def test_reconstruct_accepts_a_uint8_mask():
    parents = [[-1, 0, 1]]
    mask = ngram_mask(parents, False, None)
    a = run_reconstruct(T.reconstruct_indices_from_tree_mask, mask, torch.tensor([4]), 1, 3)
    b = run_reconstruct(T.reconstruct_indices_from_tree_mask, mask.to(torch.uint8), torch.tensor([4]), 1, 3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
