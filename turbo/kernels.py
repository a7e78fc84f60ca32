"""The one door to turbo's compiled kernels (sources in ``sgl-kernel/``), each beside its torch reference.

A kernel is C++ built on first use with torch's extension builder (g++ and ninja;
a minute on 2 cores, then cached under ``~/.cache/sglang-turbo/kernels``, keyed
by the source and this CPU, since it is built for the machine it runs on).
Callers ask :func:`cpu_kernels_available` and fall back to the torch reference
when the build is impossible; the reason is logged once.

Kernels:

- ``paged_decode_attention``: one query token per request against its cached
  tokens in SGLang's token-paged pool (see sgl-kernel/csrc/cpu/paged_decode_attention.cpp).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import threading
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

KERNEL_SOURCES = Path(__file__).resolve().parents[1] / "sgl-kernel" / "csrc" / "cpu"
CPU_SOURCES = ("paged_decode_attention.cpp",)
DISABLE_ENV = "SGLANG_TURBO_DISABLE_KERNELS"  # "1": always use the torch references
# -ffast-math lets gcc call glibc's vector expf in the softmax loop: batch 1, 768 contiguous keys,
# 75 -> 57 us a layer; batch 16, 1557 -> 1441 us (1 thread, Xeon with AVX-512, 2026-12-02). Scores
# are finite (max-subtracted dot products of finite rows), so the NaN/inf assumptions hold. The flag
# must stay off the link line: linked, it would pull in crtfastmath and flush denormals process-wide.
CPU_CFLAGS = ("-O3", "-march=native", "-fopenmp", "-ffast-math")
CPU_LDFLAGS = ("-fopenmp",)  # test_loading_the_kernels_keeps_denormals fails with -ffast-math here (checked)

_lock = threading.Lock()
_state: dict[str, object] = {}  # "loaded": bool, "error": str


def _cpu_signature() -> str:
    """What the build depends on besides the sources: flags, torch, and this CPU (-march=native)."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "model name")):
                flags += line
    except OSError:
        pass
    return f"{platform.machine()}|{torch.__version__}|{' '.join(CPU_CFLAGS)}|{' '.join(CPU_LDFLAGS)}|{flags}"


def _build_dir(digest: str) -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sglang-turbo" / "kernels"
    path = root / digest
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_cpu_kernels() -> None:
    """Builds (or loads the cached build of) the CPU kernels, registering ``torch.ops.turbo_kernels``.

    Raises RuntimeError naming the cause when they cannot be built here."""
    with _lock:
        if _state.get("loaded"):
            return
        if "error" in _state:
            raise RuntimeError(_state["error"])
        try:
            _load_cpu_kernels()
            _state["loaded"] = True
        except Exception as e:  # noqa: BLE001 - any build failure means "use the reference"
            _state["error"] = f"turbo CPU kernels unavailable ({type(e).__name__}: {str(e).strip()[-600:]})"
            raise RuntimeError(_state["error"]) from e


def _load_cpu_kernels() -> None:
    # Importing torch's builder on a machine without CUDA logs a warning about CUDA_HOME, meaningless
    # for a CPU-only build: silence that one import.
    builder_log = logging.getLogger("torch.utils.cpp_extension")
    level = builder_log.level
    builder_log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        builder_log.setLevel(level)

    _put_ninja_on_path()

    sources = [KERNEL_SOURCES / name for name in CPU_SOURCES]
    missing = [str(s) for s in sources if not s.is_file()]
    if missing:
        raise FileNotFoundError(f"kernel sources not found: {missing} (install sglang-turbo from a source checkout)")
    digest = hashlib.sha256(_cpu_signature().encode())
    for s in sources:
        digest.update(s.read_bytes())
    name = f"turbo_kernels_{digest.hexdigest()[:16]}"
    cpp_extension.load(
        name=name,
        sources=[str(s) for s in sources],
        extra_cflags=list(CPU_CFLAGS),
        extra_ldflags=list(CPU_LDFLAGS),
        build_directory=str(_build_dir(name)),
        is_python_module=False,
        verbose=False,
    )


def _put_ninja_on_path() -> None:
    """torch's builder runs ``ninja`` from PATH; a venv used without activation has it only in its bin/."""
    if shutil.which("ninja"):
        return
    try:
        import ninja
    except ImportError:
        return  # torch's builder then names the missing ninja
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def cpu_kernels_available() -> bool:
    """True when the CPU kernels are loaded (building them on the first call); logs why not, once."""
    if _state.get("loaded"):
        return True  # the per-layer fast path: no lock, no environment lookup
    if os.environ.get(DISABLE_ENV) == "1":
        return False
    try:
        load_cpu_kernels()
        return True
    except RuntimeError as e:
        if not _state.get("warned"):
            _state["warned"] = True
            logger.warning("%s; using the torch references", e)
        return False


# ----------------------------------------------------------------------------- paged_decode_attention


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_slots: torch.Tensor,
    kv_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Decode attention read straight from the paged pool: the kernel when built, else the reference.

    q:        (bsz, n_heads, head_dim), one query token per request
    k_cache:  (n_slots, n_kv_heads, head_dim); v_cache: (n_slots, n_kv_heads, v_head_dim)
    kv_slots: (bsz, width) int64; request i's keys are at kv_slots[i, :kv_lens[i]]
    kv_lens:  (bsz,) int64, each in [1, width]
    returns:  (bsz, n_heads, v_head_dim)
    """
    if q.device.type == "cpu" and cpu_kernels_available():
        return torch.ops.turbo_kernels.paged_decode_attention(q, k_cache, v_cache, kv_slots, kv_lens, scale)
    return paged_decode_attention_ref(q, k_cache, v_cache, kv_slots, kv_lens, scale)


def paged_decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_slots: torch.Tensor,
    kv_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Plain torch: gather each request's keys, mask the padding, softmax in float32."""
    bsz, n_heads, dim = q.shape
    n_kv_heads = k_cache.shape[1]
    group = n_heads // n_kv_heads
    width = kv_slots.shape[1]
    valid = torch.arange(width, device=q.device)[None, :] < kv_lens[:, None]  # (bsz, width)
    slots = torch.where(valid, kv_slots, torch.zeros_like(kv_slots))
    k = k_cache[slots].float()  # (bsz, width, n_kv_heads, dim)
    v = v_cache[slots].float()
    qg = q.float().view(bsz, n_kv_heads, group, dim)
    scores = torch.einsum("bhgd,bwhd->bhgw", qg, k) * scale
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    out = torch.einsum("bhgw,bwhd->bhgd", scores.softmax(-1), v)
    return out.reshape(bsz, n_heads, -1).to(q.dtype)
