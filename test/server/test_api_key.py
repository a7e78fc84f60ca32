"""``--api-key`` (an upstream flag) still guards the server when started through sglang-turbo."""

from __future__ import annotations

import openai
import pytest
import requests

KEY = "secret"
GOOD = {"text": "def f():", "sampling_params": {"max_new_tokens": 2, "temperature": 0}}
CHAT = {"model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def keyed_server(turbo_server_factory):
    with turbo_server_factory(["--max-total-tokens", "16384"], api_key=KEY) as handle:
        yield handle.base_url


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_generate_without_a_key_is_unauthorized(keyed_server):
    r = requests.post(f"{keyed_server}/generate", json=GOOD, timeout=60)
    assert r.status_code == 401, f"{r.status_code=} {r.text[:300]=}"


def test_generate_with_a_wrong_key_is_unauthorized(keyed_server):
    r = requests.post(f"{keyed_server}/generate", json=GOOD, headers=bearer("not-the-secret"), timeout=60)
    assert r.status_code == 401, f"{r.status_code=} {r.text[:300]=}"


def test_generate_with_the_key_as_a_non_bearer_header_is_unauthorized(keyed_server):
    r = requests.post(f"{keyed_server}/generate", json=GOOD, headers={"Authorization": KEY}, timeout=60)
    assert r.status_code == 401, f"{r.status_code=} {r.text[:300]=}"


def test_generate_with_the_right_key_succeeds(keyed_server):
    r = requests.post(f"{keyed_server}/generate", json=GOOD, headers=bearer(KEY), timeout=60)
    assert r.status_code == 200, f"{r.status_code=} {r.text[:300]=}"


def test_chat_completions_without_a_key_is_unauthorized(keyed_server):
    r = requests.post(f"{keyed_server}/v1/chat/completions", json=CHAT, timeout=60)
    assert r.status_code == 401, f"{r.status_code=} {r.text[:300]=}"


def test_openai_client_with_a_wrong_key_raises_authentication_error(keyed_server):
    client = openai.OpenAI(base_url=f"{keyed_server}/v1", api_key="wrong", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError) as excinfo:
        client.chat.completions.create(**CHAT)
    assert excinfo.value.status_code == 401, f"{excinfo.value.status_code=}"


def test_openai_client_with_the_right_key_gets_a_completion(keyed_server):
    client = openai.OpenAI(base_url=f"{keyed_server}/v1", api_key=KEY, max_retries=0, timeout=60)
    resp = client.chat.completions.create(**CHAT)
    assert resp.usage.completion_tokens >= 1, f"{resp.usage=}"


def test_model_info_without_a_key_is_unauthorized(keyed_server):
    r = requests.get(f"{keyed_server}/model_info", timeout=60)
    assert r.status_code == 401, f"{r.status_code=} {r.text[:300]=}"


def test_health_needs_no_key(keyed_server):
    """Upstream exempts health probes from the key (for load balancers)."""
    r = requests.get(f"{keyed_server}/health", timeout=60)
    assert r.status_code == 200, f"{r.status_code=} {r.text[:300]=}"


@pytest.mark.parametrize("path,body", [
    ("/generate", {**GOOD, "tempreature": 0}),
    ("/v1/chat/completions", {**CHAT, "top_kk": 3}),
], ids=["generate", "chat"])
def test_request_without_a_key_is_unauthorized_before_its_fields_are_checked(keyed_server, path, body):
    """The unknown-field check must not answer (and so reveal the API) to a client without the key."""
    r = requests.post(f"{keyed_server}{path}", json=body, timeout=60)
    assert r.status_code == 401, f"{r.status_code=} {r.text[:300]=}"


def test_bad_request_with_the_right_key_still_gets_its_400(keyed_server):
    r = requests.post(f"{keyed_server}/generate", json={**GOOD, "tempreature": 0}, headers=bearer(KEY), timeout=60)
    assert r.status_code == 400, f"{r.status_code=} {r.text[:300]=}"
