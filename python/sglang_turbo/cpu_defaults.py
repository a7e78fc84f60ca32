"""Server-argument defaults that make SGLang fit a small shared CPU machine.

Upstream sizes the KV pool from a fraction of device memory and busy-polls its
scheduler; on a CPU that means a 15 GB pool for a 4-layer model and a core spun
at 100% while idle (measured with 0.5.23, see docs/serving.md). Here each field
is defaulted only when the user left it at upstream's declared default, so an
explicit flag always wins.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from . import env
from .distributed import apply_cpu_tp_defaults
from .graph_runner import cpu_graphs_by_default, route_to_compiled_model

logger = logging.getLogger(__name__)

# Upper bound on the default pool: more than the embedded models ever need,
# small enough that two servers and a test process share 24 GB.
MAX_DEFAULT_POOL_TOKENS = 262_144
MIN_DEFAULT_POOL_TOKENS = 8_192
# A hybrid's state pool: upstream sizes it from free memory (20k slots, 5.8 GB measured for turbo-tiny-hybrid).
MAX_DEFAULT_MAMBA_SLOTS = 512
MIN_DEFAULT_MAMBA_SLOTS = 16

_DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}


def _user_set(args, name: str) -> bool:
    """True when the launch command gave ``name`` a value other than upstream's declared default."""
    from sglang.srt.server_args import _declared_default

    raw = getattr(args, "_raw_input", None) or {}
    return name in raw and raw[name] != _declared_default(name)


def _text_config(model_path: str) -> dict | None:
    try:
        cfg = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return cfg.get("text_config", cfg)


def kv_bytes_per_token(model_path: str, dtype: str) -> int | None:
    """K and V bytes one token takes in every attention layer, from the checkpoint's config.json (a
    Llama-Mamba2 hybrid's Mamba layers keep no KV); None if unknown."""
    cfg = _text_config(model_path)
    if cfg is None:
        return None
    try:
        n_layers = int(cfg["num_hidden_layers"])
        if "attention_layers" in cfg:
            n_layers = len(cfg["attention_layers"])
        n_heads = int(cfg["num_attention_heads"])
        n_kv_heads = int(cfg.get("num_key_value_heads") or n_heads)
        head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // n_heads)
    except (KeyError, TypeError, ValueError):
        return None
    return 2 * max(n_layers, 1) * n_kv_heads * head_dim * _DTYPE_BYTES.get(dtype, 4)


def mamba_state_bytes_per_request(model_path: str) -> int | None:
    """Conv window + scan state bytes of one request over all Mamba layers (float32), for a Llama-Mamba2
    hybrid's config.json; None for any other model."""
    cfg = _text_config(model_path)
    if cfg is None or cfg.get("model_type") != "llama_mamba2":
        return None
    try:
        n_mamba = int(cfg["num_hidden_layers"]) - len(cfg["attention_layers"])
        heads, head_dim, groups, d_state = (int(cfg[k]) for k in (
            "mamba_n_heads", "mamba_head_dim", "mamba_n_groups", "mamba_d_state"))
        conv_dim = heads * head_dim + 2 * groups * d_state
        per_layer = conv_dim * (int(cfg.get("mamba_d_conv", 4)) - 1) + heads * head_dim * d_state
    except (KeyError, TypeError, ValueError):
        return None
    return 4 * per_layer * max(n_mamba, 0)


def default_mamba_cache_size(model_path: str) -> int | None:
    """State-pool slots (running requests plus cached prefixes' states) within the same budget as the KV pool."""
    per_request = mamba_state_bytes_per_request(model_path)
    if not per_request:
        return None
    return int(max(MIN_DEFAULT_MAMBA_SLOTS, min(MAX_DEFAULT_MAMBA_SLOTS, env.kv_budget_bytes() // per_request)))


def default_pool_tokens(model_path: str, dtype: str) -> int:
    per_token = kv_bytes_per_token(model_path, dtype)
    if per_token is None:
        return 65_536  # unknown layout: a pool that stays small for any model that fits a CPU
    tokens = env.kv_budget_bytes() // per_token
    return int(max(MIN_DEFAULT_POOL_TOKENS, min(MAX_DEFAULT_POOL_TOKENS, tokens)))


def apply_overlap_default(args) -> None:
    """Upstream's overlap scheduler off unless ``SGLANG_TURBO_OVERLAP_SCHEDULE=on``.

    On a CPU the forward runs synchronously in the scheduler's thread, so there is nothing for the
    next batch's scheduling to overlap with; what remains is the overlap loop's own bookkeeping
    (future maps, the one-step-late result processing). Measured with CPU graphs, turbo-tiny, paired
    servers: decode-heavy batch-1 requests 1.08x faster with it off, a mixed workload level
    (docs/benchmarks.md, "Where the time went", item 12).
    The flag has no "on" form upstream, hence the environment variable.
    """
    if not env.overlap_schedule():
        args.disable_overlap_schedule = True


def apply_cpu_defaults(args) -> None:
    """Platform hook body: ``args`` is SGLang's recorder; every attribute set here becomes a declared default."""
    if not _user_set(args, "device"):
        args.device = "cpu"
    # Measured here: float16 decode was ~2x slower than float32 at batch 16 (docs/serving.md).
    if not _user_set(args, "dtype"):
        args.dtype = "float32"
    if not _user_set(args, "attention_backend"):
        from .platform import TurboCpuPlatform

        args.attention_backend = TurboCpuPlatform().get_default_attention_backend()
    if not _user_set(args, "sampling_backend"):
        args.sampling_backend = "pytorch"
    # Idle scheduler sleeps instead of polling (2% CPU instead of 100% measured).
    args.sleep_on_idle = True
    apply_overlap_default(args)
    # Runs in the launcher before the scheduler process is spawned, so the scheduler inherits it.
    env.bound_omp_spin()
    apply_cpu_tp_defaults(args)  # several ranks on this node: each gets its share of the cores
    if not _user_set(args, "max_total_tokens") and args.model_path:
        args.max_total_tokens = default_pool_tokens(str(args.model_path), args.dtype)
    if not _user_set(args, "enable_torch_compile") and args.model_path:
        why_not = cpu_graphs_by_default(args)
        args.enable_torch_compile = why_not is None
        if why_not:
            logger.info("sglang-turbo CPU graphs off (decode runs eagerly): %s", why_not)
    route_to_compiled_model(args)  # --enable-torch-compile: the Llama class dynamo can trace
    if not _user_set(args, "max_mamba_cache_size") and args.model_path:
        slots = default_mamba_cache_size(str(args.model_path))
        if slots is not None:
            args.max_mamba_cache_size = slots
    logger.info(
        "sglang-turbo CPU defaults: dtype=%s attention=%s max_total_tokens=%s sleep_on_idle=%s cpu_graphs=%s "
        "overlap_schedule=%s",
        args.dtype, args.attention_backend, args.max_total_tokens, args.sleep_on_idle, args.enable_torch_compile,
        not args.disable_overlap_schedule,
    )
