"""Model passes behind the membership-inference and fluency metrics.

* :func:`token_logprobs` — per answer token, the teacher-forced log-probability
  of the token and the mean ``mu_t`` and standard deviation ``sigma_t`` of
  ``log p(z)`` under the model's next-token distribution (what Min-K%++ needs),
  from ONE forward pass per batch that unembeds only the answer positions.
* :func:`item_scores` — the LOSS, zlib, Min-K% and Min-K%++ scores of each QA
  item's gold answer after its prompt (formulas in :mod:`backends.field_metrics`).
* :func:`perplexity` — perplexity of a text (the shipped held-out prose,
  :func:`heldout_text`, by default for before/after an edit).

torch is imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from . import field_metrics
from .batching import pad_right
from .generation import _batches, _forward_kwargs, _order_and_batches
from .model import ModelHandle


@dataclass(frozen=True)
class TokenLogprobs:
    """Per answer token: ``log p(x_t)``, ``mu_t = sum_z p(z) log p(z)`` and ``sigma_t`` (std of ``log p(z)``)."""

    logprobs: tuple[float, ...]
    mus: tuple[float, ...]
    sigmas: tuple[float, ...]

    @property
    def n_tokens(self) -> int:
        return len(self.logprobs)


_EMPTY = TokenLogprobs((), (), ())


_CHUNK_ELEMENTS = 1 << 24   # rows of logits handled at once: bounds the [rows, vocab] temporaries


def _position_stats(lg, gold):
    """``(log p(gold), mu, sigma)`` per row of float32 logits ``lg`` [N, V] and gold ids [N]."""
    import torch

    rows = max(1, _CHUNK_ELEMENTS // max(1, lg.shape[-1]))
    if lg.shape[0] > rows:
        parts = [_position_stats(lg[s:s + rows], gold[s:s + rows]) for s in range(0, lg.shape[0], rows)]
        return tuple(torch.cat([part[i] for part in parts]) for i in range(3))
    logp = torch.log_softmax(lg, dim=-1)
    p = logp.exp()
    finite = p > 0   # a logit of -inf (a masked token) has p = 0 and adds nothing
    safe = torch.where(finite, logp, torch.zeros_like(logp))
    mu = (p * safe).sum(dim=-1)
    # sum_z p (log p - mu)^2: the same variance as E[log p^2] - mu^2 without float32 cancellation
    dev = torch.where(finite, safe - mu[:, None], torch.zeros_like(safe))
    sigma = (p * dev * dev).sum(dim=-1).clamp(min=0.0).sqrt()
    tok = logp.gather(1, gold[:, None]).squeeze(1)
    return tok, mu, sigma


def token_logprobs(handle: ModelHandle, pairs: Sequence[tuple[list[int], list[int]]], batch_size: int = 16,
                   on_batch: Callable[[int], None] | None = None) -> list[TokenLogprobs]:
    """Per-token statistics of each answer after its prompt, in the order of ``pairs``.

    Pairs are sorted by length and batched within a token budget
    (:func:`generation._order_and_batches`), right-padded; each batch is ONE
    call of the model itself (inference-time wrappers' hooks see it).  The
    final norm's output is captured by a forward hook and only the answer
    positions are unembedded (:meth:`Adapter.unembed_logits`), in float32.
    An empty answer gives empty tuples; a non-empty answer needs a non-empty
    prompt (its first token has to be predicted from something).
    ``on_batch(n)`` is called after every batch with its number of pairs.
    """
    import torch

    model = handle.model
    adapter = handle.adapter
    pad = handle.tokenizer.pad_token_id
    results: list[TokenLogprobs | None] = [None] * len(pairs)
    live: list[int] = []
    for i, (p, a) in enumerate(pairs):
        if not a:
            results[i] = _EMPTY
        elif not p:
            raise ValueError(f"pair {i}: an answer needs a non-empty prompt before it")
        else:
            live.append(i)
    if on_batch:  # empty answers need no pass; progress still counts them
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
            # inputs made outside inference mode: wrappers may keep the mask
            ids, mask = pad_right([list(p) + list(a) for p, a in batch], pad, device=handle.input_device)
            rows: list[int] = []
            cols: list[int] = []
            gold_ids: list[int] = []
            for r, (p, a) in enumerate(batch):
                for j, tok_id in enumerate(a):
                    rows.append(r)
                    cols.append(len(p) - 1 + j)   # the position that predicts answer token j
                    gold_ids.append(int(tok_id))
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
                else:  # no final-norm output seen: the model's full logits
                    full = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                    dev = full.device
                    r_t = torch.tensor(rows, dtype=torch.long, device=dev)
                    c_t = torch.tensor(cols, dtype=torch.long, device=dev)
                    lg = full[r_t, c_t].float()
                del out
                gold = torch.tensor(gold_ids, dtype=torch.long, device=dev)
                tok, mu, sigma = _position_stats(lg, gold)
                tok, mu, sigma = tok.cpu().tolist(), mu.cpu().tolist(), sigma.cpu().tolist()
            start = 0
            for i, (_p, a) in zip(idx, batch):
                end = start + len(a)
                results[i] = TokenLogprobs(tuple(tok[start:end]), tuple(mu[start:end]), tuple(sigma[start:end]))
                start = end
            if on_batch:
                on_batch(len(batch))
    finally:
        hook.remove()
    return results  # type: ignore[return-value]


def scores_of(tl: TokenLogprobs, text: str, k: float = field_metrics.MINK_K) -> dict[str, float | None]:
    """``{"loss", "zlib", "mink", "minkpp"}`` of one answer (all None for an empty answer)."""
    if not tl.logprobs:
        return {key: None for key in field_metrics.MIA_KEYS}
    return {
        "loss": field_metrics.loss_score(tl.logprobs),
        "zlib": field_metrics.zlib_score(tl.logprobs, text),
        "mink": field_metrics.mink_score(tl.logprobs, k),
        "minkpp": field_metrics.minkpp_score(tl.logprobs, tl.mus, tl.sigmas, k),
    }


def item_scores(handle: ModelHandle, items: Sequence[Any], batch_size: int = 16, k: float = field_metrics.MINK_K,
                on_batch: Callable[[int], None] | None = None) -> list[dict[str, float | None]]:
    """Membership scores of each QA item's gold answer after its prompt (higher = more member-like).

    Per item ``{"loss", "zlib", "mink", "minkpp"}``; zlib compresses the answer
    text.  One :func:`token_logprobs` pass over ``(prompt_ids(question),
    encode_answer(answer))``; an answer that encodes to no tokens scores None.
    """
    pairs = [(handle.prompt_ids(it.question), handle.encode_answer(it.answer)) for it in items]
    stats = token_logprobs(handle, pairs, batch_size, on_batch)
    return [scores_of(tl, it.answer, k) for tl, it in zip(stats, items)]


def perplexity(handle: ModelHandle, text: str, window: int = 256, batch_size: int = 8,
               on_batch: Callable[[int], None] | None = None) -> dict[str, float | int | None]:
    """Perplexity of ``text``: ``exp`` of the mean NLL over every predicted token.

    The text is tokenized without special tokens and split into non-overlapping
    windows of ``window`` tokens; each window is scored on its own, its first
    token as context only, so a window of ``m`` tokens predicts ``m - 1``.
    Returns ``{"perplexity", "tokens"}`` (tokens = predicted tokens; perplexity
    None when there are none).  ``on_batch`` counts windows.
    """
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    ids = list(handle.tokenizer(text, add_special_tokens=False)["input_ids"])
    chunks = [ids[s:s + window] for s in range(0, len(ids), window)]
    pairs = [(c[:1], c[1:]) for c in chunks if len(c) >= 2]
    stats = token_logprobs(handle, pairs, batch_size, on_batch)
    logps = [lp for tl in stats for lp in tl.logprobs]
    if not logps:
        return {"perplexity": None, "tokens": 0}
    nll = -math.fsum(logps) / len(logps)
    return {"perplexity": math.exp(nll), "tokens": len(logps)}


def heldout_text() -> str:
    """The general English prose shipped with the package (``builtin/heldout.txt``), for perplexity."""
    return resources.files("unlearn_tui.backends.builtin").joinpath("heldout.txt").read_text(encoding="utf-8")


__all__ = ["TokenLogprobs", "heldout_text", "item_scores", "perplexity", "scores_of", "token_logprobs"]
