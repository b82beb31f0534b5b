"""Batched greedy generation and batched teacher-forced answer statistics.

Both take token-id lists (prompts already formatted by the handle), so the
same code serves metrics, targets (self-improvement) and the probe.

* :func:`generate` left-pads a batch and decodes greedily.
* :func:`answer_stats` sorts ``prompt + answer`` sequences by length, right-pads
  them in token-budgeted batches and, from ONE forward pass per batch that
  unembeds only the answer positions, returns for every pair (in input order)
  the mean log-probability of the answer tokens, the mean reciprocal rank of
  each gold token and the share of gold tokens ranked within ``top_k``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

from .batching import pad_left, pad_right
from .model import ModelHandle


@dataclass(frozen=True)
class TokenStats:
    mean_logprob: float   # mean over answer tokens of log P(token | prefix)
    mrr: float            # mean over answer tokens of 1 / rank(gold token)
    top_hit: float        # share of answer tokens with rank <= top_k
    n_tokens: int

    @property
    def probability(self) -> float:
        """Length-normalised probability P(a|q)^(1/|a|)."""
        import math

        return math.exp(self.mean_logprob)


def _batches(n: int, size: int):
    for start in range(0, n, max(1, size)):
        yield range(start, min(n, start + max(1, size)))


def generate(handle: ModelHandle, prompts: Sequence[list[int]], max_new_tokens: int = 32, batch_size: int = 16,
             on_batch: Callable[[int], None] | None = None, sample: bool = False, seed: int = 0,
             temperature: float = 0.7, banned: Sequence[Collection[int]] | None = None) -> list[str]:
    """Greedy (or seeded sampled) continuations, decoded without special tokens.

    Greedy decoding goes through :func:`shared_prefix.greedy` (shared tokens
    encoded once) where :func:`shared_prefix.verified` says it agrees with
    this model's own ``generate``; otherwise, and for sampling, through
    :func:`plain_generate`.  ``banned`` (one set of token ids per prompt) keeps
    those tokens out of that prompt's continuation (:func:`ban_tokens`; plain path).
    """
    if banned is not None and any(banned):
        return plain_generate(handle, prompts, max_new_tokens, batch_size, on_batch, sample, seed, temperature,
                              banned=banned)
    if not sample and prompts and max_new_tokens > 0:
        from . import shared_prefix

        if shared_prefix.verified(handle, prompts):
            try:
                return shared_prefix.greedy(handle, prompts, max_new_tokens, batch_size, on_batch)
            except shared_prefix.Unsupported:
                pass
    return plain_generate(handle, prompts, max_new_tokens, batch_size, on_batch, sample, seed, temperature)


def plain_generate(handle: ModelHandle, prompts: Sequence[list[int]], max_new_tokens: int = 32,
                   batch_size: int = 16, on_batch: Callable[[int], None] | None = None, sample: bool = False,
                   seed: int = 0, temperature: float = 0.7,
                   banned: Sequence[Collection[int]] | None = None) -> list[str]:
    """:func:`generate` through the model's own ``generate`` (left-padded batches in input order)."""
    import torch

    model, tok = handle.model, handle.tokenizer
    pad = tok.pad_token_id
    out: list[str] = [""] * len(prompts)
    eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None \
        else tok.eos_token_id
    for idx in _batches(len(prompts), batch_size):
        seqs = [prompts[i] for i in idx]
        ids, mask = pad_left(seqs, pad)
        width = ids.shape[1]
        kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos)
        if sample:
            torch.manual_seed(seed + idx.start)
            kwargs.update(do_sample=True, temperature=temperature, top_p=0.95, top_k=50)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if banned is not None and any(banned[i] for i in idx):
            from transformers import LogitsProcessorList

            kwargs["logits_processor"] = LogitsProcessorList([ban_tokens([banned[i] for i in idx])])
        with torch.no_grad():
            dev = handle.input_device
            gen = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), **kwargs)
        for row, i in enumerate(idx):
            out[i] = tok.decode(gen[row, width:], skip_special_tokens=True).strip()
        if on_batch:
            on_batch(len(seqs))
    return out


def ban_tokens(rows: Sequence[Collection[int]]) -> Any:
    """A ``transformers`` logits processor that gives row ``r``'s tokens ``rows[r]`` a score of -inf at every
    step (a per-row ``bad_words_ids`` of single tokens; the library's own applies one list to every row).
    With sampling it runs before temperature and top-p, so a banned token is never drawn."""
    import torch
    from transformers import LogitsProcessor

    class BanTokens(LogitsProcessor):
        def __init__(self) -> None:
            self.index: torch.Tensor | None = None

        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            if self.index is None:
                mask = torch.zeros(scores.shape, dtype=torch.bool)
                for r, toks in enumerate(rows):
                    ok = [t for t in toks if 0 <= t < scores.shape[1]]
                    if ok:
                        mask[r, ok] = True
                self.index = mask.to(scores.device)
            return scores.masked_fill(self.index, float("-inf"))

    return BanTokens()


def _order_and_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches: longest first (little padding), each within a token budget.

    The budget is ``batch_size`` rows of the median length, so a batch of short
    sequences holds up to ``batch_size`` items and one of long sequences fewer;
    ``batch_size`` stays the upper bound on items, and every batch has at least one.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    if not order:
        return []
    size = max(1, batch_size)
    by_len = sorted(lengths)
    budget = size * max(1, by_len[len(by_len) // 2])
    batches: list[list[int]] = []
    cur: list[int] = []
    width = 0
    for i in order:
        w = max(width, lengths[i])
        if cur and (len(cur) >= size or (len(cur) + 1) * w > budget):
            batches.append(cur)
            cur, w = [], lengths[i]
        cur.append(i)
        width = w
    batches.append(cur)
    return batches


def _forward_kwargs(model) -> dict:
    """``logits_to_keep=1`` (or the older ``num_logits_to_keep``) where the model's forward takes it."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in params:
            return {name: 1}
    return {}


def answer_stats(handle: ModelHandle, pairs: Sequence[tuple[list[int], list[int]]], top_k: int = 100,
                 batch_size: int = 16, on_batch: Callable[[int], None] | None = None) -> list[TokenStats]:
    """Teacher-forced statistics of each answer after its prompt, in the order of ``pairs``.

    Through :func:`shared_prefix.answer_stats` (the shared prefix once, each
    distinct prompt once, then its answers) where :func:`shared_prefix.verified`
    says it agrees with :func:`plain_answer_stats` on this model; otherwise
    through the latter.
    """
    if pairs:
        from . import shared_prefix

        if shared_prefix.verified(handle, [p for p, _a in pairs], [a for _p, a in pairs]):
            try:
                return shared_prefix.answer_stats(handle, pairs, top_k, batch_size, on_batch)
            except shared_prefix.Unsupported:
                pass
    return plain_answer_stats(handle, pairs, top_k, batch_size, on_batch)


def plain_answer_stats(handle: ModelHandle, pairs: Sequence[tuple[list[int], list[int]]], top_k: int = 100,
                       batch_size: int = 16, on_batch: Callable[[int], None] | None = None) -> list[TokenStats]:
    """:func:`answer_stats` with one ``prompt + answer`` row per pair.

    Pairs are sorted by length and batched within a token budget (see
    :func:`_order_and_batches`).  Each batch is ONE call of the model itself (so
    wrappers' model-level hooks see the call), asked for the last position's
    logits only; the final norm's output is captured by a hook, the hidden
    states at the answer positions are gathered and only those are unembedded
    (:meth:`Adapter.unembed_logits`, which keeps Gemma 2's soft-capping).
    """
    import torch

    model = handle.model
    adapter = handle.adapter
    pad = handle.tokenizer.pad_token_id
    results: list[TokenStats | None] = [None] * len(pairs)
    live: list[int] = []
    for i, (_p, a) in enumerate(pairs):
        if a:
            live.append(i)
        else:
            results[i] = TokenStats(0.0, 0.0, 0.0, 0)
    if on_batch:  # empty answers need no forward pass; progress still counts them, batch_size at a time
        for idx in _batches(len(pairs) - len(live), batch_size):
            on_batch(len(idx))
    lengths = [len(pairs[i][0]) + len(pairs[i][1]) for i in live]
    extra = _forward_kwargs(model)
    captured: list = []
    hook = adapter.final_norm().register_forward_hook(lambda _m, _args, out: captured.append(out))
    try:
        for group in _order_and_batches(lengths, batch_size):
            idx = [live[g] for g in group]
            batch = [pairs[i] for i in idx]
            # inputs made outside inference mode: wrappers may keep the mask (CallTracker)
            ids, mask = pad_right([list(p) + list(a) for p, a in batch], pad, device=handle.input_device)
            width = ids.shape[1]
            rows, cols, gold_ids = [], [], []
            for r, (p, a) in enumerate(batch):
                start = len(p) - 1
                for j, tok_id in enumerate(a):
                    rows.append(r)
                    cols.append((start + j) % width)   # an empty prompt reads the last column, as before
                    gold_ids.append(tok_id)
            captured.clear()
            with torch.inference_mode():
                out = model(input_ids=ids, attention_mask=mask, use_cache=False, **extra)
                if captured:
                    hidden = captured[-1]
                    hidden = hidden[0] if isinstance(hidden, tuple) else hidden
                    dev = hidden.device
                    r_t = torch.tensor(rows, dtype=torch.long, device=dev)
                    c_t = torch.tensor(cols, dtype=torch.long, device=dev)
                    lg = adapter.unembed_logits(hidden[r_t, c_t]).float()
                else:  # no final-norm output seen: fall back to the model's full logits
                    full = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                    dev = full.device
                    r_t = torch.tensor(rows, dtype=torch.long, device=dev)
                    c_t = torch.tensor(cols, dtype=torch.long, device=dev)
                    lg = full[r_t, c_t].float()
                del out
                gold = torch.tensor(gold_ids, dtype=torch.long, device=dev)[:, None]
                gold_logit = lg.gather(1, gold)
                logp = torch.log_softmax(lg, dim=-1).gather(1, gold).squeeze(1)
                rank = (lg > gold_logit).sum(dim=1) + 1
                hit = (rank <= top_k).float()
                inv = 1.0 / rank.float()
                logp, inv, hit = logp.cpu(), inv.cpu(), hit.cpu()
            sizes = [len(a) for _p, a in batch]
            for i, lp, iv, ht, n in zip(idx, logp.split(sizes), inv.split(sizes), hit.split(sizes), sizes):
                results[i] = TokenStats(float(lp.mean()), float(iv.mean()), float(ht.mean()), n)
            if on_batch:
                on_batch(len(batch))
    finally:
        hook.remove()
    return results  # type: ignore[return-value]
