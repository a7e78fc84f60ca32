"""SGLang's frontend language (``sgl.function``, ``gen``, ``select``, ``fork``, ``run_batch``)
against the shared server through ``sgl.RuntimeEndpoint``.

Every program run passes ``backend=`` explicitly: nothing here sets a global default backend.
"""

from __future__ import annotations

import pytest
import sglang as sgl

CHOICES = ["yes", "no", "maybe"]


@pytest.fixture(scope="module")
def backend(server):
    return sgl.RuntimeEndpoint(server)


@sgl.function
def answer(s, question):
    s += "Question: " + question + "\nAnswer:"
    s += sgl.gen("answer", max_tokens=6, temperature=0, ignore_eos=True)


@sgl.function
def choose(s):
    s += "def is_sorted(xs):\n    return "
    s += sgl.select("choice", choices=CHOICES)


@sgl.function
def two_branches(s):
    s += "Two ways to reverse a list in Python:\n"
    forks = s.fork(2)
    for i, f in enumerate(forks):
        f += f"{i + 1}. "
        f += sgl.gen("way", max_tokens=4, temperature=0, ignore_eos=True)
    forks.join()
    s += "First: " + forks[0]["way"] + "\nSecond: " + forks[1]["way"]
    s["branch_completion_tokens"] = [f.get_meta_info("way")["completion_tokens"] for f in forks]


def test_no_default_backend_is_set_by_importing_the_tests():
    from sglang.lang.global_config import global_config

    assert global_config.default_backend is None, f"{global_config.default_backend=}"


def test_gen_produces_max_tokens_tokens(backend):
    state = answer.run(question="What does len() return?", backend=backend)
    assert state.error() is None, f"{state.error()=}"
    completion = state.get_meta_info("answer")["completion_tokens"]
    assert completion == 6, f"{completion=} {state['answer']=}"


def test_gen_output_is_appended_to_the_program_text(backend):
    state = answer.run(question="What does len() return?", backend=backend)
    text, out = state.text(), state["answer"]
    assert text == "Question: What does len() return?\nAnswer:" + out, f"{text=} {out=}"


def test_greedy_gen_is_repeatable(backend):
    first = answer.run(question="Name a sorting algorithm.", backend=backend)["answer"]
    second = answer.run(question="Name a sorting algorithm.", backend=backend)["answer"]
    assert first == second, f"{first=} {second=}"


def test_select_answers_one_of_the_choices(backend):
    state = choose.run(backend=backend)
    assert state.error() is None and state["choice"] in CHOICES, f"{state.error()=} {state['choice']=} {CHOICES=}"


def test_select_appends_its_choice_to_the_program_text(backend):
    state = choose.run(backend=backend)
    text = state.text()
    assert text == "def is_sorted(xs):\n    return " + state["choice"], f"{text=}"


def test_fork_runs_both_branches_and_joins_their_variables(backend):
    state = two_branches.run(backend=backend)
    text = state.text()
    assert state.error() is None and text.startswith("Two ways to reverse a list in Python:\nFirst: ") \
        and "\nSecond: " in text, f"{state.error()=} {text=}"


def test_forked_branches_each_generate_max_tokens_tokens(backend):
    state = two_branches.run(backend=backend)
    counts = state["branch_completion_tokens"]
    assert counts == [4, 4], f"{counts=} {state.text()=}"


def test_run_batch_returns_one_state_per_argument_set(backend):
    questions = ["What is a tuple?", "What is a dict?", "What is a set?"]
    states = answer.run_batch([{"question": q} for q in questions], backend=backend)
    errors = [s.error() for s in states]
    assert len(states) == len(questions) and errors == [None] * len(questions), f"{len(states)=} {errors=}"


def test_run_batch_equals_running_each_program_alone(backend):
    questions = ["What is a tuple?", "What is a dict?", "What is a tuple?"]
    batched = [s["answer"] for s in answer.run_batch([{"question": q} for q in questions], backend=backend)]
    alone = [answer.run(question=q, backend=backend)["answer"] for q in questions]
    assert batched == alone, f"{batched=} {alone=}"
