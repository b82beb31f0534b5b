"""The locate-and-edit driver shared by ROME, MEMIT and AlphaEdit.

* :func:`apply_rome` — requests one after the other; each: optimise ``delta``
  at layer ``L`` (:mod:`.values`), average the key over the context templates
  (:mod:`.keys`), add the rank-one update (:mod:`.linalg`).
* :func:`apply_spread` — MEMIT and AlphaEdit: requests in batches; per batch,
  optimise one ``delta`` per request at the LAST layer of the range (all on
  the same weights: :func:`~.values.optimise_values`, which on CUDA lets
  several requests share each step's forward), then
  walk the layers in order, each time recomputing the keys and the remaining
  residual on the partly edited model and giving layer ``i`` the share
  ``1 / (layers left)`` of it (MEMIT's spreading).  The per-layer update is a
  :class:`SpreadSolver` the method class picks: :class:`LeastSquares`
  (MEMIT) or :class:`NullSpaceProjection` (AlphaEdit: every update projected
  onto the null space of the preserved keys, the keys of the earlier edits of
  the same session, ``ctx.state``, added to its normal equations).

AlphaEdit's accumulated keys belong to the SESSION and to the weights they
were computed for: ``ctx.state["history"]`` holds, for each apply, a hash of
the edited matrices after it and the keys ``K_p`` (``d_in x n`` per layer) of
all edits so far (their ``K_p K_p^T`` enters the normal equations; keeping the
keys is ``O(d_in n)`` instead of ``d_in^2`` per entry).  A new
apply continues from the entry whose hash matches the current weights; when
none does (the runner rolled the edit back, the user pressed undo to the
base model) it starts from zero.  So undo/redo in step mode and headless runs
that restart from the unedited model both see the right history.

**Query merging** (a request with several questions, ``merge_keys = "each"``,
the default): ONE ``delta`` is optimised for the whole group, every question
asked alone under every template with its own target (``merge_targets``)
and ``delta`` entering at its own subject's last token
(:func:`~.values.optimise_value`'s ``members``).  Each question is then
keyed at its own subject: MEMIT and AlphaEdit get one column per question
(key ``k_i``, residual ``z_i - h_i`` with ``z_i = h_i + delta`` at the last
layer), ROME maps all ``m`` keys to ``delta`` (``merge_update``).  So every
question of a group, asked alone, is edited — the paper's recipe keys the
merged prompt at its last subject only (``merge_keys = "prompt"``), which
leaves the other ``m - 1`` questions answered.

Every update is checked for NaN/inf before it is written
(:class:`~backends.errors.NonFiniteError`; the transaction restores the
weights), and every loop reports progress and checks the cancel token.
"""

from __future__ import annotations

import abc
import hashlib
import time
from collections.abc import Sequence
from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch

from ..errors import NonFiniteError
from ..events import Log, Tracker
from ..subjects import resolve_subject
from .keys import averaged_keys, edit_prompt, keys_at, request_prompts
from .linalg import alphaedit_update, memit_update, multi_key_update, rome_update
from .templates import context_templates
from .values import optimise_value, optimise_values

if TYPE_CHECKING:
    from ..methods.alphaedit import AlphaEdit
    from ..methods.base import EditContext
    from ..methods.memit import MEMIT
    from ..methods.rome import ROME
    from ..model import ModelHandle
    from ..targets import Request
    from .locate_params import LocateParams

HISTORY_LIMIT = 32


def _subject(req: Request, p: LocateParams) -> str | None:
    return None if p.fact_token == "last" else resolve_subject(req)


def _members(req: Request, p: LocateParams) -> list[tuple[str, str | None, str]]:
    """The ``(question, subject, target)`` a request is edited with (module doc: query merging)."""
    questions = list(getattr(req, "questions", None) or [])
    if len(questions) <= 1 or p.merge_keys == "prompt":
        return [(req.prompt, _subject(req, p), req.target)]
    subjects = list(getattr(req, "subjects", None) or [None] * len(questions))
    targets = list(getattr(req, "targets", None) or [req.target] * len(questions))
    ids = list(getattr(req, "item_ids", None) or ["?"] * len(questions))
    out = []
    for q, s, t, i in zip(questions, subjects, targets, ids):
        one = SimpleNamespace(prompt=q, questions=[q], subject=s, item_ids=[i])
        out.append((q, None if p.fact_token == "last" else resolve_subject(one),
                    t if p.merge_targets == "own" else req.target))
    return out


def templates_for(handle: ModelHandle, p: LocateParams, seed: int) -> list[str]:
    if p.templates <= 0:
        return ["{}"]
    return context_templates(handle, ((5, p.templates), (10, p.templates)), seed=seed)


def _where(req: Request) -> str:
    return "item " + ", ".join(getattr(req, "item_ids", []) or ["?"])


def _write(W: torch.Tensor, dW: torch.Tensor, name: str) -> None:
    if not torch.isfinite(dW).all():
        raise NonFiniteError(f'the update of "{name}" is not finite (NaN or inf); the edit was rolled back')
    with torch.no_grad():
        W.add_(dW.to(device=W.device, dtype=W.dtype))   # written where W lives (its layer's device)


def _stats(handle: ModelHandle, layers: Sequence[int], p: LocateParams, ctx: EditContext) -> tuple[dict, dict]:
    from .. import stats

    mats, info = stats.second_moments(handle, layers, p.corpus, p.token_budget, p.stats_tol,
                                      on_event=ctx.on_event, cancel=ctx.cancel,
                                      base_dir=ctx.base_dir,
                                      where=f'{ctx.where}.corpus')
    return mats, {"corpus": info.corpus, "tokens": info.tokens, "seconds": round(info.seconds, 3),
                  "cached_layers": info.cached_layers, "converged": info.converged}


def apply_rome(handle: ModelHandle, requests: Sequence[Request], p: ROME.Params, layer: int, ctx: EditContext,
               name: str = "rome") -> dict:
    ad = handle.adapter
    t0 = time.perf_counter()
    templates = templates_for(handle, p, ctx.seed)
    cov, stats_info = (None, None)
    if p.mom2_adjustment:
        mats, stats_info = _stats(handle, [layer], p, ctx)
        cov = mats[layer]
    edits = Tracker(ctx.on_event, ctx.cancel, f"{name}: edits", len(requests))
    W = ad.mlp_out_matrix(layer)
    wname = ad.mlp_out_weight_name(layer)
    per_edit = []
    for i, req in enumerate(requests):
        subject = _subject(req, p)
        where = _where(req)
        steps = Tracker(ctx.on_event, ctx.cancel, f"{name}: edit {i + 1}/{len(requests)}", p.v_steps,
                        detail=f"subject: {subject}")
        members = _members(req, p)
        vr = optimise_value(handle, layer, req.prompt, subject, req.target, templates, p, steps, where,
                            members=members)
        per_member = [request_prompts(handle, q, s, templates, where, p.fact_token) for q, s, _t in members]
        K = averaged_keys(handle, [layer], per_member)[layer]          # (d_in, m)
        if K.shape[1] == 1 or p.merge_update == "mean-key":
            dW = rome_update(K.mean(1), vr.delta, cov)
        elif p.merge_update == "exact":
            dW = multi_key_update(K, vr.delta[:, None].expand(-1, K.shape[1]), cov)
        else:
            if cov is None:
                mats, stats_info = _stats(handle, [layer], p, ctx)
                cov = mats[layer]
            dW = memit_update(K, vr.delta[:, None].expand(-1, K.shape[1]), cov, p.mom2_update_weight)
        _write(W, dW, wname)
        per_edit.append({"items": list(getattr(req, "item_ids", [])), "subject": subject, "steps": vr.steps,
                         "nll": round(vr.nll, 4), "target_prob": round(vr.target_prob, 4),
                         "delta_norm": round(float(vr.delta.norm()), 3), "h_norm": round(vr.h_norm, 3),
                         "update_norm": round(float(dW.norm()), 4), "questions": len(members),
                         "stopped": vr.stopped})
        edits.step(loss=vr.nll, detail=subject)
    return {"edits": len(requests), "layer": layer, "templates": len(templates), "stats": stats_info,
            "per_edit": per_edit, "seconds": round(time.perf_counter() - t0, 3)}


# --------------------------------------------------------------------------- MEMIT / AlphaEdit


def weights_hash(handle: ModelHandle, layers: Sequence[int]) -> str:
    h = hashlib.sha256()
    for l in layers:
        w = handle.adapter.mlp_out(l).weight.detach()
        h.update(w.contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _projectors(handle: ModelHandle, layers: Sequence[int], mats: dict, p: LocateParams, threshold: float,
                relative: bool, ctx: EditContext) -> tuple[dict, dict]:
    """Null-space bases ``U`` per layer, cached in the session state (one eigendecomposition per layer)."""
    cache = ctx.state.setdefault("nullspace", {})
    out, dims = {}, {}
    for l in layers:
        key = (handle.fingerprint, l, p.corpus, p.token_budget, threshold, relative)
        if key not in cache:   # and on disk, next to the statistics (one eigendecomposition per model)
            from .. import stats

            cache[key] = stats.nullspace_basis(handle, l, mats[l], threshold, relative)
        out[l], dims[l] = cache[key]
    return out, dims


class SpreadSolver(abc.ABC):
    """The per-layer update of the spread driver; one fresh instance per apply (it may keep state across layers)."""

    def begin(self, handle: ModelHandle, layers: list[int], mats: dict, p: LocateParams, ctx: EditContext) -> None:
        """Before the first batch (the key statistics ``mats`` are known)."""

    @abc.abstractmethod
    def update(self, layer: int, K: torch.Tensor, R: torch.Tensor, mats: dict) -> torch.Tensor:
        """``dW`` for ``layer`` from the keys ``K`` (d_in x n) and the residual share ``R`` (d x n)."""

    def written(self, layer: int, K: torch.Tensor) -> None:
        """After ``layer``'s update was written."""

    def finish(self, handle: ModelHandle, layers: list[int], ctx: EditContext, report: dict) -> None:
        """After the last batch; may add to the report."""


class LeastSquares(SpreadSolver):
    """MEMIT: the covariance-regularised least squares ``dW = R K^T (lambda C + K K^T)^-1``."""

    def __init__(self, mom2_update_weight: float) -> None:
        self.mom2_update_weight = mom2_update_weight

    def update(self, layer: int, K: torch.Tensor, R: torch.Tensor, mats: dict) -> torch.Tensor:
        return memit_update(K, R, mats[layer], self.mom2_update_weight)


class NullSpaceProjection(SpreadSolver):
    """AlphaEdit: the update projected onto the null space of the preserved keys, earlier edits' keys kept.

    The keys of the session's earlier edits come from ``ctx.state["history"]``
    (the entry whose weights hash matches the current weights) and the new keys
    are appended to it at the end (see the module doc).
    """

    def __init__(self, nullspace_threshold: float, relative_threshold: bool, l2: float) -> None:
        self.nullspace_threshold = nullspace_threshold
        self.relative_threshold = relative_threshold
        self.l2 = l2
        self.P: dict = {}
        self.null_dims: dict = {}
        self.prev: dict = {}

    def begin(self, handle: ModelHandle, layers: list[int], mats: dict, p: LocateParams, ctx: EditContext) -> None:
        self.P, self.null_dims = _projectors(handle, layers, mats, p, self.nullspace_threshold,
                                             self.relative_threshold, ctx)
        history = ctx.state.setdefault("history", [])
        current = weights_hash(handle, layers)
        prev = None
        for entry in reversed(history):
            if entry["hash"] == current and entry["layers"] == tuple(layers):
                prev = dict(entry["keys"])
                break
        if prev is None:
            prev = {l: torch.zeros((mats[l].shape[0], 0), dtype=torch.float32, device=mats[l].device)
                    for l in layers}
        self.prev = prev
        earlier = min(int(v.shape[1]) for v in prev.values())
        ctx.on_event(Log(f"alphaedit: null space dims {self.null_dims}; "
                         f"{f'continuing {earlier} earlier edit keys' if earlier else 'no earlier edits'}"))

    def update(self, layer: int, K: torch.Tensor, R: torch.Tensor, mats: dict) -> torch.Tensor:
        return alphaedit_update(K, R, self.P[layer], self.prev[layer], self.l2)

    def written(self, layer: int, K: torch.Tensor) -> None:
        self.prev[layer] = torch.cat([self.prev[layer], K.detach().float().to(self.prev[layer].device)], 1)

    def finish(self, handle: ModelHandle, layers: list[int], ctx: EditContext, report: dict) -> None:
        history = ctx.state.setdefault("history", [])
        history.append({"hash": weights_hash(handle, layers), "layers": tuple(layers), "keys": self.prev})
        del history[:-HISTORY_LIMIT]
        report["null_space_dims"] = self.null_dims
        report["accumulated_edits"] = int(len(ctx.state.get("history", [])))


def apply_spread(handle: ModelHandle, requests: Sequence[Request], p: MEMIT.Params | AlphaEdit.Params,
                 layers: list[int], ctx: EditContext, solver: SpreadSolver, name: str = "memit") -> dict:
    ad = handle.adapter
    t0 = time.perf_counter()
    templates = templates_for(handle, p, ctx.seed)
    mats, stats_info = _stats(handle, layers, p, ctx)
    solver.begin(handle, layers, mats, p, ctx)
    last = layers[-1]
    bs = p.batch_size or len(requests)
    edits = Tracker(ctx.on_event, ctx.cancel, f"{name}: edits", len(requests))
    per_edit, per_batch = [], []
    for b0 in range(0, len(requests), bs):
        batch = requests[b0:b0 + bs]
        subjects = [_subject(r, p) for r in batch]
        wheres = [_where(r) for r in batch]
        deltas = []
        cols: list[tuple] = []      # (template prompts, bare prompt, request index) per key column
        all_members = [_members(req, p) for req in batch]

        def tracker_for(a: int, b: int, b0: int = b0, subjects: list = subjects) -> Tracker:
            if a == b:
                return Tracker(ctx.on_event, ctx.cancel, f"{name}: value {b0 + a + 1}/{len(requests)}",
                               p.v_steps, detail=f"subject: {subjects[a]}")
            return Tracker(ctx.on_event, ctx.cancel, f"{name}: values {b0 + a + 1}-{b0 + b + 1}/{len(requests)}",
                           p.v_steps, detail=f"{b - a + 1} requests together")

        # every request's delta on the same weights: several requests share a forward (values.optimise_values)
        results = optimise_values(handle, last, all_members, templates, p, tracker_for, wheres, seed=ctx.seed)
        for j, (req, subject, members, vr) in enumerate(zip(batch, subjects, all_members, results)):
            deltas.append(vr.delta)
            per_edit.append({"items": list(getattr(req, "item_ids", [])), "subject": subject, "steps": vr.steps,
                             "nll": round(vr.nll, 4), "target_prob": round(vr.target_prob, 4),
                             "delta_norm": round(float(vr.delta.norm()), 3), "h_norm": round(vr.h_norm, 3),
                             "questions": len(members), "stopped": vr.stopped})
            # one column per member question: its own prompts and key, the request's delta
            for q, s, _t in members:
                cols.append((request_prompts(handle, q, s, templates, wheres[j], p.fact_token),
                             edit_prompt(handle, q, s, "{}", wheres[j], p.fact_token), len(deltas) - 1))
            edits.step(0, loss=vr.nll, detail=subject)
        per_req = [c[0] for c in cols]
        bare = [c[1] for c in cols]
        _, outs = keys_at(handle, [], bare, outputs=[last])
        z = outs[last] + torch.stack(deltas)[[c[2] for c in cols]]   # (columns, d) wanted residual, last layer
        layer_tr = Tracker(ctx.on_event, ctx.cancel, f"{name}: update layers", len(layers))
        norms = {}
        for i, l in enumerate(layers):
            K = averaged_keys(handle, [l], per_req)[l]            # (d_in, n)
            _, outs = keys_at(handle, [], bare, outputs=[last])
            R = ((z - outs[last]).T / (len(layers) - i)).to(K.device)   # (d, n), on layer l's device
            dW = solver.update(l, K, R, mats)
            _write(ad.mlp_out_matrix(l), dW, ad.mlp_out_weight_name(l))
            norms[l] = round(float(dW.norm()), 4)
            solver.written(l, K)
            layer_tr.step(detail=f"layer {l}")
        _, outs = keys_at(handle, [], bare, outputs=[last])
        col_delta = torch.stack(deltas)[[c[2] for c in cols]]
        miss = float(((z - outs[last]).norm(dim=1) / col_delta.norm(dim=1).clamp_min(1e-6)).mean())
        per_batch.append({"size": len(batch), "columns": len(cols), "update_norms": norms,
                          "residual_left": round(miss, 4)})
        edits.step(len(batch))
    report = {"edits": len(requests), "layers": layers, "templates": len(templates), "stats": stats_info,
              "batches": per_batch, "per_edit": per_edit, "seconds": round(time.perf_counter() - t0, 3)}
    solver.finish(handle, layers, ctx, report)
    return report


__all__ = ["LeastSquares", "NullSpaceProjection", "SpreadSolver", "apply_rome", "apply_spread", "weights_hash"]
