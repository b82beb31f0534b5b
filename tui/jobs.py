"""The job queue: one engine job at a time, the others wait (no Textual here).

A :class:`Job` is a value: its name, a label, the state it runs on (a
:class:`tui.workspace.Snapshot`, loaded into the Workbench first) and ``call``,
exactly one call on the :class:`backends.runner.Workbench` (``run_all``,
``step_next``, ``undo``, ...) made in the worker thread.  :meth:`JobQueue.submit`
answers with a :class:`Submitted`: started, queued (after which job), or refused
(with the one-line reason).  The functions at the end build the App's jobs
(each one Workbench call, the same calls ``replay`` makes) from the
:class:`tui.workspace.Workspace` as it is when the job starts.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from unlearn_tui.backends.errors import UserError

from .workspace import Snapshot, quiet

# jobs that change the weights: the Run pane's loss chart and status start afresh
EDITING_JOBS = frozenset({"run", "replay", "step", "undo", "redo", "self-improve", "steps"})
# jobs that change the weights (a cancel or a failure rolls them back); the others change none
WEIGHT_JOBS = frozenset({"run", "replay", "step", "undo", "redo", "steps"})
STEPS_STAGE = "apply recorded steps"


@dataclass(frozen=True)
class Job:
    name: str
    call: Callable[[Any], Any]                # fn(workbench), in the worker thread: one Workbench call
    snapshot: Snapshot | None = None          # loaded into the workbench first (Workbench.adopt)
    label: str = ""
    on_done: Callable[[Any], None] | None = None   # on the UI thread, with what ``call`` returned

    @property
    def title(self) -> str:
        return self.label or self.name

    def body(self, wb: Any) -> Any:
        """What the worker runs."""
        if self.snapshot is not None:
            self.snapshot.load_into(wb)
        return self.call(wb)


@dataclass(frozen=True)
class Submitted:
    status: str            # "started" | "queued" | "refused" | "duplicate" | "unavailable"
    message: str = ""

    @property
    def accepted(self) -> bool:
        return self.status in ("started", "queued")


@dataclass
class JobQueue:
    """Jobs waiting for the one engine worker.

    ``start(job) -> bool`` starts a job in the worker (False while it is busy);
    ``busy() -> bool`` tells whether a job runs; ``running() -> str | None`` names it.
    """

    start: Callable[[Job], bool]
    busy: Callable[[], bool]
    running: Callable[[], str | None] = lambda: None
    waiting: list = field(default_factory=list)
    current: Job | None = None

    def submit(self, make: Callable[[], Job] | Job, name: str | None = None, first: bool = False) -> Submitted:
        """Start the job now, or queue it (``first``: ahead of the waiting ones); ``make`` (a Job or a
        function building one, called when it starts so it sees the state of that moment) may raise
        UserError: the job is refused."""
        name = name or (make.name if isinstance(make, Job) else getattr(make, "__name__", "job"))
        if self.busy() or (self.waiting and not first):
            if any(n == name for n, _ in self.waiting):
                return Submitted("duplicate", f"{name}: already queued")
            if first:
                self.waiting.insert(0, (name, make))
            else:
                self.waiting.append((name, make))
            ahead = self.running() or (self.waiting[0][0] if self.waiting[0][0] != name else "")
            return Submitted("queued", f"{name}: queued after {ahead}" if ahead else f"{name}: queued")
        return self._launch(make)

    def _launch(self, make: Callable[[], Job] | Job) -> Submitted:
        try:
            job = make if isinstance(make, Job) else make()
        except UserError as exc:
            return Submitted("refused", quiet(exc))
        self.current = job
        if not self.start(job):
            self.current = None
            return Submitted("refused", f"{job.name}: the engine is busy")
        return Submitted("started", f"{job.title}…")

    def finished(self) -> Job | None:
        """The running job ended; returns it (its ``on_done`` is the caller's to call)."""
        job, self.current = self.current, None
        return job

    def next(self) -> Submitted | None:
        """Start the first waiting job when the worker is free (a refused one is skipped: its answer is returned)."""
        if self.waiting and not self.busy():
            _, make = self.waiting.pop(0)
            return self._launch(make)
        return None

    def clear(self) -> None:
        self.waiting.clear()

    def __len__(self) -> int:
        return len(self.waiting)

    def __bool__(self) -> bool:
        return bool(self.waiting)


# ==================================================================== the App's jobs
def _nothing(what: str) -> Any:
    raise UserError(f"nothing to {what}")


def _job(ws: Any, name: str, call: Callable[[Any], Any], on_done: Callable[[Any], None] | None = None) -> Job:
    return Job(name, call, ws.snapshot(), on_done=on_done)


def startup_job(ws: Any, reload_model: bool, on_items: Callable[[Any, Any], None],
                name: str = "startup", on_cached: Callable[[Any, dict], None] | None = None,
                on_done: Callable[[Any], None] | None = None) -> Job:
    """Load the data (``on_items(items, error)`` as soon as they are read), then the model.

    With ``on_cached``, right after the items are read (before the model loads) it gets the key of the
    model the known-score cache index remembers for the session's ``[model]`` and the known scores cached
    for it (:func:`backends.runner.known_cache_before_load`).  The job returns the loaded model's known-cache
    key (recorded in that index), None when no unedited model is loaded; ``on_done`` gets it."""
    def call(wb: Any) -> Any:
        from unlearn_tui.backends import runner

        def items_read(items: Any, error: Any) -> None:
            on_items(items, error)
            if items and on_cached is not None:
                on_cached(*runner.known_cache_before_load(wb.session, items))

        wb.startup(reload_model, 0, items_read)
        h = wb.handle
        if h is None or wb.undo_stack or h.wrappers:
            return None
        key = runner.known_cache_key(h, wb.settings)
        runner.known_cache_remember(runner.known_cache_identity(wb.session), key)
        return key

    return _job(ws, name, call, on_done)


def run_job(ws: Any, on_done: Callable[[Any], None], name: str = "run") -> Job:
    """Every run of the session (``run`` or ``replay``); refused (UserError) when nothing can run."""
    ws.check_runnable()
    return _job(ws, name, lambda wb: wb.run_all(), on_done)


def step_job(ws: Any, question: str | None, after_step: Callable[[str, Any], None]) -> Job:
    """The next step edit; ``after_step("step", step)`` when it is done."""
    ws.check_runnable()
    return _job(ws, "step", lambda wb: wb.step_next(question=question), functools.partial(after_step, "step"))


def undo_job(ws: Any, redo: bool, question: str | None, after_step: Callable[[str, Any], None]) -> Job:
    """Undo (or redo) the last step edit, scored; refused in the worker when there is nothing to undo."""
    what = "redo" if redo else "undo"
    if redo:
        call = lambda wb: wb.redo(score=True, question=question) or _nothing(what)  # noqa: E731
    else:
        call = lambda wb: wb.undo(score=True, question=question) or _nothing(what)  # noqa: E731
    return _job(ws, what, call, functools.partial(after_step, what))


def probe_job(ws: Any, question: str) -> Job:
    """Ask the model ``question``; the answer goes to the workspace."""
    return _job(ws, "probe", lambda wb: (question, *wb.probe(question)), ws.probe_answered)


def self_improve_job(ws: Any, item_ids: list[str], on_done: Callable[[list], None]) -> Job:
    """Have the model write targets for ``item_ids``; ``on_done(records)``."""
    ids = list(item_ids)
    return _job(ws, "self-improve", lambda wb: wb.write_targets(ids), on_done)


def steps_job(ws: Any, on_done: Callable[[Any], None], before: Callable[[Any], Any] | None = None) -> Job:
    """Apply the session's recorded ``[[steps]]`` (a session opened on its edited model), kept, then score
    that state; ``on_done((StepResult, what before returned))``.  Kept edits already on the model (another
    session's) are undone first; a cancel or a failure undoes the steps this job applied.

    ``before(wb)`` runs first in the worker (the known scores of the rows on screen: they are the unedited
    model's, so they come before its edits)."""
    from unlearn_tui.backends.events import Tracker

    steps = list(ws.session.steps)
    if not steps:
        raise UserError("the session records no [[steps]]")

    def call(wb: Any) -> Any:
        from unlearn_tui.backends.runner import StepResult

        while wb.undo():           # edits another session kept on this model are not this session's
            pass
        wb.redo_stack.clear()
        extra = before(wb) if before is not None else None
        start = len(wb.undo_stack)
        tracker = Tracker(wb.on_event, wb.cancel, STEPS_STAGE, len(steps), detail=f"{len(steps)} step(s)")
        try:
            for i, st in enumerate(steps):
                try:
                    wb.replay_steps([st])
                except UserError as exc:
                    raise UserError(exc.message, f"steps[{i}].items") from None
                tracker.step(detail=f"{st.method} on {', '.join(st.items)}")
        except BaseException:
            while len(wb.undo_stack) > start:       # back to the model as it was before this job
                wb.undo()
            wb.redo_stack.clear()
            raise
        wb.redo_stack.clear()
        quick = wb.quick_scores()
        p = wb.prepare(paraphrases=False)
        return StepResult(len(wb.undo_stack), len(p.requests), quick), extra

    return _job(ws, "steps", call, on_done)
