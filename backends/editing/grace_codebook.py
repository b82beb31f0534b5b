"""GRACE codebook adaptor (Hartvigsen et al., NeurIPS 2023), our implementation.

Where.  GRACE wraps one layer and keeps a discrete codebook of
``(key, value, radius, label)`` entries.  We wrap the MLP block of layer ``L``:

* key   = the MLP's input (the normalised residual stream entering the MLP) at
  the last token of the edit prompt (chat-formatted), a ``hidden``-sized vector;
* value = a trained vector that replaces the MLP's output.

Inference.  At every real (non-padding) token the MLP input is compared with
every key (Euclidean distance).  The first token whose nearest key lies within
that entry's radius (``distance <= radius``) starts the replacement: from that
token to the end of the sequence the MLP output is the entry's value.  During
cached generation a row that was hit keeps the replacement for every generated
token (the paper's "replace the last prompt token and keep it while in scope");
a row that was not hit keeps being checked on each new token.  A sequence in
which no token falls in any ball is left bit-for-bit unchanged (the hook
returns nothing).  Because the key of the last prompt token depends only on
the prompt (causal attention), a teacher-forced ``prompt + answer`` pass sees
the same hit at the same position as generation does.

Edits (``add_edit``), with ``d`` the distance of the new key to the nearest
key ``k_i`` (radius ``e_i``) and ``eps`` the initial radius:

* no entry, or ``d > e_i + eps``: add ``(key, value, eps, label)``;
* ``d <= e_i + eps`` and the same label: expand, ``e_i = max(e_i, d)``
  (``eps_expand = "coverage"``) or move the key to the mean of the two keys
  and set ``e_i = max(e_i, d / 2 + eps / 2)`` (``"moving_avg"``); no training;
* otherwise (a different label): split, ``e_i = d / 2`` and the new entry
  gets radius ``d / 2``.

New values are initialised from the MLP output at that token (``val_init =
"warm"``) or at random with the same norm (``"cold"``) and trained by gradient
steps (Adam) on the target NLL with the value replacing the MLP output from
the last prompt token on (exactly what inference does), until greedy decoding
gives the target (every target token, the end token included, leads its
position by :func:`greedy_margin`), the NLL reaches ``stop_loss``, or
``n_iter`` steps ran.  The value is all that changes between steps, so
:class:`ValueRunner` runs the prompt and the frozen blocks below ``L`` once
per edit and each step only the blocks from ``L`` on, over the few tokens
from the last prompt token on (checked against a full forward on first use).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..compat import cache_kwarg, output_cache
from .lifelong import CallTracker, HookedWrapper, SuffixRunner, end_ids, load_tensors, save_tensors, sequence_batch

if TYPE_CHECKING:
    from ..model import ModelHandle

STATE_KIND = "unlearn-tui/grace-codebook"
STATE_VERSION = 1


@dataclass(frozen=True)
class GraceConfig:
    """What one edit reads: a view of ``GraceMethod.Params`` with ``eps`` resolved (no defaults of its own;
    built by :func:`backends.methods.base.settings_view`)."""

    eps: float               # resolved: 0.25 x the mean key norm of neutral prompts unless given
    edit_lr: float
    n_iter: int
    eps_expand: str
    val_init: str
    stop_loss: float
    seed: int                # the session's seed


class GraceCodebook(HookedWrapper):
    """The inference-time wrapper: codebook, replacement hook, state, persistence."""

    name = "grace"

    # Copy-on-write (see backends.model.Wrapper): each entry's key, value and radius is its own tensor,
    # replaced (never written in place) when a rule changes it, so a transaction keeps only the entries an
    # edit touched.  ``keys`` / ``values`` / ``radii`` are the stacked views the lookup uses (derived).
    copy_on_write = True

    def __init__(self, layer: int, hidden: int) -> None:
        self.layer = layer
        self.hidden = hidden
        self._keys: list[torch.Tensor] = []       # per entry: [hidden] float32
        self._values: list[torch.Tensor] = []     # per entry: [hidden] float32
        self._radii: list[torch.Tensor] = []      # per entry: a 0-d tensor
        self._stacked: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.labels: list[str] = []
        self.item_ids: list[list[str]] = []
        self.log: list[str] = []            # what each edit did: add | expand | split
        self.enabled = True
        self._hook = None
        self._tracker = CallTracker()
        self._rows: torch.Tensor | None = None     # entry index per row of the current generation (-1: none)
        self.last_info: dict | None = None

    def __len__(self) -> int:
        return len(self._keys)

    # ---- the codebook as stacked tensors ---------------------------------------------------
    def _stack(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # a stack built under torch.inference_mode (an evaluation) cannot be saved for backward: training
        # through the hook afterwards (the relearning attack, a fine-tune on the deployed model) builds it again
        if self._stacked is not None and not torch.is_inference_mode_enabled() and self._stacked[0].is_inference():
            self._stacked = None
        if self._stacked is None:
            if self._keys:
                self._stacked = (torch.stack(self._keys), torch.stack(self._values), torch.stack(self._radii))
            else:
                self._stacked = (torch.zeros((0, self.hidden)), torch.zeros((0, self.hidden)), torch.zeros((0,)))
        return self._stacked

    @property
    def keys(self) -> torch.Tensor:
        return self._stack()[0]

    @keys.setter
    def keys(self, t: torch.Tensor) -> None:
        self._keys, self._stacked = list(t.unbind(0)), None

    @property
    def values(self) -> torch.Tensor:
        return self._stack()[1]

    @values.setter
    def values(self, t: torch.Tensor) -> None:
        self._values, self._stacked = list(t.unbind(0)), None

    @property
    def radii(self) -> torch.Tensor:
        return self._stack()[2]

    @radii.setter
    def radii(self, t: torch.Tensor) -> None:
        self._radii, self._stacked = list(t.unbind(0)), None

    def set_key(self, i: int, key: torch.Tensor) -> None:
        self._keys[i] = key
        self._stacked = None

    def set_radius(self, i: int, radius: float) -> None:
        """Entry ``i``'s radius (rounded to the radii's dtype, as writing into the stacked tensor would)."""
        old = self._radii[i]
        self._radii[i] = torch.tensor(radius, dtype=old.dtype, device=old.device)
        self._stacked = None

    # ---- hooks ----------------------------------------------------------------------------
    def hook_module(self, handle: ModelHandle) -> Any:
        return handle.adapter.mlp(self.layer)

    def lookup(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(nearest entry, its distance, inside its ball) for keys ``x [..., d]``."""
        keys = self.keys.to(device=x.device, dtype=x.dtype)
        flat = x.reshape(-1, x.shape[-1])
        dist = torch.cdist(flat.float(), keys.float())
        best, idx = dist.min(dim=-1)
        inside = best <= self.radii.to(best.device)[idx]
        shape = x.shape[:-1]
        return idx.reshape(shape), best.reshape(shape), inside.reshape(shape)

    def _forward(self, mod, args, out):
        if not self.enabled or len(self) == 0 or not args:
            return None
        x = args[0]
        if x.dim() != 3:
            return None
        B, T = x.shape[0], x.shape[1]
        idx, dist, inside = self.lookup(x)
        valid = self._tracker.valid(B, T, x.device)
        hit = inside & valid
        cont = self._tracker.continuing and self._rows is not None and self._rows.shape[0] == B
        rows = self._rows.clone() if cont else torch.full((B,), -1, dtype=torch.long, device=x.device)
        start = torch.full((B,), T, dtype=torch.long, device=x.device)
        for b in range(B):
            if rows[b] >= 0:
                start[b] = 0
                continue
            pos = torch.nonzero(hit[b]).flatten()
            if len(pos):
                start[b] = pos[0]
                rows[b] = idx[b, pos[0]]
        self._rows = rows
        # what the last real token saw (for describe_query)
        last = valid.long().cumsum(1).argmax(1)
        self.last_info = {"hit": (rows >= 0).tolist(), "dist": dist[torch.arange(B), last].tolist(),
                          "radius": self.radii.to(x.device)[idx[torch.arange(B), last]].tolist()}
        if not bool((rows >= 0).any()):
            return None
        new = out.clone()
        vals = self.values.to(device=out.device, dtype=out.dtype)
        for b in range(B):
            if rows[b] >= 0:
                new[b, int(start[b]):] = vals[rows[b]]
        return new

    def describe_query(self, handle: ModelHandle, question: str) -> dict:
        if len(self) == 0:
            return {"grace_hit": 0.0}
        ids = torch.tensor([handle.prompt_ids(question)], device=handle.input_device)
        with torch.no_grad():
            handle.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        info = self.last_info or {"hit": [False], "dist": [float("nan")], "radius": [float("nan")]}
        return {"grace_hit": 1.0 if info["hit"][0] else 0.0, "grace_dist": float(info["dist"][0]),
                "grace_radius": float(info["radius"][0])}

    # ---- transaction state ----------------------------------------------------------------
    def get_state(self) -> dict:
        """The codebook as flat named entries: key, value, radius, label and item ids per entry; the log."""
        s: dict = {"entries": len(self._keys), "labels": len(self.labels), "item_ids": len(self.item_ids),
                   "log": len(self.log)}
        for i, (k, v, r) in enumerate(zip(self._keys, self._values, self._radii)):
            s[f"key.{i}"], s[f"value.{i}"], s[f"radius.{i}"] = k, v, r
        for i, label in enumerate(self.labels):
            s[f"label.{i}"] = label
        for i, ids in enumerate(self.item_ids):
            s[f"item_ids.{i}"] = tuple(ids)
        for i, action in enumerate(self.log):
            s[f"log.{i}"] = action
        return s

    def set_state(self, state: dict) -> None:
        n = state["entries"]
        self._keys = [state[f"key.{i}"] for i in range(n)]
        self._values = [state[f"value.{i}"] for i in range(n)]
        self._radii = [state[f"radius.{i}"] for i in range(n)]
        self._stacked = None
        self.labels = [state[f"label.{i}"] for i in range(state["labels"])]
        self.item_ids = [list(state[f"item_ids.{i}"]) for i in range(state["item_ids"])]
        self.log = [state[f"log.{i}"] for i in range(state["log"])]
        self._rows = None

    # ---- persistence ----------------------------------------------------------------------
    def save_state(self, path: str, where: str = "params.save_state", overwrite: bool = False) -> None:
        """Write the state to ``path`` (see :func:`~backends.editing.lifelong.save_tensors` for the rules)."""
        meta = {"kind": STATE_KIND, "version": STATE_VERSION, "layer": self.layer, "hidden": self.hidden,
                "labels": self.labels, "item_ids": self.item_ids, "log": self.log}
        save_tensors(path, {"keys": self.keys, "values": self.values, "radii": self.radii}, meta, where,
                     overwrite)

    @classmethod
    def load_state(cls, path: str, where: str = "params.load_state") -> GraceCodebook:
        from ..errors import UserError

        tensors, meta = load_tensors(path, where)
        if meta.get("kind") != STATE_KIND:
            raise UserError(f"{path} is not a GRACE state file (kind {meta.get('kind')!r})", where)
        cb = cls(int(meta["layer"]), int(meta["hidden"]))
        cb.keys, cb.values, cb.radii = tensors["keys"], tensors["values"], tensors["radii"]
        cb.labels, cb.item_ids, cb.log = list(meta["labels"]), [list(i) for i in meta["item_ids"]], list(meta["log"])
        return cb

    # ---- editing --------------------------------------------------------------------------
    def _append(self, key: torch.Tensor, value: torch.Tensor, radius: float, label: str, ids: list[str]) -> None:
        dev = key.device
        # own copies: ``key`` is typically a row of a captured activation, which it would keep alive
        self._keys = [k.to(dev) for k in self._keys] + [key.detach().float().clone()]
        self._values = [v.to(dev) for v in self._values] + [value.detach().to(dev).float().clone()]
        self._radii = [r.to(dev) for r in self._radii] + [torch.tensor(radius, device=dev)]
        self._stacked = None
        self.labels.append(label)
        self.item_ids.append(list(ids))


def mlp_io(handle: ModelHandle, layer: int, prompt_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The MLP's input and output at the last token of one prompt (the pass stops after that MLP)."""
    from .hooks import capture, stop_after

    name = handle.adapter.mlp_name(layer)
    ids = torch.tensor([prompt_ids], device=handle.input_device)
    with capture(handle.model, [name], "input") as i_st, capture(handle.model, [name], "output") as o_st, \
            stop_after(handle.model, name), torch.no_grad():
        handle.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    return i_st[name][0][0, -1].float(), o_st[name][0][0, -1].float()


def key_scale(handle: ModelHandle, layer: int, prompts: list[list[int]]) -> float:
    """Mean norm of the keys (MLP inputs at the last token) of some prompts: one right-padded pass that stops
    after that MLP (the same keys as :func:`mlp_io` one prompt at a time, up to rounding)."""
    from ..batching import pad_right
    from .hooks import capture, stop_after

    name = handle.adapter.mlp_name(layer)
    ids, mask = pad_right(prompts, handle.tokenizer.pad_token_id or 0, handle.input_device)
    with capture(handle.model, [name], "input") as st, stop_after(handle.model, name), torch.no_grad():
        handle.model(input_ids=ids, attention_mask=mask, use_cache=False)
    got = st[name][0]   # on the layer's device
    last = torch.tensor([len(p) - 1 for p in prompts], device=got.device)
    keys = got[torch.arange(len(prompts), device=got.device), last].float()
    return float(keys.norm(dim=-1).mean())


# --------------------------------------------------------------------------- training a value


def _close(mine: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> bool:
    """The fast path's self-check: ``mine`` matches the reference ``ref`` up to the rounding of the model's dtype
    (float32: every element within ``1e-3`` of ``ref``'s scale; half types, where two ways of computing the same
    thing round apart by several units in the last place: the difference's norm within 5 % of ``ref``'s)."""
    if mine.shape != ref.shape or not bool(torch.isfinite(mine).all()):
        return False
    mine, ref = mine.float(), ref.float()
    if torch.finfo(dtype).bits >= 32:
        return float((mine - ref).abs().max()) <= 1e-3 * max(1.0, float(ref.abs().max()))
    return float((mine - ref).norm()) <= 0.05 * max(1e-6, float(ref.norm()))


def _columns_from(out: Any, at: int) -> Any:
    """A block's output from column ``at`` on (the first element of a tuple output)."""
    if isinstance(out, tuple):
        return (out[0][:, at:],) + tuple(out[1:])
    return out[:, at:]


def _step_cache(past: Any, replayed: int) -> Any:
    """A copy of the prefix cache ``past`` for one replayed pass: the layers of the ``replayed`` lowest blocks are
    shared (those blocks return their recording, so nothing writes their cache), the others deep-copied."""
    layers = getattr(past, "layers", None)
    if not isinstance(layers, list) or len(layers) < replayed:
        return copy.deepcopy(past)
    new = copy.copy(past)
    new.layers = layers[:replayed] + [copy.deepcopy(layer) for layer in layers[replayed:]]
    return new


def _keep_one(model: Any) -> dict:
    """``logits_to_keep=1`` where the model's forward takes it (a pass that fills a KV cache reads no logits)."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


class _ReplayedEdit:
    """One edit on the replayed suffix (see :class:`ValueRunner`).

    ``ids`` is the suffix -- the last prompt token and the target but its last
    token, so that position ``j`` predicts target token ``j`` -- after the
    prompt's other tokens, whose KV cache is ``past``; ``recorded`` holds
    blocks ``0..L-1``'s outputs on the suffix (both from the one pass of
    :meth:`ValueRunner.forward`).
    """

    def __init__(self, runner: ValueRunner, prompt: list[int], tgt: list[int], gold: torch.Tensor) -> None:
        from .hooks import capture

        h = runner.handle
        self.runner, self.gold = runner, gold
        last = len(prompt) - 1
        seq = list(prompt) + list(tgt[:-1])
        self.ids = torch.tensor([seq[last:]], device=h.input_device)
        self.mask = torch.ones((1, len(seq)), dtype=torch.long, device=h.input_device)
        # one pass over the whole sequence: blocks 0..L-1's outputs and the MLP's input and output recorded,
        # then the KV cache cut back to the prefix
        runner.header()   # built (once per apply) before the recording hooks go on
        outs: list[Any] = [None] * len(runner.lower)
        hooks = [b.register_forward_hook(lambda m, args, out, i=i: outs.__setitem__(i, out))
                 for i, b in enumerate(runner.lower)]
        name = h.adapter.mlp_name(runner.layer)
        try:
            with capture(h.model, [name], "input") as i_st, capture(h.model, [name], "output") as o_st:
                out, start = runner.forward(seq, last)
        finally:
            for hd in hooks:
                hd.remove()
        at = last - start   # the last prompt token's column in that pass
        self.recorded = [_columns_from(o, at) for o in outs]
        self.key, self.out0 = i_st[name][-1][0, at].float(), o_st[name][-1][0, at].float()
        self.past = None
        if last > 0:
            self.past = output_cache(out)
            if self.past is None or not hasattr(self.past, "crop"):
                raise RuntimeError("the model returned no croppable KV cache")
            self.past.crop(-self.ids.shape[1])   # negative: remove that many tokens (every transformers version)

    def _run(self) -> torch.Tensor:
        model = self.runner.handle.model
        kw: dict = dict(input_ids=self.ids, attention_mask=self.mask, use_cache=self.past is not None)
        if self.past is not None:   # a fresh copy per pass: the forward appends (graph-carrying) keys to it
            kw[cache_kwarg(model)] = _step_cache(self.past, len(self.runner.lower))
        return model(**kw).logits[0]

    def logits(self, v: torch.Tensor) -> torch.Tensor:
        """``[n_target, vocab]`` logits with ``v`` as block ``L``'s MLP output at every suffix token.

        Blocks ``0..L-1`` return their recording and the MLP returns ``v`` (its own computation would be
        replaced anyway): their ``forward`` is swapped for the pass, and put back after it.
        """
        r = self.runner
        rec = self.recorded
        mods = [*r.lower, r.mlp]
        saved = [m.__dict__.get("forward") for m in mods]   # e.g. an accelerate hook: put back after
        for i, b in enumerate(r.lower):
            b.forward = lambda *args, i=i, **kwargs: rec[i]
        r.mlp.forward = lambda x, *args, **kwargs: v.to(x.dtype).expand(*x.shape[:-1], v.shape[-1])
        try:
            return self._run()
        finally:
            for m, f in zip(mods, saved):
                if f is None:
                    del m.forward
                else:
                    m.forward = f


class _SuffixEdit:
    """One edit on :class:`~backends.editing.lifelong.SuffixRunner` (blocks L.. over the whole sequence)."""

    def __init__(self, runner: ValueRunner, prompt: list[int], tgt: list[int], gold: torch.Tensor) -> None:
        self.runner, self.gold = runner, gold
        self.key, self.out0 = mlp_io(runner.handle, runner.layer, prompt)
        self.batch = sequence_batch(runner.handle, [prompt], [tgt])
        self.prep: Any = None   # prepared on the first step (an expand never trains)

    def logits(self, v: torch.Tensor) -> torch.Tensor:
        r = self.runner
        if self.prep is None:
            self.rows, self.pos, _ = self.batch.target_positions()
            self.repl = self.batch.from_prompt_end_mask().to(r.handle.device_of(r.mlp))   # meets the MLP output
            self.prep = r.suffix.prepare(self.batch.ids, self.batch.mask)
        repl = self.repl
        hd = r.mlp.register_forward_hook(lambda m, args, out: torch.where(repl[:, :, None].to(out.device),
                                                                          v.to(device=out.device, dtype=out.dtype),
                                                                          out))
        try:
            return r.suffix.logits(self.prep, self.rows, self.pos)
        finally:
            hd.remove()


class ValueRunner:
    """The forward passes that read an edit's key and train its value at ``layer``.

    The fast path replays the suffix.  The value replaces the MLP output of
    block ``L`` from the last prompt token on, so nothing before that token
    (causal attention) and nothing in blocks ``0..L-1`` depends on it.  Per
    edit, ONE pass (no grad) runs the prompt and the target's inputs into a
    KV cache -- the chat template's header, the same in every prompt, runs
    once per apply and its cache is reused -- recording the outputs of blocks
    ``0..L-1`` on the suffix (the last prompt token and the target's inputs)
    and the MLP's input (the key) and output (the warm start) at the last
    prompt token; the cache is then cut back to the tokens before the suffix.
    Each optimisation step runs only block ``L``'s attention (its MLP returns
    the value) and the blocks above it, on the suffix's few tokens over the
    cached prefix, with blocks ``0..L-1`` returning the recording (the replay
    idea of ROME's value optimisation, :mod:`backends.editing.values`), and
    unembeds only the target positions (the suffix holds nothing else).

    On first use the fast path is checked against a full forward pass with a
    probe value (the logits at the target positions and the key); when they
    disagree (an architecture whose blocks or cache it does not understand)
    the runner keeps :class:`SuffixRunner` (blocks ``L..`` over the whole
    sequence, itself checked against the full forward and falling back to full
    forwards), so it is slower, never wrong.
    """

    def __init__(self, handle: ModelHandle, layer: int) -> None:
        self.handle, self.layer = handle, layer
        self.mlp = handle.adapter.mlp(layer)
        self.lower = [handle.adapter.block(i) for i in range(layer)]   # blocks 0..L-1: replayed
        self.suffix = SuffixRunner(handle, layer)
        self.replayed: bool | None = None   # None until the fast path was checked
        self._keep = _keep_one(handle.model)
        self._header: tuple[list[int], Any] | None = None
        self._header_built = False

    @property
    def fast(self) -> bool | None:
        """False once training fell back to full forward passes (what ``OneLayerAdaptor.finish`` reports)."""
        return True if self.replayed else self.suffix.fast

    # ---- prompts over the shared header ---------------------------------------------------------
    def header(self) -> tuple[list[int], Any] | None:
        """The tokens every formatted prompt starts with (the chat template's header) and their KV cache."""
        if not self._header_built:
            self._header_built = True
            a, b = (self.handle.prompt_ids(q) for q in ("Hello.", "Why?"))
            n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            if n >= 2:
                with torch.no_grad():
                    out = self.handle.model(input_ids=torch.tensor([a[:n]], device=self.handle.input_device),
                                            use_cache=True, **self._keep)
                past = output_cache(out)
                if past is not None:
                    self._header = (a[:n], past)
        return self._header

    def forward(self, ids: list[int], upto: int) -> tuple[Any, int]:
        """The model on ``ids`` into a KV cache (no grad), the shared header from its cache when ``ids`` start
        with it and it ends by column ``upto``: (the output, how many leading tokens came from that cache)."""
        model, dev = self.handle.model, self.handle.input_device
        head = self.header()
        with torch.no_grad():
            if head is None or len(head[0]) > upto or ids[:len(head[0])] != head[0]:
                return model(input_ids=torch.tensor([ids], device=dev), use_cache=True, **self._keep), 0
            n = len(head[0])
            return model(input_ids=torch.tensor([ids[n:]], device=dev),
                         attention_mask=torch.ones((1, len(ids)), dtype=torch.long, device=dev), use_cache=True,
                         **{cache_kwarg(model): copy.deepcopy(head[1])}, **self._keep), n

    # ---- one edit ------------------------------------------------------------------------------
    def edit(self, prompt: list[int], tgt: list[int]) -> _ReplayedEdit | _SuffixEdit:
        """Key, warm start and target logits of one edit (``prompt`` then ``tgt``, the end token included)."""
        gold = torch.tensor(tgt, dtype=torch.long, device=self.handle.input_device)
        if self.replayed is not False and prompt and tgt:
            if self.replayed:
                return _ReplayedEdit(self, prompt, tgt, gold)
            try:   # first use: build it and check it against the full forward
                e = _ReplayedEdit(self, prompt, tgt, gold)
                self.replayed = self._agrees(e, prompt, tgt)
            except Exception:  # noqa: BLE001 - any surprise means: keep the SuffixRunner path
                self.replayed = False
            if self.replayed:
                return e
        return _SuffixEdit(self, prompt, tgt, gold)

    def _agrees(self, e: _ReplayedEdit, prompt: list[int], tgt: list[int]) -> bool:
        """Whether the replayed suffix gives a full forward's logits and key under a probe value."""
        h = self.handle
        g = torch.Generator().manual_seed(0)
        noise = torch.randn(e.out0.shape, generator=g).to(e.out0.device)
        probe = e.out0 + noise * (0.5 * max(float(e.out0.norm()), 1e-3) / float(noise.norm()))
        last = len(prompt) - 1
        ids = torch.tensor([list(prompt) + list(tgt[:-1])], device=h.input_device)
        seen: dict[str, torch.Tensor] = {}

        def full_hook(m, args, out):
            seen["key"] = args[0][0, last].detach().float()
            new = out.clone()
            new[:, last:] = probe.to(out.dtype)
            return new

        n = ids.shape[1] - last   # the target positions: the last n
        with torch.no_grad():
            hd = self.mlp.register_forward_hook(full_hook)
            try:
                full = h.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False,
                               **({"logits_to_keep": n} if self._keep else {})).logits[0, -n:]
            finally:
                hd.remove()
            mine = e.logits(probe)
        return _close(mine, full, h.dtype) and _close(e.key, seen["key"], h.dtype)


def greedy_margin(dtype: torch.dtype) -> float:
    """How far (in logits) the target token must lead at every position for the greedy stop: a margin over the
    rounding of the model's dtype, so that another pass over the same tokens (batched, padded) decodes the same."""
    return 0.01 if torch.finfo(dtype).bits >= 32 else 0.5


def produces_target(logits: torch.Tensor, gold: torch.Tensor, margin: float = 0.0) -> bool:
    """Whether greedy decoding gives the target: at every position (teacher forced) the target token's logit
    exceeds every other token's by more than ``margin``."""
    lg = logits.float()
    other = lg.scatter(1, gold[:, None], float("-inf")).max(-1).values
    return bool((lg.gather(1, gold[:, None])[:, 0] - other > margin).all())


def add_edit(cb: GraceCodebook, handle: ModelHandle, runner: ValueRunner, question: str, target: str,
             item_ids: list[str], cfg: GraceConfig, on_step: Callable[[float], None]) -> dict:
    """Apply the codebook rules for one edit and train its value when a new entry is made."""
    was = cb.enabled
    cb.enabled = False
    try:
        prompt = handle.prompt_ids(question)
        edit = runner.edit(prompt, handle.encode_answer(target) + end_ids(handle))
        key = edit.key
        action, radius, near = "add", cfg.eps, -1
        if len(cb):
            idx, dist, _ = cb.lookup(key[None])
            near, d = int(idx[0]), float(dist[0])
            if d <= float(cb.radii[near]) + cfg.eps:
                if cb.labels[near] == target:
                    action = "expand"
                    if cfg.eps_expand == "moving_avg":
                        cb.set_key(near, (cb.keys[near] + key.to(cb.keys.device)) / 2)
                        cb.set_radius(near, max(float(cb.radii[near]), d / 2 + cfg.eps / 2))
                    else:
                        cb.set_radius(near, max(float(cb.radii[near]), d))
                    cb.item_ids[near] = cb.item_ids[near] + list(item_ids)
                else:
                    action, radius = "split", d / 2
                    cb.set_radius(near, d / 2)
        info: dict[str, Any] = {"action": action, "radius": radius, "nearest": near}
        if action == "expand":
            on_step(0.0)
            cb.log.append(action)
            return info
        value, nll, iters = train_value(edit, cfg, on_step)
        if not bool(torch.isfinite(value).all()):
            from ..errors import NonFiniteError

            raise NonFiniteError("a GRACE codebook value became non-finite (NaN or inf); the edit was rolled back")
        cb._append(key, value, radius, target, item_ids)
        cb.log.append(action)
        info.update(nll=nll, iterations=iters)
        return info
    finally:
        cb.enabled = was


def train_value(edit: _ReplayedEdit | _SuffixEdit, cfg: GraceConfig,
                on_step: Callable[[float], None]) -> tuple[torch.Tensor, float, int]:
    """Adam on the value (warm: from the MLP output at the last prompt token; cold: random, same norm).

    Stops once the target NLL is at most ``stop_loss`` or greedy decoding produces the target (every target
    token, the end token included, leads its position by :func:`greedy_margin`), after at most ``n_iter`` steps;
    the value returned is the one that met the rule.
    """
    init = edit.out0
    if cfg.val_init == "cold":
        g = torch.Generator().manual_seed(cfg.seed)
        v0 = torch.randn(init.shape, generator=g)
        v0 = (v0 / v0.norm() * init.norm().cpu()).to(init.device)
    else:
        v0 = init.clone()
    v = v0.clone().requires_grad_(True)
    opt = torch.optim.Adam([v], lr=cfg.edit_lr)
    gold = edit.gold
    margin = greedy_margin(edit.runner.handle.dtype)
    nll_v, iters = float("nan"), 0
    for it in range(cfg.n_iter):
        opt.zero_grad(set_to_none=True)
        lg = edit.logits(v).float()
        if gold.device != lg.device:   # the logits' device (the model's output device)
            gold = gold.to(lg.device)
        nll = torch.nn.functional.cross_entropy(lg, gold)
        nll_v, iters = float(nll.detach()), it + 1
        if nll_v <= cfg.stop_loss or produces_target(lg.detach(), gold, margin):
            on_step(nll_v)
            break
        nll.backward()
        opt.step()
        on_step(nll_v)
    return v.detach(), nll_v, iters
