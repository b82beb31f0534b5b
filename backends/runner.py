"""Executes a session: load, baseline, then every run inside a transaction.

:class:`Workbench` is the stateful engine shared by ``unlearn-tui replay``
and the TUI (which drives it from one thread worker).  It owns the model
handle, the loaded items, the targets, the per-session method state (e.g.
AlphaEdit's accumulated keys) and the undo/redo stack of step mode.

:func:`run` is the headless path: every run starts from the unedited model
(its transaction is undone after evaluation) so rows are comparable.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import methods
from .errors import Cancelled, NonFiniteError, UserError
from .events import (CancelToken, EventCallback, Failure, Log, RunFinished, RunStarted, SessionFinished,
                     StageStarted, ignore)
from .metrics import EvalResult, EvalSettings, evaluate
from .methods.base import EditContext  # noqa: F401  (re-exported: runner.EditContext)
from .params import to_dict
from .targets import GENERATED_SOURCES, Request, Target, build_requests, load_pool, simple_targets


@dataclass
class RunResult:
    index: int
    method: str
    label: str
    params: dict
    target_mode: str
    merge_factor: int
    eval: EvalResult
    seconds: float          # time spent applying the method (evaluation excluded)
    eval_seconds: float
    report: dict = field(default_factory=dict)

    @property
    def composite(self) -> float | None:
        return self.eval.composite

    def to_json(self) -> dict:
        out = {"method": self.method, "label": self.label, "params": self.params,
               "target_mode": self.target_mode, "merge_factor": self.merge_factor}
        out.update(self.eval.summary())
        out.update({"composite": self.composite, "seconds": self.seconds, "eval_seconds": self.eval_seconds,
                    "report": self.report})
        return out


@dataclass
class SessionResult:
    baseline: EvalResult
    runs: list[RunResult] = field(default_factory=list)
    targets: list[dict] = field(default_factory=list)
    paraphrases: list[dict] = field(default_factory=list)

    def to_json(self, items: bool = False) -> dict:
        out: dict[str, Any] = {"baseline": self.baseline.summary(), "runs": [r.to_json() for r in self.runs]}
        out["baseline"]["composite"] = self.baseline.composite
        out["targets"] = self.targets
        out["paraphrases"] = self.paraphrases
        if items:
            out["baseline_items"] = self.baseline.items_json()
            for r, js in zip(self.runs, out["runs"]):
                js["items"] = r.eval.items_json()
        return out


class Workbench:
    """Stateful engine: one model, one data set, many runs."""

    def __init__(self, session: Any, on_event: EventCallback = ignore, cancel: CancelToken | None = None,
                 handle: Any = None, regenerate: bool = False) -> None:
        self.session = session
        self.on_event = on_event
        self.cancel = cancel or CancelToken()
        self.handle = handle
        self.items: list | None = None
        self.forget: list = []
        self.retain: list = []
        self.rephrase: list = []
        self.method_state: dict[str, dict] = {}
        self.undo_stack: list = []
        self.redo_stack: list = []
        self._targets: dict[str, Target] | None = None
        self.regenerate = regenerate          # replace model-written targets/paraphrases cached in the session
        self.paraphrase_records: list[dict] = []
        self._paraphrases_ready = False
        self.settings = EvalSettings.from_config(getattr(session, "eval", None))

    # ---- loading
    def load_model(self):
        if self.handle is None:
            from .model import load

            self.handle = load(self.session.model, self.on_event, self.cancel,
                               base_dir=self.session.base_dir())
        return self.handle

    def load_data(self) -> list:
        from . import data

        cfg = self.session.data
        self.on_event(StageStarted("load data", None, cfg.path))
        self.items = data.load_items(cfg.path, base_dir=self.session.base_dir(), format=cfg.format)
        self.forget, self.retain = data.select(self.items, cfg.forget, cfg.retain, where="data")
        for it in self.forget:
            sub = cfg.subjects.get(it.id)
            if sub:
                it.subject = sub
        para = {p.id: p.question for p in getattr(cfg, "paraphrases", [])}
        for it in self.forget:
            if it.id in para:
                it.paraphrased_question = para[it.id]
        self.rephrase = data.rephrase_split(self.forget) if cfg.rephrase else []
        self._paraphrases_ready = False
        self.on_event(Log(f"data: {len(self.items)} items; forget {len(self.forget)}, retain {len(self.retain)}, "
                          f"rephrase {len(self.rephrase)}"))
        return self.items

    def set_selection(self, forget_ids: Any, retain_ids: Any) -> None:
        """Choose the forget and retain items by id (kept in the given order, repeats dropped).

        Ids are checked against the loaded items (loaded now if need be): an
        unknown id, or an id in both sets, raises UserError (``data.forget`` /
        ``data.retain``) and nothing changes.  Empty sets are allowed.  The
        session's ``[data] subjects`` and ``paraphrases`` are applied to the
        forget items as copies (the loaded items are not changed), the
        rephrase split is rebuilt, and what depends on the selection is
        invalidated: the cached targets (so :meth:`requests` too) and, when
        the forget set changed, the paraphrase check of :meth:`splits`.
        """
        from dataclasses import replace

        from . import data

        if self.items is None:
            self.load_data()
        by_id = {it.id: it for it in self.items or []}
        fids = data._id_list(forget_ids, "data.forget", "a list of item ids")
        rids = data._id_list(retain_ids, "data.retain", "a list of item ids")
        for ids, where in ((fids, "data.forget"), (rids, "data.retain")):
            if ids:
                data._check_known(ids, by_id, where)
        both = [i for i in rids if i in set(fids)]
        if both:
            raise UserError(f"ids {', '.join(both)} are in both the forget and the retain set; "
                            "expected disjoint sets", "data.retain")
        cfg = self.session.data
        subjects = getattr(cfg, "subjects", None) or {}
        paras = {p.id: p.question for p in getattr(cfg, "paraphrases", None) or []}
        forget = []
        for i in fids:
            it, changes = by_id[i], {}
            if subjects.get(i):
                changes["subject"] = subjects[i]
            if i in paras:
                changes["paraphrased_question"] = paras[i]
            forget.append(replace(it, **changes) if changes else it)
        if [it.id for it in self.forget] != fids:
            self._paraphrases_ready = False
        self.forget = forget
        self.retain = [by_id[i] for i in rids]
        self.rephrase = data.rephrase_split(self.forget) if getattr(cfg, "rephrase", True) else []
        self.invalidate_targets()

    def ensure_paraphrases(self) -> list[dict]:
        """Give every forget item a rephrased question (the model writes missing ones; cached in the session)."""
        from . import data, selfimprove

        if self.items is None:
            self.load_data()
        if not self.session.data.rephrase:
            self.paraphrase_records, self.rephrase = [], []
        else:
            if self.regenerate or any(not it.paraphrased_question for it in self.forget):
                self.load_model()
            self.paraphrase_records = selfimprove.ensure_paraphrases(self.handle, self.forget, self.session,
                                                                     self.on_event, self.cancel, self.regenerate)
            self.rephrase = data.rephrase_split(self.forget)
        self._paraphrases_ready = True
        return self.paraphrase_records

    def splits(self) -> dict[str, list]:
        if self.items is None:
            self.load_data()
        if not self._paraphrases_ready:
            self.ensure_paraphrases()
        return {"forget": self.forget, "retain": self.retain, "rephrase": self.rephrase}

    # ---- targets and requests
    def invalidate_targets(self) -> None:
        """Forget cached targets (after the session's targets or forget set changed)."""
        self._targets = None

    def targets(self) -> dict[str, Target]:
        """Per-item targets: session overrides first, then the mode's rule (cached)."""
        if self._targets is not None and all(it.id in self._targets for it in self.forget):
            return self._targets
        if self.items is None:
            self.load_data()
        t = self.session.targets
        overrides = {i.id: i for i in t.items if not (self.regenerate and i.source in GENERATED_SOURCES)}
        pool = load_pool(t.pool, self.session)
        out = simple_targets(t.mode, self.forget, pool, t.seed, t.dummy, overrides)
        missing = [it for it in self.forget if it.id not in out]
        if missing:
            out.update(self._model_targets(t.mode, missing, pool))
            for it in missing:  # generated text is stored in the session, so a replay is exact
                g = out[it.id]
                self.session.set_target(it.id, g.text, source=g.source, leak=g.leak,
                                        mentions_subject=g.mentions_subject)
        self._targets = out
        return out

    def _model_targets(self, mode: str, items: list, pool: list[str]) -> dict[str, Target]:
        """Targets the model writes itself (self-improve, avoidant, generated incorrect)."""
        try:
            from . import selfimprove  # provided by the target-generation pipeline
        except ImportError:
            raise UserError(f'target mode "{mode}" is not available in this build', "targets.mode") from None
        self.load_model()
        return selfimprove.generate_targets(self.handle, mode, items, pool, self.session.targets,
                                            self.on_event, self.cancel)

    def requests(self) -> list[Request]:
        if self.items is None:
            self.load_data()
        return build_requests(self.forget, self.targets(), self.session.targets.merge_factor,
                              self.session.data.subjects)

    # ---- evaluation and runs
    def evaluate(self) -> EvalResult:
        self.load_model()
        splits = self.splits()
        targets = {k: t.text for k, t in self.targets().items()}
        return evaluate(self.handle, splits, self.settings, self.on_event, self.cancel, targets)

    def probe(self, question: str, max_new_tokens: int | None = None) -> tuple[str, str]:
        """(answer of the current, edited model; answer of the unedited model).

        The unedited answer is exact: every kept edit is undone from its
        transaction snapshot, the question answered, and the edits redone.
        """
        from .generation import generate

        self.load_model()
        n = max_new_tokens or self.settings.max_new_tokens

        def ask() -> str:
            return generate(self.handle, [self.handle.prompt_ids(question)], n, 1)[0]

        edited = ask()
        if not self.undo_stack:
            return edited, edited
        for tx in reversed(self.undo_stack):
            tx.undo()
        try:
            original = ask()
        finally:
            for tx in self.undo_stack:
                tx.redo()
        return edited, original

    def make_method(self, run_cfg: Any, index: int = 0):
        m = methods.make(run_cfg.method, run_cfg.params, where=f"runs[{index}].params")
        if getattr(m, "needs_retain", False) and not self.retain:
            raise UserError(f'method "{run_cfg.method}" needs retain data and the retain split is empty; '
                            f'set [data] retain to a number, a list of ids or "rest"', f"runs[{index}]")
        return m

    def context(self, method_name: str, index: int = 0) -> EditContext:
        return EditContext(self.on_event, self.cancel, self.forget, self.retain,
                           self.method_state.setdefault(method_name, {}), seed=self.session.targets.seed,
                           base_dir=self.session.base_dir(), where=f"runs[{index}].params")

    def apply(self, run_cfg: Any, requests: list[Request] | None = None, index: int = 0, keep: bool = False):
        """Apply one method inside a transaction; returns (transaction, report, seconds)."""
        self.load_model()
        method = self.make_method(run_cfg, index)
        requests = self.requests() if requests is None else requests
        t0 = time.perf_counter()
        with self.handle.transaction(method.touched_parameters(self.handle), keep_after=keep) as tx:
            report = method.apply(self.handle, requests, self.context(run_cfg.method, index))
        return tx, method, report or {}, time.perf_counter() - t0

    def run_one(self, index: int, run_cfg: Any, total: int = 1, keep: bool = False) -> RunResult:
        self.on_event(RunStarted(index, run_cfg.method, total))
        tx, method, report, seconds = self.apply(run_cfg, index=index, keep=keep)
        try:
            t1 = time.perf_counter()
            ev = self.evaluate()
            eval_seconds = time.perf_counter() - t1
        finally:
            if not keep:
                tx.rollback()
        result = RunResult(index, run_cfg.method, run_cfg.label or run_cfg.method, to_dict(method.params),
                           self.session.targets.mode, self.session.targets.merge_factor, ev, seconds,
                           eval_seconds, report)
        if keep:
            self.undo_stack.append(tx)
            self.redo_stack.clear()
        self.on_event(RunFinished(index, run_cfg.method, result))
        return result

    # ---- step mode
    def step(self, run_cfg: Any, request: Request, index: int = 0):
        """Apply one request and keep it on the undo stack."""
        tx, _, report, seconds = self.apply(run_cfg, [request], index=index, keep=True)
        self.undo_stack.append(tx)
        self.redo_stack.clear()
        return report, seconds

    def undo(self) -> bool:
        if not self.undo_stack:
            return False
        tx = self.undo_stack.pop()
        tx.undo()
        self.redo_stack.append(tx)
        return True

    def redo(self) -> bool:
        if not self.redo_stack:
            return False
        tx = self.redo_stack.pop()
        tx.redo()
        self.undo_stack.append(tx)
        return True

    def target_records(self) -> list[dict]:
        """The ``"targets"`` audit list (leak and subject checks filled in for every target)."""
        from .selfimprove import target_records

        return target_records(self.forget, self.targets())


def run(session: Any, on_event: EventCallback = ignore, cancel: CancelToken | None = None,
        handle: Any = None, regenerate: bool = False) -> SessionResult:
    """Run a whole session headlessly (see the module doc)."""
    wb = Workbench(session, on_event, cancel, handle, regenerate=regenerate)
    try:
        wb.load_data()
        for i, r in enumerate(session.runs):  # validate every run before the slow part
            wb.make_method(r, i)
        wb.requests()
        wb.ensure_paraphrases()
        wb.load_model()
        baseline = wb.evaluate()
        result = SessionResult(baseline)
        for i, r in enumerate(session.runs):
            result.runs.append(wb.run_one(i, r, len(session.runs)))
        result.targets = wb.target_records()
        result.paraphrases = wb.paraphrase_records
    except (UserError, NonFiniteError) as exc:
        on_event(Failure(str(exc), getattr(exc, "where", None), rolled_back=True))
        raise
    except Cancelled:
        on_event(Failure("cancelled; the weights were rolled back", None, rolled_back=True))
        raise
    on_event(SessionFinished(result))
    return result


def result_row(r: RunResult) -> dict[str, Any]:
    """Flat numbers for tables (CLI and TUI)."""
    row = {"method": r.label, "target_mode": r.target_mode, "merge_factor": r.merge_factor}
    for split in ("forget", "retain", "rephrase"):
        s = r.eval.splits.get(split)
        summ = s.summary() if s else {}
        for k in ("rouge1", "probability", "mrr", "top_hit"):
            row[f"{split}.{k}"] = summ.get(k)
    row["composite"] = r.composite
    row["seconds"] = r.seconds
    return row


__all__ = ["Workbench", "run", "RunResult", "SessionResult", "EditContext", "result_row", "asdict"]
