"""The results of ``unlearn-tui paper`` in the app: its tables, and terminal plots of the composite.

:func:`load_paper_report` reads and checks ``OUT/paper.json`` (written by
:func:`sessions.paper.write_outputs`) without Textual: a missing file, text
that is not JSON, another ``format`` or an unexpected shape is one
:class:`UserError` line naming the file, and nothing the screen reads later
can be of the wrong type.  :class:`PaperScreen` shows, one below the other:
every table and setting as a ``DataTable`` (the unedited baseline first, then
one row per method; a failed run's row carries its error), its baseline line
as a caption; the composite per method as bars (Table 1's, per setting); and
each figure as lines of the composite (Figure 4: by forget samples, Figure 6:
by merge factor), the unedited baseline among them.  Escape or ``q`` closes it.

Opened by F10 in the app (``paper_results``) and by ``unlearn-tui paper --view
--out DIR``, which runs the small :class:`PaperApp` (this screen only).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import DataTable, Static
from textual_plotext import PlotextPlot

from unlearn_tui.backends.errors import UserError
from unlearn_tui.sessions.paper import PAPER_FORMAT, TABLE1_COLUMNS, TABLE2_COLUMNS

__all__ = ["PAPER_JSON", "load_paper_report", "PaperScreen", "PaperApp", "cell_text", "baseline_caption"]

PAPER_JSON = "paper.json"
TABLE_COLUMNS: dict[str, tuple[str, ...]] = {"table1": TABLE1_COLUMNS, "table2": TABLE2_COLUMNS}
TABLE_TITLES = {"table1": "Table 1: forget and retain", "table2": "Table 2: rephrased forget questions"}
FIGURE_TITLES = {"figure4": "Figure 4: composite by number of forget samples",
                 "figure6": "Figure 6: composite by merge factor"}
FIGURE_XLABELS = {"figure4": "forget samples", "figure6": "merge factor"}
BETTER = {"forget": "↓", "rephrase": "↓", "retain": "↑", "composite": "↑"}   # which way is better, per column
COMPOSITE_MAX = 2.0         # composite = 1 - R1(forget) + R1(retain) lies in [0, 2]
MISSING = "—"
BARS_MIN_HEIGHT = 9         # rows of a bar chart: 2 per bar (the unedited model's and each method's) and 5
BAR_WIDTH = 0.6             # of a bar's slot
ERROR_WIDTH = 80            # a failed row's error, cut to this many characters in the table


# ===================================================================== reading and checking paper.json
class _Shape(Exception):
    """Inside :func:`load_paper_report`: the report is not shaped like ``paper.json`` (``where``: the key path)."""

    def __init__(self, where: str, expected: str) -> None:
        super().__init__(f"{where}: expected {expected}")


def _obj(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Shape(where, "an object")
    return value


def _list(value: Any, where: str, length: int | None = None) -> list[Any]:
    if not isinstance(value, list):
        raise _Shape(where, "a list")
    if length is not None and len(value) != length:
        raise _Shape(where, f"a list of {length} value(s), one per x (it has {len(value)})")
    return value


def _check_table(tname: str, per: Any) -> None:
    for setting, t in _obj(per, f"tables.{tname}").items():
        at = f"tables.{tname}.{setting}"
        t = _obj(t, at)
        info = _obj(t.get("info"), f"{at}.info")
        if info.get("baseline") is not None:
            _obj(info["baseline"], f"{at}.info.baseline")
        for i, row in enumerate(_list(t.get("rows"), f"{at}.rows")):
            row = _obj(row, f"{at}.rows[{i}]")
            if not isinstance(row.get("method"), str):
                raise _Shape(f"{at}.rows[{i}].method", "a method name")


def _check_figure(fname: str, fig: Any) -> None:
    at = f"figures.{fname}"
    fig = _obj(fig, at)
    n = len(_list(fig.get("x"), f"{at}.x"))
    for m, pts in _obj(fig.get("series"), f"{at}.series").items():
        for i, p in enumerate(_list(pts, f"{at}.series.{m}", n)):
            if p is not None:
                _obj(p, f"{at}.series.{m}[{i}]")
    _list(fig.get("baseline"), f"{at}.baseline", n)
    if fig.get("xlabel") is not None and not isinstance(fig["xlabel"], str):
        raise _Shape(f"{at}.xlabel", "a string")
    if fig.get("info") is not None:
        _obj(fig["info"], f"{at}.info")


def _check_report(report: Any) -> dict[str, Any]:
    report = _obj(report, "the file")
    fmt = report.get("format")
    if type(fmt) is not int or fmt != PAPER_FORMAT:
        raise _Shape("format", f"{PAPER_FORMAT} (the paper.json of `unlearn-tui paper`), got {fmt!r}")
    tables = _obj(report.get("tables", {}), "tables")
    figures = _obj(report.get("figures", {}), "figures")
    for tname, per in tables.items():
        if tname not in TABLE_COLUMNS:
            raise _Shape(f"tables.{tname}", " or ".join(TABLE_COLUMNS))
        _check_table(tname, per)
    for fname, fig in figures.items():
        if fname not in FIGURE_TITLES:
            raise _Shape(f"figures.{fname}", " or ".join(FIGURE_TITLES))
        _check_figure(fname, fig)
    if not any(tables.values()) and not figures:
        raise _Shape("tables and figures", "at least one table or figure (this report has none)")
    if report.get("config") is not None:
        _obj(report["config"], "config")
    if report.get("trials") is not None:
        _obj(report["trials"], "trials")
    return report


def paper_json_path(path: str | Path) -> Path:
    """``path`` itself, or ``path/paper.json`` when it is a folder."""
    p = Path(path).expanduser()
    return p / PAPER_JSON if p.is_dir() else p


def load_paper_report(path: str | Path) -> dict[str, Any]:
    """The report in ``path`` (a ``paper --out`` folder or its ``paper.json``), checked; UserError (one line,
    naming the file) when it is missing, unreadable, not JSON, of another format or not shaped like one."""
    given = Path(path).expanduser()
    if not given.exists():
        raise UserError("not found (expected an `unlearn-tui paper --out` folder or its paper.json)", str(given))
    file = paper_json_path(given)
    if given.is_dir() and not file.is_file():
        raise UserError(f"no {PAPER_JSON} in this folder (`unlearn-tui paper --out {given}` writes it)", str(given))
    where = str(file)
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError("not UTF-8 text (expected the paper.json of `unlearn-tui paper`)", where) from None
    except OSError as exc:
        raise UserError(f"cannot read it ({exc.strerror or exc})", where) from None
    try:
        report = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"not JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})", where) from None
    except (ValueError, RecursionError) as exc:
        raise UserError(f"not JSON ({type(exc).__name__})", where) from None
    try:
        return _check_report(report)
    except _Shape as exc:
        raise UserError(f"not an `unlearn-tui paper` report: {exc}", where) from None


# ===================================================================== formatting
def _number(value: Any) -> float | None:
    """A finite number as a float; anything else (None, text, NaN, a bool) None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    v = float(value)
    return v if math.isfinite(v) else None


def cell_text(value: Any) -> str:
    """A table cell: numbers to 3 decimals, ``—`` for a missing (or non-finite) value."""
    v = _number(value)
    if v is not None:
        return f"{v:.3f}"
    if value is None or isinstance(value, (int, float)):
        return MISSING
    return " ".join(str(value).split())


def _head(col: str) -> str:
    if col == "method":
        return "method"
    arrow = BETTER.get(col.split()[0], "")
    return f"{col} {arrow}".rstrip()


def _count(value: Any) -> str:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else "?"


def report_model(report: dict[str, Any]) -> str:
    config = report.get("config") or {}
    model = report.get("model") or config.get("model")
    return str(model) if model else "?"


def baseline_caption(report: dict[str, Any], info: dict[str, Any] | None) -> str:
    """One line: the model, the forget/retain sizes and the unedited model's own scores of a table or figure."""
    info = info or {}
    parts = [f"model {report_model(report)}", f"{_count(info.get('forget'))} forget / {_count(info.get('retain'))} "
                                              "retain"]
    if isinstance(info.get("known"), int) and isinstance(info.get("items"), int):
        parts[-1] += f" (from the {info['known']} of {info['items']} items the model knows)"
    elif isinstance(info.get("items"), int):
        parts[-1] += f" (of {info['items']} items)"
    if isinstance(info.get("rephrase"), int):
        parts.append(f"{info['rephrase']} rephrased")
    ft = info.get("finetune")
    if isinstance(ft, dict):
        parts.append(f"fine-tuned first on {_count(ft.get('items'))} items")
    b = info.get("baseline")
    if isinstance(b, dict):
        scores = [f"{k} {cell_text(b.get(k))}" for k in ("forget R1", "retain R1", "rephrase R1", "composite")
                  if k in b and (k != "rephrase R1" or b.get(k) is not None)]
        parts.append("unedited: " + ", ".join(scores))
    else:
        parts.append("unedited baseline: not measured (no finished run)")
    return "; ".join(parts)


def _ident(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


def _error_text(row: dict[str, Any]) -> str:
    error = " ".join(str(row.get("error") or "").split())
    if len(error) > ERROR_WIDTH:
        error = error[:ERROR_WIDTH - 1] + "…"
    return f"failed: {error}" if error else "failed"


# ===================================================================== the screen
class PaperScreen(Screen[None]):
    """A ``paper --out`` folder's results; ``report`` (already loaded by :func:`load_paper_report`) is read
    from ``path`` when not given (raising UserError, before anything is shown)."""

    BINDINGS = [Binding("escape,q", "close", "Close", id="unlearn.paper_close")]

    DEFAULT_CSS = """
    PaperScreen #paper-head { height: auto; padding: 0 1; background: $panel; }
    PaperScreen #paper-scroll { height: 1fr; padding: 0 1; }
    PaperScreen .paper-heading { height: auto; margin-top: 1; text-style: bold; color: $accent; }
    PaperScreen .paper-caption { height: auto; color: $text-muted; }
    PaperScreen .paper-table { height: auto; max-height: 20; margin-bottom: 1; }
    PaperScreen .paper-bars { height: 12; min-width: 40; }
    PaperScreen .paper-lines { height: 18; min-width: 40; }
    """

    def __init__(self, path: str | Path, report: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.path = paper_json_path(path)
        self.report = report if report is not None else load_paper_report(path)
        self.plotted: dict[str, dict[str, Any]] = {}   # plot widget id -> what it draws (title, data)
        self._ids: set[str] = set()

    def _unique(self, base: str) -> str:
        wid, n = base, 1
        while wid in self._ids:
            n += 1
            wid = f"{base}-{n}"
        self._ids.add(wid)
        return wid

    # ---- layout
    def compose(self) -> ComposeResult:
        yield Static(self._head_text(), id="paper-head")
        with VerticalScroll(id="paper-scroll"):
            yield from self._tables()
            yield from self._bars()
            yield from self._figures()

    def _head_text(self) -> Text:
        r = self.report
        head = Text("Paper results", style="bold")
        head.append(f"  {self.path}  ·  model {report_model(r)}")
        if (r.get("config") or {}).get("quick"):
            head.append("  (--quick: a smoke run, not the paper's numbers)", style="italic")
        t = r.get("trials") or {}
        if isinstance(t.get("total"), int):
            head.append(f"  ·  {t['total']} run(s), {_count(t.get('failed'))} failed")
        head.append("\nesc/q: close · ↑↓ PgUp PgDn: scroll · tab: the next table", style="dim")
        return head

    def _tables(self) -> Iterator[Any]:
        for tname, per in self.report.get("tables", {}).items():
            cols = TABLE_COLUMNS[tname]
            for setting, t in per.items():
                yield Static(Text(f"{TABLE_TITLES[tname]} ({setting} setting)"), classes="paper-heading")
                yield Static(Text(baseline_caption(self.report, t["info"])), classes="paper-caption")
                wid = self._unique(f"paper-{tname}-{_ident(str(setting))}")
                table: DataTable = DataTable(id=wid, classes="paper-table", cursor_type="row", zebra_stripes=True)
                for col in cols:
                    table.add_column(_head(col), key=col)
                table.add_column("status", key="status")
                base = t["info"].get("baseline")
                if isinstance(base, dict):
                    table.add_row(*self._cells("unedited (baseline)", base, cols), Text("baseline"), key="baseline")
                else:
                    table.add_row(Text("unedited (baseline)"), *(Text(MISSING, justify="right") for _ in cols[1:]),
                                  Text("not measured"), key="baseline")
                for i, row in enumerate(t["rows"]):
                    ok = row.get("status", "ok") == "ok"
                    table.add_row(*self._cells(row["method"], row, cols),
                                  Text("ok" if ok else _error_text(row), style="" if ok else "red"), key=f"row{i}")
                yield table

    @staticmethod
    def _cells(label: str, values: dict[str, Any], cols: tuple[str, ...]) -> list[Text]:
        return [Text(label), *(Text(cell_text(values.get(c)), justify="right") for c in cols[1:])]

    def _bars(self) -> Iterator[Any]:
        tables = self.report.get("tables", {})
        tname = "table1" if tables.get("table1") else "table2"
        for setting, t in (tables.get(tname) or {}).items():
            rows = [(r["method"], _number(r.get("composite"))) for r in t["rows"]]
            base = _number((t["info"].get("baseline") or {}).get("composite"))
            labels = [m for m, v in rows if v is not None]
            values = [v for _, v in rows if v is not None]
            missing = [m for m, v in rows if v is None]
            title = f"{setting} setting; " + (
                f"unedited {base:.3f}" if base is not None else "unedited: not measured")
            if missing:
                title += f"; no composite: {', '.join(missing)}"
            yield Static(Text(f"Composite per method ({setting} setting), {TABLE_TITLES[tname].split(':')[0]}"),
                         classes="paper-heading")
            wid = self._unique(f"paper-bars-{_ident(str(setting))}")
            plot = PlotextPlot(id=wid, classes="paper-bars")
            plot.styles.height = max(BARS_MIN_HEIGHT, 2 * (len(labels) + 1) + 5)
            plt = plot.plt
            plt.clear_data()
            # horizontal bars, each labelled with its value: the unedited model (grey) on top, then the methods
            # in the table's order; a grey line marks the unedited composite across them
            top = float(len(labels) + 1)
            ticks: list[float] = []
            names: list[str] = []
            if base is not None:
                plt.bar([top], [base], orientation="horizontal", color="gray", width=BAR_WIDTH)
                plt.vline(base, "gray")
                ticks, names = [top], [f"unedited {base:.3f}"]
            if labels:
                pos = [float(i) for i in range(len(labels), 0, -1)]
                plt.bar(pos, values, orientation="horizontal", width=BAR_WIDTH)
                ticks += pos
                names += [f"{m} {v:.3f}" for m, v in zip(labels, values)]
            if ticks:
                plt.yticks(ticks, names)
            plt.title(title)
            plt.xlabel("composite")
            plt.xlim(0, COMPOSITE_MAX)
            self.plotted[wid] = {"kind": "bars", "title": title, "labels": labels, "values": values,
                                 "baseline": base}
            yield plot

    def _figures(self) -> Iterator[Any]:
        for fname, fig in self.report.get("figures", {}).items():
            xs = list(fig["x"])
            xlabel = fig.get("xlabel") or FIGURE_XLABELS[fname]
            series: dict[str, list[float | None]] = {"unedited": [_number(v) for v in fig["baseline"]]}
            for m, pts in fig["series"].items():
                series[str(m)] = [_number((p or {}).get("composite")) for p in pts]
            yield Static(Text(f"{FIGURE_TITLES[fname]} (factual setting)"), classes="paper-heading")
            if fig.get("info"):
                yield Static(Text(baseline_caption(self.report, fig["info"])), classes="paper-caption")
            wid = self._unique(f"paper-{fname}")
            plot = PlotextPlot(id=wid, classes="paper-lines")
            plt = plot.plt
            plt.clear_data()
            for name, vals in series.items():      # x evenly spaced (the factors are not), labelled by value
                pts = [(i, v) for i, v in enumerate(vals) if v is not None]
                if pts:
                    plt.plot([i for i, _ in pts], [v for _, v in pts], label=name,
                             **({"color": "gray"} if name == "unedited" else {}))
            if xs:
                plt.xticks([float(i) for i in range(len(xs))], [str(x) for x in xs])
            title = f"{FIGURE_TITLES[fname]}"
            plt.title(title)
            plt.xlabel(xlabel)
            plt.ylabel("composite")
            plt.ylim(0, COMPOSITE_MAX)
            self.plotted[wid] = {"kind": "lines", "title": title, "xlabel": xlabel, "x": xs, "series": series}
            yield plot

    def on_mount(self) -> None:
        self.query_one("#paper-scroll", VerticalScroll).focus()

    def action_close(self) -> None:
        self.dismiss(None)


class PaperApp(App[int]):
    """``unlearn-tui paper --view``: the :class:`PaperScreen` of one report, nothing else; closing it quits."""

    TITLE = "unlearn-tui paper"

    def __init__(self, path: str | Path, report: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        self.report = report if report is not None else load_paper_report(path)
        self._use_our_theme()

    def _use_our_theme(self) -> None:
        """The app's themes and the configured one (a bad theme or settings file: the default, silently)."""
        from .. import themes
        from ..settings import load as load_settings

        found, _problems = themes.load_all()
        for t in found:
            self.register_theme(t)
        wanted = load_settings()[0].theme
        self.theme = wanted if wanted in self.available_themes else themes.DEFAULT_DARK

    def on_mount(self) -> None:
        self.push_screen(PaperScreen(self.path, self.report), lambda _: self.exit(0))
