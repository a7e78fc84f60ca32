"""``--speculative-algorithm TURBO`` served: a head that learns live and never changes the output.

Three TURBO servers, one at a time, share one speculator directory; the session's plain server
is the reference:

1. ``learning``: a tiny update interval and the adaptive head pinned (``--turbo-controller
   adaptive``), so versions are published and swapped in while requests generate. Greedy output
   stays byte-identical to the plain server; a repeated workload raises the accept length; the
   endpoint and ``/metrics`` report the figures. Killed with SIGKILL at the end.
2. ``restored``: restarted on the same directory with learning off: the newest version is back;
   a radix-cache hit spares the draft's prefill and does not lower acceptance.
3. ``faulty``: the directory plus a corrupt newest checkpoint and a crash's temp file, and a learner
   made to crash: it falls back to the newest good version, says why, and keeps serving.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import requests

pytestmark = pytest.mark.slow

N_NEW = 64
PROMPTS = {
    "fibonacci": "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "class": "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    "imports": "import os\nimport sys\nfrom pathlib import Path\n\n\ndef main(argv):\n",
    "records": "id,name,city\n1,Alice,Paris\n2,Bob,Berlin\n3,",
    "parser": "def parse_args(argv=None):\n    parser = argparse.ArgumentParser()\n",
    "loop": "for i in range(10):\n    if i % 2 == 0:\n",
}
TURBO = ["--speculative-algorithm", "TURBO", "--speculative-draft-model-path", "turbo-tiny-eagle3",
         "--speculative-num-steps", "4"]


def greedy_payload(ids: list[int], n_new: int = N_NEW) -> dict:
    return {"input_ids": ids,
            "sampling_params": {"max_new_tokens": n_new, "min_new_tokens": n_new, "temperature": 0, "ignore_eos": True}}


def status(url: str) -> dict:
    r = requests.get(f"{url}/turbo/speculator", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def prompt_ids(tokenizer) -> dict[str, list[int]]:
    return {name: tokenizer(text).input_ids for name, text in PROMPTS.items()}


@pytest.fixture(scope="module")
def plain_greedy(server, post_generate, prompt_ids) -> dict[str, list[int]]:
    return {name: post_generate(server, greedy_payload(ids))["output_ids"] for name, ids in prompt_ids.items()}


@pytest.fixture(scope="module")
def speculator_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("speculator")


# --------------------------------------------------------------------------- 1. learning


@pytest.fixture(scope="module")
def learning(turbo_server_factory, speculator_dir):
    flags = TURBO + ["--turbo-speculator-dir", str(speculator_dir), "--turbo-update-interval", "64",
                     "--turbo-controller", "adaptive", "--enable-metrics"]
    with turbo_server_factory(flags) as handle:
        yield handle


@pytest.fixture(scope="module")
def repeated_workload(learning, post_generate, prompt_ids, plain_greedy, wait_for):
    """Five passes over the same prompts; per pass, the outputs and the mean accept length."""
    passes = []
    for _ in range(5):
        outputs, accepts = {}, []
        for name, ids in prompt_ids.items():
            out = post_generate(learning.base_url, greedy_payload(ids))
            outputs[name] = out["output_ids"]
            accepts.append(out["meta_info"]["spec_accept_length"])
        passes.append({"outputs": outputs, "accept": sum(accepts) / len(accepts),
                       "version": status(learning.base_url)["version"]})
        if passes[-1]["version"] >= 1 and len(passes) >= 2:
            # let the learner catch up with what it was given before the next pass
            wait_for(lambda: status(learning.base_url)["learner"]["state"] == "idle", 120, "the learner to idle")
    return passes


def test_greedy_output_is_identical_while_versions_are_swapped_in(repeated_workload, plain_greedy, learning):
    versions = [p["version"] for p in repeated_workload]
    assert versions[-1] >= 3, f"expected several published versions during the workload, got {versions}"
    for i, p in enumerate(repeated_workload):
        for name, got in p["outputs"].items():
            assert got == plain_greedy[name], f"pass {i} (version {p['version']}), prompt {name!r} differs"
    assert status(learning.base_url)["swaps"] >= 3


def test_eight_concurrent_requests_are_identical_too(repeated_workload, learning, post_generate, prompt_ids,
                                                     plain_greedy):
    names = list(prompt_ids) + list(prompt_ids)[:2]
    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda n: post_generate(learning.base_url, greedy_payload(prompt_ids[n])), names))
    for name, out in zip(names, outs):
        assert out["output_ids"] == plain_greedy[name], f"concurrent prompt {name!r} differs"


def test_the_learner_raises_acceptance_on_a_repeated_workload(repeated_workload):
    first, last = repeated_workload[0]["accept"], repeated_workload[-1]["accept"]
    assert last >= first + 0.75, f"accept length per pass: {[round(p['accept'], 2) for p in repeated_workload]}"


def test_status_endpoint_reports_version_mode_heads_replay_and_learner(repeated_workload, learning):
    s = status(learning.base_url)
    assert s["version"] >= 3 and s["mode"] == "adaptive"
    assert s["accept_length"]["adaptive"] is not None and s["accept_length"]["adaptive"] >= 1.0
    assert s["replay_buffer_tokens"] >= len(PROMPTS) * N_NEW
    assert s["learner_steps"] > 0 and s["learner_alive"] is True
    assert s["learner"]["state"] in ("idle", "training")
    # repeated prompts hit prefixes whose draft KV an earlier version wrote: kept, and counted
    assert s["draft_prefix_hit_tokens"] > 0 and 0 < s["draft_kv_stale_prefix_tokens"] <= s["draft_prefix_hit_tokens"]


def test_metrics_carry_the_same_figures(repeated_workload, learning):
    status(learning.base_url)
    time.sleep(1)
    text = requests.get(f"{learning.base_url}/metrics", timeout=30).text
    for series in ("sglang_turbo_speculator_version", "sglang_turbo_accept_length", "sglang_turbo_replay_buffer_tokens",
                   "sglang_turbo_learner_steps", "sglang_turbo_learner_alive", "sglang_turbo_speculator_mode"):
        assert series in text, f"{series} missing from /metrics"
    assert 'sglang_turbo_speculator_mode{mode="adaptive"} 1.0' in text


def test_a_versions_files_are_in_the_directory(repeated_workload, speculator_dir, learning):
    version = status(learning.base_url)["version"]
    files = sorted(p.name for p in speculator_dir.glob("v*.safetensors"))
    assert files and files[-1] == f"v{version:06d}.safetensors", files


@pytest.fixture(scope="module")
def killed(repeated_workload, learning, speculator_dir):
    """SIGKILL the whole server (no clean shutdown) and remember the newest version on disk."""
    version = status(learning.base_url)["version"]
    for p in psutil.Process(learning.proc.pid).children(recursive=True):
        p.send_signal(signal.SIGKILL)
    learning.proc.send_signal(signal.SIGKILL)
    learning.proc.wait(30)
    newest = max(int(p.stem[1:]) for p in speculator_dir.glob("v*.safetensors"))
    assert newest in (version, version + 1), "at most the version being written is lost"
    return newest


# --------------------------------------------------------------------------- 2. restored


@pytest.fixture(scope="module")
def restored(killed, turbo_server_factory, speculator_dir):
    flags = TURBO + ["--turbo-speculator-dir", str(speculator_dir), "--turbo-disable-learning",
                     "--turbo-controller", "static"]
    with turbo_server_factory(flags) as handle:
        yield handle


def test_a_restart_restores_the_newest_version(restored, killed):
    s = status(restored.base_url)
    assert s["version"] == killed
    assert s["learning"] is False and s["learner_alive"] is False


def test_a_prefix_hit_spares_the_draft_prefill_and_keeps_acceptance(restored, post_generate, tokenizer):
    ids = tokenizer("".join(PROMPTS.values()) * 2).input_ids  # long enough that a re-prefill would show
    before = status(restored.base_url)["draft_prefill_tokens"]
    first = post_generate(restored.base_url, greedy_payload(ids))
    middle = status(restored.base_url)
    second = post_generate(restored.base_url, greedy_payload(ids))
    after = status(restored.base_url)
    assert middle["draft_prefill_tokens"] - before >= len(ids) - 1, "the first request prefills its prompt for the draft too"
    spared = after["draft_prefill_tokens"] - middle["draft_prefill_tokens"]
    assert spared <= 2, f"a cached prefix is not prefilled again by the draft ({spared} tokens)"
    assert after["draft_prefix_hit_tokens"] - middle["draft_prefix_hit_tokens"] >= len(ids) - 2
    # one head version throughout (static, no learning): the reused draft KV is not stale
    assert after["draft_kv_stale_prefix_tokens"] == middle["draft_kv_stale_prefix_tokens"]
    assert second["output_ids"] == first["output_ids"]
    assert second["meta_info"]["spec_accept_length"] >= first["meta_info"]["spec_accept_length"]


# --------------------------------------------------------------------------- 3. faulty


@pytest.fixture(scope="module")
def faulty_dir(killed, speculator_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("faulty") / "speculator"
    shutil.copytree(speculator_dir, d)
    (d / f"v{killed + 1:06d}.safetensors").write_bytes(b"not a safetensors file")
    (d / f".v{killed + 2:06d}.safetensors.tmp").write_bytes(b"half written")
    return d


@pytest.fixture(scope="module")
def faulty(faulty_dir, turbo_server_factory):
    flags = TURBO + ["--turbo-speculator-dir", str(faulty_dir), "--turbo-update-interval", "64"]
    with turbo_server_factory(flags, env={"SGLANG_TURBO_LEARNER_FAULT": "crash@1"}) as handle:
        yield handle


def test_a_corrupt_checkpoint_falls_back_to_the_newest_good_one(faulty, killed):
    assert status(faulty.base_url)["version"] == killed
    log = open(faulty.log_path).read()
    assert f"v{killed + 1:06d}.safetensors" in log, "the log names the corrupt file"


def test_a_crashed_learner_never_stops_serving(faulty, post_generate, prompt_ids, plain_greedy, wait_for):
    for name, ids in prompt_ids.items():
        assert post_generate(faulty.base_url, greedy_payload(ids))["output_ids"] == plain_greedy[name]
    s = wait_for(lambda: (lambda s: s if s["learner"]["state"] == "crashed" else None)(status(faulty.base_url)),
                 120, "the injected learner crash")
    assert s["learner_alive"] is False and "crash" in (s["learner"]["error"] or "")
    for name, ids in prompt_ids.items():  # still serving, still exact
        assert post_generate(faulty.base_url, greedy_payload(ids))["output_ids"] == plain_greedy[name]


def test_bad_turbo_flags_are_cli_errors():
    import subprocess
    import sys

    for flags, needle in [(["--turbo-update-interval", "0"], "--turbo-update-interval"),
                          (["--speculative-algorithm", "TURBO", "--speculative-draft-model-path", "turbo-tiny-eagle3",
                            "--speculative-eagle-topk", "2"], "--speculative-eagle-topk"),
                          (["--speculative-algorithm", "TURBO", "--speculative-draft-model-path", "turbo-tiny-draft"],
                           "not an EAGLE3 head")]:
        r = subprocess.run([sys.executable, "-m", "sglang_turbo.launch_server", *flags], capture_output=True,
                           text=True, timeout=120, env={**os.environ})
        assert r.returncode == 2 and needle in r.stderr, (flags, r.returncode, r.stderr[-2000:])


def test_a_server_without_turbo_answers_404_naming_the_flag(server):
    r = requests.get(f"{server}/turbo/speculator", timeout=30)
    assert r.status_code == 404 and "--speculative-algorithm TURBO" in r.json()["error"]
