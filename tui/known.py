"""Known scores (does the unedited model know each fact?) for what the user looks at, in the background.

The Forget set pane's ``known`` column is the unedited model's ROUGE-1 per
item.  Nothing scores every item at start-up any more:

* right after the data file is read (before the model loads) the column is
  filled from the on-disk cache (:func:`backends.runner.known_cache_before_load`:
  a small index maps a cheap identity of the session's ``[model]`` to the
  model seen at the last load), so a second launch shows it at once;
* once the model is loaded its real key is compared (:meth:`KnownScorer.loaded`):
  when the model changed, those values are dropped and scored again;
* whenever the engine is idle, :meth:`KnownScorer.kick` queues one small
  ``known`` job (``settings.known_batch`` items): the row under the cursor,
  then the rows on screen, then the forget and retain items, none already
  known.  Each batch is chosen when it starts, so scrolling or selecting
  re-prioritises the next one; user jobs wait at most one small batch.
  Every score lands in the per-item cache (:meth:`Workbench.score_known`).

Known scores are the *unedited* model's: while step-mode edits are kept the
scorer pauses (a session opened with ``[[steps]]`` scores the rows on screen
before applying them: :func:`tui.jobs.steps_job`).  No Textual, no torch here.
"""

from __future__ import annotations

from typing import Any

from .jobs import Job


class KnownScorer:
    def __init__(self, app: Any) -> None:
        self.app = app
        self.started = False             # the start-up job finished: the model is loaded (or failed to)
        self.cached_key: str | None = None   # the model key the values shown before the load came from
        self.failed: set[str] = set()    # items whose batch failed: not tried again this session
        self.batches = 0                 # known jobs started (tests, status)
        self._batch: list[str] = []      # the items of the known job now running
        self.asked = 0                   # items sent to known jobs for this data (at most settings.baseline_limit)

    @property
    def ws(self) -> Any:
        return self.app.workspace

    @property
    def enabled(self) -> bool:
        return bool(self.app.settings.baseline_on_load)

    # ---------------------------------------------------------------- from the start-up job
    def cached(self, key: str | None, scores: dict) -> None:
        """The data file was just read: the scores cached for the model the index names (before it loads)."""
        self.cached_key = key
        if scores and self.enabled:
            self.ws.add_known(scores)

    def loaded(self, key: str | None) -> None:
        """The start-up job finished; ``key``: the loaded model's cache key (None: not loaded, or edited)."""
        self.started = True
        if key is not None and self.cached_key is not None and key != self.cached_key:
            # the model is not the one the cache index remembered (new weights under the same name/path)
            dropped = len(self.ws.baseline_scores)
            self.ws.set_baseline({})
            self.ws.baseline_pending = self.enabled
            self.ws.changed("baseline", dirty=False)
            run = self.app.pane("run")
            text = f"known scores: the model differs from the one cached; {dropped} value(s) dropped, scored again"
            if run is not None:
                run.log_line(text, "warning")
        self.cached_key = key
        self.kick()

    def reset(self) -> None:
        """Another session or data file: its start-up job comes (the failures of the old data are forgotten)."""
        self.started = False
        self.failed.clear()
        self.asked = 0

    # ---------------------------------------------------------------- what to score
    def wanted(self) -> list[str]:
        """Item ids to score, most wanted first: the cursor's row, the rows on screen, the selected items."""
        ws = self.ws
        if ws.items is None:
            return []
        loaded = {it.id for it in ws.items}
        order: list[str] = []
        pane = self.app.pane("forget")
        if pane is not None:
            cur = pane.current_id()
            if cur:
                order.append(cur)
            order += pane.rows_on_screen()
        order += ws.forget_ids + ws.retain_ids
        known, seen, out = ws.baseline_scores, set(), []
        for i in order:
            if i in seen or i in known or i in self.failed or i not in loaded:
                continue
            seen.add(i)
            out.append(i)
        return out

    def can_run(self) -> bool:
        app = self.app
        return (self.enabled and self.started and app.model_ready and not app.quitting
                and app.bridge is not None and not app.bridge.busy and not app.jobs
                and self.ws.step_position == 0)

    def kick(self) -> bool:
        """Start one batch when the engine is idle and something on screen or selected is not known yet."""
        if not self.can_run():
            return False
        room = int(self.app.settings.baseline_limit) - self.asked
        batch = self.wanted()[:max(0, min(int(self.app.settings.known_batch), room))]
        if not batch:
            if self.ws.baseline_pending and self.ws.items is not None and (room <= 0 or all(
                    it.id in self.ws.baseline_scores for it in self.ws.items)):
                self.ws.set_baseline(None)     # every item is known (or the launch's budget is spent): no "…"
            return False
        self.batches += 1
        self.asked += len(batch)
        self._batch = list(batch)
        self.app.router.submit(lambda: self.job(batch), "known")
        return True

    def job(self, ids: list[str]) -> Job:
        ws = self.ws
        by_id = {it.id: it for it in ws.items or []}
        items = [by_id[i] for i in ids if i in by_id]

        def done(scores: dict) -> None:
            missing = [i for i in ids if i not in (scores or {})]
            self.failed.update(missing)          # (an item the evaluation gave no score: not asked again)
            ws.add_known(scores or {})

        return Job("known", lambda wb: wb.score_known(items), ws.snapshot(),
                   label=f"known scores ({len(items)} item{'s' if len(items) != 1 else ''} on screen)",
                   on_done=done)

    def failed_batch(self) -> None:
        """A known job failed or was cancelled: its items are not tried again this session (no loop on a
        model that cannot score them, and a cancel stays cancelled)."""
        self.failed.update(self._batch)
        self._batch = []

    def before_steps(self, limit: int | None = None) -> Any:
        """For :func:`tui.jobs.steps_job`: score the rows on screen on the unedited model, before the edits."""
        if not self.enabled:
            return None
        by_id = {it.id: it for it in self.ws.items or []}
        ids = self.wanted()
        pane = self.app.pane("forget")
        cap = limit or max(len(pane.rows_on_screen()) if pane is not None else 0, self.app.settings.known_batch)
        items = [by_id[i] for i in ids[:cap] if i in by_id]
        if not items:
            return None
        return lambda wb: wb.score_known(items)
