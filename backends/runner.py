"""Executes a session: load, baseline, then every run inside a transaction.

:class:`Workbench` is the stateful engine shared by ``unlearn-tui replay``
and the TUI (which drives it from one thread worker).  It owns the model
handle, the loaded items, the per-session method state (e.g. AlphaEdit's
accumulated keys) and the undo/redo stack of step mode.

Its state moves through explicit phases, each one a method; no getter loads
or generates anything:

1. **model** — :meth:`Workbench.load_model` (with ``[finetune]``, the loaded
   model is then fine-tuned on the session's items, or the cached fine-tune is
   loaded, before anything is measured: :mod:`backends.finetune_first`);
2. **data and selection** — :meth:`Workbench.load_data` (the session's data
   file and ``[data] forget/retain``), or :meth:`Workbench.adopt` (a session,
   items the caller loaded and a selection by id), :meth:`Workbench.set_selection`;
3. **prepared** — :meth:`Workbench.prepare` returns a frozen :class:`Prepared`
   (forget/retain/rephrase items, targets, requests, and the targets and
   paraphrases the model wrote for it as records).  It is cached and dropped as
   a whole when the selection or the session's targets, subjects or paraphrases
   change.

The flows are methods too — :meth:`run_all`, :meth:`step_next`, :meth:`undo`,
:meth:`redo`, :meth:`quick_scores`, :meth:`score_known`,
:meth:`write_targets`, :meth:`probe` — and each app job is one call of one of
them.  The engine never writes into the session: model-written targets and
paraphrases come back as records (:attr:`SessionResult.new_targets`,
:attr:`Prepared.new_targets`, ...) and the caller stores them.

:func:`run` is the headless path (``replay``): :meth:`run_all` on a fresh
Workbench; every run starts from the unedited model (its transaction is undone
after evaluation) so rows are comparable.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from . import methods
from .errors import Cancelled, NonFiniteError, UserError
from .events import (
    CancelToken,
    EventCallback,
    Failure,
    Log,
    RunFinished,
    RunStarted,
    SessionFinished,
    StageStarted,
    ignore,
)
from .methods.base import EditContext  # noqa: F401  (re-exported: runner.EditContext)
from .metrics import EvalResult, EvalSettings, evaluate
from .params import to_dict
from .targets import GENERATED_SOURCES, Request, Target, build_requests, load_pool, simple_targets

if TYPE_CHECKING:
    from .model import ModelHandle


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
        out.update(self.eval.extras_json())
        out.update({"composite": self.composite, "seconds": self.seconds, "eval_seconds": self.eval_seconds,
                    "report": self.report})
        return out


@dataclass
class SessionResult:
    baseline: EvalResult
    runs: list[RunResult] = field(default_factory=list)
    targets: list[dict] = field(default_factory=list)
    paraphrases: list[dict] = field(default_factory=list)
    # what the model wrote during this session run, for the caller to store (records as above)
    new_targets: list[dict] = field(default_factory=list)
    new_paraphrases: list[dict] = field(default_factory=list)
    undone: int = 0          # kept step edits undone before the first run
    paraphrases_left_out: list = field(default_factory=list)   # forget ids with no checked paraphrase
    finetune: dict | None = None   # the [finetune] step (FinetuneInfo.to_json()); None without one

    def to_json(self, items: bool = False) -> dict:
        out: dict[str, Any] = {"baseline": self.baseline.summary(), "runs": [r.to_json() for r in self.runs]}
        out["baseline"].update(self.baseline.extras_json())
        out["baseline"]["composite"] = self.baseline.composite
        out["targets"] = self.targets
        out["paraphrases"] = self.paraphrases
        out["paraphrases_left_out"] = self.paraphrases_left_out
        if self.finetune is not None:
            out["finetune"] = self.finetune
        if items:
            out["baseline_items"] = self.baseline.items_json()
            for r, js in zip(self.runs, out["runs"]):
                js["items"] = r.eval.items_json()
        return out


@dataclass(frozen=True)
class Prepared:
    """Everything a run needs besides the model, computed by :meth:`Workbench.prepare` (frozen)."""

    forget: tuple          # forget items (session subjects and paraphrases applied, as copies)
    retain: tuple
    rephrase: tuple        # the forget items asked with their paraphrase (empty without paraphrases)
    targets: Mapping[str, Target]
    requests: tuple
    new_targets: tuple = ()        # records of targets the model wrote for this state
    paraphrases_left_out: tuple = ()   # forget ids left out of the rephrase split (no paraphrase passed)
    paraphrases: tuple = ()        # paraphrase records (all forget items that have one)
    new_paraphrases: tuple = ()    # records of paraphrases written for this state
    paraphrased: bool = False      # whether paraphrases were ensured (``prepare(paraphrases=True)``)

    def splits(self) -> dict[str, list]:
        return {"forget": list(self.forget), "retain": list(self.retain), "rephrase": list(self.rephrase)}

    def target_records(self) -> list[dict]:
        """The ``"targets"`` audit list (leak and subject checks filled in for every target)."""
        from .selfimprove import target_records

        return target_records(self.forget, dict(self.targets))


@dataclass(frozen=True)
class StepResult:
    """Where step mode stands after :meth:`Workbench.step_next` / :meth:`undo` / :meth:`redo`."""

    k: int                          # kept edits
    n: int | None                   # forget requests in all (None: not prepared)
    quick: dict | None = None       # split -> ROUGE-1 of the current model (forget, retain)
    probe: tuple | None = None      # (question, edited answer, unedited answer)
    report: dict = field(default_factory=dict)
    new_targets: tuple = ()         # model-written targets of the requests (records, for the caller)
    items: tuple = ()               # step_next: the item ids of the request it applied (``[[steps]] items``)


class Workbench:
    """Stateful engine: one model, one data set, many runs (see the module doc for its phases)."""

    def __init__(self, session: Any, on_event: EventCallback = ignore, cancel: CancelToken | None = None,
                 handle: ModelHandle | None = None, regenerate: bool = False) -> None:
        self.session = session
        self.on_event = on_event
        self.cancel = cancel or CancelToken()
        self.handle = handle
        self._model_for: str | None = None   # the model name the handle was loaded for (None: given)
        self.items: list | None = None
        self.forget: list = []
        self.retain: list = []
        self.method_state: dict[str, dict] = {}
        self.undo_stack: list = []
        self.redo_stack: list = []
        self._quick: dict[Any, dict[str, float]] = {}   # model state + selection -> quick scores (undo/redo)
        self.regenerate = regenerate          # replace model-written targets/paraphrases the session holds
        self._prepared: Prepared | None = None
        self._prepared_key: Any = None
        self.settings = EvalSettings.from_config(getattr(session, "eval", None))
        # the [finetune] step on the handle: (handle, what it trained on, FinetuneInfo, the weights before it
        # when the handle was the caller's, else None: our own model is loaded again instead)
        self._finetune: tuple | None = None
        self._finetune_file: tuple | None = None   # ((spec, path), (mtime, size), items) of a [finetune] data file
        self._fresh_items: Sequence | None = None   # the data file's items startup() just read

    # ================================================================ phase 1: the model
    def load_model(self):
        """Load the session's model (once), fine-tuned when the session has ``[finetune]``; returns the handle.

        The fine-tune (:meth:`ensure_finetuned`) runs before anything is
        measured, and again whenever what it trains on changes.
        """
        if self.handle is None:
            self._load_base()
        self.ensure_finetuned()
        return self.handle

    def _model(self):
        """The model every flow measures or edits: :meth:`load_model`, then :meth:`ensure_finetuned`
        (again: a subclass's ``load_model`` may return a loaded model without calling this one's)."""
        self.load_model()
        self.ensure_finetuned()
        return self.handle

    def _load_base(self) -> None:
        from .model import load

        self.handle = load(self.session.model, self.on_event, self.cancel, base_dir=self.session.base_dir())
        self._model_for = self.session.model.name

    # ---- [finetune]
    @property
    def finetune_info(self) -> Any:
        """The :class:`~backends.finetune_first.FinetuneInfo` of the fine-tune on the model now, or None."""
        ft = self._finetune
        return ft[2] if ft is not None and ft[0] is self.handle else None

    def ensure_finetuned(self, items: Sequence | None = None) -> Any:
        """Make the model the session's ``[finetune]`` asks for; returns its FinetuneInfo (None: no fine-tune).

        Without ``[finetune]`` the base model; with it, the base model
        fine-tuned on the training items (:meth:`finetune_items`), trained or
        loaded from the cache.  When those items or settings changed since the
        model was fine-tuned, kept step edits are undone, the base weights are
        brought back (our own model is loaded again; a caller's handle gets its
        weights from the copy kept for that) and the new fine-tune is applied.
        Nothing happens while the training items are not known yet (the app
        before its data is in).  ``items``: the data file's items just read
        (default: those :meth:`startup` is working with), on which the
        session's ``[data] forget/retain`` selects the training items.
        """
        from . import finetune_first

        cfg = getattr(self.session, "finetune", None)
        items = items if items is not None else self._fresh_items
        cur = self._finetune if self._finetune is not None and self._finetune[0] is self.handle else None
        self._finetune = cur
        if self.handle is None:
            return None
        if cfg is None:
            if cur is not None:
                self._drop_finetune("the session has no [finetune] any more")
            return None
        train = self.finetune_items(cfg, items)
        if train is None:
            return cur[2] if cur is not None else None
        train = finetune_first.training_items(train)
        ident = (repr(cfg), tuple((it.id, it.question, it.answer) for it in train))
        if cur is not None:
            if cur[1] == ident:
                return cur[2]
            self._drop_finetune("the fine-tune's items or settings changed")
        h = self.handle
        given = getattr(h, "finetune", None)
        if given is not None:   # a caller's handle that came fine-tuned: usable only if it is this fine-tune
            if not finetune_first.matches(h, train, cfg):
                raise UserError("the model given is fine-tuned on other items or settings than [finetune] asks "
                                "for; pass the base model", "finetune")
            self._finetune = (h, ident, given, None)
            return given
        base = None
        if self._model_for is None:   # the caller's handle: keep its weights, to give it back as it came
            base = {n: h.parameter(n).detach().to("cpu", copy=True) for n in finetune_first.changed_names(h, cfg)}
        info = finetune_first.apply(h, train, cfg, self.settings, self.on_event, self.cancel)
        self._finetune = (h, ident, info, base)
        self._model_changed()
        return info

    def finetune_items(self, cfg: Any, items: Sequence | None = None) -> list | None:
        """What ``[finetune] data`` trains on; None while it is not known yet.

        ``"forget+retain"`` / ``"retain"``: the current selection (or, given
        ``items`` just read, the session's ``[data] forget/retain`` on them);
        ``"all"``: every item of the data file; else the items of that file.
        """
        from . import data
        from .spec import FINETUNE_DATA

        if cfg.data not in FINETUNE_DATA:
            return self._finetune_data_file(cfg.data)
        if cfg.data == "all":
            pool = items if items is not None else self.items
            return list(pool) if pool else None
        if items is not None:
            try:
                forget, retain = data.select(items, self.session.data.forget, self.session.data.retain, where="data")
            except UserError as exc:   # the app before its selection is made: fine-tuned once it is
                self.on_event(Log(f"finetune: waiting for a selection ({' '.join(str(exc).split())})"))
                return None
        elif self.forget or self.retain:
            forget, retain = self.forget, self.retain
        else:
            return None
        return list(retain) if cfg.data == "retain" else [*forget, *retain]

    def _finetune_data_file(self, spec: str) -> list:
        """The items of a ``[finetune] data`` file (read again only when the file changed)."""
        from . import data

        path = None if spec.startswith(("builtin:", "hub:")) else self.session.resolve(spec)
        stamp = None
        if path is not None:
            try:
                st = path.stat()
                stamp = (st.st_mtime_ns, st.st_size)
            except OSError:
                stamp = None
        cached = self._finetune_file
        if cached is not None and cached[0] == (spec, str(path)) and cached[1] == stamp and stamp is not None:
            return list(cached[2])
        try:
            loaded = data.load_items(spec, base_dir=self.session.base_dir())
        except UserError as exc:
            raise UserError(f"[finetune] data: {exc.message}", "finetune.data") from None
        self._finetune_file = ((spec, str(path)), stamp, loaded)
        return list(loaded)

    def _drop_finetune(self, why: str) -> None:
        """Bring the base model back (kept step edits undone first, as they sit on the fine-tuned one)."""
        from . import finetune_first

        undone = 0
        while self.undo():
            undone += 1
        self.redo_stack.clear()
        h, _, _, base = self._finetune
        self._finetune = None
        if base is not None:
            finetune_first.restore(h, base)
        elif self._model_for is not None:
            self.handle = None
            self._load_base()
        else:
            raise UserError("the model given is fine-tuned and its base weights are not here; pass the base "
                            "model", "finetune")
        self.on_event(Log(f"finetune: {why}; base model restored" + (f", {undone} kept edit(s) undone"
                                                                      if undone else "")))
        self._model_changed()

    def release_finetune(self) -> None:
        """Give a caller's handle back as it came (its base weights); our own model stays as it is."""
        ft = self._finetune
        if ft is not None and ft[0] is self.handle and ft[3] is not None:
            self._drop_finetune("handing the given model back")

    def _model_changed(self) -> None:
        """The weights under everything remembered changed: nothing of the old state is reused."""
        self.undo_stack.clear()
        self.redo_stack.clear()
        self._quick.clear()
        self.method_state.clear()
        if self.handle is not None:
            self.handle.workbench_serial = None

    # ================================================================ phase 2: data and selection
    def load_items(self) -> list:
        """The session's data file, loaded (nothing else changes)."""
        from . import data

        cfg = self.session.data
        self.on_event(StageStarted("load data", None, cfg.path))
        return data.load_items(cfg.path, base_dir=self.session.base_dir(), format=cfg.format)

    def load_data(self) -> list:
        """Load the session's data and select its ``[data] forget/retain`` items."""
        from . import data

        cfg = self.session.data
        self.items = self.load_items()
        forget, retain = data.select(self.items, cfg.forget, cfg.retain, where="data")
        self.set_selection([it.id for it in forget], [it.id for it in retain])
        self.on_event(Log(f"data: {len(self.items)} items; forget {len(self.forget)}, retain {len(self.retain)}"))
        return self.items

    def adopt(self, session: Any, items: Sequence, forget_ids: Sequence[str], retain_ids: Sequence[str]) -> None:
        """Take over a session, items the caller loaded and a selection (the app, before every job).

        A session for another model drops the loaded one (and step mode's edits, which belong to it).
        The prepared state is dropped only if what it depends on changed.
        """
        if self.handle is not None and self._model_for not in (None, session.model.name):
            self.handle = None
            self._model_for = None
            self.undo_stack.clear()
            self.redo_stack.clear()
            self._quick.clear()
        self.session = session
        self.settings = EvalSettings.from_config(getattr(session, "eval", None))
        self.items = list(items)
        known = {it.id for it in self.items}
        fids = [i for i in forget_ids if i in known]
        self.set_selection(fids, [i for i in retain_ids if i in known and i not in fids])

    def set_selection(self, forget_ids: Any, retain_ids: Any) -> None:
        """Choose the forget and retain items by id (kept in the given order, repeats dropped).

        Needs the items (:meth:`load_data` or :meth:`adopt`).  Ids are checked
        against them: an unknown id, or an id in both sets, raises UserError
        (``data.forget`` / ``data.retain``) and nothing changes.  Empty sets are
        allowed.  The session's ``[data] subjects`` and ``paraphrases`` are
        applied to the forget items as copies (the loaded items are not
        changed); the prepared state is dropped when the selection changed.
        """
        from . import data

        if self.items is None:
            raise UserError("no data loaded; load the data before selecting items", "data")
        by_id = {it.id: it for it in self.items}
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
        self.forget = forget
        self.retain = [by_id[i] for i in rids]

    @property
    def rephrase(self) -> list:
        """The rephrase split of the current selection (the paraphrases known so far; nothing generated)."""
        from . import data

        p = self._current()
        if p is not None:
            return list(p.rephrase)
        return data.rephrase_split(self.forget) if getattr(self.session.data, "rephrase", True) else []

    # ================================================================ phase 3: prepared
    def _key(self) -> Any:
        s = self.session
        return (tuple(it.id for it in self.forget), tuple(it.id for it in self.retain),
                tuple((it.subject, it.paraphrased_question) for it in self.forget), repr(s.targets),
                repr(getattr(s.data, "paraphrases", None)), getattr(s.data, "rephrase", True), self.regenerate,
                str(s.base_dir()) if hasattr(s, "base_dir") else None, repr(getattr(s, "finetune", None)))

    def _current(self) -> Prepared | None:
        """The prepared state if it is still valid for the session and selection, else None."""
        if self._prepared is not None and self._prepared_key != self._key():
            self._prepared = None
        return self._prepared

    @property
    def prepared(self) -> Prepared | None:
        """The prepared state while it is valid (see :meth:`prepare`); never computes anything."""
        return self._current()

    def invalidate(self) -> None:
        """Drop the prepared state (it is also dropped by itself when what it depends on changes)."""
        self._prepared = None

    def prepare(self, paraphrases: bool = True) -> Prepared:
        """Targets, requests and (with ``paraphrases``) the rephrase split of the current selection.

        Model-written targets (self-improve, avoidant, generated incorrect) and
        missing paraphrases load the model and are generated here; the session's
        ``[[targets.items]]`` and ``[[data.paraphrases]]`` are reused unless
        ``regenerate``.  Cached until the selection or the session's targets,
        subjects or paraphrases change.
        """
        from . import data

        p = self._current()
        if p is None:
            t = self.session.targets
            overrides = {i.id: i for i in t.items if not (self.regenerate and i.source in GENERATED_SOURCES)}
            pool = load_pool(t.pool, self.session)
            targets = simple_targets(t.mode, self.forget, pool, t.seed, t.dummy, overrides)
            missing = [it for it in self.forget if it.id not in targets]
            new: dict[str, Target] = {}
            if missing:
                new = self._model_targets(t.mode, missing, pool)
                targets.update(new)
            from .selfimprove import target_records

            requests = build_requests(self.forget, targets, t.merge_factor, self.session.data.subjects)
            rephrase = data.rephrase_split(self.forget) if getattr(self.session.data, "rephrase", True) else []
            p = Prepared(tuple(self.forget), tuple(self.retain), tuple(rephrase), MappingProxyType(dict(targets)),
                         tuple(requests), tuple(target_records([it for it in self.forget if it.id in new], new)))
            key = self._key()
            self._prepared, self._prepared_key = p, key
        if paraphrases and not p.paraphrased:
            p = self._with_paraphrases(p)
            self._prepared = p
        return p

    def _with_paraphrases(self, p: Prepared) -> Prepared:
        from . import data, selfimprove

        if not getattr(self.session.data, "rephrase", True):
            return replace(p, rephrase=(), paraphrases=(), new_paraphrases=(), paraphrased=True)
        report = selfimprove.ensure_paraphrases_report(
            self._model, p.forget, getattr(self.session.data, "paraphrases", None) or [],
            int(getattr(self.session.targets, "seed", 0) or 0), self.on_event, self.cancel, self.regenerate)
        para = {r["id"]: r["paraphrase"] for r in report.records}
        left = set(report.left_out)
        # an item whose paraphrases all failed the checks leaves the rephrase split (even one it carried)
        forget = tuple(replace(it, paraphrased_question=para[it.id])
                       if it.id in para and para[it.id] != it.paraphrased_question
                       else replace(it, paraphrased_question=None) if it.id in left and it.paraphrased_question
                       else it for it in p.forget)
        return replace(p, forget=forget, rephrase=tuple(data.rephrase_split(forget)),
                       paraphrases=tuple(report.records), new_paraphrases=tuple(report.written), paraphrased=True,
                       paraphrases_left_out=tuple(report.left_out))

    def evaluate_baseline(self, p: Prepared | None = None) -> EvalResult:
        """:meth:`evaluate` of the unedited model, remembered on the handle: a sweep or ``paper`` trial on the
        same model, splits, targets and settings as an earlier one (its runs are undone exactly) gets that
        evaluation back instead of running it again.  Keyed by the model's fingerprint (a fine-tune has its
        own), dtype and device, the evaluation settings, every split's items as evaluated (every field), the
        targets, and the session's ``[data]``/``[eval]``/``[finetune]``
        (what the ``[eval] extra`` metrics read).  Only with no kept edit and no wrapper installed."""
        p = p or self._need_prepared()
        handle = self._model()
        if self.undo_stack or handle.wrappers:
            return self.evaluate(p)
        s = self.session
        content = hashlib.sha256(json.dumps(
            [[name, [asdict(it) for it in items]] for name, items in p.splits().items()]
            + [sorted((k, t.text) for k, t in p.targets.items())], default=str).encode()).hexdigest()
        key = (handle.fingerprint, str(getattr(handle, "dtype", "")), str(getattr(handle, "device", "")),
               repr(self.settings), content, repr(getattr(s, "data", None)), repr(getattr(s, "eval", None)),
               repr(getattr(s, "finetune", None)))
        memo = handle.__dict__.setdefault("baseline_memo", {})
        if key in memo:
            self.on_event(Log("baseline: the same model, splits and settings as an earlier run in this process: "
                              "its evaluation reused (not evaluated again)"))
            return copy.deepcopy(memo[key])
        result = self.evaluate(p)
        if len(memo) >= BASELINE_MEMORY:
            memo.pop(next(iter(memo)))
        memo[key] = copy.deepcopy(result)
        return result

    def _model_targets(self, mode: str, items: list, pool: list[str]) -> dict[str, Target]:
        """Targets the model writes itself (self-improve, avoidant, generated incorrect)."""
        from . import selfimprove

        self._model()
        return selfimprove.generate_targets(self.handle, mode, items, pool, self.session.targets,
                                            self.on_event, self.cancel)

    # ================================================================ evaluation and runs
    def evaluate(self, p: Prepared | None = None) -> EvalResult:
        """Evaluate the current model on the prepared splits (with their targets), and the session's
        ``[eval] extra`` metrics and attacks (:mod:`backends.extras`)."""
        p = p or self._need_prepared()
        targets = {k: t.text for k, t in p.targets.items()}
        result = evaluate(self._model(), p.splits(), self.settings, self.on_event, self.cancel, targets)
        wanted = list(getattr(getattr(self.session, "eval", None), "extra", None) or [])
        if wanted:
            from . import extras

            extras.compute(self.handle, wanted, self.extras_inputs(p, wanted), self.settings, result,
                           self.on_event, self.cancel)
        return result

    # ---- [eval] extra
    def extras_inputs(self, p: Prepared, wanted: Sequence[str]) -> Any:
        """What :func:`backends.extras.compute` needs for this selection (built once per selection): the
        forget / retain items with perturbed answers (derived where the data has none), the holdout
        items, the model-utility sets, the held text, the in-context demos and, for forget quality and
        PrivLeak, the retain-only model's numbers."""
        from . import extras, perturb

        cfg = self.session.eval
        key = (self._key(), tuple(wanted), repr(cfg))
        cached = getattr(self, "_extras", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        pool = list(self.items or [])
        forget = perturb.derive(list(p.forget), pool or None, seed=self.session.targets.seed)
        retain = perturb.derive(list(p.retain), pool or None, seed=self.session.targets.seed)
        holdout = self._holdout(cfg, len(forget))
        inp = extras.Inputs(forget, retain, holdout, seed=int(self.session.targets.seed or 0),
                            derived=perturb.count_derived(forget) + perturb.count_derived(retain))
        if cfg.relearn_epochs:
            inp.relearn_epochs = int(cfg.relearn_epochs)
        if cfg.relearn_lr:
            inp.relearn_lr = float(cfg.relearn_lr)
        if "model_utility" in wanted:
            inp.utility, note = extras.utility_sets(cfg.utility_data, self.session.base_dir(), cfg.utility_items)
            self.on_event(Log(f"extras: {note}"))
        if "perplexity" in wanted:
            from . import mia

            inp.text = self.session.resolve(cfg.perplexity_text).read_text(encoding="utf-8") \
                if cfg.perplexity_text else mia.heldout_text()
        if "in_context" in wanted:
            chosen = {it.id for it in forget}
            inp.demos = [it for it in (pool or list(p.retain)) if it.id not in chosen]
        if "forget_quality" in wanted or "mia" in wanted:
            inp.reference, inp.reference_why = self._retain_only_reference(inp)
        self._extras = (key, inp)
        return inp

    def _base_copy(self) -> Any:
        """A copy of the base model when the handle was the caller's (its pre-fine-tune weights are kept),
        else None (our own model: the caller loads the base again)."""
        import copy

        import torch

        from .model import ModelHandle

        ft = self._finetune
        if self._model_for is not None or ft is None or ft[3] is None or self.handle.wrappers:
            return None
        h = self.handle
        twin = ModelHandle(copy.deepcopy(h.model), h.tokenizer, name=h.name, device=h.device, source=h.source,
                           cached=h.cached)
        with torch.no_grad():
            for n, t in ft[3].items():
                twin.parameter(n).copy_(t)
        twin.set_fingerprint(ft[2].base_fingerprint)
        return twin

    def _holdout(self, cfg: Any, n_forget: int) -> list:
        """Membership-inference non-members: ``[eval] holdout`` ids, else the first N data items that are
        neither selected nor trained on by ``[finetune]`` (N = ``holdout`` or the forget count)."""
        pool = list(self.items or [])
        if isinstance(cfg.holdout, list):
            by_id = {it.id: it for it in pool}
            missing = [i for i in cfg.holdout if i not in by_id]
            if missing:
                raise UserError(f"unknown item id {missing[0]!r} (the data file has {len(pool)} items)",
                                "eval.holdout")
            return [by_id[i] for i in cfg.holdout]
        used = {it.id for it in (*self.forget, *self.retain)}
        ft = getattr(self.session, "finetune", None)
        if ft is not None:
            train = self.finetune_items(ft) or []
            used |= {it.id for it in train}
        n = int(cfg.holdout or n_forget)
        return [it for it in pool if it.id not in used][:n]

    def _retain_only_reference(self, inp: Any) -> tuple[Any, str]:
        """(the retain-only model's :class:`~backends.extras.Reference`, '') or (None, why not).

        The retain-only model is the base model fine-tuned by ``[finetune]`` (same settings) on its
        training items minus the forget items; it is loaded beside the session's model, measured and
        released (the fine-tune is cached like any other)."""
        import dataclasses
        import gc

        from . import extras, finetune_first
        from .model import load

        ft = getattr(self.session, "finetune", None)
        if ft is None:
            return None, ("no retain-only model: forget quality and PrivLeak need [finetune] (the fine-tuned-"
                          "knowledge setting, where the retain-only model is the base fine-tuned without the "
                          "forget items)")
        forget_ids = {it.id for it in inp.forget}
        train = [it for it in (self.finetune_items(ft) or []) if it.id not in forget_ids]
        if not train:
            return None, "no retain-only model: [finetune] trains on nothing but the forget items"
        cached = getattr(self, "_reference", None)
        key = (tuple(sorted(forget_ids)), tuple(it.id for it in inp.holdout), repr(ft),
               tuple((it.id, it.question, it.answer) for it in train))
        if cached is not None and cached[0] == key:
            return cached[1], ""
        self.on_event(Log(f"extras: the retain-only model ({len(train)} items, [finetune] settings)"))
        twin = self._base_copy() or load(self.session.model, self.on_event, self.cancel,
                                         base_dir=self.session.base_dir())
        try:
            info = finetune_first.apply(twin, train, dataclasses.replace(ft, data="retain"), self.settings,
                                        self.on_event, self.cancel)
            js = info.to_json()
            js.pop("history", None)
            ref = extras.build_reference(twin, inp, self.settings, js, self.on_event, self.cancel)
        finally:
            del twin
            gc.collect()
        self._reference = (key, ref)
        return ref, ""

    def _need_prepared(self) -> Prepared:
        p = self._current()
        if p is None or not p.paraphrased:
            raise RuntimeError("Workbench.prepare() first")
        return p

    def probe(self, question: str, max_new_tokens: int | None = None) -> tuple[str, str]:
        """(answer of the current, edited model; answer of the unedited model).

        The unedited answer is exact: every kept edit is undone from its
        transaction snapshot, the question answered, and the edits redone.
        """
        from .generation import generate

        self._model()
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
        p = self._current()
        forget, retain = (list(p.forget), list(p.retain)) if p is not None else (self.forget, self.retain)
        return EditContext(self.on_event, self.cancel, forget, retain,
                           self.method_state.setdefault(method_name, {}), seed=self.session.targets.seed,
                           base_dir=self.session.base_dir(), where=f"runs[{index}].params")

    def apply(self, run_cfg: Any, requests: list[Request] | None = None, index: int = 0, keep: bool = False):
        """Apply one method inside a transaction; returns (transaction, method, report, seconds).

        Without ``requests``, those of :meth:`prepare`.
        """
        method = self.make_method(run_cfg, index)
        requests = list(self.prepare(paraphrases=False).requests) if requests is None else requests
        self._model()
        t0 = time.perf_counter()
        with self.handle.transaction(method.touched_parameters(self.handle), keep_after=keep) as tx:
            report = method.apply(self.handle, requests, self.context(run_cfg.method, index))
        # what the edit was, for an export of the kept edits (backends.export)
        tx.edit = {"method": run_cfg.method, "params": to_dict(method.params),
                   "items": [list(r.item_ids) for r in requests]}
        return tx, method, report or {}, time.perf_counter() - t0

    def keep(self, run_cfg: Any, requests: list[Request] | None = None, index: int = 0) -> dict:
        """Apply one run (or ``requests``) and keep it on the undo stack, unevaluated; returns its report."""
        tx, _, report, _ = self.apply(run_cfg, requests, index=index, keep=True)
        self._push(tx)
        return report

    def replay_steps(self, steps: Sequence[Any]) -> int:
        """Apply a session's recorded ``[[steps]]`` in order, kept (as the app's step mode applied them).

        Each step's request is the prepared request of exactly its ``items``;
        one the current selection, targets or merge factor no longer makes is
        a UserError at ``steps[i].items``.  Returns how many were applied.
        """
        from .spec import RunConfig

        p = self.prepare(paraphrases=False)
        by_items = {tuple(r.item_ids): r for r in p.requests}
        for i, st in enumerate(steps):
            req = by_items.get(tuple(st.items))
            if req is None:
                raise UserError(f"no forget request of the session edits exactly {', '.join(st.items)} (the "
                                "selection, targets or merge factor changed since the step was recorded)",
                                f"steps[{i}].items")
            self.keep(RunConfig(st.method, dict(st.params or {}), st.label), [req], index=0)
        return len(steps)

    def run_one(self, index: int, run_cfg: Any, total: int = 1, keep: bool = False,
                baseline: EvalResult | None = None) -> RunResult:
        """One run: apply, evaluate, and roll back (unless ``keep``).

        ``baseline`` is the evaluation of the unedited model on the same prepared
        splits: a method that never changes the model (``changes_model = False``)
        reuses it instead of evaluating the same model twice.
        """
        p = self.prepare()
        self.on_event(RunStarted(index, run_cfg.method, total))
        tx, method, report, seconds = self.apply(run_cfg, list(p.requests), index=index, keep=keep)
        try:
            t1 = time.perf_counter()
            reuse = baseline is not None and not getattr(method, "changes_model", True) and not self.undo_stack
            ev = baseline if reuse else self.evaluate(p)
            eval_seconds = time.perf_counter() - t1
        finally:
            if not keep:
                tx.rollback()
        result = RunResult(index, run_cfg.method, run_cfg.label or run_cfg.method, to_dict(method.params),
                           self.session.targets.mode, self.session.targets.merge_factor, ev, seconds,
                           eval_seconds, report)
        if keep:
            self._push(tx)
        self.on_event(RunFinished(index, run_cfg.method, result))
        return result

    def run_all(self, runs: Sequence[Any] | None = None) -> SessionResult:
        """Every run of the session (or ``runs``), each from the unedited model, after a baseline.

        Kept step-mode edits are undone first (``undone`` in the result); every
        run is validated before the slow part.
        """
        runs = list(self.session.runs if runs is None else runs)
        undone = 0
        while self.undo():
            undone += 1
        self.redo_stack.clear()
        for i, r in enumerate(runs):
            self.make_method(r, i)
        p = self.prepare()
        self._model()
        result = SessionResult(self.evaluate_baseline(p), undone=undone)
        info = self.finetune_info
        result.finetune = info.to_json() if info is not None else None
        for i, r in enumerate(runs):
            result.runs.append(self.run_one(i, r, len(runs), baseline=result.baseline))
        p = self.prepare()
        result.targets = p.target_records()
        result.paraphrases = list(p.paraphrases)
        result.paraphrases_left_out = list(p.paraphrases_left_out)
        result.new_targets = list(p.new_targets)
        result.new_paraphrases = list(p.new_paraphrases)
        return result

    # ================================================================ step mode
    def step(self, run_cfg: Any, request: Request, index: int = 0):
        """Apply one request and keep it on the undo stack; returns (report, seconds)."""
        tx, _, report, seconds = self.apply(run_cfg, [request], index=index, keep=True)
        self._push(tx)
        return report, seconds

    def _push(self, tx: Any) -> None:
        """Keep ``tx`` on the undo stack (a new edit: the redo stack is dropped)."""
        tx.workbench_serial = next(_SERIALS)
        self.undo_stack.append(tx)
        self.redo_stack.clear()

    def _state_key(self) -> tuple:
        """Names the model's current state: the loaded model and the kept edits on it, in order."""
        h = self.handle
        if h is not None and getattr(h, "workbench_serial", None) is None:
            h.workbench_serial = next(_SERIALS)
        return (getattr(h, "workbench_serial", None),
                tuple(getattr(tx, "workbench_serial", id(tx)) for tx in self.undo_stack))

    def step_next(self, run_cfg: Any = None, index: int = 0, question: str | None = None) -> StepResult:
        """Apply the next forget request with the first run's method, keep it, and score the model.

        ``question`` (default: the request's first question) is probed on the
        edited and the unedited model.
        """
        run_cfg = self.session.runs[index] if run_cfg is None else run_cfg
        self.make_method(run_cfg, index)
        p = self.prepare(paraphrases=False)
        reqs = p.requests
        k = len(self.undo_stack)
        if k >= len(reqs):
            raise UserError(f"all {len(reqs)} forget request(s) are applied; undo (ctrl+z) or run (ctrl+r)")
        report, _ = self.step(run_cfg, reqs[k], index)
        return replace(self._step_result(question or reqs[k].questions[0], report, p.new_targets),
                       items=tuple(reqs[k].item_ids))

    def undo(self, score: bool = False, question: str | None = None) -> StepResult | None:
        """Undo the last kept edit; None when there is none.  ``score``: with :meth:`quick_scores` and a probe."""
        if not self.undo_stack:
            return None
        tx = self.undo_stack.pop()
        tx.undo()
        self.redo_stack.append(tx)
        return self._step_result(question, scored=score)

    def redo(self, score: bool = False, question: str | None = None) -> StepResult | None:
        """Redo the last undone edit; None when there is none (see :meth:`undo`)."""
        if not self.redo_stack:
            return None
        tx = self.redo_stack.pop()
        tx.redo()
        self.undo_stack.append(tx)
        return self._step_result(question, scored=score)

    def _step_result(self, question: str | None, report: dict | None = None, new_targets: tuple = (),
                     scored: bool = True) -> StepResult:
        p = self._current()
        n = len(p.requests) if p is not None else None
        if not scored:
            return StepResult(len(self.undo_stack), n, report=report or {}, new_targets=new_targets)
        quick = self.quick_scores()
        probe = (question, *self.probe(question)) if question else None
        return StepResult(len(self.undo_stack), n, quick, probe, report or {}, new_targets)

    # ================================================================ opening a session
    def startup(self, load_model: bool = True, known_limit: int = 0,
                on_items: Any = None) -> dict[str, float] | None:
        """Load the session's data file, the model, and what the model knows (the app's start-up flow).

        ``on_items(items, error)`` gets the loaded items (or None and the
        one-line error: a bad data file does not stop the model from loading)
        as soon as they are read.  With ``known_limit``, returns
        :meth:`score_known` of the first ``known_limit`` items, else None.
        """
        try:
            items, error = self.load_items(), None
        except UserError as exc:
            items, error = None, " ".join(str(exc).split())
        if on_items is not None:
            on_items(items, error)
        if load_model or (items and known_limit > 0):
            # [finetune]: on the session's selection of the items just read (not the one the app held before
            # they were), before any score
            self._fresh_items = items
            try:
                self.load_model()
                self.ensure_finetuned()
            finally:
                self._fresh_items = None
        if items and known_limit > 0:
            return self.score_known(items[:known_limit])
        return None

    # ================================================================ quick measurements
    def quick_scores(self) -> dict[str, float]:
        """ROUGE-1 of the current model on the forget and retain items (no rephrase, no targets).

        Remembered per model state (the loaded model and its kept edits) and
        selection, so undo and redo back to a state already scored cost nothing.
        """
        p = self._current()
        forget, retain = (list(p.forget), list(p.retain)) if p is not None else (self.forget, self.retain)
        handle = self._model()
        key = (self._state_key(), _items_key(forget), _items_key(retain), self.settings.max_new_tokens)
        if key in self._quick:
            self.on_event(Log("scores of this model state: remembered (not evaluated again)"))
            return dict(self._quick[key])
        res = evaluate(handle, {"forget": forget, "retain": retain}, self.settings, self.on_event, self.cancel)
        scores = {k: s.rouge1 for k, s in res.splits.items()}
        if len(self._quick) >= QUICK_MEMORY:
            self._quick.pop(next(iter(self._quick)))
        self._quick[key] = dict(scores)
        return scores

    def score_known(self, items: Sequence) -> dict[str, float]:
        """Baseline ROUGE-1 per item: does the model know the fact now?

        For the model as loaded (no kept edit, no wrapper) the scores are cached
        on disk per item, in one file per model (:func:`known_cache_file`: the
        model's fingerprint, its prompt format and the evaluation settings), so
        an item is evaluated once per model, whatever batch it comes in: the
        app scores the rows on screen a few at a time, and a second launch
        reads them back (even before the model loads: :func:`known_cache_before_load`).
        """
        handle = self._model()
        items = list(items)
        path, cached = None, {}
        if not self.undo_stack and not handle.wrappers and items:
            path = known_cache_file(handle, items, self.settings)
            stored = _read_known(path) or {}
            cached = {it.id: stored[k] for it in items if (k := known_cache_item_key(it)) in stored}
            if len(cached) == len({it.id for it in items}):
                self.on_event(Log(f"known scores of {len(items)} items: cached ({path.name})"))
                return cached
        missing = [it for it in items if it.id not in cached]
        res = evaluate(handle, {"known": missing}, self.settings, self.on_event, self.cancel)
        split = res.splits.get("known")
        scores = {s.id: s.rouge1 for s in split.items} if split else {}
        if path is not None and scores:
            by_id = {it.id: it for it in missing}
            stored = _read_known(path) or {}     # (read again: another batch may have written meanwhile)
            stored.update({known_cache_item_key(by_id[i]): v for i, v in scores.items() if i in by_id})
            _write_known(path, stored)
            known_cache_remember(known_cache_identity(self.session), known_cache_key(handle, self.settings))
        return {**cached, **scores}

    def write_targets(self, item_ids: Sequence[str], mode: str = "self-improve") -> list[dict]:
        """Targets the model writes now for the selected forget items ``item_ids`` (records; the session's
        targets for them are not used and not changed)."""
        from .selfimprove import target_records

        want = set(item_ids)
        items = [it for it in self.forget if it.id in want]
        if not items:
            return []
        made = self._model_targets(mode, items, load_pool(self.session.targets.pool, self.session))
        return target_records(items, made)

    # ================================================================ compatibility views
    def targets(self) -> dict[str, Target]:
        """The prepared targets (:meth:`prepare` first)."""
        p = self._current()
        if p is None:
            raise RuntimeError("Workbench.prepare() first")
        return dict(p.targets)

    def requests(self) -> list[Request]:
        """The prepared requests (:meth:`prepare` first)."""
        p = self._current()
        if p is None:
            raise RuntimeError("Workbench.prepare() first")
        return list(p.requests)

    def target_records(self) -> list[dict]:
        """The ``"targets"`` audit list of the prepared state (:meth:`prepare` first)."""
        p = self._current()
        if p is None:
            raise RuntimeError("Workbench.prepare() first")
        return p.target_records()


def run(session: Any, on_event: EventCallback = ignore, cancel: CancelToken | None = None,
        handle: ModelHandle | None = None, regenerate: bool = False) -> SessionResult:
    """Run a whole session headlessly (see the module doc): :meth:`Workbench.run_all` on its data.

    Model-written targets and paraphrases are in the result (``new_targets``,
    ``new_paraphrases``); the caller stores them (``replay`` caches them in the file).
    """
    wb = Workbench(session, on_event, cancel, handle, regenerate=regenerate)
    try:
        try:
            wb.load_data()
            result = wb.run_all()
        finally:
            wb.release_finetune()   # a handle given to us goes back unchanged
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
    for split in dict.fromkeys(("forget", "retain", "rephrase", *r.eval.splits)):   # + attack splits
        s = r.eval.splits.get(split)
        summ = s.summary() if s else {}
        for k in ("rouge1", "probability", "mrr", "top_hit"):
            row[f"{split}.{k}"] = summ.get(k)
    from .metrics import flat_extras

    row.update(flat_extras(r.eval))
    row["composite"] = r.composite
    row["seconds"] = r.seconds
    return row


_SERIALS = itertools.count(1)   # one per kept transaction and handle: with the stack, names a model state
QUICK_MEMORY = 64          # model states whose quick scores are remembered (undo/redo)
BASELINE_MEMORY = 8        # baseline evaluations remembered per loaded model (sweep/paper trials)
KNOWN_CACHE_VERSION = 2   # bump when the known pass (prompts, generation, ROUGE) changes its numbers


def _items_key(items: Sequence) -> str:
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps([it.id, it.question, it.answer]).encode())
    return h.hexdigest()[:16]


def known_cache_dir() -> Path:
    from .paths import cache_dir

    return cache_dir() / "known"


def known_cache_key(handle: ModelHandle, settings: EvalSettings) -> str:
    """Names the unedited ``handle`` for the known scores: its fingerprint, name, dtype, prompt format
    (the tokens of a template question) and the evaluation settings that change the numbers."""
    h = hashlib.sha256()
    h.update(json.dumps({"v": KNOWN_CACHE_VERSION, "model": handle.fingerprint, "name": handle.name,
                         "dtype": str(handle.dtype), "max_new_tokens": settings.max_new_tokens,
                         "prompt": handle.prompt_ids("{question}")}).encode())
    return h.hexdigest()[:24]


def known_cache_item_key(item: Any) -> str:
    """Names one item for the known scores: the text the model is asked and the text ROUGE compares."""
    return hashlib.sha256(json.dumps([item.id, item.question, item.answer]).encode()).hexdigest()[:20]


def known_cache_file(handle: ModelHandle, items: Sequence = (), settings: EvalSettings | None = None) -> Path:
    """The file of the known scores on the unedited ``handle`` (one per model, every item in it; ``items``
    is accepted for older callers and does not change it)."""
    return known_cache_dir() / f"known-{known_cache_key(handle, settings or EvalSettings())}.json"


def known_cache_identity(session: Any) -> str | None:
    """A cheap identity of the session's model, known *before* it loads: the ``[model]`` spec, with the size
    and modification time of its files (a GGUF file, a model folder's config and weights), and the
    ``[finetune]`` table.  The index maps it to the :func:`known_cache_key` seen at the last load."""
    try:
        spec = session.model
        ident: dict[str, Any] = {"name": spec.name, "device": spec.device, "dtype": spec.dtype,
                                 "revision": spec.revision}
        if not str(spec.name).startswith("tiny:"):
            from .model import resolve

            kind, where = resolve(spec.name, session.base_dir())
            ident["kind"] = kind
            if kind in ("gguf", "dir"):
                p = Path(where)
                files = [p] if p.is_file() else sorted(
                    f for f in p.iterdir() if f.suffix in (".json", ".safetensors", ".bin", ".gguf", ".model"))
                ident["files"] = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
                ident["path"] = str(p)
        ft = getattr(session, "finetune", None)
        if ft is not None:
            ident["finetune"] = json.dumps(asdict(ft), sort_keys=True, default=str)
        return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:24]
    except Exception:   # no identity (a model that is not there): no scores before the load, nothing else
        return None


def _known_index_file() -> Path:
    return known_cache_dir() / "index.json"


def known_cache_remember(identity: str | None, key: str) -> None:
    """Record that the model named ``identity`` loaded as ``key`` (read back at the next launch)."""
    if identity is None:
        return
    path = _known_index_file()
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        index = index if isinstance(index, dict) else {}
    except (OSError, ValueError):
        index = {}
    if index.get(identity) == key:
        return
    index[identity] = key
    _write_json(path, index)


def known_cache_before_load(session: Any, items: Sequence) -> tuple[str | None, dict[str, float]]:
    """(the key the session's model had at its last load, the known scores of ``items`` cached for it),
    read without loading the model; (None, {}) when the model was never loaded or its files changed.
    Once the model is loaded, the caller compares :func:`known_cache_key` and drops the scores if it differs."""
    identity = known_cache_identity(session)
    if identity is None:
        return None, {}
    try:
        key = json.loads(_known_index_file().read_text(encoding="utf-8")).get(identity)
    except (OSError, ValueError, AttributeError):
        return None, {}
    if not isinstance(key, str):
        return None, {}
    stored = _read_known(known_cache_dir() / f"known-{key}.json") or {}
    return key, {it.id: stored[k] for it in items if (k := known_cache_item_key(it)) in stored}


def _read_known(path: Path, items: Sequence | None = None) -> dict[str, float] | None:
    """The stored scores (item key -> ROUGE-1), or with ``items`` theirs by id (None unless all are there);
    None for a missing or damaged file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        scores = {str(k): float(v) for k, v in data["scores"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if data.get("version") != KNOWN_CACHE_VERSION:
        return None
    if items is None:
        return scores
    keys = {it.id: known_cache_item_key(it) for it in items}
    if not all(k in scores for k in keys.values()):
        return None
    return {i: scores[k] for i, k in keys.items()}


def _write_known(path: Path, scores: dict[str, float]) -> None:
    """Written atomically; a cache we cannot write is not an error."""
    _write_json(path, {"version": KNOWN_CACHE_VERSION, "scores": scores})


def _write_json(path: Path, obj: Any) -> None:
    from .fileio import atomic_write

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(obj))
    except OSError:
        pass


__all__ = ["Workbench", "Prepared", "StepResult", "run", "RunResult", "SessionResult", "EditContext", "result_row",
           "asdict"]
