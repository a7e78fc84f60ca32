"""The hybrid distillation recipe (turbo/hybrid/distill.py), as a seconds-long smoke run."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_distillation_recipe_runs_and_records_three_perplexities(tmp_path):
    from turbo.hybrid.distill import main
    from turbo.hybrid.model import load_model

    out = tmp_path / "smoke"
    main(["--preset", "turbo-tiny-hybrid-smoke", "--out", str(out), "--threads", "1"])
    recipe = json.loads((out / "recipe.json").read_text())
    keys = {"heldout_perplexity", "heldout_perplexity_base", "heldout_perplexity_converted_before_distillation"}
    assert keys <= set(recipe), f"{sorted(recipe)=}"
    assert len(json.loads((out / "loss.json").read_text())) == 3 and (out / "loss.png").stat().st_size > 0
    model = load_model(out)
    assert model.cfg.attention_layers == (2, 5) and model.cfg.mamba_layers == [0, 1, 3, 4], f"{model.cfg=}"


# ------------------------------------------------------------------ the shipped distilled model
HYBRID = "turbo-tiny-hybrid"
MAX_PPL_RATIO = 1.1  # measured 0.95 on the whole held-out code stream (recipe.json)


def test_shipped_hybrid_is_turbo_tinys_hybrid_made_by_its_preset():
    from turbo.hybrid.distill import HYBRID_PRESETS
    from turbo.hybrid.model import ARCHITECTURE, load_model
    from turbo.zoo.presets import zoo_path

    recipe = json.loads((zoo_path(HYBRID) / "recipe.json").read_text())
    assert recipe["base"] == "turbo-tiny" and recipe["command"] == "python -m turbo.hybrid.distill --preset turbo-tiny-hybrid"
    preset = json.loads(json.dumps(HYBRID_PRESETS[HYBRID].to_dict()))  # as recipe.json stores it (tuples -> lists)
    assert recipe["preset"] == preset, "the shipped weights came from another recipe"
    cfg = json.loads((zoo_path(HYBRID) / "config.json").read_text())
    assert cfg["architectures"] == [ARCHITECTURE] and cfg["attention_layers"] == [2, 5], f"{cfg=}"
    assert load_model(zoo_path(HYBRID)).cfg.mamba_layers == [0, 1, 3, 4]


def test_distillation_recovers_most_of_what_conversion_lost():
    """Held-out perplexity of the shipped hybrid, re-measured here on 4 windows of held-out code, against the
    conversion before distillation (recipe.json) and turbo-tiny itself."""
    import math

    import torch
    from tokenizers import Tokenizer

    from turbo.hybrid.model import load_model
    from turbo.ladder.model import load_model as load_llama
    from turbo.zoo.corpus import code_documents
    from turbo.zoo.presets import PRESETS, zoo_path
    from turbo.zoo.train import encode_stream

    tok = Tokenizer.from_file(str(zoo_path("turbo-tiny") / "tokenizer.json"))
    stream = encode_stream(tok, list(code_documents("heldout", PRESETS["turbo-tiny"].held_out_fraction)))
    rows = torch.stack([stream[i * 512 : (i + 1) * 512 + 1] for i in range(4)])

    def ppl(model) -> float:
        with torch.no_grad():
            logits = model(rows[:, :-1]).logits
        return math.exp(torch.nn.functional.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten()).item())

    base, hybrid = ppl(load_llama(zoo_path("turbo-tiny"))), ppl(load_model(zoo_path(HYBRID)))
    converted = json.loads((zoo_path(HYBRID) / "recipe.json").read_text())[
        "heldout_perplexity_converted_before_distillation"]["code"]
    assert hybrid < converted / 10, f"{hybrid=:.1f} not far below the conversion's {converted:.1f}"
    assert hybrid < MAX_PPL_RATIO * base, f"{hybrid=:.1f} vs turbo-tiny {base:.1f}"
