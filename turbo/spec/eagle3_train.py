"""Train an EAGLE-3 head for an embedded target: ``python -m turbo.spec.eagle3_train --preset turbo-tiny-eagle3``.

The recipe, step by step:
1. Load the target (transformers, fp32) and its tokenizer; rebuild the target's own training stream (or
   only the preset's ``domains`` of it) and its held-out streams of both domains (``turbo.zoo.train``).
2. Records: seeded windows of the training stream, and the target's own greedy continuations of stream
   prompts (the text a greedy server will draft on). ``TargetRecorder`` adds, under no_grad, the target's
   aux-layer hidden states (exactly the tensors SGLang captures) and its next-token logits.
3. ``Eagle3Trainer.step`` on each batch: a training-time-test unroll of ``n_steps`` chained draft steps
   (the head consumes its own hidden states, attention over the growing draft chain), forward KL from the
   target's distribution at each step, weighted ``step_decay ** i``; AdamW.
4. Measure on held-out code and records: per-step conditional acceptance and the expected accept length of
   a 4-step chain (topk 1), on the corpus (teacher-forced proxy) and on the target's greedy continuations
   (an exact replay of greedy chain speculation).
5. Save config.json, model.safetensors, recipe.json, loss.json, loss.png.

The trainer only sees ``RecordBatch`` objects, so an online learner can feed it records from live traffic.
Seeded end to end: the same preset on the same Python and torch gives the same weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

from .eagle3 import Eagle3Config, Eagle3Head, Eagle3Output

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class TTTConfig:
    """How ``Eagle3Trainer`` updates a head from records (shared by the offline recipe and an online learner)."""

    n_steps: int = 4  # chained draft steps unrolled per record (SGLang --speculative-num-steps)
    step_decay: float = 0.8  # loss weight of step i is step_decay ** i
    lr: float = 3e-3
    warmup_steps: int = 30
    total_steps: int | None = None  # cosine decay to 10% over this many steps; None: constant after warm-up
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    feed_draft_tokens: bool = False  # steps >= 1 read the head's own argmax instead of the record's token
    bf16: bool = False  # autocast the head's forward/backward; measured slower than fp32 on this CPU

    def __post_init__(self) -> None:
        assert self.n_steps >= 1, f"n_steps must be >= 1, got {self.n_steps}"
        assert 0.0 < self.step_decay <= 1.0, f"step_decay must be in (0, 1], got {self.step_decay}"

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.total_steps is None:
            return self.lr
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# Domains of the turbo-tiny training stream, in the order the stream packs them (turbo.zoo.corpus).
DOMAINS = ("code", "records")


@dataclass(frozen=True)
class Eagle3Preset:
    """A named recipe: the head's shape, the records it is trained on, the optimiser, the seed."""

    name: str
    target: str = "turbo-tiny"  # a turbo.zoo model
    aux_layer_ids: tuple[int, ...] = (0, 2, 4)  # outputs of target layers 0, 2, 4 (of 6)
    intermediate_size: int = 768
    # records
    seq_len: int = 256
    batch_size: int = 12
    steps: int = 180  # ~20 min on a shared 2-core machine, 1 thread (5-8 s/step)
    greedy_fraction: float = 0.25  # share of training rows that are the target's greedy continuations
    prompt_len: int = 64  # prompt tokens before a greedy continuation (training and evaluation)
    max_code_docs: int | None = None  # None: the target's whole training stream
    # Domains of the training stream, packed in DOMAINS order whatever the order here; held-out evaluation
    # always covers every domain, so a head trained on a subset shows what it never saw.
    domains: tuple[str, ...] = DOMAINS
    # evaluation (held-out)
    eval_windows: int = 48  # corpus windows of seq_len per domain
    eval_prompts: int = 24  # greedy continuations per domain
    seed: int = 0
    ttt: TTTConfig = field(default_factory=TTTConfig)

    def __post_init__(self) -> None:
        assert 0.0 <= self.greedy_fraction <= 1.0, f"greedy_fraction must be in [0, 1], got {self.greedy_fraction}"
        assert self.prompt_len + self.ttt.n_steps + 2 <= self.seq_len, "seq_len too short for prompt + chain"
        unknown = sorted(set(self.domains) - set(DOMAINS))
        assert self.domains and not unknown and len(set(self.domains)) == len(self.domains), (
            f"domains must name one or more of {DOMAINS}, each once (e.g. domains=('code',)); "
            f"got {self.domains!r}" + (f", unknown {unknown}" if unknown else ""))

    @property
    def greedy_rows(self) -> int:
        return round(self.batch_size * self.greedy_fraction)

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, Eagle3Preset] = {
    "turbo-tiny-eagle3": Eagle3Preset(name="turbo-tiny-eagle3", ttt=TTTConfig(warmup_steps=20, total_steps=180)),
    # The adaptive speculator's benchmark fixture: a head that never saw the records domain, so a workload
    # shifting from code to records shows what online learning recovers. ~7 min on 1 thread; never shipped.
    "turbo-tiny-eagle3-code": Eagle3Preset(
        name="turbo-tiny-eagle3-code", steps=80, domains=("code",), ttt=TTTConfig(warmup_steps=20, total_steps=80),
    ),
    # A seconds-long recipe for tests of the trainer itself; never shipped.
    "turbo-tiny-eagle3-smoke": Eagle3Preset(
        name="turbo-tiny-eagle3-smoke", intermediate_size=128, seq_len=48, batch_size=4, steps=30,
        prompt_len=16, max_code_docs=4, eval_windows=2, eval_prompts=2,
        ttt=TTTConfig(warmup_steps=3, total_steps=30),
    ),
}

# Presets that are never written under turbo/zoo/weights: the command line needs --out for them.
FIXTURE_PRESETS = frozenset({"turbo-tiny-eagle3-code"})


# --------------------------------------------------------------------------- records


@dataclass
class RecordBatch:
    """What the trainer learns from: token rows and what the target computed on them.

    input_ids (bsz, seqlen) x[0..T-1]; aux_hidden (bsz, seqlen, n_aux * target_hidden): the target's
    captured features at each position; the target's next-token distribution at each position as either
    target_logits (bsz, seqlen, vocab) or its top-k (target_topk_ids, target_topk_logprobs: (bsz, seqlen,
    k), renormalised over the k); loss_mask (bsz, seqlen): rows whose target distribution is a training
    target (None: all).
    """

    input_ids: torch.Tensor
    aux_hidden: torch.Tensor
    target_logits: torch.Tensor | None = None
    target_topk_ids: torch.Tensor | None = None
    target_topk_logprobs: torch.Tensor | None = None
    loss_mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        assert (self.target_logits is None) != (self.target_topk_ids is None), \
            "give the target distribution as target_logits or as target_topk_ids/logprobs, exactly one"

    def target_argmax(self) -> torch.Tensor:
        if self.target_logits is not None:
            return self.target_logits.argmax(-1)
        return self.target_topk_ids.gather(-1, self.target_topk_logprobs.argmax(-1, keepdim=True)).squeeze(-1)


class TargetRecorder:
    """Runs a transformers Llama target and records what SGLang's EAGLE-3 capture would give the head.

    SGLang (``LlamaForCausalLM.set_eagle3_layers_to_capture``) captures at the input of layer ``id + 1``
    the residual stream (hidden + residual), i.e. the output of layer ``id``: transformers'
    ``output_hidden_states[id + 1]`` (index 0 is the embeddings, the last entry is after the final norm).
    Features are concatenated in ascending layer order, as SGLang's capture list is filled.
    """

    def __init__(self, target, aux_layer_ids: tuple[int, ...]) -> None:
        n_layers = target.config.num_hidden_layers
        assert all(0 <= i < n_layers - 1 for i in aux_layer_ids), f"{aux_layer_ids=} for {n_layers} layers"
        self.target = target.eval()
        self.aux_layer_ids = tuple(aux_layer_ids)

    @torch.no_grad()
    def aux_hidden(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(aux (bsz, seqlen, n_aux * hidden), logits (bsz, seqlen, vocab)), fp32."""
        out = self.target(input_ids, output_hidden_states=True)
        aux = torch.cat([out.hidden_states[i + 1] for i in self.aux_layer_ids], dim=-1)
        return aux.float(), out.logits.float()

    def __call__(self, input_ids: torch.Tensor) -> RecordBatch:
        aux, logits = self.aux_hidden(input_ids)
        return RecordBatch(input_ids=input_ids, aux_hidden=aux, target_logits=logits)

    @torch.no_grad()
    def greedy_continue(self, prompts: torch.Tensor, n_new: int) -> torch.Tensor:
        """(bsz, prompt_len) -> (bsz, prompt_len + n_new): the target's greedy continuation (no stop)."""
        out = self.target(prompts, use_cache=True)
        tokens = [out.logits[:, -1].argmax(-1)]
        for _ in range(n_new - 1):
            out = self.target(tokens[-1][:, None], past_key_values=out.past_key_values, use_cache=True)
            tokens.append(out.logits[:, -1].argmax(-1))
        return torch.cat([prompts, torch.stack(tokens, dim=1)], dim=1)


# --------------------------------------------------------------------------- loss and acceptance


def step_valid(batch: RecordBatch, step: int) -> torch.Tensor:
    """Rows of ``step`` that have a target: row p drafts x[p+2+step], whose distribution is target row
    p+1+step, so rows p < seqlen-1-step; returns valid (bsz, seqlen-1-step) bool."""
    bsz, seqlen = batch.input_ids.shape
    if batch.loss_mask is None:
        return torch.ones(bsz, seqlen - 1 - step, dtype=torch.bool, device=batch.input_ids.device)
    return batch.loss_mask[:, 1 + step :].bool()


def target_logprobs(batch: RecordBatch) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(ids or None for the full vocab, log p, p), each (bsz, seqlen, vocab or k); computed once per batch."""
    if batch.target_logits is not None:
        logp = batch.target_logits.float().log_softmax(-1)
        return None, logp, logp.exp()
    logp = batch.target_topk_logprobs.float().log_softmax(-1)  # renormalised over the k
    return batch.target_topk_ids, logp, logp.exp()


def forward_kl(logits: torch.Tensor, target: tuple, step: int, valid: torch.Tensor) -> torch.Tensor:
    """Mean over valid rows of KL(target || draft) at ``step``; logits (bsz, seqlen-1, vocab)."""
    ids, logp, p = target
    n = valid.shape[1]
    logq = logits[:, :n].float().log_softmax(-1)
    if ids is not None:
        logq = logq.gather(-1, ids[:, 1 + step :])
    kl = (p[:, 1 + step :] * (logp[:, 1 + step :] - logq)).sum(-1)  # (bsz, n)
    return (kl * valid).sum() / valid.sum().clamp(min=1)


def draft_matches(outputs: list[Eagle3Output], batch: RecordBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(match (bsz, seqlen-1, n_steps): draft argmax == target argmax at each step, complete (bsz, seqlen-1):
    rows where every step has a target)."""
    target_top = batch.target_argmax()
    bsz, n = target_top.shape[0], target_top.shape[1] - 1
    match = torch.zeros(bsz, n, len(outputs), dtype=torch.bool)
    complete = torch.ones(bsz, n, dtype=torch.bool)
    for i, out in enumerate(outputs):
        valid = step_valid(batch, i)
        m = valid.shape[1]
        match[:, :m, i] = out.logits[:, :m].argmax(-1) == target_top[:, 1 + i :]
        complete[:, m:] = False
        complete[:, :m] &= valid
    return match, complete


def acceptance(match: torch.Tensor, rows: torch.Tensor) -> dict:
    """Greedy chain acceptance over the selected rows of ``match`` (n, n_steps) bool.

    ``conditional[i]`` = P(draft i matches | drafts < i matched); ``accept_length`` = 1 + sum_i P(drafts
    0..i all match): the expected tokens per verify round (the target's own token included).
    """
    prefix = match[rows].long().cumprod(dim=-1).float()  # (n, n_steps): drafts 0..i all matched
    all_up_to = prefix.mean(0)
    before = torch.cat([torch.ones(1), all_up_to[:-1]])
    conditional = (all_up_to / before.clamp(min=1e-9)).tolist()
    return {"rows": int(prefix.shape[0]), "conditional": [round(c, 4) for c in conditional],
            "accept_length": round(1.0 + all_up_to.sum().item(), 4)}


def chain_replay(match: torch.Tensor, start: int, last: int) -> list[int]:
    """Accept lengths of successive greedy verify rounds on one sequence of the target's greedy tokens.

    match (n, n_steps) for that sequence. A round whose draft extend ended at row p accepts ``a`` leading
    drafts and the target's own token, so the next round starts at p + a + 1; rounds start at ``start``
    (the last prompt row) while p <= ``last`` (the last row with every step's target).
    """
    lengths, p = [], start
    while p <= last:
        a = int(match[p].long().cumprod(0).sum())
        lengths.append(a + 1)
        p += a + 1
    return lengths


# --------------------------------------------------------------------------- trainer


class Eagle3Trainer:
    """One optimiser step per ``RecordBatch``, independent of where the records come from."""

    def __init__(self, head: Eagle3Head, cfg: TTTConfig) -> None:
        self.head, self.cfg = head, cfg
        # NOTE: SGLang replaces embed_tokens with the target's at load time, so it never trains.
        head.model.embed_tokens.weight.requires_grad_(False)
        params = [p for p in head.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW([
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ], lr=cfg.lr, betas=(0.9, 0.95))
        self.n_updates = 0

    def unroll(self, batch: RecordBatch) -> list[Eagle3Output]:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.cfg.bf16):
            return self.head.ttt_unroll(batch.input_ids, batch.aux_hidden, self.cfg.n_steps,
                                        feed_draft_tokens=self.cfg.feed_draft_tokens)

    def step(self, batch: RecordBatch) -> dict:
        """Trains on ``batch``; returns loss, per-step KL and top-1 agreement, lr and gradient norm."""
        self.head.train()
        lr = self.cfg.lr_at(self.n_updates)
        for group in self.opt.param_groups:
            group["lr"] = lr
        outputs = self.unroll(batch)
        target = target_logprobs(batch)
        kls = [forward_kl(out.logits, target, i, step_valid(batch, i)) for i, out in enumerate(outputs)]
        loss = sum(self.cfg.step_decay ** i * kl for i, kl in enumerate(kls))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.head.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.n_updates += 1
        with torch.no_grad():
            match, _ = draft_matches(outputs, batch)
            top1 = []
            for i in range(len(outputs)):
                valid = step_valid(batch, i)
                top1.append(match[:, : valid.shape[1], i][valid].float().mean().item())
        return {"loss": loss.item(), "kl": [k.item() for k in kls], "top1": top1, "lr": lr,
                "grad_norm": grad_norm.item()}

    @torch.no_grad()
    def matches(self, batch: RecordBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Evaluation: ``draft_matches`` of the head's current weights on ``batch`` (no update)."""
        self.head.eval()
        return draft_matches(self.unroll(batch), batch)


# --------------------------------------------------------------------------- the offline recipe


def load_target(name: str):
    """(transformers model in fp32, tokenizers.Tokenizer, config.json dict) of a turbo.zoo model."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    from turbo.zoo.presets import zoo_path

    path = zoo_path(name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    return model, tok, json.loads((path / "config.json").read_text())


def corpus_streams(preset: Eagle3Preset, tok) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Step 1: the target's training stream (or its first ``max_code_docs`` files), only the documents of
    ``preset.domains``, and the held-out streams of every domain, whatever ``preset.domains`` says."""
    from turbo.zoo.corpus import code_documents, record_documents
    from turbo.zoo.presets import PRESETS as ZOO_PRESETS
    from turbo.zoo.train import n_records_for, encode_stream, heldout_streams

    zoo = ZOO_PRESETS[preset.target]
    code = list(code_documents("train", zoo.held_out_fraction))
    n_records = n_records_for(zoo, code)
    if preset.max_code_docs is not None:
        code = code[: preset.max_code_docs]
        n_records = max(1, n_records_for(zoo, code))
    # NOTE: n_records (so the held-out records stream) does not depend on domains; with both domains the
    # stream is the one shipped heads were trained on, code files then records.
    docs = {"code": code, "records": list(record_documents(zoo.seed, n_records))}
    train = encode_stream(tok, [d for name in DOMAINS if name in preset.domains for d in docs[name]])
    return train, heldout_streams(zoo, tok, n_records)


def training_batches(preset: Eagle3Preset, stream: torch.Tensor, recorder: TargetRecorder,
                     gen: torch.Generator) -> Iterator[RecordBatch]:
    """Step 2, endless: each batch has ``batch_size - greedy_rows`` stream windows and ``greedy_rows``
    greedy continuations (drawn from a pool refilled ``4 * batch_size`` prompts at a time)."""
    pool: list[torch.Tensor] = []
    n_windows = preset.batch_size - preset.greedy_rows
    while True:
        while len(pool) < preset.greedy_rows:
            prompts = _windows(stream, 4 * preset.batch_size, preset.prompt_len, gen)
            pool.extend(recorder.greedy_continue(prompts, preset.seq_len - preset.prompt_len).unbind(0))
        rows = [*_windows(stream, n_windows, preset.seq_len, gen).unbind(0)] + pool[: preset.greedy_rows]
        del pool[: preset.greedy_rows]
        yield recorder(torch.stack(rows))


def _windows(stream: torch.Tensor, n: int, width: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, stream.numel() - width, (n,), generator=gen)
    return torch.stack([stream[s : s + width] for s in starts.tolist()])  # (n, width)


def evaluate(trainer: Eagle3Trainer, recorder: TargetRecorder, heldout: dict[str, torch.Tensor],
             preset: Eagle3Preset) -> dict:
    """Step 4, per held-out domain:

    - ``corpus``: consecutive windows of the held-out text, drafted from every row with the record's
      tokens (teacher-forced); rows whose 4 drafts all have targets. A proxy: a greedy server follows the
      target's tokens, not the text's.
    - ``greedy``: the target's greedy continuation of held-out prompts, drafted from every generated row
      (exact for greedy serving: there the record's tokens are the target's), plus ``replay``: the rounds
      a chain server would actually run from the end of each prompt.
    """
    results = {}
    n_steps, width = trainer.cfg.n_steps, preset.seq_len
    for domain, stream in heldout.items():
        n = min(preset.eval_windows, (stream.numel() - 1) // width)
        windows = stream[: n * width].view(n, width)
        match, complete = _batched_matches(trainer, recorder, windows)
        corpus = acceptance(match.flatten(0, 1), complete.flatten())

        n_prompts = min(preset.eval_prompts, stream.numel() // preset.prompt_len)
        prompts = stream[: n_prompts * preset.prompt_len].view(n_prompts, preset.prompt_len)
        seqs = torch.cat([recorder.greedy_continue(prompts[i : i + 16], width - preset.prompt_len)
                          for i in range(0, n_prompts, 16)])
        match, complete = _batched_matches(trainer, recorder, seqs)
        generated = complete.clone()
        generated[:, : preset.prompt_len - 1] = False  # rows drafted from the prompt's last token onward
        greedy = acceptance(match.flatten(0, 1), generated.flatten())
        last = width - 1 - n_steps  # the last row whose n_steps targets exist
        rounds = [r for m in match for r in chain_replay(m, preset.prompt_len - 1, last)]
        greedy["replay_accept_length"] = round(sum(rounds) / len(rounds), 4)
        greedy["replay_rounds"] = len(rounds)
        results[domain] = {"corpus": corpus, "greedy": greedy}
        logger.info("%s: corpus accept %.3f %s, greedy accept %.3f (replay %.3f) %s", domain,
                    corpus["accept_length"], corpus["conditional"], greedy["accept_length"],
                    greedy["replay_accept_length"], greedy["conditional"])
    return results


def _batched_matches(trainer, recorder, rows: torch.Tensor, bsz: int = 16):
    parts = [trainer.matches(recorder(rows[i : i + bsz])) for i in range(0, rows.shape[0], bsz)]
    return torch.cat([m for m, _ in parts]), torch.cat([c for _, c in parts])


def train(preset: Eagle3Preset, out_dir: Path, threads: int | None = None) -> dict:
    """Runs the whole recipe into ``out_dir``; returns the results written to recipe.json."""
    if threads:
        torch.set_num_threads(threads)
    random.seed(preset.seed)
    torch.manual_seed(preset.seed)
    started = time.time()

    target, tok, target_config = load_target(preset.target)
    stream, heldout = corpus_streams(preset, tok)
    recorder = TargetRecorder(target, preset.aux_layer_ids)
    head = create_head(preset, target_config, target)
    trainer = Eagle3Trainer(head, preset.ttt)
    n_trainable = sum(p.numel() for p in head.parameters() if p.requires_grad)
    logger.info("%s: %.2fM trainable parameters, train stream %d tokens", preset.name, n_trainable / 1e6,
                stream.numel())

    gen = torch.Generator().manual_seed(preset.seed)
    batches = training_batches(preset, stream, recorder, gen)
    losses: list[float] = []
    history: list[dict] = []
    bar = tqdm(range(preset.steps), desc=f"train {preset.name}", unit="step")
    for step in bar:
        metrics = trainer.step(next(batches))
        losses.append(metrics["loss"])
        if step % 10 == 0 or step == preset.steps - 1:
            history.append({"step": step, **metrics})
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", top1=" ".join(f"{a:.2f}" for a in metrics["top1"]))
    train_seconds = time.time() - started

    heldout_results = evaluate(trainer, recorder, heldout, preset)
    head.save(out_dir)
    results = {
        "preset": preset.to_dict(),
        "target": preset.target,
        "trainable_parameters": n_trainable,
        "records_seen": preset.steps * preset.batch_size,
        "tokens_seen": preset.steps * preset.batch_size * preset.seq_len,
        "train_stream_tokens": stream.numel(),
        "heldout": heldout_results,
        "final_train_loss": sum(losses[-25:]) / len(losses[-25:]),
        "train_history": history,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "train_seconds": round(train_seconds, 1),
        "wall_seconds": round(time.time() - started, 1),
        "command": f"python -m turbo.spec.eagle3_train --preset {preset.name}"
                   + (f" --out {out_dir}" if preset.name in FIXTURE_PRESETS else ""),
    }
    (out_dir / "recipe.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "loss.json").write_text(json.dumps([round(x, 5) for x in losses]) + "\n")
    from turbo.zoo.train import plot_losses

    plot_losses(losses, out_dir / "loss.png", title=f"{preset.name}: TTT loss (sum of 0.8^i KL)")
    return results


def create_head(preset: Eagle3Preset, target_config: dict, target) -> Eagle3Head:
    """A fresh head whose embedding is the target's and whose lm_head starts as the target's (tied) head."""
    cfg = Eagle3Config.from_target(target_config, preset.aux_layer_ids, preset.intermediate_size)
    head = Eagle3Head(cfg)
    with torch.no_grad():
        head.model.embed_tokens.weight.copy_(target.get_input_embeddings().weight)
        head.lm_head.weight.copy_(target.get_output_embeddings().weight)
    return head


def main(argv: list[str] | None = None) -> None:
    from turbo.zoo.presets import WEIGHTS_DIR

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="turbo-tiny-eagle3", choices=sorted(PRESETS))
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: the shipped one)")
    parser.add_argument("--steps", type=int, default=None, help="override the preset's step count")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared machine)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    preset = PRESETS[args.preset]
    if args.out is None and preset.name in FIXTURE_PRESETS:
        parser.error(f"{preset.name} is a benchmark fixture, never shipped: give --out, e.g. "
                     f"--out benchmark/heads/{preset.name}")
    if args.steps is not None:
        preset = replace(preset, steps=args.steps, ttt=replace(preset.ttt, total_steps=args.steps))
    results = train(preset, args.out or WEIGHTS_DIR / preset.name, threads=args.threads)
    json.dump({d: {k: v["accept_length"] for k, v in r.items()} for d, r in results["heldout"].items()}, sys.stdout)
    print()


if __name__ == "__main__":
    main()
