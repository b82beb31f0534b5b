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
steps on the target NLL with the value replacing the MLP output from the last
prompt token on (exactly what inference does).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

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
        ids = torch.tensor([handle.prompt_ids(question)], device=handle.device)
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
    """The MLP's input and output at the last token of one prompt."""
    from .hooks import capture

    name = handle.adapter.mlp_name(layer)
    ids = torch.tensor([prompt_ids], device=handle.device)
    with capture(handle.model, [name], "input") as i_st, capture(handle.model, [name], "output") as o_st, \
            torch.no_grad():
        handle.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    return i_st[name][0][0, -1].float(), o_st[name][0][0, -1].float()


def key_scale(handle: ModelHandle, layer: int, prompts: list[list[int]]) -> float:
    """Mean norm of the keys (MLP inputs at the last token) of some prompts."""
    return float(torch.stack([mlp_io(handle, layer, p)[0] for p in prompts]).norm(dim=-1).mean())


def add_edit(cb: GraceCodebook, handle: ModelHandle, runner: SuffixRunner, question: str, target: str,
             item_ids: list[str], cfg: GraceConfig, on_step: Callable[[float], None]) -> dict:
    """Apply the codebook rules for one edit and train its value when a new entry is made."""
    was = cb.enabled
    cb.enabled = False
    try:
        prompt = handle.prompt_ids(question)
        key, out0 = mlp_io(handle, cb.layer, prompt)
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
        value, nll, iters = train_value(handle, runner, cb.layer, prompt, target, out0, cfg, on_step)
        if not bool(torch.isfinite(value).all()):
            from ..errors import NonFiniteError

            raise NonFiniteError("a GRACE codebook value became non-finite (NaN or inf); the edit was rolled back")
        cb._append(key, value, radius, target, item_ids)
        cb.log.append(action)
        info.update(nll=nll, iterations=iters)
        return info
    finally:
        cb.enabled = was


def train_value(handle: ModelHandle, runner: SuffixRunner, layer: int, prompt: list[int], target: str,
                init: torch.Tensor, cfg: GraceConfig,
                on_step: Callable[[float], None]) -> tuple[torch.Tensor, float, int]:
    tgt = handle.encode_answer(target) + end_ids(handle)
    batch = sequence_batch(handle, [prompt], [tgt])
    rows, pos, gold = batch.target_positions()
    repl = batch.from_prompt_end_mask().to(handle.device)
    if cfg.val_init == "cold":
        g = torch.Generator().manual_seed(cfg.seed)
        v0 = torch.randn(init.shape, generator=g)
        v0 = (v0 / v0.norm() * init.norm()).to(init.device)
    else:
        v0 = init.clone()
    v = v0.clone().requires_grad_(True)
    opt = torch.optim.Adam([v], lr=cfg.edit_lr)
    prep = runner.prepare(batch.ids, batch.mask)

    def hook(m, args, out):
        return torch.where(repl[:, :, None], v.to(out.dtype), out)

    hd = handle.adapter.mlp(layer).register_forward_hook(hook)
    nll_v, iters = float("nan"), 0
    try:
        for it in range(cfg.n_iter):
            opt.zero_grad(set_to_none=True)
            nll = runner.nll(prep, rows, pos, gold)
            nll_v, iters = float(nll.detach()), it + 1
            if nll_v <= cfg.stop_loss:
                on_step(nll_v)
                break
            nll.backward()
            opt.step()
            on_step(nll_v)
    finally:
        hd.remove()
    return v.detach(), nll_v, iters
