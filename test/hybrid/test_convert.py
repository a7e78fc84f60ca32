"""The hybrid reference (turbo/hybrid/model.py) and the MambaInLlama conversion (turbo/hybrid/convert.py),
from the shipped turbo-tiny. CPU, no server."""

from __future__ import annotations

import json

import pytest
import torch

from turbo.hybrid.convert import convert, hybrid_config
from turbo.hybrid.model import ARCHITECTURE, HybridLlamaConfig, load_model
from turbo.ladder.model import load_model as load_llama
from turbo.zoo.presets import zoo_path


@pytest.fixture(scope="module")
def tiny_dir():
    return zoo_path("turbo-tiny")


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 4096, (2, 48), generator=torch.Generator().manual_seed(0))


def test_a_hybrid_that_keeps_every_attention_layer_is_exactly_the_llama(tiny_dir, tmp_path, ids):
    model = convert(tiny_dir, tmp_path / "all", attention_layers=list(range(6)))
    with torch.no_grad():
        diff = (model(ids).logits - load_llama(tiny_dir)(ids).logits).abs().max().item()
    assert diff == 0.0, f"{diff=}"


def test_a_converted_checkpoint_reloads_to_the_same_model(tiny_dir, tmp_path, ids):
    model = convert(tiny_dir, tmp_path / "h", attention_layers=[2, 5])
    cfg = json.loads((tmp_path / "h" / "config.json").read_text())
    assert cfg["architectures"] == [ARCHITECTURE] and cfg["attention_layers"] == [2, 5], f"{cfg=}"
    with torch.no_grad():
        diff = (model(ids).logits - load_model(tmp_path / "h")(ids).logits).abs().max().item()
    assert diff == 0.0, f"{diff=}"
    assert (tmp_path / "h" / "tokenizer.json").read_bytes() == (tiny_dir / "tokenizer.json").read_bytes()


def test_mamba_layers_start_from_their_attentions_projections(tiny_dir, tmp_path):
    """x <- V and B <- K (each K/V head repeated for the query heads sharing it), C <- Q, out <- O."""
    from safetensors.torch import load_file

    llama = load_file(str(tiny_dir / "model.safetensors"))
    model = convert(tiny_dir, tmp_path / "h", attention_layers=[2, 5])
    mixer, d = model.model.layers[0].mamba, 256
    rows = mixer.in_proj.weight.split([d, d, d, d, 4])  # z, x, B, C, dt
    v = llama["model.layers.0.self_attn.v_proj.weight"].unflatten(0, (2, 64))
    assert torch.equal(rows[1], v.repeat_interleave(2, 0).flatten(0, 1)), "x rows are not V repeated per head"
    assert torch.equal(rows[3], llama["model.layers.0.self_attn.q_proj.weight"]), "C rows are not Q"
    assert torch.equal(mixer.out_proj.weight, llama["model.layers.0.self_attn.o_proj.weight"]), "out_proj is not O"
    assert torch.equal(model.model.layers[2].self_attn.q_proj.weight, llama["model.layers.2.self_attn.q_proj.weight"])


def test_the_hybrid_is_causal(tiny_dir, tmp_path):
    model = convert(tiny_dir, tmp_path / "h", attention_layers=[2])
    a = torch.randint(0, 4096, (1, 20), generator=torch.Generator().manual_seed(1))
    b = a.clone()
    b[0, 12:] = (b[0, 12:] + 7) % 4096
    with torch.no_grad():
        la, lb = model(a).logits, model(b).logits
    assert torch.equal(la[:, :12], lb[:, :12]), "a later token changed an earlier position's logits"


@pytest.mark.parametrize("layers", [[6], [3, 1], [2, 2], [-1]])
def test_attention_layers_that_do_not_fit_the_model_are_refused(tiny_dir, layers):
    cfg = json.loads((tiny_dir / "config.json").read_text())
    with pytest.raises(ValueError, match=r"attention_layers must be distinct ascending layer indices of this 6-layer model"):
        hybrid_config(cfg, layers)


def test_convert_cli_exits_with_a_usage_error_naming_the_layers(tmp_path, capsys):
    from turbo.hybrid.convert import main

    with pytest.raises(SystemExit) as e:
        main(["turbo-tiny", str(tmp_path / "x"), "--attention-layers", "1,9"])
    assert e.value.code == 2 and "attention_layers" in capsys.readouterr().err


def test_a_mixer_shape_that_cannot_work_is_refused():
    with pytest.raises(ValueError, match="multiple of n_groups"):
        HybridLlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=1, head_dim=4, mamba_n_heads=4, mamba_n_groups=3)
