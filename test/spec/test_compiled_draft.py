"""A draft that runs compiled (CPU graphs) drafts what it drafts eagerly.

Under the portable platform's default CPU graphs, a STANDALONE draft's steps and extend and an EAGLE3
head's run the compiled body (graph_runner.compile_draft_decode; the head as
``TurboLlamaForCausalLMEagle3``). The target's greedy output cannot show a wrong draft (verification
corrects it), the number of verify rounds does: per configuration, the same prompts go to a default
server and to one with ``--disable-cuda-graph`` (all eager), and both must need the same rounds.
"""

from __future__ import annotations

import pytest
from test_spec_server import PROMPTS as SPEC_PROMPTS  # the served prompts and configurations: one home
from test_spec_server import SPEC_CONFIGS

pytestmark = pytest.mark.slow

N_NEW = 48
PROMPTS = [SPEC_PROMPTS[name] for name in ("fibonacci", "class", "imports", "records")]
CONFIGS = {name: SPEC_CONFIGS[name] for name in ("eagle3-chain", "standalone-chain")}


def _serve(factory, flags, post_generate, tokenizer) -> tuple[list[dict], str]:
    with factory(flags) as handle:
        metas = []
        for text in PROMPTS:
            out = post_generate(handle.base_url, {
                "input_ids": tokenizer(text).input_ids,
                "sampling_params": {"max_new_tokens": N_NEW, "min_new_tokens": N_NEW, "temperature": 0,
                                    "ignore_eos": True},
            })
            metas.append({"output_ids": out["output_ids"], "rounds": out["meta_info"]["spec_verify_ct"]})
        with open(handle.log_path, errors="replace") as f:
            return metas, f.read()


@pytest.fixture(scope="module", params=list(CONFIGS), ids=list(CONFIGS))
def compiled_and_eager(request, turbo_server_factory, post_generate, tokenizer):
    flags = CONFIGS[request.param]
    compiled, log = _serve(turbo_server_factory, flags, post_generate, tokenizer)
    eager, _ = _serve(turbo_server_factory, flags + ["--disable-cuda-graph"], post_generate, tokenizer)
    return request.param, compiled, eager, log


def test_the_draft_runs_compiled_by_default(compiled_and_eager):
    name, _, _, log = compiled_and_eager
    assert "draft's decode steps and extend run the compiled forward" in log, f"{name}: draft ran eagerly"
    # the draft's extend was compiled at start-up, not by the first request
    assert "compiling for an unforeseen" not in log, f"{name}: a graph compiled while serving"


def test_the_compiled_draft_needs_the_same_verify_rounds_as_the_eager_one(compiled_and_eager):
    name, compiled, eager, _ = compiled_and_eager
    assert [m["output_ids"] for m in compiled] == [m["output_ids"] for m in eager], name
    got, want = [m["rounds"] for m in compiled], [m["rounds"] for m in eager]
    # Fused arithmetic may flip a near-tie of the draft's argmax; a wrong draft loses far more.
    assert abs(sum(got) - sum(want)) <= 0.05 * sum(want), f"{name}: verify rounds compiled {got}, eager {want}"
    assert sum(want) < len(PROMPTS) * N_NEW * 0.8, f"{name}: the eager draft itself accepted almost nothing: {want}"
