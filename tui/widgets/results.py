"""Results pane: one row per run, best per column highlighted, drill-down, composite bar chart."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Static

from . import Revisions


# (key in result_row, header, better: "low" | "high")
COLUMNS = (
    ("composite", "comp", "high"),
    ("forget.rouge1", "fgt R1", "low"),
    ("retain.rouge1", "ret R1", "high"),
    ("rephrase.rouge1", "reph R1", "low"),
    ("forget.probability", "fgt P", "low"),
    ("forget.mrr", "MRR", "low"),
    ("forget.top_hit", "hit", "low"),
    ("seconds", "sec", "low"),
)


def fmt(v: Any) -> str:
    if v is None:
        return "—"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


class ResultsPane(Vertical):
    def __init__(self, workspace, **kw) -> None:
        super().__init__(**kw)
        self.ws = workspace
        self.ready = False
        self._revs = Revisions()

    def compose(self) -> ComposeResult:
        yield DataTable(id="rs-table", cursor_type="row", zebra_stripes=True)
        yield Static("enter / highlight a row: per-item answers before → after", id="rs-detail-title",
                     classes="section")
        with Horizontal(id="rs-bottom"):
            yield DataTable(id="rs-items", cursor_type="row")
            yield Vertical(id="rs-chart-box")   # the plotext chart is mounted on first use (fast start-up)

    def on_mount(self) -> None:
        t = self.query_one("#rs-table", DataTable)
        t.add_column("#", key="n", width=2)
        t.add_column("method", key="method", width=7)
        t.add_column("target", key="targets", width=6)
        t.add_column("m", key="m", width=2)
        for key, head, _ in COLUMNS:
            t.add_column(head, key=key, width=6)
        d = self.query_one("#rs-items", DataTable)
        for key, head, width in (("split", "split", 7), ("id", "id", 8), ("gold", "gold", 12),
                                 ("before", "before", 24), ("after", "after", 24), ("r1", "R1", 9)):
            d.add_column(head, key=key, width=width)
        self._revs.changed(self.ws, "results", "session")
        self.refresh_rows()
        self.ready = True

    def refresh_from(self, ws) -> None:
        self.ws = ws
        if self._revs.changed(ws, "results", "session"):
            self.refresh_rows()

    def rows(self) -> list[dict]:
        if not self.ws.results:
            return []
        from unlearn_tui.backends.runner import result_row

        return [result_row(r) for r in self.ws.results]

    def refresh_rows(self) -> None:
        t = self.query_one("#rs-table", DataTable)
        t.clear()
        rows = self.rows()
        best: dict[str, float] = {}
        for key, _, better in COLUMNS:
            vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
            if len(vals) >= 2:
                best[key] = min(vals) if better == "low" else max(vals)
        for i, (row, res) in enumerate(zip(rows, self.ws.results)):
            cells: list[Any] = [str(i + 1), row["method"], row["target_mode"], str(row["merge_factor"])]
            for key, _, _ in COLUMNS:
                v = row.get(key)
                style = "bold reverse" if key in best and v == best[key] else ""
                cells.append(Text(fmt(v), style=style, justify="right"))
            t.add_row(*cells, key=str(i))
        labels = [f"{i + 1}:{r['method']}" for i, r in enumerate(rows) if r.get("composite") is not None]
        values = [r["composite"] for r in rows if r.get("composite") is not None]
        self.chart(labels, values)
        if rows:
            t.move_cursor(row=len(rows) - 1)
            self.show_items(len(rows) - 1)

    def chart(self, labels: list[str], values: list[float]) -> None:
        found = self.query("#rs-chart")
        if not found:
            if not labels:
                return
            from .charts import CompositeChart  # plotext is imported only when there is something to plot

            chart = CompositeChart(id="rs-chart")
            self.query_one("#rs-chart-box").mount(chart)
            chart.call_after_refresh(chart.set_bars, labels, values)
            return
        found.first().set_bars(labels, values)

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.data_table.id == "rs-table" and event.row_key is not None and event.row_key.value is not None:
            self.show_items(int(event.row_key.value))

    def show_items(self, index: int) -> None:
        d = self.query_one("#rs-items", DataTable)
        d.clear()
        if not 0 <= index < len(self.ws.results):
            return
        run = self.ws.results[index]
        base = self.ws.baseline_eval
        self.query_one("#rs-detail-title", Static).update(
            f"run {index + 1} ({run.label}): per-item answers before → after")
        for split, scores in run.eval.splits.items():
            before = {}
            if base is not None and split in base.splits:
                before = {s.id: s for s in base.splits[split].items}
            for s in scores.items:
                b = before.get(s.id)
                r1 = f"{b.rouge1:.2f}→{s.rouge1:.2f}" if b else f"{s.rouge1:.2f}"
                d.add_row(split, s.id, s.answer, b.generation if b else "—", s.generation, r1)
