"""The batched answer statistics (sorted, token-budgeted, answer positions only) equal the per-item path."""

from __future__ import annotations

import pytest
import torch

from unlearn_tui.backends import tiny
from unlearn_tui.backends.generation import _order_and_batches, answer_stats, plain_answer_stats

QUESTIONS = ["Hi", "What is the capital of France?", "Who wrote the play Hamlet?",
             "What is the largest planet in the solar system? Answer the question briefly.", "Sky?",
             "How many days are there in a week?"]
ANSWERS = ["Paris", "William Shakespeare wrote Hamlet.", "Jupiter", "", "The sky is blue on a clear day, as a rule.",
           "seven", "I'm sorry, I don't know the answer to that question. I cannot help with that."]


def _reference(handle, prompt, answer, top_k):
    """One pair, full logits, log-softmax, rank of each gold token: the straightforward way."""
    if not answer:
        return 0.0, 0.0, 0.0, 0
    with torch.no_grad():
        logits = handle.model(input_ids=torch.tensor([prompt + answer], device=handle.device)).logits[0].float()
    rows = logits[len(prompt) - 1: len(prompt) + len(answer) - 1]
    gold = torch.tensor(answer, dtype=torch.long)
    logp = rows.log_softmax(-1).gather(1, gold[:, None]).squeeze(1)
    rank = (rows > rows.gather(1, gold[:, None])).sum(1) + 1
    # float32 means of 1/rank and rank<=k, as answer_stats reports them: equal ranks give equal floats
    return (float(logp.mean()), float((1.0 / rank.float()).mean()), float((rank <= top_k).float().mean()),
            len(answer))


def _pairs(handle):
    out = []
    for qi, q in enumerate(QUESTIONS):
        for ai in range(qi, qi + 3):   # mixed lengths, some answers empty
            ans = ANSWERS[ai % len(ANSWERS)]
            out.append((handle.prompt_ids(q), handle.encode_answer(ans) if ans else []))
    return out


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_batched_answer_stats_equal_one_at_a_time(arch):
    handle = tiny.handle(arch)
    pairs = _pairs(handle)
    lengths = {len(p) + len(a) for p, a in pairs}
    assert len(lengths) > 5  # sorting and padding matter
    for top_k in (1, 5, 100):
        refs = [_reference(handle, p, a, top_k) for p, a in pairs]
        for batch_size in (1, 3, 16):
            seen: list[int] = []
            got = answer_stats(handle, pairs, top_k=top_k, batch_size=batch_size, on_batch=seen.append)
            seen_plain: list[int] = []
            plain = plain_answer_stats(handle, pairs, top_k=top_k, batch_size=batch_size, on_batch=seen_plain.append)
            # progress counts pairs; the plain path's steps are batches of at most batch_size pairs, the
            # shared-prefix path's are groups of at most batch_size prompts with all their answers
            assert sum(seen) == sum(seen_plain) == len(pairs) and max(seen_plain) <= batch_size
            per_prompt = max(sum(1 for q, _a in pairs if q == p) for p, _a in pairs)
            assert max(seen) <= batch_size * per_prompt
            assert len(got) == len(pairs)
            for (p, a), st, (lp, mrr, hit, n) in [*zip(pairs, got, refs), *zip(pairs, plain, refs)]:
                assert st.n_tokens == n == len(a)  # input order: each result has its own pair's length
                # ranks exact: MRR and top-hit are functions of the ranks alone, so they must be equal floats
                assert st.top_hit == hit
                assert st.mrr == mrr
                assert torch.allclose(torch.tensor(st.mean_logprob), torch.tensor(lp), rtol=0, atol=1e-6)
                assert torch.allclose(torch.tensor(st.probability, dtype=torch.float64),
                                      torch.tensor(lp, dtype=torch.float64).exp(), rtol=0, atol=1e-6)


def test_results_follow_input_order_not_length_order():
    handle = tiny.handle("llama")
    pairs = _pairs(handle)
    forward = answer_stats(handle, pairs, batch_size=4)
    backward = answer_stats(handle, pairs[::-1], batch_size=4)
    assert [s.n_tokens for s in forward] == [len(a) for _p, a in pairs]
    assert [(s.n_tokens, s.mrr, s.top_hit) for s in backward[::-1]] == [(s.n_tokens, s.mrr, s.top_hit) for s in forward]
    for a, b in zip(forward, backward[::-1]):
        assert abs(a.mean_logprob - b.mean_logprob) <= 1e-6


def test_batches_respect_item_bound_and_token_budget():
    lengths = [5, 40, 7, 7, 12, 3, 40, 8, 9, 10, 11, 6]
    batches = _order_and_batches(lengths, 4)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    assert all(1 <= len(b) <= 4 for b in batches)
    budget = 4 * sorted(lengths)[len(lengths) // 2]
    assert all(len(b) == 1 or len(b) * max(lengths[i] for i in b) <= budget for b in batches)
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)  # longest first
    assert _order_and_batches([], 4) == []


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_only_answer_positions_are_unembedded(arch):
    handle = tiny.handle(arch)
    pairs = [(p, a) for p, a in _pairs(handle) if a]
    shapes: list[tuple[int, ...]] = []
    hd = handle.adapter.unembed().register_forward_hook(lambda _m, args, _o: shapes.append(tuple(args[0].shape)))
    try:
        plain_answer_stats(handle, pairs, batch_size=len(pairs))   # the path used with wrappers installed
    finally:
        hd.remove()
    d = handle.adapter.hidden_size
    # per batch: the model's own call keeps the last position only, then one [answer tokens, d] unembedding
    calls, gathered = shapes[0::2], shapes[1::2]
    assert len(calls) == len(gathered) >= 1
    assert all(len(c) == 3 and c[1:] == (1, d) for c in calls) and sum(c[0] for c in calls) == len(pairs)
    assert all(len(g) == 2 and g[1] == d for g in gathered)
    assert sum(g[0] for g in gathered) == sum(len(a) for _p, a in pairs)
