"""The unlearn-tui Textual app: screens, themes, keymap, palette and routing.

:func:`create_app` is the one factory shared by the CLI (:func:`run_app`) and
the tests.  The state lives in a :class:`tui.workspace.Workspace` (no Textual);
session files in :mod:`tui.files`, and the actions on them that ask the user
(dialogs, the unsaved-changes guard, the autosave timer) in
:mod:`tui.file_actions`; engine jobs are :class:`tui.jobs.Job` values in a
:class:`tui.jobs.JobQueue`, each one call on the
:class:`backends.runner.Workbench`, run by :class:`tui.worker.EngineBridge` in
one thread worker that only posts messages (:mod:`tui.messages`).  The App
routes: pane messages (tui/widgets/__init__.py) to workspace changes, every
workspace change to each pane's ``refresh_from(workspace)``, engine messages
through :class:`tui.routing.EngineRouter` to the Run pane and the status strip.

Nothing here imports torch or transformers at module level: the first frame
is drawn, then the model loads in the background (``first_frame`` records
when, and whether torch was already imported: it must not be).
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from textual import on
from textual.app import App, SystemCommand
from textual.binding import Binding

from . import actions, files, jobs
from . import messages as msg
from .file_actions import FileActions
from .jobs import JobQueue
from .routing import EngineRouter
from .settings import Settings
from .settings import load as load_settings
from .widgets import ActionRequested
from .workspace import Workspace, quiet

START = time.perf_counter()


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 target``, ``2 targets`` (``many`` for irregular plurals)."""
    return f"{n} {word if n == 1 else (many or word + 's')}"


def self_improve_summary(asked: list[str], records: list[dict], stored: int, ws: Any) -> str:
    """What self-improve did: how many targets were written, and why the others were not."""
    got = {r["id"] for r in records}
    fell_back = sum(1 for r in records if r.get("source") == "fallback")
    parts = [f"self-improve: {plural(stored, 'target')} written for {plural(len(asked), 'item')}"]
    if fell_back:
        parts.append(f"{fell_back} of them a fixed refusal (the model's own answers leaked the fact or "
                     "did not refuse)")
    skipped = [i for i in asked if i not in got]
    if skipped:
        not_loaded = [i for i in skipped if ws.find_item(i) is None]
        not_forget = [i for i in skipped if i not in not_loaded and i not in ws.forget_ids]
        other = [i for i in skipped if i not in not_loaded and i not in not_forget]
        if not_loaded:
            parts.append(f"{plural(len(not_loaded), 'item')} skipped: not in the loaded data")
        if not_forget:
            parts.append(f"{plural(len(not_forget), 'item')} skipped: not in the forget set")
        if other:
            parts.append(f"{plural(len(other), 'item')} skipped: the model wrote nothing usable")
    return "; ".join(parts)
PANES = ("forget", "targets", "method", "run", "results", "probe")


class UnlearnApp(App):
    CSS_PATH = "app.tcss"
    TITLE = "unlearn-tui"
    BINDINGS: list[Binding] = actions.bindings()
    ENABLE_COMMAND_PALETTE = True

    def __init__(self, session: Any, session_label: str | None = None, restored: bool = False,
                 model: str | None = None, settings: Settings | None = None,
                 problems: Iterable[str] = (), handle: Any = None, autostart: bool = True,
                 trust_remote_code: bool = False, restore_offer: Any = None, instance: str | None = None) -> None:
        super().__init__()
        self.instance = instance or files.new_instance()   # keys this instance's untitled autosave
        self.restore_offer = restore_offer    # an autosave to offer (files.AutosaveOffer): asked on mount
        self.workspace = Workspace(session, settings, dirty=restored, on_change=self._workspace_changed)
        self.settings = self.workspace.settings
        self.trust_remote_code = trust_remote_code   # --trust-remote-code: sessions may ask for model code
        self._problems = list(problems)
        self._restored = restored
        self._handle = handle
        self.autostart = autostart
        self.model_ready = handle is not None
        self.bridge: Any = None
        # until the engine exists (the first frame is drawn first) every job waits, named "after startup"
        self.jobs = JobQueue(start=lambda job: self.bridge.start(job),
                             busy=lambda: self.bridge is None or self.bridge.busy,
                             running=lambda: self.bridge.job if self.bridge is not None else "startup")
        self.model_state = "loading"       # the header's note while the model is not ready: or "not loaded"
        self.quitting = False              # quit asked while a job runs: leave once it stopped
        self.router = EngineRouter(self)        # jobs in, engine messages out (tui/routing.py)
        from .known import KnownScorer

        self.known = KnownScorer(self)          # known scores of the rows on screen, in the background
        self.file_actions = FileActions(self)   # open/save/import dialogs, autosave, quit (tui/file_actions.py)
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
        files.instance_started(self.instance)
        if self._restored:
            self.notify("restored unsaved work from the autosave", timeout=6)
        self.set_interval(self.settings.autosave_seconds, self.file_actions.autosave)
        if self.restore_offer is not None:      # asked before anything loads; the engine waits for the answer
            self.file_actions.offer_restore(self.restore_offer, self._restore_answered)
        self.call_after_refresh(self._after_first_frame)

    def _restore_answered(self) -> None:
        self.restore_offer = None
        self._engine_waiting = False
        if self.bridge is None:
            self._start_engine()     # (the first-frame hook may not have come yet: it then finds it started)

    _engine_waiting = False

    def _after_first_frame(self) -> None:
        if self.first_frame is None:  # fallback if _display below was not reached
            self._mark_first_frame()
        if self.restore_offer is not None:
            self._engine_waiting = True       # jobs pressed meanwhile wait ("queued after startup")
            return
        if self.bridge is None:
            self._start_engine()

    def _start_engine(self) -> None:
        from .worker import EngineBridge  # the engine's (torch-free) modules load after the first frame

        self.bridge = EngineBridge(self, self.workspace.session, self._handle, self.settings.progress_hz,
                                   refuse_model=self.remote_code_refusal)
        self.set_interval(1.0, self.router.tick)   # elapsed and ETA move between the engine's events
        if self.autostart:
            self.start_startup(first=True)             # ahead of what was pressed meanwhile (queued after it)
            self.start_steps(first=True)               # then the session's recorded [[steps]], if any
        else:
            self.router.next_job()

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

    def _workspace_changed(self, aspects: frozenset, dirty: bool) -> None:
        if not self.is_running:
            return
        self.update_title()
        if dirty:
            self.file_actions.schedule_autosave()
        self.refresh_panes()
        if aspects & {"selection", "items", "baseline"}:
            self.known.kick()           # a newly selected item is scored next (when the engine is idle)

    def on_forget_set_pane_viewed(self, m: Any) -> None:
        """The Forget set table scrolled or its cursor moved: the rows now on screen are scored next."""
        self.known.kick()

    def update_title(self) -> None:
        ws = self.workspace
        name = ws.session.path.name if ws.session.path is not None else "untitled"
        state = " (not loaded)" if self.remote_code_refusal() else f" ({self.model_state})"
        model = ws.model_name + ("" if self.model_ready else state)
        self.sub_title = f"{name}{' *' if ws.dirty else ''} · {model}"

    # ================================================================ messages up from the panes
    async def on_action_requested(self, m: ActionRequested) -> None:
        await self.run_action(m.action)

    def on_screen_requested(self, m: Any) -> None:
        """A pane's dialog (the Results pane's column chooser and A/B view)."""
        self.push_screen(m.screen, m.callback)

    def on_results_pane_columns_chosen(self, m: Any) -> None:
        """The column chooser's answer is a user setting: kept in settings.toml, shown again next launch."""
        from .settings import save_value

        self.settings.results_columns = list(m.keys)
        error = save_value("results_columns", list(m.keys))
        if error:
            self.notify(quiet(error), severity="warning", timeout=6)

    def on_forget_set_pane_toggled(self, m: Any) -> None:
        self.workspace.toggle_item(m.item_id, m.which)

    def on_targets_pane_target_edited(self, m: Any) -> None:
        self.workspace.edit_target(m.item_id, m.text)

    def on_targets_pane_reordered(self, m: Any) -> None:
        self.workspace.move_forget(m.item_id, m.delta)

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

    # ================================================================ jobs and the engine's messages
    def submit(self, make: Any, name: str) -> None:
        """Queue a job: ``make()`` (UI thread, when it starts) returns a :class:`Job`."""
        self.router.submit(make, name)

    def start_startup(self, reload_model: bool = True, name: str = "startup", first: bool = False) -> None:
        def make() -> jobs.Job:
            post = self.post_message

            def on_items(items: Any, error: Any) -> None:
                post(msg.EngineNote(name, "data", items, error))

            def on_cached(key: Any, scores: dict) -> None:     # (worker thread: before the model loads)
                post(msg.EngineNote(name, "known_cached", (key, scores)))

            return jobs.startup_job(self.workspace, reload_model, on_items, name,
                                    on_cached if self.settings.baseline_on_load else None, self.known.loaded)

        self.known.reset()
        if reload_model and not self.model_ready:
            self.model_state = "loading"
            self.update_title()
        self.router.submit(make, name, first=first)

    def start_steps(self, first: bool = False) -> None:
        """A session with ``[[steps]]`` opens on its edited model: the recorded steps are applied after the
        start-up (in the worker: progress, cancel), the state lands in Results as a step row."""
        if not self.workspace.session.steps:
            return
        self.router.submit(lambda: jobs.steps_job(self.workspace, self.router.steps_applied,
                                                  self.known.before_steps()), "steps", first=first)

    @on(msg.EngineMessage)
    def _engine_message(self, m: msg.EngineMessage) -> None:
        self.router.route(m)

    # ================================================================ actions: runs and step mode
    def action_show_tab(self, tab: str) -> None:
        from .screens.main import MainScreen

        if isinstance(self.screen, MainScreen):
            self.screen.show_tab(tab)

    def action_help(self) -> None:
        from .screens.help import HelpScreen

        self.push_screen(HelpScreen())

    def action_run(self) -> None:
        self.action_show_tab("run")
        self.submit(lambda: jobs.run_job(self.workspace, self.router.run_finished), "run")

    def action_replay(self) -> None:
        """Re-run the whole session: reload its data, then every run."""
        self.workspace.clear_results()
        self.start_startup(reload_model=False, name="reload")
        self.submit(lambda: jobs.run_job(self.workspace, self.router.run_finished, "replay"), "replay")

    def action_cancel(self) -> None:
        if self.bridge is not None and self.bridge.request_cancel():
            self.jobs.clear()
            self.notify("cancelling…", timeout=2)
        else:
            self.notify("nothing is running", timeout=2)

    def _probe_question(self) -> str:
        p = self.pane("probe")
        return p.question if p is not None else ""

    def action_step(self) -> None:
        self.submit(lambda: jobs.step_job(self.workspace, self._probe_question() or None,
                                          self.router.step_finished), "step")

    def _make_undo(self, redo: bool) -> jobs.Job:
        return jobs.undo_job(self.workspace, redo, self._probe_question() or None, self.router.step_finished)

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
        self.submit(lambda: jobs.probe_job(self.workspace, question), "probe")

    def action_self_improve(self, item_ids: list[str] | None = None) -> None:
        if item_ids is None:
            t = self.pane("targets")
            cur = t.current_item() if t is not None and self._focus_in(t) else None
            item_ids = [cur] if cur else self.workspace.forget_ids
        n_forget = len(self.workspace.forget_ids)
        why = ""
        if item_ids and len(item_ids) == 1 and n_forget > 1:
            keys = actions.current_keys(self).get("self_improve", "ctrl+g")
            why = (f" (only the item shown in Targets; the other {plural(n_forget - 1, 'forget item')} were not "
                   f"asked: {keys} with the focus outside the Targets pane does all {n_forget})")
        if not item_ids:
            self.notify("select forget items first", severity="warning")
            return
        ids = list(item_ids)

        def done(records: list) -> None:
            n = self.workspace.store_generated(records)
            self.notify(self_improve_summary(ids, records, n, self.workspace) + why, timeout=8)

        self.submit(lambda: jobs.self_improve_job(self.workspace, ids, done), "self-improve")

    def _focus_in(self, widget: Any) -> bool:
        f = self.focused
        while f is not None:
            if f is widget:
                return True
            f = f.parent
        return False

    # ================================================================ actions: export the edited model
    def action_export_model(self, delta: bool = False) -> None:
        """Ask for a folder, then write the model as it is now (its kept step edits): an HF folder or a delta."""
        from .screens.dialogs import PathDialog

        s = self.workspace.session
        start = s.path.parent if s.path is not None else Path.cwd()
        stem = s.path.stem if s.path is not None else "session"
        what = "as a delta (changed tensors + WISE/GRACE/IKE state)" if delta else "as a Hugging Face folder"

        def chosen(path: str | None) -> None:
            if path:
                self.export_model(path, delta)

        self.push_screen(PathDialog(f"Export the edited model {what} to the folder",
                                    value=str(start / f"{stem}-{'delta' if delta else 'model'}"), start=start,
                                    must_exist=False, ok="Export"), chosen)

    def export_model(self, path: str, delta: bool = False) -> None:
        """Queue the export job (refused with one line when the folder cannot take it)."""
        self.submit(functools.partial(self._export_job, path, delta), "export")

    def _export_job(self, path: str, delta: bool) -> jobs.Job:
        from unlearn_tui.backends.export import check_out_dir, export_workbench

        ws = self.workspace
        s = ws.session
        protect = ([s.path] if s.path is not None else []) + ([s.resolve(s.data.path)] if s.data.is_file() else [])
        out = check_out_dir(path, False, protect)       # UserError: the job is refused with its line
        name, kept = (s.path.name if s.path is not None else None), ws.step_position
        return jobs.Job("export", lambda wb: export_workbench(wb, out, delta=delta, session_name=name,
                                                              protect=protect),
                        ws.snapshot(), label="export", on_done=functools.partial(self.router.export_finished,
                                                                                 delta, kept))

    # ================================================================ actions: the paper's results
    def action_paper_results(self) -> None:
        """Ask for a ``paper --out`` folder (or its paper.json) and show its tables and plots
        (:class:`tui.screens.paper.PaperScreen`); a file that is not such a report is one error line."""
        from unlearn_tui.backends.errors import UserError

        from .paper_cli import DEFAULT_OUT
        from .screens.dialogs import PathDialog
        from .screens.paper import PaperScreen, load_paper_report

        def chosen(path: str | None) -> None:
            if not path:
                return
            try:
                report = load_paper_report(path)
            except UserError as exc:
                self.router.report_error(quiet(exc))
                return
            self.push_screen(PaperScreen(path, report))

        value = DEFAULT_OUT if (Path.cwd() / DEFAULT_OUT).is_dir() else ""
        self.push_screen(PathDialog("Open paper results (a paper --out folder or its paper.json)", value=value),
                         chosen)

    # ================================================================ actions: data and session files
    def action_open_data(self) -> None:
        self.file_actions.ask_open_data()

    def action_save(self) -> None:
        self.file_actions.save()

    def action_save_as(self) -> None:
        self.file_actions.ask_save_as()

    def action_open_session(self) -> None:
        self.file_actions.ask_open_session()

    def action_new_session(self) -> None:
        self.file_actions.new_session()

    def action_import_yaml(self) -> None:
        self.file_actions.ask_import_yaml()

    async def action_quit(self) -> None:
        self.file_actions.quit()

    def quit_when_idle(self) -> bool:
        """After a job ended: leave now if a quit was waiting for it (True)."""
        if self.quitting:
            self.exit(0)
            return True
        return False

    def on_unmount(self) -> None:
        files.instance_stopped(self.instance)
        # leaving for any reason: stop the engine at its next cancellation point (weights roll back)
        if self.bridge is not None:
            self.bridge.request_cancel()

    def model_device(self) -> str | None:
        """The device the model runs on: the loaded model's, else the session's ``[model] device``."""
        handle = getattr(getattr(self.bridge, "workbench", None), "handle", None)
        device = getattr(handle, "device", None) or self.workspace.session.model.device
        return str(device) if device is not None else None

    def remote_code_refusal(self, session: Any = None) -> str | None:
        """The one-line error when ``session`` (default: the app's) may not load its model, else None.

        A session with ``[model] trust_remote_code = true`` would run Python code shipped with the
        model; the app loads it only when started with ``--trust-remote-code``.
        """
        return files.remote_code_refusal(session if session is not None else self.workspace.session,
                                         self.trust_remote_code)

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
    """The app for a session file (or a new session); with ``restore``, an autosave of it (or, without a
    file, the newest autosave no running instance owns) is offered: the app asks before restoring.

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
    instance = files.new_instance()
    session = sessions.load(session_path) if session_path is not None else sessions.new_session()
    offer = None
    if restore:
        offer, p = files.find_autosave(session.path if session_path is not None else None, instance)
        problems += p
    if model:
        session.model.name = model
    if device:
        session.model.device = device
    if offer is not None:
        if model:
            offer.session.model.name = model
        if device:
            offer.session.model.device = device
    return UnlearnApp(session, model=model, settings=settings, problems=problems, handle=handle,
                      autostart=autostart, trust_remote_code=trust_remote_code, restore_offer=offer,
                      instance=instance)


def run_app(session_path: str | Path | None = None, model: str | None = None, device: str | None = None,
            trust_remote_code: bool = False) -> int:
    app = create_app(session_path, model, device, trust_remote_code=trust_remote_code)
    result = app.run()
    return int(result or 0) if isinstance(result, int) else 0
