"""Textual messages posted by the engine worker (tui/worker.py) to the App.

The worker thread never touches widgets or App state: it only posts these
messages (``post_message`` is thread-safe); the App handles them on the UI
thread and owns every piece of state.
"""

from __future__ import annotations

from typing import Any

from textual.message import Message


class EngineMessage(Message):
    """Base class; ``job`` names the job that posted it (e.g. "run", "step")."""

    def __init__(self, job: str) -> None:
        super().__init__()
        self.job = job


class JobStarted(EngineMessage):
    pass


class StageChanged(EngineMessage):
    def __init__(self, job: str, stage: str, total: int | None, detail: str = "") -> None:
        super().__init__(job)
        self.stage, self.total, self.detail = stage, total, detail


class ProgressUpdate(EngineMessage):
    """A coalesced progress report; ``losses`` are all losses seen since the last one."""

    def __init__(self, job: str, stage: str, done: int, total: int | None, eta_s: float | None,
                 elapsed_s: float, losses: list[float], detail: str = "") -> None:
        super().__init__(job)
        self.stage, self.done, self.total = stage, done, total
        self.eta_s, self.elapsed_s, self.losses, self.detail = eta_s, elapsed_s, losses, detail


class LogLine(EngineMessage):
    def __init__(self, job: str, message: str, level: str = "info") -> None:
        super().__init__(job)
        self.message, self.level = message, level


class RunStartedMsg(EngineMessage):
    def __init__(self, job: str, index: int, method: str, total_runs: int) -> None:
        super().__init__(job)
        self.index, self.method, self.total_runs = index, method, total_runs


class RunDone(EngineMessage):
    """One run finished (``result`` is a backends.runner.RunResult)."""

    def __init__(self, job: str, result: Any) -> None:
        super().__init__(job)
        self.result = result


class JobDone(EngineMessage):
    """The job returned; ``value`` is whatever the job function returned."""

    def __init__(self, job: str, value: Any = None, seconds: float = 0.0) -> None:
        super().__init__(job)
        self.value, self.seconds = value, seconds


class JobFailed(EngineMessage):
    """The job raised; ``message`` is one line.  ``cancelled``: the user asked for it."""

    def __init__(self, job: str, message: str, cancelled: bool = False, rolled_back: bool = True,
                 bug: bool = False) -> None:
        super().__init__(job)
        self.message, self.cancelled, self.rolled_back, self.bug = message, cancelled, rolled_back, bug


class EngineNote(EngineMessage):
    """An intermediate result of a job: ``kind`` is "data", "model", "baseline_eval", ...; ``value`` its payload."""

    def __init__(self, job: str, kind: str, value: Any = None, error: str | None = None) -> None:
        super().__init__(job)
        self.kind, self.value, self.error = kind, value, error
