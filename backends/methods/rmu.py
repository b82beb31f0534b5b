"""RMU: representation misdirection for unlearning (Li et al. 2024, the WMDP paper).

At one layer ``l`` (the output of block ``l``, the residual stream), the
forget loss pushes the model's hidden states on the forget tokens towards
``c * u`` (``u`` a fixed random unit vector drawn from the seed, ``c`` the
steering coefficient) and the retain loss keeps its hidden states on the
retain tokens where the original model had them::

    loss = MSE(h_l(forget), c * u) + alpha * MSE(h_l(retain), h_l^orig(retain))

Each MSE is, per example, the mean over its chosen tokens of the mean over
the hidden dimension of the squared difference, then the mean over the
batch's examples (open-unlearning's masked form of WMDP's ``mse_loss``).
Only the MLP output projections of a few blocks up to ``l`` train (WMDP:
``down_proj`` of layers 5, 6, 7 with ``l = 7``); a block above ``l`` would
get no gradient, so it is refused.

Memory-aware reference
    The retain term reads the original model's layer-``l`` activations on
    FIXED sequences (the retain questions and answers), so they are computed
    once before training (:class:`ActivationReference`, ``tokens x hidden``
    floats) and no second model copy is kept (WMDP and open-unlearning hold
    a frozen copy and run it at every step).  Every forward pass stops right
    after block ``l`` (:func:`backends.editing.hooks.stop_after`): the blocks
    above it and the logits are never computed.

Which tokens
    ``tokens = "answer"`` (default): the answer tokens of each forget /
    retain example (open-unlearning's TOFU RMU masks the loss with the
    labels, i.e. the answers; our data are question/answer pairs).
    ``"all"``: every token of the formatted prompt and the answer (WMDP
    trains on plain documents, every token; here that includes the chat
    template's tokens, which forget and retain share).

Defaults and their sources (see :class:`RMU.Params`); the loop is AdamW at a
constant learning rate without gradient clipping, as in WMDP's
``rmu/unlearn.py``, in eval mode (no dropout) with a forked, seeded RNG, one
``Progress`` event per step (cancel is checked there) and a non-finite guard;
the transaction restores the touched weights on any failure or cancel.

This module never imports torch at module level (the registry lists methods
before torch is loaded); the tensor work imports it lazily.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import UserError
from ..events import Tracker
from ..params import param
from . import register
from .base import MethodBase, RetainWhen, resolve_layer

if TYPE_CHECKING:
    import torch

    from ..model import ModelHandle
    from ..targets import Request
    from ..training import Example
    from .base import EditContext

# WMDP unlearns at layer 7 of Zephyr-7B's 32 layers: 7/31 of the way up the stack
WMDP_LAYER_SHARE = 7 / 31
# ... and updates the MLP output projections of layers 5, 6, 7: the layer and the two below it
WMDP_UPDATE_SPAN = 2


@register
class RMU(MethodBase):
    """Forget-token activations at one layer steered to ``c * u``, retain activations held in place."""

    name: ClassVar[str] = "rmu"
    summary: ClassVar[str] = ("Representation misdirection (WMDP): forget activations at one layer pushed to a "
                              "random direction, retain activations held")
    needs_retain = RetainWhen(True, lambda p: p.alpha > 0)  # type: ignore[assignment]

    @dataclass
    class Params:
        """RMU's hyper-parameters.

        Sources: WMDP = Li et al. 2024, "The WMDP benchmark" (``rmu/unlearn.py``
        of centerforaisafety/wmdp and its README's Zephyr-7B run);
        adaptive RMU = Dang et al. 2025, "On effects of steering latent
        representation for LLM unlearning" (its scripts run ``--scale 5.0``
        with ``--alpha 1200``).

        * ``layer``: WMDP's ``layer_id = 7`` of Zephyr's 32 layers, mapped by
          relative depth, ``round(7/31 * (n - 1))`` (7 of SmolLM2-135M's 30
          layers, 1 of a 4-layer test model); an explicit index overrides it.
        * ``update_layers``: WMDP's ``layer_ids = 5,6,7`` = the layer and the
          two below it (clipped at block 0).
        * ``scope = "mlp_out"``: WMDP's ``param_ids = 6`` (the 7th parameter of
          a Mistral block, ``mlp.down_proj.weight``); open-unlearning's TOFU
          config trains every weight instead (``scope = "block"`` is close to it).
        * ``steering_coeff``: WMDP's coefficient is a fixed number tuned per
          model (argparse default 20, 6.5 for Zephyr-7B) because it must be
          large next to the layer's activation norm, which differs between
          models; we have not measured the embedded model's, so the default
          is adaptive RMU's rule ``steering_scale * mean ||h_l^orig||`` over
          the forget tokens with its ``scale = 5``.  Set a number for WMDP's
          fixed coefficient.
        * ``alpha = 1200``: WMDP's Zephyr-7B run (README; the argparse
          default is 100), also adaptive RMU's.
        * ``lr = 5e-5``, ``batch_size = 4``, ``steps = 80`` (WMDP's
          ``max_num_batches`` default; its README run uses 150), constant
          learning rate, no clipping, ``weight_decay = 0.01`` (torch's AdamW
          default, which WMDP's optimiser gets).  WMDP makes one pass over a
          large corpus; a session forgets ~10 facts, so the 80 steps cycle
          over the forget set (reshuffled every pass).
        * Measured on the embedded 135M model (PISTOL, 20 forget / 60 retain after the
          fine-tune, ``benchmarks/bench_field_metrics.py``; figures in
          ``benchmarks/RESULTS.md``): these WMDP defaults change no answer (forget
          ROUGE-1 0.983 before and after), nor do ``alpha = 100`` or ``10`` at this
          ``lr``, nor ``lr = 1e-3`` at ``alpha = 1200``; ``lr = 1e-3, alpha = 100``
          forgets (forget 0.035, retain 0.939 = the baseline's).  The defaults stay
          the published ones; set those two for a small model.
        * ``u`` is WMDP's: uniform in [0, 1) per dimension, then normalised;
          drawn from ``seed``.
        """

        layer: int | None = param(None, "the layer whose output (residual stream) is steered (0-based; negative "
                                  "counts from the end)",
                                  auto="WMDP's layer 7 of 32 by relative depth: round(7/31 x (layers - 1))")
        update_layers: list[int] | None = param(None, "blocks whose weights train; none above layer (0-based; "
                                                "negative counts from the end)",
                                                auto="the layer and the two below it (WMDP's 5, 6, 7)")
        scope: str = param("mlp_out", "inside each updated block: the MLP output projection's weight (WMDP), the "
                           "whole MLP, or every weight", choices=("mlp_out", "mlp", "block"))
        steering_coeff: float | None = param(None, "c, the norm of the target c x u of the forget activations",
                                             min=0.0, auto="steering_scale x the mean norm of the original "
                                             "model's layer activations on the forget tokens (adaptive RMU)")
        steering_scale: float = param(5.0, "steering_coeff = this x the original activations' mean norm (when "
                                      "steering_coeff is auto)", min=0.0)
        alpha: float = param(1200.0, "weight of the retain (activation-preserving) term", min=0.0)
        tokens: str = param("answer", "tokens the losses read: the answers, or the prompt and the answer",
                            choices=("answer", "all"))
        lr: float = param(5e-5, "AdamW learning rate (constant)", min=0.0, max=1.0)
        steps: int = param(80, "optimisation steps (cycling over the forget set)", min=1, max=100000)
        batch_size: int = param(4, "forget examples per step (paired with as many retain examples)", min=1,
                                max=1024)
        weight_decay: float = param(0.01, "AdamW weight decay", min=0.0, max=1.0)
        max_grad_norm: float = param(0.0, "gradient clipping norm (0 = off, as in WMDP)", min=0.0)
        seed: int | None = param(None, "seed of the random direction u and of the shuffling", min=0,
                                 auto="the session's seed")

    params: RMU.Params

    # ---- layers and weights
    def layer(self, handle: ModelHandle) -> int:
        return resolve_layer(handle, self.params.layer, WMDP_LAYER_SHARE, "params.layer")

    def update_layers(self, handle: ModelHandle) -> list[int]:
        layer = self.layer(handle)
        if self.params.update_layers is None:
            return list(range(max(0, layer - WMDP_UPDATE_SPAN), layer + 1))
        if not self.params.update_layers:
            raise UserError("expected at least one layer", "params.update_layers")
        layers = sorted({handle.adapter.check_layer(x, "params.update_layers") for x in self.params.update_layers})
        above = [x for x in layers if x > layer]
        if above:
            raise UserError(f"layer(s) {', '.join(map(str, above))} are above params.layer = {layer} and would "
                            "get no gradient (the loss reads that layer's output)", "params.update_layers")
        return layers

    def touched_parameters(self, handle: ModelHandle) -> list[str]:
        layers = self.update_layers(handle)
        if self.params.scope == "mlp_out":
            return [handle.adapter.mlp_out_weight_name(x) for x in layers]
        from .. import training

        return training.trainable_names(handle, layers, self.params.scope)

    # ---- the run
    def apply(self, handle: ModelHandle, requests: Sequence[Request], ctx: EditContext) -> dict[str, Any]:
        import torch

        from .. import training

        p = self.params
        layer = self.layer(handle)
        layers = self.update_layers(handle)
        names = self.touched_parameters(handle)
        retain_items = list(ctx.retain or [])
        if self.needs_retain and not retain_items:
            raise UserError(f'method "{self.name}" needs retain data and the retain split is empty; set [data] '
                            'retain to a number, a list of ids or "rest" (or alpha = 0)', "data.retain")
        forget = [e.gold for e in training.forget_examples(handle, requests)]
        if not forget:
            raise UserError("the forget set is empty; nothing to unlearn", "data.forget")
        retain = training.retain_examples(handle, retain_items) if self.needs_retain else []
        seed = p.seed if p.seed is not None else int(ctx.seed or 0)
        runner = LayerRunner(handle, layer, p.tokens)
        with training.seeded(seed):
            total = len(retain) + (len(forget) if p.steering_coeff is None else 0)
            tracker = Tracker(ctx.on_event, ctx.cancel, f"{self.name}: reference", total,
                              detail=f"original model's layer-{layer} activations")
            reference = ActivationReference(runner, retain, tracker=tracker)
            if p.steering_coeff is None:
                coeff = p.steering_scale * mean_norm(runner, forget, tracker=tracker)
            else:
                coeff = float(p.steering_coeff)
            gen = torch.Generator().manual_seed(seed)
            u = torch.rand(handle.adapter.hidden_size, generator=gen)
            u = u / u.norm()
            params = [handle.parameter(n) for n in names]
            try:
                for t in params:
                    t.requires_grad_(True)
                result = self._train(runner, params, forget, retain, reference, coeff * u, gen, ctx)
            finally:
                for t in params:
                    t.requires_grad_(False)
                    t.grad = None
        report = {"edits": len(forget), "objective": self.name, "layer": layer, "update_layers": layers,
                  "scope": p.scope, "tokens": p.tokens, "steering_coeff": float(coeff), "alpha": p.alpha,
                  "lr": p.lr, "seed": seed, "trained_parameters": int(sum(t.numel() for t in params)),
                  "retain_examples": len(retain)}
        report.update(result.to_json())
        return report

    def _train(self, runner: LayerRunner, params: list, forget: list[Example], retain: list[Example],
               reference: ActivationReference, target: torch.Tensor, gen: torch.Generator,
               ctx: EditContext) -> Any:
        import torch

        from .. import training

        p = self.params
        res = training.TrainResult()
        res.reference = {"kind": reference.kind, "bytes": int(reference.nbytes), "layer": runner.layer}
        bs = p.batch_size
        steps_per_epoch = math.ceil(len(forget) / bs)
        use_retain = p.alpha != 0.0 and bool(retain)
        opt = torch.optim.AdamW(params, lr=p.lr, weight_decay=p.weight_decay)
        tracker = Tracker(ctx.on_event, ctx.cancel, f"{self.name}: train", p.steps,
                          detail=f"{self.name}: {len(forget)} forget, {len(retain) if use_retain else 0} retain, "
                                 f"layer {runner.layer}, {steps_per_epoch} steps/epoch")
        order: list[int] = []
        r_order: list[int] = []
        r_pos = 0
        t0 = time.perf_counter()
        for step in range(p.steps):
            if step % steps_per_epoch == 0:
                order = torch.randperm(len(forget), generator=gen).tolist()
            b = step % steps_per_epoch
            f_idx = order[b * bs:(b + 1) * bs]
            r_idx: list[int] = []
            if use_retain:
                while len(r_idx) < len(f_idx):
                    if r_pos >= len(r_order):
                        r_order, r_pos = torch.randperm(len(retain), generator=gen).tolist(), 0
                    r_idx.append(r_order[r_pos])
                    r_pos += 1
            loss, parts = self.loss(runner, forget, retain, f_idx, r_idx, reference, target)
            lv, gn = training.checked_step(loss, params, opt, p.max_grad_norm, self.name, step)
            epoch = step // steps_per_epoch + 1
            res.history.append({"step": step + 1, "epoch": epoch, "loss": lv, "grad_norm": gn, "lr": p.lr, **parts})
            res.steps = step + 1
            res.epochs_run = res.steps / steps_per_epoch
            detail = " ".join(f"{k}={v:.3g}" for k, v in parts.items())
            tracker.step(loss=lv, detail=f"epoch {epoch} {detail}")
        res.seconds = time.perf_counter() - t0
        res.seconds_per_epoch = res.seconds / max(res.epochs_run, 1e-9)
        return res

    def loss(self, runner: LayerRunner, forget: list[Example], retain: list[Example], f_idx: list[int],
             r_idx: list[int], reference: ActivationReference,
             target: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """``MSE(h(forget), target) + alpha * MSE(h(retain), h_orig(retain))`` on one mini-batch, with its parts."""
        acts, counts = runner.activations([forget[i] for i in f_idx])
        forget_loss = activation_mse(acts, target.to(acts.device, acts.dtype), counts)
        parts = {"forget_loss": float(forget_loss.detach())}
        loss = forget_loss
        if r_idx and self.params.alpha != 0.0:
            r_acts, r_counts = runner.activations([retain[i] for i in r_idx])
            retain_loss = activation_mse(r_acts, reference.rows_for(r_idx).to(r_acts.device), r_counts)
            parts["retain_loss"] = float(retain_loss.detach())
            loss = loss + self.params.alpha * retain_loss
        return loss, parts


# --------------------------------------------------------------------------- the tensor work (torch imported lazily)


class LayerRunner:
    """Layer-``layer`` activations (block output) at the chosen tokens; the forward stops after that block."""

    def __init__(self, handle: ModelHandle, layer: int, tokens: str) -> None:
        self.handle, self.layer, self.tokens = handle, layer, tokens
        self.block = handle.adapter.block_name(layer)

    def positions(self, e: Example) -> range:
        n = len(e.prompt) + len(e.completion)
        return range(0, n) if self.tokens == "all" else range(len(e.prompt), n)

    def activations(self, examples: Sequence[Example]) -> tuple[torch.Tensor, list[int]]:
        """(``[N, hidden]`` float32 activations at the chosen tokens, rows example by example; tokens per example).

        Differentiable (run it under ``torch.no_grad()`` for a reference).
        """
        import torch

        from ..batching import pad_right
        from ..editing.hooks import capture, stop_after

        h = self.handle
        ids, mask = pad_right([list(e.prompt) + list(e.completion) for e in examples], h.tokenizer.pad_token_id,
                              h.input_device)
        pick = torch.zeros(ids.shape, dtype=torch.bool)
        for row, e in enumerate(examples):
            pick[row, list(self.positions(e))] = True
        with capture(h.model, [self.block], "output", detach=False) as store:
            with stop_after(h.model, self.block):
                h.model(input_ids=ids, attention_mask=mask, use_cache=False)
        out = store[self.block][0]
        return out[pick.to(out.device)].float(), [len(self.positions(e)) for e in examples]


def activation_mse(acts: torch.Tensor, target: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """Mean over examples of (mean over each example's tokens of the mean squared difference over the hidden dim).

    ``target`` is ``[N, hidden]`` (aligned with ``acts``) or ``[hidden]`` (one vector for every token).
    """
    import torch

    per_token = (acts - target).pow(2).mean(dim=-1)
    return torch.stack([c.mean() for c in torch.split(per_token, list(counts))]).mean()


class ActivationReference:
    """The original model's layer activations on the retain examples, computed once (no model copy kept)."""

    kind = "precomputed"

    def __init__(self, runner: LayerRunner, retain: Sequence[Example], batch_size: int = 8,
                 tracker: Tracker | None = None) -> None:
        import torch

        self.rows: list[torch.Tensor] = []
        with torch.no_grad():
            for s in range(0, len(retain), batch_size):
                chunk = list(retain[s:s + batch_size])
                acts, counts = runner.activations(chunk)
                self.rows.extend(r.cpu() for r in torch.split(acts, counts))
                if tracker:
                    tracker.step(len(chunk))

    @property
    def nbytes(self) -> int:
        return sum(r.numel() * r.element_size() for r in self.rows)

    def rows_for(self, idx: Sequence[int]) -> torch.Tensor:
        import torch

        return torch.cat([self.rows[i] for i in idx])


def mean_norm(runner: LayerRunner, examples: Sequence[Example], batch_size: int = 8,
              tracker: Tracker | None = None) -> float:
    """The mean L2 norm of the (original) model's layer activations over the examples' chosen tokens."""
    import torch

    total, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(examples), batch_size):
            chunk = list(examples[s:s + batch_size])
            acts, _ = runner.activations(chunk)
            total += float(acts.norm(dim=-1).sum())
            n += acts.shape[0]
            if tracker:
                tracker.step(len(chunk))
    return total / max(1, n)
