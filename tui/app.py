"""The unlearn-tui Textual app.

:func:`create_app` is the one factory shared by the CLI (:func:`run_app`) and
the tests.  The App owns all state (the session, the loaded items, results,
step-mode position); the engine runs in one thread worker per job
(:mod:`tui.worker`) that only posts messages (:mod:`tui.messages`).  Jobs are
queued: a job asked for while another runs starts when it finishes.

Nothing here imports torch or transformers at module level: the first frame
is drawn, then the model loads in the background (``first_frame`` records
when, and whether torch was already imported: it must not be).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from textual.app import App, SystemCommand
from textual.binding import Binding

from backends.errors import UserError

from . import actions
from . import messages as msg
from .settings import Settings
from .settings import load as load_settings

START = time.perf_counter()


def _quiet(text: str) -> str:
    return " ".join(str(text).split())


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
        self.session = session
        self.trust_remote_code = trust_remote_code   # --trust-remote-code: sessions may ask for model code
        self.settings = settings or Settings()
        self._problems = list(problems)
        self._restored = restored
        self._handle = handle
        self.autostart = autostart
        self.items: list | None = None
        self.baseline_scores: dict[str, float] = {}
        self.baseline_pending = False
        self.results: list = []
        self.baseline_eval: Any = None
        self.dirty = restored
        self.model_ready = handle is not None
        self.model_name = session.model.name
        self.bridge: Any = None
        self._queue: list[tuple[str, Callable[[], Callable], Callable | None]] = []
        self._current: tuple[str, Callable | None] | None = None
        self._params: dict[str, dict] = {r.method: dict(r.params or {}) for r in session.runs}
        self._param_errors: dict[tuple[str, str], str] = {}
        self._pool: list[str] | None = None
        self._autosave_timer: Any = None
        self.first_frame: float | None = None          # seconds from module import to the first frame
        self.torch_at_first_frame: bool | None = None
        self.step_position = 0                        # kept step edits
        self.step_total = 0
        self.last_quick: dict | None = None
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
            self.set_keymap(keymap)
        self.push_screen(MainScreen())
        self.update_title()
        for p in self._problems:
            self.notify(_quiet(p), severity="warning", timeout=8)
        if self._restored:
            self.notify("restored unsaved work from the autosave", timeout=6)
        self.set_interval(self.settings.autosave_seconds, self.autosave)
        self.call_after_refresh(self._after_first_frame)

    def _after_first_frame(self) -> None:
        from .worker import EngineBridge  # the engine's (torch-free) modules load after the first frame

        if self.first_frame is None:  # fallback if _display below was not reached
            self._mark_first_frame()
        self.bridge = EngineBridge(self, self.session, self._handle, self.settings.progress_hz,
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

        if isinstance(error, NoMatches) and not self._running:
            # quitting while the deferred panes are still mounting (the first instants after the first
            # frame): shutdown prunes a widget's children before its own mount handler looks them up
            return
        super()._handle_exception(error)

    # ================================================================ state helpers (UI thread)
    @property
    def forget_ids(self) -> list[str]:
        f = self.session.data.forget
        return list(f) if isinstance(f, list) else []

    @property
    def retain_ids(self) -> list[str]:
        r = self.session.data.retain
        return list(r) if isinstance(r, list) else []

    def item_by_id(self, item_id: str):
        """The loaded item ``item_id``; KeyError when it is not loaded (see :meth:`find_item`)."""
        it = self.find_item(item_id)
        if it is None:
            raise KeyError(item_id)
        return it

    def find_item(self, item_id: str | None):
        """The loaded item ``item_id``, or None (no data loaded, a failed load, an id of other data)."""
        for it in self.items or []:
            if it.id == item_id:
                return it
        return None

    def forget_items(self) -> list:
        by = {it.id: it for it in self.items or []}
        return [by[i] for i in self.forget_ids if i in by]

    def pane(self, name: str):
        """The pane widget, or None while it is not mounted (only the Forget set pane is in the first frame)."""
        for screen in reversed(self.screen_stack):
            found = screen.query(f"#pane-{name}")
            if found:
                p = found.first()
                return p if p.is_mounted and getattr(p, "ready", False) else None
        return None

    def update_title(self) -> None:
        name = self.session.path.name if self.session.path is not None else "untitled"
        state = " (not loaded)" if self.remote_code_refusal() else " (loading)"
        model = self.model_name + ("" if self.model_ready else state)
        self.sub_title = f"{name}{' *' if self.dirty else ''} · {model}"

    def mark_dirty(self) -> None:
        self.dirty = True
        self.update_title()
        if self._autosave_timer is not None:
            self._autosave_timer.stop()
        self._autosave_timer = self.set_timer(1.0, self.autosave)

    def refresh_panes(self, *names: str) -> None:
        names = names or ("forget", "targets", "method", "results")
        for n in names:
            p = self.pane(n)
            if p is None:
                continue
            if n == "forget":
                p.refresh_items()
            elif n == "targets":
                p.refresh_all()
            elif n == "method":
                p.refresh_all()
            elif n == "results":
                p.refresh_rows()

    # ---- forget / retain selection
    def toggle_item(self, item_id: str, which: str) -> None:
        f, r = self.forget_ids, self.retain_ids
        mine, other = (f, r) if which == "forget" else (r, f)
        if item_id in mine:
            mine.remove(item_id)
        else:
            mine.append(item_id)     # an item is in one set at most
            if item_id in other:
                other.remove(item_id)
        self.session.data.forget, self.session.data.retain = f, r
        self.mark_dirty()
        p = self.pane("forget")
        if p is not None:
            p.refresh_marks()
        self.refresh_panes("targets")

    def _normalize_selection(self) -> None:
        """Counts in the session (forget = 10) become explicit id lists once the items are known."""
        from backends import data

        d = self.session.data
        if isinstance(d.forget, list) and isinstance(d.retain, list):
            known = {it.id for it in self.items or []}
            d.forget = [i for i in d.forget if i in known]
            d.retain = [i for i in d.retain if i in known and i not in d.forget]
            return
        try:
            f, r = data.select(self.items or [], d.forget, d.retain, where="data")
            d.forget, d.retain = [it.id for it in f], [it.id for it in r]
        except UserError as exc:
            self.notify(f"{_quiet(exc)}; starting with an empty selection", severity="warning")
            d.forget = d.forget if isinstance(d.forget, list) else []
            d.retain = d.retain if isinstance(d.retain, list) else []
            known = {it.id for it in self.items or []}
            d.forget = [i for i in d.forget if i in known]
            d.retain = [i for i in d.retain if i in known and i not in d.forget]

    # ---- targets
    def _target_pool(self) -> list[str]:
        if self._pool is None:
            from backends.targets import load_pool

            try:
                self._pool = load_pool(self.session.targets.pool, self.session)
            except UserError as exc:
                self.notify(_quiet(exc), severity="warning")
                self._pool = ["I'm not sure."]
        return self._pool

    def target_text(self, item_id: str) -> tuple[str | None, str, dict]:
        """(text, source, flags) for an item: the session's override, else the mode's rule."""
        from backends.targets import simple_targets

        o = self.session.target_for(item_id)
        if o is not None:
            return o.target, o.source, {"leak": o.leak, "mentions_subject": o.mentions_subject}
        t = self.session.targets
        item = self.find_item(item_id)
        try:
            out = simple_targets(t.mode, [item], self._target_pool(), t.seed, t.dummy, {}) if item else {}
        except UserError:
            out = {}
        if item_id in out:
            return out[item_id].text, out[item_id].source, {}
        return None, f"{t.mode}: written by the model at run time (Self-improve)", {}

    def edit_target(self, item_id: str, text: str) -> None:
        cur = self.session.target_for(item_id)
        if text.strip():
            if text == self.target_text(item_id)[0]:
                return
            self.session.set_target(item_id, text, source="custom")
        else:
            if not self.session.remove_target(item_id):
                return
        self.mark_dirty()

    def reset_target(self, item_id: str) -> None:
        if self.session.remove_target(item_id):
            self.mark_dirty()
            self.refresh_panes("targets")

    def set_target_mode(self, mode: str) -> None:
        if self.session.targets.mode != mode:
            self.session.targets.mode = mode
            self.mark_dirty()
            self.refresh_panes("targets")

    def set_merge_factor(self, m: int) -> None:
        if m >= 1 and self.session.targets.merge_factor != m:
            self.session.targets.merge_factor = m
            self.mark_dirty()
            self.refresh_panes("targets")

    def merge_preview(self, limit: int = 30) -> str:
        from rich.markup import escape

        from backends.targets import Target, build_requests

        items = self.forget_items()
        if not items:
            return "[dim]no forget items selected[/dim]"
        targets = {}
        for it in items:
            text, source, _ = self.target_text(it.id)
            targets[it.id] = Target(it.id, text or "‹written by the model›", source)
        try:
            reqs = build_requests(items, targets, self.session.targets.merge_factor, self.session.data.subjects)
        except UserError as exc:
            return f"[red]{escape(_quiet(exc))}[/red]"
        lines = [f"{len(items)} items → {len(reqs)} edit request(s), merge factor "
                 f"{self.session.targets.merge_factor}"]
        for i, r in enumerate(reqs[:limit]):
            lines.append(f"[b]{i + 1}.[/b] {escape(r.prompt)}  [dim]→[/dim] {escape(r.target)}")
        if len(reqs) > limit:
            lines.append(f"… {len(reqs) - limit} more")
        return "\n".join(lines)

    # ---- methods and params
    def method_params(self, name: str) -> dict:
        return dict(self._params.get(name, {}))

    def set_methods(self, names: list[str]) -> None:
        from sessions import RunConfig

        old = {r.method: r for r in self.session.runs}
        runs = []
        for n in names:
            r = old.get(n) or RunConfig(n, dict(self._params.get(n, {})))
            runs.append(r)
        if [r.method for r in runs] != [r.method for r in self.session.runs]:
            self.session.runs = runs
            self.mark_dirty()

    def set_param(self, method: str, field: str, value: Any) -> None:
        from backends import methods
        from backends.params import describe

        self._param_errors.pop((method, field), None)
        info = next((f for f in describe(methods.get(method).Params) if f.name == field), None)
        params = self._params.setdefault(method, {})
        stored = "auto" if value is None else value
        default = None if info is None else info.default
        old = params.get(field)
        if value == default and type(value) is type(default):
            if field not in params:
                return
            params.pop(field)
        else:
            if old is not None and old == stored and type(old) is type(stored):
                return
            params[field] = stored
        for r in self.session.runs:
            if r.method == method:
                r.params = dict(params)
        self.mark_dirty()

    def param_invalid(self, method: str, field: str, message: str) -> None:
        self._param_errors[(method, field)] = message

    # ================================================================ jobs
    def start_job(self, name: str, make: Callable[[], Callable], on_done: Callable | None = None) -> None:
        """Queue a job: ``make()`` (UI thread, at start) returns ``fn(workbench)`` (worker thread)."""
        if self.bridge is None:
            return
        if self.bridge.busy or self._queue:
            if any(q[0] == name for q in self._queue):
                return
            self._queue.append((name, make, on_done))
            self.notify(f"{name}: queued after {self.bridge.job or self._queue[0][0]}", timeout=3)
            return
        self._launch(name, make, on_done)

    def _launch(self, name: str, make: Callable[[], Callable], on_done: Callable | None) -> None:
        try:
            fn = make()
        except UserError as exc:
            self.report_error(_quiet(exc))
            self._next_job()
            return
        self._current = (name, on_done)
        run = self.pane("run")
        if run is not None and name in ("run", "step", "undo", "redo", "self-improve"):
            run.reset_loss()
            run.status("")
        self.bridge.start(name, fn)
        self._strip(f"{name}…")

    def _next_job(self) -> None:
        if self._queue and not self.bridge.busy:
            name, make, on_done = self._queue.pop(0)
            self._launch(name, make, on_done)

    def _snapshot(self) -> Callable[[Any], Any]:
        """A copy of the session and selection, and a function that loads it into the workbench."""
        from backends.metrics import EvalSettings

        snap = copy.deepcopy(self.session)
        items = list(self.items or [])
        known = {it.id for it in items}
        # ids of items not loaded (yet) are dropped, as before: e.g. the start-up job runs before the data is in
        fids = [i for i in self.forget_ids if i in known]
        rids = [i for i in self.retain_ids if i in known and i not in fids]
        model_name = self.model_name

        def prepare(wb: Any) -> Any:
            if wb.handle is not None and getattr(self.bridge, "handle_for", None) not in (None, model_name):
                wb.handle = None
                wb.undo_stack.clear()
                wb.redo_stack.clear()
            wb.session = snap
            wb.settings = EvalSettings.from_config(snap.eval)
            wb.items = items
            wb.set_selection(fids, rids)   # subjects/paraphrases applied to copies, rephrase split rebuilt
            wb.invalidate_targets()        # the session's targets may have changed even if the selection did not
            return snap

        return prepare

    def remote_code_refusal(self, session: Any = None) -> str | None:
        """The one-line error when ``session`` (default: the app's) may not load its model, else None.

        A session with ``[model] trust_remote_code = true`` would run Python code shipped with the
        model; the app loads it only when started with ``--trust-remote-code``.
        """
        s = session if session is not None else self.session
        if not getattr(s.model, "trust_remote_code", False) or self.trust_remote_code:
            return None
        where = f"{s.path}: " if s.path is not None else ""
        return (f"{where}model.trust_remote_code = true would run code shipped with the model; the model "
                f"was not loaded: start unlearn-tui with --trust-remote-code to allow it")

    def _load_model(self, wb: Any) -> None:
        if wb.handle is None:
            wb.load_model()        # refused (UserError) for a session we may not load: see the bridge
            self.bridge.handle_for = wb.session.model.name
            self.post_message(msg.EngineNote("model", "model", wb.session.model.name))

    # ---- start-up: data, model, baseline knowledge
    def start_startup(self) -> None:
        self.start_job("startup", self._make_startup)

    def _make_startup(self, reload_model: bool = True) -> Callable:
        from backends import data as data_mod

        prepare = self._snapshot()
        cfg = self.session.data
        base = self.session.base_dir()
        want_baseline = self.settings.baseline_on_load
        limit = self.settings.baseline_limit
        post = self.post_message

        def job(wb: Any) -> Any:
            prepare(wb)
            items, error = None, None
            try:
                items = data_mod.load_items(cfg.path, base_dir=base, format=cfg.format)
            except UserError as exc:
                error = _quiet(exc)
            post(msg.EngineNote("startup", "data", items, error))
            if reload_model:
                self._load_model(wb)
            if items and want_baseline and limit > 0:
                return {"baseline": _score_known(wb, items[:limit])}
            return {"baseline": None}

        return job

    def on_engine_note(self, m: msg.EngineNote) -> None:
        if m.kind == "data":
            if m.error:
                # a failed load leaves nothing of the previous data behind: no items, no baseline
                # scores, and every pane redrawn from that (the selection's ids stay in the session;
                # panes show only loaded items, so nothing indexes an item that is not there)
                self.items = None
                self.baseline_scores = {}
                self.baseline_pending = False
                self.report_error(m.error)
                self.refresh_panes("forget", "targets")
            else:
                self.items = m.value
                self.baseline_scores = {}
                self.baseline_pending = self.settings.baseline_on_load
                self._normalize_selection()
                self.refresh_panes("forget", "targets")
        elif m.kind == "model":
            self.model_ready = True
            self.model_name = str(m.value)
            self.update_title()
            self.notify(f"model ready: {m.value}", timeout=3)
        elif m.kind == "baseline_eval":
            self.baseline_eval = m.value

    # ---- messages from the worker
    def on_job_started(self, m: msg.JobStarted) -> None:
        self._strip(f"{m.job}: started")

    def on_stage_changed(self, m: msg.StageChanged) -> None:
        run = self.pane("run")
        if run is not None:
            run.stage(m.stage, m.total, m.detail)
            run.log_line(f"{m.stage} {m.detail}".strip())
        self._strip(f"{m.job}: {m.stage}", 0, m.total)

    def on_progress_update(self, m: msg.ProgressUpdate) -> None:
        run = self.pane("run")
        if run is not None:
            run.progress(m)
        eta = f" · ETA {m.eta_s:.0f}s" if m.eta_s is not None else ""
        self._strip(f"{m.job}: {m.stage} {m.done}/{m.total if m.total else '?'}{eta}", m.done, m.total)

    def on_log_line(self, m: msg.LogLine) -> None:
        run = self.pane("run")
        if run is not None:
            run.log_line(m.message, m.level)
        if m.level == "warning":
            self.notify(m.message, severity="warning", timeout=5)

    def on_run_started_msg(self, m: msg.RunStartedMsg) -> None:
        run = self.pane("run")
        if run is not None:
            run.reset_loss()
            run.status(f"run {m.index + 1}/{m.total_runs}: {m.method}")

    def on_run_done(self, m: msg.RunDone) -> None:
        self.results.append(m.result)
        self.refresh_panes("results")

    def on_job_done(self, m: msg.JobDone) -> None:
        name, on_done = self._current or (m.job, None)
        self._current = None
        self.bridge.finished()
        self.jobs_done.append(m.job)
        self._strip(f"{m.job}: done in {m.seconds:.1f}s", 1, 1)
        handler = getattr(self, f"_done_{m.job.replace('-', '_')}", None)
        if handler is not None:
            handler(m.value)
        if on_done is not None:
            on_done(m.value)
        self._next_job()

    def on_job_failed(self, m: msg.JobFailed) -> None:
        self._current = None
        self.bridge.finished()
        self.jobs_done.append(m.job)
        self.baseline_pending = False
        run = self.pane("run")
        if m.cancelled:
            text = f"{m.job}: cancelled; the weights were rolled back"
            self.notify(text, severity="warning", timeout=6)
            if run is not None:
                run.status(f"[b yellow]{text}[/]")
                run.log_line(text, "warning")
            self._strip(text)
            self._queue.clear()
        else:
            self.report_error(f"{m.job}: {m.message}", modal=m.bug)
            if run is not None:
                run.status(f"[b red]{m.job} failed[/]: {m.message}" +
                           ("; the weights were rolled back" if m.rolled_back and m.job in ("run", "step") else ""))
            self._strip(f"{m.job} failed")
        p = self.pane("forget")
        if p is not None:
            p.refresh_marks()
        self._next_job()

    def report_error(self, message: str, modal: bool = False) -> None:
        self.last_error = message
        run = self.pane("run")
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

    # ---- job results
    def _done_startup(self, value: Any) -> None:
        self._set_baseline(value)

    def _done_baseline(self, value: Any) -> None:
        self._set_baseline(value)

    def _set_baseline(self, value: Any) -> None:
        self.baseline_pending = False
        if value and value.get("baseline") is not None:
            self.baseline_scores = value["baseline"]
        p = self.pane("forget")
        if p is not None:
            p.refresh_marks()

    def _done_run(self, value: Any) -> None:
        self.step_position = 0
        undone = value.get("undone", 0)
        run = self.pane("run")
        if run is not None:
            text = f"[b green]finished[/]: {value.get('runs', 0)} run(s)"
            if undone:
                text += f" (the {undone} kept step edit(s) were undone first)"
            run.status(text)
            run.idle("idle")
        self.notify("run finished; see Results (f6)", timeout=4)

    _done_replay = _done_run

    def _done_step(self, value: Any) -> None:
        self._after_step(value, "step")

    def _done_undo(self, value: Any) -> None:
        self._after_step(value, "undo")

    def _done_redo(self, value: Any) -> None:
        self._after_step(value, "redo")

    def _after_step(self, value: Any, what: str) -> None:
        self.step_position, self.step_total = value["k"], value["n"]
        self.last_quick = value.get("quick")
        q = value.get("quick") or {}
        score = " · ".join(f"{k} R1 {v:.2f}" for k, v in q.items() if v is not None)
        text = f"{what}: {self.step_position}/{self.step_total} request(s) kept" + (f" · {score}" if score else "")
        run = self.pane("run")
        if run is not None:
            run.status(text)
        probe = self.pane("probe")
        if probe is not None:
            if value.get("probe"):
                probe.show(*value["probe"])
            probe.score(text)
        self.notify(text, timeout=3)

    def _done_probe(self, value: Any) -> None:
        probe = self.pane("probe")
        if probe is not None:
            probe.show(*value)

    def _done_self_improve(self, value: Any) -> None:
        n = 0
        for rec in value or []:
            self.session.set_target(rec["id"], rec["target"], source=rec.get("source") or "self-improve",
                                    leak=rec.get("leak"), mentions_subject=rec.get("mentions_subject"))
            n += 1
        if n:
            self.mark_dirty()
        self.refresh_panes("targets")
        self.notify(f"self-improve: {n} target(s) written", timeout=4)

    # ================================================================ actions
    def action_show_tab(self, tab: str) -> None:
        from .screens.main import MainScreen

        if isinstance(self.screen, MainScreen):
            self.screen.show_tab(tab)

    def action_help(self) -> None:
        from .screens.help import HelpScreen

        self.push_screen(HelpScreen())

    def _check_runnable(self) -> None:
        if self.items is None:
            raise UserError("no data loaded; open a data file first (ctrl+l)")
        if not self.forget_ids:
            raise UserError("the forget set is empty; select items with space in the Forget set pane")
        if not self.session.runs:
            raise UserError("no method chosen; pick one in the Method pane")
        bad = [f"{m}.{f}: {e}" for (m, f), e in self._param_errors.items()
               if m in [r.method for r in self.session.runs]]
        if bad:
            raise UserError(f"fix the hyper-parameters first: {bad[0]}")

    def _make_run(self) -> Callable:
        self._check_runnable()
        prepare = self._snapshot()
        post = self.post_message

        def job(wb: Any) -> Any:
            snap = prepare(wb)
            undone = 0
            while wb.undo():
                undone += 1
            wb.redo_stack.clear()
            for i, r in enumerate(snap.runs):
                wb.make_method(r, i)
            self._load_model(wb)
            wb.requests()
            base = wb.evaluate()
            post(msg.EngineNote("run", "baseline_eval", base))
            for i, r in enumerate(snap.runs):
                wb.run_one(i, r, len(snap.runs))
            return {"runs": len(snap.runs), "undone": undone}

        return job

    def action_run(self) -> None:
        self.action_show_tab("run")
        self.start_job("run", self._make_run)

    def action_replay(self) -> None:
        """Re-run the whole session: reload its data, then every run."""
        self.results.clear()
        self.refresh_panes("results")
        self.start_job("reload", functools.partial(self._make_startup, False),
                       on_done=lambda v: self._set_baseline(v))
        self.start_job("replay", self._make_run)

    def action_cancel(self) -> None:
        if self.bridge is not None and self.bridge.request_cancel():
            self._queue.clear()
            self.notify("cancelling…", timeout=2)
        else:
            self.notify("nothing is running", timeout=2)

    def _quick_and_probe(self, wb: Any, question: str) -> dict:
        from backends.metrics import evaluate

        res = evaluate(wb.handle, {"forget": wb.forget, "retain": wb.retain}, wb.settings, wb.on_event, wb.cancel)
        quick = {k: s.rouge1 for k, s in res.splits.items()}
        out: dict = {"quick": quick, "k": len(wb.undo_stack)}
        if question:
            edited, original = wb.probe(question)
            out["probe"] = (question, edited, original)
        return out

    def _probe_question(self) -> str:
        p = self.pane("probe")
        q = p.question if p is not None else ""
        return q

    def _make_step(self) -> Callable:
        self._check_runnable()
        prepare = self._snapshot()
        question_default = self._probe_question()

        def job(wb: Any) -> Any:
            snap = prepare(wb)
            self._load_model(wb)
            wb.make_method(snap.runs[0], 0)
            reqs = wb.requests()
            k = len(wb.undo_stack)
            if k >= len(reqs):
                raise UserError(f"all {len(reqs)} forget request(s) are applied; undo (ctrl+z) or run (ctrl+r)")
            wb.step(snap.runs[0], reqs[k])
            out = self._quick_and_probe(wb, question_default or reqs[k].questions[0])
            out["n"] = len(reqs)
            return out

        return job

    def action_step(self) -> None:
        self.start_job("step", self._make_step)

    def _make_undo(self, redo: bool) -> Callable:
        prepare = self._snapshot()
        question = self._probe_question()
        have = self.forget_ids

        def job(wb: Any) -> Any:
            prepare(wb)
            ok = wb.redo() if redo else wb.undo()
            if not ok:
                raise UserError("nothing to redo" if redo else "nothing to undo")
            out = self._quick_and_probe(wb, question)
            from backends.targets import build_requests  # noqa: F401  (count only)

            out["n"] = -(-len(have) // max(1, wb.session.targets.merge_factor))
            return out

        return job

    def action_undo_edit(self) -> None:
        self.start_job("undo", functools.partial(self._make_undo, False))

    def action_redo_edit(self) -> None:
        self.start_job("redo", functools.partial(self._make_undo, True))

    def action_probe(self) -> None:
        question = self._probe_question()
        if not question:
            self.action_show_tab("probe")
            self.notify("type a question in the Probe pane", timeout=3)
            return
        p = self.pane("probe")
        if p is not None:
            p.pending()
        prepare = self._snapshot()

        def make() -> Callable:
            def job(wb: Any) -> Any:
                prepare(wb)
                self._load_model(wb)
                return (question, *wb.probe(question))
            return job

        self.start_job("probe", make)

    def action_self_improve(self, item_ids: list[str] | None = None) -> None:
        if item_ids is None:
            t = self.pane("targets")
            cur = t.current_item() if t is not None and self._focus_in(t) else None
            item_ids = [cur] if cur else self.forget_ids
        if not item_ids:
            self.notify("select forget items first", severity="warning")
            return
        ids = list(item_ids)

        def make() -> Callable:
            prepare = self._snapshot()

            def job(wb: Any) -> Any:
                snap = prepare(wb)
                snap.targets.mode = "self-improve"
                for i in ids:
                    snap.remove_target(i)
                wb.set_selection([it.id for it in wb.forget if it.id in ids], [it.id for it in wb.retain])
                self._load_model(wb)
                wb.targets()
                return [r for r in wb.target_records() if r["id"] in ids]
            return job

        self.start_job("self-improve", make)

    def _focus_in(self, widget: Any) -> bool:
        f = self.focused
        while f is not None:
            if f is widget:
                return True
            f = f.parent
        return False

    # ---- data and sessions
    def action_open_data(self) -> None:
        from backends import data as data_mod

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
        self.session.data.path = spec
        self.session.data.format = fmt
        self.session.data.forget, self.session.data.retain = [], []
        self.session.data.subjects, self.session.data.paraphrases = {}, []
        self.items = None
        self.mark_dirty()
        self.refresh_panes("forget", "targets")
        self.start_job("reload", functools.partial(self._make_startup, False),
                       on_done=lambda v: self._set_baseline(v))

    def action_save(self) -> None:
        if self.session.path is None:
            self.action_save_as()
            return
        self.save_to(None)

    def save_to(self, path: str | None) -> bool:
        import sessions

        try:
            where = sessions.save(self.session, path)
        except UserError as exc:
            self.report_error(_quiet(exc))
            return False
        except OSError as exc:
            self.report_error(f"cannot save: {exc}")
            return False
        self.dirty = False
        self.update_title()
        self._drop_autosave()
        self.notify(f"saved {where}", timeout=3)
        return True

    def action_save_as(self) -> None:
        from .screens.dialogs import PathDialog

        start = self.session.path.parent if self.session.path else Path.cwd()
        value = str(self.session.path) if self.session.path else str(Path.cwd() / "session.toml")

        def chosen(path: str | None) -> None:
            if path:
                self.save_to(path)

        self.push_screen(PathDialog("Save the session as", value=value, start=start, must_exist=False,
                                    ok="Save"), chosen)

    def _guard_unsaved(self, then: Callable[[], None], what: str = "The session has unsaved changes.") -> None:
        from .screens.confirm import ConfirmQuit

        if not self.dirty:
            then()
            return

        def chosen(choice: str | None) -> None:
            if choice == "save":
                if self.session.path is None:
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
        import sessions

        try:
            s = sessions.load(path)
        except UserError as exc:
            self.report_error(_quiet(exc))
            return False
        refusal = self.remote_code_refusal(s)
        if refusal:                    # not opened: the current session (and model) stay
            self.report_error(_quiet(refusal))
            return False
        self.replace_session(s)
        self.notify(f"opened {path}", timeout=3)
        return True

    def action_new_session(self) -> None:
        import sessions

        self._guard_unsaved(lambda: self.replace_session(sessions.new_session(model={"name": self.model_name})))

    def replace_session(self, s: Any) -> None:
        reload_model = s.model.name != self.model_name
        self.session = s
        self._params = {r.method: dict(r.params or {}) for r in s.runs}
        self._param_errors.clear()
        self._pool = None
        self.items = None
        self.results = []
        self.baseline_eval = None
        self.dirty = False
        self.model_name = s.model.name
        if reload_model:
            self.model_ready = False
        self._drop_autosave()
        self.update_title()
        self.refresh_panes()
        self.start_job("reload", functools.partial(self._make_startup, reload_model),
                       on_done=lambda v: self._set_baseline(v))

    def action_import_yaml(self) -> None:
        from .screens.dialogs import PathDialog

        def chosen(path: str | None) -> None:
            if path:
                self.import_yaml(path)

        self.push_screen(PathDialog("Import EasyEdit hparams (YAML)"), chosen)

    def import_yaml(self, path: str) -> bool:
        try:
            from backends import easyedit
        except ImportError:
            self.report_error("EasyEdit YAML import is not available in this build yet")
            return False
        try:
            method, params, ignored = easyedit.import_hparams(path)
        except UserError as exc:
            self.report_error(_quiet(exc))
            return False
        self._params[method] = dict(params)
        names = [r.method for r in self.session.runs]
        if method not in names:
            self.set_methods(names + [method])
        for r in self.session.runs:
            if r.method == method:
                r.params = dict(params)
        self.mark_dirty()
        self.refresh_panes("method")
        extra = f"; ignored: {', '.join(ignored)}" if ignored else ""
        self.notify(f"imported {method} hyper-parameters from {Path(path).name}{extra}", timeout=6)
        return True

    # ---- autosave and quitting
    def autosave(self) -> None:
        """Write the unsaved session to the autosave file: one file, replaced atomically (see below)."""
        from sessions.paths import autosave_path
        from sessions.writer import atomic_write

        self._autosave_timer = None
        if not self.dirty:
            return
        try:
            path = autosave_path()
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, autosave_text(self.session))
        except Exception as exc:  # never let the safety net take the app down
            self.notify(f"autosave failed: {_quiet(exc)}", severity="warning", timeout=5)

    def _drop_autosave(self) -> None:
        from sessions.paths import autosave_path

        try:
            autosave_path().unlink()
        except OSError:
            pass

    async def action_quit(self) -> None:
        def leave() -> None:
            if self.bridge is not None:
                self.bridge.request_cancel()
            if self._autosave_timer is not None:
                self._autosave_timer.stop()
            self.dirty = False          # discarded (or saved): nothing left for the autosave
            self._drop_autosave()
            self.exit(0)

        self._guard_unsaved(leave)

    def on_unmount(self) -> None:
        # leaving for any reason: stop the engine at its next cancellation point (weights roll back)
        if self.bridge is not None:
            self.bridge.request_cancel()

    # ---- command palette
    def get_system_commands(self, screen: Any) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        keys = actions.current_keys(self)
        for a in actions.ACTIONS:
            if a.scope != "app" or a.id == "quit":
                continue
            yield SystemCommand(a.description, f"{a.id} · {keys[a.id]}",
                                functools.partial(self.run_action, a.action))


def _score_known(wb: Any, items: list) -> dict[str, float]:
    """Baseline ROUGE-1 per item: does the model know the fact now?"""
    from backends.metrics import evaluate

    res = evaluate(wb.handle, {"known": items}, wb.settings, wb.on_event, wb.cancel)
    split = res.splits.get("known")
    return {s.id: s.rouge1 for s in split.items} if split else {}


# ==================================================================== autosave
# The autosave is ONE file (sessions.paths.autosave_path()), replaced atomically by
# sessions.writer.atomic_write, so a crash or a kill mid-write leaves the previous complete
# autosave (never half a pair): a JSON object {"format": 1, "path": the session's file or null,
# "saved_at": seconds since the epoch, "session": the session as TOML text}.  At start-up a file
# that cannot be read, is not UTF-8, not that JSON, or holds a session that does not validate is
# renamed aside (<name>.corrupt-<YYYYmmdd-HHMMSS>) with a one-line warning, and the app starts
# without it.  The old two-file autosave (autosave.toml + autosave.json, written one after the
# other) is never restored, whole or half: its files are renamed aside (<name>.old-<stamp>) with a
# warning.
AUTOSAVE_FORMAT = 1


def autosave_text(session: Any) -> str:
    """The autosave file's content for ``session`` (see above)."""
    import sessions

    return json.dumps({"format": AUTOSAVE_FORMAT,
                       "path": str(session.path) if session.path is not None else None,
                       "saved_at": time.time(), "session": sessions.dumps(session)},
                      ensure_ascii=False, indent=1) + "\n"


def _set_aside(path: Path, tag: str) -> Path | None:
    """Rename ``path`` to ``<name>.<tag>-<timestamp>`` next to it (never over a file); None if it fails."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(100):
        dest = path.with_name(f"{path.name}.{tag}-{stamp}" + (f"-{n}" if n else ""))
        if os.path.lexists(dest):
            continue
        try:
            os.rename(path, dest)
        except OSError:
            return None
        return dest
    return None


def _read_autosave(path: Path) -> Any:
    """The session in the autosave file; raises ValueError (one line) when it is not a valid autosave."""
    import sessions

    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read it ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text (bad byte at offset {exc.start})") from None
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"not valid JSON ({exc})") from None
    if not isinstance(obj, dict) or obj.get("format") != AUTOSAVE_FORMAT:
        raise ValueError("not an unlearn-tui autosave (no format 1 object)")
    where, toml_text = obj.get("path"), obj.get("session")
    if not isinstance(toml_text, str) or not (where is None or isinstance(where, str)):
        raise ValueError("not an unlearn-tui autosave (session or path missing)")
    try:
        return sessions.loads(toml_text, where)
    except UserError as exc:
        raise ValueError(f"the session in it is invalid ({exc})") from None
    except Exception as exc:  # whatever it holds, a bad autosave must never stop the app
        raise ValueError(f"the session in it cannot be read ({type(exc).__name__}: {exc})") from None


def _restore_autosave() -> tuple[Any, bool, list[str]]:
    """(session or None, restored, warnings): the autosave if it is valid (see above)."""
    from sessions.paths import autosave_path, legacy_autosave_paths

    problems: list[str] = []
    old = [p for p in legacy_autosave_paths() if os.path.lexists(p)]
    if old:
        moved = [(p, _set_aside(p, "old")) for p in old]
        names = ", ".join(f"{p.name} -> {d.name}" if d else f"{p.name} (could not be renamed)" for p, d in moved)
        problems.append(f"an autosave in the old two-file format was not restored (a crash can leave that "
                        f"pair half written); set aside in {old[0].parent}: {names}")
    path = autosave_path()
    if not os.path.lexists(path):
        return None, False, problems
    try:
        s = _read_autosave(path)
    except ValueError as exc:
        dest = _set_aside(path, "corrupt")
        aside = f"moved to {dest}" if dest else "and it could not be moved aside"
        problems.append(f"the autosave {path} was not restored: {exc}; {aside}")
        return None, False, problems
    return s, True, problems


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
    import sessions

    problems: list[str] = []
    if settings is None:
        settings, problems = load_settings()
    restored = False
    session = None
    if session_path is not None:
        session = sessions.load(session_path)
    elif restore:
        session, restored, p = _restore_autosave()
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
