"""turbo.attention.paged: one batched SDPA call equals per-request, per-head attention."""

import random

import pytest
import torch

from turbo.attention.paged import GatherWorkspace, PagedBatch, paged_attention, paged_attention_ref

N_SLOTS, MAX_CTX, N_POOL_ROWS = 600, 80, 10


def _case(seed: int, n_heads: int, n_kv_heads: int, head_dim: int, q_lens_fn):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    k_cache = torch.randn(N_SLOTS, n_kv_heads, head_dim)
    v_cache = torch.randn(N_SLOTS, n_kv_heads, head_dim)
    req_to_token = torch.randint(0, N_SLOTS, (N_POOL_ROWS, MAX_CTX), dtype=torch.int32)
    bsz = rng.randint(1, 6)
    pool = rng.sample(range(N_POOL_ROWS), bsz)
    kv_lens = [rng.randint(1, MAX_CTX) for _ in range(bsz)]
    q_lens = [q_lens_fn(rng, n) for n in kv_lens]
    q = torch.randn(sum(q_lens), n_heads, head_dim)
    return q, k_cache, v_cache, req_to_token, pool, q_lens, kv_lens


HEADS = [(4, 4, 16), (4, 2, 32), (8, 1, 8)]  # MHA, GQA, MQA


@pytest.fixture(params=["kernel", "torch"])
def decode_path(request, monkeypatch):
    """Decode runs the sgl-kernel kernel when built; the torch path (gather + SDPA) must agree too."""
    if request.param == "torch":
        monkeypatch.setattr("turbo.kernels.cpu_kernels_available", lambda: False)
    return request.param


@pytest.mark.parametrize("n_heads,n_kv_heads,head_dim", HEADS)
@pytest.mark.parametrize("seed", range(4))
def test_decode_batch_matches_per_request_reference(seed, n_heads, n_kv_heads, head_dim, decode_path):
    """One query token per request, requests of different lengths, padding masked out."""
    q, kc, vc, r2t, pool, q_lens, kv_lens = _case(seed, n_heads, n_kv_heads, head_dim, lambda rng, n: 1)
    batch = PagedBatch.build(r2t, torch.tensor(pool), q_lens, kv_lens, n_heads // n_kv_heads)
    out = paged_attention(q, kc, vc, batch, head_dim**-0.5)
    ref = paged_attention_ref(q, kc, vc, r2t, pool, q_lens, kv_lens, head_dim**-0.5)
    err = (out - ref).abs().max().item()
    assert err < 1e-5, f"max abs error {err} for {kv_lens=}"


@pytest.mark.parametrize("n_heads,n_kv_heads,head_dim", HEADS)
@pytest.mark.parametrize("seed", range(4))
def test_extend_with_cached_prefix_matches_reference(seed, n_heads, n_kv_heads, head_dim):
    """Several new tokens per request after a cached prefix of any length (0 included): causal within the batch."""
    q, kc, vc, r2t, pool, q_lens, kv_lens = _case(seed, n_heads, n_kv_heads, head_dim, lambda rng, n: rng.randint(1, n))
    batch = PagedBatch.build(r2t, torch.tensor(pool), q_lens, kv_lens, n_heads // n_kv_heads)
    out = paged_attention(q, kc, vc, batch, head_dim**-0.5)
    ref = paged_attention_ref(q, kc, vc, r2t, pool, q_lens, kv_lens, head_dim**-0.5)
    err = (out - ref).abs().max().item()
    assert err < 1e-5, f"max abs error {err} for {q_lens=} {kv_lens=}"


@pytest.mark.parametrize("n_heads,n_kv_heads,head_dim", HEADS)
@pytest.mark.parametrize("consecutive", [True, False])
def test_single_request_decode_reads_consecutive_slots_as_a_view(consecutive, n_heads, n_kv_heads, head_dim,
                                                                 decode_path):
    """One decoding request: consecutive slots take the no-gather, no-mask path; others the general one."""
    torch.manual_seed(0)
    kc, vc = torch.randn(N_SLOTS, n_kv_heads, head_dim), torch.randn(N_SLOTS, n_kv_heads, head_dim)
    r2t = torch.randint(0, N_SLOTS, (N_POOL_ROWS, MAX_CTX), dtype=torch.int32)
    kv_len = 57
    slots = torch.arange(100, 100 + kv_len) if consecutive else torch.randperm(N_SLOTS)[:kv_len]
    r2t[3, :kv_len] = slots.to(torch.int32)
    q = torch.randn(1, n_heads, head_dim)
    batch = PagedBatch.build(r2t, torch.tensor([3]), [1], [kv_len], n_heads // n_kv_heads)
    assert batch.kv_start == (100 if consecutive else None)
    out = paged_attention(q, kc, vc, batch, head_dim**-0.5)
    ref = paged_attention_ref(q, kc, vc, r2t, [3], [1], [kv_len], head_dim**-0.5)
    err = (out - ref).abs().max().item()
    assert err < 1e-5, f"max abs error {err}"


def test_view_path_is_only_for_one_decode_query():
    """Extend (causal mask needed) and batches (rows of different lengths) always gather."""
    r2t = torch.arange(N_POOL_ROWS * MAX_CTX, dtype=torch.int32).view(N_POOL_ROWS, MAX_CTX) % N_SLOTS
    assert PagedBatch.build(r2t, torch.tensor([0]), [4], [20], 2).kv_start is None
    assert PagedBatch.build(r2t, torch.tensor([0, 1]), [1, 1], [20, 20], 2).kv_start is None
    assert PagedBatch.build(r2t, torch.tensor([0]), [1], [20], 2).kv_start == 0


def test_non_causal_extend_sees_every_key():
    """Encoder-only layers: every query sees the whole sequence."""
    q, kc, vc, r2t, pool, q_lens, kv_lens = _case(7, 4, 2, 16, lambda rng, n: n)
    batch = PagedBatch.build(r2t, torch.tensor(pool), q_lens, kv_lens, 2, causal=False)
    out = paged_attention(q, kc, vc, batch, 0.25)
    ref = paged_attention_ref(q, kc, vc, r2t, pool, q_lens, kv_lens, 0.25, causal=False)
    err = (out - ref).abs().max().item()
    assert err < 1e-5, f"max abs error {err}"


def test_padding_slots_never_leak_into_the_output():
    """Garbage in the pool beyond a request's length changes nothing."""
    q, kc, vc, r2t, pool, q_lens, kv_lens = _case(3, 4, 2, 16, lambda rng, n: 1)
    batch = PagedBatch.build(r2t, torch.tensor(pool), q_lens, kv_lens, 2)
    before = paged_attention(q, kc, vc, batch, 0.25)
    poisoned_r2t = r2t.clone()
    for row, n in zip(pool, kv_lens):
        poisoned_r2t[row, n:] = 0
    kc2, vc2 = kc.clone(), vc.clone()
    used = {int(s) for row, n in zip(pool, kv_lens) for s in r2t[row, :n]}
    unused = torch.tensor([s for s in range(N_SLOTS) if s not in used])
    kc2[unused], vc2[unused] = 1e4, -1e4
    batch2 = PagedBatch.build(poisoned_r2t, torch.tensor(pool), q_lens, kv_lens, 2)
    after = paged_attention(q, kc2, vc2, batch2, 0.25)
    assert torch.equal(before, after), f"max diff {(before - after).abs().max()}"


def test_one_workspace_shared_by_batches_of_every_size_matches_the_reference():
    """The gather buffers grow and shrink in use across forwards (decode and extend, big and small)."""
    workspace = GatherWorkspace()
    for seed in range(8):
        q_lens_fn = (lambda rng, n: 1) if seed % 2 else (lambda rng, n: rng.randint(1, n))
        q, kc, vc, r2t, pool, q_lens, kv_lens = _case(100 + seed, 4, 2, 16, q_lens_fn)
        batch = PagedBatch.build(r2t, torch.tensor(pool), q_lens, kv_lens, 2)
        out = paged_attention(q, kc, vc, batch, 0.25, workspace)
        ref = paged_attention_ref(q, kc, vc, r2t, pool, q_lens, kv_lens, 0.25)
        err = (out - ref).abs().max().item()
        assert err < 1e-5, f"{seed=}: max abs error {err} for {q_lens=} {kv_lens=}"


def test_workspace_keeps_its_buffers_when_a_batch_fits():
    workspace = GatherWorkspace()
    kc, vc = torch.randn(50, 2, 8), torch.randn(50, 2, 8)
    workspace.gather(kc, vc, torch.arange(40))
    first = workspace._k.data_ptr()
    k, _ = workspace.gather(kc, vc, torch.tensor([3, 1, 4]))
    assert workspace._k.data_ptr() == first and torch.equal(k, kc[[3, 1, 4]])


def _random_tree_masks(rng: random.Random, q_lens: list[int]) -> list[torch.Tensor]:
    """Ancestor-or-self matrices of random trees: node 0 is the root, node i's parent is any j < i."""
    masks = []
    for n in q_lens:
        m = torch.zeros(n, n, dtype=torch.bool)
        for i in range(n):
            parent = rng.randrange(i) if i else None
            m[i, i] = True
            if parent is not None:
                m[i] |= m[parent]
        masks.append(m)
    return masks


@pytest.mark.parametrize("seed", range(4))
def test_tree_verify_sees_prefix_and_only_its_ancestors(seed):
    """Verifying a draft tree: each new token attends to the whole cached prefix plus its tree ancestors."""
    rng = random.Random(100 + seed)
    q, kc, vc, r2t, pool, q_lens, kv_lens = _case(seed, 4, 2, 16, lambda rng, n: min(n, rng.randint(1, 8)))
    masks = _random_tree_masks(rng, q_lens)
    block = torch.zeros(len(q_lens), max(q_lens), max(q_lens), dtype=torch.bool)
    for i, m in enumerate(masks):
        block[i, : m.shape[0], : m.shape[1]] = m
    batch = PagedBatch.build(r2t, torch.tensor(pool), q_lens, kv_lens, 2, block_mask=block)
    out = paged_attention(q, kc, vc, batch, 0.25)
    ref = paged_attention_ref(q, kc, vc, r2t, pool, q_lens, kv_lens, 0.25, block_masks=masks)
    err = (out - ref).abs().max().item()
    assert err < 1e-5, f"max abs error {err} for {q_lens=} {kv_lens=}"


def test_chain_shaped_tree_mask_equals_causal():
    """A lower-triangular block mask is a chain: the same as plain causal attention."""
    q, kc, vc, r2t, pool, q_lens, kv_lens = _case(11, 4, 2, 16, lambda rng, n: min(n, 5))
    block = torch.ones(len(q_lens), 5, 5, dtype=torch.bool).tril()
    tree = paged_attention(q, kc, vc, PagedBatch.build(r2t, torch.tensor(pool), q_lens, kv_lens, 2, block_mask=block), 0.25)
    causal = paged_attention(q, kc, vc, PagedBatch.build(r2t, torch.tensor(pool), q_lens, kv_lens, 2), 0.25)
    assert torch.allclose(tree, causal, atol=1e-6), f"max diff {(tree - causal).abs().max()}"


def test_from_slots_reads_exactly_the_given_slots():
    """A slot table that is not a req_to_token row (draft steps) gives the reference's answer for those slots."""
    q, kc, vc, r2t, pool, q_lens, kv_lens = _case(5, 4, 2, 16, lambda rng, n: 1)
    slots = r2t[torch.tensor(pool)].long()
    out = paged_attention(q, kc, vc, PagedBatch.from_slots(slots, q_lens, kv_lens, 2), 0.25)
    ref = paged_attention_ref(q, kc, vc, r2t, pool, q_lens, kv_lens, 0.25)
    assert (out - ref).abs().max().item() < 1e-5


def test_full_layout_tree_mask_yields_each_requests_new_token_block():
    """The flat (n, prefix + n)-per-request mask SGLang writes is cut into per-request (n, n) blocks."""
    from turbo.attention.paged import block_mask_from_full_layout

    prefix_lens, n = [3, 1, 5], 4
    blocks = [torch.rand(n, n) > 0.5 for _ in prefix_lens]
    flat = torch.cat([torch.cat([torch.ones(n, p, dtype=torch.bool), b], 1).flatten() for p, b in zip(prefix_lens, blocks)])
    got = block_mask_from_full_layout(flat, prefix_lens, n)
    assert torch.equal(got, torch.stack(blocks))
    with pytest.raises(ValueError, match="cells"):
        block_mask_from_full_layout(flat[:-1], prefix_lens, n)
