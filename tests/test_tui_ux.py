"""Issue 16 (progress that tells the truth; input and state): pilot tests on the tiny random model.

* progress: the clock ticks between events, an evaluation's generations weigh
  more than its teacher-forced pairs, every job is queued or refused with a
  message (ctrl+r during start-up too), the bar, ETA and strip go idle after a
  job or a cancel, a cancelled model load leaves "(not loaded)" (not
  "(loading)") and Step then loads it, quitting during a job says it waits,
  and a cancelled evaluation does not claim to have rolled weights back;
* input: ``[x]``/``[ ]`` and a "selected:" line in the method list, the first
  Down after F4, Space that says what it did, ``/`` and Esc in the search box,
  a toggle while the filter changes, fast typing in the save dialog;
* state: one autosave per session (and per instance when untitled), offered,
  never restored unasked; the open dialog's question; self-improve's summary;
  the forget list in data order unless reordered explicitly; the merge
  preview's subjects.
"""

from __future__ import annotations

import time

import pytest

pytest.importorskip("textual")

import test_tui_flow as flow  # noqa: E402

press_job, settings, wait_for, wait_idle, write_session = (flow.press_job, flow.settings, flow.wait_for, flow.wait_idle,
                                                           flow.write_session)
data_file, slow_method = flow.data_file, flow.slow_method   # the fixtures of the flow tests


def _messages(app) -> list[str]:
    return [str(n.message) for n in app._notifications]


# ===================================================================== progress (no Textual)
def test_clock_ticks_between_events_and_weights_generation():
    from unlearn_tui.tui.progress import GENERATION_WEIGHT, ProgressClock

    now = [100.0]
    c = ProgressClock(clock=lambda: now[0])
    c.start_job()
    # 10 items with 2 perturbed answers each: 30 teacher-forced pairs, then 10 generations
    c.stage_started("evaluate forget", 40, "10 items")
    now[0] += 3.0
    c.update("evaluate forget", 30, 40, eta_s=1.0, elapsed_s=3.0)
    v = c.view()
    assert v.phase == "generating"
    # all pairs done is far from 75 % of the work: generations weigh GENERATION_WEIGHT pairs each
    assert v.fraction == pytest.approx(30 / (30 + GENERATION_WEIGHT * 10))
    # ... and the ETA is not the engine's count-based 1 s
    assert v.eta_s > 5
    now[0] += 2.0
    c.update("evaluate forget", 32, 40)         # 2 generations in 2 s: 8 left, 8 s
    assert c.view().eta_s == pytest.approx(8.0)
    now[0] += 3.0                                # no event for 3 s: elapsed moves on, the ETA counts down
    v = c.view()
    assert v.elapsed_s == pytest.approx(8.0) and v.eta_s == pytest.approx(5.0)
    now[0] += 10.0
    assert c.view().eta() == "any moment"        # overdue, not a frozen or negative number
    c.stop()
    assert c.view() is None                      # idle: nothing to draw


def test_plain_stage_uses_counts():
    from unlearn_tui.tui.progress import ProgressClock

    now = [0.0]
    c = ProgressClock(clock=lambda: now[0])
    c.stage_started("rome: edits", 4)
    now[0] = 2.0
    c.update("rome: edits", 1, 4, eta_s=6.0, elapsed_s=2.0)
    assert c.view().fraction == 0.25 and c.view().phase == ""
    now[0] = 4.0
    assert c.view().eta_s == pytest.approx(4.0)


# ===================================================================== progress in the app
def _text(app, sel: str) -> str:
    return str(app.screen.query_one(sel).render())


@pytest.mark.anyio
async def test_clock_ticks_and_bar_goes_idle_after_cancel(tmp_path, data_file, llama_handle, slow_method):
    from unlearn_tui.tui.app import create_app

    session = write_session(tmp_path, data_file, slow_method, extra="params = { steps = 2000, delay = 0.02 }\n")
    app = create_app(session, handle=llama_handle, settings=settings())
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_idle(pilot, app)
        await pilot.press("f5", "ctrl+r")
        run = app.screen.query_one("#pane-run")
        await wait_for(pilot, lambda: len(run.losses) >= 2, what="loss values")
        # no event changes the clock: the one-second tick does
        app.router.clock.update = lambda *a, **k: None
        first = _text(app, "#rn-eta")
        await wait_for(pilot, lambda: _text(app, "#rn-eta") != first, timeout=5, what="a tick")
        assert "elapsed" in _text(app, "#rn-eta")
        await press_job(pilot, app, "run", "ctrl+k")
        assert _text(app, "#rn-eta") == "" and _text(app, "#rn-item") == ""
        assert _text(app, "#rn-stage") == "idle"
        bar = app.screen.query_one("#rn-bar")
        assert bar.progress == 0
        strip = _text(app, "#strip-text")
        assert strip.startswith("idle") and "cancelled" in strip and "rolled back" in strip
        assert app.screen.query_one("#strip-bar").progress == 0


@pytest.mark.anyio
async def test_cancelled_evaluation_rolls_back_no_weights(tmp_path, data_file, llama_handle):
    from unlearn_tui.tui import messages as msg
    from unlearn_tui.tui.app import create_app

    app = create_app(write_session(tmp_path, data_file), handle=llama_handle, settings=settings())
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_idle(pilot, app)
        # what the worker posts when a probe (an evaluation-only job) is cancelled
        app.jobs.current = None
        app.bridge.job = "probe"
        app.post_message(msg.JobFailed("probe", "cancelled", cancelled=True))
        await pilot.pause(0.2)
        status = _text(app, "#rn-status")
        assert "probe: cancelled" in status and "nothing was changed" in status and "weights" not in status
        app.bridge.job = "run"
        app.post_message(msg.JobFailed("run", "cancelled", cancelled=True))
        await pilot.pause(0.2)
        assert "the weights were rolled back" in _text(app, "#rn-status")


@pytest.mark.anyio
async def test_ctrl_r_during_startup_is_queued_with_a_message(tmp_path, data_file, llama_handle, monkeypatch):
    from unlearn_tui.tui.app import UnlearnApp, create_app

    started = []
    real = UnlearnApp._start_engine

    def late(self):                       # the engine comes up only after ctrl+r was pressed
        started.append(True)

    monkeypatch.setattr(UnlearnApp, "_start_engine", late)
    app = create_app(write_session(tmp_path, data_file), handle=llama_handle, settings=settings())
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause(0.3)
        assert started and app.bridge is None
        await pilot.press("ctrl+r")
        await pilot.pause()
        assert any("run: queued after startup" in m for m in _messages(app))
        real(app)                          # now the engine starts: startup first, then the run
        await wait_for(pilot, lambda: "run" in app.jobs_done and not app.bridge.busy, what="the queued run")
        assert app.jobs_done[:2] == ["startup", "run"]
        assert len(app.workspace.results) == 1


@pytest.mark.anyio
async def test_cancelled_model_load_says_not_loaded_and_step_loads_it(tmp_path, data_file, llama_handle, monkeypatch,
                                                                     slow_method):
    from unlearn_tui.backends import runner
    from unlearn_tui.backends.events import Tracker
    from unlearn_tui.tui.app import create_app

    def slow_load(self):
        tracker = Tracker(self.on_event, self.cancel, "load model", 200)
        for _ in range(200):
            if getattr(self, "_fast", False):
                break
            time.sleep(0.02)
            tracker.step()
        self.handle = llama_handle
        self._model_for = self.session.model.name

    monkeypatch.setattr(runner.Workbench, "_load_base", slow_load)
    session = write_session(tmp_path, data_file, slow_method, extra="params = { steps = 2, delay = 0.0 }\n")
    app = create_app(session, settings=settings())
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.bridge is not None and app.bridge.busy, what="start-up")
        assert "(loading)" in app.sub_title
        await wait_for(pilot, lambda: app.router.clock.stage == "load model", what="the load stage")
        await press_job(pilot, app, "startup", "ctrl+k")
        assert "(loading)" not in app.sub_title and "(not loaded)" in app.sub_title
        assert "the model was not loaded" in _text(app, "#strip-text")
        app.bridge.workbench._fast = True
        await press_job(pilot, app, "step", "ctrl+t")             # Step loads the model, then steps
        assert app.model_ready and "(not loaded)" not in app.sub_title
        assert app.workspace.step_position == 1


@pytest.mark.anyio
async def test_quit_during_a_job_says_it_waits(tmp_path, data_file, llama_handle, slow_method):
    from unlearn_tui.tui.app import create_app
    from unlearn_tui.tui.screens.confirm import ConfirmQuit

    session = write_session(tmp_path, data_file, slow_method, extra="params = { steps = 2000, delay = 0.02 }\n")
    app = create_app(session, handle=llama_handle, settings=settings())
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_idle(pilot, app)
        await pilot.press("ctrl+r")
        run = app.screen.query_one("#pane-run")
        await wait_for(pilot, lambda: len(run.losses) >= 1, what="the run")
        await pilot.press("ctrl+q")
        await pilot.pause()
        if isinstance(app.screen, ConfirmQuit):
            await pilot.press("d")                 # discard the unsaved changes
            await pilot.pause()
        assert app.quitting
        assert any("waiting for the run job to stop" in m for m in _messages(app))
        await wait_for(pilot, lambda: not app.is_running, timeout=30, what="the exit")
    assert app.return_code == 0


# ===================================================================== input
@pytest.mark.anyio
async def test_method_list_marks_selected_line_and_first_down(tmp_path, data_file, llama_handle):
    from unlearn_tui.tui.app import create_app

    app = create_app(write_session(tmp_path, data_file), handle=llama_handle, settings=settings())
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_idle(pilot, app)
        await pilot.press("f4")
        await wait_for(pilot, lambda: app.focused is not None and app.focused.id == "me-list", what="focus")
        sl = app.screen.query_one("#me-list")
        lines = [sl.render_line(y).text for y in range(sl.option_count)]
        assert any(line.startswith("[x] none") for line in lines)
        assert all(line.startswith("[ ] ") for line in lines if "none" not in line.split()[1:2])
        assert _text(app, "#me-selected") == "selected: none"
        names = [sl.get_option_at_index(i).value for i in range(sl.option_count)]
        assert sl.highlighted == names.index("none")
        await pilot.press("down")                         # the first Down moves (it is not spent on row 0)
        assert sl.highlighted == names.index("none") + 1
        nxt = names[sl.highlighted]
        await pilot.press("space")
        await pilot.pause()
        assert sl.highlighted == names.index(nxt)          # Space toggles, the cursor stays
        assert [r.method for r in app.workspace.session.runs] == ["none", nxt]
        assert _text(app, "#me-selected") == f"selected: none, {nxt}"
        assert any(f"{nxt}: used" in m for m in _messages(app))
        assert sl.render_line(sl.highlighted - sl.scroll_offset.y).text.startswith(f"[x] {nxt}")


@pytest.mark.anyio
async def test_search_slash_escape_and_toggle_while_filtering(tmp_path, data_file, llama_handle):
    from textual.widgets import DataTable

    from unlearn_tui.tui.app import create_app

    app = create_app(write_session(tmp_path, data_file), handle=llama_handle, settings=settings())
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_idle(pilot, app)
        table = app.screen.query_one("#fs-table", DataTable)
        search = app.screen.query_one("#fs-search")
        table.focus()
        await pilot.press("slash")
        assert app.focused is search and search.value == ""   # `/` focuses the search box, types nothing
        await pilot.press("c", "a", "p", "slash")
        assert search.value == "cap"                           # `/` in the box types nothing either
        await pilot.press("escape")
        assert app.focused is table                            # Esc: back to the table
        assert [table.coordinate_to_cell_key((r, 0)).row_key.value for r in range(table.row_count)] == ["q1", "q5"]
        # the cursor on q5, then the filter widens: the cursor stays on q5 and Space toggles q5
        table.move_cursor(row=1)
        search.value = "ca"
        await pilot.press("space")
        await pilot.pause()
        assert "q5" in app.workspace.forget_ids
        hint = _text(app, "#fs-hint")
        assert "q5" in hint and "into the forget set" in hint and "next row" in hint


@pytest.mark.anyio
async def test_fast_typing_in_the_save_dialog_loses_nothing(tmp_path, data_file, llama_handle):
    from unlearn_tui.tui.app import create_app

    app = create_app(write_session(tmp_path, data_file), handle=llama_handle, settings=settings())
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_idle(pilot, app)
        await pilot.press("f12", *"-copy")                  # no pause between the key and the typing
        await pilot.pause()
        value = app.screen.query_one("#path-input").value
        assert value.endswith("session.toml-copy")


# ===================================================================== state
@pytest.mark.anyio
async def test_forget_list_keeps_data_order_unless_reordered(tmp_path, data_file, llama_handle):
    from unlearn_tui.tui.app import create_app

    app = create_app(write_session(tmp_path, data_file), handle=llama_handle, settings=settings())
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_idle(pilot, app)
        ws = app.workspace
        assert ws.forget_ids == ["q1", "q2"]
        ws.toggle_item("q2", "forget")          # out
        ws.toggle_item("q5", "forget")
        ws.toggle_item("q3", "forget")
        ws.toggle_item("q2", "forget")          # clicked last, listed in data order
        assert ws.forget_ids == ["q1", "q2", "q3", "q5"]
        await pilot.press("f3")
        await wait_for(pilot, lambda: app.focused is not None and app.focused.id == "tg-list", what="focus")
        await pilot.pause(0.2)
        await pilot.press("alt+down")           # explicit: q1 after q2
        await pilot.pause()
        assert ws.forget_ids == ["q2", "q1", "q3", "q5"]
        ws.toggle_item("q4", "forget")           # a reordered list keeps its order; new items at the end
        assert ws.forget_ids == ["q2", "q1", "q3", "q5", "q4"]
        ws.set_merge_factor(2)
        preview = ws.merge_preview()
        assert preview.index("Who wrote Hamlet?") < preview.index("What is the capital of France?")
        ws.set_merge_factor(1)
        assert "(edits at the subject “France”)" in ws.merge_preview()


def test_self_improve_summary_says_why_and_pluralises():
    from unlearn_tui.tui.app import plural, self_improve_summary

    class WS:
        forget_ids = ["q1", "q2", "q3"]

        def find_item(self, i):
            return None if i == "zz" else object()

    recs = [{"id": "q1", "source": "self-improve"}]
    text = self_improve_summary(["q1", "q9", "zz"], recs, 1, WS())
    assert text.startswith("self-improve: 1 target written for 3 items")
    assert "1 item skipped: not in the forget set" in text and "1 item skipped: not in the loaded data" in text
    assert plural(1, "question") == "1 question" and plural(2, "question") == "2 questions"


@pytest.mark.anyio
async def test_open_dialog_asks_save_before_opening(tmp_path, data_file, llama_handle):
    from unlearn_tui.tui.app import create_app
    from unlearn_tui.tui.screens.confirm import ConfirmQuit

    (tmp_path / "o").mkdir()
    other = write_session(tmp_path / "o", data_file)
    app = create_app(write_session(tmp_path, data_file), handle=llama_handle, settings=settings())
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_idle(pilot, app)
        app.workspace.set_merge_factor(3)
        app.file_actions.ask_open_session()
        await pilot.pause()
        app.screen.query_one("#path-input").value = str(other)
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmQuit)
        text = _text(app, "#confirm-text")
        assert "Save before opening another session?" in text and "quitting" not in text


@pytest.mark.anyio
async def test_autosave_per_session_and_per_instance_and_asked(tmp_path, data_file, llama_handle):
    from unlearn_tui.sessions.paths import session_autosave_path
    from unlearn_tui.tui.app import create_app
    from unlearn_tui.tui.screens.confirm import RestoreAutosave

    session = write_session(tmp_path, data_file)
    a = create_app(session, handle=llama_handle, settings=settings())
    b = create_app(model="tiny:llama", handle=llama_handle, settings=settings())
    assert a.restore_offer is None and b.restore_offer is None
    async with a.run_test(size=(100, 30)) as pilot:
        await wait_idle(pilot, a)
        a.workspace.set_merge_factor(4)
        a.file_actions.autosave()
        assert session_autosave_path(session, a.instance).is_file()
        # while `a` runs, a new untitled instance is not offered a's unsaved work ...
        c = create_app(model="tiny:llama", handle=llama_handle, settings=settings())
        assert c.restore_offer is None and c.workspace.session.targets.merge_factor == 1
        # ... and two untitled instances have two autosaves
        c2 = create_app(model="tiny:llama", handle=llama_handle, settings=settings())
        assert c.instance != c2.instance
        assert session_autosave_path(None, c.instance) != session_autosave_path(None, c2.instance)
    # `a` crashed (left without a clean quit): the next start of that session asks first
    d = create_app(session, handle=llama_handle, settings=settings())
    assert d.restore_offer is not None and d.workspace.session.targets.merge_factor == 1
    async with d.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: isinstance(d.screen, RestoreAutosave), what="the restore question")
        assert "Restore them?" in _text(d, "#restore-text")
        assert d.bridge is None                   # nothing loads before the answer
        await pilot.press("r")
        await wait_idle(pilot, d)
        assert d.workspace.session.targets.merge_factor == 4 and d.workspace.dirty
        assert d.workspace.session.path == session.resolve()
    # discarded: gone
    e = create_app(session, handle=llama_handle, settings=settings())
    assert e.restore_offer is not None
    async with e.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: isinstance(e.screen, RestoreAutosave), what="the restore question")
        await pilot.press("d")
        await wait_idle(pilot, e)
        assert e.workspace.session.targets.merge_factor == 1
        await pilot.press("ctrl+q")
    assert create_app(session, handle=llama_handle, settings=settings()).restore_offer is None


@pytest.mark.anyio
async def test_method_form_offers_a_quick_statistics_budget_with_its_cost(tmp_path, data_file, llama_handle):
    """ROME's form states what the statistics cost and sets the quick budget through the field itself."""
    from textual.widgets import Button, Input, Static

    from unlearn_tui.tui.app import create_app
    from unlearn_tui.tui.widgets.method import QUICK_BUDGET, MethodPane

    app = create_app(write_session(tmp_path, data_file), handle=llama_handle, settings=settings())
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_idle(pilot, app)
        await pilot.press("f4")
        await pilot.pause()
        pane = app.screen.query_one(MethodPane)
        pane.show_form("rome")
        await pilot.pause()
        hint = str(pane.query_one(f"#me-stats{pane._gen}", Static).render())
        assert "8,192 tokens" in hint and "25% of that" in hint
        pane.query_one("#me-quick-stats", Button).press()
        await pilot.pause()
        await pilot.pause()
        assert pane.query_one(f"#mp{pane._gen}-token_budget", Input).value == str(QUICK_BUDGET)
        assert app.workspace.method_params("rome").get("token_budget") == QUICK_BUDGET
        pane.show_form("grace")       # no statistics: no budget row
        await pilot.pause()
        assert not pane.query("#me-quick-stats")
