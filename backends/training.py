"""The shared training loop of the fine-tuning unlearning baselines (GA, GD, KL, DPO, NPO).

Imported lazily (from a method's ``apply``), so torch is imported at the top.

Examples
    A forget example is one forget question with its gold answer (pushed
    away from) and its refusal target (preferred by DPO); a retain example is
    a retain question with its answer.  Each is ``prompt = handle.prompt_ids(q)``
    followed by ``completion = handle.encode_answer(a)``; losses only ever look
    at completion tokens.  Merged requests (query merging) are split back
    into their questions: fine-tuning trains on items, not merged prompts.

Losses (the TOFU / open-unlearning definitions; ``NLL`` is the mean token
negative log-likelihood of the batch's completions, ``logp`` the SUM of a
completion's token log-probabilities, ``ref`` the original model).  Each
objective is its method class in :mod:`backends.methods.finetune`, whose
``forget_term`` / ``retain_term`` / ``loss`` hooks read the mini-batch through
:class:`LossBatch`; :func:`step_loss` only builds the batch:

* ``ga``:  ``-NLL(forget)``
* ``gd``:  ``gamma * -NLL(forget) + alpha * NLL(retain)``
* ``kl``:  ``gamma * -NLL(forget) + alpha * KL(ref || model)`` on the retain
  completions' next-token distributions (mean over completion tokens)
* ``dpo``: ``gamma * -(2/beta) * mean log sigmoid(beta * ((logp(refusal) - ref)
  - (logp(gold) - ref))) + alpha * NLL(retain)``
* ``npo``: the DPO loss without the preferred term,
  ``gamma * -(2/beta) * mean log sigmoid(-beta * (logp(gold) - ref)) + alpha * NLL(retain)``

Memory-aware reference
    The reference tools keep a second full copy of the model for KL/DPO/NPO.
    Every quantity those losses read from the reference is a function of
    FIXED sequences (the forget answers, the refusal targets, the retain
    set), so :class:`PrecomputedReference` computes them once before
    training with the original weights and keeps only these numbers: one
    summed log-probability per forget/refusal sequence and, for KL, the
    next-token log-distribution at every retain completion position.  The
    latter is ``positions x vocab`` floats; when it would exceed
    ``KL_FULL_BUDGET`` bytes (or when ``kl_top_k`` is set) only the top-k
    log-probabilities per position are kept plus the log of the remaining
    mass, and KL is computed over those k+1 buckets (the KL of the
    coarse-grained distributions: a lower bound of the full KL, equal to it
    when k covers the vocabulary).  :class:`LiveReference` is the reference
    tools' behaviour (a deep copy queried every step); it exists for the
    tests and the memory benchmark, which check that both give the same
    numbers.

Training loop (:func:`train`): AdamW (weight decay 0.01) with linear warm-up
then linear decay, shuffled mini-batches from a seeded generator (each forget
batch is paired with the next retain batch of the same size, the retain order
cycling), gradient clipping, a non-finite guard (a NaN/inf loss or gradient
raises :class:`NonFiniteError`, so the transaction rolls back), one
``Progress`` event per optimisation step carrying the loss (cancel is checked
there), and early stops (``max_steps``, forget NLL reaching a level, retain
NLL growing past a ratio of its first value).  The model stays in eval mode
(no dropout) and the global RNG is forked, so a run is bit-for-bit
deterministic on CPU for a given seed and thread count.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .batching import pad_right
from .errors import NonFiniteError, UserError
from .events import Log, Tracker

if TYPE_CHECKING:
    from .methods.base import EditContext
    from .methods.finetune import FineTune
    from .model import ModelHandle
    from .targets import Request

KL_FULL_BUDGET = 128 * 2 ** 20   # bytes of full retain distributions kept before switching to top-k
KL_AUTO_TOP_K = 512


# --------------------------------------------------------------------------- examples


@dataclass
class Example:
    prompt: list[int]
    completion: list[int]


@dataclass
class ForgetExample:
    question: str
    gold: Example          # question -> gold answer (pushed away from)
    refusal: Example       # question -> refusal target (preferred by DPO)


def make_example(handle: ModelHandle, question: str, answer: str) -> Example:
    comp = handle.encode_answer(answer)
    if not comp:
        raise UserError(f"the answer {answer!r} encodes to no tokens", f"question {question!r}")
    return Example(handle.prompt_ids(question), comp)


def forget_examples(handle: ModelHandle, requests: Sequence[Request]) -> list[ForgetExample]:
    out = []
    for r in requests:
        questions = list(r.questions) or [r.prompt]
        answers = list(r.answers)
        if len(answers) != len(questions):
            raise UserError(f"request {', '.join(r.item_ids) or r.prompt!r} has {len(questions)} questions but "
                            f"{len(answers)} gold answers; fine-tuning baselines need the gold answers",
                            "requests")
        for q, a in zip(questions, answers):
            out.append(ForgetExample(q, make_example(handle, q, a), make_example(handle, q, r.target)))
    return out


def retain_examples(handle: ModelHandle, items: Sequence[Any]) -> list[Example]:
    return [make_example(handle, it.question, it.answer) for it in items]


@dataclass
class Packed:
    """Right-padded sequences plus, per sequence, the positions predicting its completion."""

    ids: torch.Tensor          # [B, T]
    mask: torch.Tensor         # [B, T]
    target_mask: torch.Tensor  # [B, T-1] bool: logits[:, :-1] position predicts ids[:, 1:]
    targets: torch.Tensor      # [B, T-1] next-token ids


def pack(examples: Sequence[Example], pad_id: int, device: Any = "cpu") -> Packed:
    seqs = [list(e.prompt) + list(e.completion) for e in examples]
    ids, mask = pad_right(seqs, pad_id)
    tmask = torch.zeros((len(examples), ids.shape[1] - 1), dtype=torch.bool)
    for row, (e, seq) in enumerate(zip(examples, seqs)):
        tmask[row, len(e.prompt) - 1:len(seq) - 1] = True
    return Packed(ids.to(device), mask.to(device), tmask.to(device), ids[:, 1:].to(device))


def completion_logits(model: Any, packed: Packed) -> torch.Tensor:
    """Logits at every completion-predicting position, ``[N, vocab]`` (rows in sequence order)."""
    out = model(input_ids=packed.ids, attention_mask=packed.mask, use_cache=False)
    return out.logits[:, :-1][packed.target_mask].float()


def split_rows(packed: Packed) -> list[int]:
    """Number of completion positions per sequence (to split ``completion_logits`` rows)."""
    return packed.target_mask.sum(dim=1).tolist()


def token_logprobs(logits: torch.Tensor, packed: Packed) -> torch.Tensor:
    """log P(gold next token) at each completion position, ``[N]``."""
    gold = packed.targets[packed.target_mask]
    return torch.log_softmax(logits, dim=-1).gather(1, gold[:, None]).squeeze(1)


def sequence_logprobs(logits: torch.Tensor, packed: Packed) -> torch.Tensor:
    """Summed completion log-probability per sequence, ``[B]``."""
    tok = token_logprobs(logits, packed)
    return torch.stack([c.sum() for c in torch.split(tok, split_rows(packed))])


# --------------------------------------------------------------------------- KL


def bucket_kl(cur_logp: torch.Tensor, ref_idx: torch.Tensor | None, ref_logp: torch.Tensor,
              ref_rest: torch.Tensor | None) -> torch.Tensor:
    """KL(ref || current) per position.

    ``cur_logp``: current log-distribution ``[N, V]``.  Full reference:
    ``ref_idx`` None, ``ref_logp`` ``[N, V]``.  Top-k reference: ``ref_idx``
    ``[N, k]`` token ids, ``ref_logp`` their log-probs, ``ref_rest`` the log of
    the remaining mass; the current distribution is bucketed the same way.
    """
    if ref_idx is None:
        return (ref_logp.exp() * (ref_logp - cur_logp)).sum(dim=-1)
    cur_top = cur_logp.gather(1, ref_idx)
    cur_rest = rest_logmass(cur_logp, ref_idx)
    head = (ref_logp.exp() * (ref_logp - cur_top)).sum(dim=-1)
    tail = ref_rest.exp() * (ref_rest - cur_rest)
    return head + torch.where(torch.isfinite(ref_rest), tail, torch.zeros_like(tail))


def rest_logmass(logp: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """log of the probability mass outside the ids ``idx`` ``[N, k]``: the logsumexp of the other entries.
    Not ``log(1 - sum(top))``: once a model puts nearly all its mass on the top ids (a memorised answer)
    that sum rounds to 1 in float32 and the log to -inf, which made the KL infinite."""
    return torch.logsumexp(logp.scatter(1, idx, float("-inf")), dim=-1)


def top_k_table(ref_logp: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    vals, idx = ref_logp.topk(k, dim=-1)
    return idx, vals, rest_logmass(ref_logp, idx)


# --------------------------------------------------------------------------- references


def _batches(n: int, size: int) -> Iterator[list[int]]:
    for s in range(0, n, max(1, size)):
        yield list(range(s, min(n, s + max(1, size))))


class PrecomputedReference:
    """The original model's numbers the losses need, computed once (no model copy kept)."""

    kind = "precomputed"

    def __init__(self, model: Any, pad_id: int, forget: Sequence[ForgetExample], retain: Sequence[Example],
                 need_gold: bool, need_refusal: bool, need_retain_dist: bool, kl_top_k: int | None,
                 batch_size: int = 8, tracker: Tracker | None = None, device: Any = "cpu") -> None:
        self.kl_top_k = kl_top_k
        self.gold_logp = torch.zeros(len(forget)) if need_gold else None
        self.refusal_logp = torch.zeros(len(forget)) if need_refusal else None
        self.retain_rows: list[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]] = []
        with torch.no_grad():
            for which, store in (("gold", self.gold_logp), ("refusal", self.refusal_logp)):
                if store is None:
                    continue
                for idx in _batches(len(forget), batch_size):
                    p = pack([getattr(forget[i], which) for i in idx], pad_id, device)
                    store[idx] = sequence_logprobs(completion_logits(model, p), p).cpu()
                    if tracker:
                        tracker.step(len(idx))
            if need_retain_dist:
                for idx in _batches(len(retain), batch_size):
                    p = pack([retain[i] for i in idx], pad_id, device)
                    logp = torch.log_softmax(completion_logits(model, p), dim=-1).cpu()
                    for rows in torch.split(logp, split_rows(p)):
                        if kl_top_k is None:
                            self.retain_rows.append((None, rows.clone(), None))
                        else:
                            self.retain_rows.append(top_k_table(rows, kl_top_k))
                    if tracker:
                        tracker.step(len(idx))

    @property
    def nbytes(self) -> int:
        n = 0
        for t in (self.gold_logp, self.refusal_logp):
            n += 0 if t is None else t.numel() * t.element_size()
        for row in self.retain_rows:
            n += sum(t.numel() * t.element_size() for t in row if t is not None)
        return n

    def forget_logp(self, which: str, idx: list[int], _packed: Packed) -> torch.Tensor:
        return (self.gold_logp if which == "gold" else self.refusal_logp)[idx]

    def retain_kl(self, cur_logits: torch.Tensor, idx: list[int], _packed: Packed) -> torch.Tensor:
        cur = torch.log_softmax(cur_logits, dim=-1)
        rows = [self.retain_rows[i] for i in idx]
        ref_idx = None if rows[0][0] is None else torch.cat([r[0] for r in rows])
        ref_logp = torch.cat([r[1] for r in rows])
        ref_rest = None if rows[0][2] is None else torch.cat([r[2] for r in rows])
        dev = cur.device
        return bucket_kl(cur, None if ref_idx is None else ref_idx.to(dev), ref_logp.to(dev),
                         None if ref_rest is None else ref_rest.to(dev))


class LiveReference:
    """The reference tools' way: a frozen deep copy of the model queried at every step."""

    kind = "live"

    def __init__(self, model: Any, kl_top_k: int | None) -> None:
        self.model = copy.deepcopy(model)
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.kl_top_k = kl_top_k
        self.nbytes = sum(p.numel() * p.element_size() for p in self.model.parameters())

    def forget_logp(self, which: str, idx: list[int], packed: Packed) -> torch.Tensor:
        with torch.no_grad():
            return sequence_logprobs(completion_logits(self.model, packed), packed).cpu()

    def retain_logp(self, packed: Packed) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(completion_logits(self.model, packed), dim=-1)

    def retain_kl(self, cur_logits: torch.Tensor, idx: list[int], packed: Packed) -> torch.Tensor:
        ref = self.retain_logp(packed)
        cur = torch.log_softmax(cur_logits, dim=-1)
        if self.kl_top_k is None:
            return bucket_kl(cur, None, ref, None)
        return bucket_kl(cur, *top_k_table(ref, self.kl_top_k))


def resolve_kl_top_k(requested: int | None, n_positions: int, vocab: int) -> int | None:
    """None = the full distribution.  Auto: full when it fits ``KL_FULL_BUDGET``, else top-512."""
    if requested is not None:
        return None if requested <= 0 or requested >= vocab else requested
    return None if n_positions * vocab * 4 <= KL_FULL_BUDGET else min(KL_AUTO_TOP_K, vocab)


# --------------------------------------------------------------------------- config and trainable weights


@dataclass(frozen=True)
class TrainConfig:
    """The loop's settings: a view of a fine-tuning method's Params with the auto values resolved.

    No defaults: built only by ``FineTune.train_config`` (through
    :func:`backends.methods.base.settings_view`, same field names as the
    Params).  The loss weights (alpha, gamma, beta) are read by the objective's
    own loss hooks from its Params.
    """

    epochs: int
    lr: float                   # resolved: 1e-4 for full fine-tuning, 1e-3 for LoRA unless given
    batch_size: int
    weight_decay: float
    warmup_epochs: float
    max_grad_norm: float
    max_steps: int
    stop_forget_nll: float
    stop_retain_ratio: float
    seed: int                   # resolved: the session's seed unless given
    reference: str | None       # "precomputed" | "live"; None for objectives without a reference
    kl_top_k: int | None        # resolved: None = the full retain distributions (only KL reads it)


def trainable_names(handle: ModelHandle, layers: Sequence[int], scope: str) -> list[str]:
    """Parameter names of the chosen blocks (``scope``: "block" = every weight, "mlp" = MLP only)."""
    ad = handle.adapter
    prefixes = [(ad.mlp_name(layer) if scope == "mlp" else ad.block_name(layer)) + "." for layer in layers]
    return [n for n, _ in handle.model.named_parameters() if any(n.startswith(p) for p in prefixes)]


def lora_module_names(handle: ModelHandle, layers: Sequence[int], scope: str) -> list[str]:
    """Linear / Conv1D modules of the chosen blocks (where LoRA adapters go)."""
    ad = handle.adapter
    prefixes = [(ad.mlp_name(layer) if scope == "mlp" else ad.block_name(layer)) + "." for layer in layers]
    out = []
    for name, mod in handle.model.named_modules():
        if not any(name.startswith(p) for p in prefixes):
            continue
        if isinstance(mod, torch.nn.Linear) or type(mod).__name__ == "Conv1D":
            out.append(name)
    return out


@contextlib.contextmanager
def lora_adapters(handle: ModelHandle, module_names: Sequence[str], rank: int, alpha: float) -> Iterator[dict]:
    """Inject LoRA (peft) into ``module_names``; on success merge it into the base weights.

    The caller sets ``state["merge"] = True`` when training finished; on an
    exception or cancel the adapters are dropped unmerged.  Either way the
    original module objects are put back, so parameter names (and the
    transaction's snapshot, which covers the base weights of these modules)
    are unchanged afterwards.
    """
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    model = handle.model
    before_attrs = set(vars(model))
    fan_in_fan_out = handle.adapter.spec.out_proj_layout == "in_out"
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(module_names),
                     fan_in_fan_out=fan_in_fan_out, bias="none")
    state = {"merge": False, "params": []}
    inject_adapter_in_model(cfg, model)
    try:
        state["params"] = [p for n, p in model.named_parameters() if "lora_" in n]
        for p in state["params"]:
            p.requires_grad_(True)
        yield state
    finally:
        for name, mod in list(model.named_modules()):
            if isinstance(mod, LoraLayer) and hasattr(mod, "get_base_layer"):
                if state["merge"]:
                    with torch.no_grad():
                        mod.merge()
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, child, mod.get_base_layer())
        for attr in set(vars(model)) - before_attrs:
            with contextlib.suppress(Exception):
                delattr(model, attr)
        for p in model.parameters():
            p.requires_grad_(False)


# --------------------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    steps: int = 0
    epochs_run: float = 0.0
    stopped: str = "completed"
    seconds: float = 0.0
    seconds_per_epoch: float = 0.0
    history: list[dict] = field(default_factory=list)
    reference: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"steps": self.steps, "epochs_run": round(self.epochs_run, 3), "stopped": self.stopped,
                "seconds": round(self.seconds, 3), "seconds_per_epoch": round(self.seconds_per_epoch, 3),
                "reference": self.reference, "history": self.history,
                "first_loss": self.history[0]["loss"] if self.history else None,
                "last_loss": self.history[-1]["loss"] if self.history else None}


def _lr_factor(step: int, warmup: int, total: int) -> float:
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    return max(0.0, 1.0 - (step - warmup) / span) if total > warmup else 1.0


def build_reference(objective: FineTune, cfg: TrainConfig, model: Any, pad_id: int, forget: list[ForgetExample],
                    retain: list[Example], ctx: EditContext, device: Any = "cpu", stage: str = "reference") -> Any:
    """The reference the objective needs (None for GA/GD)."""
    needs = objective.reference_needs
    if not needs.any:
        return None
    if cfg.reference == "live":
        return LiveReference(model, cfg.kl_top_k)
    total = ((len(forget) if needs.gold else 0) + (len(forget) if needs.refusal else 0)
             + (len(retain) if needs.retain_dist else 0))
    tracker = Tracker(ctx.on_event, ctx.cancel, stage, total, detail="original model's log-probabilities")
    return PrecomputedReference(model, pad_id, forget, retain, needs.gold, needs.refusal, needs.retain_dist,
                                cfg.kl_top_k, tracker=tracker, device=device)


class LossBatch:
    """One mini-batch as the objectives' loss hooks see it.

    The forward pass on the forget answers runs first (every objective reports
    the forget NLL); the refusal and retain passes run when a hook asks.
    ``parts`` collects the loss parts as floats, in the order they were made.
    """

    def __init__(self, model: Any, pad_id: int, forget: list[ForgetExample], retain: list[Example],
                 f_idx: list[int], r_idx: list[int], reference: Any, device: Any = "cpu") -> None:
        self.model, self.pad_id, self.device = model, pad_id, device
        self.forget, self.retain, self.f_idx, self.r_idx = forget, retain, f_idx, r_idx
        self.reference = reference
        self.parts: dict[str, float] = {}
        self.gold = pack([forget[i].gold for i in f_idx], pad_id, device)
        self.gold_logits = completion_logits(model, self.gold)   # [N, vocab]: UNDIAL's distillation reads them
        self.gold_tok = token_logprobs(self.gold_logits, self.gold)
        self.forget_nll = -self.gold_tok.mean()
        self.parts["forget_nll"] = float(self.forget_nll.detach())

    @staticmethod
    def positions(packed: Packed) -> int:
        """Completion positions in a packed batch."""
        return sum(split_rows(packed))

    def gold_margin(self) -> torch.Tensor:
        """``logp(gold) - ref`` per forget sequence."""
        g_seq = torch.stack([c.sum() for c in torch.split(self.gold_tok, split_rows(self.gold))])
        return g_seq - self.reference.forget_logp("gold", self.f_idx, self.gold).to(g_seq.device)

    def refusal_logprobs(self) -> tuple[Packed, torch.Tensor]:
        """(the packed refusal targets, ``logp(refusal)`` per sequence)."""
        ref_p = pack([self.forget[i].refusal for i in self.f_idx], self.pad_id, self.device)
        return ref_p, sequence_logprobs(completion_logits(self.model, ref_p), ref_p)

    def retain_logits(self) -> tuple[Packed, torch.Tensor]:
        rp = pack([self.retain[i] for i in self.r_idx], self.pad_id, self.device)
        return rp, completion_logits(self.model, rp)

    @staticmethod
    def retain_nll(r_logits: torch.Tensor, rp: Packed) -> torch.Tensor:
        return -token_logprobs(r_logits, rp).mean()


def checked_step(loss: torch.Tensor, params: list, opt: Any, max_grad_norm: float, name: str,
                 step: int) -> tuple[float, float]:
    """Backward and one optimiser step, refusing non-finite numbers: ``(loss, gradient norm)``.

    The gradient is clipped to ``max_grad_norm`` (0: not clipped, its norm still measured).  A
    non-finite loss or gradient raises :class:`NonFiniteError` before the step (the caller's
    transaction restores the weights)."""
    lv = float(loss.detach())
    if not math.isfinite(lv):
        raise NonFiniteError(f"{name}: the loss became {lv} at step {step + 1}; the run was rolled back "
                             "(lower lr or max_grad_norm)")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm > 0:
        gnorm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    else:
        gnorm = torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(p.grad) for p in params if p.grad is not None]))
    gn = float(gnorm)
    if not math.isfinite(gn):
        raise NonFiniteError(f"{name}: a gradient became non-finite at step {step + 1}; the run was rolled "
                             "back (lower lr)")
    opt.step()
    return lv, gn


def step_loss(objective: FineTune, model: Any, pad_id: int, forget: list[ForgetExample], retain: list[Example],
              f_idx: list[int], r_idx: list[int], reference: Any, device: Any = "cpu") -> tuple[torch.Tensor, dict]:
    """The objective on one mini-batch; returns (loss, parts as floats)."""
    return objective.loss(LossBatch(model, pad_id, forget, retain, f_idx, r_idx, reference, device))


def train(handle: ModelHandle, objective: FineTune, cfg: TrainConfig, params: list, forget: list[ForgetExample],
          retain: list[Example], ctx: EditContext, reference: Any = None, stage: str = "train") -> TrainResult:
    """Optimise ``params`` on ``objective``'s loss with ``cfg``'s settings; see the module doc."""
    name = objective.name
    if not forget:
        raise UserError("the forget set is empty; nothing to unlearn", "data.forget")
    if objective.needs_retain and not retain:
        raise UserError(f'"{name}" needs retain data and the retain split is empty; set [data] retain '
                        'to a number, a list of ids or "rest"', "data.retain")
    model = handle.model
    device = handle.input_device   # the embedding's (a device_map may put the first parameters elsewhere)
    pad_id = handle.tokenizer.pad_token_id
    res = TrainResult()
    if reference is not None:
        res.reference = {"kind": reference.kind, "bytes": int(reference.nbytes),
                         "kl_top_k": getattr(reference, "kl_top_k", None)}
    bs = max(1, cfg.batch_size)
    steps_per_epoch = math.ceil(len(forget) / bs)
    total = steps_per_epoch * cfg.epochs
    if cfg.max_steps > 0:
        total = min(total, cfg.max_steps)
    warmup = min(total, int(round(cfg.warmup_epochs * steps_per_epoch)))
    use_retain = objective.trains_retain() and bool(retain)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, warmup, total))
    gen = torch.Generator().manual_seed(cfg.seed)
    tracker = Tracker(ctx.on_event, ctx.cancel, stage, total,
                      detail=f"{name}: {len(forget)} forget, {len(retain) if use_retain else 0} retain, "
                             f"{steps_per_epoch} steps/epoch")
    first_retain: float | None = None
    r_order: list[int] = []
    r_pos = 0
    t0 = time.perf_counter()
    step = 0
    try:
        for epoch in range(cfg.epochs):
            order = torch.randperm(len(forget), generator=gen).tolist()
            for b in range(steps_per_epoch):
                if step >= total:
                    break
                f_idx = order[b * bs:(b + 1) * bs]
                r_idx: list[int] = []
                if use_retain:
                    while len(r_idx) < len(f_idx):
                        if r_pos >= len(r_order):
                            r_order, r_pos = torch.randperm(len(retain), generator=gen).tolist(), 0
                        r_idx.append(r_order[r_pos])
                        r_pos += 1
                loss, parts = step_loss(objective, model, pad_id, forget, retain, f_idx, r_idx, reference, device)
                lv, gn = checked_step(loss, params, opt, cfg.max_grad_norm, name, step)
                sched.step()
                step += 1
                rec = {"step": step, "epoch": epoch + 1, "loss": lv, "grad_norm": gn,
                       "lr": opt.param_groups[0]["lr"], **parts}
                res.history.append(rec)
                res.steps = step
                res.epochs_run = step / steps_per_epoch
                detail = " ".join(f"{k}={v:.3g}" for k, v in parts.items())
                tracker.step(loss=lv, detail=f"epoch {epoch + 1}/{cfg.epochs} {detail}")
                # early stops (measured on the batch just trained on)
                if cfg.stop_forget_nll > 0 and parts["forget_nll"] >= cfg.stop_forget_nll:
                    res.stopped = f"forget NLL {parts['forget_nll']:.3g} >= stop_forget_nll {cfg.stop_forget_nll}"
                    break
                rn = parts.get("retain_nll")
                if rn is not None:
                    first_retain = rn if first_retain is None else first_retain
                    if cfg.stop_retain_ratio > 0 and rn > cfg.stop_retain_ratio * max(first_retain, 1e-6):
                        res.stopped = (f"retain NLL {rn:.3g} > stop_retain_ratio {cfg.stop_retain_ratio} x "
                                       f"{first_retain:.3g}")
                        break
            if res.stopped != "completed" or step >= total:
                break
        if res.stopped == "completed" and total < steps_per_epoch * cfg.epochs:
            res.stopped = f"max_steps {cfg.max_steps}"
    finally:
        for p in params:
            p.grad = None
    res.seconds = time.perf_counter() - t0
    res.seconds_per_epoch = res.seconds / max(res.epochs_run, 1e-9) if res.steps else 0.0
    if res.stopped != "completed":
        ctx.on_event(Log(f"{name}: early stop after {res.steps} steps: {res.stopped}"))
    return res


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Fork the global torch RNG (restored afterwards) and seed it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
