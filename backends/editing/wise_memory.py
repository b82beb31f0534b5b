"""WISE side memory (Wang et al., NeurIPS 2024), our implementation.

The main memory is the MLP output projection ``W`` of one late layer ``L``; it
is never written.  The side memory is a second copy of that projection,
``W' = W + D``; we store the offset ``D`` (same shape and layout as ``W``), so
a later method that edits ``W`` is seen through the side memory too.

Routing (inference).  For a token with projection input ``a`` the activation
score is ``||W' a - W a|| = ||D a||``; a sequence's score is the mean (the
paper; ``pool = "mean"``) or the maximum (``pool = "max"``) over its real
(non-padding) tokens of the current call after the shared template header.
With the mean, template tokens shared by many questions ("What is the capital
of") must carry part of an edit's score, so unseen questions of the same shape
score like the edits; with the maximum one token (typically the edited
entity) can carry it.  Training uses the same pooling.  A sequence whose score reaches
the threshold is answered by the side memory (its projection output becomes
``W a + D a``), otherwise by the main memory (output left bit-for-bit as is).
During cached generation the decision made on the prompt is kept for every
generated token of that row.  In a single teacher-forced pass over
``prompt + answer`` the decision uses every token of the pass.

Training one edit (``train_edit``).  The edit prompt (bare, and under a few
fixed neutral context prefixes) with the target appended; loss =
target NLL + routing loss, with the routing loss on in-scope scores ``s_in``
(edit prompts' tokens) and out-of-scope scores ``s_out`` (neutral prompts)::

    relu(s_out - alpha) + relu(beta - s_in) + relu(gamma + s_out - s_in)

The target NLL is the mean over the target tokens plus ``first_token_weight``
times the mean NLL of each target's *first* token.  A mean over a dozen tokens
hides the first one, and greedy decoding follows it: on the embedded model,
five edits trained to a mean NLL of 0.2-0.6 still began four of the five
answers with "The ..." (the original answer); with the first token weighted
once more all five began their refusal (compare
``bench_lifelong.py --params '{"first_token_weight": 0}'``).

Only the elements of the current knowledge shard's random mask (share
``mask_ratio``) may change, and ``D`` is clamped elementwise to
``[-norm_constraint, +norm_constraint]`` (the side memory stays within that
distance of the main weights).  Projection inputs do not depend on ``D``, so
the out-of-scope scores come from inputs computed once, and the forward passes
run only from block ``L`` on (:class:`~backends.editing.lifelong.SuffixRunner`).

Shards and merging.  Edits fill shards of ``save_freq`` edits; the shards of
one merge group are trained from the same base ``D_merged`` under independent
random masks and combined TIES-style (trim each shard's change to its largest
``merge_density`` share by magnitude, elect a sign per element by the summed
trimmed values, average the values that agree).  After ``merge_freq`` edits
the group is folded into ``D_merged`` and the next shards start from it.
Sequential edits always accumulate: nothing is reset between edits.

Retrieval (WISE-Retrieve, the paper's variant for long sequences; on by
default).  With ``retrieve`` the folded side memory is *frozen* after every
``merge_freq`` edits, together with its own threshold, and the next edits go
to a fresh side memory (``D = 0``, routing trained on its own edits only).  At
inference each query is scored by every side memory; the one with the highest
``score / threshold`` answers when that ratio reaches 1, otherwise the main
memory does.  Why: one side memory holding many edits stops being selective
(every query, retain questions included, ends up routed to it); the figures
are in ``benchmarks/RESULTS.md`` (``benchmarks/bench_lifelong.py``).

Threshold.  After every edit the in-scope score of every edit prompt of the active memory is
recomputed with the current (merged) side memory from its stored projection
inputs, and the out-of-scope scores of the neutral prompts and questions
(:data:`OUT_OF_SCOPE`) with the same side memory.  The paper's threshold is
``act_ratio * min(in-scope)``; when the two sets are separated
(``max(out-of-scope) < min(in-scope)``) we raise it to a point between them
(``threshold_position``: 0 = the out-of-scope maximum, 1 = the in-scope minimum; halfway by default),
so unseen in-distribution queries (retain questions) that score like the
out-of-scope questions stay on the main memory.  When they overlap the paper's
rule is kept, except that with ``above_out_of_scope`` (the default) the
threshold is raised just above the highest out-of-scope score: a known
out-of-scope prompt is never routed, and an edit scoring below it stays on the
main memory.  On the embedded model (40 edits, seed 1) this lifted retain from
0.75 to 0.85 with forget 0.125 -> 0.15.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .hooks import stop_after
from .lifelong import (
    NEUTRAL_PROMPTS,
    NEUTRAL_QUESTIONS,
    CallTracker,
    HookedWrapper,
    SuffixRunner,
    end_ids,
    load_tensors,
    save_tensors,
    sequence_batch,
    weight_apply,
)

if TYPE_CHECKING:
    from ..model import ModelHandle

STATE_KIND = "unlearn-tui/wise-memory"
STATE_VERSION = 2   # 2: retrieval archive (version 1 files load with an empty archive)

OUT_OF_SCOPE = NEUTRAL_PROMPTS + NEUTRAL_QUESTIONS   # the routing loss's out-of-scope examples

CONTEXT_PREFIXES = ["Quick question.", "I was wondering about something.", "Please answer briefly.",
                    "Here is what I want to know.", "Help me with this."]


@dataclass(frozen=True)
class WiseConfig:
    """What one edit's training reads: a view of ``WiseMethod.Params`` with the auto values resolved.

    No defaults: built only by :func:`backends.methods.base.settings_view` from
    the method's Params (same field names), so the engine and the app cannot run
    different settings.  The routing pool lives on the :class:`WiseMemory`.
    """

    mask_ratio: float
    act_ratio: float
    alpha: float              # resolved: 0.1 x the main-memory output scale unless given
    beta: float               # resolved: 0.5 x that scale
    gamma: float              # resolved: 0.3 x that scale
    edit_lr: float            # resolved: 0.05 with adam, 1.0 with sgd
    optimizer: str
    n_iter: int
    stop_loss: float
    norm_constraint: float    # resolved: 2.5 x the weights' standard deviation
    save_freq: int
    merge_freq: int
    merge_density: float
    retrieve: bool
    threshold_position: float
    above_out_of_scope: bool
    first_token_weight: float
    contexts: int
    seed: int                 # the session's seed


def ties_merge(taus: list[torch.Tensor], density: float) -> torch.Tensor:
    """TIES merge of task vectors: trim by magnitude, elect signs, disjoint mean."""
    trimmed = []
    for t in taus:
        nz = int((t != 0).sum())
        k = max(1, int(round(density * nz))) if nz else 0
        if k == 0:
            trimmed.append(torch.zeros_like(t))
            continue
        flat = t.abs().flatten()
        thr = torch.topk(flat, k, sorted=False).values.min()
        trimmed.append(torch.where(t.abs() >= thr, t, torch.zeros_like(t)))
    stack = torch.stack(trimmed)
    sign = torch.sign(stack.sum(0))
    agree = (torch.sign(stack) == sign.unsqueeze(0)) & (stack != 0)
    total = (stack * agree).sum(0)
    count = agree.sum(0).clamp(min=1)
    return total / count


class WiseMemory(HookedWrapper):
    """The inference-time wrapper: side memories, routing hook, state, persistence.

    The *active* side memory (``merged`` + ``shards`` -> ``delta``) receives the
    edits from ``active_from`` on; ``archive`` holds the frozen side memories
    of retrieval mode (``{"delta", "threshold", "edits"}``).
    """

    name = "wise"

    def __init__(self, layer: int, layout: str, shape: tuple[int, ...], scale: float = 0.0,
                 skip: int = 0, pool: str = "mean") -> None:
        self.layer = layer
        self.pool = pool                      # how token scores make a sequence score: mean | max
        self.skip = skip                      # leading tokens every prompt shares (chat-template header)
        self.layout = layout
        self.shape = tuple(shape)
        self.scale = scale                    # mean ||W a|| on the first edit prompt (sizes the margins)
        self.merged: torch.Tensor | None = None          # D_merged
        self.shards: list[dict] = []                     # {"tau": tensor, "mask": bool tensor, "edits": int}
        self.acts: list[torch.Tensor] = []               # per edit: projection inputs of the bare prompt [T, d_in]
        self.edits: list[dict] = []                      # {"prompt", "target", "item_ids"}
        self.threshold = float("inf")
        self.out_scope_max: float | None = None          # highest out-of-scope score at the last threshold
        self.shard_masks_made = 0
        self.delta: torch.Tensor | None = None           # effective D of the active memory (derived)
        self.archive: list[dict] = []                    # frozen side memories (retrieval mode)
        self.active_from = 0                             # first edit (index) of the active memory
        self.enabled = True
        self._hook = None
        self._tracker = CallTracker()
        self._routes: torch.Tensor | None = None         # per row of the current generation
        self.last_scores: torch.Tensor | None = None
        self.last_routes: torch.Tensor | None = None
        self.last_choice: torch.Tensor | None = None     # per row: index into memories(), -1 = main
        self.last_thresholds: torch.Tensor | None = None
        self._neutral_cache: Any = None

    # ---- effective side memory ------------------------------------------------------------
    def refresh(self, density: float) -> None:
        base = self.merged
        taus = [s["tau"] for s in self.shards]
        if not taus:
            self.delta = base
        elif len(taus) == 1:
            self.delta = taus[0] if base is None else base + taus[0]
        else:
            m = ties_merge(taus, density)
            self.delta = m if base is None else base + m
        self.density = density

    def scores_of(self, acts: torch.Tensor, delta: torch.Tensor | None = None) -> torch.Tensor:
        """Mean activation score of one sequence's projection inputs ``[T, d_in]`` (after the header)."""
        d = self.delta if delta is None else delta
        if d is None:
            return torch.zeros(())
        if acts.shape[0] > self.skip:
            acts = acts[self.skip:]
        tok = weight_apply(acts.to(device=d.device, dtype=d.dtype), d, self.layout).norm(dim=-1)
        return tok.max() if self.pool == "max" else tok.mean()

    def update_threshold(self, act_ratio: float, out_scores: torch.Tensor | None = None,
                         position: float = 0.5, above_out_of_scope: bool = False) -> None:
        """Threshold between the in-scope and the out-of-scope scores (see the module doc)."""
        active = self.acts[self.active_from:]
        if not active or self.delta is None:
            self.threshold = float("inf")
            return
        with torch.no_grad():
            s = torch.stack([self.scores_of(a) for a in active])
        self.in_scope_scores = [float(x) for x in s]
        low = float(s.min())
        self.threshold = low * act_ratio
        if out_scores is not None and out_scores.numel():
            high_out = float(out_scores.max())
            self.out_scope_max = high_out
            if high_out < low:   # separable: sit between them, never below the paper's rule
                self.threshold = max(self.threshold, high_out + position * (low - high_out))
            elif above_out_of_scope:   # overlap: still never route a known out-of-scope prompt
                self.threshold = max(self.threshold, math.nextafter(high_out, math.inf))
        self.act_ratio = act_ratio

    def memories(self) -> list[tuple[torch.Tensor, float]]:
        """Every side memory a query can be routed to: (D, threshold), frozen ones first."""
        out = [(m["delta"], float(m["threshold"])) for m in self.archive]
        if self.delta is not None and self.active_from < len(self.edits):
            out.append((self.delta, float(self.threshold)))
        return out

    def freeze_active(self) -> None:
        """Retrieval mode: archive the active (folded) memory with its threshold; start a fresh one."""
        if self.delta is None or self.active_from >= len(self.edits):
            return
        self.archive.append({"delta": self.delta, "threshold": float(self.threshold),
                             "edits": len(self.edits) - self.active_from})
        self.merged = None
        self.shards = []
        self.delta = None
        self.threshold = float("inf")
        self.active_from = len(self.edits)

    # ---- hooks ----------------------------------------------------------------------------
    def hook_module(self, handle: ModelHandle) -> Any:
        return handle.adapter.mlp_out(self.layer)

    def _forward(self, mod, args, out):
        if not self.enabled or not args:
            return None
        mems = self.memories()
        if not mems:
            return None
        a = args[0]
        if a.dim() != 3:
            return None
        B, T = a.shape[0], a.shape[1]
        offsets: dict[int, torch.Tensor] = {}   # memory -> D a, kept from scoring for the output
        if self._tracker.continuing and self._routes is not None and self._routes.shape[0] == B:
            choice = self._routes
            use = torch.ones(B, T, dtype=torch.bool, device=a.device)
        else:
            use = routing_mask(self._tracker.valid(B, T, a.device), self.skip)
            best = torch.full((B,), float("-inf"), device=a.device)
            best_k = torch.zeros(B, dtype=torch.long, device=a.device)
            best_score = torch.zeros(B, device=a.device)
            best_thr = torch.zeros(B, device=a.device)
            for k, (D, thr) in enumerate(mems):
                offsets[k] = weight_apply(a, D.to(device=a.device, dtype=a.dtype), self.layout)
                tok = offsets[k].norm(dim=-1).float()
                if self.pool == "max":
                    score = tok.masked_fill(~use, float("-inf")).max(1).values
                else:
                    usef = use.float()
                    score = (tok * usef).sum(1) / usef.sum(1).clamp(min=1)
                ratio = score / thr if thr > 0 else torch.where(score >= thr, float("inf"), float("-inf"))
                better = ratio > best
                best = torch.where(better, ratio, best)
                best_k = torch.where(better, torch.full_like(best_k, k), best_k)
                best_score = torch.where(better, score, best_score)
                best_thr = torch.where(better, torch.full_like(best_thr, thr), best_thr)
            routes = best >= 1.0
            choice = torch.where(routes, best_k, torch.full_like(best_k, -1))
            self._routes = choice
            self.last_scores = best_score.detach()
            self.last_routes = routes.detach()
            self.last_choice = choice.detach()
            self.last_thresholds = best_thr.detach()
        if not bool((choice >= 0).any()):
            return None
        res = out
        for k in sorted({int(x) for x in choice.tolist() if x >= 0}):
            d = offsets[k] if k in offsets else weight_apply(a, mems[k][0].to(device=a.device, dtype=a.dtype),
                                                             self.layout)
            res = torch.where(((choice == k)[:, None] & use)[:, :, None], res + d, res)
        return res

    def describe_query(self, handle: ModelHandle, question: str) -> dict:
        if not self.memories():
            return {"wise_route": "main", "wise_side": 0.0, "wise_act": 0.0}
        ids = torch.tensor([handle.prompt_ids(question)], device=handle.input_device)
        with torch.no_grad():
            handle.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        side = bool(self.last_routes[0]) if self.last_routes is not None else False
        act = float(self.last_scores[0]) if self.last_scores is not None else 0.0
        thr = float(self.last_thresholds[0]) if self.last_thresholds is not None else float(self.threshold)
        return {"wise_route": "side" if side else "main", "wise_side": 1.0 if side else 0.0,
                "wise_act": act, "wise_threshold": thr,
                # which side memory answered ("0", "1", ...; "-" = the main memory); a label, not a score
                "wise_memory": str(int(self.last_choice[0])) if side and self.last_choice is not None else "-"}

    # ---- transaction state ----------------------------------------------------------------
    # Copy-on-write (see backends.model.Wrapper): every tensor of the state is replaced when it changes,
    # never written in place, so a transaction shares the entries and keeps only those an edit changed.
    copy_on_write = True

    def get_state(self) -> dict:
        """The mutable state as flat named entries: one per shard, edit, projection input and frozen memory."""
        s: dict = {"merged": self.merged, "delta": self.delta, "threshold": self.threshold, "scale": self.scale,
                   "shard_masks_made": self.shard_masks_made, "skip": self.skip, "active_from": self.active_from,
                   "out_scope_max": self.out_scope_max, "shards": len(self.shards), "acts": len(self.acts),
                   "edits": len(self.edits), "archive": len(self.archive)}
        for i, sh in enumerate(self.shards):
            s[f"shard.{i}.tau"], s[f"shard.{i}.mask"], s[f"shard.{i}.edits"] = sh["tau"], sh["mask"], sh["edits"]
        for i, a in enumerate(self.acts):
            s[f"act.{i}"] = a
        for i, e in enumerate(self.edits):
            s[f"edit.{i}"] = e
        for i, m in enumerate(self.archive):
            s[f"archive.{i}.delta"], s[f"archive.{i}.threshold"], s[f"archive.{i}.edits"] = \
                m["delta"], m["threshold"], m["edits"]
        return s

    def set_state(self, state: dict) -> None:
        self.merged = state["merged"]
        self.delta = state["delta"]
        self.threshold = state["threshold"]
        self.scale = state["scale"]
        self.shard_masks_made = state["shard_masks_made"]
        self.skip = state["skip"]
        self.active_from = state["active_from"]
        self.out_scope_max = state.get("out_scope_max")
        self.shards = [{"tau": state[f"shard.{i}.tau"], "mask": state[f"shard.{i}.mask"],
                        "edits": state[f"shard.{i}.edits"]} for i in range(state["shards"])]
        self.acts = [state[f"act.{i}"] for i in range(state["acts"])]
        self.edits = [state[f"edit.{i}"] for i in range(state["edits"])]
        self.archive = [{"delta": state[f"archive.{i}.delta"], "threshold": state[f"archive.{i}.threshold"],
                         "edits": state[f"archive.{i}.edits"]} for i in range(state["archive"])]
        self._routes = None

    # ---- persistence ----------------------------------------------------------------------
    def save_state(self, path: str, where: str = "params.save_state", overwrite: bool = False) -> None:
        """Write the state to ``path`` (see :func:`~backends.editing.lifelong.save_tensors` for the rules)."""
        tensors: dict[str, torch.Tensor] = {}
        if self.merged is not None:
            tensors["merged"] = self.merged
        for i, s in enumerate(self.shards):
            tensors[f"shard.{i}.tau"] = s["tau"]
            tensors[f"shard.{i}.mask"] = s["mask"].to(torch.uint8)
        for i, a in enumerate(self.acts):
            tensors[f"act.{i}"] = a
        if self.delta is not None:
            tensors["delta"] = self.delta
        for i, m in enumerate(self.archive):
            tensors[f"archive.{i}.delta"] = m["delta"]
        meta = {"kind": STATE_KIND, "version": STATE_VERSION, "layer": self.layer, "layout": self.layout,
                "shape": list(self.shape), "scale": self.scale, "skip": self.skip, "threshold": self.threshold,
                "edits": self.edits, "shard_edits": [s["edits"] for s in self.shards],
                "shard_masks_made": self.shard_masks_made, "pool": self.pool, "active_from": self.active_from,
                "archive": [{"threshold": m["threshold"], "edits": m["edits"]} for m in self.archive]}
        save_tensors(path, tensors, meta, where, overwrite)

    @classmethod
    def load_state(cls, path: str, where: str = "params.load_state") -> WiseMemory:
        from ..errors import UserError

        tensors, meta = load_tensors(path, where)
        if meta.get("kind") != STATE_KIND:
            raise UserError(f"{path} is not a WISE state file (kind {meta.get('kind')!r})", where)
        mem = cls(int(meta["layer"]), meta["layout"], tuple(meta["shape"]), float(meta["scale"]), int(meta["skip"]),
                  str(meta.get("pool", "mean")))
        mem.merged = tensors.get("merged")
        mem.shards = [{"tau": tensors[f"shard.{i}.tau"], "mask": tensors[f"shard.{i}.mask"].bool(), "edits": n}
                      for i, n in enumerate(meta["shard_edits"])]
        mem.acts = [tensors[f"act.{i}"] for i in range(len(meta["edits"]))]
        mem.edits = list(meta["edits"])
        mem.threshold = float(meta["threshold"])
        mem.delta = tensors.get("delta")
        mem.shard_masks_made = int(meta["shard_masks_made"])
        mem.active_from = int(meta.get("active_from", 0))
        mem.archive = [{"delta": tensors[f"archive.{i}.delta"], "threshold": float(m["threshold"]),
                        "edits": int(m["edits"])} for i, m in enumerate(meta.get("archive", []))]
        return mem

    def check_compatible(self, handle: ModelHandle, where: str) -> None:
        from ..errors import UserError

        w = handle.adapter.mlp_out(self.layer).weight
        if tuple(w.shape) != self.shape:
            raise UserError(f"the saved side memory has shape {list(self.shape)} but layer {self.layer}'s "
                            f"output projection has {list(w.shape)}; it was saved for another model", where)

    # ---- editing --------------------------------------------------------------------------
    def _new_shard(self, seed: int, ratio: float, device: Any) -> dict:
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + self.shard_masks_made)
        mask = (torch.rand(self.shape, generator=g) < ratio).to(device)
        self.shard_masks_made += 1
        return {"tau": torch.zeros(self.shape, dtype=torch.float32, device=device), "mask": mask, "edits": 0}

    def neutral_acts(self, handle: ModelHandle) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Projection inputs of the neutral prompts: (shared prefix [P, d], own tokens [N, d], prompt ids)."""
        if self._neutral_cache is None:
            prompts = [handle.prompt_ids(q) for q in OUT_OF_SCOPE]
            acts = [projection_inputs(handle, self.layer, p) for p in prompts]
            common = min(self.skip, min(len(p) for p in prompts) - 1)
            shared = acts[0][:0]
            own = torch.cat([a[common:] for a in acts])
            owner = torch.cat([torch.full((len(a) - common,), i, dtype=torch.long) for i, a in enumerate(acts)])
            self._neutral_cache = (shared, own, owner)
        return self._neutral_cache


def template_header_len(handle: ModelHandle) -> int:
    """Tokens every formatted prompt starts with (the chat template's header; causal, so query-blind)."""
    a, b = handle.prompt_ids("Alpha?"), handle.prompt_ids("Zulu?")
    n = 0
    while n < min(len(a), len(b)) - 1 and a[n] == b[n]:
        n += 1
    return n


def routing_mask(valid: torch.Tensor, skip: int) -> torch.Tensor:
    """The real tokens after the first ``skip`` real ones (all real tokens when none would be left)."""
    if skip <= 0:
        return valid
    use = valid & (valid.long().cumsum(1) > skip)
    empty = ~use.any(1)
    return torch.where(empty[:, None], valid, use)


def projection_inputs(handle: ModelHandle, layer: int, prompt_ids: list[int]) -> torch.Tensor:
    """The output projection's input at every token of one prompt: ``[T, d_in]``."""
    from .hooks import capture

    name = handle.adapter.mlp_out_name(layer)
    ids = torch.tensor([prompt_ids], device=handle.input_device)
    with capture(handle.model, [name], "input") as st, torch.no_grad():
        _forward_until(handle, layer, ids)
    return st[name][0][0].float()


def _forward_until(handle: ModelHandle, layer: int, ids: torch.Tensor) -> None:
    """A forward pass that stops right after the given layer's output projection ran."""
    with stop_after(handle.model, handle.adapter.mlp_out_name(layer)):
        handle.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)


def _out_scores(mem: WiseMemory, D: torch.Tensor, shared: torch.Tensor, own: torch.Tensor,
                owner: torch.Tensor, own_count: torch.Tensor, n_out: int) -> torch.Tensor:
    """Scores of the out-of-scope prompts under side memory ``D`` (differentiable)."""
    ow = weight_apply(own, D, mem.layout).norm(dim=-1)
    if mem.pool == "max":
        s = torch.stack([ow[owner == i].max() for i in range(n_out)])
        if shared.shape[0]:
            s = torch.maximum(s, weight_apply(shared, D, mem.layout).norm(dim=-1).max())
        return s
    sh = weight_apply(shared, D, mem.layout).norm(dim=-1).sum()
    return (sh + torch.zeros(n_out, device=own.device).index_add(0, owner, ow)) / (shared.shape[0] + own_count)


def train_edit(mem: WiseMemory, handle: ModelHandle, runner: SuffixRunner, question: str, target: str,
               item_ids: list[str], cfg: WiseConfig, on_step: Callable[[float], None]) -> dict:
    """Train one edit into the side memory (see the module doc); returns per-edit figures."""
    import torch.nn.functional as F

    dev = handle.device_of(handle.adapter.mlp_out_name(mem.layer))   # the side memory lives with its layer
    n_done = len(mem.edits)
    if not mem.shards or mem.shards[-1]["edits"] >= cfg.save_freq:
        mem.shards.append(mem._new_shard(cfg.seed, cfg.mask_ratio, dev))
    shard = mem.shards[-1]
    base = mem.merged if mem.merged is not None else torch.zeros(mem.shape, dtype=torch.float32, device=dev)

    bare = handle.prompt_ids(question)
    prompts = [bare] + [handle.prompt_ids(f"{p} {question}") for p in CONTEXT_PREFIXES[:cfg.contexts]]
    tgt = handle.encode_answer(target) + end_ids(handle)
    targets = [tgt] * len(prompts)
    # shard replay: the earlier edits of this shard are trained along (bare prompts)
    for e in mem.edits[len(mem.edits) - shard["edits"]:]:
        prompts.append(handle.prompt_ids(e["prompt"]))
        targets.append(handle.encode_answer(e["target"]) + end_ids(handle))
    batch = sequence_batch(handle, prompts, targets)
    rows, pos, gold = batch.target_positions()
    first = torch.ones_like(rows, dtype=torch.bool)   # each row's first target token
    first[1:] = rows[1:] != rows[:-1]
    first = first.to(dev)
    pmask = batch.prompt_mask().to(dev)
    pmask[:, :mem.skip] = 0.0
    apply_mask = torch.zeros(batch.ids.shape, device=dev)
    apply_mask[:, mem.skip:] = 1.0   # the side memory never touches the shared header (attention sinks)
    # every earlier edit of the memory keeps its in-scope margin (from its stored projection inputs)
    old_acts = [a[mem.skip:] if a.shape[0] > mem.skip else a
                for a in mem.acts[mem.active_from:len(mem.edits) - shard["edits"]]]
    old_cat = torch.cat(old_acts).to(dev) if old_acts else None
    old_owner = (torch.cat([torch.full((a.shape[0],), i, dtype=torch.long) for i, a in enumerate(old_acts)]).to(dev)
                 if old_acts else None)
    shared, own, owner = mem.neutral_acts(handle)
    n_out = len(OUT_OF_SCOPE)
    shared, own, owner = shared.to(dev), own.to(dev), owner.to(dev)
    own_count = torch.bincount(owner, minlength=n_out).float()

    was_enabled = mem.enabled
    mem.enabled = False           # the routing hook stays out of the way while training
    prep = runner.prepare(batch.ids, batch.mask)
    mask_f = shard["mask"].float()
    P = shard["tau"].clone().requires_grad_(True)
    opt = (torch.optim.Adam([P], lr=cfg.edit_lr) if cfg.optimizer == "adam"
           else torch.optim.SGD([P], lr=cfg.edit_lr))
    store: dict[str, torch.Tensor] = {}

    def hook(m, args, out):
        a = args[0]
        D = base + P * mask_f
        d = weight_apply(a, D.to(a.dtype), mem.layout) * apply_mask[:, :, None].to(a.dtype)
        store["tok"] = d.norm(dim=-1)
        if "acts" not in store:
            store["acts"] = a[0, :batch.prompt_len[0]].detach().float().clone()
        return out + d

    hd = handle.adapter.mlp_out(mem.layer).register_forward_hook(hook)
    nll_v = act_v = float("nan")
    iters = 0
    try:
        for it in range(cfg.n_iter):
            opt.zero_grad(set_to_none=True)
            lg = runner.logits(prep, rows, pos)
            ce = F.cross_entropy(lg, gold.to(lg.device), reduction="none")
            nll = ce.mean()
            if cfg.first_token_weight:
                nll = nll + cfg.first_token_weight * ce[first.to(ce.device)].mean()
            nll = nll.to(dev)
            tok = store["tok"].float()
            D = base + P * mask_f
            if mem.pool == "max":
                s_in = tok.masked_fill(pmask == 0, float("-inf")).max(1).values
            else:
                s_in = (tok * pmask).sum(1) / pmask.sum(1)
            if old_cat is not None:
                on = weight_apply(old_cat, D, mem.layout).norm(dim=-1)
                if mem.pool == "max":
                    s_old = torch.stack([on[old_owner == i].max() for i in range(len(old_acts))])
                else:
                    cnt = torch.bincount(old_owner, minlength=len(old_acts)).float()
                    s_old = torch.zeros(len(old_acts), device=dev).index_add(0, old_owner, on) / cnt
                s_in = torch.cat([s_in, s_old])
            s_out = _out_scores(mem, D, shared, own, owner, own_count, n_out)
            act = (F.relu(s_out - cfg.alpha).mean() + F.relu(cfg.beta - s_in).mean()
                   + F.relu(cfg.gamma + s_out[:, None] - s_in[None, :]).mean())
            loss = nll + act
            nll_v, act_v = float(nll.detach()), float(act.detach())
            iters = it + 1
            if nll_v <= cfg.stop_loss and act_v == 0.0:
                on_step(nll_v)
                break
            loss.backward()
            opt.step()
            with torch.no_grad():
                P.copy_((torch.clamp(base + P, -cfg.norm_constraint, cfg.norm_constraint) - base) * mask_f)
            on_step(nll_v)
    finally:
        hd.remove()
        mem.enabled = was_enabled
    tau = P.detach() * mask_f
    if not bool(torch.isfinite(tau).all()):
        from ..errors import NonFiniteError

        raise NonFiniteError("the WISE side memory became non-finite (NaN or inf); the edit was rolled back")
    shard["tau"] = tau
    shard["edits"] += 1
    mem.acts.append(store["acts"].cpu() if "acts" in store else projection_inputs(handle, mem.layer, bare).cpu())
    mem.edits.append({"prompt": question, "target": target, "item_ids": list(item_ids)})
    merged_now = False
    if (n_done + 1) % cfg.merge_freq == 0:
        mem.refresh(cfg.merge_density)
        mem.merged = mem.delta.clone()
        mem.shards = []
        merged_now = True
    mem.refresh(cfg.merge_density)
    mem.acts = [a.to(dev) for a in mem.acts]
    with torch.no_grad():
        s_out = _out_scores(mem, mem.delta, shared, own, owner, own_count, n_out)
    mem.update_threshold(cfg.act_ratio, s_out, cfg.threshold_position, cfg.above_out_of_scope)
    in_act = float(mem.scores_of(mem.acts[-1]))
    threshold = mem.threshold
    if merged_now and cfg.retrieve:
        mem.freeze_active()
    return {"nll": nll_v, "routing_loss": act_v, "iterations": iters, "merged": merged_now,
            "in_scope_act": in_act, "out_scope_act_max": float(s_out.max()), "threshold": threshold,
            "memories": len(mem.memories())}
