"""sgl-kernel paged_decode_attention: decode attention read from the paged pool equals its torch reference."""

import subprocess
import sys

import pytest
import torch

from turbo import kernels
from turbo.kernels import paged_decode_attention_ref

N_SLOTS = 900


def test_the_cpu_kernels_build_on_this_machine():
    """CI machines have g++ and ninja: the kernel path must really be the one that runs."""
    kernels.load_cpu_kernels()  # raises with the compiler's message if not
    assert kernels.cpu_kernels_available()


def test_loading_the_kernels_keeps_denormals():
    """The kernel is compiled with -ffast-math; loading it must not switch the process to
    flush-to-zero, which would change every other op's results (fresh process: clean FP state)."""
    code = (
        "import torch; from turbo import kernels; tiny = torch.tensor([1e-39]); "
        "assert (tiny * 1.0).item() > 0; kernels.load_cpu_kernels(); "
        "assert (tiny * 1.0).item() > 0, 'denormals flushed after loading the kernels'; print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


@pytest.mark.parametrize("flags", ["CPU_CFLAGS", "CPU_LDFLAGS"])
def test_changing_a_build_flag_makes_a_new_build(flags, monkeypatch):
    """The build cache is keyed by the flags: a cached .so built with other flags is never reused."""
    before = kernels._cpu_signature()
    monkeypatch.setattr(kernels, flags, (*getattr(kernels, flags), "-DTURBO_TEST_FLAG"))
    assert kernels._cpu_signature() != before


def _case(seed, bsz, n_heads, n_kv_heads, head_dim, v_dim, max_len, dtype, scattered=True):
    gen = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(N_SLOTS, n_kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(N_SLOTS, n_kv_heads, v_dim, generator=gen).to(dtype)
    kv_lens = torch.randint(1, max_len + 1, (bsz,), generator=gen)
    width = int(kv_lens.max()) + 3  # rows wider than the longest request, as req_to_token's are
    if scattered:
        kv_slots = torch.stack([torch.randperm(N_SLOTS, generator=gen)[:width] for _ in range(bsz)])
    else:
        kv_slots = (torch.arange(bsz)[:, None] * width + torch.arange(width)[None, :]) % N_SLOTS
    q = torch.randn(bsz, n_heads, head_dim, generator=gen).to(dtype)
    return q, k_cache, v_cache, kv_slots, kv_lens


HEADS = [(4, 4, 16, 16), (4, 2, 64, 64), (8, 1, 32, 32), (6, 2, 24, 40)]  # MHA, GQA, MQA, v_dim != head_dim


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_heads,n_kv_heads,head_dim,v_dim", HEADS)
@pytest.mark.parametrize("bsz,max_len", [(1, 1), (1, 300), (5, 40), (16, 129)])
def test_kernel_matches_reference(bsz, max_len, n_heads, n_kv_heads, head_dim, v_dim, dtype, kernel_tolerance):
    q, kc, vc, slots, lens = _case(bsz * 7 + max_len, bsz, n_heads, n_kv_heads, head_dim, v_dim, max_len, dtype)
    out = torch.ops.turbo_kernels.paged_decode_attention(q, kc, vc, slots, lens, head_dim**-0.5)
    ref = paged_decode_attention_ref(q, kc, vc, slots, lens, head_dim**-0.5)
    assert out.shape == (bsz, n_heads, v_dim) and out.dtype == dtype
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= kernel_tolerance[dtype], f"max abs error {err} for {lens.tolist()=}"


def test_kernel_output_does_not_depend_on_the_thread_count():
    """Long-context decode runs the kernel on every thread inside a one-thread step (the backend's
    attention_threads): the tokens must not change with it, so neither may any bit of the output."""
    q, kc, vc, slots, lens = _case(3, 9, 4, 2, 64, 64, 200, torch.float32, scattered=False)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(torch.ops.turbo_kernels.paged_decode_attention(q, kc, vc, slots, lens, 0.125))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1])
    assert torch.allclose(outs[0], paged_decode_attention_ref(q, kc, vc, slots, lens, 0.125), atol=1e-5)


def test_keys_past_a_requests_length_are_never_read():
    """Padding slots may hold anything (here NaN): only kv_slots[i, :kv_lens[i]] are keys."""
    q, kc, vc, slots, lens = _case(5, 4, 4, 2, 16, 16, 30, torch.float32)
    poisoned = slots.clone()
    for i, n in enumerate(lens.tolist()):
        poisoned[i, n:] = N_SLOTS - 1
    kc[N_SLOTS - 1], vc[N_SLOTS - 1] = float("nan"), float("nan")
    keep = torch.ones(N_SLOTS, dtype=torch.bool)
    keep[N_SLOTS - 1] = False
    if not all(bool(keep[slots[i, :n]].all()) for i, n in enumerate(lens.tolist())):
        pytest.fail("the case drew the poisoned slot as a real key; change the seed")
    out = torch.ops.turbo_kernels.paged_decode_attention(q, kc, vc, poisoned, lens, 0.25)
    assert not out.isnan().any()


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda a: a.update(kv_lens=torch.zeros_like(a["kv_lens"])), "has 0 keys"),
        (lambda a: a.update(kv_lens=a["kv_lens"] + 100), "kv_slots holds 1 to"),
        (lambda a: a["kv_slots"].__setitem__((0, 0), N_SLOTS + 5), "outside the pool"),
        (lambda a: a.update(k_cache=a["k_cache"].double()), "share a dtype"),
        (lambda a: a.update(kv_slots=a["kv_slots"].int()), "int64"),
        (lambda a: a.update(q=a["q"][:, :3]), "multiple of KV heads"),
    ],
    ids=["zero-length", "longer-than-slots", "slot-outside-pool", "dtype-mismatch", "int32-slots", "heads"],
)
def test_bad_arguments_raise_a_clear_error(change, message):
    q, kc, vc, slots, lens = _case(1, 3, 4, 2, 16, 16, 20, torch.float32)
    args = dict(q=q, k_cache=kc, v_cache=vc, kv_slots=slots, kv_lens=lens)
    change(args)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.turbo_kernels.paged_decode_attention(*args.values(), 0.25)


def test_disabling_the_kernels_falls_back_to_the_reference():
    """SGLANG_TURBO_DISABLE_KERNELS=1: the wrapper answers the same, without the kernel (fresh process)."""
    code = (
        "import torch; from turbo import kernels; "
        "q = torch.randn(2, 4, 16); kc = torch.randn(50, 2, 16); vc = torch.randn(50, 2, 16); "
        "slots = torch.arange(20).view(2, 10); lens = torch.tensor([10, 4]); "
        "out = kernels.paged_decode_attention(q, kc, vc, slots, lens, 0.25); "
        "ref = kernels.paged_decode_attention_ref(q, kc, vc, slots, lens, 0.25); "
        "assert not kernels.cpu_kernels_available(); assert torch.equal(out, ref); "
        "assert not hasattr(torch.ops.turbo_kernels, 'paged_decode_attention'); print('ok')"
    )
    env = {"SGLANG_TURBO_DISABLE_KERNELS": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
