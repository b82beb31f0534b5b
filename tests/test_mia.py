"""Model passes of backends.mia against naive one-row-at-a-time computations on tiny models."""

from __future__ import annotations

import math

import pytest
from conftest import make_items

from unlearn_tui.backends import field_metrics as fm
from unlearn_tui.backends import generation, mia


def _naive(handle, prompt, answer):
    """Full logits of the one unpadded row; per answer token (log p, mu, sigma) in float64."""
    import torch

    ids = torch.tensor([list(prompt) + list(answer)], dtype=torch.long, device=handle.input_device)
    with torch.no_grad():
        logits = handle.model(input_ids=ids).logits[0].double()
    out = []
    for j, tok in enumerate(answer):
        logp = torch.log_softmax(logits[len(prompt) - 1 + j], dim=-1)
        p = logp.exp()
        mu = float((p * logp).sum())
        sigma = math.sqrt(max(0.0, float((p * logp * logp).sum()) - mu * mu))
        out.append((float(logp[tok]), mu, sigma))
    return out


def _pairs(handle):
    qs = ["What is the capital of France?", "Who wrote Hamlet?", "Sky colour?", "How many days are in a week?",
          "Which element has the symbol O?"]
    ans = ["Paris", "William Shakespeare wrote the play Hamlet.", "blue", "seven", ""]
    pairs = [(handle.prompt_ids(q), handle.encode_answer(a)) for q, a in zip(qs, ans)]
    # one prompt with two answers, and a long raw one (different lengths -> padding, several batches)
    pairs.append((handle.prompt_ids(qs[0]), handle.encode_answer("The capital of France is Paris.")))
    pairs.append((handle.encode_prompt("The quick brown fox jumps over the lazy dog."),
                  handle.encode_answer("Answer the question briefly, I cannot help with that.")))
    return pairs


def test_token_logprobs_equal_naive_full_logits(tiny_handle):
    pairs = _pairs(tiny_handle)
    seen = []
    got = mia.token_logprobs(tiny_handle, pairs, batch_size=2, on_batch=seen.append)
    assert len(got) == len(pairs)
    assert sum(seen) == len(pairs) and len(seen) >= 3     # several batches, every pair counted once
    for (p, a), tl in zip(pairs, got):
        assert len(tl.logprobs) == len(tl.mus) == len(tl.sigmas) == len(a)
        if not a:
            assert tl == mia.TokenLogprobs((), (), ())
            continue
        want = _naive(tiny_handle, p, a)
        assert tl.logprobs == pytest.approx([w[0] for w in want], abs=2e-5)
        assert tl.mus == pytest.approx([w[1] for w in want], abs=2e-5)
        assert tl.sigmas == pytest.approx([w[2] for w in want], abs=2e-5)
        # the gold token is one outcome of the distribution: sigma > 0 for a random model
        assert all(s > 0 for s in tl.sigmas)


def test_token_logprobs_mean_equals_plain_answer_stats(tiny_handle):
    pairs = _pairs(tiny_handle)
    got = mia.token_logprobs(tiny_handle, pairs, batch_size=3)
    stats = generation.plain_answer_stats(tiny_handle, pairs, batch_size=3)
    for (_p, a), tl, st in zip(pairs, got, stats):
        assert len(tl.logprobs) == st.n_tokens
        if a:
            assert sum(tl.logprobs) / len(tl.logprobs) == pytest.approx(st.mean_logprob, abs=1e-5)


def test_token_logprobs_batching_does_not_change_results(llama_handle):
    pairs = _pairs(llama_handle)
    one = mia.token_logprobs(llama_handle, pairs, batch_size=1)
    many = mia.token_logprobs(llama_handle, pairs, batch_size=16)
    for a, b in zip(one, many):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
        assert a.sigmas == pytest.approx(b.sigmas, abs=1e-5)


def test_token_logprobs_one_model_call_per_batch_and_hooks_apply(llama_handle):
    import torch

    pairs = _pairs(llama_handle)
    live = [len(p) + len(a) for p, a in pairs if a]
    n_batches = len(generation._order_and_batches(live, 2))
    calls = []
    h = llama_handle.model.register_forward_pre_hook(lambda _m, _a: calls.append(1))
    try:
        base = mia.token_logprobs(llama_handle, pairs, batch_size=2)
    finally:
        h.remove()
    assert len(calls) == n_batches
    # a hook on an inner module (as inference-time wrappers install) changes what the pass sees
    mlp = llama_handle.adapter.mlp_out(1)
    h = mlp.register_forward_hook(lambda _m, _a, out: out + torch.ones_like(out))
    try:
        hooked = mia.token_logprobs(llama_handle, pairs, batch_size=2)
        want = _naive(llama_handle, *pairs[0])
    finally:
        h.remove()
    assert hooked[0].logprobs == pytest.approx([w[0] for w in want], abs=2e-5)
    assert hooked[0].logprobs != pytest.approx(base[0].logprobs, abs=1e-4)


def test_token_logprobs_rejects_answer_without_prompt(llama_handle):
    with pytest.raises(ValueError):
        mia.token_logprobs(llama_handle, [([], [5, 6])])
    assert mia.token_logprobs(llama_handle, []) == []


def test_token_logprobs_follow_model_dtype(llama_handle):
    import torch

    pairs = _pairs(llama_handle)[:3]
    ref = mia.token_logprobs(llama_handle, pairs)
    llama_handle.model.to(torch.bfloat16)
    low = mia.token_logprobs(llama_handle, pairs)
    for a, b in zip(ref, low):
        assert all(math.isfinite(x) for x in b.logprobs + b.mus + b.sigmas)
        assert b.logprobs == pytest.approx(a.logprobs, abs=0.1)


def test_item_scores_combine_token_logprobs(llama_handle):
    items = make_items(4)
    got = mia.item_scores(llama_handle, items, batch_size=2)
    assert len(got) == 4
    for it, sc in zip(items, got):
        assert set(sc) == {"loss", "zlib", "mink", "minkpp"}
        p, a = llama_handle.prompt_ids(it.question), llama_handle.encode_answer(it.answer)
        want = _naive(llama_handle, p, a)
        lps = [w[0] for w in want]
        assert sc["loss"] == pytest.approx(sum(lps) / len(lps), abs=2e-5)
        assert sc["zlib"] == pytest.approx(fm.loss_score(lps) / fm.zlib_length(it.answer), abs=2e-5)
        assert sc["mink"] == pytest.approx(fm.mink_score(lps, 0.4), abs=2e-5)
        assert sc["minkpp"] == pytest.approx(fm.minkpp_score(lps, [w[1] for w in want], [w[2] for w in want], 0.4),
                                             abs=1e-4)
    # k reaches the scores: k = 1 makes Min-K% the plain mean
    full = mia.item_scores(llama_handle, items[:1], k=1.0)[0]
    assert full["mink"] == pytest.approx(full["loss"], abs=1e-6)


def test_perplexity_equals_hand_loop(tiny_handle):
    import torch

    text = ("The sky is blue. Jupiter is the largest planet. There are seven days in a week. "
            "William Shakespeare wrote Hamlet.")
    ids = list(tiny_handle.tokenizer(text, add_special_tokens=False)["input_ids"])
    window = 9
    nll, count = 0.0, 0
    for s in range(0, len(ids), window):
        w = ids[s:s + window]
        if len(w) < 2:
            continue
        x = torch.tensor([w], device=tiny_handle.input_device)
        with torch.no_grad():
            lp = torch.log_softmax(tiny_handle.model(input_ids=x).logits[0].double(), dim=-1)
        for t in range(1, len(w)):
            nll -= float(lp[t - 1, w[t]])
            count += 1
    seen = []
    got = mia.perplexity(tiny_handle, text, window=window, batch_size=2, on_batch=seen.append)
    assert got["tokens"] == count == len(ids) - math.ceil(len(ids) / window)
    assert got["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)
    assert sum(seen) == sum(1 for s in range(0, len(ids), window) if len(ids[s:s + window]) >= 2)
    assert mia.perplexity(tiny_handle, "") == {"perplexity": None, "tokens": 0}
    with pytest.raises(ValueError):
        mia.perplexity(tiny_handle, text, window=1)


def test_heldout_text_ships_with_the_package(llama_handle):
    text = mia.heldout_text()
    words = text.split()
    assert 700 <= len(words) <= 900
    assert text.isascii()
    got = mia.perplexity(llama_handle, text, window=128)
    assert got["tokens"] > 1000
    assert math.isfinite(got["perplexity"]) and got["perplexity"] > 1


def test_position_stats_in_row_chunks_match_whole(llama_handle, monkeypatch):
    pairs = _pairs(llama_handle)
    whole = mia.token_logprobs(llama_handle, pairs)
    vocab = llama_handle.model.config.vocab_size
    monkeypatch.setattr(mia, "_CHUNK_ELEMENTS", 3 * vocab)   # three rows at a time
    chunked = mia.token_logprobs(llama_handle, pairs)
    for a, b in zip(whole, chunked):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-6)
        assert a.mus == pytest.approx(b.mus, abs=1e-6)
        assert a.sigmas == pytest.approx(b.sigmas, abs=1e-6)
