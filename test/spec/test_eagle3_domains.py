"""turbo.spec.eagle3_train domains: a head's training stream can leave a domain out; evaluation never does."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from tokenizers import Tokenizer

from turbo.spec.eagle3_train import DOMAINS, PRESETS, Eagle3Preset, corpus_streams
from turbo.zoo.corpus import code_documents, record_documents
from turbo.zoo.presets import PRESETS as ZOO_PRESETS
from turbo.zoo.presets import zoo_path
from turbo.zoo.train import encode_stream, n_records_for

SMOKE = PRESETS["turbo-tiny-eagle3-smoke"]  # 4 code files: the streams build in seconds


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_file(str(zoo_path("turbo-tiny") / "tokenizer.json"))


@pytest.fixture(scope="module")
def smoke_docs() -> dict:
    """The smoke preset's training documents per domain, rebuilt independently of corpus_streams."""
    zoo = ZOO_PRESETS[SMOKE.target]
    code = list(code_documents("train", zoo.held_out_fraction))[: SMOKE.max_code_docs]
    return {"code": code, "records": list(record_documents(zoo.seed, max(1, n_records_for(zoo, code))))}


@pytest.fixture(scope="module")
def streams(tok) -> dict:
    """{domains: (train stream, held-out streams)} of the smoke preset for both domains and code only."""
    return {d: corpus_streams(replace(SMOKE, domains=d), tok) for d in (DOMAINS, ("code",))}


def test_default_preset_trains_on_both_domains_code_first():
    """Existing presets keep the stream their shipped weights were trained on."""
    seen = {name: p.domains for name, p in PRESETS.items() if name != "turbo-tiny-eagle3-code"}
    assert all(d == ("code", "records") for d in seen.values()), f"{seen=}"


def test_default_stream_is_code_files_then_records_unchanged(streams, smoke_docs, tok):
    """With both domains the stream is exactly code files then records, as before domains existed."""
    expected = encode_stream(tok, smoke_docs["code"] + smoke_docs["records"])
    train, _ = streams[DOMAINS]
    assert torch.equal(train, expected), f"{train.numel()=} {expected.numel()=}"


def test_code_only_stream_contains_no_records_text(streams, smoke_docs, tok):
    """The code-only stream is the code files alone: none of the records documents' text appears in it."""
    train, _ = streams[("code",)]
    text = tok.decode(train.tolist(), skip_special_tokens=True)
    leaked = [d.text[:40] for d in smoke_docs["records"] if d.text.strip() in text]
    expected = encode_stream(tok, smoke_docs["code"])
    assert torch.equal(train, expected) and not leaked, f"{train.numel()=} {expected.numel()=} {leaked[:3]=}"


def test_held_out_streams_cover_both_domains_whatever_the_training_domains(streams):
    """A code-only head is still measured on held-out records, on the very streams a default head is."""
    (_, both), (_, code_only) = streams[DOMAINS], streams[("code",)]
    same = {d: torch.equal(both[d], code_only[d]) for d in both}
    assert set(code_only) == set(DOMAINS) and all(same.values()), f"{sorted(code_only)=} {same=}"


def test_code_only_fixture_preset_is_the_shipped_recipe_shortened():
    """turbo-tiny-eagle3-code differs from turbo-tiny-eagle3 only in domains and schedule length."""
    fixture, shipped = PRESETS["turbo-tiny-eagle3-code"], PRESETS["turbo-tiny-eagle3"]
    rest = replace(fixture, name=shipped.name, steps=shipped.steps, domains=shipped.domains,
                   ttt=replace(fixture.ttt, total_steps=shipped.ttt.total_steps))
    seen = (fixture.domains, fixture.steps, fixture.ttt.total_steps)
    assert rest == shipped and seen == (("code",), 80, 80), f"{seen=} {rest=}"


@pytest.mark.parametrize("domains", [(), ("prose",), ("code", "code")])
def test_domains_must_be_known_distinct_and_non_empty(domains):
    """A preset naming no domain, an unknown one or one twice is refused with the names to choose from."""
    with pytest.raises(AssertionError, match="domains must name one or more of"):
        Eagle3Preset(name="bad", domains=domains)
