"""turbo.zoo.distill: the draft model learns its teacher's next token and can stand in for it in SGLang."""

import json

import pytest
import torch

from turbo.zoo.presets import PRESETS, zoo_path

DRAFT, TEACHER = "turbo-tiny-draft", "turbo-tiny"


@pytest.fixture(scope="module")
def teacher_and_tokenizer():
    from turbo.zoo.distill import load_teacher

    return load_teacher(PRESETS[DRAFT])


@pytest.fixture(scope="module")
def heldout_slice(teacher_and_tokenizer) -> dict[str, torch.Tensor]:
    """2 windows of each domain never trained on: held-out stdlib files, records from an unused seed."""
    from turbo.zoo.corpus import code_documents, record_documents
    from turbo.zoo.train import encode_stream

    _, tok = teacher_and_tokenizer
    cfg = PRESETS[DRAFT]
    docs = {"code": list(code_documents("heldout", cfg.held_out_fraction)), "records": list(record_documents(777, 60))}
    return {d: encode_stream(tok, v)[: 2 * cfg.seq_len] for d, v in docs.items()}


def test_smoke_distillation_lowers_the_kl_to_its_teacher(tmp_path):
    """The whole recipe end to end on the seconds-long preset: KL falls, files are complete and loadable."""
    from transformers import AutoModelForCausalLM

    from turbo.zoo.distill import distill

    results = distill(PRESETS["turbo-tiny-draft-smoke"], tmp_path, threads=1, max_eval_windows=4)
    kl = json.loads((tmp_path / "loss.json").read_text())
    first, last = sum(kl[:3]) / 3, sum(kl[-3:]) / 3
    assert last < 0.8 * first, f"KL did not fall: first steps {first:.3f}, last steps {last:.3f}"
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "loss.png", "recipe.json"):
        assert (tmp_path / f).is_file(), f"{f} missing from {sorted(p.name for p in tmp_path.iterdir())}"
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert sum(p.numel() for p in model.parameters()) == results["parameters"]


def test_shipped_draft_shares_its_teachers_tokenizer_and_vocabulary():
    """STANDALONE speculation compares token ids: the draft must tokenize exactly like the target."""
    draft, teacher = zoo_path(DRAFT), zoo_path(TEACHER)
    differing = [f for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
                 if (draft / f).read_bytes() != (teacher / f).read_bytes()]
    keys = ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")
    d_cfg, t_cfg = (json.loads((p / "config.json").read_text()) for p in (draft, teacher))
    assert not differing and all(d_cfg[k] == t_cfg[k] for k in keys), \
        f"{differing=} draft {[d_cfg[k] for k in keys]} teacher {[t_cfg[k] for k in keys]} ({keys})"


def test_shipped_draft_is_several_times_smaller_than_its_teacher():
    d_cfg, t_cfg = (json.loads((zoo_path(n) / "config.json").read_text()) for n in (DRAFT, TEACHER))
    d_size, t_size = ((zoo_path(n) / "model.safetensors").stat().st_size for n in (DRAFT, TEACHER))
    assert d_cfg["num_hidden_layers"] * 3 <= t_cfg["num_hidden_layers"] and d_size * 2.5 < t_size, \
        f"draft {d_cfg['num_hidden_layers']} layers {d_size / 1e6:.1f} MB, teacher {t_cfg['num_hidden_layers']} " \
        f"layers {t_size / 1e6:.1f} MB"


def test_shipped_draft_agrees_with_its_teacher_far_more_than_random_weights(teacher_and_tokenizer, heldout_slice):
    """Greedy next-token agreement on held-out code and records: trained draft vs a random-init one of its shape."""
    from transformers import AutoModelForCausalLM

    from turbo.zoo.distill import greedy_agreement
    from turbo.zoo.train import create_model

    teacher, tok = teacher_and_tokenizer
    cfg = PRESETS[DRAFT]
    draft = AutoModelForCausalLM.from_pretrained(zoo_path(DRAFT), dtype=torch.float32).eval()
    torch.manual_seed(0)
    random_init = create_model(cfg, tok).eval()
    trained = {d: greedy_agreement(draft, teacher, s, cfg.seq_len) for d, s in heldout_slice.items()}
    chance = {d: greedy_agreement(random_init, teacher, s, cfg.seq_len) for d, s in heldout_slice.items()}
    assert trained["code"] > 0.5 and trained["records"] > 0.8 and all(trained[d] > chance[d] + 0.4 for d in trained), \
        f"agreement with {TEACHER}: draft {trained}, random weights {chance}"


def test_a_model_drafting_for_itself_has_every_draft_accepted(teacher_and_tokenizer, heldout_slice):
    """The accept-length simulator is exact: the teacher as its own draft accepts all n_draft tokens + 1."""
    from turbo.zoo.distill import simulated_accept

    teacher, _ = teacher_and_tokenizer
    result = simulated_accept(teacher, teacher, heldout_slice["code"], seq_len=64, n_draft=4, n_offsets=2,
                              max_windows=4)
    assert result["mean_accept_length"] == 5.0 and result["positions"] == 8, f"{result=}"
