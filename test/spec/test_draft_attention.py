"""The multi-step draft attention reads, for each (request, branch) row at step i, the request's
committed prefix followed by the i + 1 slots that branch has drafted into."""

from types import SimpleNamespace

import torch

from sglang_turbo.attention.backend import TurboNativeMultiStepDraftBackend


class StubPool:
    """A KV pool stand-in: the backend only keys its per-pool layer table by it (weakly)."""


def test_each_branch_reads_the_prefix_then_its_own_drafted_slots():
    bsz, topk, steps = 2, 3, 4
    req_to_token = torch.arange(10 * 64, dtype=torch.int32).view(10, 64) + 1000  # distinct slot ids
    runner = SimpleNamespace(
        device="cpu",
        req_to_token_pool=SimpleNamespace(req_to_token=req_to_token),
        token_to_kv_pool=StubPool(),
        model_config=SimpleNamespace(context_len=64),
    )
    backend = TurboNativeMultiStepDraftBackend(runner, topk, steps)
    seq_lens = torch.tensor([5, 9])
    out_cache_loc = torch.arange(bsz * topk * steps) + 7  # laid out (bsz, topk, steps), as SGLang does
    batch = SimpleNamespace(batch_size=bsz, seq_lens=seq_lens, seq_lens_cpu=seq_lens,
                            req_pool_indices=torch.tensor([3, 7]), out_cache_loc=out_cache_loc)
    backend.init_forward_metadata(batch)

    assert len(backend.attn_backends) == steps - 1
    drafted = out_cache_loc.view(bsz, topk, steps)
    for i, step_backend in enumerate(backend.attn_backends):
        layout = step_backend._layout
        assert layout.q_lens == [1] * bsz * topk
        for row in range(bsz * topk):
            b, k = divmod(row, topk)
            n_prefix = int(seq_lens[b])
            want = req_to_token[[3, 7][b], :n_prefix].long().tolist() + drafted[b, k, : i + 1].tolist()
            assert layout.kv_lens[row] == n_prefix + i + 1
            assert layout.kv_slots[row, : layout.kv_lens[row]].tolist() == want, f"step {i} row {row}"
