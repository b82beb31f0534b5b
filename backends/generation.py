"""Batched greedy generation and batched teacher-forced answer statistics.

Both take token-id lists (prompts already formatted by the handle), so the
same code serves metrics, targets (self-improvement) and the probe.

* :func:`generate` left-pads a batch and decodes greedily.
* :func:`answer_stats` right-pads ``prompt + answer`` sequences and, from ONE
  forward pass per batch, returns for every pair the mean log-probability of
  the answer tokens, the mean reciprocal rank of each gold token and the share
  of gold tokens ranked within ``top_k``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

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
             temperature: float = 0.7) -> list[str]:
    """Greedy (or seeded sampled) continuations, decoded without special tokens."""
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
        with torch.no_grad():
            gen = model.generate(input_ids=ids.to(handle.device), attention_mask=mask.to(handle.device), **kwargs)
        for row, i in enumerate(idx):
            out[i] = tok.decode(gen[row, width:], skip_special_tokens=True).strip()
        if on_batch:
            on_batch(len(seqs))
    return out


def answer_stats(handle: ModelHandle, pairs: Sequence[tuple[list[int], list[int]]], top_k: int = 100,
                 batch_size: int = 16, on_batch: Callable[[int], None] | None = None) -> list[TokenStats]:
    """Teacher-forced statistics of each answer after its prompt."""
    import torch

    model = handle.model
    pad = handle.tokenizer.pad_token_id
    results: list[TokenStats] = []
    for idx in _batches(len(pairs), batch_size):
        batch = [pairs[i] for i in idx]
        ids, mask = pad_right([list(p) + list(a) for p, a in batch], pad)
        with torch.no_grad():
            logits = model(input_ids=ids.to(handle.device), attention_mask=mask.to(handle.device)).logits
        for row, (p, a) in enumerate(batch):
            if not a:
                results.append(TokenStats(0.0, 0.0, 0.0, 0))
                continue
            pos = torch.arange(len(p) - 1, len(p) + len(a) - 1, device=logits.device)
            lg = logits[row, pos].float()
            gold = torch.tensor(a, dtype=torch.long, device=lg.device)
            gold_logit = lg.gather(1, gold[:, None])
            logp = torch.log_softmax(lg, dim=-1).gather(1, gold[:, None]).squeeze(1)
            rank = (lg > gold_logit).sum(dim=1) + 1
            results.append(TokenStats(float(logp.mean()), float((1.0 / rank.float()).mean()),
                                      float((rank <= top_k).float().mean()), len(a)))
        if on_batch:
            on_batch(len(batch))
    return results
