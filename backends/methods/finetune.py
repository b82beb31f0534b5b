"""Fine-tuning unlearning baselines: GA, GD, KL, DPO, NPO and SimNPO (TOFU / open-unlearning).

* ``ga``  — gradient ascent on the forget answers.
* ``gd``  — gradient difference: ascent on forget + descent on retain.
* ``kl``  — ascent on forget + KL(original || model) on the retain answers.
* ``dpo`` — preference optimisation: the refusal target preferred over the
  gold answer, the original model as reference (+ retain NLL).
* ``npo`` — negative preference optimisation: DPO without the preferred
  term (+ retain NLL).
* ``simnpo`` — reference-free, length-normalised NPO (Fan et al. 2024)
  (+ retain NLL).
* ``undial`` — self-distillation with adjusted logits (Dong et al. 2024):
  the original model's next-token distributions on the forget answers, the
  gold token's logit lowered by ``beta``, as the target (retain NLL off by
  default).

Each class's loss terms are its own hooks (``forget_term``, ``retain_term``,
combined by :meth:`FineTune.loss`); the training loop, the batches the hooks
read and the memory-aware reference (the original model's log-probabilities
are computed once before training, no second model copy is kept) live in
:mod:`backends.training`, imported lazily (this module never imports torch).

Which weights train
    ``tuning = "full"`` (default): every weight of the chosen blocks
    (``scope = "block"``: attention, MLP and norms; ``"mlp"``: the MLP only).
    Embeddings are never trained (they are tied to the unembedding in the
    embedded model).  ``tuning = "lora"``: peft LoRA adapters on the Linear
    /Conv1D modules of the chosen blocks; after training they are merged
    into the base weights and the original modules are put back, so the
    transaction's snapshot of those base weights covers the change exactly
    (on cancel or error the adapters are dropped unmerged and the snapshot
    restores the rest).  ``touched_parameters`` names exactly these weights.

Defaults, and why they differ from TOFU's
    TOFU / open-unlearning train a 7B model with lr 1e-5 for 5-10 epochs at
    an effective batch of 32 over hundreds of forget items, with one epoch of
    linear warm-up; beta 0.1, alpha = gamma = 1.  Here a session forgets ~10
    facts, so an epoch is 3 steps at batch 4 and TOFU's lr leaves the
    135M-parameter embedded model's generations unchanged (lower rates move
    the teacher-forced NLL but not the greedy generations).  So the defaults
    are: full fine-tuning of the upper half of the blocks at lr 1e-4 (1e-3
    for LoRA: the usual 10x, not measured on the embedded model), 10 epochs
    (3 left GD's forget set untouched), one epoch of linear warm-up then
    linear decay, weight decay 0.01, gradient clipping at 1.0, batch 4;
    beta 0.1 and alpha = gamma = 1 are TOFU's.  The measurements behind these
    choices are in ``benchmarks/RESULTS.md`` (``benchmarks/bench_finetune.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import UserError
from ..params import param
from . import register
from .base import MethodBase, RetainWhen, settings_view

if TYPE_CHECKING:
    import torch

    from ..model import ModelHandle
    from ..targets import Request
    from ..training import LossBatch, TrainConfig
    from .base import EditContext

LR_FULL = 1e-4
LR_LORA = 1e-3


@dataclass
class CommonParams:
    epochs: int = param(10, "passes over the forget set", min=1, max=1000)
    lr: float | None = param(None, "AdamW learning rate", min=0.0, max=1.0,
                             auto=f"{LR_FULL:g} for full fine-tuning, {LR_LORA:g} for LoRA")
    batch_size: int = param(4, "forget examples per step (paired with as many retain examples)", min=1, max=1024)
    tuning: str = param("full", "which weights train: every weight of the chosen blocks, or LoRA adapters merged "
                        "into them after training", choices=("full", "lora"))
    layers: list[int] | None = param(None, "blocks that train (0-based; negative counts from the end)",
                                     auto="the upper half of the blocks")
    scope: str = param("block", "inside each chosen block: every weight, or the MLP only", choices=("block", "mlp"))
    lora_rank: int = param(8, "LoRA rank (tuning = lora)", min=1, max=1024)
    lora_alpha: float = param(16.0, "LoRA scale numerator (scale = lora_alpha / lora_rank)", min=0.0)
    weight_decay: float = param(0.01, "AdamW weight decay", min=0.0, max=1.0)
    warmup_epochs: float = param(1.0, "linear warm-up length in epochs (then linear decay to 0)", min=0.0)
    max_grad_norm: float = param(1.0, "gradient clipping norm (0 = off)", min=0.0)
    max_steps: int = param(0, "stop after this many optimisation steps (0 = run all epochs)", min=0)
    stop_forget_nll: float = param(0.0, "early stop once the forget answers' mean token NLL reaches this "
                                   "(0 = off)", min=0.0)
    stop_retain_ratio: float = param(0.0, "early stop once the retain NLL exceeds this multiple of its first "
                                     "value (0 = off)", min=0.0)
    seed: int | None = param(None, "seed for shuffling and LoRA initialisation", min=0, auto="the session's seed")


@dataclass
class RetainParams(CommonParams):
    alpha: float = param(1.0, "weight of the retain term", min=0.0)
    gamma: float = param(1.0, "weight of the forget term", min=0.0)


@dataclass
class ReferenceParams(RetainParams):
    reference: str = param("precomputed", "original-model numbers: computed once before training (no model "
                           "copy), or a live copy of the model queried every step (what the reference tools do; "
                           "for comparison)", choices=("precomputed", "live"))


@dataclass(frozen=True)
class ReferenceNeeds:
    """What an objective reads from the original model (computed once, see :mod:`backends.training`)."""

    gold: bool          # the summed log-probability of each forget answer
    refusal: bool       # ... of each refusal target
    retain_dist: bool   # the next-token distribution at every retain completion position

    @property
    def any(self) -> bool:
        return self.gold or self.refusal or self.retain_dist


NO_REFERENCE = ReferenceNeeds(gold=False, refusal=False, retain_dist=False)


class FineTune(MethodBase):
    """Shared glue of the fine-tuning baselines: weights, examples, the training config, the loss, the report.

    The loss is ``gamma * forget_term + alpha * retain_term`` (the retain term
    only while ``alpha`` is non-zero and the batch has retain examples); each
    class fills in its own terms (:meth:`forget_term`, :meth:`retain_term`),
    GA has no retain term at all.  The terms read the mini-batch through a
    :class:`backends.training.LossBatch` (the forward passes, the reference).
    """

    reference_needs: ClassVar[ReferenceNeeds] = NO_REFERENCE
    has_retain_term: ClassVar[bool] = True

    # ---- weights
    def _layers(self, handle: ModelHandle) -> list[int]:
        n = handle.adapter.n_layers
        if self.params.layers is None:
            return list(range(n // 2, n))
        if not self.params.layers:
            raise UserError("expected at least one layer", "params.layers")
        return sorted({handle.adapter.check_layer(layer, "params.layers") for layer in self.params.layers})

    def touched_parameters(self, handle: ModelHandle) -> list[str]:
        from .. import training

        layers = self._layers(handle)
        if self.params.tuning == "lora":
            mods = set(training.lora_module_names(handle, layers, self.params.scope))
            return [m + ".weight" for m in mods]
        return training.trainable_names(handle, layers, self.params.scope)

    # ---- config
    def kl_top_k(self, n_retain_positions: int, vocab: int) -> int | None:
        """How much of the original retain distributions the reference keeps (None: all; only KL reads it)."""
        return None

    def train_config(self, ctx: EditContext, n_retain_positions: int, vocab: int) -> TrainConfig:
        """The training loop's settings: the Params with ``lr``, ``seed`` and ``kl_top_k`` resolved."""
        from .. import training

        p = self.params
        resolved: dict[str, Any] = {
            "lr": p.lr if p.lr is not None else (LR_LORA if p.tuning == "lora" else LR_FULL),
            "seed": p.seed if p.seed is not None else int(ctx.seed or 0),
            "kl_top_k": self.kl_top_k(n_retain_positions, vocab)}
        if not self.reference_needs.any:
            resolved["reference"] = None   # GA / GD keep no reference
        return settings_view(training.TrainConfig, p, **resolved)

    # ---- loss
    def trains_retain(self) -> bool:
        """Whether a step reads retain examples (the retain term exists and its weight is non-zero)."""
        return self.has_retain_term and self.params.alpha != 0.0

    def forget_term(self, b: LossBatch) -> torch.Tensor:
        """Gradient ascent on the forget answers: ``-NLL(forget)``."""
        return -b.forget_nll

    def retain_term(self, b: LossBatch) -> torch.Tensor:
        """``NLL(retain)``."""
        rp, r_logits = b.retain_logits()
        retain_term = b.retain_nll(r_logits, rp)
        b.parts["retain_nll"] = float(retain_term.detach())
        return retain_term

    def loss(self, b: LossBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """The objective on one mini-batch: (loss, its parts as floats)."""
        forget_term = self.forget_term(b)
        if not self.has_retain_term:
            return forget_term, b.parts
        p = self.params
        loss = p.gamma * forget_term
        if b.r_idx and p.alpha != 0.0:
            loss = loss + p.alpha * self.retain_term(b)
        return loss, b.parts

    def apply(self, handle: ModelHandle, requests: Sequence[Request], ctx: EditContext) -> dict[str, Any]:
        from .. import training

        p = self.params
        layers = self._layers(handle)
        retain_items = list(ctx.retain or [])
        if self.needs_retain and not retain_items:
            raise UserError(f'method "{self.name}" needs retain data and the retain split is empty; set [data] '
                            'retain to a number, a list of ids or "rest" (or alpha = 0 where allowed)',
                            "data.retain")
        forget = training.forget_examples(handle, requests)
        retain = training.retain_examples(handle, retain_items) if self.needs_retain else []
        n_pos = sum(len(e.completion) for e in retain)
        cfg = self.train_config(ctx, n_pos, int(handle.model.config.vocab_size))
        with training.seeded(cfg.seed):
            reference = training.build_reference(self, cfg, handle.model, handle.tokenizer.pad_token_id, forget,
                                                 retain, ctx, handle.input_device, stage=f"{self.name}: reference")
            stage = f"{self.name}: train"
            if p.tuning == "lora":
                mods = training.lora_module_names(handle, layers, p.scope)
                if not mods:
                    raise UserError("the chosen layers have no Linear modules for LoRA", "params.layers")
                with training.lora_adapters(handle, mods, p.lora_rank, p.lora_alpha) as lora:
                    result = training.train(handle, self, cfg, lora["params"], forget, retain, ctx, reference,
                                            stage)
                    lora["merge"] = True
                n_trained = sum(handle.parameter(n).numel() for n in self.touched_parameters(handle))
            else:
                names = training.trainable_names(handle, layers, p.scope)
                params = [handle.parameter(n) for n in names]
                try:
                    for t in params:
                        t.requires_grad_(True)
                    result = training.train(handle, self, cfg, params, forget, retain, ctx, reference, stage)
                finally:
                    for t in params:
                        t.requires_grad_(False)
                n_trained = sum(t.numel() for t in params)
        del reference
        report = {"edits": len(forget), "objective": self.name, "tuning": p.tuning, "layers": layers,
                  "scope": p.scope, "lr": cfg.lr, "trained_parameters": int(n_trained),
                  "retain_examples": len(retain)}
        report.update(result.to_json())
        return report


def _preference(beta: float, margin: torch.Tensor) -> torch.Tensor:
    """``-(2 / beta) * mean log sigmoid(beta * margin)`` (DPO's and NPO's forget term)."""
    import torch.nn.functional as F

    return -(2.0 / beta) * F.logsigmoid(beta * margin).mean()


@register
class GA(FineTune):
    name: ClassVar[str] = "ga"
    summary: ClassVar[str] = "Gradient ascent on the forget answers (TOFU baseline)"
    needs_retain: ClassVar[bool] = False
    has_retain_term: ClassVar[bool] = False

    @dataclass
    class Params(CommonParams):
        pass

    params: GA.Params


@register
class GD(FineTune):
    """``gamma * -NLL(forget) + alpha * NLL(retain)``."""

    name: ClassVar[str] = "gd"
    summary: ClassVar[str] = "Gradient difference: ascent on forget, descent on retain (TOFU baseline)"
    needs_retain: ClassVar[bool] = True

    @dataclass
    class Params(RetainParams):
        pass

    params: GD.Params


@register
class KL(FineTune):
    """``gamma * -NLL(forget) + alpha * KL(ref || model)`` on the retain completions' next-token distributions."""

    name: ClassVar[str] = "kl"
    summary: ClassVar[str] = "Ascent on forget + KL to the original model on retain (TOFU baseline)"
    needs_retain: ClassVar[bool] = True
    reference_needs: ClassVar[ReferenceNeeds] = ReferenceNeeds(gold=False, refusal=False, retain_dist=True)

    @dataclass
    class Params(ReferenceParams):
        kl_top_k: int | None = param(None, "keep the original model's top-k next-token log-probs per retain "
                                     "position (plus the rest mass); 0 = the full distribution", min=0,
                                     auto="full distribution when it fits 128 MB, else top-512")

    params: KL.Params

    def kl_top_k(self, n_retain_positions: int, vocab: int) -> int | None:
        from .. import training

        return training.resolve_kl_top_k(self.params.kl_top_k, n_retain_positions, vocab)

    def retain_term(self, b: LossBatch) -> torch.Tensor:
        import torch

        rp, r_logits = b.retain_logits()
        kl = b.reference.retain_kl(r_logits, b.r_idx, rp).mean()
        b.parts["retain_kl"] = float(kl.detach())
        with torch.no_grad():
            b.parts["retain_nll"] = float(b.retain_nll(r_logits, rp))
        return kl


@register
class DPO(FineTune):
    """``gamma * -(2/beta) * mean log sigmoid(beta * ((logp(refusal) - ref) - (logp(gold) - ref)))
    + alpha * NLL(retain)``."""

    name: ClassVar[str] = "dpo"
    summary: ClassVar[str] = "Preference optimisation: refusal preferred over the gold answer (+ retain NLL)"
    needs_retain = RetainWhen(True, lambda p: p.alpha > 0)  # type: ignore[assignment]
    reference_needs: ClassVar[ReferenceNeeds] = ReferenceNeeds(gold=True, refusal=True, retain_dist=False)

    @dataclass
    class Params(ReferenceParams):
        beta: float = param(0.1, "inverse temperature of the preference loss", min=1e-6)

    params: DPO.Params

    def forget_term(self, b: LossBatch) -> torch.Tensor:
        lose = b.gold_margin()
        ref_p, w_seq = b.refusal_logprobs()
        win = w_seq - b.reference.forget_logp("refusal", b.f_idx, ref_p).to(w_seq.device)
        forget_term = _preference(self.params.beta, win - lose)
        b.parts["refusal_nll"] = float(-(w_seq.detach().sum() / max(1, b.positions(ref_p))))
        b.parts["forget_term"] = float(forget_term.detach())
        return forget_term


@register
class NPO(FineTune):
    """``gamma * -(2/beta) * mean log sigmoid(-beta * (logp(gold) - ref)) + alpha * NLL(retain)``
    (DPO without the preferred term)."""

    name: ClassVar[str] = "npo"
    summary: ClassVar[str] = "Negative preference optimisation on the forget answers (+ retain NLL)"
    needs_retain = RetainWhen(True, lambda p: p.alpha > 0)  # type: ignore[assignment]
    reference_needs: ClassVar[ReferenceNeeds] = ReferenceNeeds(gold=True, refusal=False, retain_dist=False)

    @dataclass
    class Params(ReferenceParams):
        beta: float = param(0.1, "inverse temperature of the preference loss", min=1e-6)

    params: NPO.Params

    def forget_term(self, b: LossBatch) -> torch.Tensor:
        forget_term = _preference(self.params.beta, -b.gold_margin())
        b.parts["forget_term"] = float(forget_term.detach())
        return forget_term


def simnpo_term(beta: float, delta: float, token_logprobs: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
    """SimNPO's forget term ``-(2 / beta) * mean_i log sigmoid(beta * (NLL_i / |y_i| - delta))``.

    ``token_logprobs`` are the forget answers' token log-probabilities in
    sequence order, ``lengths`` the number of tokens of each answer (``|y_i|``,
    so ``NLL_i / |y_i|`` is answer ``i``'s mean token NLL).
    """
    import torch
    import torch.nn.functional as F

    per_seq = torch.stack([-c.mean() for c in torch.split(token_logprobs, list(lengths))])
    return -(2.0 / beta) * F.logsigmoid(beta * (per_seq - delta)).mean()


@register
class SimNPO(FineTune):
    """``gamma * -(2/beta) * mean log sigmoid(beta * (NLL(gold) / |gold| - delta)) + alpha * NLL(retain)``.

    Fan et al., "Simplicity prevails: rethinking negative preference
    optimization for LLM unlearning" (2024): NPO without the reference model,
    its log-ratio replaced by the length-normalised log-probability of the
    forget answer.  The paper writes the forget term as
    ``-(2/beta) log sigmoid(-(beta/|y|) log pi(y|x) - gamma)``; the official
    code (OPTML-Group/Unlearn-Simple) and open-unlearning subtract the margin
    before the ``beta`` scaling, ``beta * (NLL/|y| - delta)``, which is what
    ``delta`` is here (a margin in nats per token; the two agree at the
    default ``delta = 0``).  Our ``gamma`` is the forget-term weight, as in
    the other fine-tuning methods and open-unlearning (the official code's
    ``npo_coeff``), not the paper's margin.

    Defaults: ``beta = 4.5``, ``delta = 0``, ``gamma = 0.125`` (forget weight),
    ``alpha = 1`` with the NLL retain loss are open-unlearning's
    ``configs/trainer/SimNPO.yaml`` (taken from the official TOFU config,
    ``TOFU/config/forget.yaml``).  The training settings (lr, epochs, layers,
    batch, warm-up) are the shared fine-tuning defaults of this module (see
    the module doc: adapted to the 135M embedded model, not TOFU's).
    """

    name: ClassVar[str] = "simnpo"
    summary: ClassVar[str] = "SimNPO: reference-free, length-normalised NPO on the forget answers (+ retain NLL)"
    needs_retain = RetainWhen(True, lambda p: p.alpha > 0)  # type: ignore[assignment]
    reference_needs: ClassVar[ReferenceNeeds] = NO_REFERENCE   # reference-free

    @dataclass
    class Params(RetainParams):
        beta: float = param(4.5, "inverse temperature of the length-normalised preference loss", min=1e-6)
        delta: float = param(0.0, "reward margin: the forget answers' mean token NLL the loss aims past (nats "
                             "per token; the paper's gamma)", min=0.0)
        gamma: float = param(0.125, "weight of the forget term", min=0.0)

    params: SimNPO.Params

    def forget_term(self, b: LossBatch) -> torch.Tensor:
        from .. import training

        p = self.params
        forget_term = simnpo_term(p.beta, p.delta, b.gold_tok, training.split_rows(b.gold))
        b.parts["forget_term"] = float(forget_term.detach())
        return forget_term


class UndialTeacher:
    """UNDIAL's target: the original model's next-token log-distribution at every forget answer position with
    ``beta`` subtracted from the gold token's logit, computed once before training (no model copy kept).

    Kept whole (``top_k`` None) or, like KL's reference, as the top-k adjusted
    log-probabilities per position plus the log of the remaining mass (the
    adjustment is applied before the truncation); the loss is then the KL
    between the bucketed distributions (see :func:`backends.training.bucket_kl`).
    """

    kind = "precomputed"

    def __init__(self, model: Any, pad_id: int, forget: Sequence[Any], beta: float, top_k: int | None,
                 device: Any = "cpu", tracker: Any = None, batch_size: int = 8) -> None:
        import torch

        from .. import training

        self.top_k = top_k
        self.rows: list[tuple[Any, Any, Any]] = []
        with torch.no_grad():
            for s in range(0, len(forget), batch_size):
                chunk = list(forget[s:s + batch_size])
                packed = training.pack([e.gold for e in chunk], pad_id, device)
                logits = training.completion_logits(model, packed)
                gold = packed.targets[packed.target_mask]
                logits[torch.arange(len(gold), device=logits.device), gold] -= beta
                adjusted = torch.log_softmax(logits, dim=-1).cpu()
                for rows in torch.split(adjusted, training.split_rows(packed)):
                    self.rows.append((None, rows.clone(), None) if top_k is None else training.top_k_table(rows, top_k))
                if tracker is not None:
                    tracker.step(len(chunk))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for row in self.rows for t in row if t is not None)

    def kl(self, cur_logits: torch.Tensor, idx: Sequence[int]) -> torch.Tensor:
        """KL(adjusted teacher || model) per forget answer position of the examples ``idx`` (in order)."""
        import torch

        from .. import training

        cur = torch.log_softmax(cur_logits, dim=-1)
        rows = [self.rows[i] for i in idx]
        dev = cur.device
        if rows[0][0] is None:
            return training.bucket_kl(cur, None, torch.cat([r[1] for r in rows]).to(dev), None)
        return training.bucket_kl(cur, torch.cat([r[0] for r in rows]).to(dev), torch.cat([r[1] for r in rows]).to(dev),
                                  torch.cat([r[2] for r in rows]).to(dev))


@register
class UNDIAL(FineTune):
    """``gamma * mean KL(softmax(logits_orig - beta * onehot(gold)) || model) + alpha * NLL(retain)``
    over the forget answer positions.

    Dong et al., "UNDIAL: self-distillation with adjusted logits for robust
    unlearning in large language models" (2024, NAACL 2025).  The paper
    (and open-unlearning) minimise the cross-entropy to the adjusted teacher;
    the KL differs from it by the teacher's entropy, a constant, so the
    gradients are the same.  Only the answer positions are distilled
    (open-unlearning's loss also averages over the prompt positions, where
    the student starts equal to the teacher).  The teacher is precomputed
    (:class:`UndialTeacher`); no second model copy is kept.

    Defaults: ``beta = 10``, ``gamma = 1``, ``alpha = 0`` (the paper uses no
    retain set) are open-unlearning's ``configs/trainer/UNDIAL.yaml``, whose
    lr 1e-4 and 10 epochs are also the shared fine-tuning defaults here (the
    paper tunes Llama-2-7B with LoRA r = 8, lr 1e-4).  ``teacher_top_k`` auto
    follows KL's memory rule (the full distributions while they fit 128 MB).
    """

    name: ClassVar[str] = "undial"
    summary: ClassVar[str] = "UNDIAL: self-distillation towards the original model with the gold token's logit lowered"
    needs_retain = RetainWhen(False, lambda p: p.alpha > 0)  # type: ignore[assignment]
    reference_needs: ClassVar[ReferenceNeeds] = NO_REFERENCE   # its teacher is built by apply (below)

    @dataclass
    class Params(RetainParams):
        beta: float = param(10.0, "how much the gold token's logit is lowered in the teacher", min=0.0)
        alpha: float = param(0.0, "weight of the retain term (0: no retain data, as in the paper)", min=0.0)
        teacher_top_k: int | None = param(None, "keep the adjusted teacher's top-k next-token log-probs per forget "
                                          "position (plus the rest mass); 0 = the full distribution", min=0,
                                          auto="full distribution when it fits 128 MB, else top-512")

    params: UNDIAL.Params
    _teacher: UndialTeacher | None = None

    def apply(self, handle: ModelHandle, requests: Sequence[Request], ctx: EditContext) -> dict[str, Any]:
        from .. import training
        from ..events import Tracker

        forget = training.forget_examples(handle, requests)
        vocab = int(handle.model.config.vocab_size)
        top_k = training.resolve_kl_top_k(self.params.teacher_top_k, sum(len(e.gold.completion) for e in forget),
                                          vocab)
        tracker = Tracker(ctx.on_event, ctx.cancel, f"{self.name}: teacher", len(forget),
                          detail="original model's adjusted next-token distributions")
        self._teacher = UndialTeacher(handle.model, handle.tokenizer.pad_token_id, forget, self.params.beta, top_k,
                                      handle.input_device, tracker)
        try:
            report = super().apply(handle, requests, ctx)
            report["reference"] = {"kind": self._teacher.kind, "bytes": int(self._teacher.nbytes), "kl_top_k": top_k}
            return report
        finally:
            self._teacher = None

    def forget_term(self, b: LossBatch) -> torch.Tensor:
        if self._teacher is None:
            raise RuntimeError("UNDIAL's teacher is built by apply; call apply (or set _teacher)")
        forget_term = self._teacher.kl(b.gold_logits, b.f_idx).mean()
        b.parts["forget_kl"] = float(forget_term.detach())
        return forget_term
