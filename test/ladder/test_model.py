"""The plain-PyTorch ladder Llama (turbo/ladder/model.py), conversion (convert.py), the adaptation recipe
(adapt.py) and the shipped ``turbo-tiny-ladder``. CPU, no server."""

from __future__ import annotations

import json
import math

import pytest
import torch

from turbo.ladder.convert import convert, ladder_hf_config
from turbo.ladder.model import ARCHITECTURE, LadderLlamaConfig, load_hf_config, load_model
from turbo.zoo.presets import zoo_path

LADDER = "turbo-tiny-ladder"


@pytest.fixture(scope="module")
def tiny_dir():
    return zoo_path("turbo-tiny")


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 4096, (2, 40), generator=torch.Generator().manual_seed(0))


def test_reference_of_a_plain_llama_checkpoint_equals_transformers_logits(tiny_dir, ids):
    """A Llama config loads as ladder_start_layer = n: exactly Llama, checked against transformers."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    ref = load_model(tiny_dir)
    assert ref.cfg.ladder_start_layer == ref.cfg.num_hidden_layers, f"{ref.cfg=}"
    with torch.no_grad():
        diff = (hf(ids).logits - ref(ids).logits).abs().max().item()
    assert diff < 1e-4, f"reference vs transformers logits differ by {diff}"


def test_ladder_layers_change_what_the_model_computes(tiny_dir, ids):
    """Same weights, ladder schedule: different logits (the conversion is not a no-op)."""
    with torch.no_grad():
        standard = load_model(tiny_dir)(ids).logits
        ladder = load_model(tiny_dir, ladder_start_layer=0)(ids).logits
        upper = load_model(tiny_dir, ladder_start_layer=3)(ids).logits
    assert (standard - ladder).abs().max() > 1.0, "ladder logits equal the standard model's"
    assert (standard - upper).abs().max() > 0.1 and (ladder - upper).abs().max() > 0.1, "partial ladder equals an end"


def test_reference_greedy_continues_its_own_argmax(tiny_dir):
    model = load_model(tiny_dir, ladder_start_layer=0)
    prompt = [1, 410, 346, 15]
    out = model.greedy(prompt, 4)
    with torch.no_grad():
        step = model(torch.tensor([prompt + out[:3]])).logits[0, -1].argmax().item()
    assert step == out[3], f"greedy token 4 {out[3]} != argmax {step}"


def test_conversion_keeps_weights_and_tokenizer_and_names_the_ladder_architecture(tiny_dir, tmp_path):
    out = convert(tiny_dir, tmp_path / "ladder", ladder_start_layer=2)
    cfg = load_hf_config(out)
    assert cfg["architectures"] == [ARCHITECTURE] and cfg["ladder_start_layer"] == 2, f"{cfg=}"
    assert cfg["model_type"] == "llama", "the ladder checkpoint must stay a transformers Llama checkpoint"
    assert (out / "model.safetensors").read_bytes() == (tiny_dir / "model.safetensors").read_bytes()
    assert (out / "tokenizer.json").read_bytes() == (tiny_dir / "tokenizer.json").read_bytes()
    assert LadderLlamaConfig.from_hf_dict(cfg).ladder_layers == [2, 3, 4, 5]


def test_converted_checkpoint_round_trips_through_transformers(tiny_dir, tmp_path):
    """transformers reads the config (keeping ladder_start_layer) and the weights of a ladder checkpoint."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out = convert(tiny_dir, tmp_path / "ladder")
    hf_cfg = AutoConfig.from_pretrained(out)
    assert hf_cfg.architectures == [ARCHITECTURE] and hf_cfg.ladder_start_layer == 0, f"{hf_cfg=}"
    hf_cfg.save_pretrained(tmp_path / "resaved")
    assert json.loads((tmp_path / "resaved" / "config.json").read_text())["ladder_start_layer"] == 0
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ours = load_model(out)
    theirs = dict(model.named_parameters())
    for name, p in ours.named_parameters():
        assert torch.equal(p, theirs[name]), f"{name} differs after loading with transformers"


@pytest.mark.parametrize("start", [-1, 7])
def test_conversion_refuses_a_start_layer_outside_the_model(tiny_dir, start):
    with pytest.raises(ValueError, match=r"ladder_start_layer must be in \[0, 6\]"):
        ladder_hf_config(load_hf_config(tiny_dir), start)


def test_conversion_refuses_a_non_llama_checkpoint(tiny_dir):
    cfg = dict(load_hf_config(tiny_dir), model_type="mistral", architectures=["MistralForCausalLM"])
    with pytest.raises(ValueError, match="not a Llama checkpoint"):
        ladder_hf_config(cfg, 0)


def test_convert_cli_exits_with_a_usage_error_for_a_bad_start_layer(tmp_path, capsys):
    from turbo.ladder.convert import main

    with pytest.raises(SystemExit) as e:
        main(["turbo-tiny", str(tmp_path / "x"), "--ladder-start-layer", "9"])
    assert e.value.code == 2 and "ladder_start_layer" in capsys.readouterr().err, f"{e.value.code=}"


# ------------------------------------------------------------------ the shipped adapted model
@pytest.fixture(scope="module")
def heldout_code(tiny_dir):
    from tokenizers import Tokenizer

    from turbo.zoo.corpus import code_documents
    from turbo.zoo.presets import PRESETS
    from turbo.zoo.train import encode_stream

    tok = Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    return encode_stream(tok, list(code_documents("heldout", PRESETS["turbo-tiny"].held_out_fraction)))


def heldout_perplexity(model, stream, seq_len=512, n=4) -> float:
    rows = torch.stack([stream[i * seq_len : (i + 1) * seq_len + 1] for i in range(n)])
    with torch.no_grad():
        logits = model(rows[:, :-1]).logits
    return math.exp(torch.nn.functional.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten()).item())


def test_shipped_ladder_model_is_a_ladder_checkpoint_of_turbo_tiny():
    cfg = load_hf_config(zoo_path(LADDER))
    recipe = json.loads((zoo_path(LADDER) / "recipe.json").read_text())
    assert cfg["architectures"] == [ARCHITECTURE] and cfg["ladder_start_layer"] == 0, f"{cfg=}"
    assert recipe["base"] == "turbo-tiny" and recipe["command"] == "python -m turbo.ladder.adapt --preset turbo-tiny-ladder"
    from turbo.ladder.adapt import LADDER_PRESETS

    assert recipe["preset"] == LADDER_PRESETS[LADDER].to_dict(), "the shipped weights came from another recipe"


def test_adaptation_recovers_most_of_what_conversion_lost(tiny_dir, heldout_code):
    """Held-out code perplexity: converted-unadapted >> adapted, and adapted within 25% of turbo-tiny."""
    base = heldout_perplexity(load_model(tiny_dir), heldout_code)
    converted = heldout_perplexity(load_model(tiny_dir, ladder_start_layer=0), heldout_code)
    adapted = heldout_perplexity(load_model(zoo_path(LADDER)), heldout_code)
    assert adapted < converted / 3, f"{adapted=:.1f} not far below {converted=:.1f}"
    assert adapted < 1.25 * base, f"{adapted=:.1f} vs turbo-tiny {base:.1f}"


@pytest.mark.slow
def test_adaptation_recipe_runs_and_records_three_perplexities(tmp_path):
    from turbo.ladder.adapt import main

    out = tmp_path / "smoke"
    main(["--preset", "turbo-tiny-ladder-smoke", "--out", str(out), "--threads", "1"])
    recipe = json.loads((out / "recipe.json").read_text())
    keys = {"heldout_perplexity", "heldout_perplexity_base", "heldout_perplexity_converted_before_adaptation"}
    assert keys <= set(recipe), f"{sorted(recipe)=}"
    assert (out / "loss.png").stat().st_size > 0 and len(json.loads((out / "loss.json").read_text())) == 3
    assert load_model(out).cfg.ladder_start_layer == 0
