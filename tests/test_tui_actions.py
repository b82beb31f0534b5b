"""Pilot tests of the remaining actions: EasyEdit YAML import, self-improve, replay, open/new session."""

from __future__ import annotations

import sys

import pytest

pytest.importorskip("textual")

from test_tui_flow import data_file, press_job, settings, wait_for, wait_idle, write_session  # noqa: E402,F401


@pytest.mark.anyio
async def test_easyedit_yaml_import_fills_the_form(tmp_path, data_file):
    from unlearn_tui.backends import methods

    if "rome" not in methods.names():
        pytest.skip("rome is not in this build")
    from textual.widgets import Input

    from unlearn_tui.tui.app import create_app

    yml = tmp_path / "rome.yaml"
    yml.write_text("alg_name: ROME\nmodel_name: ./hugging_cache/gpt2\nlayers: [1]\ndevice: 0\n")
    app = create_app(write_session(tmp_path, data_file, "ike"), settings=settings(), autostart=False)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause()
        await pilot.press("ctrl+e")
        await pilot.pause()
        app.screen.query_one("#path-input", Input).value = str(yml)
        await pilot.press("enter")
        await pilot.pause()
        assert [r.method for r in app.workspace.session.runs] == ["ike", "rome"]
        assert app.workspace.session.runs[1].params["layer"] == 1
        assert app.workspace.dirty
        texts = " ".join(n.message for n in app._notifications)
        assert "imported rome" in texts and "model_name" in texts
        await pilot.press("f4")
        await pilot.pause()
        pane = app.screen.query_one("#pane-method")
        pane.show_form("rome")
        await pilot.pause()
        assert app.screen.query_one(f"#mp{pane._gen}-layer", Input).value == "1"


@pytest.mark.anyio
async def test_self_improve_writes_targets_into_the_session(tmp_path, data_file, llama_handle):
    from unlearn_tui.tui.app import create_app

    app = create_app(write_session(tmp_path, data_file), handle=llama_handle, settings=settings())
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_idle(pilot, app)
        assert app.workspace.session.target_for("q1") is None
        mark = len(app.jobs_done)
        app.action_self_improve(["q1"])
        await wait_for(pilot, lambda: "self-improve" in app.jobs_done[mark:] and not app.bridge.busy,
                       timeout=240, what="self-improve")
        assert app.last_error is None
        t = app.workspace.session.target_for("q1")
        assert t is not None and t.target.strip() and t.source != "custom"
        assert app.workspace.session.target_for("q2") is None     # only the chosen item
        assert app.workspace.dirty


@pytest.mark.anyio
async def test_replay_reruns_the_session(tmp_path, data_file, llama_handle):
    from unlearn_tui.tui.app import create_app

    app = create_app(write_session(tmp_path, data_file, "none"), handle=llama_handle, settings=settings())
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_idle(pilot, app)
        await press_job(pilot, app, "run", "ctrl+r")
        assert len(app.workspace.results) == 1
        await press_job(pilot, app, "replay", "f8")
        assert len(app.workspace.results) == 1                      # replay starts a fresh result list
        assert app.jobs_done[-2:] == ["reload", "replay"]
        assert app.workspace.results[0].method == "none"


@pytest.mark.anyio
async def test_open_and_new_session(tmp_path, data_file, llama_handle):
    from textual.widgets import Input

    from unlearn_tui.tui.app import create_app

    first = write_session(tmp_path, data_file, "none")
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    (other_dir / data_file.name).write_text(data_file.read_text())
    other = write_session(other_dir, other_dir / data_file.name, "ike")
    app = create_app(first, handle=llama_handle, settings=settings())
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_idle(pilot, app)
        await pilot.press("ctrl+o")
        await pilot.pause()
        app.screen.query_one("#path-input", Input).value = str(other)
        mark = len(app.jobs_done)
        await pilot.press("enter")
        await wait_for(pilot, lambda: "reload" in app.jobs_done[mark:] and not app.bridge.busy, what="reload")
        assert app.workspace.session.path == other and [r.method for r in app.workspace.session.runs] == ["ike"]
        assert app.workspace.items is not None and app.workspace.forget_ids == ["q1", "q2"]
        app.workspace.toggle_item("q5", "forget")                  # unsaved change: new session asks first
        await pilot.press("ctrl+n")
        await pilot.pause()
        await pilot.press("d")
        await pilot.pause()
        assert app.workspace.session.path is None and not app.workspace.dirty


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["self-improve", "avoidant"])
async def test_model_written_targets_of_an_app_run_are_saved(tmp_path, data_file, llama_handle, mode):
    """Regression (issue 13, item 3): a run in a generating mode wrote its targets into the job's copy of
    the session, so they were never saved; now the run's records are stored in the app's session."""
    from unlearn_tui import sessions

    from unlearn_tui.tui.app import create_app

    path = write_session(tmp_path, data_file, "none")
    path.write_text(path.read_text().replace('mode = "idk"', f'mode = "{mode}"'))
    app = create_app(path, handle=llama_handle, settings=settings())
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_idle(pilot, app)
        ws = app.workspace
        assert ws.session.targets.items == [] and not ws.dirty
        await press_job(pilot, app, "run", "ctrl+r", timeout=240)
        assert app.last_error is None and len(ws.results) == 1
        written = {t.id: t for t in ws.session.targets.items}
        assert set(written) == {"q1", "q2"}
        assert all(t.target.strip() and t.source in ("self-improve", "generated", "regenerated", "fallback")
                   for t in written.values())
        assert ws.dirty
        assert app.file_actions.save_to(None)
    saved = sessions.load(path)
    assert {t.id: t.target for t in saved.targets.items} == {i: t.target for i, t in written.items()}
