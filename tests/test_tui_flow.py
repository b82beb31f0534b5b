"""Pilot tests of the whole workbench flow on a tiny random model.

Open a data file, select forget and retain items, edit a target, set the merge
factor, choose a method and a hyper-parameter, run, read the result row;
cancel a run (the weights are unchanged); step mode with undo/redo; the
session round trip through the UI.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest

pytest.importorskip("textual")

from unlearn_tui.backends import methods  # noqa: E402
from unlearn_tui.backends.events import Tracker  # noqa: E402
from unlearn_tui.backends.params import param  # noqa: E402

ITEMS = [
    {"id": "q1", "question": "What is the capital of France?", "answer": "Paris",
     "paraphrased_question": "Which city is the capital of France?", "subject": "France"},
    {"id": "q2", "question": "Who wrote Hamlet?", "answer": "Shakespeare",
     "paraphrased_question": "Hamlet was written by whom?", "subject": "Hamlet"},
    {"id": "q3", "question": "What is the largest planet?", "answer": "Jupiter", "subject": "planet"},
    {"id": "q4", "question": "What colour is the sky?", "answer": "blue", "subject": "sky"},
    {"id": "q5", "question": "What is the capital of Spain?", "answer": "Madrid", "subject": "Spain"},
]
WEIGHT = "model.layers.1.mlp.down_proj.weight"


@methods.register
class SlowNoise:
    """A test method: nudges one weight matrix a little per step, slowly (cancel / step tests)."""

    name: ClassVar[str] = "slow-test"
    summary: ClassVar[str] = "test-only: adds a constant to one MLP matrix per step"
    needs_retain: ClassVar[bool] = False

    @dataclass
    class Params:
        steps: int = param(200, "optimisation steps", min=1)
        delay: float = param(0.02, "seconds to sleep per step", min=0.0)

    def __init__(self, params: "SlowNoise.Params") -> None:
        self.params = params

    def touched_parameters(self, handle: Any) -> list[str]:
        return [WEIGHT]

    def apply(self, handle: Any, requests: list, ctx: Any) -> dict:
        import torch

        tracker = Tracker(ctx.on_event, ctx.cancel, "slow-test", self.params.steps)
        w = handle.parameter(WEIGHT)
        for i in range(self.params.steps):
            with torch.no_grad():
                w.add_(0.01 * len(requests))
            time.sleep(self.params.delay)
            tracker.step(loss=1.0 / (i + 1))
        return {"edits": len(requests)}


@pytest.fixture
def slow_method():
    methods.add_module("slow-test", __name__)
    yield "slow-test"
    methods._MODULES.pop("slow-test", None)


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    p = tmp_path / "facts.json"
    p.write_text(json.dumps(ITEMS), encoding="utf-8")
    return p


def write_session(tmp_path: Path, data: Path, method: str = "none", extra: str = "") -> Path:
    s = tmp_path / "session.toml"
    s.write_text(f"""# my session
version = 1

[model]
name = "tiny:llama"  # the tiny random model

[data]
path = "{data.name}"
forget = ["q1", "q2"]
retain = ["q3", "q4"]

[targets]
mode = "idk"

[eval]
max_new_tokens = 4

[[runs]]
method = "{method}"
{extra}""", encoding="utf-8")
    return s


def settings(baseline: bool = False):
    from unlearn_tui.tui.settings import Settings

    return Settings(baseline_on_load=baseline, baseline_limit=10, autosave_seconds=3600)


async def wait_for(pilot, cond, timeout: float = 90.0, what: str = "condition") -> None:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)


async def press_job(pilot, app, job: str, *keys: str, timeout: float = 90.0) -> None:
    """Press ``keys`` and wait until ``job`` has finished (done or failed) and nothing else runs."""
    mark = len(app.jobs_done)
    await pilot.press(*keys)
    await wait_for(pilot, lambda: job in app.jobs_done[mark:] and not app.bridge.busy and not app.jobs,
                   timeout, f"job {job}")


async def wait_idle(pilot, app, timeout: float = 90.0) -> None:
    await wait_for(pilot, lambda: app.bridge is not None and not app.bridge.busy and not app.jobs
                   and app.jobs_done, timeout, "idle")


async def type_text(pilot, text: str) -> None:
    for ch in text:
        await pilot.press("space" if ch == " " else ch)


def weights(handle):
    return handle.parameter(WEIGHT).detach().clone()


@pytest.mark.anyio
async def test_whole_flow_open_select_edit_merge_method_run_save(tmp_path, data_file, llama_handle):
    from unlearn_tui import sessions
    from textual.widgets import DataTable, Input, SelectionList, Static, TextArea

    from unlearn_tui.tui.app import create_app

    app = create_app(model="tiny:llama", handle=llama_handle, settings=settings(baseline=True), restore=False)
    app.workspace.session.eval.max_new_tokens = 4
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_idle(pilot, app)
        app.last_error = None    # the default data set may be missing in this build
        # open the data file through the dialog
        await pilot.press("ctrl+l")
        await pilot.pause()
        dialog_input = app.screen.query_one("#path-input", Input)
        dialog_input.value = str(data_file)
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.workspace.items is not None and len(app.workspace.items) == 5, what="items")
        await wait_idle(pilot, app)
        assert app.workspace.session.data.path == str(data_file.resolve())
        assert set(app.workspace.baseline_scores) == {i["id"] for i in ITEMS}   # known-ness computed in the background
        # forget q1, q2 (space), retain q3, q4 (r)
        table = app.screen.query_one("#fs-table", DataTable)
        table.focus()
        table.move_cursor(row=0)
        await pilot.press("space", "space", "r", "r")
        assert app.workspace.forget_ids == ["q1", "q2"] and app.workspace.retain_ids == ["q3", "q4"]
        counts = str(app.screen.query_one("#fs-counts", Static).render())
        assert "2 forget" in counts and "2 retain" in counts
        # search filters the table
        app.screen.query_one("#fs-search", Input).value = "hamlet"
        await pilot.pause()
        assert table.row_count == 1
        app.screen.query_one("#fs-search", Input).value = ""
        await pilot.pause()
        # edit q1's target
        await pilot.press("f3")
        await wait_for(pilot, lambda: app.focused is not None and app.focused.id == "tg-list", what="focus")
        await pilot.pause(0.2)
        area = app.screen.query_one("#tg-text", TextArea)
        area.focus()
        area.clear()
        await type_text(pilot, "Nope I forgot")
        await pilot.pause()
        t = app.workspace.session.target_for("q1")
        assert t is not None and t.target == "Nope I forgot" and t.source == "custom"
        # merge factor 2 via the input; the preview shows the merged prompt
        merge = app.screen.query_one("#tg-merge", Input)
        merge.focus()
        await pilot.press("backspace", "2")
        await pilot.pause()
        assert app.workspace.session.targets.merge_factor == 2
        preview = str(app.screen.query_one("#tg-preview", Static).render())
        assert "What is the capital of France? Who wrote Hamlet?" in preview
        assert "1 edit request" in preview and "Nope I forgot" in preview
        # choose ike instead of none; set k = 2, with inline validation first
        await pilot.press("f4")
        await wait_for(pilot, lambda: app.focused is not None and app.focused.id == "me-list", what="focus")
        await pilot.pause(0.2)
        sl = app.screen.query_one("#me-list", SelectionList)
        sl.focus()
        sl.highlighted = 0
        await pilot.press("space")            # none off
        await pilot.press("down", "space")    # ike on
        await pilot.pause()
        assert [r.method for r in app.workspace.session.runs] == ["ike"]
        pane = app.screen.query_one("#pane-method")
        k_input = app.screen.query_one(f"#mp{pane._gen}-k", Input)
        k_input.focus()
        await pilot.press("backspace", "0")
        await pilot.pause()
        err = str(app.screen.query_one(f"#me-err{pane._gen}-k", Static).render())
        assert ">=" in err and "0" in err
        await pilot.press("backspace", "2")
        await pilot.pause()
        assert str(app.screen.query_one(f"#me-err{pane._gen}-k", Static).render()) == ""
        assert app.workspace.session.runs[0].params == {"k": 2}
        # run and read the result row
        await press_job(pilot, app, "run", "ctrl+r")
        assert app.last_error is None
        assert len(app.workspace.results) == 1
        r = app.workspace.results[0]
        assert r.method == "ike" and r.merge_factor == 2 and r.params["k"] == 2
        await pilot.press("f6")
        await pilot.pause()
        rows = app.screen.query_one("#rs-table", DataTable)
        assert rows.row_count == 2                      # the baseline (B), then the run
        assert str(rows.get_row_at(0)[0]) == "B"
        keys = [str(k.value) for k in rows.columns]
        cells = dict(zip(keys, (str(c) for c in rows.get_row_at(1))))
        assert cells["label"] == "ike" and cells["m"] == "2"
        numbers = [float(v) for k, v in cells.items() if "." in k and not k.startswith("delta.") and v != "—"]
        assert len(numbers) >= 6 and all(0.0 <= x for x in numbers)
        assert float(cells["composite"]) == pytest.approx(r.composite, abs=1e-3)   # composite column
        detail = app.screen.query_one("#rs-items", DataTable)
        assert detail.row_count == 6     # forget 2 + retain 2 + rephrase 2
        # save as, then everything comes back identical on open
        target = tmp_path / "saved.toml"
        await pilot.press("f12")
        await pilot.pause()
        app.screen.query_one("#path-input", Input).value = str(target)
        await pilot.press("enter")
        await pilot.pause()
        assert not app.workspace.dirty and target.is_file()
        saved_text = target.read_text()
    s = sessions.load(target)
    assert s.data.forget == ["q1", "q2"] and s.data.retain == ["q3", "q4"]
    assert s.target_for("q1").target == "Nope I forgot"
    assert s.targets.merge_factor == 2
    assert [(r.method, r.params) for r in s.runs] == [("ike", {"k": 2})]

    app2 = create_app(target, handle=llama_handle, settings=settings())
    async with app2.run_test(size=(100, 30)) as pilot:
        await wait_idle(pilot, app2)
        assert app2.workspace.forget_ids == ["q1", "q2"] and app2.workspace.retain_ids == ["q3", "q4"]
        assert app2.workspace.session.targets.merge_factor == 2
        assert app2.workspace.method_params("ike") == {"k": 2}
        assert not app2.workspace.dirty
        assert sessions.dumps(app2.workspace.session) == saved_text


@pytest.mark.anyio
async def test_cancel_run_restores_weights(tmp_path, data_file, llama_handle, slow_method):
    from unlearn_tui.tui.app import create_app

    session = write_session(tmp_path, data_file, slow_method)
    before = weights(llama_handle)
    app = create_app(session, handle=llama_handle, settings=settings())
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_idle(pilot, app)
        await pilot.press("ctrl+r")
        run = app.screen.query_one("#pane-run")
        await wait_for(pilot, lambda: len(run.losses) >= 2, what="loss values")
        assert not bool((weights(llama_handle) == before).all())    # the method is changing the weights
        await press_job(pilot, app, "run", "ctrl+k")
        assert bool((weights(llama_handle) == before).all())
        assert app.workspace.results == []
        status = str(app.screen.query_one("#rn-status").render())
        assert "cancelled" in status and "rolled back" in status
        # the app keeps working: a second job runs normally
        app.screen.query_one("#pb-question").value = "What is the capital of France?"
        await press_job(pilot, app, "probe", "ctrl+b")
        edited = str(app.screen.query_one("#pb-edited").render())
        assert edited and "thinking" not in edited


@pytest.mark.anyio
async def test_progress_is_coalesced_and_ui_responsive(tmp_path, data_file, llama_handle, slow_method):
    from unlearn_tui.tui.app import create_app

    session = write_session(tmp_path, data_file, slow_method, extra="params = { steps = 150, delay = 0.002 }\n")
    app = create_app(session, handle=llama_handle, settings=settings())
    seen: list = []
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_idle(pilot, app)
        from unlearn_tui.tui.messages import ProgressUpdate

        orig = app.post_message

        def spy(m):
            if isinstance(m, ProgressUpdate) and m.stage == "slow-test":
                seen.append(m)
            return orig(m)

        app.post_message = spy   # the worker posts through this
        # f2 right after ctrl+r: the UI handles keys while the engine runs
        await press_job(pilot, app, "run", "ctrl+r", "f2")
    assert seen and seen[-1].done == 150
    assert len(seen) < 150 / 2                      # coalesced, not one message per step
    assert sum(len(m.losses) for m in seen) == 150  # every loss value still arrives


@pytest.mark.anyio
async def test_step_mode_with_undo_redo(tmp_path, data_file, llama_handle, slow_method):
    from unlearn_tui.tui.app import create_app

    session = write_session(tmp_path, data_file, slow_method, extra="params = { steps = 2, delay = 0.0 }\n")
    w0 = weights(llama_handle)
    app = create_app(session, handle=llama_handle, settings=settings())
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_idle(pilot, app)
        await pilot.press("f5")
        await press_job(pilot, app, "step", "ctrl+t")
        assert app.workspace.step_position == 1 and app.workspace.step_total == 2
        w1 = weights(llama_handle)
        assert not bool((w1 == w0).all())
        probe_edited = str(app.screen.query_one("#pb-edited").render())
        assert probe_edited                              # the probe was refreshed after the step
        assert "forget R1" in str(app.screen.query_one("#pb-score").render())
        await press_job(pilot, app, "step", "ctrl+t")
        assert app.workspace.step_position == 2
        w2 = weights(llama_handle)
        await press_job(pilot, app, "step", "ctrl+t")   # nothing left to apply: an error, not a crash
        assert app.last_error and "applied" in app.last_error
        await press_job(pilot, app, "undo", "ctrl+z")
        assert app.workspace.step_position == 1 and bool((weights(llama_handle) == w1).all())
        await press_job(pilot, app, "undo", "ctrl+z")
        assert app.workspace.step_position == 0 and bool((weights(llama_handle) == w0).all())
        await press_job(pilot, app, "redo", "ctrl+y")
        assert app.workspace.step_position == 1 and bool((weights(llama_handle) == w1).all())
        assert not bool((w2 == w1).all())


@pytest.mark.anyio
async def test_engine_errors_are_notifications_and_app_keeps_running(tmp_path, llama_handle):
    from unlearn_tui.tui.app import create_app

    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    app = create_app(model="tiny:llama", handle=llama_handle, settings=settings(), restore=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_idle(pilot, app)
        mark = len(app.jobs_done)
        app.file_actions.open_data(str(bad))
        await wait_for(pilot, lambda: "reload" in app.jobs_done[mark:] and not app.bridge.busy, what="reload")
        assert app.last_error and "bad.json" in app.last_error
        assert app.workspace.items is None
        await pilot.press("ctrl+r")           # nothing to run: a one-line message
        await pilot.pause()
        assert "no data loaded" in app.last_error
        assert app.is_running


@pytest.mark.anyio
async def test_quit_with_unsaved_changes_asks(tmp_path, data_file, llama_handle):
    from unlearn_tui.sessions.paths import session_autosave_path

    from unlearn_tui.tui.app import create_app
    from unlearn_tui.tui.screens.confirm import ConfirmQuit

    session = write_session(tmp_path, data_file)
    app = create_app(session, handle=llama_handle, settings=settings())
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_idle(pilot, app)
        app.workspace.set_merge_factor(3)
        app.file_actions.autosave()
        assert session_autosave_path(session, app.instance).is_file()   # unsaved work is on disk already
        await pilot.press("ctrl+q")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmQuit)
        assert "Save before quitting?" in str(app.screen.query_one("#confirm-text").render())
        await pilot.press("escape")                  # cancel: still running
        await pilot.pause()
        assert app.is_running and not isinstance(app.screen, ConfirmQuit)
    # a crash (no clean quit) leaves the autosave; the next start of that session offers it
    app2 = create_app(session, settings=settings())
    offer = app2.restore_offer
    assert offer is not None and offer.session.targets.merge_factor == 3
    assert offer.session.path == session.resolve()
    assert app2.workspace.session.targets.merge_factor == 1 and not app2.workspace.dirty   # not restored unasked
