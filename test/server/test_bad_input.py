"""Bad requests get a 4xx with a message, and the server keeps serving afterwards.

Upstream 0.5.23 already rejects most of these; the empty prompt, out-of-vocabulary
ids and unknown top-level fields are sglang-turbo's (python/sglang_turbo/validation.py):
without it the first two kill the scheduler and the last is silently ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import requests

CONTEXT_LEN = 4096
VOCAB = 4096
CHAT = [{"role": "user", "content": "hi"}]


@dataclass(frozen=True)
class Bad:
    id: str
    path: str
    body: object  # a dict (sent as JSON) or bytes (sent verbatim)


BAD_REQUESTS = [
    Bad("malformed-json", "/generate", b'{"text": "def f(", "sampling_params": {'),
    Bad("malformed-json-completions", "/v1/completions", b'{"model": "default", "prompt": '),
    Bad("negative-max-new-tokens", "/generate", {"text": "x = 1", "sampling_params": {"max_new_tokens": -1}}),
    Bad("negative-max-tokens-completions", "/v1/completions", {"model": "default", "prompt": "x = 1", "max_tokens": -1}),
    Bad("absurd-max-new-tokens", "/generate", {"text": "x = 1", "sampling_params": {"max_new_tokens": 10**9}}),
    Bad("absurd-max-tokens-chat", "/v1/chat/completions", {"model": "default", "messages": CHAT, "max_tokens": 10**9}),
    Bad("prompt-longer-than-context", "/generate", {"input_ids": [5] * (CONTEXT_LEN + 10), "sampling_params": {"max_new_tokens": 1}}),
    Bad("text-longer-than-context", "/generate", {"text": "a b " * 6000, "sampling_params": {"max_new_tokens": 1}}),
    Bad("negative-temperature", "/generate", {"text": "x = 1", "sampling_params": {"temperature": -0.5}}),
    Bad("negative-temperature-chat", "/v1/chat/completions", {"model": "default", "messages": CHAT, "temperature": -0.5}),
    Bad("top-p-above-one", "/generate", {"text": "x = 1", "sampling_params": {"top_p": 1.5}}),
    Bad("top-p-above-one-completions", "/v1/completions", {"model": "default", "prompt": "x = 1", "top_p": 1.5}),
    Bad("empty-text", "/generate", {"text": "", "sampling_params": {"max_new_tokens": 4}}),
    Bad("empty-input-ids", "/generate", {"input_ids": [], "sampling_params": {"max_new_tokens": 4}}),
    Bad("empty-text-in-batch", "/generate", {"text": ["x = 1", ""], "sampling_params": {"max_new_tokens": 4}}),
    Bad("empty-prompt-completions", "/v1/completions", {"model": "default", "prompt": "", "max_tokens": 4}),
    Bad("input-id-equal-to-vocab-size", "/generate", {"input_ids": [1, VOCAB], "sampling_params": {"max_new_tokens": 4}}),
    Bad("input-id-far-outside-vocab", "/generate", {"input_ids": [1, 10**6], "sampling_params": {"max_new_tokens": 4}}),
    Bad("negative-input-id", "/generate", {"input_ids": [1, -1], "sampling_params": {"max_new_tokens": 4}}),
    Bad("out-of-vocab-prompt-ids-completions", "/v1/completions", {"model": "default", "prompt": [1, VOCAB + 7], "max_tokens": 4}),
    Bad("unknown-field-generate", "/generate", {"text": "x = 1", "tempreature": 0}),
    Bad("unknown-field-completions", "/v1/completions", {"model": "default", "prompt": "x = 1", "max_tokns": 4}),
    Bad("unknown-field-chat", "/v1/chat/completions", {"model": "default", "messages": CHAT, "top_kk": 3}),
]
UNKNOWN_FIELD = {  # case id -> the field its message must name
    "unknown-field-generate": "tempreature",
    "unknown-field-completions": "max_tokns",
    "unknown-field-chat": "top_kk",
}

OUT_OF_VOCAB = {  # cases whose last prompt id is outside [0, VOCAB)
    "input-id-equal-to-vocab-size", "input-id-far-outside-vocab", "negative-input-id", "out-of-vocab-prompt-ids-completions",
}


def send(base_url: str, bad: Bad) -> requests.Response:
    if isinstance(bad.body, bytes):
        return requests.post(f"{base_url}{bad.path}", data=bad.body, headers={"Content-Type": "application/json"}, timeout=60)
    return requests.post(f"{base_url}{bad.path}", json=bad.body, timeout=60)


def error_message(r: requests.Response) -> str:
    """The human-readable message of an error answer, whatever the endpoint's error shape."""
    try:
        body = r.json()
    except ValueError:
        return r.text
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            return str(err.get("message") or err.get("detail") or "")
        if isinstance(err, str):
            return err
        return str(body.get("message") or body.get("detail") or "")
    return json.dumps(body)


def assert_still_serving(base_url: str) -> None:
    r = requests.post(
        f"{base_url}/generate",
        json={"text": "def ok():", "sampling_params": {"max_new_tokens": 2, "temperature": 0, "ignore_eos": True}},
        timeout=120,
    )
    n = len(r.json().get("output_ids", [])) if r.status_code == 200 else None
    assert r.status_code == 200 and n == 2, f"after the bad request: {r.status_code=} {n=} {r.text[:500]=}"


@pytest.mark.parametrize("bad", BAD_REQUESTS, ids=lambda b: b.id)
def test_bad_request_is_answered_with_a_4xx_status(server, bad):
    r = send(server, bad)
    assert 400 <= r.status_code < 500, f"{bad.id}: {r.status_code=} {r.text[:500]=}"


@pytest.mark.parametrize("bad", BAD_REQUESTS, ids=lambda b: b.id)
def test_bad_request_answer_carries_a_non_empty_message(server, bad):
    r = send(server, bad)
    message = error_message(r)
    assert message.strip(), f"{bad.id}: {r.status_code=} {message=} {r.text[:500]=}"


@pytest.mark.parametrize("bad", BAD_REQUESTS, ids=lambda b: b.id)
def test_server_still_generates_after_a_bad_request(server, bad):
    send(server, bad)
    assert_still_serving(server)


@pytest.mark.parametrize("bad", [b for b in BAD_REQUESTS if b.id in UNKNOWN_FIELD], ids=lambda b: b.id)
def test_unknown_field_error_names_the_field(server, bad):
    message = error_message(send(server, bad))
    field = UNKNOWN_FIELD[bad.id]
    assert field in message, f"{field=} {message=}"


@pytest.mark.parametrize("bad", [b for b in BAD_REQUESTS if b.id in OUT_OF_VOCAB], ids=lambda b: b.id)
def test_out_of_vocabulary_error_names_the_token_id(server, bad):
    ids = bad.body["input_ids"] if "input_ids" in bad.body else bad.body["prompt"]
    offending = str(ids[-1])
    message = error_message(send(server, bad))
    assert offending in message, f"{offending=} {message=}"


def test_several_bad_requests_in_a_row_leave_the_server_serving(server):
    for bad in BAD_REQUESTS:
        send(server, bad)
    assert_still_serving(server)


def test_known_fields_of_generate_are_still_accepted(server):
    """The unknown-field check must not reject upstream's own optional fields."""
    r = requests.post(f"{server}/generate", json={
        "text": "x = 1", "sampling_params": {"max_new_tokens": 1, "temperature": 0},
        "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": 2, "rid": "known-fields-1",
        "stream": False,
    }, timeout=60)
    assert r.status_code == 200, f"{r.status_code=} {r.text[:500]=}"


def test_known_fields_of_chat_completions_are_still_accepted(server):
    r = requests.post(f"{server}/v1/chat/completions", json={
        "model": "default", "messages": CHAT, "max_tokens": 1, "temperature": 0, "top_p": 0.9, "n": 1,
        "stop": ["\n"], "seed": 3, "user": "tester", "stream": False, "top_k": 5, "ignore_eos": True,
        "max_completion_tokens": 1, "logprobs": False, "frequency_penalty": 0.0, "presence_penalty": 0.0,
    }, timeout=60)
    assert r.status_code == 200, f"{r.status_code=} {r.text[:500]=}"


def test_known_fields_of_completions_are_still_accepted(server):
    r = requests.post(f"{server}/v1/completions", json={
        "model": "default", "prompt": "x = 1", "max_tokens": 1, "temperature": 0, "top_p": 0.9, "n": 1,
        "stop": ["\n"], "seed": 3, "user": "tester", "stream": False, "echo": False, "logprobs": 1,
        "top_k": 5, "ignore_eos": True, "min_tokens": 0, "repetition_penalty": 1.0,
    }, timeout=60)
    assert r.status_code == 200, f"{r.status_code=} {r.text[:500]=}"
