"""Start-up checks of the speculative flags, so a bad combination is a clear error, not a dead scheduler.

Upstream 0.5.23 accepts all of these at argument resolution and fails later, inside the
scheduler process, with a traceback about something else (a missing config file, an
index error in the tree build). :func:`check_speculative_args` runs in the launcher on
the resolved arguments and raises ``ValueError`` naming the flag.
"""

from __future__ import annotations

import json
import os

DRAFT_MODEL_ALGORITHMS = ("EAGLE", "EAGLE3", "STANDALONE", "TURBO")


def _local_config(path: str) -> dict | None:
    """config.json of a local model directory; None for a hub id (upstream downloads those)."""
    config = os.path.join(path, "config.json")
    if os.path.isfile(config):
        with open(config) as f:
            return json.load(f)
    return None


def _looks_like_hub_id(path: str) -> bool:
    return path.count("/") == 1 and not path.startswith((".", "/", "~"))


def _vocab_size(config: dict) -> int | None:
    return config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")


def _is_eagle_head(config: dict) -> bool:
    return any("Eagle" in arch for arch in config.get("architectures") or [])


def check_draft_path_exists(draft_path: str) -> None:
    if _local_config(draft_path) is None and (os.path.exists(draft_path) or not _looks_like_hub_id(draft_path)):
        raise ValueError(f"--speculative-draft-model-path {draft_path}: no model there (no config.json)")


def check_draft_model(algorithm: str, target_path: str, draft_path: str | None) -> None:
    if draft_path is None:
        raise ValueError(f"--speculative-algorithm {algorithm} needs --speculative-draft-model-path")
    check_draft_path_exists(draft_path)
    draft = _local_config(draft_path)
    if draft is None:
        return  # a hub id: nothing local to check
    if algorithm == "STANDALONE" and _is_eagle_head(draft):
        raise ValueError(
            f"--speculative-draft-model-path {draft_path} is an EAGLE head ({draft['architectures'][0]}), "
            "not a standalone model: use --speculative-algorithm EAGLE3 (or EAGLE) with it"
        )
    if algorithm in ("EAGLE3", "TURBO") and not _is_eagle_head(draft):
        raise ValueError(
            f"--speculative-draft-model-path {draft_path} is not an EAGLE3 head "
            f"(architectures {draft.get('architectures')}): use --speculative-algorithm STANDALONE with a full model"
        )
    target = _local_config(target_path)
    if target is None:
        return
    target_vocab, draft_vocab = _vocab_size(target), _vocab_size(draft)
    if target_vocab and draft_vocab and target_vocab != draft_vocab:
        raise ValueError(
            f"the draft model's vocabulary ({draft_vocab} tokens, {draft_path}) differs from the target's "
            f"({target_vocab} tokens, {target_path}): a draft must share the target's tokenizer"
        )


def check_tree_shape(topk: int, num_steps: int, num_draft_tokens: int) -> None:
    """EAGLE drafting proposes ``topk`` tokens at step 1 and ``topk * topk`` candidates at each later
    step; the verify tree holds the root plus ``num_draft_tokens - 1`` of them."""
    if topk < 1 or num_steps < 1 or num_draft_tokens < 2:
        raise ValueError(
            f"--speculative-eagle-topk {topk}, --speculative-num-steps {num_steps}, --speculative-num-draft-tokens "
            f"{num_draft_tokens}: topk and steps must be >= 1 and draft tokens >= 2"
        )
    if topk > num_draft_tokens - 1:
        raise ValueError(
            f"--speculative-eagle-topk {topk} is larger than the {num_draft_tokens - 1} draft tokens the tree can "
            f"verify (--speculative-num-draft-tokens {num_draft_tokens} includes the root): raise the draft tokens "
            "or lower topk"
        )
    candidates = topk + (num_steps - 1) * topk * topk
    if num_draft_tokens - 1 > candidates:
        raise ValueError(
            f"--speculative-num-draft-tokens {num_draft_tokens} asks to verify more tokens than "
            f"{num_steps} draft steps with topk {topk} propose ({candidates} + the root)"
        )


def check_draft_model_args(server_args) -> None:
    """Before resolution: given a draft path that does not exist, resolution itself fails (it asks the hub)."""
    if server_args.speculative_algorithm and server_args.speculative_draft_model_path:
        check_draft_path_exists(server_args.speculative_draft_model_path)


def check_target_model(model_path: str) -> None:
    """An EAGLE head is not a model: it needs its target's hidden states at every step."""
    config = _local_config(model_path)
    if config is not None and _is_eagle_head(config):
        raise ValueError(
            f"--model-path {model_path} is an EAGLE draft head ({config['architectures'][0]}), not a model: serve "
            "its target and pass the head with --speculative-algorithm EAGLE3 --speculative-draft-model-path"
        )


def check_hybrid_target(model_path: str, algorithm: str) -> None:
    """Verifying a draft through a Mamba state needs the mixer's speculative path (intermediate states,
    upstream's Triton conv with a draft tree), which our Llama-Mamba2 model does not run."""
    config = _local_config(model_path)
    if algorithm and config is not None and config.get("model_type") == "llama_mamba2":
        raise ValueError(
            f"--speculative-algorithm {algorithm}: {model_path} is a Llama-Mamba2 hybrid, which sglang-turbo "
            "serves without speculative decoding (see docs/hybrid.md, Limits); drop the speculative flags"
        )


def check_speculative_args(cfg) -> None:
    """After resolution (``cfg``: the resolved view, where upstream has filled in the draft path of
    models with built-in MTP layers and the auto tree shape)."""
    check_target_model(str(cfg.model_path))
    algorithm = (cfg.speculative_algorithm or "").upper()
    check_hybrid_target(str(cfg.model_path), algorithm)
    if algorithm not in DRAFT_MODEL_ALGORITHMS:
        return
    check_draft_model(algorithm, str(cfg.model_path), cfg.speculative_draft_model_path)
    if None not in (cfg.speculative_eagle_topk, cfg.speculative_num_steps, cfg.speculative_num_draft_tokens):
        check_tree_shape(cfg.speculative_eagle_topk, cfg.speculative_num_steps, cfg.speculative_num_draft_tokens)
