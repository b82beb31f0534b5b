"""The engine in one thread worker per job.

:class:`EngineBridge` owns the :class:`backends.runner.Workbench` and the
:class:`CancelToken`.  :meth:`EngineBridge.start` runs a :class:`tui.jobs.Job`
(its snapshot loaded into the workbench, then its one Workbench call) in a
Textual *thread* worker; engine events become Textual messages posted to the
App, with :class:`backends.events.Progress` coalesced to at most
``progress_hz`` messages per second (the last one of a stage is always sent,
and every loss value is forwarded, batched).  The worker never touches
widgets or App state.  One job at a time: ``start`` refuses while busy.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from unlearn_tui.backends import events as ev
from unlearn_tui.backends.errors import Cancelled, NonFiniteError, UserError

from . import messages as msg


class Coalescer:
    """Turns a stream of engine events into few messages (thread-safe)."""

    def __init__(self, post: Callable[[Any], None], job: str, hz: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.post, self.job, self.clock = post, job, clock
        self.interval = 1.0 / hz if hz > 0 else 0.0
        self._last = -1e9
        self._pending: ev.Progress | None = None
        self._losses: list[float] = []
        self._lock = threading.Lock()
        self.sent = 0       # progress messages posted
        self.seen = 0       # progress events received

    def __call__(self, e: Any) -> None:
        if isinstance(e, ev.Progress):
            with self._lock:
                self.seen += 1
                if e.loss is not None:
                    self._losses.append(float(e.loss))
                self._pending = e
                final = e.total is not None and e.done >= e.total
                if final or self.clock() - self._last >= self.interval:
                    self._flush_locked()
            return
        self.flush()
        if isinstance(e, ev.StageStarted):
            self.post(msg.StageChanged(self.job, e.stage, e.total, e.detail))
        elif isinstance(e, ev.Log):
            self.post(msg.LogLine(self.job, e.message, e.level))
        elif isinstance(e, ev.RunStarted):
            self.post(msg.RunStartedMsg(self.job, e.index, e.method, e.total_runs))
        elif isinstance(e, ev.RunFinished):
            self.post(msg.RunDone(self.job, e.result))
        elif isinstance(e, ev.Failure):
            self.post(msg.LogLine(self.job, e.message, "error"))

    def _flush_locked(self) -> None:
        p = self._pending
        if p is None:
            return
        self._pending = None
        losses, self._losses = self._losses, []
        self._last = self.clock()
        self.sent += 1
        self.post(msg.ProgressUpdate(self.job, p.stage, p.done, p.total, p.eta_s, p.elapsed_s, losses, p.detail))

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()


def _guarded_workbench(session: Any, cancel: ev.CancelToken, handle: Any,
                       refuse_model: Callable[[Any], str | None] | None,
                       loaded: Callable[[str], None] | None = None) -> Any:
    """A Workbench whose every model load first asks ``refuse_model`` (and then tells ``loaded``).

    ``refuse_model(session)`` returns a one-line reason not to load that session's model (e.g.
    ``model.trust_remote_code = true`` without ``--trust-remote-code``), raised as UserError, or None.
    ``loaded(name)`` is called (in the worker thread) after a model was loaded.
    """
    from unlearn_tui.backends.runner import Workbench  # torch-free import

    class GuardedWorkbench(Workbench):
        def load_model(self):
            if self.handle is not None:
                return self.handle
            if refuse_model is not None:
                why = refuse_model(self.session)
                if why:
                    raise UserError(why)
            handle = super().load_model()
            if loaded is not None:
                loaded(self.session.model.name)
            return handle

    return GuardedWorkbench(session, ev.ignore, cancel, handle)


class EngineBridge:
    """One Workbench, one cancel token, at most one running job."""

    def __init__(self, app: Any, session: Any, handle: Any = None, progress_hz: float = 10.0,
                 refuse_model: Callable[[Any], str | None] | None = None) -> None:
        self.app = app
        self.cancel = ev.CancelToken()
        self.workbench = _guarded_workbench(
            session, self.cancel, handle, refuse_model,
            lambda name: app.post_message(msg.EngineNote(self.job or "", "model", name)))
        self.progress_hz = progress_hz
        self.job: str | None = None
        self.worker: Any = None

    @property
    def busy(self) -> bool:
        return self.job is not None

    def start(self, job: Any) -> bool:
        """Run ``job.body(workbench)`` (a :class:`tui.jobs.Job`) in a thread worker; False when busy."""
        if self.busy:
            return False
        fn, job = job.body, job.name
        self.job = job
        self.cancel.reset()
        post = self.app.post_message
        coalescer = Coalescer(post, job, self.progress_hz)

        def body() -> None:
            wb = self.workbench
            wb.on_event = coalescer
            post(msg.JobStarted(job))
            t0 = time.perf_counter()
            try:
                value = fn(wb)
            except Cancelled:
                coalescer.flush()
                post(msg.JobFailed(job, "cancelled", cancelled=True))
            except (UserError, NonFiniteError) as exc:
                coalescer.flush()
                post(msg.JobFailed(job, " ".join(str(exc).split()) or type(exc).__name__))
            except MemoryError:
                post(msg.JobFailed(job, "out of memory"))
            except Exception as exc:  # a bug or an unexpected library error: report, keep running
                coalescer.flush()
                name = type(exc).__name__
                text = " ".join(str(exc).split())[:300]
                oom = "out of memory" in text.lower()
                post(msg.JobFailed(job, ("out of memory: " if oom else f"{name}: ") + text, bug=not oom))
            else:
                coalescer.flush()
                post(msg.JobDone(job, value, time.perf_counter() - t0))
            finally:
                wb.on_event = ev.ignore

        self.worker = self.app.run_worker(body, name=job, group="engine", thread=True, exit_on_error=False)
        return True

    def finished(self) -> None:
        """Called by the App when it handled JobDone/JobFailed."""
        self.job = None
        self.worker = None

    def request_cancel(self) -> bool:
        if not self.busy:
            return False
        self.cancel.cancel()
        return True
