"""Teacher forcing and greedy decoding that encode shared tokens once (KV-cache reuse).

Evaluation asks the same model many questions through one chat template, so
the prompts of a call share a long prefix (SmolLM2's system turn is 28 of a
TOFU prompt's ~40 tokens), and every prompt is scored against its gold *and*
its perturbed answers (4-6 answers of 1-10 tokens each).  The plain path
(:func:`generation.answer_stats`) runs ``prompt + answer`` once per answer.
This module runs each token once:

1. **prefix** — the longest token prefix shared by every prompt of the call,
   one row, ``use_cache=True``;
2. **prompts** — each distinct prompt's own tokens, after the prefix's cache
   (copied per row), left-padded *inside* the sequence:
   ``[prefix][pad…][own tokens]``.  Padding columns are masked out and the
   position ids count real tokens only, so every real token sees exactly the
   keys and positions it sees in an unpadded run.  The last column's hidden
   state predicts every answer's first token;
3. **answers** — each answer but its last token, after its prompt's cache
   row, right-padded; position ``j`` predicts answer token ``j + 1``.  A
   one-token answer needs no third step at all.

Only the final norm's output at the needed positions is unembedded
(:meth:`Adapter.unembed_logits`).  :func:`greedy` decodes with the same first
two steps and then one token per step, stopping a row at end-of-sequence and
the batch when every row has stopped.  Finished rows leave the batch (their
cache rows dropped) once they are a quarter of it, so the long answers of a
batch no longer drag its short ones through every step; a quarter, because
dropping rows copies the whole cache once.  Greedy decoding takes
``DECODE_WIDEN`` (4) times ``batch_size`` prompts per batch: one decoding step
costs nearly the same for 16 rows as for 64 (on the embedded model on one CPU
thread, 143 ms per step for 16 rows, 354 ms for 64: 8.9 -> 5.5 ms a token),
and the memory it needs is the KV cache plus one token's activations per
row, while ``batch_size`` bounds teacher forcing, whose rows carry whole
answers (and the plain path's whole prompts).

Why not HF ``generate`` with a pre-filled cache: it assumes one left-padded
block per row, so a prefix shared across rows cannot be kept once; and why
not always: the math is the same as the plain path's only when the model
honours explicit position ids and a 2-D mask with holes, and when nothing
hooks the model's calls.  :func:`usable` therefore refuses handles with
inference-time wrappers (WISE, GRACE, IKE see every call) and models whose
generation config asks for logits processing other than suppressed tokens, and :func:`verified` runs both
paths once per loaded model on a small probe, keeping the fast path only when
they agree.  Every tensor follows the model's device; logits are compared and
reduced in float32.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .batching import pad_left, pad_right
from .compat import cache_kwarg, output_cache

if TYPE_CHECKING:
    from .model import ModelHandle

MIN_PREFIX = 4           # a shorter shared prefix is not worth its own forward
RETIRE_SHARE = 4         # greedy: finished rows leave the batch once they are 1/RETIRE_SHARE of it
DECODE_WIDEN = 4         # greedy decodes batch_size * DECODE_WIDEN prompts at a time (see the module doc)
_PROCESSING = ("repetition_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
               "min_length", "min_new_tokens", "begin_suppress_tokens", "forced_bos_token_id",
               "forced_eos_token_id", "sequence_bias", "exponential_decay_length_penalty", "renormalize_logits",
               "force_words_ids", "constraints")
_DEFAULTS = {"repetition_penalty": 1.0, "min_length": 0, "no_repeat_ngram_size": 0,
             "encoder_no_repeat_ngram_size": 0, "renormalize_logits": False}


def _common_prefix(prompts: Sequence[Sequence[int]]) -> int:
    """Length of the shared token prefix, leaving every prompt at least one token of its own."""
    if not prompts:
        return 0
    first = prompts[0]
    n = min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        k = 0
        while k < n and p[k] == first[k]:
            k += 1
        n = k
    return n if n >= MIN_PREFIX else 0


def _select(cache: Any, rows: Any) -> Any:
    """A new cache holding ``rows`` (a long tensor, repeats allowed) of ``cache``; ``cache`` is untouched."""
    new = copy.copy(cache)
    new.layers = [copy.copy(layer) for layer in cache.layers]
    new.reorder_cache(rows)   # index_select per layer: new tensors on the copies
    return new


def usable(handle: ModelHandle) -> bool:
    """Whether the shared-prefix path may be tried: no wrappers, a layered KV cache, no logits processing."""
    if handle.wrappers:
        return False
    cfg = getattr(handle.model, "generation_config", None)
    for name in _PROCESSING:
        val = getattr(cfg, name, None)
        if val is not None and val != _DEFAULTS.get(name, None) and val != [] and val != {}:
            return False
    return True


class _Runner:
    """The three forward steps, with the final norm's output captured by a hook."""

    def __init__(self, handle: ModelHandle) -> None:
        self.h = handle
        self.model = handle.model
        self.dev = handle.input_device
        self.pad = handle.tokenizer.pad_token_id
        self.kw = cache_kwarg(self.model)
        self.captured: list = []

    def __enter__(self) -> _Runner:
        self.hook = self.h.adapter.final_norm().register_forward_hook(lambda _m, _a, out: self.captured.append(out))
        return self

    def __exit__(self, *exc: Any) -> None:
        self.hook.remove()

    def forward(self, ids: Any, mask: Any, pos: Any, cache: Any = None) -> tuple[Any, Any]:
        """(final-norm hidden states, the cache after this step)."""
        self.captured.clear()
        kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "use_cache": True}
        if cache is not None:
            kwargs[self.kw] = cache
        extra = _keep_one(self.model)
        out = self.model(**kwargs, **extra)
        hidden = self.captured[-1]
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        new_cache = output_cache(out)
        if new_cache is None or not hasattr(new_cache, "layers"):
            raise Unsupported("the model returned no layered KV cache")
        return hidden, new_cache

    def prefix(self, prompts: Sequence[Sequence[int]]) -> tuple[int, Any]:
        import torch

        n = _common_prefix(prompts)
        if not n:
            return 0, None
        ids = torch.tensor([list(prompts[0][:n])], dtype=torch.long, device=self.dev)
        mask = torch.ones_like(ids)
        pos = torch.arange(n, device=self.dev)[None]
        _hidden, cache = self.forward(ids, mask, pos)
        return n, cache

    def prompts(self, prompts: Sequence[Sequence[int]], n_prefix: int, prefix_cache: Any) -> tuple[Any, Any, Any]:
        """Each prompt's own tokens after the prefix: (last hidden per row, cache, full 2-D mask)."""
        import torch

        own = [list(p[n_prefix:]) for p in prompts]
        ids, seg = pad_left(own, self.pad, self.dev)   # the holes sit between the prefix and each row's own tokens
        pos = (n_prefix + seg.cumsum(-1) - 1).clamp(min=n_prefix)
        if n_prefix:
            rows = torch.zeros(len(own), dtype=torch.long, device=self.dev)
            cache = _select(prefix_cache, rows)
            mask = torch.cat([torch.ones((len(own), n_prefix), dtype=torch.long, device=self.dev), seg], dim=1)
        else:
            cache, mask = None, seg
        hidden, cache = self.forward(ids, mask, pos, cache)
        return hidden[:, -1], cache, mask


class Unsupported(Exception):
    """The model does not work the way the shared-prefix path needs (the plain path is used)."""


def _keep_one(model: Any) -> dict:
    from .generation import _forward_kwargs

    return _forward_kwargs(model)


def _prompt_groups(prompts: Sequence[Sequence[int]], budget_rows: int) -> list[list[int]]:
    """Distinct-prompt indices, longest first, ``budget_rows`` (token-budgeted) at a time."""
    from .generation import _order_and_batches

    return _order_and_batches([len(p) for p in prompts], budget_rows)


def answer_stats(handle: ModelHandle, pairs: Sequence[tuple[list[int], list[int]]], top_k: int = 100,
                 batch_size: int = 16, on_batch: Callable[[int], None] | None = None) -> list:
    """:func:`generation.answer_stats` computed with each shared token encoded once (same results)."""
    import torch

    from .generation import TokenStats

    if any(a and not p for p, a in pairs):
        raise Unsupported("an empty prompt")
    results: list[Any] = [None] * len(pairs)
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i, (p, a) in enumerate(pairs):
        if not a:
            results[i] = TokenStats(0.0, 0.0, 0.0, 0)
            if on_batch:
                on_batch(1)
        else:
            by_prompt.setdefault(tuple(p), []).append(i)
    prompts = list(by_prompt)
    if not prompts:
        return results
    adapter = handle.adapter
    with _Runner(handle) as run, torch.inference_mode():
        n_prefix, prefix_cache = run.prefix(prompts)
        for group in _prompt_groups(prompts, batch_size):
            gp = [prompts[g] for g in group]
            last, cache, mask = run.prompts(gp, n_prefix, prefix_cache)
            # every answer of these prompts: (pair index, prompt row)
            owners = [(i, r) for r, p in enumerate(gp) for i in by_prompt[p]]
            first_hidden = {i: last[r] for i, r in owners}
            rest: dict[int, Any] = {}
            longer = [(i, r) for i, r in owners if len(pairs[i][1]) > 1]
            for chunk in _answer_chunks(longer, pairs, batch_size * 4):
                rows = torch.tensor([r for _i, r in chunk], dtype=torch.long, device=run.dev)
                seqs = [pairs[i][1][:-1] for i, _r in chunk]
                ids, amask = pad_right(seqs, run.pad, run.dev)
                full_mask = torch.cat([mask[rows], amask], dim=1)
                start = mask[rows].sum(-1, keepdim=True)
                pos = start + torch.arange(ids.shape[1], device=run.dev)[None]
                hidden, _ = run.forward(ids, full_mask, pos, _select(cache, rows))
                for k, (i, _r) in enumerate(chunk):
                    rest[i] = hidden[k, : len(pairs[i][1]) - 1]
            order = [i for i, _r in owners]
            hs = torch.cat([torch.cat([first_hidden[i][None], rest[i]]) if i in rest else first_hidden[i][None]
                            for i in order])
            gold_ids = [t for i in order for t in pairs[i][1]]
            lg = adapter.unembed_logits(hs).float()
            gold = torch.tensor(gold_ids, dtype=torch.long, device=lg.device)[:, None]
            gold_logit = lg.gather(1, gold)
            logp = torch.log_softmax(lg, dim=-1).gather(1, gold).squeeze(1)
            rank = (lg > gold_logit).sum(dim=1) + 1
            hit = (rank <= top_k).float()
            inv = 1.0 / rank.float()
            sizes = [len(pairs[i][1]) for i in order]
            for i, lp, iv, ht, n in zip(order, logp.cpu().split(sizes), inv.cpu().split(sizes),
                                        hit.cpu().split(sizes), sizes):
                results[i] = TokenStats(float(lp.mean()), float(iv.mean()), float(ht.mean()), n)
            if on_batch:
                on_batch(len(order))
    return results


def _answer_chunks(owners: list[tuple[int, int]], pairs: Sequence, max_rows: int) -> list[list[tuple[int, int]]]:
    out: list[list[tuple[int, int]]] = []
    for s in range(0, len(owners), max(1, max_rows)):
        out.append(owners[s: s + max_rows])
    return out


def greedy(handle: ModelHandle, prompts: Sequence[list[int]], max_new_tokens: int, batch_size: int,
           on_batch: Callable[[int], None] | None = None) -> list[str]:
    """Greedy continuations (decoded without special tokens), each distinct prompt decoded once."""
    import torch

    model, tok = handle.model, handle.tokenizer
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tok.eos_token_id
    eos_set = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
    distinct = list(dict.fromkeys(tuple(p) for p in prompts))
    if any(not p for p in distinct):
        raise Unsupported("an empty prompt")
    texts: dict[tuple[int, ...], str] = {}
    uses: dict[tuple[int, ...], int] = {}
    for p in prompts:
        uses[tuple(p)] = uses.get(tuple(p), 0) + 1
    adapter = handle.adapter
    dev_in = handle.input_device
    eos_t = torch.tensor(sorted(eos_set), dtype=torch.long, device=dev_in)
    suppress = list(getattr(model.generation_config, "suppress_tokens", None) or [])

    def pick(hidden: Any) -> Any:
        logits = adapter.unembed_logits(hidden).float()
        if suppress:   # the one logits processor honoured here (as generate's SuppressTokensLogitsProcessor)
            logits[:, suppress] = float("-inf")
        return logits.argmax(-1).to(dev_in)   # the unembedding may sit on another device (device_map)

    with _Runner(handle) as run, torch.inference_mode():
        n_prefix, prefix_cache = run.prefix(distinct) if distinct else (0, None)
        for group in _prompt_groups(distinct, batch_size * DECODE_WIDEN):
            gp = [distinct[g] for g in group]
            last, cache, mask = run.prompts(gp, n_prefix, prefix_cache)
            rows = len(gp)
            nxt = pick(last)
            done = torch.zeros(rows, dtype=torch.bool, device=run.dev)
            idx = torch.arange(rows, device=run.dev)     # the batch row each live row came from
            record: list[tuple[Any, Any]] = []          # (live rows, their token) per step
            pos = mask.sum(-1)
            for step in range(max_new_tokens):
                nxt = torch.where(done, torch.full_like(nxt, run.pad), nxt)
                record.append((idx, nxt))
                done = done | torch.isin(nxt, eos_t)
                if step == max_new_tokens - 1:
                    break
                n_done = int(done.sum())
                if n_done == len(idx):
                    break
                if n_done * RETIRE_SHARE >= len(idx):
                    # retire the finished rows: the next steps run only the live ones (fewer rows, the same
                    # keys, positions and mask for each of them)
                    keep = (~done).nonzero().squeeze(1)
                    idx, nxt, mask, pos, done = idx[keep], nxt[keep], mask[keep], pos[keep], done[keep]
                    cache = _select(cache, keep)
                mask = torch.cat([mask, torch.ones((len(idx), 1), dtype=mask.dtype, device=run.dev)], dim=1)
                hidden, cache = run.forward(nxt[:, None], mask, pos[:, None], cache)
                pos = pos + 1
                nxt = pick(hidden[:, -1])
            # a row sits in the record for a run of steps from the first: its tokens are out[r, :steps[r]]
            out = torch.zeros((rows, len(record)), dtype=torch.long, device=run.dev)
            steps = torch.zeros(rows, dtype=torch.long, device=run.dev)
            for s, (ix, t) in enumerate(record):
                out[ix, s] = t
                steps[ix] += 1
            for r, (p, n) in enumerate(zip(gp, steps.tolist())):
                texts[p] = tok.decode(out[r, :n].tolist(), skip_special_tokens=True).strip()
            if on_batch:
                on_batch(sum(uses[p] for p in gp))
    return [texts[tuple(p)] for p in prompts]


# ---------------------------------------------------------------- the one-time check per loaded model
_CHECKED = "_shared_prefix_ok"


PROBE_CACHE_VERSION = 1   # bump when the probe or the fast path changes what a passed probe means


def _probe_key(handle: ModelHandle) -> str:
    """What a passed probe holds for: the model (fingerprint, class), its dtype and device, the library
    versions and this module's probe version; a hash of them."""
    import hashlib
    import json

    import torch
    import transformers

    model = handle.model
    try:
        device = str(next(model.parameters()).device)
    except (StopIteration, AttributeError):
        device = "?"
    parts = [PROBE_CACHE_VERSION, handle.fingerprint, type(model).__name__, str(handle.dtype), device,
             torch.__version__, transformers.__version__]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:24]


def _probe_file() -> Any:
    from .paths import cache_dir

    return cache_dir() / "probes" / "shared_prefix.json"


def _passed_before(handle: ModelHandle) -> bool:
    """Whether this model, dtype, device and library versions passed the probe in an earlier process."""
    import json

    try:
        return bool(json.loads(_probe_file().read_text()).get(_probe_key(handle)))
    except (OSError, ValueError, AttributeError, TypeError):
        return False


def _remember_passed(handle: ModelHandle) -> None:
    import json

    from .fileio import atomic_write

    path = _probe_file()
    try:
        try:
            seen = json.loads(path.read_text())
            seen = seen if isinstance(seen, dict) else {}
        except (OSError, ValueError):
            seen = {}
        seen[_probe_key(handle)] = True
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(seen, indent=1, sort_keys=True) + "\n")
    except (OSError, ValueError, AttributeError, TypeError):
        pass   # a cache that cannot be written: the probe runs again next time


def verified(handle: ModelHandle, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]] = ()) -> bool:
    """Whether the shared-prefix path agrees with the plain one on this model (checked once per model).

    A passed probe is remembered on disk (``cache_dir()/probes``) for the model's fingerprint, class,
    dtype, device and the torch/transformers versions (:func:`_probe_key`), so a later process on the
    same model skips it; a failed one is not remembered (it runs again, and the plain path is used).

    The probe is up to three of the caller's prompts plus the first one
    shortened by a token (so rows of different lengths leave holes in the
    mask), each scored against up to two of ``answers`` (or two of its own
    tokens when there are none), and a four-token greedy continuation.
    Agreement is the same greedy text, and log-probabilities and MRR within a
    tolerance set by the dtype (1e-4 in float32, where the paths differ by
    about 1e-6; 5e-2 in half precision).
    """
    if not usable(handle):
        return False
    model = handle.model
    state = getattr(model, _CHECKED, None)
    if state is not None:
        return bool(state)
    if _passed_before(handle):
        try:
            setattr(model, _CHECKED, True)
        except AttributeError:  # pragma: no cover - a model that refuses attributes
            pass
        return True
    import torch

    from . import generation

    ok = False
    try:
        ps = [list(p) for p in dict.fromkeys(tuple(p) for p in prompts if p)][:3]
        if ps and len(ps[0]) > MIN_PREFIX + 2:
            ps.append(ps[0][:-1])
        ans = [list(a) for a in answers if a][:2] or [ps[0][-2:]] if ps else []
        probe = [(p, a) for p in ps for a in ans]
        if probe:
            ref = generation.plain_answer_stats(handle, probe, batch_size=len(probe))
            fast = answer_stats(handle, probe, batch_size=len(probe))
            tol = 1e-4 if handle.dtype == torch.float32 else 5e-2
            ok = all(abs(x.mean_logprob - y.mean_logprob) <= tol and abs(x.mrr - y.mrr) <= tol
                     for x, y in zip(ref, fast))
            if ok:
                ok = generation.plain_generate(handle, ps, 4, len(ps)) == greedy(handle, ps, 4, len(ps))
    except (Unsupported, RuntimeError, TypeError, ValueError, AttributeError, IndexError, KeyError):
        ok = False   # an architecture this path does not fit: the plain path is always right
    try:
        setattr(model, _CHECKED, ok)
    except AttributeError:  # pragma: no cover - a model that refuses attributes
        pass
    if ok:
        _remember_passed(handle)
    return ok


__all__ = ["answer_stats", "greedy", "usable", "verified", "Unsupported", "MIN_PREFIX"]
