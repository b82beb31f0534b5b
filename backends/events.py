"""Typed progress events and the cooperative cancel token.

Every long operation takes ``on_event`` (one callable receiving these events)
and ``cancel`` (a :class:`CancelToken`).  :class:`Tracker` is the one place
that computes done/total and ETA, and checks the token on every step.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import Cancelled


@dataclass(frozen=True)
class StageStarted:
    stage: str
    total: int | None = None
    detail: str = ""


@dataclass(frozen=True)
class Progress:
    stage: str
    done: int
    total: int | None
    eta_s: float | None = None
    elapsed_s: float = 0.0
    loss: float | None = None
    detail: str = ""


@dataclass(frozen=True)
class Log:
    message: str
    level: str = "info"  # info | warning | error


@dataclass(frozen=True)
class ItemResult:
    """One evaluated item (split, id, generation, scores)."""

    split: str
    item_id: str
    generation: str
    scores: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RunStarted:
    index: int
    method: str
    total_runs: int


@dataclass(frozen=True)
class RunFinished:
    index: int
    method: str
    result: Any  # backends.runner.RunResult


@dataclass(frozen=True)
class SessionFinished:
    result: Any  # backends.runner.SessionResult


@dataclass(frozen=True)
class Failure:
    message: str
    where: str | None = None
    rolled_back: bool = False


Event = StageStarted | Progress | Log | ItemResult | RunStarted | RunFinished | SessionFinished | Failure
EventCallback = Callable[[Event], None]


def ignore(_event: Event) -> None:
    """The default callback: drop events."""


class CancelToken:
    """Cooperative cancellation shared between a UI thread and the engine."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    def reset(self) -> None:
        self._event.clear()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled("cancelled by the user")


NEVER = CancelToken()  # a token nobody cancels; callers may pass it as default


class Tracker:
    """Emits StageStarted once, then Progress with ETA on each ``step``.

    Checks ``cancel`` before every step so every loop that reports progress is
    also a cancellation point.
    """

    def __init__(self, on_event: EventCallback | None, cancel: CancelToken | None, stage: str,
                 total: int | None, detail: str = "") -> None:
        self.on_event = on_event or ignore
        self.cancel = cancel or NEVER
        self.stage = stage
        self.total = total
        self.done = 0
        self.skipped = 0        # units done before this run (a resume): not part of the rate behind the ETA
        self.start = time.perf_counter()
        self.cancel.check()
        self.on_event(StageStarted(stage, total, detail))

    def step(self, n: int = 1, loss: float | None = None, detail: str = "") -> None:
        self.done += n
        elapsed = time.perf_counter() - self.start
        eta = None
        if self.total and self.done > self.skipped:
            eta = max(0.0, elapsed / (self.done - self.skipped) * (self.total - self.done))
        self.on_event(Progress(self.stage, self.done, self.total, eta, elapsed, loss, detail))
        self.cancel.check()

    def advance(self, n: int, detail: str = "") -> None:
        """Count ``n`` units done earlier (a resumed run): reported at once, left out of the ETA's rate."""
        self.done += n
        self.skipped += n
        self.on_event(Progress(self.stage, self.done, self.total, None, time.perf_counter() - self.start, None,
                               detail))
        self.cancel.check()

    def check(self) -> None:
        self.cancel.check()
