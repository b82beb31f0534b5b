"""A/B view: two results (the baseline or a run) item by item, both generations side by side.

Pick A and B at the top; the table lists every item both evaluated (ROUGE-1
of A, of B, and B − A); the two panels below show the highlighted item's
question, gold answer and each side's whole generation, wrapped.
"""

from __future__ import annotations

from rich.markup import escape
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Select, Static


class CompareScreen(ModalScreen[None]):
    """``entries``: :class:`tui.results_store.Entry` rows that have per-item scores (``eval``)."""

    BINDINGS = [Binding("escape", "close", "Close", id="unlearn.compare_close"),
                Binding("s", "swap", "Swap A/B", id="unlearn.compare_swap")]

    DEFAULT_CSS = """
    CompareScreen #ab-box { width: 96%; max-width: 200; height: 92%; border: thick $primary;
                            background: $surface; padding: 0 1; }
    CompareScreen #ab-pick { height: auto; }
    CompareScreen #ab-pick Select { width: 1fr; }
    CompareScreen #ab-pick Static { width: auto; padding: 1 1 0 0; }
    CompareScreen #ab-items { height: 1fr; min-height: 4; }
    CompareScreen #ab-question { height: auto; max-height: 3; }
    CompareScreen #ab-side { height: 1fr; min-height: 5; }
    CompareScreen .ab-answer { width: 1fr; height: 1fr; border: round $panel; padding: 0 1; overflow-y: auto; }
    """

    def __init__(self, entries: list, a: str | None = None, b: str | None = None) -> None:
        super().__init__()
        self.entries = [e for e in entries if e.eval is not None]
        keys = [e.key for e in self.entries]
        self.b = b if b in keys else (keys[-1] if keys else None)
        others = [k for k in keys if k != self.b]
        self.a = a if a in keys and a != self.b else (others[0] if others else self.b)
        self.rows: list[tuple] = []

    def entry(self, key: str | None):
        return next((e for e in self.entries if e.key == key), None)

    def compose(self) -> ComposeResult:
        options = [(f"{e.num} {e.label}", e.key) for e in self.entries]
        with Vertical(id="ab-box"):
            yield Static("[b]A/B: two results item by item[/b]  s: swap · esc: close", classes="hint")
            with Horizontal(id="ab-pick"):
                yield Static("A")
                yield Select(options, value=self.a, allow_blank=False, id="ab-a-pick", compact=True)
                yield Static("B")
                yield Select(options, value=self.b, allow_blank=False, id="ab-b-pick", compact=True)
            yield DataTable(id="ab-items", cursor_type="row", zebra_stripes=True)
            yield Static("", id="ab-question")
            with Horizontal(id="ab-side"):
                yield Static("", id="ab-a", classes="ab-answer")
                yield Static("", id="ab-b", classes="ab-answer")

    def on_mount(self) -> None:
        t = self.query_one("#ab-items", DataTable)
        for key, head in (("split", "split"), ("id", "id"), ("gold", "gold"), ("a", "A R1"), ("b", "B R1"),
                          ("d", "B−A"), ("ga", "A answer"), ("gb", "B answer")):
            t.add_column(head, key=key)
        self.fill()
        t.focus()

    def on_select_changed(self, event: Select.Changed) -> None:
        if event.select.id == "ab-a-pick" and event.value != self.a:
            self.a = str(event.value)
            self.fill()
        elif event.select.id == "ab-b-pick" and event.value != self.b:
            self.b = str(event.value)
            self.fill()

    def action_swap(self) -> None:
        self.a, self.b = self.b, self.a
        with self.prevent(Select.Changed):
            self.query_one("#ab-a-pick", Select).value = self.a
            self.query_one("#ab-b-pick", Select).value = self.b
        self.fill()

    def pairs(self) -> list[tuple]:
        """(split, item id, A score, B score) for every item of A or B (a side without it: None)."""
        ea, eb = self.entry(self.a), self.entry(self.b)
        if ea is None or eb is None:
            return []
        out = []
        for split in dict.fromkeys([*ea.eval.splits, *eb.eval.splits]):
            sa = {s.id: s for s in ea.eval.splits[split].items} if split in ea.eval.splits else {}
            sb = {s.id: s for s in eb.eval.splits[split].items} if split in eb.eval.splits else {}
            for item_id in dict.fromkeys([*sa, *sb]):
                out.append((split, item_id, sa.get(item_id), sb.get(item_id)))
        return out

    def fill(self) -> None:
        t = self.query_one("#ab-items", DataTable)
        t.clear()
        self.rows = self.pairs()
        for i, (split, item_id, a, b) in enumerate(self.rows):
            s = a or b
            d = f"{b.rouge1 - a.rouge1:+.2f}" if a and b else "—"
            t.add_row(split, item_id, s.answer[:24], f"{a.rouge1:.2f}" if a else "—",
                      f"{b.rouge1:.2f}" if b else "—", d, (a.generation if a else "—")[:30],
                      (b.generation if b else "—")[:30], key=str(i))
        self.show(0)

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.row_key is not None and event.row_key.value is not None:
            self.show(int(event.row_key.value))

    def show(self, index: int) -> None:
        ea, eb = self.entry(self.a), self.entry(self.b)
        qa = self.query_one("#ab-a", Static)
        qb = self.query_one("#ab-b", Static)
        qa.border_title = f"A: {ea.num} {ea.label}" if ea else "A"
        qb.border_title = f"B: {eb.num} {eb.label}" if eb else "B"
        if not 0 <= index < len(self.rows):
            self.query_one("#ab-question", Static).update("[dim]no items to compare[/dim]")
            qa.update("")
            qb.update("")
            return
        split, item_id, a, b = self.rows[index]
        s = a or b
        self.query_one("#ab-question", Static).update(
            f"[b]{escape(split)} {escape(item_id)}[/b]: {escape(s.question)}  [dim]gold:[/dim] {escape(s.answer)}")
        for side, w in ((a, qa), (b, qb)):
            w.update("[dim]not evaluated on this item[/dim]" if side is None else
                     f"{escape(side.generation) or '[dim](empty)[/dim]'}\n[dim]R1 {side.rouge1:.2f} · "
                     f"P {side.probability:.3f}[/dim]")

    def action_close(self) -> None:
        self.dismiss(None)
