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
