"""turbo.zoo: the embedded model family is reproducible, loadable and small enough for git."""

import json

import pytest
import torch

from turbo.zoo import corpus
from turbo.zoo.presets import DEFAULT_MODEL, PRESETS, zoo_language_models, zoo_names, zoo_path

MAX_SHIPPED_MB = 30


def test_records_domain_is_deterministic_for_a_seed():
    """The same seed gives the same generated documents; another seed gives others."""
    a = [d.text for d in corpus.record_documents(seed=3, count=20)]
    b = [d.text for d in corpus.record_documents(seed=3, count=20)]
    c = [d.text for d in corpus.record_documents(seed=4, count=20)]
    assert a == b, "same seed, different documents"
    assert a != c, "different seeds gave identical documents"


def test_held_out_code_files_never_appear_in_training():
    """The stdlib split is by file: no held-out file's text is a training document."""
    train = {d.text for d in corpus.code_documents("train")}
    heldout = [d.text for d in corpus.code_documents("heldout")]
    assert heldout, "held-out split is empty"
    overlap = [t[:60] for t in heldout if t in train]
    assert not overlap, f"{len(overlap)} held-out files also in training, e.g. {overlap[:2]}"


def test_default_model_is_shipped():
    """The README's serve command needs the default model in the checkout."""
    assert DEFAULT_MODEL in zoo_names(), f"{DEFAULT_MODEL=} not among shipped {zoo_names()}"


@pytest.mark.parametrize("name", zoo_names())
def test_everything_shipped_fits_in_git(name):
    size_mb = sum(p.stat().st_size for p in zoo_path(name).iterdir()) / 1e6
    assert size_mb <= MAX_SHIPPED_MB, f"{name} is {size_mb:.1f} MB > {MAX_SHIPPED_MB} MB"


@pytest.mark.parametrize("name", zoo_language_models())
def test_shipped_model_predicts_held_out_code_not_noise(name):
    """Loads with transformers; greedy next token right on over a quarter of held-out stdlib code.

    turbo-tiny measures 0.34 (2026-11-25); a random-weight model of the same shape measures 0.0.
    """
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    from turbo.zoo.corpus import code_documents
    from turbo.zoo.train import encode_stream

    path = zoo_path(name)
    cfg = PRESETS[name]
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    stream = encode_stream(tok, list(code_documents("heldout", cfg.held_out_fraction)))
    n, width = 4, cfg.seq_len
    rows = torch.stack([stream[i * width : (i + 1) * width + 1] for i in range(n)])
    with torch.no_grad():
        accuracy = (model(rows[:, :-1]).logits.argmax(-1) == rows[:, 1:]).float().mean().item()
    assert accuracy > 0.25, f"{name}: greedy next-token accuracy on held-out code {accuracy:.3f}"


@pytest.mark.parametrize("name", [n for n in zoo_language_models() if not PRESETS[n].teacher])
def test_shipped_model_closes_a_range_call(name):
    """A readable sign of code: ``for i in range(`` is continued with the call's closing ``):``.

    Not asked of drafts (presets with a teacher): they are held to agreeing with their teacher
    instead (test_distill.py).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = zoo_path(name)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tok("for i in range(", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0, ids.shape[1]:])
    assert "):" in text, f"{name} continued 'for i in range(' with {text!r}"


@pytest.mark.parametrize("name", zoo_language_models())
def test_shipped_model_records_its_recipe_and_held_out_perplexity(name):
    recipe = json.loads((zoo_path(name) / "recipe.json").read_text())
    assert recipe["preset"]["name"] == name, f"{recipe['preset']['name']=} {name=}"
    ppl = recipe["heldout_perplexity"]
    assert set(ppl) == {"code", "records"}, f"{ppl=}"
    assert all(1.0 < v < 50.0 for v in ppl.values()), f"held-out perplexity out of a trained model's range: {ppl}"


@pytest.mark.parametrize("name", zoo_language_models())
def test_chat_template_ends_with_the_assistant_turn(name):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(zoo_path(name))
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<|bos|><|user|>\nWhat is 2 + 3?<|eos|><|assistant|>\n", f"{text=}"


def test_missing_model_error_names_the_recipe():
    with pytest.raises(FileNotFoundError, match="python -m turbo.zoo.train --preset turbo-smoke"):
        zoo_path("turbo-smoke")


@pytest.mark.slow
def test_smoke_recipe_trains_and_is_loadable(tmp_path):
    """The whole recipe end to end on the seconds-long preset: loss falls, files are complete."""
    from transformers import AutoModelForCausalLM

    from turbo.zoo.train import train

    results = train(PRESETS["turbo-smoke"], tmp_path, threads=2)
    losses = json.loads((tmp_path / "loss.json").read_text())
    assert losses[-1] < losses[0], f"loss did not fall: first {losses[0]:.3f}, last {losses[-1]:.3f}"
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "loss.png", "recipe.json"):
        assert (tmp_path / f).is_file(), f"{f} missing from {sorted(p.name for p in tmp_path.iterdir())}"
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert sum(p.numel() for p in model.parameters()) == results["parameters"]
