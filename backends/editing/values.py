"""The value optimisation shared by ROME, MEMIT and AlphaEdit (v* / z).

For one request, find a vector ``delta`` that, added to layer ``L``'s MLP
output at the subject's last token, makes the model produce the target after
the prompt.  Minimised with Adam over ``delta`` only (the model is frozen):

    loss = NLL(target | template_i(prompt))  averaged over the context templates
         + kl_factor * KL( p(. | essence) || p_delta(. | essence) )  at the subject's last token
         + weight_decay * ||delta||^2 / ||h||^2

where ``h`` is the residual stream (block ``L`` output) at the lookup index of
the bare prompt.  After each step ``delta`` is clamped to
``clamp_norm_factor * ||h||``; the loop stops early once the NLL is below
``stop_loss``.  Adding ``delta`` to the MLP output or to the block output is
the same change of the residual stream, so ROME (which rewrites the MLP
output) and MEMIT/AlphaEdit (which target the residual at their last layer)
share this code.  The logits come from the model's own forward (tied input and
output embeddings need no special case).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..compat import cache_kwarg, output_cache
from ..events import Tracker
from .keys import edit_prompt, essence_prompt, keys_at

if TYPE_CHECKING:
    from ..model import ModelHandle
    from .locate_params import LocateParams


@dataclass
class ValueResult:
    delta: torch.Tensor        # (d,) float32
    h_norm: float
    loss: float
    nll: float
    steps: int
    target_prob: float
    replayed: bool = False     # blocks 0..L were replayed from recordings (see _BlockReplay)


def target_ids(handle: ModelHandle, target: str, stop_token: bool) -> list[int]:
    ids = handle.encode_answer(target)
    eos = handle.tokenizer.eos_token_id
    if stop_token and eos is not None:
        ids = ids + [eos]
    return ids


class _BlockReplay:
    """Replays blocks ``0..L`` of a row's suffix from cached outputs: only the blocks after L run per step.

    Nothing up to block ``L`` depends on ``delta`` (it enters at block L's MLP
    output), so their outputs on a row's suffix are recorded once (no grad) and
    the blocks' ``forward`` is swapped for one that returns the recording —
    block ``L``'s with ``delta`` added at local position 0, the same change of
    the residual stream as adding it to the MLP output.  ``verify`` compares
    the logits of this path with the full forward on every row once; on any
    mismatch (an architecture whose blocks have side effects we do not
    replay) the caller keeps the full forward.
    """

    def __init__(self, model: Any, block_names: list[str]) -> None:
        self.blocks = [model.get_submodule(n) for n in block_names]
        self.delta: torch.Tensor | None = None
        self.current: list[Any] | None = None

    @staticmethod
    def _first(out: Any) -> Any:
        return out[0] if isinstance(out, tuple) else out

    def record(self, model: Any, row: _Row) -> None:
        outs: list[Any] = [None] * len(self.blocks)
        hooks = []
        for i, b in enumerate(self.blocks):
            def post(m, args, out, i=i):
                outs[i] = out
            hooks.append(b.register_forward_hook(post))
        try:
            with torch.no_grad():
                row.logits(model)
        finally:
            for h in hooks:
                h.remove()
        row.replay = outs

    def _forward_of(self, i: int):
        last = i == len(self.blocks) - 1

        def forward(*args: Any, **kwargs: Any) -> Any:
            out = self.current[i]
            if not last or self.delta is None:
                return out
            first = self._first(out)
            new = torch.cat([first[:, :1] + self.delta.to(first.dtype), first[:, 1:]], dim=1)
            return (new,) + tuple(out[1:]) if isinstance(out, tuple) else new
        return forward

    def logits(self, model: Any, row: _Row) -> torch.Tensor:
        self.current = row.replay
        for i, b in enumerate(self.blocks):
            b.forward = self._forward_of(i)
        try:
            return row.logits(model)
        finally:
            for b in self.blocks:
                del b.forward
            self.current = None

    def verify(self, model: Any, rows: list[_Row], full_logits: list[torch.Tensor], probe: torch.Tensor) -> bool:
        """Whether replaying with ``probe`` as delta gives ``full_logits`` (the hooked full forward's)."""
        saved, self.delta = self.delta, probe
        try:
            with torch.no_grad():
                for r, full in zip(rows, full_logits):
                    fast = self.logits(model, r)
                    tol = 1e-4 * max(1.0, float(full.abs().max()))
                    if full.shape != fast.shape or float((full - fast).abs().max()) > tol:
                        return False
        except Exception:   # noqa: BLE001 - any surprise means: use the full forward
            return False
        finally:
            self.delta = saved
        return True


class _Row:
    """One prompt, split at the lookup index: the prefix (before it) runs once into a KV cache.

    Nothing before the lookup index depends on ``delta`` (causal attention), so
    every optimisation step only runs the suffix — the subject's last token,
    the rest of the prompt and the target — on top of the cached prefix.
    """

    def __init__(self, model: Any, ids: list[int], index: int, keep: list[int], device: Any) -> None:
        self.prefix_len = index
        self.suffix = torch.tensor([ids[index:]], device=device)
        self.keep_local = [k - index for k in keep]
        self.keep_t = torch.tensor(self.keep_local, device=device)
        self.past = None
        if index > 0:
            with torch.no_grad():
                out = model(input_ids=torch.tensor([ids[:index]], device=device), use_cache=True)
            self.past = output_cache(out)
        self.mask = torch.ones((1, len(ids)), dtype=torch.long, device=device)
        self.replay: list[Any] | None = None     # block outputs 0..L on the suffix (see _BlockReplay)

    def logits(self, model: Any) -> torch.Tensor:
        kw: dict = dict(input_ids=self.suffix, attention_mask=self.mask, use_cache=self.past is not None)
        if self.past is not None:
            # a fresh copy per call: the forward appends to the cache, and the appended (graph-carrying)
            # tensors must not leak into the next step
            kw[cache_kwarg(model)] = copy.deepcopy(self.past)
        try:
            return model(**kw, logits_to_keep=self.keep_t).logits[0]
        except TypeError:
            return model(**kw).logits[0, self.keep_t]


def optimise_value(handle: ModelHandle, layer: int, question: str, subject: str | None, target: str,
                   templates: Sequence[str], settings: LocateParams, tracker: Tracker | None = None,
                   where: str = "", seed: int = 0, replay_blocks: bool = True) -> ValueResult:
    """Optimise ``delta`` for one request; ``settings`` are the method's Params (``v_steps``, ``v_lr``, ...)."""
    model = handle.model
    ad = handle.adapter
    tgt = target_ids(handle, target, settings.stop_token)
    prompts = [edit_prompt(handle, question, subject, t, where, settings.fact_token) for t in templates]
    ess = essence_prompt(handle, subject, where, settings.fact_token)
    dev = handle.device
    # logits at position (len(prompt) - 1 + j) predict tgt[j]; only those go through the output layer
    rows = []
    for p in prompts:
        keep = [len(p.ids) - 1 + j for j in range(len(tgt))]
        rows.append(_Row(model, p.ids + tgt[:-1], p.index, keep, dev))
    ess_row = _Row(model, ess.ids, ess.index, [ess.index], dev)
    tgt_t = torch.tensor(tgt, device=dev)

    # reference: residual norm at the bare prompt, essence distribution before the edit
    _, outs = keys_at(handle, [layer], [prompts[0]], outputs=[layer])
    h_norm = float(outs[layer][0].norm())
    with torch.no_grad():
        ref = torch.log_softmax(ess_row.logits(model)[0].float(), -1)

    delta = torch.zeros(ad.hidden_size, dtype=torch.float32, device=dev)
    delta.requires_grad_(True)
    opt = torch.optim.Adam([delta], lr=settings.v_lr)
    max_norm = settings.clamp_norm_factor * h_norm
    mod = model.get_submodule(ad.mlp_name(layer))
    # blocks 0..L replayed from recordings when that reproduces the full forward exactly (checked here)

    def hook(m, args, out):  # the suffix starts at the lookup index: add delta at local position 0
        first = out[0] if isinstance(out, tuple) else out
        new = torch.cat([first[:, :1] + delta.to(first.dtype), first[:, 1:]], dim=1)
        return (new,) + tuple(out[1:]) if isinstance(out, tuple) else new

    replay = _BlockReplay(model, [ad.block_name(i) for i in range(layer + 1)])
    all_rows = rows + [ess_row]

    def replay_is_exact() -> bool:
        """Record blocks 0..L per row, then compare both paths under a probe delta (delta is zero after)."""
        for r in all_rows:
            replay.record(model, r)
        # a probe delta (half the residual norm, seeded) through both paths: the MLP-output hook on the full
        # forward and the replay; an architecture that normalises the MLP output before the residual add
        # (e.g. Gemma 2's post-feed-forward norm) fails this and keeps the full forward
        g = torch.Generator().manual_seed(seed)
        probe = torch.randn(ad.hidden_size, generator=g).to(dev)
        probe = probe * (0.5 * max(h_norm, 1e-3) / float(probe.norm()))
        with torch.no_grad():
            delta.copy_(probe)
            hp = mod.register_forward_hook(hook)
            try:
                full = [r.logits(model) for r in all_rows]
            finally:
                hp.remove()
                delta.zero_()   # the optimisation starts from zero whatever happened above
        return replay.verify(model, all_rows, full, probe)

    try:
        fast = replay_blocks and replay_is_exact()
    except Exception:  # noqa: BLE001 - the full forward is always correct
        fast = False
    replay.delta = delta

    def row_logits(r: _Row) -> torch.Tensor:
        return replay.logits(model, r) if fast else r.logits(model)

    loss_v = nll_v = float("nan")
    prob = 0.0
    steps = 0
    h = None if fast else mod.register_forward_hook(hook)
    try:
        for step in range(settings.v_steps):
            opt.zero_grad()
            per_row = []
            for r in rows:
                logp = torch.log_softmax(row_logits(r).float(), -1)
                per_row.append(logp.gather(1, tgt_t[:, None])[:, 0].mean())
            per_row_t = torch.stack(per_row)
            nll = -per_row_t.mean()
            ess_lp = torch.log_softmax(row_logits(ess_row)[0].float(), -1)
            kl = torch.nn.functional.kl_div(ess_lp, ref, log_target=True, reduction="sum")
            wd = settings.v_weight_decay * delta.pow(2).sum() / max(h_norm, 1e-6) ** 2
            loss = nll + settings.kl_factor * kl + wd
            nll_v, loss_v = float(nll.detach()), float(loss.detach())
            prob = float(per_row_t.detach().exp().mean())
            steps = step + 1
            if tracker is not None:
                tracker.step(loss=loss_v, detail=f"nll {nll_v:.3f}")
            if nll_v < settings.stop_loss:
                break
            loss.backward()
            opt.step()
            with torch.no_grad():
                n = delta.norm()
                if n > max_norm:
                    delta.mul_(max_norm / n)
    finally:
        if h is not None:
            h.remove()
    return ValueResult(delta.detach().clone(), h_norm, loss_v, nll_v, steps, prob, fast)


