"""``TurboEagle3Worker``: upstream's EAGLE-3 worker plus a head that keeps learning (TURBO).

What it adds to ``EAGLEWorkerV2``, each through a method upstream calls on its worker:

- ``verify``: after upstream's verify, the committed positions of each request (their tokens,
  the target's aux-layer features and top-k log-probs) go to the learner's inbox as
  ``turbo.spec.replay.VerifiedSpan``; a non-blocking hand-off, dropped when the inbox is full.
- ``activate_step_by_batch`` (upstream's adaptive hook, before drafting): installs the learner's
  newest version if one was published, then asks ``turbo.spec.controller`` which head drafts this
  round and how many steps (0: plain decoding), and re-points the draft model's weights at that
  head's slot (``turbo.spec.swap``). Every request of a round sees one version.
- ``on_verify_complete_cpu``: the round's accept counts and wall time go back to the controller.
- ``_forward_prefill_batch``: counts what the draft prefills and what the radix cache spared it.
- ``forward_batch_generation``: a decode round the controller runs at lookahead 0 is a plain decode
  step of the target (``_plain_round``), not upstream's one-token verify.

Lookahead changes use upstream's adaptive runtime states (one set of attention backends per
step count), built at start-up for 0..--speculative-num-steps.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
from sglang.srt.environ import envs
from sglang.srt.managers.utils import GenerationBatchResult
from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode
from sglang.srt.runtime_context import get_observability
from sglang.srt.speculative.adaptive_runtime_state import AdaptiveController
from sglang.srt.speculative.eagle_info import EagleDraftInput
from sglang.srt.speculative.eagle_worker_v2 import EAGLEWorkerV2

from turbo.spec.controller import ControllerConfig, RoundPlan, SpeculatorController
from turbo.spec.swap import WeightSlots

from .. import env

logger = logging.getLogger(__name__)

GAUGE_EVERY_ROUNDS = 8  # /metrics lags the live status by at most this many rounds


class _ControllerPolicy:
    """SGLang's ``AdaptiveSpecPolicy`` (what its ``AdaptiveController`` asks) over our worker."""

    def __init__(self, worker: TurboEagle3Worker, max_steps: int) -> None:
        self.worker = worker
        self.candidate_steps = list(range(0, max_steps + 1))
        self._graph_bs: list[int] | None = None

    def set_cuda_graph_bs(self, cuda_graph_bs: list[int] | None) -> None:
        self._graph_bs = cuda_graph_bs

    def cuda_graph_bs_for_step(self, step: int) -> list[int] | None:
        return self._graph_bs

    def get_steps_for_batch(self, batch_size: int) -> int:
        return self.worker._begin_round().steps

    def on_verify_complete(self, num_correct_drafts_per_req: list[int], batch_size: int) -> None:
        self.worker._end_round(num_correct_drafts_per_req)
        return None  # the next round's steps come from get_steps_for_batch


class TurboEagle3Worker(EAGLEWorkerV2):
    def __init__(self, server_args, gpu_id, nccl_port, target_worker) -> None:
        super().__init__(server_args, gpu_id, nccl_port, target_worker)
        # Fallback rounds (lookahead 0) skip the draft's KV catch-up, so plain decoding costs what
        # plain decoding costs (measured: 110 tok/s against 68 with the catch-up, turbo-tiny batch 1).
        # The price: positions decoded in fallback leave holes in that request's draft KV, which
        # lowers acceptance when speculation is probed again (new requests start whole). A user's
        # explicit setting of upstream's variable wins.
        os.environ.setdefault("SGLANG_SPEC_SKIP_ZERO_STEP_DRAFT_EXTEND", "1")
        self.turbo_cfg = env.adaptive_spec_config()
        max_steps = self.speculative_num_steps
        self.controller = SpeculatorController(ControllerConfig(max_steps=max_steps, policy=self.turbo_cfg.controller))
        self.adaptive_controller = AdaptiveController(self, _ControllerPolicy(self, max_steps))

        draft_model = self._draft_worker.draft_runner.model
        # On an accelerator the draft's graphs (captured after this constructor) hold the parameters'
        # addresses: swap by copying into them there. On the CPU nothing is captured: re-point.
        in_place = str(self.device) != "cpu"
        self.slots = WeightSlots(draft_model, in_place=in_place)
        self.slots.capture("static")
        self.slots.add_copy("adaptive", "static")
        self.version = 0
        self.swaps = 0
        self.last_swap_ms: float | None = None
        self.draft_prefill_tokens = 0
        self.draft_prefix_hit_tokens = 0
        # Which head version wrote the draft KV of each token slot (-1: none, a plain round skipped it);
        # grown (doubling) when a slot lies past it.
        self.slot_version = torch.full((0,), -1, dtype=torch.int32)
        self.stale_prefix_tokens = 0  # prefix-hit tokens whose draft KV an older version wrote
        self.hole_prefix_tokens = 0  # ... that no version wrote
        self.spans_dropped = 0
        self._plan: RoundPlan | None = None
        self._round_started: float | None = None
        self._round_accepted: list[int] | None = None
        self._timed = False
        self._activated = False  # this round's activate_step_by_batch already ran (forward_batch_generation)
        self.plain_rounds = 0  # rounds served by _plain_round
        self._plain_rounds_on = env.plain_rounds()

        self.gauges = None
        if get_observability().enable_metrics:
            from .observability import SpeculatorGauges

            self.gauges = SpeculatorGauges()
        self.learner = None
        self.store = None
        self.learning_error: str | None = None
        draft_path = str(server_args.speculative_draft_model_path)
        try:
            self._init_learning(draft_path)
        except Exception as e:  # a head we cannot train still serves, as static EAGLE-3
            self.learning_error = f"{type(e).__name__}: {e}"
            logger.exception("TURBO: adaptive speculator disabled, serving the static head only")

    # ------------------------------------------------------------------ start-up

    def _init_learning(self, draft_path: str) -> None:
        from turbo.spec.eagle3 import Eagle3Head
        from turbo.spec.learner import Learner, LearnerConfig
        from turbo.spec.replay import ReplayConfig
        from turbo.spec.speculator_store import SpeculatorStore, head_fingerprint, head_shapes

        head = Eagle3Head.load(Path(draft_path))
        head.float()
        cfg = self.turbo_cfg
        if cfg.speculator_dir is not None:
            self.store = SpeculatorStore(Path(cfg.speculator_dir), head_fingerprint(head.cfg),
                                         expected=head_shapes(head.cfg))
            restored = self.store.load_latest()
            if restored is not None:
                head.load_state_dict(restored.state_dict, strict=False)
                self._install(restored.version, restored.state_dict)
                logger.info("TURBO: restored speculator version %d from %s", restored.version, restored.path)
        if not cfg.learning:
            return
        self.learner = Learner(
            LearnerConfig(update_interval_tokens=cfg.update_interval, fault=env.learner_fault()),
            ReplayConfig(capacity_tokens=cfg.replay_tokens, topk=cfg.topk),
            head, self.store, start_version=self.version,
        )
        self.learner.start()

    # ------------------------------------------------------------------ hot swap

    def _install(self, version: int, state_dict: dict[str, torch.Tensor]) -> None:
        """Writes a version into the adaptive slot through the draft model's own loader."""
        model = self._draft_worker.draft_runner.model
        items = [(n, t) for n, t in state_dict.items() if "embed_tokens" not in n]
        seconds = self.slots.write("adaptive", lambda: model.load_weights(iter(items)))
        self.version, self.swaps, self.last_swap_ms = version, self.swaps + 1, round(seconds * 1e3, 3)
        self.controller.set_adaptive_ready(True)

    def _begin_round(self) -> RoundPlan:
        """Between scheduler steps: take a newly published version, then plan this round."""
        now = time.perf_counter()
        if self._plan is not None and self._round_accepted is not None:
            seconds = now - self._round_started if self._timed else None
            self.controller.observe(self._plan, self._round_accepted, seconds)
        if self.learner is not None:
            published = self.learner.poll()
            if published is not None:
                self._install(published.version, published.state_dict)
        plan = self.controller.plan()
        # Also in plain rounds: the head that leads then is the one a new request's prefill extends
        # with, and whose draft of the first token the request's first probe uses.
        self.slots.activate(plan.head)
        self._plan, self._round_started, self._round_accepted, self._timed = plan, now, None, True
        if self.gauges is not None and self.controller.rounds % GAUGE_EVERY_ROUNDS == 1:
            self.gauges.update(self.turbo_status())
        return plan

    def _end_round(self, num_correct_drafts_per_req: list[int]) -> None:
        self._round_accepted = list(num_correct_drafts_per_req)

    # ------------------------------------------------------------------ upstream hooks

    def activate_step_by_batch(self, batch_size: int) -> None:
        if self._activated:  # forward_batch_generation planned this round already
            self._activated = False
            return
        super().activate_step_by_batch(batch_size)

    def forward_batch_generation(self, batch, on_publish=None, grammar_barrier=None, pp_proxy_tensors=None):
        if batch.forward_mode.is_decode() and not batch.is_extend_in_batch and pp_proxy_tensors is None:
            self.activate_step_by_batch(batch.seq_lens.shape[0])  # plans the round: its lookahead
            self._activated = True
            if self.speculative_num_steps == 0 and self._plain_round_serves(batch):
                self._activated = False
                return self._plain_round(batch, on_publish)
        return super().forward_batch_generation(batch, on_publish=on_publish, grammar_barrier=grammar_barrier,
                                                pp_proxy_tensors=pp_proxy_tensors)

    # ------------------------------------------------------------------ plain rounds

    def _plain_round_serves(self, batch) -> bool:
        """Whether a lookahead-0 round of ``batch`` can be a plain decode step. Requests whose options
        upstream's verify handles in its own way (grammar, log-probs, hidden states, custom logit
        processors, watermarks) keep upstream's one-token verify. Penalties (``min_new_tokens``,
        repetition ...) and logit bias need no exception: both paths add the same pre-accumulated
        buffers of the step's sampling copy to the logits (eagle_utils.eagle_sample at one draft token,
        SamplingBatchInfo.apply_logits_bias)."""
        info = batch.sampling_info
        draft_input = batch.spec_info
        return (
            self._plain_rounds_on
            and getattr(draft_input, "bonus_tokens", None) is not None
            and not batch.has_grammar
            and not batch.return_logprob
            and not batch.return_hidden_states
            and info is not None
            and not info.has_custom_logit_processor
            and not info.has_watermark_candidates
        )

    def _plain_round(self, batch, on_publish):
        """The target decodes each request's last committed token, as without speculation.

        Upstream runs a lookahead-0 round as a one-token verify: the same arithmetic, but through the
        verify path's bookkeeping (tree buffers, verify sampling, accept-path commit) and the eager
        forward path rather than the decode graph. Here the round is the decode step itself, and the
        result is what that verify returns (one token per request, no draft accepted). Measured at
        batch 1 on the CPU, TURBO never speculating: 0.82x a plain server's tokens/s, against 0.72x
        with upstream's round (docs/adaptive_speculator.md).

        The scheduler undoes every edit to ``batch`` after the round (its forward isolation), then
        applies ``new_seq_lens`` and ``next_draft_input`` itself.
        """
        bs = batch.seq_lens.shape[0]
        committed = batch.seq_lens  # KV-committed lengths; the bonus token is not written yet
        # int64 like a plain decode batch's ids, the dtype the decode graphs were compiled for; the
        # draft state keeps int32, and the first int32 batch recompiled the graph (a 3.5 s stall).
        tokens = batch.spec_info.bonus_tokens.to(torch.int64)
        # The slot upstream's decode preparation reserved at the bonus token's position (the one a
        # one-token verify writes).
        rows = batch.req_pool_indices.to(torch.int64)
        batch.out_cache_loc = self.req_to_token_pool.req_to_token[rows, committed.to(torch.int64)].to(torch.int64)
        batch.input_ids = tokens
        batch.seq_lens = committed + 1  # a decode step counts the token it decodes
        if batch.seq_lens_cpu is not None:
            batch.seq_lens_cpu = batch.seq_lens_cpu + 1
            batch.seq_lens_sum = int(batch.seq_lens_cpu.sum())
        elif batch.seq_lens_sum is not None:
            batch.seq_lens_sum += bs
        batch.spec_info = None
        # The learner trains on the target's aux-layer features of what it verified, plain rounds included.
        capture = CaptureHiddenMode.FULL if self.learner is not None else CaptureHiddenMode.NULL
        step = self.target_worker.forward_batch_generation(batch, capture_hidden_mode=capture)

        predict = step.next_token_ids
        new_seq_lens = batch.seq_lens  # committed + 1; the scheduler puts the batch's own tensor back
        result = GenerationBatchResult(
            logits_output=step.logits_output,
            next_token_ids=predict,
            can_run_cuda_graph=step.can_run_cuda_graph,
            speculative_num_draft_tokens=1,
            next_draft_input=EagleDraftInput(bonus_tokens=predict.to(torch.int32)),
            accept_lens=torch.ones(bs, dtype=torch.int32, device=predict.device),
            accept_index=torch.arange(bs, dtype=torch.int32, device=predict.device).view(bs, 1),
            new_seq_lens=new_seq_lens,
        )
        if on_publish is not None:
            on_publish(new_seq_lens)
        self._stub_skipped_draft_extend(batch, result)  # the draft's catch-up is skipped, as upstream's flag does
        self.plain_rounds += 1
        self._tag_slots(batch.out_cache_loc, -1)  # no head wrote these positions' draft KV
        if self.learner is not None:
            try:
                self._record(batch, tokens, result)
            except Exception:  # never let the learner's feed stop serving
                logger.exception("TURBO: could not record a plain round; learning from it skipped")
        return result

    def _forward_prefill_batch(self, batch, *args, **kwargs):
        self._timed = False  # the running round's interval now includes a prefill
        self.controller.note_request_start()
        if batch.extend_lens is not None:
            self.draft_prefill_tokens += int(sum(batch.extend_lens))
        if batch.prefix_lens is not None and not batch.forward_mode.is_idle():
            self.draft_prefix_hit_tokens += int(sum(batch.prefix_lens))
            self._count_stale_prefix(batch)
        result = super()._forward_prefill_batch(batch, *args, **kwargs)
        if batch.out_cache_loc is not None:
            self._tag_slots(batch.out_cache_loc, self._active_version())
        return result

    # ------------------------------------------------------------------ draft KV versions

    def _active_version(self) -> int:
        return self.version if self.slots.active == "adaptive" else 0

    def _tag_slots(self, slots: torch.Tensor, version: int) -> None:
        slots = slots.to("cpu", torch.int64)
        if slots.numel() == 0:
            return
        try:  # one op in the usual case: each small op costs ~20 us between two forwards on the CPU
            self.slot_version[slots] = version
        except IndexError:  # a slot past the table: grow it (what was written before the error is rewritten)
            need = int(slots.max()) + 1
            grown = torch.full((max(need, 2 * self.slot_version.numel()),), -1, dtype=torch.int32)
            grown[: self.slot_version.numel()] = self.slot_version
            self.slot_version = grown
            self.slot_version[slots] = version

    def _count_stale_prefix(self, batch) -> None:
        """Radix-cache hits whose draft KV another head version (or none) wrote: kept, not recomputed
        (docs/adaptive_speculator.md has the measurement behind that choice)."""
        active = self._active_version()
        table = self.req_to_token_pool.req_to_token
        for pool_idx, n in zip(batch.req_pool_indices.tolist(), batch.prefix_lens):
            if n == 0:
                continue
            slots = table[pool_idx, :n].to("cpu", torch.int64)
            versions = torch.full((n,), -1, dtype=torch.int32)
            known = slots < self.slot_version.numel()
            versions[known] = self.slot_version[slots[known]]
            self.hole_prefix_tokens += int((versions < 0).sum())
            self.stale_prefix_tokens += int(((versions >= 0) & (versions != active)).sum())

    def verify(self, batch, pp_proxy_tensors=None, grammar_barrier=None):
        verify_input = batch.spec_info
        result = super().verify(batch, pp_proxy_tensors=pp_proxy_tensors, grammar_barrier=grammar_barrier)
        if not batch.forward_mode.is_idle():
            # the draft-extend that follows writes the committed slots with the active head, unless a
            # plain round skips it (lookahead 0 with upstream's skip switch on: see __init__)
            skipped = self.speculative_num_steps == 0 and envs.SGLANG_SPEC_SKIP_ZERO_STEP_DRAFT_EXTEND.get()
            index = result.accept_index
            self._tag_slots(batch.out_cache_loc[index[index >= 0]], -1 if skipped else self._active_version())
        if self.learner is not None and not batch.forward_mode.is_idle():
            try:
                self._record(batch, verify_input.draft_token, result)
            except Exception:  # never let the learner's feed stop serving
                logger.exception("TURBO: could not record a verify round; learning from it skipped")
        return result

    def _record(self, batch, verified_tokens, result) -> None:
        """Committed positions of each request -> one VerifiedSpan each (copies, off the live tensors).

        ``verified_tokens``: the round's input tokens, one row per flat verify position."""
        from turbo.spec.replay import VerifiedSpan

        hidden = result.logits_output.hidden_states
        if hidden is None:
            return
        accept_lens = result.accept_lens.tolist()
        index = result.accept_index  # (bs, steps + 1) flat verify rows, -1 past each accept length
        rows = index[index >= 0]  # row-major: request by request, in commit order
        tokens = verified_tokens[rows].to(torch.int64)
        aux = hidden[rows]  # a copy (advanced indexing); the replay buffer picks its storage dtype
        logprobs = result.logits_output.next_token_logits[rows].float().log_softmax(-1)
        top = logprobs.topk(self.turbo_cfg.topk, dim=-1)
        start = 0
        for req, n in zip(batch.reqs, accept_lens):
            span = VerifiedSpan(
                rid=req.rid, token_ids=tokens[start : start + n].cpu(), aux_hidden=aux[start : start + n].cpu(),
                topk_ids=top.indices[start : start + n].cpu(), topk_logprobs=top.values[start : start + n].cpu(),
                n_accepted_drafts=n - 1,
            )
            if not self.learner.submit(span):
                self.spans_dropped += 1
            start += n

    # ------------------------------------------------------------------ readout

    def turbo_status(self) -> dict:
        learner = self.learner.status() if self.learner is not None else None
        controller = self.controller.status()
        return {
            "algorithm": "TURBO",
            "version": self.version,
            "mode": controller["mode"],
            "lookahead": controller["lookahead"],
            "accept_length": controller["accept_length"],
            "draft_acceptance": controller["draft_acceptance"],
            "tokens_per_s_per_request": controller["tokens_per_s_per_request"],
            "rounds": controller["rounds"],
            "learning": self.learner is not None,
            "learning_error": self.learning_error,
            "replay_buffer_tokens": learner["replay_tokens"] if learner else 0,
            "learner_steps": learner["steps"] if learner else 0,
            "learner_alive": bool(learner and learner["alive"]),
            "learner": learner,
            "plain_rounds": self.plain_rounds,
            "swaps": self.swaps,
            "last_swap_ms": self.last_swap_ms,
            "spans_dropped": self.spans_dropped,
            "draft_prefill_tokens": self.draft_prefill_tokens,
            "draft_prefix_hit_tokens": self.draft_prefix_hit_tokens,
            "draft_kv_stale_prefix_tokens": self.stale_prefix_tokens,
            "draft_kv_hole_prefix_tokens": self.hole_prefix_tokens,
            "speculator_dir": self.turbo_cfg.speculator_dir,
            "pid": os.getpid(),
        }
