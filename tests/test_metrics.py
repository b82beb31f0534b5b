"""Every metric against values computed by hand on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from unlearn_tui.backends.generation import answer_stats, generate
from unlearn_tui.backends.metrics import EvalResult, EvalSettings, SplitScores, evaluate, rouge1_recall, truth_ratio
from tests.conftest import make_items


def _by_hand(handle, question, answer, top_k=100):
    """log-probs and ranks of the answer tokens from one unbatched forward pass."""
    p = handle.prompt_ids(question)
    a = handle.encode_answer(answer)
    with torch.no_grad():
        logits = handle.model(torch.tensor([p + a])).logits[0]
    logps, ranks = [], []
    for j, tok in enumerate(a):
        row = logits[len(p) - 1 + j]
        logps.append(float(row.log_softmax(-1)[tok]))
        ranks.append(int((row > row[tok]).sum()) + 1)
    return logps, ranks


def test_rouge1_recall_by_hand():
    assert rouge1_recall("Paris", "The capital of France is Paris.") == 1.0
    assert rouge1_recall("William Shakespeare", "It was Shakespeare.") == 0.5
    assert rouge1_recall("blue", "I don't know.") == 0.0
    # the stemmer is on: "planets" matches "planet"
    assert rouge1_recall("planets", "a planet") == 1.0


def test_probability_mrr_hit_match_hand_computation(tiny_handle):
    items = make_items(5)
    pairs = [(tiny_handle.prompt_ids(it.question), tiny_handle.encode_answer(it.answer)) for it in items]
    for top_k in (1, 100):
        stats = answer_stats(tiny_handle, pairs, top_k=top_k, batch_size=3)  # padding inside batches
        for it, st in zip(items, stats):
            logps, ranks = _by_hand(tiny_handle, it.question, it.answer)
            assert st.n_tokens == len(logps)
            assert st.probability == pytest.approx(math.exp(sum(logps) / len(logps)), rel=1e-4)
            assert st.mrr == pytest.approx(sum(1 / r for r in ranks) / len(ranks), rel=1e-5)
            assert st.top_hit == pytest.approx(sum(r <= top_k for r in ranks) / len(ranks))


def test_truth_ratio_by_hand():
    gold = math.log(0.5)
    wrong = [math.log(0.1), math.log(0.4)]
    assert truth_ratio(gold, wrong) == pytest.approx(math.sqrt(0.1 * 0.4) / 0.5)
    assert truth_ratio(gold, []) is None


def test_batched_generation_equals_one_at_a_time(tiny_handle):
    prompts = [tiny_handle.prompt_ids(q) for q in ["Hi", "What is the capital of France?", "Who wrote Hamlet?",
                                                    "What colour is the sky on a clear day?"]]
    batched = generate(tiny_handle, prompts, max_new_tokens=6, batch_size=4)
    single = [generate(tiny_handle, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert batched == single
    assert any(batched)


def test_evaluate_split_scores_and_composite(llama_handle):
    items = make_items(6)
    res = evaluate(llama_handle, {"forget": items[:3], "retain": items[3:]}, EvalSettings(max_new_tokens=5,
                                                                                           batch_size=2))
    assert set(res.splits) == {"forget", "retain"}
    f = res.splits["forget"]
    for s in f.items:
        assert s.rouge1 == rouge1_recall(s.answer, s.generation)
        logps, ranks = _by_hand(llama_handle, s.question, s.answer)
        assert s.probability == pytest.approx(math.exp(sum(logps) / len(logps)), rel=1e-4)
        assert s.truth_ratio is not None and s.truth_ratio > 0
    assert res.composite == pytest.approx(1 - f.rouge1 + res.splits["retain"].rouge1)
    summary = res.summary()
    assert summary["forget"]["n"] == 3 and set(summary["forget"]) >= {"rouge1", "probability", "mrr", "top_hit"}


def test_composite_from_known_values():
    from unlearn_tui.backends.metrics import ItemScore

    def split(name, r1s):
        return SplitScores(name, [ItemScore(str(i), "q", "a", "g", r, 0.5, 0.5, 1.0) for i, r in enumerate(r1s)])

    res = EvalResult({"forget": split("forget", [0.0, 0.5]), "retain": split("retain", [1.0, 0.5])})
    assert res.composite == pytest.approx(1 - 0.25 + 0.75)
