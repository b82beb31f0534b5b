"""The app's state, in plain Python: no Textual here (unit-tested in tests/test_workspace.py).

A :class:`Workspace` holds the open session, the loaded items, the forget /
retain selection (in the session, as id lists), the per-method
hyper-parameters and their errors, baseline knowledge, results, step mode's
position and the dirty flag.  Every change goes through a method, which bumps
the revision of what changed (:data:`ASPECTS`) and tells the listener (the
App: title, autosave, then every pane's ``refresh_from(workspace)``).

Panes read the workspace and post messages; they never change it themselves.
:func:`store_generated` is where model-written targets and paraphrases (the
engine's records) enter a session: the app's jobs and ``replay`` both use it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from unlearn_tui.backends.errors import UserError

ASPECTS = ("items", "selection", "baseline", "targets", "runs", "form", "results", "probe", "session")
"""What a change can touch; panes compare the revisions of the aspects they show."""


def quiet(text: Any) -> str:
    """One line: whitespace runs become one space."""
    return " ".join(str(text).split())


def store_generated(session: Any, targets: Iterable[dict] = (), paraphrases: Iterable[dict] = ()) -> int:
    """Store the engine's records of model-written targets and paraphrases in ``session``; returns how many.

    Target records: ``{"id", "target", "source", "leak", "mentions_subject"}``; paraphrase records:
    ``{"id", "paraphrase", "source"}`` (a stored paraphrase of the same id is replaced).
    """
    from unlearn_tui.sessions import Paraphrase

    n = 0
    for rec in targets:
        session.set_target(rec["id"], rec["target"], source=rec.get("source") or "self-improve",
                           leak=rec.get("leak"), mentions_subject=rec.get("mentions_subject"))
        n += 1
    stored = session.data.paraphrases
    for rec in paraphrases:
        new = Paraphrase(rec["id"], rec["paraphrase"], rec["source"])
        for i, p in enumerate(stored):
            if p.id == new.id:
                stored[i] = new
                break
        else:
            stored.append(new)
        n += 1
    return n


@dataclass(frozen=True)
class Snapshot:
    """What a job runs on: a copy of the session, the loaded items and the selection (see Workbench.adopt)."""

    session: Any
    items: tuple
    forget_ids: tuple
    retain_ids: tuple

    def load_into(self, wb: Any) -> None:
        wb.adopt(self.session, self.items, self.forget_ids, self.retain_ids)


class Workspace:
    """The open session and everything the panes show (see the module doc)."""

    def __init__(self, session: Any, settings: Any = None, dirty: bool = False,
                 on_change: Callable[[frozenset, bool], None] | None = None) -> None:
        from .settings import Settings

        self.settings = settings or Settings()
        self.on_change = on_change
        self.revs = dict.fromkeys(ASPECTS, 0)
        self.dirty = dirty
        self._set_session(session)

    def _set_session(self, session: Any) -> None:
        self.session = session
        self.model_name = session.model.name
        self.model_device: str | None = session.model.device   # the loaded model's device once it is loaded
        self.items: list | None = None
        self.params: dict[str, dict] = {r.method: dict(r.params or {}) for r in session.runs}
        self.param_errors: dict[tuple[str, str], str] = {}
        self._pool: list[str] | None = None
        self.baseline_scores: dict[str, float] = {}
        self.baseline_pending = False
        self.baseline_eval: Any = None
        self.results: list = []
        self.step_position = 0
        self.step_total = 0
        self.undone_steps: list = []         # [[steps]] entries undone (redo puts them back)
        self.last_quick: dict | None = None
        self.probe: tuple | None = None      # (question, edited, original), or None
        self.probe_note = ""
        from .results_store import load_into  # the session's stored results (its results file), if any

        load_into(self)     # sets results, baseline_eval, step_rows (step-mode states), results_note

    # ---------------------------------------------------------------- change notification
    def changed(self, *aspects: str, dirty: bool = True) -> None:
        """Bump the revisions of ``aspects`` (and mark the session dirty); tell the listener."""
        for a in aspects:
            self.revs[a] += 1
        if dirty:
            self.dirty = True
        if self.on_change is not None:
            self.on_change(frozenset(aspects), dirty)

    def mark_clean(self) -> None:
        self.dirty = False
        self.changed(dirty=False)

    # ---------------------------------------------------------------- reading
    @property
    def forget_ids(self) -> list[str]:
        f = self.session.data.forget
        return list(f) if isinstance(f, list) else []

    @property
    def retain_ids(self) -> list[str]:
        r = self.session.data.retain
        return list(r) if isinstance(r, list) else []

    def find_item(self, item_id: str | None):
        """The loaded item ``item_id``, or None (no data loaded, a failed load, an id of other data)."""
        for it in self.items or []:
            if it.id == item_id:
                return it
        return None

    def item_by_id(self, item_id: str):
        """The loaded item ``item_id``; KeyError when it is not loaded (see :meth:`find_item`)."""
        it = self.find_item(item_id)
        if it is None:
            raise KeyError(item_id)
        return it

    def forget_items(self) -> list:
        by = {it.id: it for it in self.items or []}
        return [by[i] for i in self.forget_ids if i in by]

    def snapshot(self) -> Snapshot:
        """The state a job runs on (the session copied: the UI may change meanwhile)."""
        items = tuple(self.items or ())
        known = {it.id for it in items}
        # ids of items not loaded (yet) are dropped: e.g. the start-up job runs before the data is in
        fids = tuple(i for i in self.forget_ids if i in known)
        rids = tuple(i for i in self.retain_ids if i in known and i not in fids)
        return Snapshot(copy.deepcopy(self.session), items, fids, rids)

    # ---------------------------------------------------------------- data
    def open_data(self, spec: str, fmt: str = "auto") -> None:
        d = self.session.data
        d.path, d.format = spec, fmt
        d.forget, d.retain = [], []
        d.subjects, d.paraphrases = {}, []
        self.items = None
        self.changed("items", "selection", "targets")

    def data_loaded(self, items: list | None, error: str | None = None) -> str | None:
        """A data load finished: the items (or, with ``error``, nothing of the previous data).

        Returns a warning when the session's counts could not become a selection.
        """
        self.baseline_scores = {}
        warning = None
        if error is not None:
            # a failed load leaves nothing of the previous data behind: no items, no baseline scores
            # (the selection's ids stay in the session; panes show only loaded items)
            self.items = None
            self.baseline_pending = False
        else:
            self.items = items
            self.baseline_pending = self.settings.baseline_on_load
            warning = self.normalize_selection()
        self.changed("items", "selection", "baseline", "targets", dirty=False)
        return warning

    def normalize_selection(self) -> str | None:
        """Counts in the session (forget = 10) become explicit id lists once the items are known."""
        from unlearn_tui.backends import data

        d = self.session.data
        known = {it.id for it in self.items or []}
        warning = None
        if not (isinstance(d.forget, list) and isinstance(d.retain, list)):
            try:
                f, r = data.select(self.items or [], d.forget, d.retain, where="data")
                d.forget, d.retain = [it.id for it in f], [it.id for it in r]
                return None
            except UserError as exc:
                warning = f"{quiet(exc)}; starting with an empty selection"
                d.forget = d.forget if isinstance(d.forget, list) else []
                d.retain = d.retain if isinstance(d.retain, list) else []
        d.forget = [i for i in d.forget if i in known]
        d.retain = [i for i in d.retain if i in known and i not in d.forget]
        return warning

    def add_known(self, scores: dict) -> None:
        """Known scores of some items (a background batch, or the cache): merged into the others."""
        if scores:
            self.baseline_scores = {**self.baseline_scores, **scores}
        self.changed("baseline", dirty=False)

    def set_baseline(self, scores: dict | None) -> None:
        self.baseline_pending = False
        if scores is not None:
            self.baseline_scores = scores
        self.changed("baseline", dirty=False)

    def _data_order(self, ids: list[str]) -> list[str]:
        pos = {it.id: i for i, it in enumerate(self.items or [])}
        return sorted(ids, key=lambda i: pos.get(i, len(pos)))

    def toggle_item(self, item_id: str, which: str) -> None:
        """Put an item in the forget (``which="forget"``) or retain set, or take it out; one set at most.

        The sets keep the data's order whatever the order of the clicks (merging groups the forget
        requests in list order: clicking must not change the experiment); a forget list the user
        reordered (:meth:`move_forget`) keeps its order, and a new item goes at its end."""
        f, r = self.forget_ids, self.retain_ids
        mine, other = (f, r) if which == "forget" else (r, f)
        if item_id in mine:
            mine.remove(item_id)
        else:
            ordered = mine == self._data_order(mine)
            mine.append(item_id)
            if ordered:
                mine[:] = self._data_order(mine)
            if item_id in other:
                other.remove(item_id)
        self.session.data.forget, self.session.data.retain = f, r
        self.changed("selection")

    def move_forget(self, item_id: str, delta: int) -> bool:
        """Move a forget item ``delta`` places (the user's explicit order, which merging follows)."""
        f = self.forget_ids
        if item_id not in f:
            return False
        i = f.index(item_id)
        j = max(0, min(len(f) - 1, i + delta))
        if i == j:
            return False
        f.insert(j, f.pop(i))
        self.session.data.forget = f
        self.changed("selection", "targets")
        return True

    # ---------------------------------------------------------------- targets
    def target_pool(self) -> tuple[list[str], str | None]:
        """The refusal pool, and a warning when the session's pool file cannot be read."""
        if self._pool is None:
            from unlearn_tui.backends.targets import load_pool

            try:
                self._pool = load_pool(self.session.targets.pool, self.session)
            except UserError as exc:
                self._pool = ["I'm not sure."]
                return self._pool, quiet(exc)
        return self._pool, None

    def target_text(self, item_id: str) -> tuple[str | None, str, dict]:
        """(text, source, flags) for an item: the session's override, else the mode's rule."""
        from unlearn_tui.backends.targets import simple_targets

        o = self.session.target_for(item_id)
        if o is not None:
            return o.target, o.source, {"leak": o.leak, "mentions_subject": o.mentions_subject}
        t = self.session.targets
        item = self.find_item(item_id)
        try:
            out = simple_targets(t.mode, [item], self.target_pool()[0], t.seed, t.dummy, {}) if item else {}
        except UserError:
            out = {}
        if item_id in out:
            return out[item_id].text, out[item_id].source, {}
        return None, f"{t.mode}: written by the model at run time (Self-improve)", {}

    def edit_target(self, item_id: str, text: str) -> None:
        if text.strip():
            if text == self.target_text(item_id)[0]:
                return
            self.session.set_target(item_id, text, source="custom")
        elif not self.session.remove_target(item_id):
            return
        self.changed("targets")

    def reset_target(self, item_id: str) -> None:
        if self.session.remove_target(item_id):
            self.changed("targets")

    def set_target_mode(self, mode: str) -> None:
        if self.session.targets.mode != mode:
            self.session.targets.mode = mode
            self.changed("targets")

    def set_merge_factor(self, m: int) -> None:
        if m >= 1 and self.session.targets.merge_factor != m:
            self.session.targets.merge_factor = m
            self.changed("targets")

    def store_generated(self, targets: Iterable[dict] = (), paraphrases: Iterable[dict] = ()) -> int:
        """Model-written targets/paraphrases (engine records) into the session, so saves and replays keep them."""
        n = store_generated(self.session, targets, paraphrases)
        if n:
            self.changed("targets")
        return n

    def merge_preview(self, limit: int = 30) -> str:
        """The merged edit requests as markup (the Targets pane's preview)."""
        from rich.markup import escape

        from unlearn_tui.backends.targets import Target, build_requests

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
            return f"[red]{escape(quiet(exc))}[/red]"
        lines = [f"{len(items)} items → {len(reqs)} edit request(s), merge factor "
                 f"{self.session.targets.merge_factor}"]
        rules = {"shared": "the members' shared target", "names no member": "a member target naming no subject",
                 "pool": "a pool refusal (every member target names its subject)"}
        for i, r in enumerate(reqs[:limit]):
            edits = ""
            if len(r.questions) == 1:
                subject = (r.subjects[0] if r.subjects else None) or getattr(r, "subject", None)
                edits = f"  [dim](edits at the subject “{escape(subject)}”)[/dim]" if subject else \
                    "  [dim](no subject: keyed at the prompt's last token)[/dim]"
            lines.append(f"[b]{i + 1}.[/b] {escape(r.prompt)}  [dim]→[/dim] {escape(r.target)}{edits}")
            if len(r.questions) > 1:
                keyed = ", ".join(escape(s or "?") for s in r.subjects)
                lines.append(f"   [dim]group target: {rules.get(r.target_rule, r.target_rule)}; ROME/MEMIT/"
                             f"AlphaEdit key each question at its subject ({keyed}), each with its own target[/dim]")
        if len(reqs) > limit:
            lines.append(f"… {len(reqs) - limit} more")
        return "\n".join(lines)

    # ---------------------------------------------------------------- methods and params
    def method_params(self, name: str) -> dict:
        return dict(self.params.get(name, {}))

    def set_methods(self, names: list[str]) -> None:
        from unlearn_tui.sessions import RunConfig

        old = {r.method: r for r in self.session.runs}
        runs = [old.get(n) or RunConfig(n, dict(self.params.get(n, {}))) for n in names]
        if [r.method for r in runs] != [r.method for r in self.session.runs]:
            self.session.runs = runs
            self.changed("runs")

    def set_param(self, method: str, field: str, value: Any) -> None:
        """A valid (coerced) value for ``method.field``; ``None`` is "auto".  A default is not stored."""
        from unlearn_tui.backends import methods
        from unlearn_tui.backends.params import describe

        self.param_errors.pop((method, field), None)
        info = next((f for f in describe(methods.get(method).Params) if f.name == field), None)
        params = self.params.setdefault(method, {})
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
        self.changed()

    def param_invalid(self, method: str, field: str, message: str) -> None:
        self.param_errors[(method, field)] = message

    def import_params(self, method: str, params: dict) -> None:
        """Hyper-parameters from a file (EasyEdit YAML) for ``method``, which is added to the runs if needed."""
        self.params[method] = dict(params)
        names = [r.method for r in self.session.runs]
        if method not in names:
            self.set_methods(names + [method])
        for r in self.session.runs:
            if r.method == method:
                r.params = dict(params)
        self.changed("runs", "form")

    def check_runnable(self) -> None:
        """UserError naming the first thing missing before a run or a step."""
        if self.items is None:
            raise UserError("no data loaded; open a data file first (ctrl+l)")
        if not self.forget_ids:
            raise UserError("the forget set is empty; select items with space in the Forget set pane")
        if not self.session.runs:
            raise UserError("no method chosen; pick one in the Method pane")
        used = [r.method for r in self.session.runs]
        bad = [f"{m}.{f}: {e}" for (m, f), e in self.param_errors.items() if m in used]
        if bad:
            raise UserError(f"fix the hyper-parameters first: {bad[0]}")

    # ---------------------------------------------------------------- results and step mode
    def clear_results(self) -> None:
        self.results = []
        self.step_rows = []
        self.changed("results", dirty=False)

    def add_result(self, result: Any) -> None:
        self.results.append(result)
        self.changed("results", dirty=False)

    def run_finished(self, result: Any) -> None:
        """A whole run (:class:`backends.runner.SessionResult`) finished: baseline, and what the model wrote."""
        self.step_position = 0
        self.baseline_eval = result.baseline
        self.changed("results", dirty=False)
        if result.undone and (self.session.steps or self.undone_steps):   # the run undid the kept step edits
            self.session.steps, self.undone_steps = [], []
            self.changed("session")
        self.store_generated(result.new_targets, result.new_paraphrases)

    def step_finished(self, what: str, step: Any, method: str | None = None) -> str:
        """Step mode moved (:class:`backends.runner.StepResult`); returns the one-line status.

        ``what``: "step", "undo", "redo", or "recorded" (the session's ``[[steps]]`` applied on opening it;
        ``method`` names their methods)."""
        self.step_position = step.k
        if step.n is not None:
            self.step_total = step.n
        self.last_quick = step.quick
        q = step.quick or {}
        score = " · ".join(f"{k} R1 {v:.2f}" for k, v in q.items() if v is not None)
        text = f"{what}: {self.step_position}/{self.step_total} request(s) kept" + (f" · {score}" if score else "")
        if step.probe:
            self.probe = tuple(step.probe)
        self.probe_note = text
        from .results_store import StepRow

        method = method or (self.session.runs[0].method if self.session.runs else "?")
        self.step_rows.append(StepRow.from_step(what, step, method))   # a Results row per step-mode state
        self.changed("probe", "results", dirty=False)
        if self.record_step(what, step):
            self.changed("session")
        self.store_generated(step.new_targets)
        return text

    def record_step(self, what: str, step: Any) -> bool:
        """Keep the session's ``[[steps]]`` equal to the engine's kept step edits; True when they changed.

        A step appends its method, params and the request's item ids; undo
        moves the last one aside, redo puts it back.  The engine's count of
        kept edits (``step.k``) is the truth: a session opened with recorded
        steps starts from the unedited model, so its first step replaces them.
        """
        from unlearn_tui.backends.spec import StepConfig

        steps = self.session.steps
        before = list(steps)
        if what == "step" and getattr(step, "items", ()):
            run = self.session.runs[0] if self.session.runs else None
            if run is not None:
                steps.append(StepConfig(run.method, list(step.items), run.label, copy.deepcopy(dict(run.params or {}))))
                self.undone_steps = []
        elif what == "undo" and steps:
            self.undone_steps.append(steps.pop())
        elif what == "redo" and self.undone_steps:
            steps.append(self.undone_steps.pop())
        if len(steps) > step.k:
            del steps[:len(steps) - step.k]
        return steps != before

    def probe_answered(self, answer: tuple) -> None:
        self.probe = tuple(answer)
        self.changed("probe", dirty=False)

    # ---------------------------------------------------------------- sessions
    def replace_session(self, session: Any) -> bool:
        """Another session (opened or new): everything is reset; True when its model differs."""
        other_model = session.model.name != self.model_name
        self._set_session(session)
        self.dirty = False
        self.changed(*ASPECTS, dirty=False)
        return other_model
