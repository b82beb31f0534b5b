"""The same model is never evaluated twice on the same items: known scores on disk, quick scores per state."""

from __future__ import annotations

import dataclasses

from tests.test_runner import make_session, scribble  # noqa: F401  (fixture)
from unlearn_tui.backends import runner as runner_mod
from unlearn_tui.backends.model import state_hash
from unlearn_tui.backends.runner import Workbench, known_cache_file


def _counting(monkeypatch):
    calls: list[list[str]] = []
    real = runner_mod.evaluate

    def counted(handle, splits, *a, **k):
        calls.append([it.id for items in splits.values() for it in items])
        return real(handle, splits, *a, **k)

    monkeypatch.setattr(runner_mod, "evaluate", counted)
    return calls


def test_known_scores_are_evaluated_once_per_model_and_data(tmp_path, monkeypatch, scribble):  # noqa: F811
    calls = _counting(monkeypatch)
    s = make_session(tmp_path, [{"method": "_scribble", "params": {"scale": 2.0}}])
    wb = Workbench(s)
    items = wb.load_data()[:5]
    first = wb.score_known(items)
    assert len(calls) == 1 and set(first) == {it.id for it in items}
    path = known_cache_file(wb.handle, items, wb.settings)
    assert path.is_file()
    # a new launch: a new workbench and a freshly loaded model, same data
    wb2 = Workbench(make_session(tmp_path, []))
    assert wb2.score_known(wb2.load_data()[:5]) == first and len(calls) == 1
    # other data (one answer changed) is evaluated
    changed = [dataclasses.replace(items[0], answer=items[0].answer + " indeed"), *items[1:]]
    wb2.score_known(changed)
    assert len(calls) == 2
    # an edited model is evaluated, never served from the cache of the unedited one
    wb.step_next()                      # (its quick scores are one evaluation of forget + retain)
    n = len(calls)
    wb.score_known(items)
    assert len(calls) == n + 1 and calls[-1] == [it.id for it in items]
    wb.undo()
    assert wb.score_known(items) == first and len(calls) == n + 1
    # a damaged cache file is ignored and rewritten
    path.write_text("{not json")
    assert wb.score_known(items) == first and len(calls) == n + 2
    assert '"scores"' in path.read_text()


def test_undo_and_redo_restore_remembered_quick_scores(tmp_path, monkeypatch, scribble):  # noqa: F811
    calls = _counting(monkeypatch)
    s = make_session(tmp_path, [{"method": "_scribble", "params": {"scale": 2.0}}])
    s.data.rephrase = False
    wb = Workbench(s)
    wb.load_data()
    base = wb.quick_scores()
    assert len(calls) == 1
    first = wb.step_next()
    assert len(calls) == 2
    h1 = state_hash(wb.handle.model)
    assert wb.undo(score=True).quick == base and len(calls) == 2      # back to a scored state: nothing evaluated
    again = wb.redo(score=True)
    assert again.quick == first.quick and len(calls) == 2 and state_hash(wb.handle.model) == h1
    wb.undo()
    # a new edit after an undo is a new state (the old one's scores are not reused), though it has the same depth
    wb.step_next()
    assert len(calls) == 3
    # and the remembered numbers are what evaluating again gives
    remembered = wb.quick_scores()
    assert len(calls) == 3
    wb._quick.clear()
    assert wb.quick_scores() == remembered and len(calls) == 4


def test_a_second_session_run_on_the_same_model_reuses_its_baseline(tmp_path, monkeypatch, scribble):  # noqa: F811
    """Sweep and paper trials run one session after another on one loaded model: the unedited model's
    evaluation of the same splits, targets and settings is not run again; anything that changes it is."""
    from unlearn_tui.backends.events import Log
    from unlearn_tui.backends.runner import run

    calls = _counting(monkeypatch)
    s = make_session(tmp_path, [{"method": "_scribble", "params": {"scale": 2.0}}])
    wb = Workbench(s)
    wb.load_data()
    handle = wb._model()
    before = state_hash(handle.model)
    calls.clear()
    a = run(s, handle=handle)                       # baseline + the scribble run
    assert len(calls) == 2
    events: list = []
    b = run(dataclasses.replace(s, runs=[dataclasses.replace(s.runs[0], label="again")]), events.append,
            handle=handle)
    assert len(calls) == 3                          # only the run: the baseline was remembered
    assert any(isinstance(e, Log) and "baseline" in e.message and "reused" in e.message for e in events)
    assert b.baseline.summary() == a.baseline.summary() and b.baseline is not a.baseline
    assert b.runs[0].eval.summary() == a.runs[0].eval.summary()
    assert state_hash(handle.model) == before       # the runs were undone: the remembered state is the model's
    # other settings, or other splits, are evaluated again
    other = dataclasses.replace(s, eval=dataclasses.replace(s.eval, max_new_tokens=4))
    run(other, handle=handle)
    assert len(calls) == 5
    run(make_session(tmp_path, s.runs, forget=2), handle=handle)
    assert len(calls) == 7
    # a changed model (another fingerprint) is evaluated again
    handle._fingerprint = "another-model"
    run(s, handle=handle)
    assert len(calls) == 9
