"""GRACE (Hartvigsen et al., NeurIPS 2023) for sequential unlearning: a key-value codebook.

A codebook adaptor wraps the MLP of one layer: a query whose MLP input (at
some token, typically the last prompt token) falls inside an entry's
deferral radius gets that entry's trained value as the MLP output from that
token on; everything else passes through bit-for-bit.  New keys near an
existing entry expand it (same target) or split the ball (different target).
The model's weights are never written (``touched_parameters`` is empty: the
codebook lives in the wrapper's state, which the transaction snapshots).
Exact rules and the handling of generated tokens: :mod:`backends.editing.grace_codebook`.

GRACE memorises prompts: paraphrased questions usually land outside every
ball, so expect rephrase scores close to the baseline (the paper's known
weakness, reported honestly by the rephrase split; ``grace_hit`` and
``grace_dist`` per item show it).

Scale-free defaults: the initial radius ``eps`` is ``0.25 x`` the mean key
norm of a few neutral prompts at that layer (the reference's ``eps = 1`` was
set for Llama-2-7B's key scale); the layer is at 90 % of the depth.

Persistence: ``save_state`` / ``load_state`` are relative to the session's
folder and must stay inside it (``allow_outside`` opts out); ``save_state``
never creates folders, replaces only a GRACE state file (``overwrite`` opts
out) and writes atomically.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import UserError
from ..params import param
from . import register
from .base import OneLayerAdaptor, inner_params_layer, settings_view

if TYPE_CHECKING:
    from ..model import ModelHandle
    from ..targets import Request
    from .base import EditContext


@register
class GraceMethod(OneLayerAdaptor):
    name: ClassVar[str] = "grace"
    summary: ClassVar[str] = "GRACE: a key-value codebook at one MLP replaces outputs inside deferral radii"
    needs_retain: ClassVar[bool] = False
    EASYEDIT_KEYS: ClassVar[dict[str, Any]] = {
        "edit_lr": "edit_lr", "n_iter": "n_iter", "eps": "eps", "dist_fn": "dist_fn", "val_init": "val_init",
        "eps_expand": "eps_expand", "inner_params": ("layer", inner_params_layer),
    }

    @dataclass
    class Params:
        layer: int | None = param(None, "the layer whose MLP gets the codebook adaptor", min=0,
                                  auto="90% of the depth (layer 27 of 32 in the reference)")
        eps: float | None = param(None, "initial deferral radius of a new codebook entry", min=0.0,
                                  auto="0.25 x the mean key norm of neutral prompts")
        edit_lr: float = param(1.0, "learning rate (Adam) of a new entry's value", min=0.0, max=100.0)
        n_iter: int = param(60, "optimisation steps per new value (fewer once greedy decoding gives the target "
                            "or the loss reaches stop_loss)", min=1, max=1000)
        stop_loss: float = param(0.05, "stop training a value once the target NLL is below this", min=0.0,
                                 max=10.0)
        eps_expand: str = param("coverage", "how a ball grows for a nearby key with the same target",
                                choices=("coverage", "moving_avg"))
        val_init: str = param("warm", "initial value: the current MLP output (warm) or random (cold)",
                              choices=("warm", "cold"))
        dist_fn: str = param("euc", "key distance", choices=("euc",))
        replacement: str = param("replace_from_hit", "which outputs a hit replaces: from the first in-ball "
                                 "token to the end, kept for generated tokens", choices=("replace_from_hit",))
        load_state: str = param("", "re-create the codebook from this saved state file instead of training "
                                "(relative to the session's folder)")
        save_state: str = param("", "write the codebook to this .safetensors file after the edits (relative "
                                "to the session's folder, which must exist; replaces only a GRACE state file)")
        allow_outside: bool = param(False, "let load_state / save_state name a file outside the session's "
                                    "folder (through .., an absolute path or a symlink)")
        overwrite: bool = param(False, "let save_state replace an existing file that is not a GRACE state file")

    params: GraceMethod.Params

    def apply(self, handle: ModelHandle, requests: Sequence[Request], ctx: EditContext) -> dict[str, Any]:
        from ..editing.grace_codebook import STATE_KIND, GraceCodebook, GraceConfig, ValueRunner, add_edit, key_scale
        from ..editing.lifelong import NEUTRAL_PROMPTS

        p = self.params
        layer = self.layer(handle)
        where = ctx.where
        load_path, save_path = self.state_paths(ctx, STATE_KIND)
        existing = self.installed(handle, GraceCodebook, layer)
        if load_path is not None:
            cb = GraceCodebook.load_state(str(load_path), f"{where}.load_state")
            if cb.hidden != handle.adapter.hidden_size:
                raise UserError(f"the saved codebook has keys of size {cb.hidden} but this model's hidden size "
                                f"is {handle.adapter.hidden_size}; it was saved for another model",
                                f"{where}.load_state")
            self.install_loaded(handle, existing, cb, ctx, "codebook", save_path)
            return {"edits": 0, "loaded": p.load_state, "entries": len(cb), "layer": cb.layer}
        if existing is None:
            cb = GraceCodebook(layer, handle.adapter.hidden_size)
            handle.add_wrapper(cb)
        else:
            cb = existing
        eps = p.eps
        if eps is None:
            cache = ctx.state.setdefault("grace_eps", {})
            key = (getattr(handle, "name", ""), layer)
            if key not in cache:
                was = cb.enabled
                cb.enabled = False
                try:
                    cache[key] = 0.25 * key_scale(handle, layer,
                                                  [handle.prompt_ids(q) for q in NEUTRAL_PROMPTS[:6]])
                finally:
                    cb.enabled = was
            eps = cache[key]
        cfg = settings_view(GraceConfig, p, eps=eps, seed=int(ctx.seed))
        runner = ValueRunner(handle, layer)
        def train(r: Request, on_step: Any) -> dict:
            # a merged request (query merging) keys EACH of its questions: a codebook key is one prompt's
            # last-token activation, so an entry keyed on the merged prompt is never hit by a question asked
            # alone; each member gets its own entry with its own target (the group's when it has none)
            if len(r.questions) <= 1:
                return add_edit(cb, handle, runner, r.prompt, r.target, r.item_ids, cfg, on_step)
            targets = r.targets if len(r.targets) == len(r.questions) else [r.target] * len(r.questions)
            infos = [add_edit(cb, handle, runner, q, t, r.item_ids, cfg, on_step)
                     for q, t in zip(r.questions, targets)]
            info = dict(infos[-1])
            info["action"] = "+".join(i["action"] for i in infos)
            info["members"] = len(infos)
            return info

        per_edit = self.edit_each(requests, ctx, p.n_iter, train, lambda info: info["action"])
        self.finish(cb, runner, save_path, ctx)
        return {"edits": len(requests), "entries": len(cb), "layer": layer, "eps": eps,
                "actions": {a: cb.log.count(a) for a in ("add", "expand", "split")}, "per_edit": per_edit}
