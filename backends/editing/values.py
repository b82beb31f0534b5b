"""The value optimisation shared by ROME, MEMIT and AlphaEdit (v* / z).

For one request, find a vector ``delta`` that, added to layer ``L``'s MLP
output at the subject's last token, makes the model produce the target after
the prompt.  Minimised with Adam over ``delta`` only (the model is frozen):

    loss = NLL(target | template_i(prompt))  averaged over the context templates
         + kl_factor * KL( p(. | essence) || p_delta(. | essence) )  at the subject's last token
         + weight_decay * ||delta||^2 / ||h||^2

where ``h`` is the residual stream (block ``L`` output) at the lookup index of
the bare prompt.  After each step ``delta`` is clamped to
``clamp_norm_factor * ||h||``.  Adding ``delta`` to the MLP output or to the
block output is the same change of the residual stream, so ROME (which
rewrites the MLP output) and MEMIT/AlphaEdit (which target the residual at
their last layer) share this code.  The logits come from the model's own
forward (tied input and output embeddings need no special case).

**Early stop** (:func:`stop_reason`), checked on each step's forward before
its update, so the returned ``delta`` is the one that met the rule:

* ``"nll"`` — the NLL is below the method's ``stop_loss``;
* ``"greedy"`` — the target is the greedy (argmax) continuation at every
  target position under every context template, and the NLL is below
  :data:`GREEDY_STOP_NLL` (a margin: the weight update only approximates
  ``delta``, and the paraphrases were never optimised).

No patience rule: at the default ``v_lr`` the NLL still falls at step 25 on
the built-in facts, with slow phases (~0.3% per step for several steps)
before it speeds up again, which a patience rule would take for a plateau.

**One forward per step.**  The rows (one per context template, plus the
essence prompt, cut after its lookup token: only that position's logits are
read) go through the model as ONE batch.  Each row is split at its lookup
index: nothing before it depends on ``delta`` (causal attention), so the
prefixes run once, right-padded, into a KV cache, and every step runs only
the suffixes (right-padded) after it, with explicit position ids and a 2-D
mask whose holes are the prefix padding — every real token sees exactly the
keys and positions of an unpadded run.  ``delta`` enters at each row's
lookup column.  Everything that does not depend on ``delta`` (targets, gather
indices, masks, positions, the essence's reference log-probs) is built once.
The tokens all prefixes start with (the chat template's system turn) run
once.  Whether a model honours position ids and masks with holes is checked
once per loaded model (the batch against one row at a time under a probe
``delta``, :func:`_verdicts`); where it does not, every row runs on its own,
as before.  On top of either, blocks ``0..L`` are replayed from recordings
(:class:`_BlockReplay`, checked once per model and layer).  With an
inference-time wrapper installed (WISE, GRACE, IKE see every call) the rows
run one at a time and the replay is checked on every call.  Every tensor
follows the model's device and dtype (input ids on the input device, ``delta``
and its mask on layer ``L``'s device, the targets on the logits' device: a
device_map may spread the layers); logits are reduced in float32, and in
half precision the checks allow for the model's own rounding noise
(:func:`_agree`).

**Several requests at once** (:func:`optimise_values`, MEMIT and AlphaEdit:
every request's delta on the same weights): their rows go in one batch, a
``(requests, d)`` delta with each row adding its own request's, the terms per
request; exact up to the batch shape's rounding.  On by default on CUDA only:
on a CPU one request's step already keeps the matrix units busy (measured in
``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import copy
import functools
import inspect
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..batching import pad_right
from ..compat import cache_kwarg, output_cache
from ..events import Tracker
from .keys import edit_prompt, essence_prompt

if TYPE_CHECKING:
    from ..model import ModelHandle
    from .locate_params import LocateParams

# early stop (see the module doc); a module constant, not a Param: checked on the built-in facts
# (benchmarks/bench_locate_edit.py quality) so that forget / retain / rephrase ROUGE-1 do not drop
GREEDY_STOP_NLL = 0.5    # "greedy" needs the mean target NLL below this too
MIN_SHARED = 8           # a shorter common prefix of the rows is not worth its own forward
HALF_NOISE = 4.0         # half precision: a check passes within this many times the model's own rounding noise


@dataclass
class ValueResult:
    delta: torch.Tensor        # (d,) float32
    h_norm: float
    loss: float
    nll: float
    steps: int                 # forwards run (the last one met the stop rule, when ``stopped`` is set)
    target_prob: float
    replayed: bool = False     # blocks 0..L were replayed from recordings (see _BlockReplay)
    batched: bool = False      # all rows ran as one batch per step (else one forward per row)
    stopped: str = ""          # "nll" | "greedy"; "" when all v_steps ran
    nll_history: list[float] = field(default_factory=list)


def target_ids(handle: ModelHandle, target: str, stop_token: bool) -> list[int]:
    ids = handle.encode_answer(target)
    eos = handle.tokenizer.eos_token_id
    if stop_token and eos is not None:
        ids = ids + [eos]
    return ids


def stop_reason(nll: float, greedy: bool, stop_loss: float) -> str:
    """The early-stop rule (module doc); ``greedy``: the target is the argmax everywhere."""
    if nll < stop_loss:
        return "nll"
    if greedy and nll < GREEDY_STOP_NLL:
        return "greedy"
    return ""


def _common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix every sequence starts with."""
    n = min(len(q) for q in seqs)
    first = seqs[0]
    for q in seqs[1:]:
        k = 0
        while k < n and q[k] == first[k]:
            k += 1
        n = k
    return n


@functools.cache
def _keep_one_kw(cls: Any) -> tuple:
    """``logits_to_keep=1`` (or the older ``num_logits_to_keep``) where the model's forward takes it."""
    try:
        params = inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return ()
    return next(((name, 1) for name in ("logits_to_keep", "num_logits_to_keep") if name in params), ())


def _prefix_forward(model: Any, **kw: Any) -> Any:
    """A no-grad forward whose logits are not needed (only its KV cache): the last position's only."""
    keep = _keep_one_kw(type(model))
    return model(**kw, **({keep[0]: keep[1]} if keep else {}))


@dataclass
class _Row:
    ids: list[int]      # prompt tokens (and the target but its last token)
    index: int          # the lookup index: delta enters here
    keep: list[int]     # positions whose logits are read


class _Batch:
    """Rows split at their lookup index: prefixes cached once, suffixes right-padded, one forward.

    Row ``r``'s prefix ``ids[:index]`` sits in columns ``0..index-1`` of the
    cache (padding after it, masked); its suffix follows the cache with
    position ids ``index, index+1, ...`` and ``delta`` at its column 0.  When
    some lookup index is 0 there is no prefix: the whole rows run each step
    and ``delta`` goes in at column ``index``.  ``logits`` reads the kept
    positions only (``logits_to_keep``: the union of the rows' kept columns).
    """

    def __init__(self, model: Any, rows: Sequence[_Row], pad: int, device: Any, dtype: torch.dtype,
                 at: Any = None) -> None:
        """``device``: where input ids go; ``at``: the edited layer's device (``where`` meets its output)."""
        at = device if at is None else at
        n = len(rows)
        split = [r.index for r in rows] if all(r.index > 0 for r in rows) else [0] * n
        self.past = None
        self.shared = 0           # prefix tokens run once for all rows (see _prefix)
        if max(split) > 0:
            self.past, pmask = self._prefix(model, [r.ids[:k] for r, k in zip(rows, split)], pad, device)
        else:
            pmask = torch.zeros((n, 0), dtype=torch.long, device=device)
        self.ids, smask = pad_right([r.ids[k:] for r, k in zip(rows, split)], pad, device)
        width = self.ids.shape[1]
        self.mask = torch.cat([pmask, smask], 1)
        self.positions = None     # one row: the model's own positions are right (no padding anywhere)
        if n > 1:
            self.positions = torch.tensor(split, device=device)[:, None] + torch.arange(width, device=device)[None]
        cols = [r.index - k for r, k in zip(rows, split)]
        self.where = torch.zeros((n, width, 1), dtype=dtype, device=at)   # 1 where delta enters
        self.where[torch.arange(n, device=at), torch.tensor(cols, device=at)] = 1
        local = [[p - k for p in r.keep] for r, k in zip(rows, split)]
        kept = sorted({c for cs in local for c in cs})
        slot = {c: i for i, c in enumerate(kept)}
        self.kept = torch.tensor(kept, device=device)                      # columns through the output layer
        self.g_rows = torch.tensor([i for i, cs in enumerate(local) for _ in cs], device=device)
        self.g_cols = torch.tensor([slot[c] for cs in local for c in cs], device=device)
        self.keep_ok = True
        self.replay: list[Any] | None = None     # block outputs 0..L on the suffixes (see _BlockReplay)
        # joint requests (optimise_values): row i gets delta[req_of_row[i]] of a (requests, d) delta
        self.req_of_row: torch.Tensor | None = None
        # joint requests: the kept positions are gathered BEFORE the output layer (see logits)
        self.head_gather = False
        self.h_rows = torch.tensor([i for i, cs in enumerate(local) for _ in cs], device=device)
        self.h_cols = torch.tensor([c for cs in local for c in cs], device=device)

    def added(self, first: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``first`` (a residual-stream tensor of this batch) with ``delta`` added at each row's lookup column."""
        d = delta.to(device=first.device, dtype=first.dtype)
        if d.dim() == 2:                  # one delta per request: each row its own request's
            d = d[self.req_of_row.to(d.device)][:, None, :]
        return first + self.where.to(device=first.device, dtype=first.dtype) * d

    def _prefix(self, model: Any, prefixes: list[list[int]], pad: int, device: Any) -> tuple[Any, torch.Tensor]:
        """(KV cache, mask) of the right-padded prefixes, run once (no grad).

        The tokens every prefix starts with (the chat template's system turn)
        run once, in one row whose cache is repeated for every row; the rest
        of each prefix follows, right-padded — the same cache and mask as one
        padded forward of the whole prefixes.
        """
        n = len(prefixes)
        common = _common_prefix(prefixes) if n > 1 else 0
        with torch.no_grad():
            if common >= MIN_SHARED:
                try:
                    first = torch.tensor([prefixes[0][:common]], device=device)
                    past = output_cache(_prefix_forward(model, input_ids=first, use_cache=True))
                    past.batch_repeat_interleave(n)
                    rest = [p[common:] for p in prefixes]
                    self.shared = common
                    if max(len(p) for p in rest) == 0:
                        return past, torch.ones((n, common), dtype=torch.long, device=device)
                    rids, rmask = pad_right([p or [pad] for p in rest], pad, device)
                    for i, p in enumerate(rest):
                        if not p:
                            rmask[i] = 0
                    mask = torch.cat([torch.ones((n, common), dtype=torch.long, device=device), rmask], 1)
                    pos = common + torch.arange(rids.shape[1], device=device)[None].expand(n, -1)
                    out = _prefix_forward(model, input_ids=rids, attention_mask=mask, position_ids=pos,
                                          use_cache=True, **{cache_kwarg(model): past})
                    return output_cache(out), mask
                except Exception:  # noqa: BLE001 - a cache without batch_repeat_interleave: the plain way
                    self.shared = 0
            pids, pmask = pad_right(prefixes, pad, device)
            return output_cache(_prefix_forward(model, input_ids=pids, attention_mask=pmask, use_cache=True)), pmask

    def logits(self, model: Any) -> torch.Tensor:
        """Logits at every row's kept positions, row by row: ``(sum of len(keep), vocab)``."""
        def kw() -> dict:
            out: dict = dict(input_ids=self.ids, attention_mask=self.mask, use_cache=self.past is not None)
            if self.positions is not None:
                out["position_ids"] = self.positions
            if self.past is not None:
                # a fresh copy per call: the forward appends to the cache, and the appended (graph-carrying)
                # tensors must not leak into the next step
                out[cache_kwarg(model)] = copy.deepcopy(self.past)
            return out

        if self.head_gather:
            # the output layer sees only the kept positions, row by row ((1, positions, d) -> (1, positions,
            # vocab)); what the model does after it (a logit scale, a soft cap) is elementwise
            def gather(m, args):
                return (args[0][self.h_rows.to(args[0].device), self.h_cols.to(args[0].device)][None],) + args[1:]

            hd = model.get_output_embeddings().register_forward_pre_hook(gather)
            try:
                return model(**kw()).logits[0]
            finally:
                hd.remove()
        if self.keep_ok:
            try:
                lg = model(**kw(), logits_to_keep=self.kept).logits
            except TypeError:
                self.keep_ok = False
        if not self.keep_ok:
            lg = model(**kw()).logits[:, self.kept]
        return lg[self.g_rows, self.g_cols]


class _BlockReplay:
    """Replays blocks ``0..L`` of a batch's suffixes from cached outputs: only the blocks after L run per step.

    Nothing up to block ``L`` depends on ``delta`` (it enters at block L's MLP
    output), so their outputs on a batch's suffixes are recorded once (no
    grad, in the delta-free reference pass) and the blocks' ``forward`` is
    swapped for one that returns the recording — block ``L``'s with ``delta``
    added at each row's lookup column, the same change of the residual stream
    as adding it to the MLP output.  :func:`optimise_value` compares the
    logits of this path with the hooked full forward (once per model and
    layer); on any mismatch (an architecture whose blocks have side effects
    we do not replay, or that normalises the MLP output before the residual
    add) it keeps the full forward.
    """

    def __init__(self, model: Any, block_names: list[str]) -> None:
        self.blocks = [model.get_submodule(n) for n in block_names]
        self.delta: torch.Tensor | None = None
        self.current: _Batch | None = None

    @staticmethod
    def _first(out: Any) -> Any:
        return out[0] if isinstance(out, tuple) else out

    def recorder(self, batch: _Batch) -> list:
        """Forward hooks that store the blocks' outputs on ``batch`` (the caller removes them)."""
        outs: list[Any] = [None] * len(self.blocks)
        batch.replay = outs
        hooks = []
        for i, b in enumerate(self.blocks):
            def post(m, args, out, i=i):
                outs[i] = out
            hooks.append(b.register_forward_hook(post))
        return hooks

    def _forward_of(self, i: int):
        last = i == len(self.blocks) - 1

        def forward(*args: Any, **kwargs: Any) -> Any:
            out = self.current.replay[i]
            if not last or self.delta is None:
                return out
            new = self.current.added(self._first(out), self.delta)
            return (new,) + tuple(out[1:]) if isinstance(out, tuple) else new
        return forward

    def logits(self, model: Any, batch: _Batch) -> torch.Tensor:
        self.current = batch
        saved = [b.__dict__.get("forward") for b in self.blocks]   # e.g. an accelerate hook: put back after
        for i, b in enumerate(self.blocks):
            b.forward = self._forward_of(i)
        try:
            return batch.logits(model)
        finally:
            for b, f in zip(self.blocks, saved):
                if f is None:
                    del b.forward
                else:
                    b.forward = f
            self.current = None


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm()) / max(1e-12, float(b.float().norm()))


def _agree(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, noise: float = 0.0) -> bool:
    """Whether logits ``a`` match the reference ``b`` up to the rounding of the model's dtype (NaN never does).

    float32/64: elementwise, 1e-4 of the largest logit.  Half precision rounds
    differently for every batch shape, and a 30-layer model in bfloat16 moves
    its logits by ~2% (relative norm) for a perturbation at the rounding
    level, so there the bar is ``HALF_NOISE`` times ``noise``, that measured
    rounding noise (a semantic mismatch — positions or masks not honoured, a
    misplaced delta — moves them by 25% or more).
    """
    if a.shape != b.shape or not bool(torch.isfinite(a).all()):
        return False
    if torch.finfo(dtype).bits >= 32:
        return float((a.float() - b.float()).abs().max()) <= 1e-4 * max(1.0, float(b.float().abs().max()))
    return _rel(a, b) <= max(HALF_NOISE * noise, 1e-3)


# loaded model -> its checks' verdicts, made once per model (and dtype) when no inference-time wrapper is
# installed: ("batch", dtype) one padded batch gives the logits of one row at a time; ("replay", layer,
# dtype) the block replay at that layer gives those of the hooked full forward
_VERDICTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _verdicts(model: Any) -> dict:
    return _VERDICTS.setdefault(model, {})


class _Objective:
    """The loss terms of one request for the current ``delta``, over batches of rows.

    ``batches`` hold the rows in order: the template rows (per member question,
    each with its own target), then the essence rows (one per distinct
    subject, last); each batch's gathered logits come row by row, so their
    concatenation is every template row's target positions then the essence
    positions.  ``plan`` says which template row each target position belongs
    to; the NLL is the mean over template rows of each row's mean target NLL,
    the KL the mean over essence rows (for one member exactly the earlier
    single-request objective).
    """

    def __init__(self, model: Any, mlp: Any, replay: _BlockReplay, delta: torch.Tensor, plan: _Plan,
                 device: Any) -> None:
        self.model, self.mlp, self.replay, self.delta = model, mlp, replay, delta
        self.n_rows = plan.n_rows
        self.n_ess = plan.n_ess
        self.tgt = torch.tensor(plan.tgt, device=device)                    # every target position, row by row
        self.row_of = torch.tensor(plan.row_of, device=device)
        self.count = torch.bincount(self.row_of, minlength=self.n_rows).float()
        self.current: _Batch | None = None

    def _hook(self, m, args, out):  # the MLP output: delta added at each row's lookup column
        new = self.current.added(out[0] if isinstance(out, tuple) else out, self.delta)
        return (new,) + tuple(out[1:]) if isinstance(out, tuple) else new

    def logits(self, batches: Sequence[_Batch], mode: str) -> torch.Tensor:
        """``mode``: "plain" (no delta), "hook" (delta through the MLP hook), "replay" (blocks 0..L replayed)."""
        parts = []
        h = self.mlp.register_forward_hook(self._hook) if mode == "hook" else None
        try:
            for b in batches:
                self.current = b
                parts.append(self.replay.logits(self.model, b) if mode == "replay" else b.logits(self.model))
        finally:
            self.current = None
            if h is not None:
                h.remove()
        return torch.cat(parts, 0)

    def terms(self, logits: torch.Tensor, ref: torch.Tensor) -> tuple:
        """(nll, kl, per-row mean target log-prob, whether the target is the argmax everywhere)."""
        nt = len(self.tgt)
        if self.tgt.device != logits.device:   # the logits' device (the model's output device)
            self.tgt, self.row_of, self.count = (t.to(logits.device) for t in (self.tgt, self.row_of, self.count))
        lp = torch.log_softmax(logits.float(), -1)
        tlp = lp[:nt].gather(1, self.tgt[:, None])[:, 0]
        per_row = torch.zeros(self.n_rows, dtype=tlp.dtype, device=tlp.device).index_add(0, self.row_of, tlp)
        per_row = per_row / self.count
        nll = -per_row.mean()
        greedy = (logits[:nt].argmax(-1) == self.tgt).all()
        kl = torch.nn.functional.kl_div(lp[nt:], ref, log_target=True, reduction="sum") / self.n_ess
        return nll, kl, per_row, greedy


@dataclass
class _Plan:
    """Where the objective's terms sit in the gathered logits (see :class:`_Objective`)."""

    tgt: list[int]          # target token of every template row's kept position, row by row
    row_of: list[int]       # the template row of each
    n_rows: int             # template rows
    n_ess: int              # essence rows (after the template rows)


Member = tuple  # (question, subject or None, target text): one question of a (merged) request


def _request_rows(handle: ModelHandle, members: Sequence[Member], templates: Sequence[str],
                  settings: LocateParams, where: str = "") -> tuple[list[_Row], _Plan]:
    """Rows: one per (member, template) with the member's own target, then one essence row per subject."""
    rows: list[_Row] = []
    tgt_all: list[int] = []
    row_of: list[int] = []
    for question, subject, target in members:
        tgt = target_ids(handle, target, settings.stop_token)
        for t in templates:
            p = edit_prompt(handle, question, subject, t, where, settings.fact_token)
            # logits at position (len(prompt) - 1 + j) predict tgt[j]; only those go through the output layer
            row_of += [len(rows)] * len(tgt)
            tgt_all += tgt
            rows.append(_Row(p.ids + tgt[:-1], p.index, [len(p.ids) - 1 + j for j in range(len(tgt))]))
    n_rows = len(rows)
    # the essence rows are cut after their lookup token: the KL reads that position only (causal attention)
    subjects = list(dict.fromkeys(s for _q, s, _t in members))
    for subject in subjects:
        question = next(q for q, s, _t in members if s == subject)
        ess = essence_prompt(handle, subject, where, settings.fact_token, question=question if subject is None
                             else "")
        rows.append(_Row(ess.ids[:ess.index + 1], ess.index, [ess.index]))
    return rows, _Plan(tgt_all, row_of, n_rows, len(subjects))


def optimise_value(handle: ModelHandle, layer: int, question: str, subject: str | None, target: str,
                   templates: Sequence[str], settings: LocateParams, tracker: Tracker | None = None,
                   where: str = "", seed: int = 0, replay_blocks: bool = True,
                   batch_rows: bool = True, members: Sequence[Member] | None = None) -> ValueResult:
    """Optimise ``delta`` for one request; ``settings`` are the method's Params (``v_steps``, ``v_lr``, ...).

    ``members`` (query merging): ``(question, subject, target)`` per question of a merged request; ONE
    ``delta`` is optimised for all of them, each question asked alone under every template with its own
    target, ``delta`` entering at its own subject's last token (``question``/``subject``/``target`` are then
    unused).  ``||h||`` (clamp and weight decay) is the first member's.
    ``replay_blocks`` / ``batch_rows`` (tests, benchmarks): allow the block replay / the one-batch step.
    """
    model = handle.model
    ad = handle.adapter
    dev = handle.input_device              # input ids, masks, positions, gathered logits
    at = handle.device_of(ad.mlp_name(layer))   # delta and its mask: layer L's device
    dtype = handle.dtype
    rows, plan = _request_rows(handle, list(members) if members else [(question, subject, target)], templates,
                               settings, where)
    tok = handle.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    delta = torch.zeros(ad.hidden_size, dtype=torch.float32, device=at)
    mlp = model.get_submodule(ad.mlp_name(layer))
    replay = _BlockReplay(model, [ad.block_name(i) for i in range(layer + 1)])
    obj = _Objective(model, mlp, replay, delta, plan, dev)
    block_l = replay.blocks[-1]

    half = torch.finfo(dtype).bits < 32

    def singles() -> list[_Batch]:
        return [_Batch(model, [r], pad, dev, dtype, at) for r in rows]

    def reference(batches: list[_Batch]) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The delta-free pass: (its logits, the essence log-probs, ``||h||``); records blocks 0..L per batch."""
        got: dict = {}

        def h_of(m, args, out):   # block L's output at the bare prompt's lookup column (row 0)
            if "h" not in got:
                first = _BlockReplay._first(out)
                got["h"] = first[0][batches[0].where[0, :, 0].bool()][0].detach().float()

        parts = []
        hooks = [block_l.register_forward_hook(h_of)]
        try:
            with torch.no_grad():
                for b in batches:   # each batch's own forward records its own block outputs
                    rec = replay.recorder(b) if replay_blocks else []
                    try:
                        parts.append(obj.logits([b], "plain"))
                    finally:
                        for hd in rec:
                            hd.remove()
        finally:
            for hd in hooks:
                hd.remove()
        lg = torch.cat(parts, 0)
        return lg, torch.log_softmax(lg[-plan.n_ess:].float(), -1), float(got["h"].norm())

    def noise_of(batches: list[_Batch], plain: torch.Tensor, unit: torch.Tensor, h_norm: float) -> float:
        """Half precision: how far a rounding-level delta (one ulp of ||h||) moves the logits; 0 otherwise."""
        if not half:
            return 0.0
        delta.copy_(unit * (torch.finfo(dtype).eps * max(h_norm, 1e-3)))
        return _rel(obj.logits(batches, "hook"), plain)

    def block_l_out(batches: list[_Batch], mode: str) -> torch.Tensor:
        """Block L's output at the lookup columns under the current delta (hooked full forward or replay)."""
        got: list = []

        def grab(m, args, out):
            got.append(_BlockReplay._first(out)[obj.current.where[..., 0].bool()].float())

        hd = block_l.register_forward_hook(grab)
        try:
            obj.logits(batches, mode)
        finally:
            hd.remove()
        return torch.cat(got, 0)

    # inference-time wrappers (WISE, GRACE, IKE) see every call: with them the rows run one at a time, as before,
    # and the replay is checked on every call
    memo = _verdicts(model) if not handle.wrappers else {}
    batch_key, replay_key = ("batch", dtype), ("replay", layer, dtype)
    batched = batch_rows and len(rows) > 1 and not handle.wrappers and memo.get(batch_key) is not False
    if batched:
        try:
            batches = [_Batch(model, rows, pad, dev, dtype, at)]
            plain, ref, h_norm = reference(batches)
        except Exception:  # noqa: BLE001 - e.g. a forward without position ids: one row at a time
            memo[batch_key] = batched = False
    if not batched:
        batches = singles()
        plain, ref, h_norm = reference(batches)
    check_batch = batched and batch_key not in memo
    check_replay = replay_blocks and replay_key not in memo
    fast = replay_blocks and bool(memo.get(replay_key))
    if check_batch or check_replay:
        # a probe delta (half the residual norm, seeded) for the checks; delta is zero again after them
        g = torch.Generator().manual_seed(seed)
        unit = torch.randn(ad.hidden_size, generator=g).to(at)
        unit = unit / float(unit.norm())
        full = None
        try:
            with torch.no_grad():
                noise = noise_of(batches, plain, unit, h_norm)
                delta.copy_(unit * 0.5 * max(h_norm, 1e-3))
                if check_batch:
                    # one padded batch against the rows one at a time, both hooked
                    one_by_one = singles()
                    alone = obj.logits(one_by_one, "hook")
                    try:
                        full = obj.logits(batches, "hook")
                        ok = _agree(full, alone, dtype, noise)
                    except Exception:  # noqa: BLE001 - the rows one at a time are always right
                        ok = False
                    memo[batch_key] = ok
                    if not ok:
                        batched, batches, full = False, one_by_one, None
                        delta.zero_()
                        plain, ref, h_norm = reference(batches)
                        noise = noise_of(batches, plain, unit, h_norm)
                        delta.copy_(unit * 0.5 * max(h_norm, 1e-3))
                if check_replay:
                    # the MLP-output hook on the full forward against the replay; an architecture that
                    # normalises the MLP output before the residual add (e.g. Gemma 2's post-feed-forward norm)
                    # fails this and keeps the full forward.  In half precision block L's output at the lookup
                    # columns must also agree to a few roundings (the logits' bar there is looser, see _agree)
                    try:
                        replay.delta = delta
                        if full is None:
                            full = obj.logits(batches, "hook")
                        fast = _agree(obj.logits(batches, "replay"), full, dtype, noise)
                        if fast and half:
                            fast = _rel(block_l_out(batches, "replay"), block_l_out(batches, "hook")) <= (
                                8 * torch.finfo(dtype).eps)
                    except Exception:  # noqa: BLE001 - any surprise means: use the full forward
                        fast = False
                    memo[replay_key] = fast
        finally:
            delta.zero_()   # the optimisation starts from zero whatever happened above
    replay.delta = delta
    if not fast:
        for b in batches:
            b.replay = None
    mode = "replay" if fast else "hook"

    delta.requires_grad_(True)
    opt = torch.optim.Adam([delta], lr=settings.v_lr)
    max_norm = settings.clamp_norm_factor * h_norm
    wd_scale = settings.v_weight_decay / max(h_norm, 1e-6) ** 2
    loss_v = nll_v = float("nan")
    prob = 0.0
    steps = 0
    stopped = ""
    history: list[float] = []
    for step in range(settings.v_steps):
        opt.zero_grad(set_to_none=True)
        nll, kl, per_row, greedy = obj.terms(obj.logits(batches, mode), ref)
        loss = nll + settings.kl_factor * kl + wd_scale * delta.pow(2).sum()
        stats = torch.stack([nll.detach(), loss.detach(), per_row.detach().exp().mean(), greedy.float()])
        nll_v, loss_v, prob, greedy_v = stats.tolist()    # one device sync per step
        steps = step + 1
        history.append(nll_v)
        if tracker is not None:
            tracker.step(loss=loss_v, detail=f"nll {nll_v:.3f}")
        stopped = stop_reason(nll_v, bool(greedy_v), settings.stop_loss)
        if stopped:
            break
        loss.backward()
        opt.step()
        with torch.no_grad():
            n = delta.norm()
            if n > max_norm:
                delta.mul_(max_norm / n)
    return ValueResult(delta.detach().clone(), h_norm, loss_v, nll_v, steps, prob, fast, batched, stopped, history)


# --------------------------------------------------------------------------- several requests at once

JOINT_ROWS = 48          # rows (templates x members + essences) of the requests sharing one forward per step


def _joint_layout(plans: Sequence[_Plan], device: Any) -> dict:
    """Index tensors of the joint objective over the gathered logits of requests' rows, in order."""
    t_pos, tgt, t_row, row_req, e_pos, e_req = [], [], [], [], [], []
    at = 0          # position in the gathered logits
    trow = 0        # global template-row id
    for r, plan in enumerate(plans):
        # a request's gathered positions: its template rows' target positions row by row, then its essences'
        for k, (tok, local_row) in enumerate(zip(plan.tgt, plan.row_of)):
            t_pos.append(at + k)
            tgt.append(tok)
            t_row.append(trow + local_row)
        at += len(plan.tgt)
        row_req += [r] * plan.n_rows
        trow += plan.n_rows
        e_pos += list(range(at, at + plan.n_ess))
        e_req += [r] * plan.n_ess
        at += plan.n_ess
    t = functools.partial(torch.tensor, device=device)
    out = {"t_pos": t(t_pos), "tgt": t(tgt), "t_row": t(t_row), "row_req": t(row_req), "e_pos": t(e_pos),
           "e_req": t(e_req), "n": len(plans)}
    out["t_req"] = out["row_req"][out["t_row"]]
    out["count"] = torch.bincount(out["t_row"], minlength=trow).float()
    out["n_rows"] = torch.bincount(out["row_req"], minlength=len(plans)).float()
    out["n_ess"] = torch.bincount(out["e_req"], minlength=len(plans)).float()
    return out


def _joint_terms(logits: torch.Tensor, ref: torch.Tensor, lay: dict) -> tuple:
    """Per request: (nll, kl, mean target probability, target the argmax everywhere) — each of shape (R,).

    The same terms as :meth:`_Objective.terms` for each request on its own rows: the NLL is the mean over
    its template rows of each row's mean target NLL, the KL the mean over its essence rows.
    """
    if lay["tgt"].device != logits.device:
        for k, v in list(lay.items()):
            if isinstance(v, torch.Tensor):
                lay[k] = v.to(logits.device)
    n = lay["n"]
    lp = torch.log_softmax(logits.float(), -1)
    tlp = lp[lay["t_pos"]].gather(1, lay["tgt"][:, None])[:, 0]
    per_row = torch.zeros(len(lay["count"]), dtype=tlp.dtype, device=tlp.device).index_add(0, lay["t_row"], tlp)
    per_row = per_row / lay["count"]
    zeros = functools.partial(torch.zeros, n, dtype=tlp.dtype, device=tlp.device)
    nll = -zeros().index_add(0, lay["row_req"], per_row) / lay["n_rows"]
    prob = zeros().index_add(0, lay["row_req"], per_row.exp()) / lay["n_rows"]
    miss = (logits[lay["t_pos"]].argmax(-1) != lay["tgt"]).to(tlp.dtype)
    greedy = zeros().index_add(0, lay["t_req"], miss) == 0
    e = lp[lay["e_pos"]]
    kl_rows = (ref.exp() * (ref - e)).sum(-1)
    kl = zeros().index_add(0, lay["e_req"], kl_rows) / lay["n_ess"]
    return nll, kl, prob, greedy


def _optimise_joint(handle: ModelHandle, layer: int, requests: Sequence[Sequence[Member]],
                    templates: Sequence[str], settings: LocateParams, tracker: Tracker | None,
                    wheres: Sequence[str], fast: bool) -> list[ValueResult]:
    """The requests' deltas optimised together: their rows in ONE batch, one forward per step.

    Exact up to the rounding of the batch shape: the rows do not see each other (masks), each request's
    loss depends on its own delta only, Adam is elementwise with one step count for all, and a request
    that meets the stop rule keeps the delta that met it (restored after every later update).
    """
    model = handle.model
    ad = handle.adapter
    dev = handle.input_device
    at = handle.device_of(ad.mlp_name(layer))
    dtype = handle.dtype
    tok = handle.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    rows: list[_Row] = []
    plans: list[_Plan] = []
    first_row: list[int] = []
    req_of_row: list[int] = []
    for r, (members, where) in enumerate(zip(requests, wheres)):
        rr, plan = _request_rows(handle, list(members), templates, settings, where)
        first_row.append(len(rows))
        req_of_row += [r] * len(rr)
        rows += rr
        plans.append(plan)
    n = len(requests)
    batch = _Batch(model, rows, pad, dev, dtype, at)
    batch.req_of_row = torch.tensor(req_of_row, device=at)
    batch.head_gather = True
    lay = _joint_layout(plans, dev)

    delta = torch.zeros((n, ad.hidden_size), dtype=torch.float32, device=at)
    mlp = model.get_submodule(ad.mlp_name(layer))
    replay = _BlockReplay(model, [ad.block_name(i) for i in range(layer + 1)])
    obj = _Objective(model, mlp, replay, delta, _Plan([0], [0], 1, 1), dev)   # its logits(); terms: _joint_terms
    block_l = replay.blocks[-1]

    # the delta-free pass: the essences' reference log-probs, ||h|| per request, block recordings
    got: dict = {}

    def h_of(m, args, out):
        if "h" not in got:
            first = _BlockReplay._first(out)
            cols = batch.where[..., 0].argmax(1)
            idx = torch.tensor(first_row, device=first.device)
            got["h"] = first[idx, cols.to(first.device)[idx]].detach().float()

    hooks = [block_l.register_forward_hook(h_of)]
    rec = replay.recorder(batch) if fast else []
    try:
        with torch.no_grad():
            plain = obj.logits([batch], "plain")
    finally:
        for hd in hooks + rec:
            hd.remove()
    ref = torch.log_softmax(plain[lay["e_pos"].to(plain.device)].float(), -1)
    h_norm = got["h"].norm(dim=1).to(at)                      # (R,)
    replay.delta = delta
    if not fast:
        batch.replay = None
    mode = "replay" if fast else "hook"

    delta.requires_grad_(True)
    opt = torch.optim.Adam([delta], lr=settings.v_lr)
    max_norm = settings.clamp_norm_factor * h_norm
    wd_scale = settings.v_weight_decay / h_norm.clamp_min(1e-6) ** 2
    active = [True] * n
    frozen = torch.zeros_like(delta, requires_grad=False)
    steps, stopped = [0] * n, [""] * n
    nll_v, loss_v, prob_v = [float("nan")] * n, [float("nan")] * n, [0.0] * n
    history: list[list[float]] = [[] for _ in range(n)]
    for step in range(settings.v_steps):
        opt.zero_grad(set_to_none=True)
        nll, kl, prob, greedy = _joint_terms(obj.logits([batch], mode), ref, lay)
        loss = nll + settings.kl_factor * kl + wd_scale.to(nll.device) * delta.pow(2).sum(1).to(nll.device)
        stats = torch.stack([nll.detach(), loss.detach(), prob.detach(), greedy.to(nll.dtype)]).tolist()
        for r in range(n):
            if not active[r]:
                continue
            nll_v[r], loss_v[r], prob_v[r] = stats[0][r], stats[1][r], stats[2][r]
            steps[r] = step + 1
            history[r].append(nll_v[r])
            stopped[r] = stop_reason(nll_v[r], bool(stats[3][r]), settings.stop_loss)
            if stopped[r]:
                active[r] = False
                with torch.no_grad():
                    frozen[r] = delta[r]
        live = [r for r in range(n) if active[r]]
        if tracker is not None:
            tracker.step(loss=sum(loss_v) / n,
                         detail=f"nll {sum(nll_v) / n:.3f} (mean of {n}; {len(live)} optimising)")
        if not live:
            break
        mask = torch.tensor([float(a) for a in active], device=loss.device)
        (loss * mask).sum().backward()
        opt.step()
        with torch.no_grad():
            norms = delta.norm(dim=1)
            scale = torch.where(norms > max_norm, max_norm / norms.clamp_min(1e-12), torch.ones_like(norms))
            delta.mul_(scale[:, None])
            done = torch.tensor([not a for a in active], device=delta.device)
            delta.copy_(torch.where(done[:, None], frozen, delta))
    return [ValueResult(delta[r].detach().clone(), float(h_norm[r]), loss_v[r], nll_v[r], steps[r], prob_v[r],
                        fast, True, stopped[r], history[r]) for r in range(n)]


def optimise_values(handle: ModelHandle, layer: int, requests: Sequence[Sequence[Member]],
                    templates: Sequence[str], settings: LocateParams,
                    tracker_for: Any = None, wheres: Sequence[str] | None = None, seed: int = 0,
                    joint: bool | None = None, max_rows: int = JOINT_ROWS) -> list[ValueResult]:
    """One ``delta`` per request, all at ``layer`` of the same (unedited) weights — MEMIT's and AlphaEdit's case.

    ``requests``: the members (``(question, subject, target)``, see :func:`optimise_value`) of each request.
    Each request's result is the one :func:`optimise_value` gives it alone (up to rounding): the requests
    are only batched, several per forward (:func:`_optimise_joint`, at most ``max_rows`` rows together),
    once this model's checks (one padded batch against one row at a time; the block replay at ``layer``)
    are known to pass — until then, and with an inference-time wrapper installed, one at a time.
    ``tracker_for(first, last)``: the Tracker (``v_steps`` steps) for requests ``first..last`` (0-based).

    ``joint`` (``None``: on CUDA only).  Measured on this project's CPU (embedded model, MEMIT's last layer,
    10 built-in facts, one thread, two rounds): together 148.4 / 128.7 s, one at a time 138.2 / 150.9 s —
    no gain: a step of one request (4 rows, ~64 tokens) already runs the CPU's matrix units near their
    throughput, and alone each request stops at its own step.  On a GPU a 64-token step leaves the device
    mostly idle (kernel launches and weight reads dominate), so there the requests share it (expected, not
    measured here: no GPU was lent).
    """
    wheres = list(wheres) if wheres is not None else [""] * len(requests)
    if joint is None:
        joint = str(handle.input_device).startswith("cuda")
    out: list[ValueResult | None] = [None] * len(requests)
    memo = _verdicts(handle.model) if not handle.wrappers else {}
    batch_key, replay_key = ("batch", handle.dtype), ("replay", layer, handle.dtype)
    i = 0

    def alone(k: int) -> None:
        question, subject, target = requests[k][0]
        out[k] = optimise_value(handle, layer, question, subject, target, templates, settings,
                                tracker_for(k, k) if tracker_for else None, wheres[k], seed=seed,
                                members=requests[k])

    # the checks run inside optimise_value (once per model and layer): until their verdicts are known, and
    # when they are not all known to pass, one request at a time
    while i < len(requests) and (not joint or handle.wrappers or batch_key not in memo or replay_key not in memo
                                 or memo.get(batch_key) is not True):
        alone(i)
        i += 1
    fast = bool(memo.get(replay_key))
    while i < len(requests):
        j, n_rows = i, 0
        while j < len(requests):
            k = len(requests[j]) * (max(1, len(templates)) + 1)   # template rows + at most one essence each
            if j > i and n_rows + k > max_rows:
                break
            n_rows += k
            j += 1
        if j - i == 1:
            alone(i)
        else:
            got = _optimise_joint(handle, layer, requests[i:j], templates, settings,
                                  tracker_for(i, j - 1) if tracker_for else None, wheres[i:j], fast)
            out[i:j] = got
        i = j
    return out   # type: ignore[return-value]
