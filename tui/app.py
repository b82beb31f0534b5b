"""The unlearn-tui Textual app: screens, themes, keymap, palette and routing.

:func:`create_app` is the one factory shared by the CLI (:func:`run_app`) and
the tests.  The state lives in a :class:`tui.workspace.Workspace` (no Textual);
session files in :mod:`tui.files`; engine jobs are :class:`tui.jobs.Job`
values in a :class:`tui.jobs.JobQueue`, each one call on the
:class:`backends.runner.Workbench`, run by :class:`tui.worker.EngineBridge` in
one thread worker that only posts messages (:mod:`tui.messages`).  The App
routes: pane messages (tui/widgets/__init__.py) to workspace changes, every
workspace change to each pane's ``refresh_from(workspace)``, engine messages to
the Run pane and the status strip.

Nothing here imports torch or transformers at module level: the first frame
is drawn, then the model loads in the background (``first_frame`` records
when, and whether torch was already imported: it must not be).
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from textual.app import App, SystemCommand
from textual.binding import Binding

from unlearn_tui.backends.errors import UserError

from . import actions, files
from . import messages as msg
from .jobs import EDITING_JOBS, Job, JobQueue
from .settings import Settings
from .settings import load as load_settings
from .widgets import ActionRequested
from .workspace import Workspace, quiet

START = time.perf_counter()
PANES = ("forget", "targets", "method", "run", "results", "probe")


def _nothing(what: str) -> Any:
    raise UserError(f"nothing to {what}")


class UnlearnApp(App):
    CSS_PATH = "app.tcss"
    TITLE = "unlearn-tui"
    BINDINGS: list[Binding] = actions.bindings()
    ENABLE_COMMAND_PALETTE = True

    def __init__(self, session: Any, session_label: str | None = None, restored: bool = False,
                 model: str | None = None, settings: Settings | None = None,
                 problems: Iterable[str] = (), handle: Any = None, autostart: bool = True,
                 trust_remote_code: bool = False) -> None:
        super().__init__()
        self.workspace = Workspace(session, settings, dirty=restored, on_change=self._workspace_changed)
        self.settings = self.workspace.settings
        self.trust_remote_code = trust_remote_code   # --trust-remote-code: sessions may ask for model code
        self._problems = list(problems)
        self._restored = restored
        self._handle = handle
        self.autostart = autostart
        self.model_ready = handle is not None
        self.bridge: Any = None
        self.jobs = JobQueue(start=lambda job: self.bridge.start(job),
                             busy=lambda: self.bridge is not None and self.bridge.busy,
                             running=lambda: self.bridge.job if self.bridge is not None else None)
        self._autosave_timer: Any = None
        self.user_keymap: dict[str, str] = {}
        self.first_frame: float | None = None          # seconds from module import to the first frame
        self.torch_at_first_frame: bool | None = None
        self.jobs_done: list[str] = []                # names of finished jobs (tests, status)
        self.last_error: str | None = None
        self._install_themes()

    def _install_themes(self) -> None:
        """Register our themes and the user's, pick the configured one (before the first CSS pass)."""
        from . import themes

        found, problems = themes.load_all()
        for t in found:
            self.register_theme(t)
        self._problems += problems
        wanted = self.settings.theme
        if wanted not in self.available_themes:
            self._problems.append(f"settings: unknown theme {wanted!r}; using {themes.DEFAULT_DARK}")
            wanted = themes.DEFAULT_DARK
        self.theme = wanted

    # ================================================================ start-up
    def on_mount(self) -> None:
        from .screens.main import MainScreen

        keymap, kproblems = actions.load_keymap()
        self._problems += kproblems
        if keymap:
            self.user_keymap = dict(keymap)
            self.set_keymap(keymap)
        self.push_screen(MainScreen(self.workspace))
        self.update_title()
        for p in self._problems:
            self.notify(quiet(p), severity="warning", timeout=8)
        if self._restored:
            self.notify("restored unsaved work from the autosave", timeout=6)
        self.set_interval(self.settings.autosave_seconds, self.autosave)
        self.call_after_refresh(self._after_first_frame)

    def _after_first_frame(self) -> None:
        from .worker import EngineBridge  # the engine's (torch-free) modules load after the first frame

        if self.first_frame is None:  # fallback if _display below was not reached
            self._mark_first_frame()
        self.bridge = EngineBridge(self, self.workspace.session, self._handle, self.settings.progress_hz,
                                   refuse_model=self.remote_code_refusal)
        if self.autostart:
            self.start_startup()

    def _mark_first_frame(self) -> None:
        self.first_frame = time.perf_counter() - START
        self.torch_at_first_frame = "torch" in sys.modules
        self.call_later(self._first_frame_drawn)   # runs once this frame is written

    def _first_frame_drawn(self) -> None:
        """Build the panes the first frame did not need (see tui/screens/main.py)."""
        from .screens.main import MainScreen

        for screen in self.screen_stack:
            if isinstance(screen, MainScreen):
                screen.mount_deferred()

    def _display(self, screen: Any, renderable: Any) -> None:  # Textual hook: every frame goes through here
        if self.first_frame is None and renderable is not None and not self._batch_count \
                and type(screen).__name__ == "MainScreen":
            self._mark_first_frame()
        super()._display(screen, renderable)

    def _handle_exception(self, error: Exception) -> None:  # Textual hook: an unhandled error ends the app
        from textual.css.query import NoMatches

        if isinstance(error, NoMatches) and not self.is_running:
            # quitting while the deferred panes are still mounting (the first instants after the first
            # frame): shutdown prunes a widget's children before its own mount handler looks them up
            return
        super()._handle_exception(error)

    # ================================================================ state down: one refresh protocol
    def pane(self, name: str):
        """The pane widget, or None while it is not mounted (only the Forget set pane is in the first frame)."""
        for screen in reversed(self.screen_stack):
            found = screen.query(f"#pane-{name}")
            if found:
                p = found.first()
                return p if p.is_mounted and getattr(p, "ready", False) else None
        return None

    def refresh_panes(self) -> None:
        """Every mounted pane redraws what changed in the workspace (``refresh_from``)."""
        for name in PANES:
            p = self.pane(name)
            if p is not None:
                p.refresh_from(self.workspace)

    def _run_pane(self):
        return self.pane("run")

    def _workspace_changed(self, aspects: frozenset, dirty: bool) -> None:
        if not self.is_running:
            return
        self.update_title()
        if dirty:
            if self._autosave_timer is not None:
                self._autosave_timer.stop()
            self._autosave_timer = self.set_timer(1.0, self.autosave)
        self.refresh_panes()

    def update_title(self) -> None:
        ws = self.workspace
        name = ws.session.path.name if ws.session.path is not None else "untitled"
        state = " (not loaded)" if self.remote_code_refusal() else " (loading)"
        model = ws.model_name + ("" if self.model_ready else state)
        self.sub_title = f"{name}{' *' if ws.dirty else ''} · {model}"

    # ================================================================ messages up from the panes
    async def on_action_requested(self, m: ActionRequested) -> None:
        await self.run_action(m.action)

    def on_forget_set_pane_toggled(self, m: Any) -> None:
        self.workspace.toggle_item(m.item_id, m.which)

    def on_targets_pane_target_edited(self, m: Any) -> None:
        self.workspace.edit_target(m.item_id, m.text)

    def on_targets_pane_target_reset(self, m: Any) -> None:
        self.workspace.reset_target(m.item_id)

    def on_targets_pane_mode_changed(self, m: Any) -> None:
        self.workspace.set_target_mode(m.mode)

    def on_targets_pane_merge_factor_changed(self, m: Any) -> None:
        self.workspace.set_merge_factor(m.merge_factor)

    def on_targets_pane_self_improve_requested(self, m: Any) -> None:
        self.action_self_improve([m.item_id] if m.item_id else None)

    def on_method_pane_methods_changed(self, m: Any) -> None:
        self.workspace.set_methods(m.names)

    def on_method_pane_param_changed(self, m: Any) -> None:
        self.workspace.set_param(m.method, m.field, m.value)

    def on_method_pane_param_invalid(self, m: Any) -> None:
        self.workspace.param_invalid(m.method, m.field, m.message)

    # ================================================================ jobs
    def submit(self, make: Any, name: str) -> None:
        """Queue a job: ``make()`` (UI thread, when it starts) returns a :class:`Job`."""
        if self.bridge is None:
            return
        self._answer(self.jobs.submit(make, name))

    def _answer(self, answer: Any) -> None:
        if answer is None:
            return
        if answer.status == "started":
            job = self.jobs.current
            run = self._run_pane()
            if run is not None and job is not None and job.name in EDITING_JOBS:
                run.reset_loss()
                run.status("")
            self._strip(answer.message)
        elif answer.status == "queued":
            self.notify(answer.message, timeout=3)
        elif answer.status == "refused":
            self.report_error(answer.message)
            self._next_job()

    def _next_job(self) -> None:
        self._answer(self.jobs.next())

    def _job(self, name: str, call: Any, on_done: Any = None) -> Job:
        return Job(name, call, self.workspace.snapshot(), on_done=on_done)

    def start_startup(self, reload_model: bool = True, name: str = "startup") -> None:
        def make() -> Job:
            post = self.post_message
            limit = self.settings.baseline_limit if self.settings.baseline_on_load else 0

            def on_items(items: Any, error: Any) -> None:
                post(msg.EngineNote(name, "data", items, error))

            return self._job(name, lambda wb: wb.startup(reload_model, limit, on_items),
                             self.workspace.set_baseline)

        self.submit(make, name)

    def on_engine_note(self, m: msg.EngineNote) -> None:
        if m.kind == "data":
            warning = self.workspace.data_loaded(m.value, m.error)
            if m.error:
                self.report_error(m.error)
            if warning:
                self.notify(warning, severity="warning")
        elif m.kind == "model":
            self.model_ready = True
            self.workspace.model_name = str(m.value)
            self.update_title()
            self.notify(f"model ready: {m.value}", timeout=3)

    def on_job_started(self, m: msg.JobStarted) -> None:
        self._strip(f"{m.job}: started")

    def on_stage_changed(self, m: msg.StageChanged) -> None:
        run = self._run_pane()
        if run is not None:
            run.stage(m.stage, m.total, m.detail)
            run.log_line(f"{m.stage} {m.detail}".strip())
        self._strip(f"{m.job}: {m.stage}", 0, m.total)

    def on_progress_update(self, m: msg.ProgressUpdate) -> None:
        run = self._run_pane()
        if run is not None:
            run.progress(m)
        eta = f" · ETA {m.eta_s:.0f}s" if m.eta_s is not None else ""
        self._strip(f"{m.job}: {m.stage} {m.done}/{m.total if m.total else '?'}{eta}", m.done, m.total)

    def on_log_line(self, m: msg.LogLine) -> None:
        run = self._run_pane()
        if run is not None:
            run.log_line(m.message, m.level)
        if m.level == "warning":
            self.notify(m.message, severity="warning", timeout=5)

    def on_run_started_msg(self, m: msg.RunStartedMsg) -> None:
        run = self._run_pane()
        if run is not None:
            run.reset_loss()
            run.status(f"run {m.index + 1}/{m.total_runs}: {m.method}")

    def on_run_done(self, m: msg.RunDone) -> None:
        self.workspace.add_result(m.result)

    def on_job_done(self, m: msg.JobDone) -> None:
        job = self.jobs.finished()
        self.bridge.finished()
        self.jobs_done.append(m.job)
        self._strip(f"{m.job}: done in {m.seconds:.1f}s", 1, 1)
        if job is not None and job.on_done is not None:
            job.on_done(m.value)
        self._next_job()

    def on_job_failed(self, m: msg.JobFailed) -> None:
        self.jobs.finished()
        self.bridge.finished()
        self.jobs_done.append(m.job)
        run = self._run_pane()
        if m.cancelled:
            text = f"{m.job}: cancelled; the weights were rolled back"
            self.notify(text, severity="warning", timeout=6)
            if run is not None:
                run.status(f"[b yellow]{text}[/]")
                run.log_line(text, "warning")
            self._strip(text)
            self.jobs.clear()
        else:
            self.report_error(f"{m.job}: {m.message}", modal=m.bug)
            if run is not None:
                run.status(f"[b red]{m.job} failed[/]: {m.message}" +
                           ("; the weights were rolled back" if m.rolled_back and m.job in ("run", "step") else ""))
            self._strip(f"{m.job} failed")
        if self.workspace.baseline_pending:
            self.workspace.set_baseline(None)
        self._next_job()

    def report_error(self, message: str, modal: bool = False) -> None:
        self.last_error = message
        run = self._run_pane()
        if run is not None:
            run.log_line(message, "error")
        if modal:
            from .screens.error import ErrorModal

            self.push_screen(ErrorModal(message))
        else:
            self.notify(message, severity="error", timeout=10)

    def _strip(self, text: str, done: int | None = None, total: int | None = None) -> None:
        try:
            self.screen.query_one("#strip-text").update(text)
            if done is not None:
                self.screen.query_one("#strip-bar").update(total=total, progress=done)
        except Exception:
            pass

    # ================================================================ actions: runs and step mode
    def action_show_tab(self, tab: str) -> None:
        from .screens.main import MainScreen

        if isinstance(self.screen, MainScreen):
            self.screen.show_tab(tab)

    def action_help(self) -> None:
        from .screens.help import HelpScreen

        self.push_screen(HelpScreen())

    def _make_run(self, name: str = "run") -> Job:
        self.workspace.check_runnable()
        return self._job(name, lambda wb: wb.run_all(), self._done_run)

    def _done_run(self, result: Any) -> None:
        self.workspace.run_finished(result)
        run = self._run_pane()
        if run is not None:
            text = f"[b green]finished[/]: {len(result.runs)} run(s)"
            if result.undone:
                text += f" (the {result.undone} kept step edit(s) were undone first)"
            run.status(text)
            run.idle("idle")
        self.notify("run finished; see Results (f6)", timeout=4)

    def action_run(self) -> None:
        self.action_show_tab("run")
        self.submit(self._make_run, "run")

    def action_replay(self) -> None:
        """Re-run the whole session: reload its data, then every run."""
        self.workspace.clear_results()
        self.start_startup(reload_model=False, name="reload")
        self.submit(functools.partial(self._make_run, "replay"), "replay")

    def action_cancel(self) -> None:
        if self.bridge is not None and self.bridge.request_cancel():
            self.jobs.clear()
            self.notify("cancelling…", timeout=2)
        else:
            self.notify("nothing is running", timeout=2)

    def _probe_question(self) -> str:
        p = self.pane("probe")
        return p.question if p is not None else ""

    def _after_step(self, what: str, step: Any) -> None:
        text = self.workspace.step_finished(what, step)
        run = self._run_pane()
        if run is not None:
            run.status(text)
        self.notify(text, timeout=3)

    def action_step(self) -> None:
        def make() -> Job:
            self.workspace.check_runnable()
            question = self._probe_question() or None
            return self._job("step", lambda wb: wb.step_next(question=question),
                             functools.partial(self._after_step, "step"))

        self.submit(make, "step")

    def _make_undo(self, redo: bool) -> Job:
        question = self._probe_question() or None
        what = "redo" if redo else "undo"
        if redo:
            call = lambda wb: wb.redo(score=True, question=question) or _nothing(what)  # noqa: E731
        else:
            call = lambda wb: wb.undo(score=True, question=question) or _nothing(what)  # noqa: E731
        return self._job(what, call, functools.partial(self._after_step, what))

    def action_undo_edit(self) -> None:
        self.submit(functools.partial(self._make_undo, False), "undo")

    def action_redo_edit(self) -> None:
        self.submit(functools.partial(self._make_undo, True), "redo")

    def action_probe(self) -> None:
        question = self._probe_question()
        if not question:
            self.action_show_tab("probe")
            self.notify("type a question in the Probe pane", timeout=3)
            return
        self.workspace.probe_answered((question, None, None))    # "thinking…" until the answer is in
        self.submit(lambda: self._job("probe", lambda wb: (question, *wb.probe(question)),
                                      self.workspace.probe_answered), "probe")

    def action_self_improve(self, item_ids: list[str] | None = None) -> None:
        if item_ids is None:
            t = self.pane("targets")
            cur = t.current_item() if t is not None and self._focus_in(t) else None
            item_ids = [cur] if cur else self.workspace.forget_ids
        if not item_ids:
            self.notify("select forget items first", severity="warning")
            return
        ids = list(item_ids)

        def done(records: list) -> None:
            n = self.workspace.store_generated(records)
            self.notify(f"self-improve: {n} target(s) written", timeout=4)

        self.submit(lambda: self._job("self-improve", lambda wb: wb.write_targets(ids), done), "self-improve")

    def _focus_in(self, widget: Any) -> bool:
        f = self.focused
        while f is not None:
            if f is widget:
                return True
            f = f.parent
        return False

    # ================================================================ actions: data and session files
    def action_open_data(self) -> None:
        from unlearn_tui.backends import data as data_mod

        from .screens.dialogs import PathDialog

        def chosen(path: str | None) -> None:
            if not path:
                return
            spec = path
            if path in data_mod.builtin_names():
                spec = f"builtin:{path}"
            elif not path.startswith(("builtin:", "hub:")):
                spec = str(Path(path).expanduser().resolve())
            self.open_data(spec)

        self.push_screen(PathDialog("Open a data file (JSON, JSONL, CSV, Parquet) or a built-in set",
                                    choices=data_mod.builtin_names()), chosen)

    def open_data(self, spec: str, fmt: str = "auto") -> None:
        self.workspace.open_data(spec, fmt)
        self.start_startup(reload_model=False, name="reload")

    def action_save(self) -> None:
        if self.workspace.session.path is None:
            self.action_save_as()
            return
        self.save_to(None)

    def save_to(self, path: str | None) -> bool:
        where, error = files.save(self.workspace.session, path)
        if error is not None:
            self.report_error(error)
            return False
        self.workspace.mark_clean()
        self.update_title()
        files.drop_autosave()
        self.notify(f"saved {where}", timeout=3)
        return True

    def action_save_as(self) -> None:
        from .screens.dialogs import PathDialog

        current = self.workspace.session.path
        start = current.parent if current else Path.cwd()
        value = str(current) if current else str(Path.cwd() / "session.toml")

        def chosen(path: str | None) -> None:
            if path:
                self.save_to(path)

        self.push_screen(PathDialog("Save the session as", value=value, start=start, must_exist=False,
                                    ok="Save"), chosen)

    def _guard_unsaved(self, then: Callable[[], None], what: str = "The session has unsaved changes.") -> None:
        from .screens.confirm import ConfirmQuit

        if not self.workspace.dirty:
            then()
            return

        def chosen(choice: str | None) -> None:
            if choice == "save":
                if self.workspace.session.path is None:
                    self.action_save_as()
                    return
                if self.save_to(None):
                    then()
            elif choice == "discard":
                then()

        self.push_screen(ConfirmQuit(what), chosen)

    def action_open_session(self) -> None:
        from .screens.dialogs import PathDialog

        def chosen(path: str | None) -> None:
            if path:
                self._guard_unsaved(lambda: self.open_session(path))

        self.push_screen(PathDialog("Open a session (TOML)"), chosen)

    def open_session(self, path: str | Path) -> bool:
        s, error = files.open_session(path)
        if error is not None:
            self.report_error(error)
            return False
        refusal = self.remote_code_refusal(s)
        if refusal:                    # not opened: the current session (and model) stay
            self.report_error(quiet(refusal))
            return False
        self.replace_session(s)
        self.notify(f"opened {path}", timeout=3)
        return True

    def action_new_session(self) -> None:
        from unlearn_tui import sessions

        self._guard_unsaved(lambda: self.replace_session(
            sessions.new_session(model={"name": self.workspace.model_name})))

    def replace_session(self, s: Any) -> None:
        reload_model = self.workspace.replace_session(s)
        if reload_model:
            self.model_ready = False
        files.drop_autosave()
        self.update_title()
        self.start_startup(reload_model=reload_model, name="reload")

    def action_import_yaml(self) -> None:
        from .screens.dialogs import PathDialog

        def chosen(path: str | None) -> None:
            if path:
                self.import_yaml(path)

        self.push_screen(PathDialog("Import EasyEdit hparams (YAML)"), chosen)

    def import_yaml(self, path: str) -> bool:
        try:
            from unlearn_tui.backends import easyedit
        except ImportError:
            self.report_error("EasyEdit YAML import is not available in this build yet")
            return False
        try:
            method, params, ignored = easyedit.import_hparams(path)
        except UserError as exc:
            self.report_error(quiet(exc))
            return False
        self.workspace.import_params(method, params)
        extra = f"; ignored: {', '.join(ignored)}" if ignored else ""
        self.notify(f"imported {method} hyper-parameters from {Path(path).name}{extra}", timeout=6)
        return True

    # ---- autosave and quitting
    def autosave(self) -> None:
        """Write the unsaved session to the autosave file (see tui/files.py)."""
        self._autosave_timer = None
        if not self.workspace.dirty:
            return
        error = files.write_autosave(self.workspace.session)
        if error:
            self.notify(error, severity="warning", timeout=5)

    async def action_quit(self) -> None:
        def leave() -> None:
            if self.bridge is not None:
                self.bridge.request_cancel()
            if self._autosave_timer is not None:
                self._autosave_timer.stop()
            self.workspace.dirty = False          # discarded (or saved): nothing left for the autosave
            files.drop_autosave()
            self.exit(0)

        self._guard_unsaved(leave)

    def on_unmount(self) -> None:
        # leaving for any reason: stop the engine at its next cancellation point (weights roll back)
        if self.bridge is not None:
            self.bridge.request_cancel()

    def remote_code_refusal(self, session: Any = None) -> str | None:
        """The one-line error when ``session`` (default: the app's) may not load its model, else None.

        A session with ``[model] trust_remote_code = true`` would run Python code shipped with the
        model; the app loads it only when started with ``--trust-remote-code``.
        """
        s = session if session is not None else self.workspace.session
        if not getattr(s.model, "trust_remote_code", False) or self.trust_remote_code:
            return None
        where = f"{s.path}: " if s.path is not None else ""
        return (f"{where}model.trust_remote_code = true would run code shipped with the model; the model "
                f"was not loaded: start unlearn-tui with --trust-remote-code to allow it")

    # ---- command palette
    def get_system_commands(self, screen: Any) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        keys = actions.current_keys(self)
        for a in actions.ACTIONS:
            if a.scope != "app" or a.id == "quit":
                continue
            yield SystemCommand(a.description, f"{a.id} · {keys[a.id]}",
                                functools.partial(self.run_action, a.action))


def create_app(session_path: str | Path | None = None, model: str | None = None, device: str | None = None,
               *, settings: Settings | None = None, handle: Any = None, autostart: bool = True,
               restore: bool = True, trust_remote_code: bool = False) -> UnlearnApp:
    """The app for a session file (or the autosave, or a new session).

    ``model``/``device`` override the session's ``[model]``; ``handle`` (tests)
    is an already loaded model handle.  Without ``trust_remote_code`` (the CLI's
    ``--trust-remote-code``) a session with ``[model] trust_remote_code = true``
    is shown but its model is not loaded (an error notification says why).
    Raises UserError for a bad session file.
    """
    from unlearn_tui import sessions

    problems: list[str] = []
    if settings is None:
        settings, problems = load_settings()
    restored = False
    session = None
    if session_path is not None:
        session = sessions.load(session_path)
    elif restore:
        session, restored, p = files.restore_autosave()
        problems += p
    if session is None:
        session = sessions.new_session()
    if model:
        session.model.name = model
    if device:
        session.model.device = device
    return UnlearnApp(session, restored=restored, model=model, settings=settings, problems=problems,
                      handle=handle, autostart=autostart, trust_remote_code=trust_remote_code)


def run_app(session_path: str | Path | None = None, model: str | None = None, device: str | None = None,
            trust_remote_code: bool = False) -> int:
    app = create_app(session_path, model, device, trust_remote_code=trust_remote_code)
    result = app.run()
    return int(result or 0) if isinstance(result, int) else 0
