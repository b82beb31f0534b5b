"""Workbench.set_selection (the one way the forget/retain selection is written) and the app's use of it."""

from __future__ import annotations

import dataclasses
import json

import pytest

from unlearn_tui import sessions
from unlearn_tui.backends.errors import UserError
from unlearn_tui.backends.runner import Workbench
from unlearn_tui.sessions import Paraphrase
from tests.conftest import make_items


def bench(n: int = 6, **data) -> Workbench:
    s = sessions.new_session(data=data) if data else sessions.new_session()
    wb = Workbench(s)
    wb.items = make_items(n)
    return wb


def ids(items) -> list[str]:
    return [it.id for it in items]


def test_set_selection_keeps_order_and_rebuilds_rephrase():
    wb = bench()
    wb.set_selection(["q3", "q1", "q3"], ["q0", "q5"])      # a repeat is dropped, order kept
    assert ids(wb.forget) == ["q3", "q1"] and ids(wb.retain) == ["q0", "q5"]
    assert ids(wb.rephrase) == ["q3", "q1"]
    assert wb.rephrase[0].question == "Tell me about oxygen."
    wb.set_selection([], [])                                  # empty sets are allowed (the app starts so)
    assert wb.forget == [] and wb.retain == [] and wb.rephrase == []


@pytest.mark.parametrize("forget, retain, where, named", [
    (["q1", "nope"], ["q2"], "data.forget", "nope"),
    (["q1"], ["q2", "zz9"], "data.retain", "zz9"),
    (["q1", "q2"], ["q3", "q2"], "data.retain", "q2"),       # in both sets
])
def test_set_selection_errors_name_the_id_and_change_nothing(forget, retain, where, named):
    wb = bench()
    wb.set_selection(["q0"], ["q4"])
    prepared = wb.prepare(paraphrases=False)
    with pytest.raises(UserError) as err:
        wb.set_selection(forget, retain)
    assert err.value.where == where and named in str(err.value)
    assert ids(wb.forget) == ["q0"] and ids(wb.retain) == ["q4"]
    assert wb.prepared is prepared                            # the prepared state survived the failed call


def test_set_selection_error_for_an_id_in_both_sets_says_so():
    wb = bench()
    with pytest.raises(UserError, match="both the forget and the retain set"):
        wb.set_selection(["q1"], ["q1"])


def test_set_selection_invalidates_the_prepared_state_as_a_whole():
    wb = bench()
    wb.set_selection(["q0", "q1"], ["q2"])
    assert wb.prepared is None
    with pytest.raises(RuntimeError, match="prepare"):        # getters never compute anything
        wb.requests()
    first = wb.prepare()                                      # every item has a paraphrase: no model needed
    assert wb.handle is None and first.paraphrased and first.new_paraphrases == ()
    assert set(first.targets) == {"q0", "q1"} and wb.targets() == dict(first.targets)
    assert [r.questions for r in first.requests] == [[wb.forget[0].question], [wb.forget[1].question]]
    assert wb.prepare() is first                              # cached
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.requests = ()                                   # frozen
    wb.set_selection(["q0", "q1"], ["q3"])                    # the retain set changed: a new state
    assert wb.prepared is None
    wb.set_selection(["q4"], ["q3"])
    second = wb.prepare(paraphrases=False)
    assert second is not first and set(second.targets) == {"q4"} and not second.paraphrased
    assert [r.questions for r in second.requests] == [["What do you know about the week?"]]
    wb.session.set_target("q4", "No idea.", source="custom")  # the session's targets changed: dropped too
    assert wb.prepared is None and wb.prepare(paraphrases=False).targets["q4"].text == "No idea."


def test_set_selection_applies_session_subjects_and_paraphrases_to_copies():
    wb = bench(subjects={"q1": "Prince Hamlet"}, paraphrases=[Paraphrase("q2", "Who is in charge of oxygen?",
                                                                          "custom")])
    loaded = {it.id: it for it in wb.items}
    wb.set_selection(["q1", "q2"], [])
    assert wb.forget[0].subject == "Prince Hamlet" and loaded["q1"].subject == "Hamlet"
    assert wb.forget[1].paraphrased_question == "Who is in charge of oxygen?"
    assert loaded["q2"].paraphrased_question == "Tell me about Jupiter."       # the loaded item is untouched
    assert wb.rephrase[1].question == "Who is in charge of oxygen?"


def test_set_selection_needs_the_data_and_load_data_selects(tmp_path):
    p = tmp_path / "facts.json"
    p.write_text(json.dumps([{"id": f"f{i}", "question": f"Q{i}?", "answer": f"A{i}"} for i in range(4)]))
    s = sessions.new_session(data={"path": str(p), "forget": 1, "retain": 1})
    wb = Workbench(s)
    with pytest.raises(UserError, match="no data loaded"):    # a setter never loads behind the caller's back
        wb.set_selection(["f3"], ["f0", "f1"])
    wb.load_data()
    assert len(wb.items) == 4 and ids(wb.forget) == ["f0"] and ids(wb.retain) == ["f1"]
    wb.set_selection(["f3"], ["f0", "f1"])
    assert ids(wb.forget) == ["f3"] and ids(wb.retain) == ["f0", "f1"]


# ------------------------------------------------------------------ the app's jobs go through set_selection
def _app(tmp_path):
    from unlearn_tui.backends import data
    from test_tui_flow import ITEMS, write_session
    from unlearn_tui.tui.app import create_app
    from unlearn_tui.tui.settings import Settings

    p = tmp_path / "facts.json"
    p.write_text(json.dumps(ITEMS), encoding="utf-8")
    app = create_app(write_session(tmp_path, p), settings=Settings(), autostart=False)
    return app, lambda: data.load_items(str(p))


def test_app_snapshot_writes_the_selection_through_set_selection(tmp_path, monkeypatch):
    app, load = _app(tmp_path)
    ws = app.workspace
    ws.items = load()
    ws.normalize_selection()
    ws.session.data.forget, ws.session.data.retain = ["q5", "q1"], ["q3"]
    ws.session.data.subjects = {"q5": "Madrid's country"}
    calls = []
    real = Workbench.set_selection

    def spy(self, f, r):
        calls.append((list(f), list(r)))
        return real(self, f, r)

    monkeypatch.setattr(Workbench, "set_selection", spy)
    wb = Workbench(sessions.new_session())
    snap = ws.snapshot()
    snap.load_into(wb)
    assert calls == [(["q5", "q1"], ["q3"])]
    assert wb.session is snap.session and snap.session is not ws.session      # a copy: the UI may go on
    assert ids(wb.forget) == ["q5", "q1"] and ids(wb.retain) == ["q3"]
    assert wb.forget[0].subject == "Madrid's country" and ws.item_by_id("q5").subject == "Spain"
    assert ids(wb.rephrase) == ["q1"]                         # q5 has no paraphrase in the data
    assert [r.questions for r in wb.prepare(paraphrases=False).requests][0] == ["What is the capital of Spain?"]


def test_app_snapshot_before_the_data_is_loaded_is_an_empty_selection(tmp_path):
    app, _ = _app(tmp_path)
    assert app.workspace.items is None and app.workspace.forget_ids == ["q1", "q2"]   # the session's ids, data not loaded yet
    wb = Workbench(sessions.new_session())
    app.workspace.snapshot().load_into(wb)                    # the start-up job does this: no error
    assert wb.items == [] and wb.forget == [] and wb.retain == []
