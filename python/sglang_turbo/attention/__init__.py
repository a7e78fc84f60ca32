"""Attention backends we register with SGLang (see docs/plugins.md)."""

from __future__ import annotations

BACKEND_NAME = "turbo_native"


def register() -> None:
    from sglang.srt.layers.attention.attention_registry import register_attention_backend
    from sglang.srt.server_args import add_attention_backend_choices

    @register_attention_backend(BACKEND_NAME)
    def create_turbo_native_backend(runner):
        from .backend import TurboNativeAttnBackend

        return TurboNativeAttnBackend(runner)

    add_attention_backend_choices([BACKEND_NAME])
