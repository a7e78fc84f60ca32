"""Speculative flags that cannot work stop the launcher with a usage error naming the flag.

Upstream accepts each of these at argument resolution and dies later in the scheduler process
with an unrelated traceback; ``sglang_turbo.speculative.checks`` catches them first.
"""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from sglang_turbo.speculative.checks import check_speculative_args, check_tree_shape
from turbo.zoo.presets import zoo_path


def resolved(**overrides):
    """A stand-in for upstream's resolved server args, with a valid EAGLE3 chain by default."""
    cfg = dict(model_path=str(zoo_path("turbo-tiny")), speculative_algorithm="EAGLE3",
               speculative_draft_model_path=str(zoo_path("turbo-tiny-eagle3")),
               speculative_eagle_topk=1, speculative_num_steps=4, speculative_num_draft_tokens=5)
    return SimpleNamespace(**{**cfg, **overrides})


def test_shipped_drafts_pass():
    check_speculative_args(resolved())
    check_speculative_args(resolved(speculative_algorithm="STANDALONE",
                                    speculative_draft_model_path=str(zoo_path("turbo-tiny-draft"))))
    check_speculative_args(resolved(speculative_algorithm="NGRAM", speculative_draft_model_path=None))
    check_speculative_args(resolved(speculative_algorithm=None, speculative_draft_model_path=None))


@pytest.mark.parametrize("overrides,message", [
    ({"speculative_draft_model_path": None}, "needs --speculative-draft-model-path"),
    ({"speculative_draft_model_path": "/no/such/dir"}, "no model there"),
    ({"speculative_algorithm": "STANDALONE"}, "is an EAGLE head"),
    ({"speculative_draft_model_path": str(zoo_path("turbo-tiny-draft"))}, "is not an EAGLE3 head"),
    ({"model_path": str(zoo_path("turbo-tiny-eagle3")), "speculative_algorithm": None}, "not a model"),
    ({"model_path": str(zoo_path("turbo-tiny-hybrid")), "speculative_algorithm": "NGRAM"}, "Llama-Mamba2 hybrid"),
    ({"model_path": str(zoo_path("turbo-tiny-hybrid"))}, "without speculative decoding"),
], ids=["no-draft", "missing-dir", "head-as-standalone", "model-as-eagle3", "head-as-target", "hybrid-ngram",
        "hybrid-eagle3"])
def test_unusable_draft_is_a_clear_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        check_speculative_args(resolved(**overrides))


def test_draft_with_another_vocabulary_is_refused(tmp_path):
    config = json.loads((zoo_path("turbo-tiny-draft") / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "vocab_size": 512}))
    with pytest.raises(ValueError, match="vocabulary .512 tokens.* differs from the target's .4096"):
        check_speculative_args(resolved(speculative_algorithm="STANDALONE", speculative_draft_model_path=str(tmp_path)))


@pytest.mark.parametrize("topk,steps,draft_tokens,message", [
    (4, 3, 4, "topk 4 is larger than the 3 draft tokens"),
    (1, 3, 9, "more tokens than 3 draft steps with topk 1 propose"),
    (0, 3, 4, "must be >= 1"),
])
def test_impossible_tree_shapes_are_refused(topk, steps, draft_tokens, message):
    with pytest.raises(ValueError, match=message):
        check_tree_shape(topk, steps, draft_tokens)


@pytest.mark.parametrize("topk,steps,draft_tokens", [(1, 4, 5), (4, 4, 8), (3, 3, 6), (2, 2, 7)])
def test_valid_tree_shapes_pass(topk, steps, draft_tokens):
    check_tree_shape(topk, steps, draft_tokens)


def test_launcher_exits_2_naming_the_flag_before_starting_anything():
    proc = subprocess.run(
        [sys.executable, "-m", "sglang_turbo.launch_server", "--speculative-algorithm", "STANDALONE",
         "--speculative-draft-model-path", "/no/such/draft"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, f"{proc.returncode=} {proc.stderr[-2000:]}"
    assert "--speculative-draft-model-path /no/such/draft: no model there" in proc.stderr, proc.stderr[-2000:]
