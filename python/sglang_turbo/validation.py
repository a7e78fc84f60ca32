"""Request validation that upstream 0.5.23 lacks, so bad input gets a 4xx, not a dead server.

Upstream already answers 400 for negative or too-large ``max_new_tokens``,
``temperature < 0``, ``top_p > 1`` and over-long prompts. Two inputs instead
reach the model and kill the scheduler process (and with it the server),
measured on the portable platform:

- an empty prompt (``"text": ""`` with a tokenizer that adds no BOS, or
  ``"input_ids": []``): the forward pass reshapes a 0-token tensor and raises;
- token ids outside ``[0, vocab_size)``: an index error in the embedding.

Both are checked where upstream checks prompt length, in the tokenizer
manager, before anything is sent to the scheduler; the ``ValueError`` raised
there is what upstream's HTTP layer already turns into a 400 with the message.

Upstream also ignores unknown top-level fields (``{"text": "hi", "tempreature": 0}``
answers 200 with the typo silently dropped). :class:`UnknownFieldsMiddleware`
answers 400 naming the field on ``/generate``, ``/v1/completions`` and
``/v1/chat/completions``.
"""

from __future__ import annotations

import dataclasses
import functools
import json

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

# SEAM: TokenizerManager._validate_one_request is upstream's own per-request check
# (context length, logprob ids); no registry exists for request validation, so a
# BEFORE hook adds ours next to it.
VALIDATE_TARGET = "sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request"


def check_prompt_ids(input_ids: list[int] | None, vocab_size: int, is_generation: bool) -> None:
    """Raises ValueError (-> HTTP 400) for an empty generation prompt or an out-of-vocabulary id."""
    if input_ids is None:
        return  # input_embeds requests carry no ids
    if is_generation and len(input_ids) == 0:
        raise ValueError("The prompt is empty: give at least one token of `text` or `input_ids`.")
    for token_id in input_ids:
        if not 0 <= token_id < vocab_size:
            raise ValueError(f"input_ids contains token id {token_id}, outside the vocabulary [0, {vocab_size}).")


def _before_validate_one_request(manager, obj, input_ids, *args, **kwargs):
    check_prompt_ids(input_ids, manager.model_config.vocab_size, manager.is_generation)
    return None  # arguments unchanged


@functools.cache
def known_fields(path: str) -> frozenset[str] | None:
    """Top-level JSON fields the endpoint at ``path`` accepts; None for endpoints we do not check."""
    if path == "/generate":
        from sglang.srt.managers.io_struct import GenerateReqInput

        return frozenset(f.name for f in dataclasses.fields(GenerateReqInput))
    if path in ("/v1/completions", "/v1/chat/completions"):
        from sglang.srt.entrypoints.openai import protocol

        model = protocol.CompletionRequest if path == "/v1/completions" else protocol.ChatCompletionRequest
        names = set(model.model_fields)
        names |= {f.alias for f in model.model_fields.values() if f.alias}
        return frozenset(names)
    return None


def unknown_fields_error(path: str, body: bytes) -> tuple[int, dict] | None:
    """(status, JSON error) when ``body`` names a field the endpoint does not know; None to pass it on."""
    known = known_fields(path)
    if known is None:
        return None
    try:
        payload = json.loads(body)
    except ValueError:
        return None  # upstream answers malformed JSON itself
    if not isinstance(payload, dict):
        return None
    unknown = sorted(set(payload) - known)
    if not unknown:
        return None
    message = f"Unknown field(s) in the request body: {', '.join(map(repr, unknown))}."
    if path == "/generate":
        return 400, {"error": {"message": message}}
    return 400, {"object": "error", "message": message, "type": "BadRequestError", "param": unknown[0], "code": 400}


class UnknownFieldsMiddleware:
    """ASGI middleware: rejects unknown top-level fields before FastAPI drops them silently."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or known_fields(scope["path"]) is None:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if headers.get(b"content-encoding"):
            return await self.app(scope, receive, send)  # compressed: leave it to upstream
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, receive, send)  # client went away
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        error = unknown_fields_error(scope["path"], body)
        if error is not None:
            status, payload = error
            data = json.dumps(payload).encode()
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
            await send({"type": "http.response.body", "body": data})
            return

        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _before_launch_server(*args, **kwargs):
    from sglang.srt.entrypoints.http_server import app

    if not any(m.cls is UnknownFieldsMiddleware for m in app.user_middleware):
        app.add_middleware(UnknownFieldsMiddleware)
    return None


# SEAM: the FastAPI app is built at import of http_server; adding middleware is only
# allowed before it starts, and launch_server is the last public call before that.
LAUNCH_TARGET = "sglang.srt.entrypoints.http_server.launch_server"


def register() -> None:
    HookRegistry.register(VALIDATE_TARGET, _before_validate_one_request, HookType.BEFORE)
    HookRegistry.register(LAUNCH_TARGET, _before_launch_server, HookType.BEFORE)
