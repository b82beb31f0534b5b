"""Routing of the engine: jobs go in, the worker's messages come out as pane updates.

:class:`EngineRouter` (``app.router``) submits :class:`tui.jobs.Job` values to
the App's :class:`tui.jobs.JobQueue` and answers what the queue says (started,
queued, refused).  Every :class:`tui.messages.EngineMessage` the worker posts to
the App is handed to :meth:`EngineRouter.route` (one ``@on`` handler on the
App), which calls the method of the message's handler name (``on_job_done``,
``on_progress_update``, ...): the message becomes workspace changes, lines and
progress in the Run pane, the status strip and notifications.  Runs on the UI
thread only.
"""

from __future__ import annotations

from typing import Any

from . import messages as msg
from .jobs import EDITING_JOBS, WEIGHT_JOBS
from .progress import ProgressClock


def rolled_back(job: str, model_ready: bool = True) -> str:
    """What a cancelled (or failed) ``job`` leaves: only the jobs that edit the weights roll them back."""
    if job in WEIGHT_JOBS:
        return "the weights were rolled back"
    if job in ("startup", "reload") and not model_ready:
        return "the model was not loaded"
    if job == "self-improve":
        return "no target was changed"
    return "nothing was changed"


class EngineRouter:
    def __init__(self, app: Any) -> None:
        self.app = app
        self.clock = ProgressClock()     # the current stage, read by the one-second tick (tui/progress.py)
        from .sampling_rate import Observer

        self.sampling = Observer()       # measures the statistics sampling rate (the method form's "≈ N s")

    def _run_pane(self) -> Any:
        return self.app.pane("run")

    # ---- jobs in
    def submit(self, make: Any, name: str, first: bool = False) -> None:
        """Queue a job: ``make()`` (UI thread, when it starts) returns a :class:`Job`.  Every job is
        started, queued or refused with a message (before the engine exists it waits for start-up)."""
        self._answer(self.app.jobs.submit(make, name, first=first))

    def _answer(self, answer: Any) -> None:
        if answer is None:
            return
        if answer.status == "started":
            job = self.app.jobs.current
            if not self.app.model_ready and self.app.model_state != "loading":
                self.app.model_state = "loading"     # a job that needs the model loads it
                self.app.update_title()
            run = self._run_pane()
            if run is not None and job is not None and job.name in EDITING_JOBS:
                run.reset_loss()
                run.status("")
            self.strip(answer.message)
        elif answer.status in ("queued", "duplicate"):
            self.app.notify(answer.message, timeout=3)
        elif answer.status == "refused":
            self.report_error(answer.message)
            self.next_job()

    def next_job(self) -> None:
        self._answer(self.app.jobs.next())

    # ---- messages out
    def route(self, m: msg.EngineMessage) -> None:
        handler = getattr(self, m.handler_name, None)
        if handler is not None:
            handler(m)

    def on_engine_note(self, m: msg.EngineNote) -> None:
        app = self.app
        if m.kind == "data":
            warning = app.workspace.data_loaded(m.value, m.error)
            if m.error:
                self.report_error(m.error)
            if warning:
                app.notify(warning, severity="warning")
        elif m.kind == "known_cached":
            app.known.cached(*m.value)
        elif m.kind == "model":
            app.model_ready = True
            app.workspace.model_name = str(m.value)
            app.workspace.model_device = app.model_device()
            app.update_title()
            app.notify(f"model ready: {m.value}", timeout=3)

    def on_job_started(self, m: msg.JobStarted) -> None:
        self.clock.start_job()
        self.strip(f"{m.job}: started")

    def _measured(self) -> None:
        """A sampling stage ended: its tokens per second are remembered for the method form's cost line."""
        if self.sampling.best is not None:
            self.sampling.finish(self.app.workspace.model_name, self.app.model_device())

    def on_stage_changed(self, m: msg.StageChanged) -> None:
        self._measured()
        self.clock.stage_started(m.stage, m.total, m.detail)
        run = self._run_pane()
        if run is not None:
            run.stage(m.stage, m.total, m.detail)
            run.log_line(f"{m.stage} {m.detail}".strip())
        self.tick()

    def on_progress_update(self, m: msg.ProgressUpdate) -> None:
        self.clock.update(m.stage, m.done, m.total, m.eta_s, m.elapsed_s, m.detail)
        self.sampling.progress(m.stage, m.done, m.elapsed_s)
        run = self._run_pane()
        if run is not None:
            run.progress(m)
        self.tick()

    def tick(self) -> None:
        """Redraw the current stage's progress at the time now (the App calls this every second)."""
        view = self.clock.view()
        if view is None:
            return
        run = self._run_pane()
        if run is not None:
            run.show(view)
        job = self.app.bridge.job if self.app.bridge is not None else None
        phase = f" ({view.phase})" if view.phase else ""
        self.strip(f"{job or 'job'}: {view.stage}{phase} {view.counts()} · ETA {view.eta()}",
                   fraction=view.fraction)

    def on_log_line(self, m: msg.LogLine) -> None:
        run = self._run_pane()
        if run is not None:
            run.log_line(m.message, m.level)
        if m.level == "warning":
            self.app.notify(m.message, severity="warning", timeout=5)

    def on_run_started_msg(self, m: msg.RunStartedMsg) -> None:
        run = self._run_pane()
        if run is not None:
            run.reset_loss()
            run.status(f"run {m.index + 1}/{m.total_runs}: {m.method}")

    def on_run_done(self, m: msg.RunDone) -> None:
        self.app.workspace.add_result(m.result)
        self.app.file_actions.save_results()     # the results file beside the session (tui/results_store.py)

    def _ended(self, text: str) -> None:
        """A job ended: the clock stops; the Run pane and the strip go idle (no stale bar or ETA)."""
        self._measured()
        self.clock.stop()
        app = self.app
        if not app.model_ready and app.model_state != "not loaded":
            app.model_state = "not loaded"   # never "(loading)" in the header once nothing loads it
            app.update_title()
        run = self._run_pane()
        if run is not None:
            run.idle("idle")
        self.strip(text, fraction=0.0)

    def on_job_done(self, m: msg.JobDone) -> None:
        app = self.app
        job = app.jobs.finished()
        app.bridge.finished()
        app.jobs_done.append(m.job)
        self._ended(f"idle · {m.job} done in {m.seconds:.1f}s")
        if job is not None and job.on_done is not None:
            job.on_done(m.value)
        if app.quit_when_idle():
            return
        self.next_job()
        app.known.kick()          # idle: the known scores of the rows on screen, a small batch at a time

    def on_job_failed(self, m: msg.JobFailed) -> None:
        app = self.app
        app.jobs.finished()
        app.bridge.finished()
        app.jobs_done.append(m.job)
        run = self._run_pane()
        what = rolled_back(m.job, app.model_ready)
        if m.cancelled:
            text = f"{m.job}: cancelled; {what}"
            if m.job in ("startup", "reload") and not app.model_ready:
                text += " (Run, Step or Probe load it)"
            if not app.quitting:
                app.notify(text, severity="warning", timeout=6)
            self._ended(f"idle · {text}")
            if run is not None:
                run.status(f"[b yellow]{text}[/]")
                run.log_line(text, "warning")
            app.jobs.clear()
        else:
            self.report_error(f"{m.job}: {m.message}", modal=m.bug and not app.quitting)
            self._ended(f"idle · {m.job} failed")
            if run is not None:
                run.status(f"[b red]{m.job} failed[/]: {m.message}" +
                           (f"; {what}" if m.rolled_back and m.job in WEIGHT_JOBS else ""))
        if m.job == "known":
            app.known.failed_batch()
        elif m.job in ("startup", "reload"):
            app.known.started = app.model_ready      # a failed data file: the loaded model still scores
            if app.workspace.baseline_pending and not app.model_ready:
                app.workspace.set_baseline(None)
        if app.quit_when_idle():
            return
        self.next_job()
        app.known.kick()

    # ---- what a finished job shows
    def run_finished(self, result: Any) -> None:
        """``on_done`` of a run or replay job."""
        self.app.workspace.run_finished(result)
        self.app.file_actions.save_results()
        run = self._run_pane()
        if run is not None:
            text = f"[b green]finished[/]: {len(result.runs)} run(s)"
            if result.undone:
                text += f" (the {result.undone} kept step edit(s) were undone first)"
            run.status(text)
            run.idle("idle")
        self.app.notify("run finished; see Results (f6)", timeout=4)

    def step_finished(self, what: str, step: Any) -> None:
        """``on_done`` of a step, undo or redo job."""
        text = self.app.workspace.step_finished(what, step)
        self.app.file_actions.save_results()
        run = self._run_pane()
        if run is not None:
            run.status(text)
        self.app.notify(text, timeout=3)

    def steps_applied(self, value: Any) -> None:
        """``on_done`` of the steps job: the session's recorded ``[[steps]]`` are on the model now."""
        step, known = value
        ws = self.app.workspace
        if known:
            ws.add_known(known)
        methods = list(dict.fromkeys(st.method for st in ws.session.steps)) or ["?"]
        text = ws.step_finished("recorded", step, method=", ".join(methods))
        self.app.file_actions.save_results()
        text = (f"opened on the edited model: {step.k} recorded step(s) ([[steps]], {', '.join(methods)}) "
                f"applied · {text.split(' · ', 1)[1] if ' · ' in text else text}")
        ws.probe_note = text
        run = self._run_pane()
        if run is not None:
            run.status(text)
            run.log_line(text)
        self.app.notify(text, timeout=6)

    def export_finished(self, delta: bool, kept: int, folder: Any) -> None:
        """``on_done`` of an export job."""
        what = "a delta" if delta else "a Hugging Face folder"
        text = f"exported the edited model ({kept} kept step edit(s)) as {what} to {folder}"
        run = self._run_pane()
        if run is not None:
            run.status(text)
            run.log_line(text)
        self.app.notify(text, timeout=6)

    def report_error(self, message: str, modal: bool = False) -> None:
        """An error: the Run pane's log, then a notification (or, for a bug, the error screen)."""
        self.app.last_error = message
        run = self._run_pane()
        if run is not None:
            run.log_line(message, "error")
        if modal:
            from .screens.error import ErrorModal

            self.app.push_screen(ErrorModal(message))
        else:
            self.app.notify(message, severity="error", timeout=10)

    def strip(self, text: str, fraction: float | None | str = "keep") -> None:
        """The status strip above the footer: the job's text, and its bar (``fraction`` 0..1, None: unknown)."""
        from rich.markup import escape

        try:
            self.app.screen.query_one("#strip-text").update(escape(text))
            if fraction != "keep":
                bar = self.app.screen.query_one("#strip-bar")
                if fraction is None:
                    bar.update(total=None)
                else:
                    bar.update(total=1000, progress=round(float(fraction) * 1000))
        except Exception:
            pass
