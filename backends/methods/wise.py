"""WISE (Wang et al., NeurIPS 2024) for sequential unlearning: edits go to a side memory.

A copy of one late MLP output projection (the side memory) receives every
forget edit; the main memory is never written (``touched_parameters`` is
empty: the side memory lives in the wrapper's state, which the transaction
snapshots).  At inference each query is routed to the side memory when its
activation score reaches a threshold learned from the edits, otherwise to the
untouched main memory; ``describe_query`` reports the decision per item
(``wise_route`` = "side" | "main", ``wise_act``, ``wise_side`` as 0/1).
The threshold sits halfway between the in-scope scores and the scores of our
own out-of-scope prompts and questions when the two are separated (never below
the paper's ``act_ratio x min in-scope``), and just above every out-of-scope
score when they overlap (``above_out_of_scope``); ``routing_pool`` chooses the mean
(the paper) or the maximum of the token scores as a query's score.

Edits applied one after another accumulate, across runs in step mode too (an
existing WISE wrapper at the same layer is extended, never reset).  By default
(``retrieve = true``, the paper's WISE-Retrieve) every ``merge_freq`` (5) edits
the side memory is frozen with its own threshold and a new one starts; a query
goes to the side memory most over its threshold (``wise_memory`` in the
per-item results), else to the main memory.  ``retrieve = false`` keeps one
side memory that absorbs every merge (the paper's WISE-Merge); on the embedded
model that one stops being selective after about 20 forget edits (see
:mod:`backends.editing.wise_memory`, where the algorithm lives).  The target
NLL weighs each target's first token once more (``first_token_weight``).

Scale-free defaults: the margins (alpha, beta, gamma) are fractions of the
mean main-memory output norm ``r`` measured on the first edit prompt
(0.1 r, 0.5 r, 0.3 r; the reference's 5 : 20 : 10 proportions were tuned for
Llama-2-7B's absolute scale), the elementwise norm constraint is
``2.5 x`` the standard deviation of the projection's weights, and the layer is
at 90 % of the depth (the reference edits layer 27 of 32).

Persistence: ``save_state = "file.safetensors"`` writes the side memory after
the edits; ``load_state`` re-creates it exactly (no training) in a replay.
Both paths are relative to the session's folder and must stay inside it
(``allow_outside`` opts out); ``save_state`` never creates folders, replaces
only a WISE state file (``overwrite`` opts out) and writes atomically.
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
class WiseMethod(OneLayerAdaptor):
    name: ClassVar[str] = "wise"
    summary: ClassVar[str] = "WISE: edits in a routed side memory of one MLP; main weights untouched"
    needs_retain: ClassVar[bool] = False
    EASYEDIT_KEYS: ClassVar[dict[str, Any]] = {
        "mask_ratio": "mask_ratio", "act_ratio": "act_ratio", "alpha": "alpha", "beta": "beta",
        "gamma": "gamma", "act_margin": "act_margin", "edit_lr": "edit_lr", "n_iter": "n_iter",
        "norm_constraint": "norm_constraint", "save_freq": "save_freq", "merge_freq": "merge_freq",
        "merge_alg": "merge_alg", "retrieve": "retrieve",
        "inner_params": ("layer", inner_params_layer),
    }

    @dataclass
    class Params:
        layer: int | None = param(None, "the layer whose MLP output projection gets a side memory", min=0,
                                  auto="90% of the depth (layer 27 of 32 in the reference)")
        mask_ratio: float = param(0.2, "share of side-memory elements one knowledge shard may change",
                                  min=0.001, max=1.0)
        act_ratio: float = param(0.88, "routing threshold = this x the smallest in-scope activation score",
                                 min=0.01, max=1.0)
        alpha: float | None = param(None, "routing margin: out-of-scope scores are pushed below alpha", min=0.0,
                                    auto="0.1 x the mean main-memory output norm")
        beta: float | None = param(None, "routing margin: in-scope scores are pushed above beta", min=0.0,
                                   auto="0.5 x the mean main-memory output norm")
        gamma: float | None = param(None, "routing margin: in-scope must exceed out-of-scope by gamma", min=0.0,
                                    auto="0.3 x the mean main-memory output norm")
        act_margin: list[float] = param([], "[alpha, beta, gamma] in one list (EasyEdit's act_margin); overrides "
                                 "the three fields when given", min=0.0)
        edit_lr: float | None = param(None, "learning rate of the side-memory optimisation", min=0.0, max=100.0,
                                      auto="0.05 with adam, 1.0 with sgd")
        optimizer: str = param("adam", "optimiser of the side memory", choices=("adam", "sgd"))
        n_iter: int = param(30, "optimisation steps per edit (fewer when the loss reaches stop_loss)", min=1,
                            max=1000)
        stop_loss: float = param(0.05, "stop an edit early once the target NLL is below this and the routing "
                                 "margins hold", min=0.0, max=10.0)
        norm_constraint: float | None = param(None, "the side memory stays within this elementwise distance "
                                              "of the main weights", min=0.0,
                                              auto="2.5 x the weights' standard deviation")
        save_freq: int = param(5, "edits per knowledge shard (each shard has its own random mask)", min=1,
                               max=100000)
        merge_freq: int = param(5, "edits per merge: the shards trained since the last merge are merged "
                                "(a multiple of save_freq); with retrieve, the edits each side memory holds",
                                min=1, max=100000)
        merge_alg: str = param("ties", "how shards are merged", choices=("ties",))
        retrieve: bool = param(True, "WISE-Retrieve: after every merge_freq edits the merged side memory is "
                               "frozen and a new one starts; each query goes to the side memory that "
                               "activates most (over its threshold), else to the main memory")
        merge_density: float = param(0.8, "TIES: share of each shard's changed elements kept (by magnitude)",
                                     min=0.01, max=1.0)
        routing_pool: str = param("max", "how a query's token scores make its routing score: their mean "
                                  "(the paper) or their maximum (lets the edited entity carry the decision)",
                                  choices=("mean", "max"))
        threshold_position: float = param(0.5, "where the routing threshold sits between the highest "
                                          "out-of-scope score (0) and the lowest in-scope score (1) when "
                                          "they are separated", min=0.0, max=1.0)
        above_out_of_scope: bool = param(True, "when in-scope and out-of-scope scores overlap, raise the "
                                         "threshold above every out-of-scope score (edits scoring below "
                                         "it then stay on the main memory)")
        first_token_weight: float = param(1.0, "extra weight of each target's first token in the NLL "
                                          "(greedy decoding follows the first token; 0 = plain mean NLL)",
                                          min=0.0, max=100.0)
        contexts: int = param(1, "context prefixes the edit prompt is also trained under (besides the bare "
                              "prompt)", min=0, max=5)
        load_state: str = param("", "re-create the side memory from this saved state file instead of training "
                                "(relative to the session's folder)")
        save_state: str = param("", "write the side memory to this .safetensors file after the edits (relative "
                                "to the session's folder, which must exist; replaces only a WISE state file)")
        allow_outside: bool = param(False, "let load_state / save_state name a file outside the session's "
                                    "folder (through .., an absolute path or a symlink)")
        overwrite: bool = param(False, "let save_state replace an existing file that is not a WISE state file")

        def __post_init__(self) -> None:   # cross-field checks: run at load time, so errors carry file:line
            if self.act_margin and len(self.act_margin) != 3:
                raise UserError(f"expected [alpha, beta, gamma], got {self.act_margin!r}", "params.act_margin")
            if self.merge_freq % self.save_freq:
                raise UserError(f"merge_freq ({self.merge_freq}) must be a multiple of save_freq "
                                f"({self.save_freq})", "params.merge_freq")

    params: WiseMethod.Params

    def _margins(self, scale: float) -> tuple[float, float, float]:
        p = self.params
        if p.act_margin:   # three numbers: checked in Params.__post_init__
            return tuple(float(x) for x in p.act_margin)  # type: ignore[return-value]
        return (p.alpha if p.alpha is not None else 0.1 * scale,
                p.beta if p.beta is not None else 0.5 * scale,
                p.gamma if p.gamma is not None else 0.3 * scale)

    def apply(self, handle: ModelHandle, requests: Sequence[Request], ctx: EditContext) -> dict[str, Any]:
        import torch

        from ..editing.lifelong import SuffixRunner
        from ..editing.wise_memory import (
            STATE_KIND,
            WiseConfig,
            WiseMemory,
            projection_inputs,
            template_header_len,
            train_edit,
        )

        p = self.params
        layer = self.layer(handle)
        where = ctx.where
        load_path, save_path = self.state_paths(ctx, STATE_KIND)
        existing = self.installed(handle, WiseMemory, layer)
        if load_path is not None:
            mem = WiseMemory.load_state(str(load_path), f"{where}.load_state")
            mem.check_compatible(handle, f"{where}.load_state")
            self.install_loaded(handle, existing, mem, ctx, "side memory", save_path)
            return {"edits": 0, "loaded": p.load_state, "memory_edits": len(mem.edits),
                    "thresholds": [thr for _, thr in mem.memories()], "layer": mem.layer}

        w = handle.adapter.mlp_out(layer).weight
        if w.device.type == "meta":   # offloaded by a device_map: accelerate's copy, on the layer's device
            from ..model import offloaded_value

            name = handle.adapter.mlp_out_weight_name(layer)
            kept = offloaded_value(handle.model, name)
            w = kept.to(handle.device_of(name)) if kept is not None else w
        if existing is None:
            mem = WiseMemory(layer, handle.adapter.spec.out_proj_layout, tuple(w.shape),
                             skip=template_header_len(handle), pool=p.routing_pool)
            handle.add_wrapper(mem)
        else:
            mem = existing
        if not mem.scale and requests:
            with torch.no_grad():
                acts = projection_inputs(handle, layer, handle.prompt_ids(requests[0].prompt))
                from ..editing.lifelong import weight_apply

                mem.scale = float(weight_apply(acts.to(w.dtype), w, mem.layout).norm(dim=-1).median())
        alpha, beta, gamma = self._margins(mem.scale)
        lr = p.edit_lr if p.edit_lr is not None else (0.05 if p.optimizer == "adam" else 1.0)
        c = p.norm_constraint if p.norm_constraint is not None else 2.5 * float(w.float().std())
        cfg = settings_view(WiseConfig, p, alpha=alpha, beta=beta, gamma=gamma, edit_lr=lr, norm_constraint=c,
                            seed=int(ctx.seed))
        runner = SuffixRunner(handle, layer)
        per_edit = self.edit_each(
            requests, ctx, p.n_iter,
            lambda r, on_step: train_edit(mem, handle, runner, r.prompt, r.target, r.item_ids, cfg, on_step),
            lambda info: f"threshold {info['threshold']:.3g}, {info['memories']} side memories")
        self.finish(mem, runner, save_path, ctx)
        return {"edits": len(requests), "memory_edits": len(mem.edits), "layer": layer,
                "margins": [alpha, beta, gamma], "norm_constraint": c, "lr": lr,
                "shards_pending": len(mem.shards), "memories": len(mem.memories()),
                "thresholds": [thr for _, thr in mem.memories()], "per_edit": per_edit}
