"""Robustness attacks (backends.attacks): multiple choice, in-context demonstrations and relearning,
on tiny random models."""

from __future__ import annotations

import math

import pytest

from tests.conftest import make_items
from unlearn_tui.backends import attacks
from unlearn_tui.backends.data import QAItem
from unlearn_tui.backends.errors import Cancelled, UserError
from unlearn_tui.backends.events import CancelToken, ItemResult, Progress, StageStarted
from unlearn_tui.backends.metrics import EvalSettings, evaluate_split, rouge1_recall

SETTINGS = EvalSettings(max_new_tokens=4, batch_size=4, top_k=100)


def _rich_items() -> list[QAItem]:
    """Items with several perturbed answers, one repeating the gold answer and one repeated."""
    items = make_items(10)
    for i, it in enumerate(items):
        it.perturbed_answers = [f"wrong {i}a", it.answer.upper(), f"wrong {i}b", f"wrong {i}a", f"wrong {i}c",
                                f"wrong {i}d"]
    return items


# --------------------------------------------------------------------------- multiple choice: items


def test_mcq_items_options_gold_once_and_deterministic():
    items = _rich_items()
    a = attacks.mcq_items(items, seed=0, max_options=4)
    assert [m.id for m in a] == [it.id for it in items] and a.skipped == []
    assert a == attacks.mcq_items(items, seed=0, max_options=4)
    # the order depends on (seed, id) only: reversing the input reverses the output
    assert list(reversed(a)) == attacks.mcq_items(list(reversed(items)), seed=0, max_options=4)
    for m, it in zip(a, items):
        assert len(m.options) == 4 and m.letters == ["A", "B", "C", "D"]
        assert m.options.count(it.answer) == 1
        assert sum(o.casefold() == it.answer.casefold() for o in m.options) == 1   # the upper-cased copy dropped
        assert len(set(m.options)) == 4
        assert set(m.options) - {it.answer} <= set(it.perturbed_answers)
        assert m.options[m.letters.index(m.answer)] == it.answer == m.gold_text
        lines = m.question.split("\n")
        assert lines[0] == it.question
        assert lines[1:-1] == [f"{letter}. {opt}" for letter, opt in zip(m.letters, m.options)]
        assert lines[-1] == "Answer with the letter of the correct option."
    # shuffled: the gold answer is not always first, and another seed orders some item differently
    assert len({m.answer for m in a}) > 1
    b = attacks.mcq_items(items, seed=1, max_options=4)
    assert [m.options for m in a] != [m.options for m in b]
    assert all(sorted(x.options) == sorted(y.options) for x, y in zip(a, b))
    # fewer options when asked
    two = attacks.mcq_items(items, seed=0, max_options=2)
    assert all(len(m.options) == 2 and it.answer in m.options for m, it in zip(two, items))


def test_mcq_items_skip_items_without_wrong_answers():
    items = make_items(4)
    items[1].perturbed_answers = []
    items[3].perturbed_answers = [items[3].answer, f"  {items[3].answer.lower()} "]   # only the gold answer again
    out = attacks.mcq_items(items)
    assert [m.id for m in out] == [items[0].id, items[2].id]
    assert out.skipped == [items[1].id, items[3].id]
    with pytest.raises(UserError):
        attacks.mcq_items(items, max_options=1)


# --------------------------------------------------------------------------- multiple choice: scoring


def _one_row_letter_logits(handle, m):
    import torch

    ids = torch.tensor([handle.prompt_ids(m.question)])
    with torch.no_grad():
        full = handle.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].float()
    toks = [handle.encode_answer(letter)[0] for letter in m.letters]
    assert len(set(toks)) == len(toks)
    return full[torch.tensor(toks)]


def test_evaluate_mcq_matches_a_one_row_forward(tiny_handle):
    import torch

    items = make_items(7)
    items[2].perturbed_answers = ["London", "Rome", "Berlin"]    # 4 options beside 3-option items
    mcq = attacks.mcq_items(items, seed=3)
    events = []
    # batch of 3: right padding across prompts of different lengths, and a last partial batch
    scores = attacks.evaluate_mcq(tiny_handle, mcq, EvalSettings(max_new_tokens=3, batch_size=3),
                                  on_event=events.append)
    assert scores.name == "mcq" and [s.id for s in scores.items] == [m.id for m in mcq]
    for m, s in zip(mcq, scores.items):
        sub = _one_row_letter_logits(tiny_handle, m)
        gi = m.letters.index(m.answer)
        assert s.probability == pytest.approx(float(torch.softmax(sub, 0)[gi]), abs=1e-5)
        order = sorted(range(len(sub)), key=lambda j: -float(sub[j]))
        assert s.extra["picked"] == m.letters[order[0]]
        assert s.top_hit == (1.0 if order[0] == gi else 0.0)
        assert s.mrr == pytest.approx(1.0 / (order.index(gi) + 1))
        assert s.extra["chance"] == pytest.approx(1.0 / len(m.letters))
        assert s.answer == m.answer and s.question == m.question
    assert len({round(s.probability, 6) for s in scores.items}) > 1
    results = [e for e in events if isinstance(e, ItemResult)]
    assert [e.item_id for e in results] == [m.id for m in mcq] and {e.split for e in results} == {"mcq"}
    progress = [e for e in events if isinstance(e, Progress) and e.stage == "evaluate mcq"]
    assert progress and progress[-1].done == progress[-1].total == 2 * len(mcq)


def test_evaluate_mcq_generation_and_letter_rule(llama_handle, monkeypatch):
    from unlearn_tui.backends import generation

    mcq = attacks.mcq_items(make_items(3), seed=0)
    wrong = [next(x for x in m.letters if x != m.answer) for m in mcq]
    fake = [f"{mcq[0].answer}. something", f"{wrong[1]}) {mcq[1].gold_text}", f"{wrong[2]}"]
    seen = []

    def fake_generate(handle, prompts, max_new_tokens=32, batch_size=16, on_batch=None, **_kw):
        seen.append((list(prompts), max_new_tokens))
        if on_batch:
            on_batch(len(prompts))
        return list(fake)

    monkeypatch.setattr(generation, "generate", fake_generate)
    scores = attacks.evaluate_mcq(llama_handle, mcq, EvalSettings(max_new_tokens=5, batch_size=2))
    assert seen == [([llama_handle.prompt_ids(m.question) for m in mcq], 5)]
    assert [s.generation for s in scores.items] == fake
    assert scores.items[0].rouge1 == 1.0                                   # starts with the gold letter
    assert rouge1_recall(mcq[1].gold_text, fake[1]) == 1.0 == scores.items[1].rouge1   # the gold text itself
    assert scores.items[2].rouge1 == pytest.approx(rouge1_recall(mcq[2].gold_text, fake[2]))
    assert scores.items[2].rouge1 < 1.0                                    # a wrong letter alone


def test_starts_with_letter():
    assert attacks.starts_with_letter("B", "B")
    assert attacks.starts_with_letter("  B. Paris", "B")
    assert attacks.starts_with_letter("B) x", "B")
    assert not attacks.starts_with_letter("Bob", "B")
    assert not attacks.starts_with_letter("A. B", "B")
    assert not attacks.starts_with_letter("", "B")


class _FakeTokens:
    def __init__(self, table):
        self.table = table

    def encode_answer(self, text):
        return list(self.table[text])


def test_letter_tokens_shared_prefix_fallback(llama_handle):
    prefix, toks = attacks.letter_tokens(llama_handle, ["A", "B", "C"])
    assert prefix == [] and toks == [llama_handle.encode_answer(x)[0] for x in "ABC"]
    # a marker token before every letter is teacher-forced; the letters are read after it
    assert attacks.letter_tokens(_FakeTokens({"A": [7, 10], "B": [7, 11]}), ["A", "B"]) == ([7], [10, 11])
    with pytest.raises(UserError):
        attacks.letter_tokens(_FakeTokens({"A": [7, 10], "B": [7, 10]}), ["A", "B"])
    with pytest.raises(UserError):
        attacks.letter_tokens(_FakeTokens({"A": [7], "B": [7, 11]}), ["A", "B"])


# --------------------------------------------------------------------------- in context


def test_in_context_items_demos_and_format(llama_handle):
    items = make_items(8)
    attacked = items[:3]
    demos = items + make_items(4, prefix="d")
    out = attacks.in_context_items(attacked, demos, k=3, seed=0)
    attacked_ids = {it.id for it in attacked}
    by_id = {d.id: d for d in demos}
    assert [o.id for o in out] == [it.id for it in attacked]
    for o, it in zip(out, attacked):
        ids = o.extra["in_context"]
        assert len(ids) == 3 == len(set(ids))
        assert not set(ids) & attacked_ids and it.id not in ids
        expected = "".join(f"Q: {by_id[i].question}\nA: {by_id[i].answer}\n\n" for i in ids)
        assert o.question == expected + f"Q: {it.question}\nA:"
        assert o.answer == it.answer and o.perturbed_answers == it.perturbed_answers
        assert o.paraphrased_question is None and o.subject == it.subject
    assert out == attacks.in_context_items(attacked, demos, k=3, seed=0)
    assert out == attacks.in_context_items(attacked, list(reversed(demos)), k=3, seed=0)   # pool order is irrelevant
    other = attacks.in_context_items(attacked, demos, k=3, seed=1)
    assert [o.extra["in_context"] for o in other] != [o.extra["in_context"] for o in out]
    assert len({tuple(o.extra["in_context"]) for o in out}) > 1     # drawn per item
    assert all(len(o.extra["in_context"]) == 1 for o in attacks.in_context_items(attacked, demos, k=1))
    with pytest.raises(UserError):
        attacks.in_context_items(attacked, items[:5], k=3)          # only 2 demonstrations outside the attacked
    scores = evaluate_split(llama_handle, "in_context", out, SETTINGS)
    assert scores.name == "in_context" and len(scores.items) == 3


# --------------------------------------------------------------------------- relearning


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _same(model, snap) -> bool:
    import torch

    now = dict(model.named_parameters())
    return set(now) == set(snap) and all(torch.equal(now[n].detach(), snap[n]) for n in snap)


def test_relearn_split_rules():
    items = make_items(5)
    train, held = attacks.relearn_split(items, 0.5)
    assert [i.id for i in train] == ["q0", "q1", "q2"] and [i.id for i in held] == ["q3", "q4"]
    assert attacks.relearn_split(items, 0.5) == (train, held)
    assert len(attacks.relearn_split(items, 0.01)[0]) == 1
    assert len(attacks.relearn_split(items, 0.99)[0]) == 4
    train, held = attacks.relearn_split(items + items[:2], 0.5)       # repeated ids count once
    assert len(train) + len(held) == 5
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(UserError):
            attacks.relearn_split(items, bad)


def test_relearn_needs_two_items(llama_handle):
    with pytest.raises(UserError) as exc:
        attacks.relearn(llama_handle, make_items(1), SETTINGS)
    assert "\n" not in str(exc.value)
    with pytest.raises(UserError):
        attacks.relearn(llama_handle, make_items(3), SETTINGS, epochs=0)


def test_relearn_trains_inside_and_restores_exactly(llama_handle):
    model = llama_handle.model
    items = make_items(5)
    snap = _snapshot(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    changed_during = []
    events = []

    def on_event(e):
        events.append(e)
        if isinstance(e, Progress) and e.stage == "relearn" and e.loss is not None:
            changed_during.append(not _same(model, snap))

    held = items[3:]
    plain = evaluate_split(llama_handle, "forget", held, SETTINGS)
    res = attacks.relearn(llama_handle, items, SETTINGS, lr=5e-3, epochs=2, batch_size=2, on_event=on_event)
    assert _same(model, snap)
    assert not model.training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    # the split
    assert res["train_ids"] == ["q0", "q1", "q2"] and res["held_ids"] == ["q3", "q4"]
    assert not set(res["train_ids"]) & set(res["held_ids"])
    # training really happened, on the weights, inside the call
    assert res["steps"] == 4 == len(changed_during) and all(changed_during)
    assert res["train_nll"][1] < res["train_nll"][0] - 1e-3
    assert len(res["train_loss"]) == 2 and all(math.isfinite(v) for v in res["train_loss"])
    assert res["epochs"] == 2 and res["lr"] == 5e-3 and res["seconds"] > 0
    # before is a plain evaluation of the held items
    assert res["before"] == pytest.approx(plain.rouge1)
    assert res["before_probability"] == pytest.approx(plain.mean("probability"))
    assert 0.0 <= res["after"] <= 1.0
    assert res["after_probability"] != pytest.approx(res["before_probability"], rel=1e-6, abs=0)
    # progress: one relearn stage over the steps and the two evaluations; no per-item results of them
    prog = [e for e in events if isinstance(e, Progress) and e.stage == "relearn"]
    assert prog[-1].done == prog[-1].total == 4 + 2
    assert not any(isinstance(e, ItemResult) for e in events)
    # a second run from the restored weights repeats the first exactly (seeded, deterministic)
    again = attacks.relearn(llama_handle, items, SETTINGS, lr=5e-3, epochs=2, batch_size=2)
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in res.items() if k != "seconds"}
    assert _same(model, snap)


def test_relearn_cancel_midway_restores(tiny_handle):
    llama_handle = tiny_handle     # every tiny family (gpt2: Conv1D, qwen2: untied unembedding)
    model = llama_handle.model
    snap = _snapshot(model)
    token = CancelToken()
    changed = []

    def on_event(e):
        if isinstance(e, Progress) and e.stage == "relearn" and e.loss is not None:
            changed.append(not _same(model, snap))
            token.cancel()

    with pytest.raises(Cancelled):
        attacks.relearn(llama_handle, make_items(6), SETTINGS, lr=5e-3, batch_size=1, on_event=on_event,
                        cancel=token)
    assert changed == [True]          # stopped after the first step, which had changed the weights
    assert _same(model, snap)
    assert not model.training and all(not p.requires_grad and p.grad is None for p in model.parameters())


def test_relearn_failure_after_training_restores(llama_handle):
    model = llama_handle.model
    model.train()                     # found in train mode: left in train mode, trained in eval mode
    snap = _snapshot(model)
    starts = []
    modes = []

    def on_event(e):
        if isinstance(e, Progress) and e.stage == "relearn" and e.loss is not None:
            modes.append(model.training)
        if isinstance(e, StageStarted) and e.stage.startswith("evaluate"):
            starts.append(e.stage)
            if len(starts) == 2:      # the evaluation after training
                assert not _same(model, snap)
                raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        attacks.relearn(llama_handle, make_items(4), SETTINGS, lr=5e-3, on_event=on_event)
    assert modes and not any(modes)
    assert model.training
    assert _same(model, snap)
    assert all(p.grad is None for p in model.parameters())


class _CountingWrapper:
    """A stateful inference-time wrapper: a forward hook on the model counting the calls in its state."""

    name = "counter"

    def __init__(self):
        self.calls = 0
        self.hook = None

    def install(self, handle):
        self.hook = handle.model.register_forward_hook(self._count)

    def remove(self, handle):
        if self.hook is not None:
            self.hook.remove()
            self.hook = None

    def _count(self, _m, _a, _o):
        self.calls += 1

    def get_state(self):
        return {"calls": self.calls}

    def set_state(self, state):
        self.calls = state["calls"]


def test_relearn_trains_through_wrappers_and_restores_their_state(llama_handle):
    import torch

    w = _CountingWrapper()
    llama_handle.add_wrapper(w)
    snap = _snapshot(llama_handle.model)
    seen = []

    def on_event(e):
        if isinstance(e, Progress) and e.stage == "relearn" and e.loss is not None:
            seen.append(w.calls)

    attacks.relearn(llama_handle, make_items(4), SETTINGS, lr=5e-3, on_event=on_event)
    assert seen and seen[0] > 0                      # the training forward passes went through the hook
    assert w.calls == 0 and llama_handle.wrappers == [w]
    assert _same(llama_handle.model, snap)
    ids = torch.tensor([llama_handle.prompt_ids("Still installed?")])
    with torch.no_grad():
        llama_handle.model(input_ids=ids)
    assert w.calls == 1


# few iterations: the edits only need to install a wrapper with state, not to succeed
EDITORS = {"grace": {"n_iter": 20, "edit_lr": 0.3},
           "wise": {"n_iter": 20, "edit_lr": 0.05, "norm_constraint": 1.0, "act_margin": [0.01, 0.2, 0.1],
                    "first_token_weight": 0.0, "above_out_of_scope": False}}


@pytest.mark.parametrize("editor", sorted(EDITORS))
def test_relearn_through_an_edit_wrapper_restores_it(llama_handle, editor):
    import torch

    from unlearn_tui.backends.methods import make
    from unlearn_tui.backends.runner import EditContext
    from unlearn_tui.backends.targets import Request

    items = make_items(4)
    reqs = [Request(prompt=items[0].question, target="I don't know.", subject=items[0].subject,
                    item_ids=[items[0].id])]
    m = make(editor, EDITORS[editor])
    with llama_handle.transaction(m.touched_parameters(llama_handle)):
        m.apply(llama_handle, reqs, EditContext(lambda e: None, CancelToken(), [], [], {}, seed=0))
    assert llama_handle.wrappers
    wrappers = list(llama_handle.wrappers)
    states = [dict(x.get_state()) for x in wrappers]
    snap = _snapshot(llama_handle.model)
    res = attacks.relearn(llama_handle, items, SETTINGS, lr=5e-3)   # GRACE: its cached codebook stack was
    assert res["train_nll"][1] < res["train_nll"][0]                # built in inference mode by the evaluation
    assert llama_handle.wrappers == wrappers and _same(llama_handle.model, snap)
    for x, before in zip(wrappers, states):
        now = x.get_state()
        assert set(now) == set(before)
        for k, v in before.items():
            assert torch.equal(now[k], v) if isinstance(v, torch.Tensor) else now[k] == v
