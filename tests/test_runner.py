"""The runner on a tiny model: runs, cancel with exact rollback, step mode, probe, IKE."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from unlearn_tui import sessions
from unlearn_tui.backends import methods
from unlearn_tui.backends.errors import Cancelled, UserError
from unlearn_tui.backends.events import CancelToken, Progress, RunFinished, StageStarted, Tracker
from unlearn_tui.backends.model import state_hash
from unlearn_tui.backends.params import param
from unlearn_tui.backends.runner import Workbench, run
from tests.test_cli import write_facts


class Scribble:
    """A test method: adds noise to one MLP output projection per request, checking cancel."""

    name: ClassVar[str] = "_scribble"
    summary: ClassVar[str] = "test"
    needs_retain: ClassVar[bool] = False

    @dataclass
    class Params:
        layer: int = param(1, "layer")
        scale: float = param(0.5, "noise scale")
        cancel_after: int = param(-1, "cancel after this many requests (-1: never)")

    def __init__(self, params):
        self.params = params

    def touched_parameters(self, handle):
        return [handle.adapter.mlp_out_weight_name(self.params.layer)]

    def apply(self, handle, requests, ctx):
        tr = Tracker(ctx.on_event, ctx.cancel, "scribble", len(requests))
        w = handle.parameter(self.touched_parameters(handle)[0])
        g = torch.Generator().manual_seed(len(requests))
        for i, _ in enumerate(requests):
            with torch.no_grad():
                w.add_(torch.randn(w.shape, generator=g) * self.params.scale)
            if i == self.params.cancel_after:
                ctx.cancel.cancel()
            tr.step()
        return {"edits": len(requests)}


@pytest.fixture
def scribble(monkeypatch):
    monkeypatch.setitem(methods._MODULES, "_scribble", __name__)
    monkeypatch.setitem(methods._REGISTRY, "_scribble", Scribble)
    return Scribble


def make_session(tmp_path, runs, **data):
    write_facts(tmp_path / "facts.jsonl")
    s = sessions.new_session(model={"name": "tiny:llama"},
                             data=dict({"path": "facts.jsonl", "forget": 3, "retain": 3}, **data),
                             eval={"max_new_tokens": 5, "batch_size": 4}, runs=runs)
    s.path = tmp_path / "s.toml"
    return s


def prepared(session):
    wb = Workbench(session)
    wb.load_data()
    return wb.prepare(paraphrases=False)


def test_runs_start_from_the_unedited_model_and_events_flow(tmp_path, scribble):
    s = make_session(tmp_path, [{"method": "_scribble"}, {"method": "none"}])
    events = []
    res = run(s, events.append)
    assert [r.method for r in res.runs] == ["_scribble", "none"]
    # the edit changed the model, and the next run started from the original weights again
    assert res.runs[1].eval.summary() == res.baseline.summary()
    assert res.runs[0].eval.summary() != res.baseline.summary()
    assert any(isinstance(e, StageStarted) and e.stage == "scribble" for e in events)
    prog = [e for e in events if isinstance(e, Progress) and e.stage == "scribble"]
    assert [p.done for p in prog] == [1, 2, 3] and all(p.total == 3 for p in prog)
    assert prog[-1].eta_s == 0.0
    assert sum(isinstance(e, RunFinished) for e in events) == 2


def test_cancel_during_an_edit_restores_weights_exactly(tmp_path, scribble):
    s = make_session(tmp_path, [{"method": "_scribble", "params": {"cancel_after": 1}}])
    wb = Workbench(s)
    wb.load_data()
    wb.load_model()
    before = state_hash(wb.handle.model)
    with pytest.raises(Cancelled):
        wb.run_one(0, s.runs[0])
    assert state_hash(wb.handle.model) == before


def test_step_mode_undo_redo_and_probe(tmp_path, scribble):
    s = make_session(tmp_path, [{"method": "_scribble", "params": {"scale": 2.0}}])
    wb = Workbench(s)
    wb.load_data()
    wb.load_model()
    h0 = state_hash(wb.handle.model)
    reqs = wb.prepare().requests
    assert len(reqs) == 3
    q = "What is the capital of France?"
    base_answer = wb.probe(q)[0]
    wb.step(s.runs[0], reqs[0])
    h1 = state_hash(wb.handle.model)
    wb.step(s.runs[0], reqs[1])
    h2 = state_hash(wb.handle.model)
    assert len({h0, h1, h2}) == 3
    edited, original = wb.probe(q)
    assert original == base_answer
    assert state_hash(wb.handle.model) == h2  # probing the original put every edit back
    assert wb.undo() and state_hash(wb.handle.model) == h1
    assert wb.undo() and state_hash(wb.handle.model) == h0
    assert not wb.undo()
    assert wb.redo() and state_hash(wb.handle.model) == h1
    assert wb.redo() and state_hash(wb.handle.model) == h2
    assert not wb.redo()


def test_merge_factor_groups_requests(tmp_path):
    s = make_session(tmp_path, [{"method": "none"}], forget=5, retain=1)
    s.targets.merge_factor = 2
    reqs = prepared(s).requests
    assert [r.item_ids for r in reqs] == [["f0", "f1"], ["f2", "f3"], ["f4"]]
    assert reqs[0].prompt == "What is the capital of France? Who wrote the play Hamlet?"
    assert reqs[0].subject == "Hamlet"  # the last question's subject
    # idk targets are deterministic for a seed and change with it
    t1 = {k: v.text for k, v in prepared(s).targets.items()}
    assert t1 == {k: v.text for k, v in prepared(s).targets.items()}
    s.targets.seed = 123
    assert t1 != {k: v.text for k, v in prepared(s).targets.items()}


def test_hand_edited_targets_win_and_custom_mode_needs_them(tmp_path):
    s = make_session(tmp_path, [{"method": "none"}])
    s.set_target("f1", "Nope, not telling.", source="custom")
    t = prepared(s).targets
    assert t["f1"].text == "Nope, not telling." and t["f1"].source == "custom"
    assert t["f0"].source == "pool"
    s.targets.mode = "custom"
    with pytest.raises(UserError, match='item "f0" has no custom target'):
        prepared(s)


def test_ike_prompts_never_contain_gold_answers(tmp_path):
    s = make_session(tmp_path, [{"method": "ike", "params": {"k": 3, "min_similarity": 0.0}}])
    wb = Workbench(s)
    wb.load_data()
    wb.load_model()
    tx, _, report, _ = wb.apply(s.runs[0], keep=True)
    assert report["demonstrations"] == 3
    answers = [it.answer for it in wb.items]
    for it in wb.items:  # forget, retain and unrelated questions alike
        prompt = wb.handle.format_prompt(it.question)
        assert "Refusal:" in prompt
        for a in answers:
            assert a not in prompt.replace(it.question, ""), (it.id, a)
    tx.undo()
    assert "Refusal:" not in wb.handle.format_prompt(wb.items[0].question)


def test_ike_retrieves_the_most_similar_demonstration():
    from unlearn_tui.backends.methods.ike import IKEWrapper

    w = IKEWrapper([("What is the capital of France?", "R1"), ("Who wrote Hamlet?", "R2")], k=1,
                   min_similarity=0.1, instruction="I")
    assert "R2" in w.transform_question("Who is the author of Hamlet?")
    assert "R1" not in w.transform_question("Who is the author of Hamlet?")
    assert w.transform_question("Completely unrelated words") == "Completely unrelated words"


def test_needs_retain_is_a_clear_error(tmp_path, scribble, monkeypatch):
    monkeypatch.setattr(Scribble, "needs_retain", True)
    s = make_session(tmp_path, [{"method": "_scribble"}], retain=0)
    with pytest.raises(UserError, match="needs retain data"):
        run(s)


def test_step_next_undo_redo_flows_headless(tmp_path, scribble):
    """The flows the app's step / undo / redo jobs call: weights move and come back exactly, scores follow."""
    s = make_session(tmp_path, [{"method": "_scribble", "params": {"scale": 2.0}}])
    s.data.rephrase = False
    wb = Workbench(s)
    wb.load_data()
    wb.load_model()
    h0 = state_hash(wb.handle.model)
    base = wb.quick_scores()
    assert set(base) == {"forget", "retain"}
    q = "What is the capital of France?"
    first = wb.step_next(question=q)
    h1 = state_hash(wb.handle.model)
    assert (first.k, first.n) == (1, 3) and h1 != h0
    assert first.probe[0] == q and first.probe[2] == wb.probe(q)[1]        # (question, edited, unedited)
    assert first.quick == wb.quick_scores()
    second = wb.step_next()                  # no question: the request's own is probed
    h2 = state_hash(wb.handle.model)
    assert second.k == 2 and second.probe[0] == wb.prepared.requests[1].questions[0] and h2 not in (h0, h1)
    back = wb.undo(score=True, question=q)
    assert back.k == 1 and back.n == 3 and state_hash(wb.handle.model) == h1
    assert back.quick == first.quick and back.probe == first.probe         # the same model, the same answers
    assert wb.undo().k == 0 and state_hash(wb.handle.model) == h0
    assert wb.undo() is None                 # nothing left
    assert wb.quick_scores() == base
    again = wb.redo(score=True)
    assert again.k == 1 and state_hash(wb.handle.model) == h1 and again.quick == first.quick and again.probe is None
    assert wb.redo().k == 2 and state_hash(wb.handle.model) == h2 and wb.redo() is None
    wb.step_next()
    with pytest.raises(UserError, match="all 3 forget request"):
        wb.step_next()
    # run_all undoes the kept edits first and every run starts from the unedited model
    res = wb.run_all()
    assert res.undone == 3 and state_hash(wb.handle.model) == h0 and wb.undo_stack == []


def test_run_all_is_what_run_does_and_never_writes_the_session(tmp_path, scribble):
    import copy

    s = make_session(tmp_path, [{"method": "_scribble"}, {"method": "none"}])
    before = copy.deepcopy(s)
    headless = run(s)
    assert s == before                                   # the engine returns records, it stores nothing
    wb = Workbench(s)
    wb.load_data()
    res = wb.run_all()
    assert [r.to_json() | {"seconds": 0, "eval_seconds": 0} for r in res.runs] == \
        [r.to_json() | {"seconds": 0, "eval_seconds": 0} for r in headless.runs]
    assert res.targets == headless.targets and res.new_targets == [] and res.new_paraphrases == []
    assert s == before


def test_a_none_run_reuses_the_baseline_instead_of_evaluating_again(tmp_path, scribble, monkeypatch):
    from unlearn_tui.backends import runner

    calls = []
    real = runner.evaluate
    monkeypatch.setattr(runner, "evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
    s = make_session(tmp_path, [{"method": "none"}, {"method": "_scribble"}, {"method": "none"}],
                     rephrase=False)
    result = run(s)
    assert len(calls) == 2                              # the baseline and the scribble run, nothing else
    base = result.baseline.summary()
    assert result.runs[0].eval.summary() == base and result.runs[2].eval.summary() == base
    assert result.runs[1].eval.summary() != base        # the edit was scored on its own
