"""Opening a session again: its autosave offered on Ctrl+O, the Results columns chosen last time, its
recorded [[steps]] applied (it opens on the edited model); and the statistics budget's cost in seconds."""

from __future__ import annotations

import os
import re
import time

import pytest

pytest.importorskip("textual")

import test_tui_flow as flow  # noqa: E402

press_job, settings, wait_for, wait_idle, weights, write_session = (
    flow.press_job, flow.settings, flow.wait_for, flow.wait_idle, flow.weights, flow.write_session)
data_file, slow_method = flow.data_file, flow.slow_method   # the fixtures of the flow tests


# ------------------------------------------------------------------ Ctrl+O offers the session's autosave
def _autosave_newer_than_file(session_path, merge_factor: int = 3):
    from unlearn_tui import sessions
    from unlearn_tui.tui import files

    s = sessions.load(session_path)
    s.targets.merge_factor = merge_factor
    old = time.time() - 120
    os.utime(session_path, (old, old))         # the file was saved two minutes ago
    where, error = files.write_autosave(s, "another-instance-that-crashed")
    assert error is None
    return where


async def _ctrl_o(pilot, app, path) -> None:
    from textual.widgets import Input

    await pilot.press("ctrl+o")
    await pilot.pause()
    app.screen.query_one("#path-input", Input).value = str(path)
    await pilot.press("enter")
    await pilot.pause()
    await pilot.pause()


@pytest.mark.anyio
@pytest.mark.parametrize("answer", ["restore", "open the file", "discard"])
async def test_ctrl_o_asks_before_restoring_a_newer_autosave(tmp_path, data_file, llama_handle, answer):
    from textual.widgets import Button

    from unlearn_tui.tui.app import create_app
    from unlearn_tui.tui.screens.confirm import RestoreAutosave

    session = write_session(tmp_path, data_file)
    auto = _autosave_newer_than_file(session)
    app = create_app(model="tiny:llama", handle=llama_handle, settings=settings(), restore=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_idle(pilot, app)
        await _ctrl_o(pilot, app, session)
        assert isinstance(app.screen, RestoreAutosave)
        later = app.screen.query_one("#later", Button)
        assert "Open the saved file" in str(later.label)
        assert later.region.width >= len(str(later.label))           # not cut at 80x24
        await pilot.press({"restore": "r", "open the file": "escape", "discard": "d"}[answer])
        await wait_for(pilot, lambda: not isinstance(app.screen, RestoreAutosave), what="answered")
        await wait_idle(pilot, app)
        ws = app.workspace
        assert ws.session.path == session.resolve()
        if answer == "restore":
            assert ws.session.targets.merge_factor == 3 and ws.dirty
            assert auto.is_file()                                     # still the safety net of those changes
        else:
            assert ws.session.targets.merge_factor == 1 and not ws.dirty
            assert auto.is_file() == (answer == "open the file")      # esc keeps it for later


@pytest.mark.anyio
async def test_ctrl_o_does_not_offer_an_autosave_older_than_the_file(tmp_path, data_file, llama_handle):
    from unlearn_tui.tui.app import create_app
    from unlearn_tui.tui.screens.confirm import RestoreAutosave

    session = write_session(tmp_path, data_file)
    _autosave_newer_than_file(session)
    session.write_text(session.read_text(encoding="utf-8"), encoding="utf-8")   # saved after the autosave
    app = create_app(model="tiny:llama", handle=llama_handle, settings=settings(), restore=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_idle(pilot, app)
        await _ctrl_o(pilot, app, session)
        assert not isinstance(app.screen, RestoreAutosave)
        await wait_idle(pilot, app)
        assert app.workspace.session.path == session.resolve() and app.workspace.session.targets.merge_factor == 1


# ------------------------------------------------------------------ the column choice persists
@pytest.mark.anyio
async def test_the_results_columns_chosen_come_back_at_the_next_launch(tmp_path):
    from test_tui_results import column_labels, make_app, results_pane
    from textual.widgets import DataTable, SelectionList

    from unlearn_tui.tui.settings import load, settings_path

    path = settings_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('# my settings\nautosave_seconds = 3600  # rarely\n', encoding="utf-8")
    app = make_app(tmp_path)
    async with app.run_test(size=(100, 30)) as pilot:
        await results_pane(pilot)
        t = app.screen.query_one("#rs-table", DataTable)
        await pilot.press("c")
        await pilot.pause()
        sl = app.screen.query_one("#columns-list", SelectionList)
        sl.deselect("forget.mrr")
        sl.select("retain.probability")
        await pilot.press("enter")
        await pilot.pause()
        chosen = [k for k in column_labels(t) if "." in k or k in ("composite", "seconds")]
    text = path.read_text(encoding="utf-8")
    assert "# my settings" in text and "# rarely" in text and "results_columns" in text   # the user's file kept
    saved, problems = load()
    assert problems == [] and saved.results_columns == chosen and "forget.mrr" not in chosen

    # the next launch on the same session (the settings read from its file): the same columns
    from test_tui_results import fake_results

    from unlearn_tui.backends import data
    from unlearn_tui.tui.app import create_app

    app2 = create_app(tmp_path / "session.toml", autostart=False, restore=False)
    assert app2.settings.results_columns == chosen
    app2.workspace.items = data.load_items(str(tmp_path / "facts.json"))
    app2.workspace.normalize_selection()
    app2.workspace.baseline_eval, app2.workspace.results = fake_results()
    async with app2.run_test(size=(100, 30)) as pilot:
        await results_pane(pilot)
        t = app2.screen.query_one("#rs-table", DataTable)
        again = [k for k in column_labels(t) if "." in k or k in ("composite", "seconds")]
        assert again == chosen and "retain.probability" in again


# ------------------------------------------------------------------ [[steps]]: opens on the edited model
def _steps_session(tmp_path, data_file, method: str, params: str):
    s = write_session(tmp_path, data_file, method, extra=f"params = {params}\n")
    s.write_text(s.read_text(encoding="utf-8") + f"""
[[steps]]
method = "{method}"
items = ["q1"]
params = {params}
""", encoding="utf-8")
    return s


@pytest.mark.anyio
async def test_a_session_with_steps_opens_on_the_edited_model(tmp_path, data_file, llama_handle, slow_method):
    from textual.widgets import DataTable

    from unlearn_tui.tui.app import create_app

    session = _steps_session(tmp_path, data_file, slow_method, "{ steps = 2, delay = 0.0 }")
    w0 = weights(llama_handle)
    app = create_app(session, handle=llama_handle, settings=settings(), restore=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_for(pilot, lambda: "steps" in app.jobs_done and not app.bridge.busy, 90, "steps job")
        ws = app.workspace
        assert app.last_error is None
        assert ws.step_position == 1 and ws.step_total == 2
        assert not bool((weights(llama_handle) == w0).all())           # the recorded edit is on the model
        assert [s.items for s in ws.session.steps] == [["q1"]] and not ws.dirty
        status = str(app.screen.query_one("#rn-status").render())
        assert "opened on the edited model" in status and "1 recorded step" in status
        app.action_show_tab("results")
        await pilot.pause()
        rows = app.screen.query_one("#rs-table", DataTable)
        labels = [str(rows.get_row_at(i)[1]) for i in range(rows.row_count)]
        assert any(lbl.startswith("recorded 1/2") for lbl in labels)
        # undo goes back to the unedited model (and out of the session's [[steps]])
        await press_job(pilot, app, "undo", "ctrl+z")
        assert bool((weights(llama_handle) == w0).all()) and ws.session.steps == []


@pytest.mark.anyio
async def test_cancelling_the_recorded_steps_leaves_the_unedited_model(tmp_path, data_file, llama_handle,
                                                                       slow_method):
    from unlearn_tui.tui.app import create_app

    session = _steps_session(tmp_path, data_file, slow_method, "{ steps = 400, delay = 0.02 }")
    w0 = weights(llama_handle)
    app = create_app(session, handle=llama_handle, settings=settings(), restore=False)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.bridge is not None and app.bridge.job == "steps", 60, "steps job")
        run = app.screen.query_one("#pane-run")
        await wait_for(pilot, lambda: len(run.losses) >= 2, what="the step's progress")
        await pilot.press("ctrl+k")
        await wait_for(pilot, lambda: "steps" in app.jobs_done and not app.bridge.busy, 60, "cancelled")
        assert bool((weights(llama_handle) == w0).all()) and app.workspace.step_position == 0
        assert "cancelled" in str(app.screen.query_one("#rn-status").render())


# ------------------------------------------------------------------ the statistics budget's cost in seconds
@pytest.mark.anyio
async def test_statistics_cost_line_states_seconds_estimated_then_measured(tmp_path, data_file, llama_handle,
                                                                            monkeypatch):
    from textual.widgets import Static

    from unlearn_tui.tui import messages as msg
    from unlearn_tui.tui import sampling_rate
    from unlearn_tui.tui.app import create_app
    from unlearn_tui.tui.widgets.method import MethodPane, stats_hint

    monkeypatch.setattr(sampling_rate, "rates_file", lambda: tmp_path / "rates.json")
    hint = stats_hint(8192, "SmolLM2-135M-Instruct", "cpu")
    assert re.search(r"≈ \d+ min \([\d,]+ s\)", hint) and "an estimate for cpu" in hint
    app = create_app(write_session(tmp_path, data_file), handle=llama_handle, settings=settings())
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_idle(pilot, app)
        await pilot.press("f4")
        await pilot.pause()
        pane = app.screen.query_one(MethodPane)
        pane.show_form("rome")
        await pilot.pause()
        text = str(pane.query_one(f"#me-stats{pane._gen}", Static).render())
        assert "8,192 tokens" in text and re.search(r"≈ [\d.]+ s", text) and "estimate" in text
        # a sampling stage seen by the app: its rate is measured and the line says so
        app.router.on_progress_update(msg.ProgressUpdate("run", sampling_rate.STAGE, 1000, 8192, None, 4.0, []))
        app.router.on_stage_changed(msg.StageChanged("run", "covariance statistics", 8192))
        assert sampling_rate.measured("tiny:llama", "cpu") == pytest.approx(250.0)
        pane.show_form("rome")
        await pilot.pause()
        text = str(pane.query_one(f"#me-stats{pane._gen}", Static).render())
        assert "≈ 33 s at 250 tok/s (measured on cpu)" in text
