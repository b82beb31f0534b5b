"""Sweeps: one session, many trials, each one headless session run (``unlearn-tui sweep``).

A sweep file is a session file plus a ``[sweep]`` table::

    [sweep]
    method = ["rome", "grace"]      # replaces the session's [[runs]] (else each of its runs is a trial)
    merge_factor = [1, 2]           # targets.merge_factor
    # mode = ["idk", "dummy"]       # targets.mode
    # forget = [5, 10]              # data.forget (a count, or a list of item ids)
    # seed = [0, 1]                 # targets.seed (targets, paraphrases, the methods' own draws)
    # product = true                # false: the lists are zipped (all of one length) instead of multiplied
    # cpus_per_trial = 1            # Ray resources of one trial
    # gpus_per_trial = 0            # 0: the trial sees no GPU; 1 (or 0.5: two share one) on a GPU machine
    [sweep.params.rome]             # a method's params, swept for that method's trials only
    v_steps = [10, 20]

or explicit trials, an axis of their own multiplied with the grid's lists (a
key is given in one place: the trials or the grid)::

    [sweep]
    seed = [0, 1]
    [[sweep.trials]]                # one value per key above, plus label and params = {...}
    method = "memit"
    params = { layers = [1, 2] }

Trials: ``[[sweep.trials]]`` in file order (one empty trial without them), each
combined with the grid: its keys in the order the file gives them, the last
varying fastest (``product = false``: element *i* of every list), then the
trial method's ``[sweep.params.NAME]`` lists.  A method's params start from
the session's first ``[[runs]]`` of that method.  Bad input (an unknown key, a
wrong type, a parameter the method does not have, an empty list, a key given
twice, two trials that are the same run) is one :class:`UserError` naming the
sweep key and ``file:line``.  Every trial is a complete
session with one run (:class:`Trial`): its values, its session and the hash
of that session, which names its result under ``--out``.

:func:`run_sweep` runs the trials as Ray tasks (``ray.init()`` of a local
cluster, or ``address`` to join one; each task asks for ``cpus_per_trial`` and
``gpus_per_trial``), or one after another in this process when Ray is not
installed or ``backend="local"``.  A worker process loads a model once and
reuses it for its next trials; each trial starts from the unedited weights
(the runner rolls every run back, as ``replay`` does).  A finished trial is
stored as ``OUT/trials/HASH.json`` as soon as it ends, so a sweep run again
skips it; a failed trial records its one-line error (and is tried again by the
next run of the sweep) while the others go on.  ``OUT/results.jsonl`` (one
line per trial: ``"trial"`` values, ``hash``, ``status``, ``error`` and the
fields of a run in ``replay --out``, plus the trial's ``baseline``) and
``OUT/results.csv`` (the same, flat) are rewritten after every trial.

Torch-free at import; Ray is imported only by :func:`run_sweep`.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import itertools
import json
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NoReturn

from unlearn_tui.backends.compat import tomllib
from unlearn_tui.backends.errors import Cancelled, UserError
from unlearn_tui.backends.events import CancelToken, Log, Progress, StageStarted, ignore
from unlearn_tui.backends.params import unknown_key_message
from unlearn_tui.backends.spec import SEED_MAX, RunConfig, Session, TargetsConfig, toml_meta

from ._lines import _AOT, _KEYVAL, _TABLE, LineIndex, _lex, _split
from .loader import format_value, parse
from .schema import to_plain

__all__ = ["SWEEP_FORMAT", "GRID_KEYS", "SWEEP_KEYS", "TRIAL_KEYS", "Sweep", "Trial", "TrialResult", "SweepStarted",
           "TrialFinished", "TrialEvent", "load_sweep", "loads_sweep", "run_sweep", "execute_trial", "init_ray",
           "ray_init_kwargs", "results_jsonl", "results_csv", "RESULTS_JSONL", "RESULTS_CSV", "TRIALS_DIR"]

SWEEP_FORMAT = 1            # bump when a trial's session plain form or its record changes meaning (new hashes)
GRID_KEYS = ("method", "mode", "merge_factor", "forget", "seed")
SWEEP_KEYS = (*GRID_KEYS, "params", "trials", "product", "cpus_per_trial", "gpus_per_trial")
TRIAL_KEYS = (*GRID_KEYS, "params", "label")
RESULTS_JSONL = "results.jsonl"
RESULTS_CSV = "results.csv"
TRIALS_DIR = "trials"
_SESSION_KEY = {"method": "runs", "mode": "targets.mode", "merge_factor": "targets.merge_factor",
                "forget": "data.forget", "seed": "targets.seed"}


# ===================================================================== the sweep and its trials
@dataclass
class Trial:
    """One resolved trial: ``values`` (sweep key -> value, ``params.FIELD`` for a method param), a complete
    session with exactly one run, and ``hash`` (of that session) naming its result under ``--out``."""

    index: int
    values: dict[str, Any]
    session: Session
    hash: str

    @property
    def label(self) -> str:
        return " ".join(f"{k}={_short(v)}" for k, v in self.values.items())

    def toml(self) -> str:
        """The trial as a session file of its own (``unlearn-tui replay`` of it is the same run)."""
        return _session_text(self.session)


@dataclass
class Sweep:
    """A loaded, validated sweep file (:func:`load_sweep`)."""

    path: Path | None
    label: str
    session: Session            # the session part of the file (its [[runs]] as written)
    product: bool = True
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    axes: tuple[str, ...] = ()  # the trial value keys that differ between trials
    _trials: list[Trial] = field(default_factory=list)

    def trials(self) -> list[Trial]:
        return list(self._trials)

    def describe(self, trial: Trial) -> str:
        """The trial's values that differ between the trials (``method=rome merge_factor=2``)."""
        keys = [k for k in self.axes if k in trial.values] or ["method"]
        return " ".join(f"{k}={_short(trial.values.get(k))}" for k in keys)


@dataclass
class TrialResult:
    """What one trial gave: ``status`` ``"ok"`` (``run``: the run's ``replay --out`` fields, ``baseline``:
    the unedited model's summary and composite) or ``"error"`` (``error``: one line)."""

    trial: Trial
    status: str
    error: str | None = None
    run: dict | None = None
    baseline: dict | None = None
    seconds: float = 0.0           # wall time of the trial (model load included)
    cached: bool = False           # read back from --out (finished by an earlier run of the sweep)
    pid: int | None = None         # the process that ran it
    loaded_model: bool | None = None   # whether that process loaded the model for it (else reused)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def composite(self) -> float | None:
        return (self.run or {}).get("composite")

    @property
    def delta(self) -> float | None:
        c, b = self.composite, (self.baseline or {}).get("composite")
        return None if c is None or b is None else c - b

    def line(self, items: bool = False) -> dict[str, Any]:
        """The ``results.jsonl`` line (``items``: with every item's generation, as in the trial's record)."""
        out: dict[str, Any] = {"trial": dict(self.trial.values), "hash": self.trial.hash, "status": self.status,
                               "error": self.error}
        if self.run is not None:
            out.update({k: v for k, v in self.run.items() if items or k != "items"})
            out["baseline"] = self.baseline
        out["trial_seconds"] = self.seconds
        return out

    def record(self) -> dict[str, Any]:
        """The ``trials/HASH.json`` file (read back by :func:`_read_record`), every item's generation kept
        (``items``: ``{split: [{"id", "question", "generation", "rouge1", ...}]}``)."""
        return {"format": SWEEP_FORMAT, **self.line(items=True), "pid": self.pid, "loaded_model": self.loaded_model}

    def row(self) -> dict[str, Any]:
        """Flat values for ``results.csv`` and tables."""
        row: dict[str, Any] = {f"trial.{k}": _cell(v) for k, v in self.trial.values.items()}
        row.update({"hash": self.trial.hash, "status": self.status, "error": self.error})
        run = self.run or {}
        for k in ("method", "label", "target_mode", "merge_factor"):
            row[k] = run.get(k)
        for split in ("forget", "retain", "rephrase", "mcq", "in_context"):   # + the [eval] extra attack splits
            summ = run.get(split) or {}
            for k, v in summ.items():
                row[f"{split}.{k}"] = v
        for k in ("forget_quality", "model_utility", "perplexity"):           # the [eval] extra numbers
            if k in run:
                row[k] = run[k]
        for k in ("mia", "relearn"):
            for kk, v in (run.get(k) or {}).items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    row[f"{k}.{kk}"] = v
        row["composite"] = run.get("composite")
        row["baseline.composite"] = (self.baseline or {}).get("composite")
        row["delta_composite"] = self.delta
        row["seconds"] = run.get("seconds")
        row["eval_seconds"] = run.get("eval_seconds")
        row["trial_seconds"] = self.seconds
        row["params"] = json.dumps(run["params"], sort_keys=True, default=str) if "params" in run else None
        return row


@dataclass(frozen=True)
class SweepStarted:
    total: int
    finished: int          # trials read back from --out (not run again)
    backend: str           # "ray" | "local"
    detail: str = ""


@dataclass(frozen=True)
class TrialFinished:
    result: TrialResult
    done: int
    total: int


@dataclass(frozen=True)
class TrialEvent:
    """A progress event (``StageStarted``/``Progress``) of the trial ``index`` running in this process
    (``backend="local"``): the trial's own stages (model load, baseline, edits, evaluation) with their
    done/total and ETA.  :meth:`labelled` is the event with its stage named after the trial."""

    index: int
    total: int
    event: Any

    def labelled(self) -> Any:
        return replace(self.event, stage=f"trial {self.index + 1}/{self.total}: {self.event.stage}")


# ===================================================================== loading
def load_sweep(path: Path | str, *, allow_remote_code: bool = True) -> Sweep:
    """Read and validate a sweep file; every problem is a one-line :class:`UserError` at ``file:line``."""
    label = str(path)
    p = Path(path).expanduser()
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise UserError("sweep file not found", label) from None
    except IsADirectoryError:
        raise UserError("is a directory, not a sweep file", label) from None
    except OSError as e:
        raise UserError(f"cannot read the sweep file: {e.strerror or e}", label) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"not UTF-8 text (bad byte at offset {e.start})", label) from None
    return loads_sweep(text, p.absolute(), label=label, allow_remote_code=allow_remote_code)


def loads_sweep(text: str, path: Path | str | None = None, *, label: str | None = None,
                allow_remote_code: bool = True) -> Sweep:
    """Validate a sweep given as TOML text; ``path`` is where it lives (relative paths start there)."""
    from .loader import _toml_error, check_remote_code

    p = Path(path).expanduser().absolute() if path is not None else None
    label = label or (str(path) if path is not None else "<sweep>")
    try:
        root = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise _toml_error(e, label, text) from None
    except ValueError as e:
        raise UserError(f"invalid TOML: {(str(e).splitlines() or ['?'])[0][:120]}", label) from None
    if "sweep" not in root:
        raise UserError("no [sweep] table; a sweep file is a session plus a [sweep] grid, e.g. "
                        '[sweep] method = ["rome", "grace"] (see the README, Sweeps)', label)
    base = parse(_without_sweep(text, root), p, label, keep_doc=False)
    if not allow_remote_code:
        check_remote_code(base)
    c = _SweepChecker(text, label)
    return _build(c, root["sweep"], base, p, label)


def _without_sweep(text: str, root: dict) -> str:
    """``text`` with the ``[sweep]`` tables blanked out line by line (the session's line numbers stay)."""
    want = {k: v for k, v in root.items() if k != "sweep"}
    out, in_sweep, skipping = [], False, False
    depth, ml = 0, None
    for line in text.splitlines():
        fresh = depth == 0 and ml is None
        depth, ml = _lex(line, depth, ml)
        if fresh:
            m = _AOT.match(line) or _TABLE.match(line)
            if m:
                in_sweep = _split(m.group(1))[:1] == ["sweep"]
                skipping = in_sweep
            else:
                kv = _KEYVAL.match(line)
                skipping = in_sweep or bool(kv and _split(kv.group(1))[:1] == ["sweep"])
        out.append("" if skipping else line)
    blanked = "\n".join(out) + "\n"
    try:
        if tomllib.loads(blanked) == want:
            return blanked
    except (tomllib.TOMLDecodeError, ValueError):
        pass
    import tomlkit  # an unusual layout (a multi-line string that looks like a header): line numbers may shift

    doc = tomlkit.parse(text)
    del doc["sweep"]
    return doc.as_string()


class _SweepChecker:
    def __init__(self, text: str, label: str) -> None:
        self.label = label
        self.lines = LineIndex(text)

    def where(self, keypath: tuple) -> str:
        line = self.lines.line(("sweep", *keypath))
        return f"{self.label}:{line}" if line else self.label

    def fail(self, keypath: tuple, message: str) -> NoReturn:
        name = "sweep" + "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in keypath)
        raise UserError(f"{name}: {message}", self.where(keypath))


def _expect_list(c: _SweepChecker, kp: tuple, raw: Any, what: str) -> list:
    if isinstance(raw, dict):
        c.fail(kp, f"expected a non-empty list of {what}, got a table")
    if not isinstance(raw, list):
        c.fail(kp, f"expected a non-empty list of {what}, got {format_value(raw)} "
                   f"(write [{format_value(raw)}] for one value)")
    if not raw:
        c.fail(kp, f"expected a non-empty list of {what}, got []")
    seen: dict[str, int] = {}
    for j, v in enumerate(raw):
        key = json.dumps(v, sort_keys=True, default=str)
        if key in seen:
            c.fail(kp, f"the value {format_value(v)} is listed twice (elements {seen[key] + 1} and {j + 1})")
        seen[key] = j
    return list(raw)


def _check_value(c: _SweepChecker, kp: tuple, key: str, v: Any, element: int | None) -> Any:
    """One value of a grid key (element ``element`` of its list, or an explicit trial's value)."""
    at = f" (element {element + 1})" if element is not None else ""
    if key == "method":
        from unlearn_tui.backends import methods

        if not isinstance(v, str):
            c.fail(kp, f"expected a method name (string), got {format_value(v)}{at}")
        try:
            methods.get(v)
        except UserError as e:
            c.fail(kp, f"{e.message}{at}")
        return v.strip().lower()
    if key == "mode":
        choices = toml_meta(TargetsConfig, "mode")["choices"]
        if not isinstance(v, str) or v not in choices:
            c.fail(kp, f"expected a target mode, one of {', '.join(choices)}; got {format_value(v)}{at}")
        return v
    if key in ("merge_factor", "seed"):
        lo, hi = (1, None) if key == "merge_factor" else (0, SEED_MAX)
        what = f"an integer >= {lo}" if hi is None else f"an integer between {lo} and {hi}"
        if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
            c.fail(kp, f"expected {what}, got {format_value(v)}{at}")
        return v
    if key == "forget":
        if isinstance(v, list):
            if not v or not all(isinstance(x, str) and x.strip() for x in v) or len(set(v)) != len(v):
                c.fail(kp, f"expected a number of items (>= 1) or a non-empty list of distinct item ids, "
                           f"got {format_value(v)}{at}")
            return list(v)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            c.fail(kp, f"expected a number of items (>= 1) or a list of item ids, got {format_value(v)}{at}")
        return v
    if key == "label":
        if not isinstance(v, str) or not v.strip():
            c.fail(kp, f"expected a run label (non-empty string), got {format_value(v)}")
        return v
    raise AssertionError(key)


_WHAT = {"method": "method names", "mode": "target modes", "merge_factor": "integers >= 1",
         "forget": "item counts (or lists of item ids)", "seed": "integers"}


def _number(c: _SweepChecker, raw: dict, key: str, default: float, positive: bool) -> float:
    v = raw.get(key, default)
    ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and (v > 0 if positive
                                                                                          else v >= 0)
    if not ok:
        c.fail((key,), f"expected a number {'> 0' if positive else '>= 0'}, got {format_value(v)}")
    return float(v)


def _check_params(c: _SweepChecker, kp: tuple, method: str, params: dict) -> None:
    """Every key of ``params`` is a parameter of ``method`` with a valid value."""
    from unlearn_tui.backends import methods

    try:
        methods.make(method, params, where="params")
    except UserError as e:
        sub = (e.where or "").split(".", 1)
        at = kp + ((sub[1],) if len(sub) == 2 and sub[1] in params else ())
        c.fail(at, f"{method}: {e.message}")


def _build(c: _SweepChecker, raw: Any, base: Session, path: Path | None, label: str) -> Sweep:
    if not isinstance(raw, dict):
        c.fail((), f"expected a table ([sweep]), got {format_value(raw)}")
    for key in raw:
        if key not in SWEEP_KEYS:
            c.fail((key,), unknown_key_message(key, list(SWEEP_KEYS)))
    product = raw.get("product", True)
    if not isinstance(product, bool):
        c.fail(("product",), f"expected true (multiply the lists) or false (zip them), got {format_value(product)}")
    cpus = _number(c, raw, "cpus_per_trial", 1.0, positive=True)
    gpus = _number(c, raw, "gpus_per_trial", 0.0, positive=False)

    # the grid: key -> checked values, in file order
    grid: dict[str, list] = {}
    for key, v in raw.items():
        if key in GRID_KEYS:
            listed = _expect_list(c, (key,), v, _WHAT[key])
            grid[key] = [_check_value(c, (key,), key, x, j) for j, x in enumerate(listed)]
            if key == "method" and len(set(grid[key])) != len(grid[key]):
                c.fail((key,), f"a method is listed twice: {format_value(listed)}")
    if not product and len({len(v) for v in grid.values()}) > 1:
        first = next(iter(grid))
        for key, v in grid.items():
            if len(v) != len(grid[first]):
                c.fail((key,), f"with product = false every list has the same length (sweep.{first} has "
                               f"{len(grid[first])} values), got {len(v)}")

    # the explicit trials
    explicit: list[dict] = []
    raw_trials = raw.get("trials", [])
    if not isinstance(raw_trials, list) or not all(isinstance(t, dict) for t in raw_trials):
        c.fail(("trials",), f"expected an array of tables ([[sweep.trials]] sections), got {format_value(raw_trials)}")
    if "trials" in raw and not raw_trials:
        c.fail(("trials",), "expected at least one [[sweep.trials]] table, got []")
    for i, t in enumerate(raw_trials):
        kp = ("trials", i)
        values: dict[str, Any] = {}
        for key, v in t.items():
            if key not in TRIAL_KEYS:
                c.fail(kp + (key,), unknown_key_message(key, list(TRIAL_KEYS)))
            if key in grid:
                c.fail(kp + (key,), f"{key} is also swept in sweep.{key}; give it in one place")
            if key == "params":
                if not isinstance(v, dict):
                    c.fail(kp + (key,), f"expected a table of the method's parameters, got {format_value(v)}")
                values[key] = dict(v)
            else:
                values[key] = _check_value(c, kp + (key,), key, v, None)
        explicit.append(values)

    # the methods' params grids
    methods_swept = set(grid.get("method", [])) | {t["method"] for t in explicit if "method" in t}
    if "method" not in grid and any("method" not in t for t in explicit or [{}]):
        methods_swept |= {r.method for r in base.runs}
    pgrid: dict[str, dict[str, list]] = {}
    raw_params = raw.get("params", {})
    if not isinstance(raw_params, dict):
        c.fail(("params",), f"expected tables [sweep.params.METHOD] of FIELD = [values], "
                            f"got {format_value(raw_params)}")
    if raw_params and not product:
        c.fail(("params",), "with product = false, give per-trial params in [[sweep.trials]] (params = {...})")
    for name, fields in raw_params.items():
        kp = ("params", name)
        m = _check_value(c, kp, "method", name, None)
        if m not in methods_swept:
            c.fail(kp, f"{m} is not a method of this sweep (its methods: {', '.join(sorted(methods_swept))})")
        if not isinstance(fields, dict):
            c.fail(kp, f"expected a table of FIELD = [values], got {format_value(fields)}")
        if not fields:
            c.fail(kp, "expected at least one FIELD = [values], got an empty table")
        pgrid[m] = {}
        for fname, vals in fields.items():
            values_list = _expect_list(c, kp + (fname,), vals, f"{m} {fname} values")
            for x in values_list:
                _check_params(c, kp, m, {fname: x})
            pgrid[m][fname] = values_list

    # every combination
    keys = list(grid)
    if product:
        combos = [dict(zip(keys, vals)) for vals in itertools.product(*(grid[k] for k in keys))]
    else:
        n = len(next(iter(grid.values()))) if grid else 1
        combos = [{k: grid[k][j] for k in keys} for j in range(n)]
    trials: list[Trial] = []
    seen: dict[str, int] = {}
    for ti, t in enumerate(explicit or [{}]):
        origin = ("trials", ti) if explicit else ()
        for combo in combos:
            values = {**t, **combo}
            if "method" in values:
                runs = [_run_for(base, values["method"])]
            else:
                runs = [copy.deepcopy(r) for r in base.runs]
            for run in runs:
                tparams = values.get("params") or {}
                if tparams:
                    _check_params(c, origin + ("params",), run.method, {**run.params, **tparams})
                for pv in _param_combos(pgrid.get(run.method, {})):
                    trial = _resolve(c, base, run, values, tparams, pv, path, label, len(trials), origin)
                    if trial.hash in seen:
                        c.fail(origin, f"trials {seen[trial.hash] + 1} and {len(trials) + 1} are the same run "
                                       f"({trial.label}); list each value once")
                    seen[trial.hash] = len(trials)
                    trials.append(trial)
    axes = tuple(k for k in dict.fromkeys(k for t in trials for k in t.values)
                 if len({json.dumps(t.values.get(k), sort_keys=True, default=str) for t in trials}) > 1)
    return Sweep(path, label, base, product, cpus, gpus, axes, trials)


def _run_for(base: Session, method: str) -> RunConfig:
    """A run of ``method``: the params of the session's first run of that method (else the defaults)."""
    for r in base.runs:
        if r.method == method:
            return RunConfig(method=method, params=copy.deepcopy(r.params), label=None)
    return RunConfig(method=method, params={}, label=None)


def _param_combos(grid: dict[str, list]) -> list[dict]:
    keys = list(grid)
    return [dict(zip(keys, vals)) for vals in itertools.product(*(grid[k] for k in keys))]


def _resolve(c: _SweepChecker, base: Session, run: RunConfig, values: dict, tparams: dict, pv: dict,
             path: Path | None, label: str, index: int, origin: tuple) -> Trial:
    s = copy.deepcopy(base)
    if "mode" in values:
        s.targets.mode = values["mode"]
    if "merge_factor" in values:
        s.targets.merge_factor = values["merge_factor"]
    if "seed" in values:
        s.targets.seed = values["seed"]
    if "forget" in values:
        s.data.forget = copy.deepcopy(values["forget"])
    params = {**run.params, **tparams, **pv}
    s.runs = [RunConfig(method=run.method, params=params, label=values.get("label", run.label))]
    text = _session_text(s)
    tlabel = f"{label} (trial {index + 1})"
    try:
        checked = parse(text, path, tlabel, with_lines=False, keep_doc=False)
    except UserError as e:
        c.fail(origin, f"trial {index + 1} ({_describe(s)}): {e.message}")
    resolved = {"method": run.method}
    if run.label or "label" in values:
        resolved["label"] = values.get("label", run.label)
    resolved.update({"mode": s.targets.mode, "merge_factor": s.targets.merge_factor, "forget": s.data.forget,
                     "seed": s.targets.seed})
    resolved.update({f"params.{k}": v for k, v in {**tparams, **pv}.items()})
    return Trial(index, resolved, checked, trial_hash(checked))


def _describe(s: Session) -> str:
    r = s.runs[0]
    return (f"method={r.method} mode={s.targets.mode} merge_factor={s.targets.merge_factor} "
            f"forget={_short(s.data.forget)} seed={s.targets.seed}")


def _session_text(s: Session) -> str:
    from .writer import _fresh

    return str(_fresh(to_plain(s)).as_string())


def trial_hash(session: Session) -> str:
    """What names a trial's result: the hash of its complete session (plain form) and the format."""
    plain = to_plain(session)
    plain.get("eval", {}).pop("results", None)     # where the app keeps results: not part of the run
    blob = json.dumps({"format": SWEEP_FORMAT, "session": plain}, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _short(v: Any) -> str:
    if isinstance(v, list):
        return f"[{len(v)} ids]" if v and all(isinstance(x, str) for x in v) else json.dumps(v)
    return v if isinstance(v, str) else json.dumps(v, default=str)


def _cell(v: Any) -> Any:
    return json.dumps(v, default=str) if isinstance(v, (list, dict)) else v


# ===================================================================== one trial (in a worker process)
_HANDLE: list = []          # [(key, handle)]: the model this process loaded last, reused by its next trials


def _model_key(session: Session) -> str:
    """What names the loaded model: the session's whole [model] table, a file or folder name resolved."""
    plain = dict(to_plain(session)["model"])
    name = session.model.name
    if not name.startswith("tiny:") and (name.startswith((".", "~", "/")) or Path(name).suffix == ".gguf"
                                         or session.resolve(name).exists()):
        plain["name"] = str(session.resolve(name))
    return json.dumps(plain, sort_keys=True, default=str)


def _handle_for(session: Session, on_event: Any, cancel: CancelToken | None) -> tuple[Any, bool]:
    """The model of ``session``: the one this process loaded for an earlier trial, else loaded now."""
    key = _model_key(session)
    if _HANDLE and _HANDLE[0][0] == key:
        return _HANDLE[0][1], False
    _HANDLE.clear()                      # one model per process: the last one
    from unlearn_tui.backends.model import load

    handle = load(session.model, on_event, cancel, base_dir=session.base_dir())
    _HANDLE.append((key, handle))
    return handle, True


def _one_line(exc: BaseException) -> str:
    text = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
    text = " ".join(text.split()) or type(exc).__name__
    return text if len(text) <= 400 else text[:397] + "..."


def execute_trial(text: str, path: str | None, label: str, on_event: Any = ignore,
                  cancel: CancelToken | None = None) -> dict[str, Any]:
    """Run one trial (its session as TOML ``text``) headlessly; never raises but :class:`Cancelled`.

    Returns ``status``, ``error``, ``run`` (the run's ``replay --out --items`` fields: its summary and every
    item's generation), ``baseline``, ``seconds``,
    ``pid`` and ``loaded_model``.
    """
    from unlearn_tui.backends import runner

    t0 = time.perf_counter()
    out: dict[str, Any] = {"status": "error", "error": None, "run": None, "baseline": None, "pid": os.getpid(),
                           "loaded_model": None}
    try:
        session = parse(text, Path(path) if path else None, label, with_lines=False, keep_doc=False)
        handle, out["loaded_model"] = _handle_for(session, on_event, cancel)
        result = runner.run(session, on_event, cancel, handle=handle)
        # with every item's generation (``run.items``): what a reader labels (e.g. refusals at the paper's scale)
        js = result.to_json(items=True)
        out.update(status="ok", run=js["runs"][0], baseline=js["baseline"])
    except BaseException as exc:
        if not isinstance(exc, Exception) or isinstance(exc, Cancelled):   # stopped half-way (a Ray task cancelled)
            _HANDLE.clear()
            raise
        if not isinstance(exc, UserError):
            _HANDLE.clear()      # the model may be in any state: the next trial loads it again
        out["error"] = _one_line(exc)
    out["seconds"] = time.perf_counter() - t0
    return _finite(out)


# Cancelling a Ray sweep.  ``ray.cancel(force=True)`` of a task whose reply is already on its way crashes the
# driver in Ray 2.60 (a failed internal check, "Tried to complete task that was not pending", and the process
# aborts: the app or the CLI dies, and pytest died silently in CI).  So a sweep is cancelled cooperatively: the
# driver creates a named actor (:class:`CancelFlag`, no CPU; its existence is the flag, so a sweep that is not
# cancelled starts no extra process), each trial's watcher thread looks it up every CANCEL_POLL_S seconds and
# cancels the trial's own token, and the trial stops at its next progress step with its weights restored (as
# a cancel in the app does).  Only a trial that has not stopped after CANCEL_GRACE_S seconds (stuck in one
# long call) is force-cancelled, and its worker is not reused.
CANCEL_POLL_S = 0.25
CANCEL_GRACE_S = 30.0


class CancelFlag:
    """The sweep's cancel flag: a Ray actor named after the sweep, created when the sweep is cancelled."""

    def ping(self) -> bool:
        return True


def _flag_is_set(ray: Any, name: str) -> bool:
    try:
        ray.get_actor(name)
    except ValueError:   # no such actor: not cancelled
        return False
    return True


def _watch(name: str, token: CancelToken, stop: threading.Event) -> None:
    """Cancel ``token`` once the sweep's flag ``name`` exists (or cannot be looked up: the driver is gone)."""
    import ray

    while not stop.wait(CANCEL_POLL_S):
        try:
            if not _flag_is_set(ray, name):
                continue
        except Exception:
            pass
        token.cancel()
        return


def _ray_trial(text: str, path: str | None, label: str, threads: int, flag: str | None = None) -> dict[str, Any]:
    """The Ray task: :func:`execute_trial` in a worker process (torch on ``threads`` threads), cancelled
    through the sweep's flag named ``flag`` (:class:`CancelFlag`)."""
    cancel = CancelToken()
    stop = threading.Event()
    if flag is not None:
        import ray

        if _flag_is_set(ray, flag):
            raise Cancelled("the sweep was cancelled")
        threading.Thread(target=_watch, args=(flag, cancel, stop), daemon=True, name="sweep-cancel").start()
    try:
        import torch

        if threads > 0 and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
    except Exception:   # torch is only a speed setting here
        pass
    _quiet()
    try:
        return execute_trial(text, path, label, cancel=cancel)
    finally:
        stop.set()


def _quiet() -> None:
    import logging
    import warnings

    for category in (DeprecationWarning, FutureWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)
    for name in ("transformers", "torch", "huggingface_hub", "accelerate", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _finite(v: Any) -> Any:
    """NaN and infinities as None (JSON has neither); numpy/torch scalars as numbers."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    if v is None or isinstance(v, (str, int, bool)):
        return v
    item = getattr(v, "item", None)
    if callable(item):
        try:
            return _finite(item())
        except (TypeError, ValueError, RuntimeError):
            pass
    return str(v)


# ===================================================================== the sweep
_RAY_ENV = ("UNLEARN_TUI_", "HF_", "TRANSFORMERS_", "TOKENIZERS_PARALLELISM", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
            "PYTHONPATH")


def ray_init_kwargs(num_cpus: int | None = None, address: str | None = None) -> dict[str, Any]:
    """The arguments :func:`run_sweep` gives ``ray.init``: quiet, no dashboard, and (local) the environment of
    this process (cache and data folders, offline switches) for the workers."""
    kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "ignore_reinit_error": True,
                          "configure_logging": False}
    if address:
        kw["address"] = address
        return kw
    env = {k: v for k, v in os.environ.items() if k.startswith(_RAY_ENV)}
    kw.update(num_cpus=num_cpus or os.cpu_count() or 1, object_store_memory=200 * 1024 ** 2,
              runtime_env={"env_vars": env})
    return kw


def _ray_env_defaults() -> None:
    """No usage statistics; a trial of ``gpus_per_trial = 0`` sees no GPU (CUDA_VISIBLE_DEVICES empty), so it
    never runs on a GPU Ray did not give it."""
    for k, v in (("RAY_USAGE_STATS_ENABLED", "0"), ("RAY_DISABLE_IMPORT_WARNING", "1"),
                 ("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "1"), ("RAY_DEDUP_LOGS", "0")):
        os.environ.setdefault(k, v)


def _import_ray() -> Any:
    _ray_env_defaults()
    import ray

    return ray


def init_ray(num_cpus: int | None = None, address: str | None = None) -> Any:
    """Start a local Ray of ``num_cpus`` CPUs (or join ``address``) as :func:`run_sweep` does; returns the
    ``ray`` module.  A Ray started by the caller is used by :func:`run_sweep` and left running (several sweeps,
    one start).  ImportError without Ray."""
    import logging

    ray = _import_ray()
    # a local cluster gets token authentication (Ray's default), without Ray's notice saying so
    notice = logging.getLogger("ray._private.authentication.authentication_token_setup")
    level = notice.level
    notice.setLevel(logging.ERROR)
    try:
        ray.init(**ray_init_kwargs(num_cpus, address))
    finally:
        notice.setLevel(level)
    return ray


def run_sweep(sweep: Sweep, out_dir: Path | str | None = None, on_event: Callable[[Any], None] = ignore,
              cancel: CancelToken | None = None, address: str | None = None, backend: str = "ray",
              num_cpus: int | None = None) -> list[TrialResult]:
    """Run every trial not finished under ``out_dir`` yet; returns the results in trial order.

    ``backend="ray"``: Ray tasks (a local ``ray.init`` of ``num_cpus`` CPUs, or the cluster at ``address``; a Ray
    already initialised in this process is used as it is and left running); without Ray installed, the trials
    run one after another in this process, and a warning (:class:`~backends.events.Log`) says so.
    ``backend="local"``: that, always.  Events: :class:`SweepStarted`, ``StageStarted``/``Progress`` of the
    stage ``"sweep"`` (done/total, ETA), :class:`TrialFinished` per trial, and for trials run in this
    process their own stages wrapped in :class:`TrialEvent`.  Raises :class:`Cancelled` when
    ``cancel`` is set (the finished trials are kept under ``out_dir``).
    """
    if backend not in ("ray", "local"):
        raise ValueError(f"backend must be 'ray' or 'local', got {backend!r}")
    cancel = cancel or CancelToken()
    trials = sweep.trials()
    out = Path(out_dir).expanduser() if out_dir is not None else None
    results: dict[str, TrialResult] = {}
    if out is not None and (out / TRIALS_DIR).is_dir():
        for t in trials:
            earlier = _read_record(out / TRIALS_DIR / f"{t.hash}.json", t)
            if earlier is not None:
                results[t.hash] = earlier
    pending = [t for t in trials if t.hash not in results]
    ray = None
    if backend == "ray" and pending:
        try:
            ray = _import_ray()
        except ImportError:
            if address:
                raise UserError("joining a Ray cluster needs Ray: pip install 'unlearn-tui[ray]'",
                                "--address") from None
            on_event(Log(f"Ray is not installed (pip install 'unlearn-tui[ray]'): running the {len(pending)} "
                         "trial(s) one after another in this process", "warning"))
    if out is not None:
        (out / TRIALS_DIR).mkdir(parents=True, exist_ok=True)
    used = "ray" if ray is not None else "local"
    on_event(SweepStarted(len(trials), len(results), used,
                          f"{len(pending)} to run, {len(results)} finished before" if results else ""))
    on_event(StageStarted("sweep", len(trials), f"{len(trials)} trials"))
    t0 = time.monotonic()
    ran = 0

    def finish(tr: TrialResult) -> None:
        nonlocal ran
        results[tr.trial.hash] = tr
        ran += 1
        if out is not None:
            _write_record(out, tr)
            _write_results(out, trials, results)
        done = len(results)
        elapsed = time.monotonic() - t0
        eta = elapsed / ran * (len(trials) - done) if ran else None
        on_event(Progress("sweep", done, len(trials), eta, elapsed, detail=sweep.describe(tr.trial)))
        on_event(TrialFinished(tr, done, len(trials)))

    kept = 0
    for t in trials:          # what an earlier run finished, first
        if t.hash in results:
            kept += 1
            on_event(TrialFinished(results[t.hash], kept, len(trials)))
    try:
        if ray is not None:
            _run_ray(ray, sweep, pending, finish, cancel, address, num_cpus)
        else:
            for t in pending:
                cancel.check()

                def inner(e: Any, t: Trial = t) -> None:   # the trial's own stages, for the caller's progress
                    if isinstance(e, (StageStarted, Progress)):
                        on_event(TrialEvent(t.index, len(trials), e))

                rec = execute_trial(t.toml(), str(t.session.path) if t.session.path else None,
                                    f"{sweep.label} (trial {t.index + 1})", on_event=inner, cancel=cancel)
                finish(_from_dict(t, rec))
    finally:
        if out is not None:
            _write_results(out, trials, results)
    if len(trials) and not pending:
        on_event(Progress("sweep", len(trials), len(trials), 0.0, time.monotonic() - t0))
    return [results[t.hash] for t in trials if t.hash in results]


def _is_cancelled(exc: BaseException) -> bool:
    """Whether a Ray task's error is a trial stopped by the sweep's cancel (ours or Ray's own)."""
    text = f"{type(exc).__name__} {exc}"
    return "Cancelled" in text or "TaskCancelledError" in text


def _stop_trials(ray: Any, name: str, refs: dict, collect: Callable[..., None]) -> Any:
    """Set the cancel flag (create the actor ``name``), let the trials in flight stop (or finish: their
    results are kept) for up to :data:`CANCEL_GRACE_S` seconds, and force-cancel only those still running
    then.  Returns the flag's actor handle (None if it could not be created) for the caller to kill."""
    flag = None
    try:
        flag = ray.remote(num_cpus=0)(CancelFlag).options(name=name).remote()
    except Exception:
        pass
    deadline = time.monotonic() + CANCEL_GRACE_S
    while refs and time.monotonic() < deadline:
        try:
            ready, _ = ray.wait(list(refs), num_returns=1, timeout=0.5)
        except BaseException:   # a second interrupt: stop waiting
            break
        for ref in ready:
            try:
                collect(ref, stopping=True)
            except BaseException:   # recording a late result must not hide why the sweep stopped
                refs.pop(ref, None)
    for ref in list(refs):   # stuck in one long call: force (the worker is not used again)
        try:
            ray.cancel(ref, force=True)
        except Exception:
            pass
    return flag


def _run_ray(ray: Any, sweep: Sweep, pending: Sequence[Trial], finish: Callable[[TrialResult], None],
             cancel: CancelToken, address: str | None, num_cpus: int | None) -> None:
    started = not ray.is_initialized()
    if started:
        init_ray(num_cpus, address)
    import uuid

    name, flag = f"unlearn-tui-sweep-cancel-{uuid.uuid4().hex}", None
    try:
        task = ray.remote(_ray_trial).options(num_cpus=sweep.cpus_per_trial, num_gpus=sweep.gpus_per_trial,
                                               max_retries=0)
        threads = max(1, int(sweep.cpus_per_trial))
        refs = {task.remote(t.toml(), str(t.session.path) if t.session.path else None,
                            f"{sweep.label} (trial {t.index + 1})", threads, name): t for t in pending}

        def collect(ref: Any, stopping: bool = False) -> None:
            t = refs.pop(ref)
            try:
                rec = ray.get(ref)
            except Exception as exc:   # the worker died (out of memory, a crash): the trial failed
                if stopping and _is_cancelled(exc):   # stopped by the cancel: not a result
                    return
                rec = {"status": "error", "error": "the Ray task failed: " + _one_line(exc).split("\n")[0],
                       "seconds": 0.0}
            finish(_from_dict(t, rec))

        try:
            while refs:
                ready, _ = ray.wait(list(refs), num_returns=1, timeout=0.5)
                if cancel.cancelled:
                    raise Cancelled("cancelled by the user")
                for ref in ready:
                    collect(ref)
        except BaseException:   # cancelled or interrupted: the trials still running are stopped
            flag = _stop_trials(ray, name, refs, collect)
            raise
    finally:
        if flag is not None:
            try:
                ray.kill(flag)
            except Exception:
                pass
        if started:
            ray.shutdown()


# ===================================================================== --out
def _from_dict(t: Trial, rec: dict, cached: bool = False) -> TrialResult:
    return TrialResult(t, str(rec.get("status") or "error"), rec.get("error"), rec.get("run"), rec.get("baseline"),
                       float(rec.get("seconds") or rec.get("trial_seconds") or 0.0), cached, rec.get("pid"),
                       rec.get("loaded_model"))


def _read_record(p: Path, t: Trial) -> TrialResult | None:
    """A finished trial's record (None: absent, unreadable, of another format, or a failure: run it again)."""
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != SWEEP_FORMAT or data.get("hash") != t.hash \
            or data.get("status") != "ok":
        return None
    run = {k: v for k, v in data.items() if k not in ("format", "trial", "hash", "status", "error", "baseline",
                                                      "trial_seconds", "pid", "loaded_model")}
    rec = {"status": "ok", "run": run, "baseline": data.get("baseline"), "seconds": data.get("trial_seconds"),
           "pid": data.get("pid"), "loaded_model": data.get("loaded_model")}
    return _from_dict(t, rec, cached=True)


def _write_record(out: Path, tr: TrialResult) -> None:
    from unlearn_tui.backends.fileio import atomic_write

    atomic_write(out / TRIALS_DIR / f"{tr.trial.hash}.json",
                 json.dumps(_finite(tr.record()), indent=1, allow_nan=False, default=str) + "\n")


def results_jsonl(results: Sequence[TrialResult]) -> str:
    return "".join(json.dumps(_finite(r.line()), allow_nan=False, default=str) + "\n" for r in results)


def results_csv(results: Sequence[TrialResult]) -> str:
    rows = [r.row() for r in results]
    cols = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: _csv_value(row.get(k)) for k in cols})
    return buf.getvalue()


def _csv_value(v: Any) -> Any:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    return v


def _write_results(out: Path, trials: Sequence[Trial], results: dict[str, TrialResult]) -> None:
    from unlearn_tui.backends.fileio import atomic_write

    done = [results[t.hash] for t in trials if t.hash in results]
    atomic_write(out / RESULTS_JSONL, results_jsonl(done))
    atomic_write(out / RESULTS_CSV, results_csv(done))

