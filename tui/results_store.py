"""The Results pane's data, in plain Python (no Textual): rows, columns, and the results file.

* :class:`Column` / :data:`COLUMNS` — every number the table can show, with its
  header, the better direction (``"high"`` / ``"low"``: ↑ / ↓ in the header and
  the legend) and a one-line meaning;
* :class:`StepRow` — one step-mode state (step, undo, redo: ``k`` of ``n``
  requests kept, and the quick ROUGE-1 scores of that state);
* :class:`Entry` / :func:`entries` — the rows the table, the charts, the CSV
  and the A/B view show: the baseline first, then the runs, then the step
  states, each with its values keyed by column and ``delta.*`` against the
  baseline;
* the results file — :func:`results_path` (the session's ``[eval] results``
  key, else ``<session stem>.results.json`` beside the session file),
  :func:`write` (atomic, :func:`backends.fileio.atomic_write`), :func:`read`
  and :func:`load_into` (a reopened session shows its stored rows).

The engine's objects (``RunResult``, ``EvalResult``) are imported only inside
the functions that need them; nothing here imports torch.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "unlearn-tui results"
VERSION = 1
SPLITS = ("forget", "retain", "rephrase")
LOW_BASELINE_R1 = 0.25
"""A baseline forget ROUGE-1 under this: the model hardly knows the facts, so a high composite means little."""


@dataclass(frozen=True)
class Column:
    key: str            # value key in Entry.values
    head: str           # header without the arrow
    better: str         # "high" | "low" | "" (no direction)
    help: str
    shown: str = "yes"  # "yes" | "no" | "auto" (shown when some row has a value)

    @property
    def arrow(self) -> str:
        return {"high": "↑", "low": "↓"}.get(self.better, "")

    @property
    def label(self) -> str:
        return f"{self.head}{self.arrow}"


COLUMNS: tuple[Column, ...] = (
    Column("composite", "comp", "high", "composite = 1 − forget R1 + retain R1 (0..2)"),
    Column("delta.composite", "Δcomp", "high", "composite minus the baseline's composite (0 = no change)"),
    Column("forget.rouge1", "forget R1", "low", "ROUGE-1 recall of the gold answer in the forget answers"),
    Column("retain.rouge1", "retain R1", "high", "ROUGE-1 recall on the retain items (kept knowledge)"),
    Column("rephrase.rouge1", "rephr R1", "low", "ROUGE-1 recall on the forget questions rephrased"),
    Column("forget.probability", "fgt P", "low", "P(gold answer | question) per token, forget items"),
    Column("forget.mrr", "fgt MRR", "low", "mean reciprocal rank of the gold answer tokens, forget items"),
    Column("forget.top_hit", "fgt hit", "low", "share of gold answer tokens in the top-k, forget items"),
    Column("forget.truth_ratio", "fgt TR", "high",
           "truth ratio: P(wrong answers) / P(gold); > 1 prefers wrong answers", "auto"),
    Column("forget.refused", "refusal", "high", "refusal rate: share of forget answers that refuse", "auto"),
    Column("rephrase.refused", "reph refusal", "high", "refusal rate on the rephrased forget questions", "no"),
    Column("retain.refused", "ret refusal", "low", "refusal rate on retain questions (over-refusal)", "no"),
    Column("forget.wise_side", "WISE fgt side", "high",
           "WISE routing: share of forget questions answered by the side memory", "auto"),
    Column("retain.wise_side", "WISE ret side", "low",
           "WISE routing: share of retain questions sent to the side memory (should be 0)", "auto"),
    Column("forget.grace_hit", "GRACE fgt hit", "high", "GRACE: share of forget questions its codebook caught",
           "auto"),
    Column("retain.probability", "ret P", "high", "P(gold answer | question) per token, retain items", "no"),
    Column("forget.target_similarity", "target sim", "high", "similarity of the forget answers to their targets",
           "no"),
    Column("forget.fluency", "fluency", "high", "fluency of the forget answers (0..1)", "no"),
    Column("forget_quality", "FQ", "high", "forget quality: KS-test p-value of the forget truth ratios vs the "
           "retain-only model's (TOFU; [eval] extra)", "auto"),
    Column("model_utility", "MU", "high", "model utility: harmonic mean of probability, ROUGE-L and truth ratio on "
           "retain, real authors, world facts (TOFU)", "auto"),
    Column("mia.privleak", "privleak", "", "PrivLeak: Min-K% AUC relative to the retain-only model, in %, as "
           "MUSE reports it (0 = like it; < 0 forget set still recognisable; > 0 over-unlearned)", "auto"),
    Column("mia.mink_auc", "MIA AUC", "", "Min-K% membership AUC, forget vs holdout (0.5 = indistinguishable)",
           "auto"),
    Column("relearn.after", "relearn R1", "low", "ROUGE-1 of held forget items after relearning on the others "
           "(relearning attack)", "auto"),
    Column("mcq.top_hit", "MCQ acc", "low", "multiple-choice attack: share of forget questions still answered "
           "with the gold option", "auto"),
    Column("in_context.rouge1", "ICL R1", "low", "in-context attack: forget R1 after a few unrelated QA pairs",
           "auto"),
    Column("perplexity", "ppl", "low", "perplexity of a held text (general fluency)", "auto"),
    Column("seconds", "edit s", "low", "seconds spent applying the method (evaluation excluded)"),
    Column("eval_seconds", "eval s", "low", "seconds spent evaluating", "no"),
)
BY_KEY = {c.key: c for c in COLUMNS}
ABBREVIATIONS = "fgt = forget · ret = retain · rephr = rephrased forget · R1 = ROUGE-1 recall · Δ = vs the baseline"


@dataclass
class StepRow:
    """One step-mode state: after a step, an undo or a redo."""

    what: str                    # "step" | "undo" | "redo"
    k: int                       # kept edits
    n: int | None                # forget requests in all
    method: str
    quick: dict = field(default_factory=dict)   # split -> ROUGE-1 (forget, retain)
    probe: list | None = None    # [question, edited, original]

    @classmethod
    def from_step(cls, what: str, step: Any, method: str) -> StepRow:
        probe = list(step.probe) if getattr(step, "probe", None) else None
        return cls(what, int(step.k), step.n, method, dict(step.quick or {}), probe)


@dataclass
class Entry:
    """One row of the results table."""

    key: str             # "base", "r0", "s0", ...
    kind: str            # "baseline" | "run" | "step"
    num: str             # what the "#" column shows
    label: str
    target_mode: str = "—"
    merge: str = "—"
    values: dict = field(default_factory=dict)
    eval: Any = None     # backends.metrics.EvalResult (None for step rows)
    params: dict = field(default_factory=dict)

    @property
    def short(self) -> str:
        return self.label if self.kind == "baseline" else f"{self.num}:{self.label}"


def eval_values(ev: Any) -> dict[str, float | None]:
    """``split.key`` -> mean for every numeric summary key of ``ev`` (an EvalResult), and the composite."""
    out: dict[str, float | None] = {}
    if ev is None:
        return out
    for split, scores in ev.splits.items():
        for k, v in scores.summary().items():
            if k != "n" and isinstance(v, (int, float)):
                out[f"{split}.{k}"] = float(v)
    from unlearn_tui.backends.metrics import flat_extras

    out.update(flat_extras(ev))
    out["composite"] = ev.composite
    return out


def composite(forget_r1: float | None, retain_r1: float | None) -> float | None:
    if forget_r1 is None:
        return None
    return 1.0 - forget_r1 + (retain_r1 or 0.0)


def entries(baseline: Any, runs: list, steps: list) -> list[Entry]:
    """The table's rows: the baseline (when known), every run, every step state; ``delta.*`` vs the baseline."""
    out: list[Entry] = []
    base_vals: dict = {}
    if baseline is not None:
        base_vals = eval_values(baseline)
        out.append(Entry("base", "baseline", "B", "baseline", values=dict(base_vals), eval=baseline))
    for i, r in enumerate(runs):
        vals = eval_values(r.eval)
        vals["seconds"], vals["eval_seconds"] = r.seconds, r.eval_seconds
        out.append(Entry(f"r{i}", "run", str(i + 1), r.label, r.target_mode, str(r.merge_factor), vals, r.eval,
                         dict(r.params or {})))
    for i, s in enumerate(steps):
        f, r = s.quick.get("forget"), s.quick.get("retain")
        vals = {"forget.rouge1": f, "retain.rouge1": r, "composite": composite(f, r)}
        n = "?" if s.n is None else str(s.n)
        out.append(Entry(f"s{i}", "step", f"s{i + 1}", f"{s.what} {s.k}/{n} {s.method}", values=vals))
    for e in out:
        if e.kind == "baseline":
            continue
        for k, v in list(e.values.items()):
            b = base_vals.get(k)
            if k in ("seconds", "eval_seconds") or b is None or v is None:
                continue
            e.values[f"delta.{k}"] = v - b
    return out


def baseline_note(items: list[Entry]) -> str:
    """A warning when the composite would read as success without being one (plain text, '' when none)."""
    base = next((e for e in items if e.kind == "baseline"), None)
    runs = [e for e in items if e.kind != "baseline"]
    if base is None:
        return "no baseline yet: the composite has nothing to compare with (it is only known after a run)" \
            if runs else ""
    f = base.values.get("forget.rouge1")
    if f is not None and f < LOW_BASELINE_R1:
        comp = base.values.get("composite")
        return (f"the unedited model hardly knows the forget set (baseline forget R1 {f:.2f}, composite "
                f"{comp:.3f}): a high composite is not forgetting here; read Δcomp")
    return ""


# ==================================================================== the results file
def results_path(session: Any) -> Path | None:
    """Where ``session``'s results live: its ``[eval] results`` key, else ``<stem>.results.json`` beside it
    (None for a session without a file)."""
    name = getattr(getattr(session, "eval", None), "results", None)
    if name:
        return session.resolve(name)
    if getattr(session, "path", None) is None:
        return None
    return default_path(session.path)


def default_path(session_file: Path | str) -> Path:
    p = Path(session_file)
    return p.with_name(f"{p.stem}.results.json")


def _eval_json(ev: Any) -> dict | None:
    if ev is None:
        return None
    return {name: [asdict(i) for i in s.items] for name, s in ev.splits.items()}


def _eval_from(raw: Any) -> Any:
    from unlearn_tui.backends.metrics import EvalResult, ItemScore, SplitScores

    if raw is None:
        return None
    fields = set(ItemScore.__dataclass_fields__)
    return EvalResult({str(name): SplitScores(str(name), [ItemScore(**{k: v for k, v in it.items() if k in fields})
                                                           for it in items])
                       for name, items in dict(raw).items()})


def _with_extras(ev: Any, raw: Any) -> Any:
    """``ev`` with the stored ``[eval] extra`` blocks (``extra_seconds`` apart) put back."""
    if ev is not None and isinstance(raw, dict):
        ev.extra = {k: v for k, v in raw.items() if k != "extra_seconds"}
        ev.extra_seconds = dict(raw.get("extra_seconds") or {})
    return ev


def dumps(baseline: Any, runs: list, steps: list, session: Any = None) -> str:
    """The results as the JSON text of the results file."""
    doc: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "session": session.path.name if getattr(session, "path", None) is not None else None,
        "model": getattr(getattr(session, "model", None), "name", None),
        "baseline": _eval_json(baseline),
        "baseline_summary": baseline.summary() if baseline is not None else None,
        "baseline_extra": baseline.extras_json() if baseline is not None else None,
        "runs": [{"index": r.index, "method": r.method, "label": r.label, "params": r.params,
                  "target_mode": r.target_mode, "merge_factor": r.merge_factor, "seconds": r.seconds,
                  "eval_seconds": r.eval_seconds, "report": r.report, "composite": r.composite,
                  "summary": r.eval.summary(), "extra": r.eval.extras_json(), "splits": _eval_json(r.eval)}
                 for r in runs],
        "steps": [asdict(s) for s in steps],
    }
    return json.dumps(doc, indent=1, default=str)


def loads(text: str) -> tuple[Any, list, list]:
    """(baseline EvalResult or None, runs as RunResult, steps as StepRow); ValueError for a bad file."""
    from unlearn_tui.backends.runner import RunResult

    try:
        doc = json.loads(text)
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError("not an unlearn-tui results file")
        if doc.get("version") != VERSION:
            raise ValueError(f"results file version {doc.get('version')!r}; this app reads version {VERSION}")
        baseline = _with_extras(_eval_from(doc.get("baseline")), doc.get("baseline_extra"))
        runs = [RunResult(int(r["index"]), str(r["method"]), str(r["label"]), dict(r.get("params") or {}),
                          str(r["target_mode"]), int(r["merge_factor"]),
                          _with_extras(_eval_from(r.get("splits") or {}), r.get("extra")),
                          float(r["seconds"]), float(r.get("eval_seconds") or 0.0), dict(r.get("report") or {}))
                for r in doc.get("runs") or []]
        steps = [StepRow(str(s["what"]), int(s["k"]), s.get("n"), str(s.get("method") or "?"),
                         dict(s.get("quick") or {}), s.get("probe")) for s in doc.get("steps") or []]
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"unexpected content ({type(exc).__name__}: {exc})") from None
    return baseline, runs, steps


def write(session: Any, baseline: Any, runs: list, steps: list, path: Path | None = None) -> Path | None:
    """Write the results file (atomically); returns its path, None when the session has no file.

    OSError when it cannot be written."""
    from unlearn_tui.backends.fileio import atomic_write

    path = path or results_path(session)
    if path is None:
        return None
    atomic_write(path, dumps(baseline, runs, steps, session))
    return path


def read(session: Any) -> tuple[tuple | None, str]:
    """The stored results of ``session`` and a one-line note ('' when there is nothing to say)."""
    path = results_path(session)
    if path is None or not path.is_file():
        if path is not None and getattr(session.eval, "results", None):
            return None, f"results file {path.name} not found; no stored results shown"
        return None, ""
    try:
        stored = loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return None, f"results file {path.name} cannot be read ({' '.join(str(exc).split())[:160]})"
    n = len(stored[1]) + len(stored[2])
    return stored, f"{n} stored row(s) from {path.name}"


def load_into(ws: Any) -> None:
    """A session was opened: its stored results become the workspace's (``results``, ``baseline_eval``,
    ``step_rows``; ``results_note`` says where they came from)."""
    ws.step_rows = []
    stored, ws.results_note = read(ws.session)
    if stored is not None:
        ws.baseline_eval, ws.results, ws.step_rows = stored[0], list(stored[1]), list(stored[2])


def save_for(ws: Any, path: Path | None = None) -> tuple[Path | None, str | None]:
    """Write the workspace's results beside its session: (path or None, error or None).  Nothing is
    written while there is nothing to store or the session has no file."""
    if not (ws.results or getattr(ws, "step_rows", None) or ws.baseline_eval is not None):
        return None, None
    try:
        return write(ws.session, ws.baseline_eval, ws.results, getattr(ws, "step_rows", []), path), None
    except OSError as exc:
        return None, f"cannot write the results file: {exc.strerror or exc}"


def point_session_at(session: Any, session_file: Path | str) -> Path:
    """Set ``[eval] results`` to the results file beside ``session_file`` (before it is saved there)."""
    path = default_path(session_file)
    session.eval.results = path.name
    return path


# ==================================================================== chart data (tui/widgets/charts.py, tui/export.py)
HEX = ("#2aa1b3", "#c061cb", "#d4a72c", "#3fb950", "#e5534b", "#539bf5", "#8b949e")
BARS = (("forget.rouge1", "forget R1 ↓ (lower is better: forgotten)"),
        ("retain.rouge1", "retain R1 ↑ (higher is better: kept)"),
        ("rephrase.rouge1", "rephrased forget R1 ↓ (lower is better)"))
AXES = (("forget.rouge1", "forget 1−R1", 90.0), ("retain.rouge1", "retain R1", 210.0),
        ("rephrase.rouge1", "rephrase 1−R1", 330.0))
"""The radar's axes (value key, label, angle in degrees): outward is better on each."""


def radar_value(e: Any, key: str) -> float | None:
    """The radar coordinate of ``key`` for entry ``e``: 1−R1 for forget and rephrase, R1 for retain (0..1)."""
    v = e.values.get(key)
    if v is None:
        return None
    v = max(0.0, min(1.0, float(v)))
    return v if key.startswith("retain") else 1.0 - v


def chart_entries(items: list) -> list:
    """The rows worth charting: those with a forget score (the baseline, runs, step states)."""
    return [e for e in items if e.values.get("forget.rouge1") is not None]
