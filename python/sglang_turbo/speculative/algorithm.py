"""``--speculative-algorithm TURBO``: registered through SGLang's speculative-algorithm registry.

TURBO is EAGLE-3 wherever upstream dispatches on the algorithm (the target captures aux-layer
hidden states, the draft is an EAGLE-3 head with its own KV), so :class:`TurboSpecAlgo` answers
``is_eagle()`` and ``is_eagle3()`` like upstream's EAGLE3 and only its worker differs.
"""

from __future__ import annotations

import logging

from sglang.srt.speculative.spec_registry import CustomSpecAlgo

logger = logging.getLogger(__name__)

NAME = "TURBO"
DEFAULT_STEPS = 4  # the lookahead ceiling when --speculative-num-steps is not given


class TurboSpecAlgo(CustomSpecAlgo):
    def is_eagle(self) -> bool:
        return True

    def is_eagle3(self) -> bool:
        return True

    def __getattr__(self, name: str):
        # Upstream's plugin base class covers only the is_*/supports_* predicates; the scheduler also
        # asks builtin algorithms others (carries_draft_hidden_states, need_topk, ...). TURBO answers
        # those as EAGLE3 does. Only reached for names this class and its base do not define.
        if name.startswith("__"):
            raise AttributeError(name)
        from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

        return getattr(SpeculativeAlgorithm.EAGLE3, name)

    def handle_server_args(self, server_args) -> None:
        """Upstream's EAGLE-family defaults, plus TURBO's own constraints (a chain; synchronous rounds).

        ``server_args`` is upstream's recording stand-in: plain assignments are declared resolutions.
        """
        if server_args.speculative_draft_model_path is None:
            raise ValueError(
                "--speculative-algorithm TURBO needs an EAGLE-3 head: --speculative-draft-model-path "
                "turbo-tiny-eagle3 (or your own; train one: python -m turbo.spec.eagle3_train)"
            )
        topk = server_args.speculative_eagle_topk
        if topk not in (None, 1):
            raise ValueError(
                f"--speculative-eagle-topk {topk}: TURBO drafts a chain (topk 1) so that its controller can "
                "set the lookahead; drop the flag or pass 1"
            )
        steps = server_args.speculative_num_steps or DEFAULT_STEPS
        draft_tokens = server_args.speculative_num_draft_tokens
        if draft_tokens not in (None, steps + 1):
            raise ValueError(
                f"--speculative-num-draft-tokens {draft_tokens}: a TURBO chain of {steps} steps verifies "
                f"{steps + 1} tokens; drop the flag or pass {steps + 1}"
            )
        server_args.speculative_num_steps = steps
        server_args.speculative_eagle_topk = 1
        server_args.speculative_num_draft_tokens = steps + 1
        if server_args.max_running_requests is None:
            server_args.max_running_requests = 48  # upstream's EAGLE default
        # The controller times each round against the next: rounds must not overlap.
        server_args.disable_overlap_schedule = True
        if server_args.enable_mixed_chunk:
            logger.warning("Mixed chunked prefill is disabled: TURBO speculative decoding does not support it.")
            server_args.enable_mixed_chunk = False


def register() -> None:
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    @SpeculativeAlgorithm.register(NAME, supports_overlap=True, spec_class=TurboSpecAlgo)
    def _turbo_worker(server_args):
        from .worker import TurboEagle3Worker  # heavy import only when the algorithm is chosen

        return TurboEagle3Worker
