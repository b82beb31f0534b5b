"""The paper's grids (``unlearn-tui paper``): Tables 1 and 2, Figures 4 and 6 of *Editing as Unlearning*.

What runs (:func:`plan`), in two settings:

* **factual**: TOFU's 217-item factual set (``tofu/real_authors_perturbed.json``
  + ``tofu/world_facts_perturbed.json``, joined into one data file under
  ``OUT/data/``).  A known pass (:meth:`backends.runner.Workbench.score_known`,
  cached on disk) keeps the items the unedited model knows (greedy answer
  ROUGE-1 recall >= ``known``, 0.5); one seeded permutation of those is the
  forget pool, so the forget sets of every size are nested (10 in 20 in 40 in
  80) and the tables' 40 are Figure 4's 40; the retain set is every other
  known item.
* **pistol**: PISTOL's ``sample_data_1.json`` (400 QA); the model is first
  fine-tuned on every item (``[finetune] data = "all"``, cached by
  fingerprint), then the first 20 items (the edge ``A_B``) are forgotten and
  the other 380 retained.

Grids: Table 1 and Table 2 are the same runs (every method at 40 factual / 20
PISTOL forget, merge factor 1): Table 1 shows forget and retain
R1/Prob/MRR/Hit and the composite ``1 - R1(forget) + R1(retain)``, Table 2 the
rephrased-forget R1/Prob/MRR/Hit.  Figure 4: forget 10/20/40/80 for
AlphaEdit, WISE, GD, DPO; Figure 6: merge factor 1/2/5/10/16 for ROME and
MEMIT at 80 forget (both factual).  A run shared by two grids runs once.

Every group of runs with the same data (setting, forget size) is one sweep
file (a session plus ``[[sweep.trials]]``, written to ``OUT/sessions/``,
validated by :func:`sessions.sweep.loads_sweep`); their trials are run as one
:class:`~sessions.sweep.Sweep` by :func:`sessions.sweep.run_sweep`, so every
finished trial is kept as ``OUT/trials/HASH.json`` and a second run resumes,
and ``address`` joins a Ray cluster.  The known scores, the forget pool and
the paraphrases (written once by the unedited model, or our built-in ones,
stored in the sessions) are kept in ``OUT/prep/SETTING.json``.

Outputs (:func:`write_outputs`): ``paper.md`` (every table in the paper's
layout, the unedited model's own baseline stated above and as the first row
of each), ``table1.csv``, ``table2.csv``, ``figure4.csv``, ``figure6.csv``,
``paper.json``, SVG plots (``table1-SETTING.svg`` composite bars,
``figure4.svg`` and ``figure6.svg`` lines; stdlib only) and, when matplotlib
is importable, the same as PNG.

Torch-free at import.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from unlearn_tui.backends.errors import UserError
from unlearn_tui.backends.events import CancelToken, Log, ignore
from unlearn_tui.backends.spec import DEFAULT_MODEL, PARAPHRASE_LEFT_OUT

__all__ = ["PaperConfig", "Point", "PaperResult", "plan", "plan_counts", "check_data", "prepare_setting",
           "build_sweep", "run_paper", "write_outputs", "tables", "figures", "SETTINGS", "TABLES", "FIGURES",
           "PAPER_METHODS", "FIG4_METHODS", "FIG6_METHODS", "FORGET_SIZES", "MERGE_FACTORS", "TABLE_FORGET",
           "FIG6_FORGET", "KNOWN_R1", "TABLE1_COLUMNS", "TABLE2_COLUMNS", "FIGURE_COLUMNS", "default_data_dir",
           "png_available", "PNG_HINT"]

PAPER_FORMAT = 1
SETTINGS = ("factual", "pistol")
TABLES = (1, 2)
FIGURES = (4, 6)
PAPER_METHODS = ("ga", "gd", "kl", "dpo", "npo", "rome", "memit", "alphaedit", "wise", "grace", "ike")
"""Table rows, in the paper's order (unlearning baselines, then editing methods; NPO and IKE are ours)."""
EDITING_METHODS = ("rome", "memit", "alphaedit", "wise", "grace", "ike")
"""The editing methods (the refusal summary's total is over their rows)."""
FIG4_METHODS = ("alphaedit", "wise", "gd", "dpo")
FIG6_METHODS = ("rome", "memit")
TABLE_FORGET = {"factual": 40, "pistol": 20}
FORGET_SIZES = (10, 20, 40, 80)
MERGE_FACTORS = (1, 2, 5, 10, 16)
FIG6_FORGET = 80
KNOWN_R1 = 0.5
MAX_NEW_TOKENS = 32
QUICK_MAX_NEW_TOKENS = 8
QUICK_RETAIN = 10
QUICK_SCALE = 10          # --quick: every forget size / 10 (at least 1)
_LOCATE_QUICK = {"v_steps": 2, "templates": 0, "token_budget": 512}
_TRAIN_QUICK = {"epochs": 1, "max_steps": 1}
QUICK_PARAMS: dict[str, dict[str, Any]] = {
    "rome": _LOCATE_QUICK, "memit": _LOCATE_QUICK, "alphaedit": _LOCATE_QUICK,
    "wise": {"n_iter": 2}, "grace": {"n_iter": 2},
    "ga": _TRAIN_QUICK, "gd": _TRAIN_QUICK, "kl": _TRAIN_QUICK, "dpo": _TRAIN_QUICK, "npo": _TRAIN_QUICK,
}
FACTUAL_FILES = (("author", "tofu/real_authors_perturbed.json"), ("world", "tofu/world_facts_perturbed.json"))
PISTOL_FILE = "pistol/sample_data_1.json"
# the PISTOL fine-tune's most epochs (it stops once ROUGE-1 reaches 0.95; raise with --finetune epochs=N).  The
# cap is part of the fine-tune's cache key, so changing it retrains: on the embedded model 20 items took 8 epochs,
# 80 items 18; 400 items were at ROUGE-1 0.43 after 6, gaining about 0.07 an epoch
PISTOL_EPOCHS = 20
SPLIT_KEYS = (("rouge1", "R1"), ("probability", "Prob"), ("mrr", "MRR"), ("top_hit", "Hit"))
TABLE1_COLUMNS = ("method", "forget R1", "forget Prob", "forget MRR", "forget Hit", "retain R1", "retain Prob",
                  "retain MRR", "retain Hit", "composite")
TABLE2_COLUMNS = ("method", "rephrase R1", "rephrase Prob", "rephrase MRR", "rephrase Hit", "composite")
FIGURE_COLUMNS = ("figure", "method", "forget", "merge_factor", "forget R1", "retain R1", "rephrase R1",
                  "composite", "baseline composite", "status")
PNG_HINT = "PNG plots need matplotlib, which is not installed: pip install matplotlib (the SVG plots were written)"


def default_data_dir() -> Path:
    """``shared/data`` beside the checkout (else beside the working directory); ``UNLEARN_TUI_PAPER_DATA`` wins."""
    from unlearn_tui.backends.paths import shared_data_dir

    return shared_data_dir()


# ===================================================================== configuration and plan
@dataclass
class PaperConfig:
    """What ``unlearn-tui paper`` runs; every flag is a field."""

    model: str = DEFAULT_MODEL
    device: str = "auto"
    dtype: str = "auto"
    tables: tuple[int, ...] = TABLES
    figures: tuple[int, ...] = FIGURES
    settings: tuple[str, ...] = SETTINGS
    methods: tuple[str, ...] | None = None         # None: every paper method this build has
    forget_sizes: tuple[int, ...] | None = None    # Figure 4 (None: 10/20/40/80, scaled with quick)
    merge_factors: tuple[int, ...] = MERGE_FACTORS
    known: float = KNOWN_R1
    quick: bool = False
    mode: str = "idk"
    seed: int = 0
    max_new_tokens: int | None = None              # None: 32 (8 with quick)
    factual_data: tuple[Path, ...] | None = None   # None: the two TOFU files under default_data_dir()
    pistol_data: Path | None = None
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    extra: tuple[str, ...] = ()                    # [eval] extra of every run (the field's metrics)
    # Tables 1-2: a method's rows at these merge factors instead of merge 1 (``--table-merge rome=1/5``)
    table_merge: tuple[tuple[str, tuple[int, ...]], ...] = ()
    # hyper-parameters of every run of a method, over its defaults (``--set alphaedit.l2=30``)
    params: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()
    finetune: tuple[tuple[str, Any], ...] = ()     # ``--finetune KEY=VALUE``: the PISTOL fine-tune's settings

    def method_params(self, method: str) -> dict[str, Any]:
        """The ``[[runs]] params`` of ``method``: ``--quick``'s fewest steps, then the ``--set`` values."""
        return {**(QUICK_PARAMS.get(method, {}) if self.quick else {}), **dict(dict(self.params).get(method, ()))}

    def table_merges(self, method: str) -> tuple[int, ...]:
        """The merge factors of ``method``'s Table 1-2 rows (default: merge 1 only)."""
        return dict(self.table_merge).get(method, (1,))

    def scaled(self, n: int) -> int:
        return max(1, n // QUICK_SCALE) if self.quick else n

    def table_forget(self, setting: str) -> int:
        return self.scaled(TABLE_FORGET[setting])

    def fig4_sizes(self) -> tuple[int, ...]:
        return tuple(self.forget_sizes) if self.forget_sizes else tuple(self.scaled(n) for n in FORGET_SIZES)

    def fig6_forget(self) -> int:
        return self.scaled(FIG6_FORGET)

    def eval_tokens(self) -> int:
        return self.max_new_tokens or (QUICK_MAX_NEW_TOKENS if self.quick else MAX_NEW_TOKENS)

    def factual_files(self) -> list[tuple[str, Path]]:
        if self.factual_data:
            return [(f"f{i + 1}" if len(self.factual_data) > 2 else FACTUAL_FILES[i][0], Path(p))
                    for i, p in enumerate(self.factual_data)]
        base = default_data_dir()
        return [(prefix, base / rel) for prefix, rel in FACTUAL_FILES]

    def pistol_file(self) -> Path:
        return Path(self.pistol_data) if self.pistol_data else default_data_dir() / PISTOL_FILE

    def method_list(self, grid: Sequence[str]) -> list[str]:
        from unlearn_tui.backends import methods

        have = set(methods.names())
        chosen = [m for m in grid if m in have]
        if self.methods is not None:
            chosen = [m for m in chosen if m in self.methods]
            if grid is PAPER_METHODS:   # a method the paper's list lacks, asked for by name: a table row too
                chosen += [m for m in self.methods if m not in chosen and m in have and m != "none"]
        return chosen


@dataclass
class Point:
    """One run of the plan: a method on ``forget`` items of a setting at a merge factor; ``uses``: the
    tables and figures that show it (``table1``, ``table2``, ``figure4``, ``figure6``)."""

    setting: str
    method: str
    forget: int
    merge_factor: int = 1
    uses: list[str] = field(default_factory=list)

    @property
    def key(self) -> tuple:
        return (self.setting, self.forget, self.method, self.merge_factor)

    @property
    def label(self) -> str:
        return f"{self.setting} {self.method} forget={self.forget} merge={self.merge_factor}"


def plan(cfg: PaperConfig) -> list[Point]:
    """Every run the chosen tables and figures need, each once (a run shared by two grids lists both)."""
    points: dict[tuple, Point] = {}

    def add(setting: str, method: str, forget: int, merge: int, use: str) -> None:
        p = points.setdefault((setting, forget, method, merge), Point(setting, method, forget, merge))
        if use not in p.uses:
            p.uses.append(use)

    for setting in cfg.settings:
        for table in cfg.tables:
            for m in cfg.method_list(PAPER_METHODS):
                for k in cfg.table_merges(m):
                    add(setting, m, cfg.table_forget(setting), k, f"table{table}")
    if 4 in cfg.figures:
        for m in cfg.method_list(FIG4_METHODS):
            for n in cfg.fig4_sizes():
                add("factual", m, n, 1, "figure4")
    if 6 in cfg.figures:
        for m in cfg.method_list(FIG6_METHODS):
            for k in cfg.merge_factors:
                add("factual", m, cfg.fig6_forget(), k, "figure6")
    return list(points.values())


def plan_counts(points: Sequence[Point]) -> dict[str, int]:
    """Runs per table/figure (a shared run counts in each) and ``total`` (distinct runs)."""
    out: dict[str, int] = {}
    for p in points:
        for u in p.uses:
            out[u] = out.get(u, 0) + 1
    out["total"] = len(points)
    return out


def check_data(cfg: PaperConfig, settings: Sequence[str]) -> dict[str, str | None]:
    """setting -> None (its data files are there) or the one-line reason it is skipped."""
    out: dict[str, str | None] = {}
    for s in settings:
        files = [p for _, p in cfg.factual_files()] if s == "factual" else [cfg.pistol_file()]
        missing = [p for p in files if not p.is_file()]
        flag = "--factual-data FILE,FILE" if s == "factual" else "--pistol-data FILE"
        out[s] = (f"{s} setting skipped: {missing[0]} not found (give {flag}, or put the data under "
                  f"{default_data_dir()})") if missing else None
    return out


# ===================================================================== preparation (known pass, paraphrases)
def _sha(path_or_text: Path | str) -> str:
    data = path_or_text.read_bytes() if isinstance(path_or_text, Path) else path_or_text.encode()
    return hashlib.sha256(data).hexdigest()[:16]


def _factual_file(cfg: PaperConfig, out: Path) -> Path:
    """The factual files joined into one JSON Lines data file (ids ``author-001``, ``world-001``, ...)."""
    lines = []
    for prefix, path in cfg.factual_files():
        text = path.read_text(encoding="utf-8")
        records = []
        stripped = text.lstrip()
        if stripped.startswith("["):
            records = json.loads(text)
        else:
            records = [json.loads(ln) for ln in text.splitlines() if ln.strip()]
        for i, rec in enumerate(records):
            if not isinstance(rec, dict):
                raise UserError(f"record {i + 1}: expected an object with question and answer", str(path))
            rec = {"id": f"{prefix}-{i + 1:03d}", **{k: v for k, v in rec.items() if k != "id"}}
            lines.append(json.dumps(rec, ensure_ascii=False))
    target = out / "data" / "factual.jsonl"
    text = "\n".join(lines) + "\n"
    if not target.is_file() or target.read_text(encoding="utf-8") != text:
        from unlearn_tui.backends.fileio import atomic_write

        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, text)
    return target


def _data_spec(cfg: PaperConfig, setting: str, out: Path) -> tuple[Path, str]:
    if setting == "factual":
        return _factual_file(cfg, out), "jsonl"
    return cfg.pistol_file().absolute(), "pistol"


def finetune_table(cfg: PaperConfig) -> dict[str, Any]:
    """The PISTOL setting's ``[finetune]``: the paper's (all items, until ROUGE-1 reaches the bar), then
    ``--finetune``'s settings."""
    base = {"data": "forget+retain", "epochs": 2, "until_rouge1": 0.95} if cfg.quick else \
        {"data": "all", "epochs": PISTOL_EPOCHS, "until_rouge1": 0.95}
    return {**base, **dict(cfg.finetune)}


def toml_value(v: Any) -> str:
    """A TOML value (for a flag's value written into a session)."""
    return _tv(v)


def _prep_key(cfg: PaperConfig, setting: str, data: Path, max_forget: int) -> dict[str, Any]:
    from unlearn_tui.backends.selfimprove import PARAPHRASE_GENERATOR, builtin_paraphrase_digest

    key = {"format": PAPER_FORMAT, "setting": setting, "model": cfg.model, "device": cfg.device, "dtype": cfg.dtype,
           "data": _sha(data), "max_new_tokens": cfg.eval_tokens(), "seed": cfg.seed, "max_forget": max_forget,
           "quick": cfg.quick, "paraphrases": builtin_paraphrase_digest(),
           "paraphrase_generator": PARAPHRASE_GENERATOR}
    if setting == "factual":
        key["known"] = cfg.known
    else:
        key["finetune"] = finetune_table(cfg)
    return key


@dataclass
class Prepared:
    """A setting ready to run: its data file, the forget pool (in order) and retain pool, the known scores
    (factual), the paraphrases of the forget pool, and the fine-tune (PISTOL)."""

    setting: str
    data: Path
    format: str
    items: int
    pool: list[str]                # forget sets are its prefixes
    known_ids: list[str]           # data order: the retain set is these minus the forget set
    known: dict[str, float] | None = None
    paraphrases: dict[str, dict] = field(default_factory=dict)   # id -> {"question", "source"}
    left_out: list[str] = field(default_factory=list)
    finetune: dict | None = None
    cached: bool = False

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["data"] = str(self.data)
        d.pop("cached")
        return d


def _model_toml(cfg: PaperConfig) -> str:
    return f"[model]\nname = {_tv(cfg.model)}\ndevice = {_tv(cfg.device)}\ndtype = {_tv(cfg.dtype)}\n"


def prepare_setting(cfg: PaperConfig, setting: str, out: Path, max_forget: int, handle: Callable[[], Any],
                    on_event: Callable[[Any], None] = ignore, cancel: CancelToken | None = None) -> Prepared:
    """The known pass (factual), the fine-tune (PISTOL: trained once here, cached for the trials) and the
    paraphrases of the first ``max_forget`` forget items; read back from ``OUT/prep/SETTING.json`` when the
    model, data and settings are the same.  ``handle()`` loads (or returns) the unedited model."""
    from unlearn_tui.backends import data as bdata
    from unlearn_tui.backends.fileio import atomic_write

    data, fmt = _data_spec(cfg, setting, out)
    key = _prep_key(cfg, setting, data, max_forget)
    cache = out / "prep" / f"{setting}.json"
    try:
        stored = json.loads(cache.read_text(encoding="utf-8"))
        if stored.get("key") == key:
            p = stored["prepared"]
            what = "known scores" if setting == "factual" else "fine-tune"
            on_event(Log(f"{setting}: {what}, forget pool and paraphrases kept in {cache}"))
            return Prepared(setting, Path(p["data"]), p["format"], p["items"], p["pool"], p["known_ids"],
                            p.get("known"), p.get("paraphrases") or {}, p.get("left_out") or [],
                            p.get("finetune"), cached=True)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    items = bdata.load_items(data, format=fmt)
    from unlearn_tui.backends.runner import Workbench

    from .loader import parse

    h = handle()
    text = f"version = 1\n{_model_toml(cfg)}[data]\npath = {_tv(str(data))}\nformat = {_tv(fmt)}\nforget = 1\n" \
           f"retain = 0\n[eval]\nmax_new_tokens = {cfg.eval_tokens()}\n"
    session = parse(text, out / "prep" / "prep.toml", f"paper ({setting})", with_lines=False, keep_doc=False)
    wb = Workbench(session, on_event, cancel, h)
    ids = [it.id for it in items]
    known = None
    if setting == "factual":
        on_event(Log(f"factual: which of the {len(items)} items the model knows (ROUGE-1 >= {cfg.known:g})"))
        known = wb.score_known(items)
        known_ids = [i for i in ids if known.get(i, 0.0) >= cfg.known]
        pool = list(known_ids)
        random.Random(cfg.seed).shuffle(pool)
    else:
        known_ids, pool = list(ids), list(ids)
    by_id = {it.id: it for it in items}
    forget_items = [by_id[i] for i in pool[:max_forget]]
    from unlearn_tui.backends.selfimprove import ensure_paraphrases_report

    report = ensure_paraphrases_report(h, forget_items, seed=cfg.seed, on_event=on_event, cancel=cancel)
    paraphrases = {r["id"]: {"question": r["paraphrase"], "source": r["source"]} for r in report.records}
    finetune = None
    if setting == "pistol":   # trained here once (and cached by fingerprint), so parallel trials only load it
        n = cfg.table_forget("pistol")
        retain = [i for i in known_ids if i not in set(pool[:n])]
        if cfg.quick:
            retain = retain[:QUICK_RETAIN]
        ft_text = text.replace("forget = 1\nretain = 0\n", f"forget = {_tv(pool[:n])}\nretain = {_tv(retain)}\n")
        ft_text += "[finetune]\n" + "".join(f"{k} = {_tv(v)}\n" for k, v in finetune_table(cfg).items())
        ft_session = parse(ft_text, out / "prep" / "prep.toml", "paper (pistol fine-tune)", with_lines=False,
                           keep_doc=False)
        fwb = Workbench(ft_session, on_event, cancel, h)
        try:
            info = fwb.ensure_finetuned(items)
            finetune = info.to_json() if info is not None else None
            if finetune:
                finetune.pop("history", None)
        finally:
            fwb.release_finetune()
    prepared = Prepared(setting, data, fmt, len(items), pool, known_ids, known, paraphrases, list(report.left_out),
                        finetune)
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(cache, json.dumps({"key": key, "prepared": prepared.to_json()}, indent=1) + "\n")
    return prepared


# ===================================================================== sessions and the sweep
def _tv(v: Any) -> str:
    """A TOML value (strings as JSON-escaped basic strings, which TOML reads the same)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=True)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_tv(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {_tv(x)}" for k, x in v.items()) + " }" if v else "{}"
    raise TypeError(f"no TOML form for {v!r}")


def selection(cfg: PaperConfig, prep: Prepared, n: int) -> tuple[list[str], list[str]] | None:
    """(forget ids, retain ids) of ``n`` forget items, or None when the setting has too few items."""
    if len(prep.pool) < n + 1:
        return None
    forget = prep.pool[:n]
    chosen = set(forget)
    retain = [i for i in prep.known_ids if i not in chosen]
    if cfg.quick:
        retain = retain[:QUICK_RETAIN]
    return forget, retain


def group_text(cfg: PaperConfig, prep: Prepared, n: int, points: Sequence[Point]) -> str:
    """The sweep file of one (setting, forget size) group: the session and one ``[[sweep.trials]]`` per run."""
    sel = selection(cfg, prep, n)
    assert sel is not None
    forget, retain = sel
    lines = [f"# unlearn-tui paper: {prep.setting} setting, {n} forget / {len(retain)} retain", "version = 1",
             _model_toml(cfg).rstrip("\n"), "[data]", f"path = {_tv(str(prep.data))}", f"format = {_tv(prep.format)}",
             f"forget = {_tv(forget)}", f"retain = {_tv(retain)}", "rephrase = true",
             "[targets]", f"mode = {_tv(cfg.mode)}", f"seed = {cfg.seed}",
             "[eval]", f"max_new_tokens = {cfg.eval_tokens()}"]
    if cfg.extra:
        lines.append(f"extra = {_tv(list(cfg.extra))}")
    if prep.setting == "pistol":
        lines.append("[finetune]")
        lines += [f"{k} = {_tv(v)}" for k, v in finetune_table(cfg).items()]
    for i in forget:
        if i in prep.paraphrases:
            p = prep.paraphrases[i]
            lines += ["[[data.paraphrases]]", f"id = {_tv(i)}", f"question = {_tv(p['question'])}",
                      f"source = {_tv(p['source'])}"]
        elif i in prep.left_out:   # every try failed in the preparation: no trial asks the model again
            lines += ["[[data.paraphrases]]", f"id = {_tv(i)}", 'question = ""', f"source = {_tv(PARAPHRASE_LEFT_OUT)}"]
    for m in dict.fromkeys(pt.method for pt in points):
        lines += ["[[runs]]", f"method = {_tv(m)}", f"params = {_tv(cfg.method_params(m))}"]
    lines += ["[sweep]", f"cpus_per_trial = {_tv(float(cfg.cpus_per_trial))}",
              f"gpus_per_trial = {_tv(float(cfg.gpus_per_trial))}"]
    for pt in points:
        lines += ["[[sweep.trials]]", f"method = {_tv(pt.method)}", f"merge_factor = {pt.merge_factor}"]
    return "\n".join(lines) + "\n"


def build_sweep(cfg: PaperConfig, preps: dict[str, Prepared], points: Sequence[Point], out: Path,
                on_event: Callable[[Any], None] = ignore) -> tuple[Any, dict[str, Point], list[str]]:
    """One :class:`~sessions.sweep.Sweep` of every runnable point: ``(sweep, trial hash -> point, skipped)``.

    Each (setting, forget size) group is a sweep file under ``OUT/sessions/`` validated by ``loads_sweep``;
    their trials are joined (``values`` gain ``setting``) into one sweep for one ``run_sweep``.
    """
    from unlearn_tui.backends.fileio import atomic_write

    from . import sweep as sw

    groups: dict[tuple[str, int], list[Point]] = {}
    skipped: list[str] = []
    for p in points:
        if p.setting not in preps:
            continue
        groups.setdefault((p.setting, p.forget), []).append(p)
    trials: list = []
    by_hash: dict[str, Point] = {}
    first = None
    for (setting, n), pts in groups.items():
        prep = preps[setting]
        if selection(cfg, prep, n) is None:
            what = f"items the model knows (ROUGE-1 >= {cfg.known:g})" if setting == "factual" else "items"
            uses = ", ".join(sorted({u for p in pts for u in p.uses}))
            msg = (f"{setting}, {n} forget: skipped ({len(pts)} run(s): {uses}); it needs {n + 1} {what} "
                   f"(forget + at least one retain), the data has {len(prep.pool)}")
            skipped.append(msg)
            on_event(Log(msg, "warning"))
            continue
        text = group_text(cfg, prep, n, pts)
        path = out / "sessions" / f"{setting}-forget{n}.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, text)
        spec = sw.loads_sweep(text, path.absolute(), label=str(path))
        first = first or spec
        for t, p in zip(spec.trials(), pts):
            values = {"setting": setting, **t.values}
            trials.append(sw.Trial(len(trials), values, t.session, t.hash))
            by_hash[t.hash] = p
    base = first.session if first is not None else None
    spec = sw.Sweep(None, "paper", base, True, float(cfg.cpus_per_trial), float(cfg.gpus_per_trial),
                    ("setting", "method", "forget", "merge_factor"), trials)
    return spec, by_hash, skipped


# ===================================================================== the whole command
@dataclass
class PaperResult:
    points: list[Point]
    results: list                      # TrialResults, trial order
    by_hash: dict[str, Point]
    preps: dict[str, Prepared]
    skipped: list[str]
    files: list[Path] = field(default_factory=list)
    report: dict = field(default_factory=dict)

    @property
    def failed(self) -> list:
        return [r for r in self.results if not r.ok]


def run_paper(cfg: PaperConfig, out: Path | str, on_event: Callable[[Any], None] = ignore,
              cancel: CancelToken | None = None, address: str | None = None, backend: str = "ray",
              num_cpus: int | None = None) -> PaperResult:
    """Prepare the settings, run every trial not finished under ``out`` yet, write the tables and plots."""
    from . import sweep as sw
    from .loader import parse

    out = Path(out).expanduser().absolute()
    out.mkdir(parents=True, exist_ok=True)
    points = plan(cfg)
    wanted = list(dict.fromkeys(p.setting for p in points))
    skipped: list[str] = []
    for why in check_data(cfg, wanted).values():
        if why:
            skipped.append(why)
            on_event(Log(why, "warning"))
    model_session = parse(f"version = 1\n{_model_toml(cfg)}", out / "paper.toml", "paper", with_lines=False,
                          keep_doc=False)

    def handle() -> Any:   # the sweep's own per-process model: trials run here (local) reuse it
        return sw._handle_for(model_session, on_event, cancel)[0]

    preps: dict[str, Prepared] = {}
    for s in wanted:
        if any(s in w and "skipped" in w for w in skipped):
            continue
        max_forget = max(p.forget for p in points if p.setting == s)
        preps[s] = prepare_setting(cfg, s, out, max_forget, handle, on_event, cancel)
    spec, by_hash, more = build_sweep(cfg, preps, points, out, on_event)
    skipped += more
    if backend == "ray":
        sw._HANDLE.clear()   # the trials run in Ray workers: this process lets its copy of the model go
    results = sw.run_sweep(spec, out, on_event, cancel, address=address, backend=backend, num_cpus=num_cpus) \
        if spec.trials() else []
    res = PaperResult(points, results, by_hash, preps, skipped)
    write_outputs(cfg, res, out)
    return res


# ===================================================================== aggregation
def _split(run: dict | None, split: str, key: str) -> float | None:
    v = ((run or {}).get(split) or {}).get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _cells(run: dict | None, splits: Sequence[str]) -> dict[str, float | None]:
    out = {f"{s} {short}": _split(run, s, k) for s in splits for k, short in SPLIT_KEYS}
    out["composite"] = (run or {}).get("composite")
    return out


# the field's metrics (``--extra``) shown beside Table 1: column -> how it is read from a run's fields
EXTRA_COLUMNS: tuple[tuple[str, str, Callable[[dict], Any]], ...] = (
    ("FQ ↑", "forget_quality", lambda r: r.get("forget_quality")),
    ("MU ↑", "model_utility", lambda r: r.get("model_utility")),
    ("PrivLeak", "mia", lambda r: (r.get("mia") or {}).get("privleak")),
    ("Min-K% AUC", "mia", lambda r: (r.get("mia") or {}).get("mink_auc")),
    ("relearn before", "relearn", lambda r: (r.get("relearn") or {}).get("before")),
    ("relearn after ↓", "relearn", lambda r: (r.get("relearn") or {}).get("after")),
    ("MCQ acc ↓", "mcq", lambda r: (r.get("mcq") or {}).get("top_hit")),
    ("ICL R1 ↓", "in_context", lambda r: (r.get("in_context") or {}).get("rouge1")),
    ("ppl", "perplexity", lambda r: r.get("perplexity")),
)


def extra_cells(cfg: PaperConfig, run: dict | None) -> dict[str, float | None]:
    """The ``--extra`` metrics of one run (or baseline), by column; only the columns of the extras asked for."""
    out: dict[str, float | None] = {}
    for col, extra, read in EXTRA_COLUMNS:
        if extra in cfg.extra:
            v = read(run or {})
            out[col] = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
    return out


def _index(res: PaperResult) -> dict[tuple, Any]:
    return {res.by_hash[r.trial.hash].key: r for r in res.results if r.trial.hash in res.by_hash}


def _group_baseline(found: dict, setting: str, n: int) -> dict | None:
    """The unedited model's baseline of a (setting, forget size) group: any finished trial's."""
    return next((r.baseline for (s, f, _, _), r in found.items() if s == setting and f == n and r.ok and r.baseline),
                None)


def _group_info(cfg: PaperConfig, res: PaperResult, setting: str, n: int, found: dict) -> dict[str, Any]:
    """The unedited model's baseline of a (setting, forget size) group, and its sizes."""
    base = _group_baseline(found, setting, n)
    prep = res.preps.get(setting)
    sel = selection(cfg, prep, n) if prep is not None else None
    info = {"setting": setting, "forget": n, "retain": len(sel[1]) if sel else None,
            "rephrase": (base or {}).get("rephrase", {}).get("n") if base else None,
            "baseline": ({**_cells(base, ("forget", "retain", "rephrase")), "composite": base.get("composite"),
                          **{f"{sp} refused": _split(base, sp, "refused") for sp in ("forget", "retain", "rephrase")}}
                         if base else None)}
    if prep is not None:
        info.update(items=prep.items, known=len(prep.known_ids) if setting == "factual" else None,
                    paraphrases_left_out=len([i for i in prep.left_out if sel and i in sel[0]]),
                    finetune=prep.finetune)
    return info


def tables(cfg: PaperConfig, res: PaperResult) -> dict[str, dict[str, Any]]:
    """``{"table1": {setting: {"info": ..., "rows": [...]}}, "table2": ...}`` (rows: method + the columns)."""
    found = _index(res)
    out: dict[str, dict[str, Any]] = {}
    for t in cfg.tables:
        splits = ("forget", "retain") if t == 1 else ("rephrase",)
        cols = TABLE1_COLUMNS if t == 1 else TABLE2_COLUMNS
        out[f"table{t}"] = {}
        for setting in cfg.settings:
            if setting not in res.preps:
                continue
            n = cfg.table_forget(setting)
            rows = []
            for m, k in [(name, k) for name in cfg.method_list(PAPER_METHODS) for k in cfg.table_merges(name)]:
                r = found.get((setting, n, m, k))
                if r is None:
                    continue
                cells = _cells(r.run if r.ok else None, splits)
                row = {"method": m if k == 1 else f"{m}+merge (m={k})", **{c: cells.get(c) for c in cols[1:]},
                       "merge_factor": k, "status": r.status, "error": r.error,
                       "refused": _split(r.run, "forget", "refused"),
                       "refused_rephrase": _split(r.run, "rephrase", "refused"),
                       "refused_retain": _split(r.run, "retain", "refused"),
                       "n": {sp: _split(r.run, sp, "n") for sp in ("forget", "rephrase", "retain")}}
                if cfg.extra and t == 1:
                    row["extra"] = extra_cells(cfg, r.run if r.ok else None)
                rows.append(row)
            info = _group_info(cfg, res, setting, n, found)
            if cfg.extra and t == 1:
                base = _group_baseline(found, setting, n)
                info["baseline_extra"] = extra_cells(cfg, base) if base else None
            out[f"table{t}"][setting] = {"info": info, "rows": rows}
    return out


def figures(cfg: PaperConfig, res: PaperResult) -> dict[str, dict[str, Any]]:
    """``{"figure4": {"x": [...], "xlabel", "series": {method: [point or None]}, "baseline": [...]}, ...}``."""
    found = _index(res)
    out: dict[str, dict[str, Any]] = {}
    specs: list[tuple[str, str, list[int], Any, Callable[..., tuple]]] = []
    if 4 in cfg.figures:
        specs.append(("figure4", "forget samples", list(cfg.fig4_sizes()), FIG4_METHODS,
                      lambda m, x: ("factual", x, m, 1)))
    if 6 in cfg.figures:
        n6 = cfg.fig6_forget()
        specs.append(("figure6", f"merge factor ({n6} forget)", list(cfg.merge_factors), FIG6_METHODS,
                      lambda m, x, n6=n6: ("factual", n6, m, x)))
    for name, xlabel, xs, grid, keyof in specs:
        series: dict[str, list] = {}
        base: list = []
        for x in xs:
            k = keyof("", x)
            info = _group_info(cfg, res, "factual", k[1], found) if "factual" in res.preps else {"baseline": None}
            base.append((info.get("baseline") or {}).get("composite"))
        for m in cfg.method_list(grid):
            pts = []
            for x in xs:
                r = found.get(keyof(m, x))
                run = r.run if r is not None and r.ok else None
                pts.append(None if r is None else {
                    "x": x, "forget R1": _split(run, "forget", "rouge1"), "retain R1": _split(run, "retain", "rouge1"),
                    "rephrase R1": _split(run, "rephrase", "rouge1"), "composite": (run or {}).get("composite"),
                    "status": r.status, "error": r.error})
            series[m] = pts
        info = (_group_info(cfg, res, "factual", keyof("", xs[0])[1], found)
                if xs and "factual" in res.preps else {})
        out[name] = {"xlabel": xlabel, "x": xs, "series": series, "baseline": base, "info": info}
    return out


# ===================================================================== Markdown / CSV / JSON
def _f(v: Any) -> str:
    return "—" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def _baseline_line(cfg: PaperConfig, info: dict) -> str:
    b = info.get("baseline") or {}
    setting = info.get("setting")
    where = (f"{info.get('forget')} forget / {info.get('retain')} retain"
             + (f", from the {info.get('known')} of {info.get('items')} items the model knows (ROUGE-1 ≥ {cfg.known:g})"
                if setting == "factual" else f" of {info.get('items')} items"))
    ft = info.get("finetune")
    tuned = ""
    if setting == "pistol":
        tuned = (f"; fine-tuned first on {ft.get('items')} items ({ft.get('epochs')} epochs, ROUGE-1 "
                 f"{_f(ft.get('rouge1'))}{'' if ft.get('reached') else ', below the bar'})") if ft else \
            "; fine-tuned first"
    if not b:
        return f"Model `{cfg.model}`, {where}{tuned}; its own baseline: not measured (no finished run)."
    reph = f", rephrase R1 {_f(b.get('rephrase R1'))}" if b.get("rephrase R1") is not None else ""
    left = info.get("paraphrases_left_out")
    left_s = f" ({left} forget item(s) had no checked paraphrase: left out of the rephrase split)" if left else ""
    return (f"Model `{cfg.model}`, {where}{tuned}. Its own baseline (unedited): forget R1 {_f(b.get('forget R1'))}, "
            f"retain R1 {_f(b.get('retain R1'))}{reph}, composite {_f(b.get('composite'))}{left_s}.")


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    rule = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"
    out = ["| " + " | ".join(header) + " |", rule]
    out += ["| " + " | ".join(_f(c) for c in row) + " |" for row in rows]
    return out


_ARROW = {"forget": "↓", "rephrase": "↓", "retain": "↑", "composite": "↑"}


def _head(col: str) -> str:
    return f"{col} {_ARROW.get(col.split()[0], '')}".strip() if col != "method" else "Method"


def markdown(cfg: PaperConfig, res: PaperResult, tabs: dict, figs: dict) -> str:
    lines = ["# Editing as Unlearning: the paper's grids", "",
             f"Model `{cfg.model}`; targets `{cfg.mode}`; seed {cfg.seed}; {cfg.eval_tokens()} new tokens"
             + ("; **--quick** (tiny budgets and sizes: a smoke run, not the paper's numbers)" if cfg.quick else "")
             + ". ↓ lower is better, ↑ higher is better; composite = 1 − R1(forget) + R1(retain).", ""]
    names = {"table1": "Table 1: forget and retain", "table2": "Table 2: rephrased forget questions"}
    for tname, per in tabs.items():
        cols = TABLE1_COLUMNS if tname == "table1" else TABLE2_COLUMNS
        for setting, t in per.items():
            info = t["info"]
            lines += [f"## {names[tname]} ({setting} setting)", "", _baseline_line(cfg, info), ""]
            b = info.get("baseline") or {}
            rows = [["*unedited (baseline)*", *(b.get(c) for c in cols[1:])]]
            rows += [[r["method"] if r["status"] == "ok" else f"{r['method']} (failed: {r['error']})",
                      *(r.get(c) for c in cols[1:])] for r in t["rows"]]
            lines += _md_table([_head(c) for c in cols], rows) + [""]
            if tname == "table1":
                lines += _refusal_lines(setting, info, t["rows"])
            if tname == "table1" and cfg.extra:
                ecols = [c for c, e, _ in EXTRA_COLUMNS if e in cfg.extra]
                lines += [f"### The field's metrics ({setting} setting): {', '.join(cfg.extra)}", ""]
                be = info.get("baseline_extra") or {}
                erows = [["*unedited (baseline)*", *(be.get(c) for c in ecols)]]
                erows += [[r["method"], *((r.get("extra") or {}).get(c) for c in ecols)] for r in t["rows"]]
                lines += _md_table(["Method", *ecols], erows) + [""]
    for fname, fig in figs.items():
        title = ("Figure 4: composite by number of forget samples" if fname == "figure4"
                 else "Figure 6: composite by merge factor")
        lines += [f"## {title} (factual setting)", ""]
        if fig["info"]:
            lines += [_baseline_line(cfg, fig["info"])
                      + " The baseline row gives the unedited composite at each point (its forget set differs).", ""]
        xs = fig["x"]
        rows = [["*unedited (baseline)*", *fig["baseline"]]]
        for m, pts in fig["series"].items():
            rows.append([m, *((p or {}).get("composite") for p in pts)])
        lines += _md_table(["Method", *(f"{'n' if fname == 'figure4' else 'm'} = {x}" for x in xs)], rows) + [""]
    if res.skipped:
        lines += ["## Not run", ""] + [f"- {s}" for s in res.skipped] + [""]
    return "\n".join(lines)


def refusal_total(rows: Sequence[dict]) -> tuple[int, int]:
    """(forget answers detected as refusals, forget answers) over the editing methods' finished rows."""
    hit = total = 0
    for r in rows:
        if r["status"] != "ok" or r["method"].split("+")[0] not in EDITING_METHODS or r.get("refused") is None:
            continue
        n = int((r.get("n") or {}).get("forget") or 0)
        hit += round(r["refused"] * n)
        total += n
    return hit, total


def _refusal_lines(setting: str, info: dict, rows: Sequence[dict]) -> list[str]:
    """Table 1's refusals: the share of answers the refusal detector (``backends.refusal``) reads as refusals,
    per split; on retain that is over-refusal."""
    b = info.get("baseline") or {}
    out = [f"### Refusals ({setting} setting)", "",
           "The share of greedy answers the refusal detector reads as refusals; on retain questions a refusal "
           "is over-refusal (a question the model should still answer).", ""]
    body = [["*unedited (baseline)*", b.get("forget refused"), b.get("rephrase refused"), b.get("retain refused")]]
    body += [[r["method"], r.get("refused"), r.get("refused_rephrase"), r.get("refused_retain")]
             for r in rows if r["status"] == "ok"]
    out += _md_table(["Method", "forget refused ↑", "rephrase refused ↑", "retain refused ↓"], body) + [""]
    hit, total = refusal_total(rows)
    if total:
        out += [f"Editing methods' forget answers detected as refusals: {hit}/{total} ({hit / total:.0%}).", ""]
    return out


def _csv(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for row in rows:
        w.writerow(["" if v is None or (isinstance(v, float) and not math.isfinite(v)) else v for v in row])
    return buf.getvalue()


def table_csv(tname: str, per: dict) -> str:
    """One row per setting and method (the unedited baseline first), the paper's columns."""
    cols = TABLE1_COLUMNS if tname == "table1" else TABLE2_COLUMNS
    header = ["setting", *cols, "forget_n", "retain_n", "status"]
    rows = []
    for setting, t in per.items():
        info, b = t["info"], t["info"].get("baseline") or {}
        rows.append([setting, "baseline", *(b.get(c) for c in cols[1:]), info.get("forget"), info.get("retain"),
                     "ok" if b else "missing"])
        rows += [[setting, r["method"], *(r.get(c) for c in cols[1:]), info.get("forget"), info.get("retain"),
                  r["status"]] for r in t["rows"]]
    return _csv(header, rows)


def figure_csv(fname: str, fig: dict) -> str:
    rows = []
    for i, x in enumerate(fig["x"]):
        n, m = (x, 1) if fname == "figure4" else (None, x)
        rows.append([fname, "baseline", n, m, None, None, None, fig["baseline"][i], fig["baseline"][i], "ok"])
    for meth, pts in fig["series"].items():
        for x, p in zip(fig["x"], pts):
            n, m = (x, 1) if fname == "figure4" else (None, x)
            p = p or {}
            rows.append([fname, meth, n, m, p.get("forget R1"), p.get("retain R1"), p.get("rephrase R1"),
                         p.get("composite"), fig["baseline"][fig["x"].index(x)], p.get("status", "missing")])
    if fname == "figure6":
        n6 = (fig.get("info") or {}).get("forget")
        rows = [[r[0], r[1], n6, *r[3:]] for r in rows]
    return _csv(FIGURE_COLUMNS, rows)


# ===================================================================== plots (SVG with the stdlib, PNG with matplotlib)
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf", "#393b79")


def _svg(w: int, h: int, title: str, body: list[str]) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
            f'font-family="sans-serif" font-size="12">\n<title>{escape(title)}</title>\n'
            f'<rect width="{w}" height="{h}" fill="white"/>\n'
            f'<text x="{w / 2}" y="20" text-anchor="middle" font-size="14" font-weight="bold">{escape(title)}</text>\n'
            + "\n".join(body) + "\n</svg>\n")


def _axes(x0: float, y0: float, pw: float, ph: float, ymax: float, ylabel: str) -> list[str]:
    body = [f'<line x1="{x0}" y1="{y0}" x2="{x0}" y2="{y0 - ph}" stroke="black"/>',
            f'<line x1="{x0}" y1="{y0}" x2="{x0 + pw}" y2="{y0}" stroke="black"/>',
            f'<text x="14" y="{y0 - ph / 2}" transform="rotate(-90 14 {y0 - ph / 2})" text-anchor="middle">'
            f'{escape(ylabel)}</text>']
    for k in range(5):
        v = ymax * k / 4
        y = y0 - ph * k / 4
        body += [f'<line x1="{x0 - 4}" y1="{y:.1f}" x2="{x0 + pw}" y2="{y:.1f}" stroke="#ddd"/>',
                 f'<text x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end">{v:.2f}</text>']
    return body


def bars_svg(title: str, labels: Sequence[str], values: Sequence[float | None], baseline: float | None) -> str:
    """Composite per method (bars), the unedited model's composite as a dashed line."""
    w, h, x0, y0 = max(360, 70 + 52 * len(labels)), 320, 60, 260
    pw, ph, ymax = w - x0 - 20, 210, 2.0
    body = _axes(x0, y0, pw, ph, ymax, "composite")
    step = pw / max(1, len(labels))
    for i, (lab, v) in enumerate(zip(labels, values)):
        x = x0 + i * step + step * 0.15
        if v is not None:
            bh = ph * max(0.0, min(ymax, v)) / ymax
            body.append(f'<rect x="{x:.1f}" y="{y0 - bh:.1f}" width="{step * 0.7:.1f}" height="{bh:.1f}" '
                        f'fill="{COLORS[i % len(COLORS)]}"><title>{escape(lab)}: {v:.3f}</title></rect>')
            body.append(f'<text x="{x + step * 0.35:.1f}" y="{y0 - bh - 4:.1f}" text-anchor="middle" '
                        f'font-size="10">{v:.2f}</text>')
        body.append(f'<text x="{x + step * 0.35:.1f}" y="{y0 + 16}" text-anchor="middle">{escape(lab)}</text>')
    if baseline is not None:
        y = y0 - ph * max(0.0, min(ymax, baseline)) / ymax
        body += [f'<line x1="{x0}" y1="{y:.1f}" x2="{x0 + pw}" y2="{y:.1f}" stroke="black" stroke-dasharray="6 4"/>',
                 f'<text x="{x0 + pw}" y="{y - 4:.1f}" text-anchor="end" font-size="10">unedited {baseline:.2f}</text>']
    return _svg(w, h, title, body)


def lines_svg(title: str, xlabel: str, xs: Sequence[Any], series: dict[str, Sequence[float | None]],
              baseline: Sequence[float | None]) -> str:
    """One line per method over ``xs`` (evenly spaced), the unedited composite dashed."""
    w, h, x0, y0 = 520, 340, 60, 270
    pw, ph, ymax = 330, 220, 2.0
    body = _axes(x0, y0, pw, ph, ymax, "composite")
    n = max(1, len(xs) - 1)

    def px(i: int) -> float:
        return x0 + 10 + (pw - 20) * (i / n if len(xs) > 1 else 0.5)

    def py(v: float) -> float:
        return y0 - ph * max(0.0, min(ymax, v)) / ymax

    for i, x in enumerate(xs):
        body.append(f'<text x="{px(i):.1f}" y="{y0 + 16}" text-anchor="middle">{escape(str(x))}</text>')
    body.append(f'<text x="{x0 + pw / 2}" y="{y0 + 34}" text-anchor="middle">{escape(xlabel)}</text>')
    all_series = [("unedited", baseline, "black", ' stroke-dasharray="6 4"')]
    all_series += [(m, vals, COLORS[i % len(COLORS)], "") for i, (m, vals) in enumerate(series.items())]
    for j, (name, vals, color, dash) in enumerate(all_series):
        pts = [(px(i), py(v)) for i, v in enumerate(vals) if v is not None]
        if len(pts) > 1:
            body.append(f'<polyline fill="none" stroke="{color}" stroke-width="2"{dash} points="'
                        + " ".join(f"{a:.1f},{b:.1f}" for a, b in pts) + '"/>')
        body += [f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{color}"/>' for a, b in pts]
        ly = 50 + 18 * j
        body += [f'<line x1="{x0 + pw + 20}" y1="{ly}" x2="{x0 + pw + 44}" y2="{ly}" stroke="{color}" '
                 f'stroke-width="2"{dash}/>', f'<text x="{x0 + pw + 50}" y="{ly + 4}">{escape(name)}</text>']
    return _svg(w, h, title, body)


def png_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def _png(kind: str, path: Path, title: str, **kw: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if kind == "bars":
        vals = [v if v is not None else 0.0 for v in kw["values"]]
        ax.bar(kw["labels"], vals, color=[COLORS[i % len(COLORS)] for i in range(len(vals))])
        if kw.get("baseline") is not None:
            ax.axhline(kw["baseline"], color="black", linestyle="--", label="unedited")
            ax.legend()
    else:
        xs = [str(x) for x in kw["xs"]]
        for name, vals in [("unedited", kw["baseline"]), *kw["series"].items()]:
            pts = [(x, v) for x, v in zip(xs, vals) if v is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name,
                        **({"color": "black", "linestyle": "--"} if name == "unedited" else {}))
        ax.set_xlabel(kw["xlabel"])
        ax.legend()
    ax.set_ylim(0, 2)
    ax.set_ylabel("composite")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plots(cfg: PaperConfig, tabs: dict, figs: dict) -> list[tuple[str, str, dict]]:
    """``(file stem, title, data)`` of every plot: kind ``bars`` (labels/values/baseline) or ``lines``."""
    out = []
    tname = "table1" if "table1" in tabs else "table2"
    for setting, t in tabs.get(tname, {}).items():
        rows = list(t["rows"])
        out.append((f"{tname}-{setting}", f"Composite per method ({setting} setting, {cfg.model})",
                    {"kind": "bars", "labels": [r["method"] for r in rows],
                     "values": [r.get("composite") for r in rows],
                     "baseline": (t["info"].get("baseline") or {}).get("composite")}))
    for fname, fig in figs.items():
        title = ("Figure 4: number of forget samples" if fname == "figure4" else "Figure 6: merge factor") \
            + f" ({cfg.model})"
        out.append((fname, title, {"kind": "lines", "xlabel": fig["xlabel"], "xs": fig["x"],
                                   "series": {m: [(p or {}).get("composite") for p in pts]
                                              for m, pts in fig["series"].items()},
                                   "baseline": fig["baseline"]}))
    return out


_BULKY = ("known", "known_ids", "pool", "paraphrases")


def write_outputs(cfg: PaperConfig, res: PaperResult, out: Path) -> list[Path]:
    """``paper.md``, ``tableN.csv``, ``figureN.csv``, ``paper.json``, the SVG plots (and PNG with matplotlib)."""
    from unlearn_tui.backends.fileio import atomic_write

    from .sweep import _finite

    tabs, figs = tables(cfg, res), figures(cfg, res)
    files: list[Path] = []

    def put(name: str, text: str) -> None:
        p = out / name
        atomic_write(p, text)
        files.append(p)

    put("paper.md", markdown(cfg, res, tabs, figs))
    for tname, per in tabs.items():
        put(f"{tname}.csv", table_csv(tname, per))
    for fname, fig in figs.items():
        put(f"{fname}.csv", figure_csv(fname, fig))
    drawn = plots(cfg, tabs, figs)
    for stem, title, d in drawn:
        if d["kind"] == "bars":
            put(f"{stem}.svg", bars_svg(title, d["labels"], d["values"], d["baseline"]))
        else:
            put(f"{stem}.svg", lines_svg(title, d["xlabel"], d["xs"], d["series"], d["baseline"]))
    png = png_available()
    if png:
        for stem, title, d in drawn:
            kw = {k: v for k, v in d.items() if k != "kind"}
            _png(d["kind"], out / f"{stem}.png", title, **kw)
            files.append(out / f"{stem}.png")
    counts = plan_counts(res.points)
    ran = sum(1 for r in res.results if not r.cached)
    report = {"format": PAPER_FORMAT, "model": cfg.model,
              "config": {k: (list(map(str, v)) if k == "factual_data" and v else str(v) if isinstance(v, Path) else v)
                         for k, v in asdict(cfg).items()},
              "plan": counts, "trials": {"total": len(res.results), "ran": ran, "cached": len(res.results) - ran,
                                         "failed": len(res.failed)},
              "settings": {s: {k: v for k, v in p.to_json().items() if k not in _BULKY}
                           | {"known": len(p.known_ids), "paraphrases": len(p.paraphrases)}
                           for s, p in res.preps.items()},
              "tables": tabs, "figures": figs, "skipped": res.skipped,
              "runs": [{"setting": res.by_hash[r.trial.hash].setting, "uses": res.by_hash[r.trial.hash].uses,
                        "hash": r.trial.hash, **r.line()} for r in res.results if r.trial.hash in res.by_hash],
              "png": png}
    put("paper.json", json.dumps(_finite(report), indent=1, allow_nan=False, default=str) + "\n")
    res.files, res.report = files, report
    return files
