"""The one registration door: SGLang calls :func:`register` (entry point group
``sglang.srt.plugins``, name ``turbo``) once in every process it starts.

Every name we hand SGLang is listed in docs/plugins.md.
"""

from __future__ import annotations

import functools


@functools.cache  # SGLang calls this in every process; a second call is a no-op
def register() -> None:
    from . import attention, validation

    attention.register()  # --attention-backend turbo_native
    validation.register()  # request checks upstream lacks
