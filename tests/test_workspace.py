"""The app's state without Textual: tui.workspace.Workspace, the job queue (tui.jobs), the pane protocol."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from unlearn_tui import sessions
from unlearn_tui.backends.errors import UserError
from tests.conftest import make_items

ROOT = Path(__file__).resolve().parents[1]


def workspace(n: int = 5, **data):
    from unlearn_tui.tui.settings import Settings
    from unlearn_tui.tui.workspace import Workspace

    seen: list = []
    s = sessions.new_session(data=dict({"forget": 2, "retain": 1}, **data),
                             runs=[{"method": "ike", "params": {"k": 2}}])
    ws = Workspace(s, Settings(baseline_on_load=True), on_change=lambda a, d: seen.append((set(a), d)))
    ws.data_loaded(make_items(n))
    seen.clear()
    return ws, seen


def test_workspace_imports_no_textual_and_no_torch():
    code = ("import sys, tui.workspace, tui.jobs, tui.files; "
            "print(any(m.startswith('textual') for m in sys.modules), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


def test_a_data_load_turns_counts_into_ids_and_a_failed_one_leaves_nothing():
    ws, seen = workspace()
    assert ws.forget_ids == ["q0", "q1"] and ws.retain_ids == ["q2"] and ws.baseline_pending
    assert not ws.dirty                                   # loading is not an edit
    ws.set_baseline({"q0": 1.0})
    assert ws.baseline_scores == {"q0": 1.0} and not ws.baseline_pending
    warning = ws.data_loaded(None, "facts.json: not JSON")
    assert ws.items is None and ws.baseline_scores == {} and warning is None
    assert ws.forget_ids == ["q0", "q1"]                  # the session's selection is kept for a later load
    assert ws.find_item("q0") is None and ws.forget_items() == []
    with pytest.raises(KeyError):
        ws.item_by_id("q0")
    ws.session.data.forget = 50                           # more than there are: a warning, an empty selection
    assert "starting with an empty selection" in ws.data_loaded(make_items(3))
    assert ws.forget_ids == [] and ws.retain_ids == ["q2"]   # an id list is kept (known ids only)


def test_toggle_keeps_the_sets_disjoint_and_notifies():
    ws, seen = workspace()
    rev = ws.revs["selection"]
    ws.toggle_item("q2", "forget")                        # from retain to forget
    assert ws.forget_ids == ["q0", "q1", "q2"] and ws.retain_ids == []
    ws.toggle_item("q0", "forget")                        # out again
    ws.toggle_item("q0", "retain")
    assert ws.forget_ids == ["q1", "q2"] and ws.retain_ids == ["q0"]
    assert ws.revs["selection"] == rev + 3 and ws.dirty
    assert seen == [({"selection"}, True)] * 3


def test_targets_edit_reset_mode_merge_and_preview():
    ws, _ = workspace()
    text, source, _ = ws.target_text("q0")
    assert text and source == "pool"
    ws.edit_target("q0", text)                            # the rule's own text: nothing stored
    assert ws.session.target_for("q0") is None and not ws.dirty
    ws.edit_target("q0", "Not telling.")
    assert ws.target_text("q0")[:2] == ("Not telling.", "custom") and ws.dirty
    ws.reset_target("q0")
    assert ws.session.target_for("q0") is None
    ws.set_merge_factor(2)
    ws.set_merge_factor(0)                                # ignored
    assert ws.session.targets.merge_factor == 2
    preview = ws.merge_preview()
    assert "2 items → 1 edit request(s), merge factor 2" in preview
    assert "What do you know about France? What do you know about Hamlet?" in preview
    ws.set_target_mode("self-improve")
    assert ws.target_text("q1")[0] is None and "written by the model" in ws.target_text("q1")[1]


def test_store_generated_records_into_the_session():
    from unlearn_tui.tui.workspace import store_generated

    ws, seen = workspace()
    n = ws.store_generated([{"id": "q0", "target": "I can't help with France.", "source": "self-improve",
                             "leak": False, "mentions_subject": True}],
                           [{"id": "q0", "paraphrase": "Tell me of France?", "source": "generated"}])
    assert n == 2 and ws.dirty and seen == [({"targets"}, True)]
    t = ws.session.target_for("q0")
    assert (t.target, t.source, t.leak, t.mentions_subject) == ("I can't help with France.", "self-improve",
                                                                 False, True)
    store_generated(ws.session, paraphrases=[{"id": "q0", "paraphrase": "France?", "source": "regenerated"}])
    assert [(p.id, p.question, p.source) for p in ws.session.data.paraphrases] == [("q0", "France?", "regenerated")]
    assert ws.store_generated([]) == 0


def test_params_methods_import_and_runnable_checks():
    ws, _ = workspace()
    ws.set_param("ike", "k", 3)
    assert ws.session.runs[0].params == {"k": 3} and ws.method_params("ike") == {"k": 3}
    ws.set_methods(["ike", "none"])
    assert [r.method for r in ws.session.runs] == ["ike", "none"]
    ws.param_invalid("ike", "k", "must be >= 1")
    with pytest.raises(UserError, match="fix the hyper-parameters first: ike.k"):
        ws.check_runnable()
    ws.set_param("ike", "k", 3)                           # a valid value clears the error
    ws.check_runnable()
    form = ws.revs["form"]
    ws.import_params("rome", {"layer": 1})
    assert [r.method for r in ws.session.runs] == ["ike", "none", "rome"] and ws.revs["form"] == form + 1
    ws.session.data.forget = []
    with pytest.raises(UserError, match="forget set is empty"):
        ws.check_runnable()
    ws.data_loaded(None, "gone")
    with pytest.raises(UserError, match="no data loaded"):
        ws.check_runnable()


def test_snapshot_is_a_copy_with_only_loaded_ids():
    ws, _ = workspace()
    ws.session.data.forget = ["q1", "zz"]
    snap = ws.snapshot()
    assert snap.forget_ids == ("q1",) and snap.retain_ids == ("q2",)
    assert snap.session == ws.session and snap.session is not ws.session
    ws.set_merge_factor(5)
    assert snap.session.targets.merge_factor == 1


def test_replace_session_resets_everything():
    ws, _ = workspace()
    ws.add_result(object())
    ws.toggle_item("q4", "forget")
    other = sessions.new_session(model={"name": "tiny:gpt2"})
    assert ws.replace_session(other) is True              # another model
    assert ws.session is other and ws.items is None and ws.results == [] and not ws.dirty
    assert ws.replace_session(sessions.new_session(model={"name": "tiny:gpt2"})) is False


def test_job_queue_starts_queues_refuses_and_skips_duplicates():
    from unlearn_tui.tui.jobs import Job, JobQueue

    started: list = []
    busy = [False]

    def start(job):
        started.append(job.name)
        busy[0] = True
        return True

    q = JobQueue(start=start, busy=lambda: busy[0], running=lambda: started[-1] if busy[0] else None)
    a = q.submit(lambda: Job("run", lambda wb: wb.run_all()), "run")
    assert a.status == "started" and a.accepted and started == ["run"]
    assert q.submit(lambda: Job("step", lambda wb: None), "step").message == "step: queued after run"
    assert q.submit(lambda: Job("step", lambda wb: None), "step").status == "duplicate"

    def refuse():
        raise UserError("the forget set is empty")

    assert q.submit(refuse, "undo").status == "queued"
    assert len(q) == 2 and q
    busy[0] = False
    assert q.finished().name == "run"
    assert q.next().status == "started" and started == ["run", "step"]
    busy[0] = False
    q.finished()
    refused = q.next()
    assert refused.status == "refused" and refused.message == "the forget set is empty" and not q


def test_job_body_loads_the_snapshot_then_makes_one_call():
    from unlearn_tui.tui.jobs import Job

    ws, _ = workspace()
    calls: list = []

    class FakeBench:
        def adopt(self, session, items, forget_ids, retain_ids):
            calls.append(("adopt", list(forget_ids), list(retain_ids)))

        def step_next(self, question=None):
            calls.append(("step_next", question))
            return "stepped"

    job = Job("step", lambda wb: wb.step_next(question="Q?"), ws.snapshot())
    assert job.body(FakeBench()) == "stepped"
    assert calls == [("adopt", ["q0", "q1"], ["q2"]), ("step_next", "Q?")]


def test_widgets_post_messages_and_never_call_the_app():
    """Panes get state down through refresh_from(workspace) and post typed messages up (no self.app.X)."""
    import importlib

    offenders = []
    for p in sorted((ROOT / "tui" / "widgets").glob("*.py")):
        for n, line in enumerate(p.read_text().splitlines(), 1):
            if re.search(r"\bself\.app\b|\bapp\.(action_|session|workspace|set_|toggle|edit_|reset_)", line):
                offenders.append(f"{p.name}:{n}: {line.strip()}")
    assert offenders == []
    from unlearn_tui.tui.screens.main import TABS

    for _, _, module, cls_name in TABS:
        cls = getattr(importlib.import_module(f"tui.widgets.{module}"), cls_name)
        assert callable(getattr(cls, "refresh_from", None)), cls_name
