"""The file actions that ask the user: open data, save / save as, the unsaved-changes guard,
open and new session, EasyEdit YAML import, the autosave timer and quitting.

Only the dialog glue lives here (which dialog, what its answer does, what is
notified); reading and writing the files is :mod:`tui.files` (no Textual).
The App's ``action_*`` methods for these keys call :class:`FileActions`
(``app.file_actions``), which works through the App: its workspace, its
notifications, ``report_error`` and the start-up job that reloads the data.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import files
from .workspace import quiet


class FileActions:
    def __init__(self, app: Any) -> None:
        self.app = app
        self._autosave_timer: Any = None
        self._autosaved: Path | None = None      # the autosave file this instance wrote last

    @property
    def workspace(self) -> Any:
        return self.app.workspace

    def _error(self, message: str) -> None:
        self.app.router.report_error(message)

    # ---- data
    def ask_open_data(self) -> None:
        from .screens.dialogs import PathDialog

        def chosen(path: str | None) -> None:
            if path:
                self.open_data(files.data_spec(path))

        names = files.builtin_data_names()
        self.app.push_screen(PathDialog("Open a data file (JSON, JSONL, CSV, Parquet) or a built-in set",
                                        choices=names), chosen)

    def open_data(self, spec: str, fmt: str = "auto") -> None:
        self.workspace.open_data(spec, fmt)
        self.app.start_startup(reload_model=False, name="reload")

    # ---- saving
    def save(self) -> None:
        if self.workspace.session.path is None:
            self.ask_save_as()
            return
        self.save_to(None)

    def save_to(self, path: str | None) -> bool:
        from . import results_store

        session = self.workspace.session
        old_key = session.eval.results
        has_results = bool(self.workspace.results or self.workspace.step_rows or self.workspace.baseline_eval)
        target = Path(path).expanduser().absolute() if path is not None else session.path
        if has_results and target is not None and not (old_key and target == session.path):
            results_store.point_session_at(session, target)   # [eval] results: the file beside the session
        where, error = files.save(session, path)
        if error is not None:
            session.eval.results = old_key
            self._error(error)
            return False
        self.save_results()
        self.workspace.mark_clean()
        self.app.update_title()
        self.drop_autosave()
        self.app.notify(f"saved {where}", timeout=3)
        return True

    def save_results(self) -> None:
        """Write the results beside the session file (nothing for an untitled session: saved with it later)."""
        from . import results_store

        _, error = results_store.save_for(self.workspace)
        if error:
            self.app.notify(error, severity="warning", timeout=6)

    def ask_save_as(self) -> None:
        from .screens.dialogs import PathDialog

        start, value = files.save_as_start(self.workspace.session)

        def chosen(path: str | None) -> None:
            if path:
                self.save_to(path)

        self.app.push_screen(PathDialog("Save the session as", value=value, start=start, must_exist=False,
                                        ok="Save"), chosen)

    def guard_unsaved(self, then: Callable[[], object], what: str = "The session has unsaved changes.",
                      verb: str = "quitting") -> None:
        """Run ``then`` now, or once the user saved or discarded the unsaved changes (never if cancelled);
        the dialog asks "Save before <verb>?"."""
        from .screens.confirm import ConfirmQuit

        if not self.workspace.dirty:
            then()
            return

        def chosen(choice: str | None) -> None:
            if choice == "save":
                if self.workspace.session.path is None:
                    self.ask_save_as()
                    return
                if self.save_to(None):
                    then()
            elif choice == "discard":
                then()

        self.app.push_screen(ConfirmQuit(what, verb), chosen)

    # ---- sessions
    def ask_open_session(self) -> None:
        from .screens.dialogs import PathDialog

        def chosen(path: str | None) -> None:
            if path:
                self.guard_unsaved(lambda: self.open_session(path), verb="opening another session")

        self.app.push_screen(PathDialog("Open a session (TOML)"), chosen)

    def open_session(self, path: str | Path) -> bool:
        s, error = files.open_session(path)
        if error is not None:
            self._error(error)
            return False
        refusal = self.app.remote_code_refusal(s)
        if refusal:                    # not opened: the current session (and model) stay
            self._error(quiet(refusal))
            return False
        offer = self.newer_autosave(s)
        if offer is not None:          # unsaved changes of that session, newer than its file: asked first
            self.app.push_screen(self._restore_dialog(offer),
                                 lambda choice: self._opened_with(s, offer, choice, path))
            return True
        self.replace_session(s)
        self.app.notify(f"opened {path}", timeout=3)
        return True

    def newer_autosave(self, s: Any) -> Any:
        """The autosave of session ``s`` (its own, keyed by its path) when it is newer than the file, else None."""
        if s.path is None:
            return None
        offer, problems = files.find_autosave(s.path, self.app.instance)
        for p in problems:
            self.app.notify(quiet(p), severity="warning", timeout=8)
        if offer is None or offer.session.path is None or self.app.remote_code_refusal(offer.session):
            return None
        try:
            mtime = Path(s.path).stat().st_mtime
        except OSError:
            mtime = 0.0
        return offer if (offer.saved_at or 0.0) > mtime else None

    def _restore_dialog(self, offer: Any) -> Any:
        from .screens.confirm import RestoreAutosave

        return RestoreAutosave(offer, later="Open the saved file (esc)")

    def _opened_with(self, s: Any, offer: Any, choice: str | None, path: Any) -> None:
        """The answer about an opened session's autosave: restore it, or open the saved file (discarding it
        with "discard", keeping it for later with esc)."""
        if choice == "restore":
            self.replace_session(offer.session)      # (drops the autosave file: written again just below)
            ws = self.workspace
            ws.dirty = True
            ws.changed(dirty=True)
            self.autosave()
            self.app.update_title()
            self.app.notify(f"opened {path} with its unsaved changes restored (autosaved {offer.age()})",
                            timeout=6)
            return
        if choice == "discard":
            files.drop_autosave(offer.file)
            self.replace_session(s)
            self.app.notify(f"opened {path}; its autosave was discarded", timeout=4)
            return
        # "Open the saved file": the autosave stays (replace_session would drop this instance's key for it)
        keep = offer.file.read_bytes() if offer.file.is_file() else None
        self.replace_session(s)
        if keep is not None and not offer.file.exists():
            from unlearn_tui.backends.fileio import atomic_write

            try:
                atomic_write(offer.file, keep)
            except OSError:
                pass
        self.app.notify(f"opened {path} as saved; the autosave was kept ({offer.file.name}), offered again "
                        "next time", timeout=5)

    def new_session(self) -> None:
        from unlearn_tui import sessions

        self.guard_unsaved(lambda: self.replace_session(
            sessions.new_session(model={"name": self.workspace.model_name})), verb="starting a new session")

    def replace_session(self, s: Any) -> None:
        reload_model = self.workspace.replace_session(s)
        if reload_model:
            self.app.model_ready = False
        self.drop_autosave()
        self.app.update_title()
        self.app.start_startup(reload_model=reload_model, name="reload")
        self.app.start_steps()       # a session with [[steps]] opens on its edited model

    # ---- EasyEdit hyper-parameters
    def ask_import_yaml(self) -> None:
        from .screens.dialogs import PathDialog

        def chosen(path: str | None) -> None:
            if path:
                self.import_yaml(path)

        self.app.push_screen(PathDialog("Import EasyEdit hparams (YAML)"), chosen)

    def import_yaml(self, path: str) -> bool:
        imported, error = files.import_hparams(path)
        if error is not None:
            self._error(error)
            return False
        method, params, ignored = imported
        self.workspace.import_params(method, params)
        extra = f"; ignored: {', '.join(ignored)}" if ignored else ""
        self.app.notify(f"imported {method} hyper-parameters from {Path(path).name}{extra}", timeout=6)
        return True

    # ---- autosave and quitting
    def schedule_autosave(self) -> None:
        """An unsaved change: write the autosave a second after the last one."""
        if self._autosave_timer is not None:
            self._autosave_timer.stop()
        self._autosave_timer = self.app.set_timer(1.0, self.autosave)

    def autosave(self) -> None:
        """Write the unsaved session to its own autosave file (see tui/files.py)."""
        self._autosave_timer = None
        if not self.workspace.dirty:
            return
        where, error = files.write_autosave(self.workspace.session, self.app.instance)
        if error:
            self.app.notify(error, severity="warning", timeout=5)
            return
        if self._autosaved is not None and self._autosaved != where:
            files.drop_autosave(self._autosaved)     # the session got a file (save as): its key moved
        self._autosaved = where

    def drop_autosave(self) -> None:
        """The unsaved changes were saved or discarded: this instance's autosave goes."""
        if self._autosaved is not None:
            files.drop_autosave(self._autosaved)
            self._autosaved = None
        files.drop_autosave(files.autosave_file(self.workspace.session, self.app.instance))

    # ---- restoring an autosave: asked, never silent
    def offer_restore(self, offer: Any, then: Callable[[], object]) -> None:
        """Ask whether to restore ``offer`` (a :class:`tui.files.AutosaveOffer`); ``then()`` once answered."""
        from .screens.confirm import RestoreAutosave

        def chosen(choice: str | None) -> None:
            if choice == "restore":
                self.restore(offer)
            elif choice == "discard":
                files.drop_autosave(offer.file)
                self.app.notify("the autosave was discarded", timeout=3)
            else:
                self.app.notify(f"the autosave was kept ({offer.file.name}); it is offered again next time",
                                timeout=5)
            then()

        self.app.push_screen(RestoreAutosave(offer), chosen)

    def restore(self, offer: Any) -> None:
        """The autosaved session replaces the open one (before its data and model are loaded)."""
        ws = self.workspace
        ws.replace_session(offer.session)     # the start-up job (not yet started) loads its data and model
        ws.dirty = True
        ws.changed(dirty=True)
        if offer.file != files.autosave_file(ws.session, self.app.instance):
            files.drop_autosave(offer.file)      # another instance's (or the old shared) file: now ours
        self.app._restored = True
        self.autosave()
        self.app.update_title()
        self.app.notify(f"restored the unsaved changes of {offer.name} (autosaved {offer.age()})", timeout=6)

    def quit(self) -> None:
        """Leave (after the unsaved-changes guard): stop the engine, drop the autosave, exit.

        With a job running, the job is cancelled and the app says it waits for it to stop (a thread
        cannot be killed: leaving at once would leave a blank terminal until it did); it leaves as
        soon as the job ended.  A second quit leaves at once."""
        def leave() -> None:
            app = self.app
            if self._autosave_timer is not None:
                self._autosave_timer.stop()
            self.workspace.dirty = False          # discarded (or saved): nothing left for the autosave
            self.drop_autosave()
            bridge = app.bridge
            if bridge is not None and bridge.busy and not app.quitting:
                app.quitting = True
                app.jobs.clear()
                bridge.request_cancel()
                text = (f"waiting for the {bridge.job} job to stop before quitting… "
                        f"({self._quit_keys()} again: quit now)")
                app.router.strip(text)
                app.notify(text, timeout=30)
                return
            app.exit(0)

        self.guard_unsaved(leave, verb="quitting")

    def _quit_keys(self) -> str:
        from .actions import current_keys

        return current_keys(self.app).get("quit", "ctrl+q")
