"""Results pane: the baseline row, one row per run and per step-mode state, deltas, a legend, a column
chooser, the per-item drill-down, the charts, the A/B view and export.

The rows are :func:`tui.results_store.entries` of the workspace (``baseline_eval``,
``results``, ``step_rows``): the unedited model first (``B``), then the runs
(``1``, ``2``, ...), then the step states (``s1``, ...).  Every numeric column
names its better direction (↑/↓; the legend says what each abbreviation
means), the best value of each column among the edited rows is highlighted,
``Δcomp`` is the composite minus the baseline's, and ``d`` shows every cell as
its difference from the baseline.  Columns are sized to their labels (never
cut) and the table scrolls sideways.  Keys (active in the pane): ``c``
columns, ``d`` deltas, ``a`` A/B view, ``g`` answers/charts, ``x`` export.
"""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import ContentSwitcher, DataTable, Static

from ..actions import BY_ID, pane_bindings
from ..results_store import BY_KEY, COLUMNS, baseline_note, entries
from . import Revisions, ScreenRequested

FIXED = (("n", "#"), ("label", "run"), ("targets", "targets"), ("m", "m"))
DETAIL = (("split", "split", 8), ("id", "id", 8), ("gold", "gold", 12), ("before", "before", 0),
          ("after", "after", 0), ("r1", "R1 b→a", 10))


def fmt(v: Any, signed: bool = False) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:+.3f}".replace("-", "−") if signed else f"{v:.3f}"
    return str(v)


def default_columns(items: list) -> list[str]:
    """The columns shown until the user chooses: the usual ones, and the "auto" ones some row has a value of."""
    return [c.key for c in COLUMNS
            if c.shown == "yes" or (c.shown == "auto" and any(e.values.get(c.key) is not None for e in items))]


def extras_line(ev: Any) -> str:
    """`` · FQ 0.031 · MU 0.412 · …`` for the ``[eval] extra`` numbers of ``ev`` ('' without extras)."""
    from unlearn_tui.backends.metrics import flat_extras

    vals = flat_extras(ev)
    parts = []
    for key, head in (("forget_quality", "FQ"), ("model_utility", "MU"), ("mia.privleak", "privleak"),
                      ("mia.mink_auc", "MIA AUC"), ("perplexity", "ppl")):
        if vals.get(key) is not None:
            parts.append(f"{head} {fmt(vals[key])}")
    if vals.get("relearn.after") is not None:
        parts.append(f"relearn {fmt(vals.get('relearn.before'))}→{fmt(vals['relearn.after'])}")
    return "".join(f" · {p}" for p in parts)


def _key(action: str) -> str:
    return BY_ID[action].key if action in BY_ID else "?"


class ResultsPane(Vertical):
    BINDINGS = pane_bindings("results")

    class ColumnsChosen(Message):
        """The user chose the columns ``keys`` (the App keeps the choice in the settings: next launch too)."""

        def __init__(self, keys: list[str]) -> None:
            super().__init__()
            self.keys = keys

    def __init__(self, workspace, **kw) -> None:
        super().__init__(**kw)
        self.ws = workspace
        self.ready = False
        self._revs = Revisions()
        saved = getattr(getattr(workspace, "settings", None), "results_columns", None)
        # the columns the user chose (None: the defaults); the last choice is in the settings
        self.choice: list[str] | None = [k for k in saved if k in BY_KEY] if saved is not None else None
        self.deltas = False                      # cells as differences from the baseline
        self.items: list = []                    # the rows (tui.results_store.Entry), as last drawn
        self.current: str | None = None          # key of the row the drill-down shows
        self._detail_rows: list[tuple] = []
        self._detail_width = 0

    def compose(self) -> ComposeResult:
        yield DataTable(id="rs-table", cursor_type="row", zebra_stripes=True)
        yield Static("", id="rs-legend", classes="hint")
        yield Static("", id="rs-note", classes="warn")
        yield Static("highlight a row: per-item answers before → after", id="rs-detail-title", classes="section")
        with ContentSwitcher(id="rs-switch", initial="rs-answers"):
            with Vertical(id="rs-answers"):
                yield DataTable(id="rs-items", cursor_type="row")
                yield Static("", id="rs-answer")
            from .charts import ChartsView

            yield ChartsView(id="rs-charts")

    def on_mount(self) -> None:
        self._revs.changed(self.ws, "results", "session")
        self._build_detail_columns()
        self.refresh_rows()
        self.ready = True

    def refresh_from(self, ws) -> None:
        self.ws = ws
        if self._revs.changed(ws, "results", "session"):
            self.refresh_rows()

    # ---------------------------------------------------------------- rows and columns
    def entries(self) -> list:
        return entries(self.ws.baseline_eval, list(self.ws.results or []), list(getattr(self.ws, "step_rows", [])))

    def rows(self) -> list[dict]:
        """The rows as flat dicts (column key -> value), baseline first."""
        return [{"row": e.num, "kind": e.kind, "method": e.label, **e.values} for e in self.entries()]

    def visible(self) -> list[str]:
        return list(self.choice) if self.choice is not None else default_columns(self.items)

    def refresh_rows(self) -> None:
        t = self.query_one("#rs-table", DataTable)
        self.items = self.entries()
        keep = self.current
        t.clear(columns=True)
        for key, head in FIXED:
            t.add_column(head, key=key)
        shown = [BY_KEY[k] for k in self.visible() if k in BY_KEY]
        for c in shown:
            t.add_column(c.label, key=c.key)
        edited = [e for e in self.items if e.kind != "baseline"]
        best: dict[str, float] = {}
        for c in shown:
            vals = [e.values[c.key] for e in edited if isinstance(e.values.get(c.key), (int, float))]
            if len(vals) >= 2 and c.better:
                best[c.key] = min(vals) if c.better == "low" else max(vals)
        for e in self.items:
            cells: list[Any] = [e.num, Text(e.label, style="bold" if e.kind == "baseline" else ""),
                                e.target_mode, e.merge]
            for c in shown:
                if self.deltas and e.kind != "baseline" and not c.key.startswith("delta.") \
                        and c.key not in ("seconds", "eval_seconds"):
                    v, signed = e.values.get(f"delta.{c.key}"), True
                else:
                    v, signed = e.values.get(c.key), c.key.startswith("delta.")
                style = "bold reverse" if c.key in best and e.values.get(c.key) == best[c.key] else ""
                if e.kind == "baseline":
                    style = "italic"
                cells.append(Text(fmt(v, signed), style=style, justify="right"))
            t.add_row(*cells, key=e.key)
        # header + rows + the horizontal scrollbar (height: auto leaves the scrollbar out and hides a row)
        t.styles.height = len(self.items) + 2
        self._legend(shown)
        self._note()
        charts = self.query("#rs-charts")
        if charts:
            charts.first().set_entries(self.items)
        if self.items:
            keys = [e.key for e in self.items]
            row = keys.index(keep) if keep in keys and keep != "base" else len(keys) - 1
            t.move_cursor(row=row)
            self.show_entry(keys[row])
        else:
            self.show_entry(None)

    def _legend(self, shown: list) -> None:
        heads = " ".join(c.label for c in shown)
        words = heads.replace("↑", " ").replace("↓", " ").split()
        terms = [t for t, present in (("↑ higher is better · ↓ lower is better", True),
                                      ("comp = 1 − fgt R1 + ret R1", "comp↑" in heads),
                                      ("fgt forget", "fgt" in words or "forget" in words),
                                      ("ret retain", "ret" in words), ("rephr rephrased forget", "rephr" in words),
                                      ("R1 ROUGE-1 recall", "R1" in words), ("P answer probability", "P" in words),
                                      ("MRR reciprocal rank", "MRR" in words), ("hit top-k share", "hit" in words),
                                      ("TR truth ratio", "TR" in words), ("Δ minus the baseline B", True)) if present]
        text = escape(" · ".join(terms))
        if self.deltas:
            text = "[b]Δ view: every cell is the row minus the baseline (B)[/b] · " + text
        keys = (f"{_key('results_columns')} columns {_key('results_deltas')} Δ view {_key('results_compare')} A/B "
                f"{_key('results_charts')} charts {_key('results_export')} export")
        self.query_one("#rs-legend", Static).update(f"{text} · [b]keys[/b] {escape(keys)}")

    def _note(self) -> None:
        notes = []
        warn = baseline_note(self.items)
        if warn:
            notes.append(f"⚠ {escape(warn)}")
        stored = getattr(self.ws, "results_note", "")
        if stored:
            notes.append(f"[dim]{escape(stored)}[/dim]")
        note = self.query_one("#rs-note", Static)
        note.update("\n".join(notes))
        note.display = bool(notes)

    def set_columns(self, keys: list[str] | None) -> None:
        """The column chooser's answer (None: unchanged)."""
        if keys is None:
            return
        self.choice = [k for k in keys if k in BY_KEY]
        self.refresh_rows()
        self.post_message(self.ColumnsChosen(list(self.choice)))

    # ---------------------------------------------------------------- the drill-down
    def _build_detail_columns(self) -> None:
        d = self.query_one("#rs-items", DataTable)
        width = self.size.width or 78
        fixed = sum(w + 2 for _, _, w in DETAIL if w) + 2 * 2 + 2
        gen = max(12, (width - fixed) // 2)
        self._detail_width = width
        d.clear(columns=True)
        for key, head, w in DETAIL:
            d.add_column(head, key=key, width=max(w or gen, len(head)))

    def on_resize(self, event: Any) -> None:
        if self.ready and abs(event.size.width - self._detail_width) >= 4:
            self._build_detail_columns()
            self.show_entry(self.current)

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.row_key is None or event.row_key.value is None:
            return
        if event.data_table.id == "rs-table":
            if event.row_key.value != self.current:
                self.show_entry(event.row_key.value)
        elif event.data_table.id == "rs-items":
            self._show_answer(int(event.row_key.value))

    def entry(self, key: str | None):
        return next((e for e in self.items if e.key == key), None)

    def show_items(self, index: int) -> None:
        """The drill-down of run ``index`` (0-based, as in ``workspace.results``)."""
        self.show_entry(f"r{index}")

    def show_entry(self, key: str | None) -> None:
        d = self.query_one("#rs-items", DataTable)
        d.clear()
        self._detail_rows = []
        self.current = key
        e = self.entry(key)
        title = self.query_one("#rs-detail-title", Static)
        answer = self.query_one("#rs-answer", Static)
        if e is None:
            title.update("no results yet: run (ctrl+r) or step (ctrl+t)")
            answer.update("")
            return
        if e.eval is None:
            title.update(f"{e.num} {e.label}: a step-mode state (quick ROUGE-1 of forget and retain only)")
            step = getattr(self.ws, "step_rows", [])[int(e.key[1:])] if e.key[1:].isdigit() else None
            probe = getattr(step, "probe", None)
            answer.update(f"[b]probe[/b] {escape(probe[0])}\n[dim]edited:[/dim] {escape(probe[1])}\n"
                          f"[dim]unedited:[/dim] {escape(probe[2])}" if probe and len(probe) >= 3 else "")
            return
        base = self.ws.baseline_eval if e.kind != "baseline" else None
        title.update(f"{e.num} {e.label}: per-item answers " + ("(the unedited model)" if base is None and
                                                                e.kind == "baseline" else "before → after")
                     + extras_line(e.eval))
        for split, scores in e.eval.splits.items():
            before = {}
            if base is not None and split in base.splits:
                before = {s.id: s for s in base.splits[split].items}
            for s in scores.items:
                b = before.get(s.id)
                if e.kind == "baseline":
                    row = (split, s.id, s.answer, s.generation, "(baseline)", f"{s.rouge1:.2f}")
                else:
                    r1 = f"{b.rouge1:.2f}→{s.rouge1:.2f}" if b else f"{s.rouge1:.2f}"
                    row = (split, s.id, s.answer, b.generation if b else "—", s.generation, r1)
                self._detail_rows.append((s, b, e.kind))
                d.add_row(*row, key=str(len(self._detail_rows) - 1))
        self._show_answer(0)

    def _show_answer(self, i: int) -> None:
        answer = self.query_one("#rs-answer", Static)
        if not 0 <= i < len(self._detail_rows):
            answer.update("")
            return
        s, b, kind = self._detail_rows[i]
        if kind == "baseline":
            answer.update(f"[b]{escape(s.id)}[/b] {escape(s.question)} [dim]gold:[/dim] {escape(s.answer)}\n"
                          f"[dim]answer:[/dim] {escape(s.generation)}")
            return
        answer.update(f"[b]{escape(s.id)}[/b] {escape(s.question)} [dim]gold:[/dim] {escape(s.answer)}\n"
                      f"[dim]before:[/dim] {escape(b.generation) if b else '—'}\n"
                      f"[dim]after:[/dim]  {escape(s.generation)}")

    # ---------------------------------------------------------------- keys
    def action_columns(self) -> None:
        from ..screens.columns import ColumnChooser

        self.post_message(ScreenRequested(ColumnChooser(COLUMNS, self.visible()), self.set_columns))

    def action_toggle_deltas(self) -> None:
        self.deltas = not self.deltas
        self.refresh_rows()

    def action_toggle_charts(self) -> None:
        sw = self.query_one("#rs-switch", ContentSwitcher)
        charts = sw.current != "rs-charts"
        sw.current = "rs-charts" if charts else "rs-answers"
        if charts:
            self.query_one("#rs-charts").set_entries(self.items)
        self.query_one("#rs-detail-title", Static).update(
            "charts: ROUGE-1 per split and the forget/retain/rephrase radar (g: back to the answers)" if charts
            else "highlight a row: per-item answers before → after")
        if not charts:
            self.show_entry(self.current)

    def action_compare(self) -> None:
        from ..screens.compare import CompareScreen

        with_items = [e for e in self.items if e.eval is not None]
        if len(with_items) < 2:
            self.notify("A/B needs two results with per-item answers (the baseline and a run)", severity="warning",
                        timeout=4)
            return
        b = self.current if self.entry(self.current) in with_items else with_items[-1].key
        a = "base" if b != "base" and self.entry("base") is not None else None
        self.post_message(ScreenRequested(CompareScreen(self.items, a, b)))

    def action_export(self) -> None:
        from .. import export

        if not self.items:
            self.notify("nothing to export yet", severity="warning", timeout=3)
            return
        folder, stem = export.export_stem(self.ws.session)
        try:
            written, note = export.export_all(self.items, folder, stem)
        except OSError as exc:
            self.notify(f"export failed: {exc.strerror or exc}", severity="error", timeout=8)
            return
        self.notify("exported " + ", ".join(p.name for p in written) + f" to {folder}", timeout=6)
        if note:
            self.notify(note, severity="warning", timeout=8)
