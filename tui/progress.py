"""What the Run pane and the status strip show of a job's progress (no Textual here).

The engine reports counts (:class:`backends.events.Progress`: done/total, an
ETA from the mean rate so far).  :class:`ProgressClock` turns them into what
tells the truth between events too:

* **a ticking clock** -- :meth:`ProgressClock.view` takes the time *now*, so the
  App's one-second timer moves elapsed on and the ETA down between events;
* **phases weighted by their real cost** -- an evaluation stage
  (``"evaluate <split>"``, :func:`backends.metrics.evaluate_split`) counts
  teacher-forced pairs first (one forward pass each) and then generations
  (``max_new_tokens`` decoding steps each, by far the longest sub-step): its
  fraction weighs a generation :data:`GENERATION_WEIGHT` pairs, and once the
  generations have begun their own measured rate gives the ETA;
* **idle** -- :meth:`ProgressClock.stop` clears it: no bar, no ETA.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass

GENERATION_WEIGHT = 8.0
"""What one generation costs, in teacher-forced pairs (a short greedy answer is several decoding steps)."""

_ITEMS = re.compile(r"(\d+) items?\b")


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "--:--"
    s = int(round(max(0.0, s)))
    return f"{s // 60:02d}:{s % 60:02d}" if s < 3600 else f"{s // 3600}h{(s % 3600) // 60:02d}m"


@dataclass(frozen=True)
class View:
    """What to draw now: ``fraction`` in 0..1 (None: unknown), elapsed and ETA in seconds."""

    stage: str
    done: int
    total: int | None
    fraction: float | None
    elapsed_s: float          # since the job started
    stage_s: float            # since this stage started
    eta_s: float | None       # of this stage; 0 and not done: overdue
    phase: str = ""           # "scoring" / "generating" inside an evaluation, else ""
    detail: str = ""

    def counts(self) -> str:
        return f"{self.done}/{self.total if self.total else '?'}"

    def eta(self) -> str:
        if self.eta_s is not None and self.eta_s <= 0 and self.total and self.done < self.total:
            return "any moment"
        return fmt_seconds(self.eta_s)

    def clock(self) -> str:
        return f"elapsed {fmt_seconds(self.elapsed_s)} · stage {fmt_seconds(self.stage_s)} · ETA {self.eta()}"


class ProgressClock:
    """The current stage's progress, read at any time (see the module doc)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.stage: str | None = None
        self.detail = ""
        self.total: int | None = None
        self.done = 0
        self.job_started: float | None = None
        self._stage_start = 0.0
        self._gen_n = 0               # generations of an evaluation stage (0: not one)
        self._gen_start: float | None = None   # when its generations began
        self._gen_done0 = 0
        self._eta: float | None = None   # the ETA at the last event ...
        self._eta_at = 0.0                # ... and when it came

    @property
    def active(self) -> bool:
        return self.stage is not None

    def start_job(self) -> None:
        self.stop()
        self.job_started = self.clock()

    def stop(self) -> None:
        """Idle: nothing to show."""
        self.stage, self.detail, self.total, self.done = None, "", None, 0
        self._gen_n, self._gen_start, self._eta = 0, None, None
        self.job_started = None

    def stage_started(self, stage: str, total: int | None, detail: str = "") -> None:
        now = self.clock()
        if self.job_started is None:
            self.job_started = now
        self.stage, self.total, self.detail, self.done = stage, total, detail, 0
        self._stage_start = now
        self._gen_start, self._gen_done0, self._eta = None, 0, None
        self._gen_n = 0
        if stage.startswith("evaluate ") and total:
            m = _ITEMS.search(detail or "")
            if m and 0 < int(m.group(1)) <= total:
                self._gen_n = int(m.group(1))

    def update(self, stage: str, done: int, total: int | None, eta_s: float | None = None,
               elapsed_s: float | None = None, detail: str = "") -> None:
        if stage != self.stage:
            # a progress report of a stage whose start we did not see (e.g. a coalesced message)
            self.stage_started(stage, total, detail if stage.startswith("evaluate ") else "")
            if elapsed_s is not None:
                self._stage_start = self.clock() - elapsed_s
        now = self.clock()
        self.total = total
        if detail and not stage.startswith("evaluate "):
            self.detail = detail
        pairs = self._pairs
        if self._gen_n and self._gen_start is None and done >= pairs:
            # the generations began (when the last pair was scored, if we saw that; else now)
            self._gen_start, self._gen_done0 = (now, pairs) if done == pairs else (now, done)
        self.done = done
        self._eta = self._estimate(now, eta_s)
        self._eta_at = now

    @property
    def _pairs(self) -> int:
        return (self.total or 0) - self._gen_n if self._gen_n else 0

    def _fraction(self) -> float | None:
        if not self.total:
            return None
        if not self._gen_n:
            return min(1.0, self.done / self.total)
        pairs = self._pairs
        work = pairs + GENERATION_WEIGHT * self._gen_n
        got = min(self.done, pairs) + GENERATION_WEIGHT * max(0, self.done - pairs)
        return min(1.0, got / work) if work else None

    def _estimate(self, now: float, engine_eta: float | None) -> float | None:
        if not self.total or self.done <= 0:
            return engine_eta
        if self.done >= self.total:
            return 0.0
        if not self._gen_n:
            return engine_eta if engine_eta is not None else self._by_fraction(now)
        if self._gen_start is not None:        # generating: their own rate
            got = self.done - self._gen_done0
            spent = now - self._gen_start
            if got > 0 and spent > 0:
                return spent / got * (self.total - self.done)
        return self._by_fraction(now)

    def _by_fraction(self, now: float) -> float | None:
        f = self._fraction()
        spent = now - self._stage_start
        if not f or f <= 0 or spent <= 0:
            return None
        return spent / f * (1.0 - f)

    def view(self, now: float | None = None) -> View | None:
        """What to show at ``now`` (default: the clock); None while idle."""
        if self.stage is None:
            return None
        now = self.clock() if now is None else now
        elapsed = now - (self.job_started if self.job_started is not None else self._stage_start)
        eta = None if self._eta is None else max(0.0, self._eta - (now - self._eta_at))
        phase = ""
        if self._gen_n:
            phase = "generating" if self.done >= self._pairs and self.done > 0 else "scoring"
        return View(self.stage, self.done, self.total, self._fraction(), elapsed, now - self._stage_start, eta,
                    phase, self.detail)
