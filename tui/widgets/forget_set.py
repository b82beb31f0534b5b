"""Forget set pane: the loaded QA items, search, forget/retain selection, baseline knowledge."""

from __future__ import annotations

from rich.markup import escape
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Button, DataTable, Input, Static

from ..actions import pane_bindings
from . import ActionRequested, Revisions

HINT = "space forget · r retain (then ↓) · / search · known: ROUGE-1 of the answer"


def known_cell(score: float | None, pending: bool) -> Text:
    if score is None:
        return Text("…" if pending else "—", style="dim")
    style = "bold green" if score >= 0.5 else ("yellow" if score > 0 else "dim")
    return Text(f"{score:.2f}", style=style)


class SearchInput(Input):
    """The search box: Esc (or Enter) goes back to the table; ``/`` (the search key) selects the query
    instead of typing a slash (ids, questions and answers are searched for words, not slashes)."""

    BINDINGS = [Binding("escape", "back", "Back to the table", show=False, id="unlearn.search_back"),
                Binding("slash", "select_query", "Search", show=False, priority=True, id="unlearn.search_again")]

    class Back(Message):
        pass

    def action_back(self) -> None:
        self.post_message(self.Back())

    def action_select_query(self) -> None:
        self.select_all()


class ForgetSetPane(Vertical):
    """Items table; space -> forget (and the next row), r -> retain, / -> search, Esc -> back to the table.

    The forget list keeps the data's order (the table's): clicking order does not change the experiment
    (merging groups requests in that order); reordering is explicit (the Targets pane's alt+up/down)."""

    BINDINGS = pane_bindings("forget")

    class Toggled(Message):
        """Put ``item_id`` in the ``which`` ("forget" | "retain") set, or take it out."""

        def __init__(self, item_id: str, which: str) -> None:
            super().__init__()
            self.item_id, self.which = item_id, which

    class Viewed(Message):
        """The rows on screen changed (scrolled, cursor moved): the App scores the unknown ones next."""

    def __init__(self, workspace, **kw) -> None:
        super().__init__(**kw)
        self.ws = workspace
        self.ready = False
        self._revs = Revisions()

    def compose(self) -> ComposeResult:
        with Horizontal(classes="pane-head"):
            yield Static("no data loaded", id="fs-counts", classes="counts")
            yield Button("Open data…", id="fs-open", compact=True)
        yield SearchInput(placeholder="search id / question / answer  (/; esc: back)", id="fs-search")
        table = DataTable(id="fs-table", cursor_type="row", zebra_stripes=True)
        yield table
        yield Static(HINT, id="fs-hint", classes="hint")

    def on_mount(self) -> None:
        t = self.query_one("#fs-table", DataTable)
        # Text labels, not str: a str label is parsed as markup, which loads Rich's emoji table before the
        # first frame (this pane is the only one built for it)
        # known before the question: a pane narrower than every column still shows it (no scrolling)
        for key, width in (("set", 3), ("id", 8), ("known", 5), ("question", 36), ("answer", 14)):
            t.add_column(Text(key), key=key, width=width)
        self.refresh_from(self.ws)
        self.watch(t, "scroll_y", self._viewport_moved, init=False)
        self.ready = True

    def _viewport_moved(self, *_: object) -> None:
        self.post_message(self.Viewed())

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.data_table.id == "fs-table":
            self.post_message(self.Viewed())

    def rows_on_screen(self) -> list[str]:
        """Ids of the rows the table shows now, top to bottom (the first 20 while it has no size yet)."""
        t = self.query_one("#fs-table", DataTable)
        height = t.scrollable_content_region.height - (t.header_height if t.show_header else 0)
        if height <= 0:
            height = 20
        top = max(0, int(t.scroll_y))
        return [it.id for it in self.visible_items()[top:top + height]]

    def refresh_from(self, ws) -> None:
        """Redraw what changed in the workspace: the rows (new data), else the marks and known scores."""
        self.ws = ws
        rows = self._revs.changed(ws, "items", "session")
        marks = self._revs.changed(ws, "selection", "baseline")
        if rows:
            self.refresh_items()
        elif marks:
            self.refresh_marks()
        else:
            self.refresh_counts()

    # ------------------------------------------------------------------ data
    @property
    def search(self) -> str:
        return self.query_one("#fs-search", Input).value.strip().lower()

    def visible_items(self) -> list:
        items = self.ws.items or []
        q = self.search
        if not q:
            return list(items)
        return [it for it in items if q in it.id.lower() or q in it.question.lower() or q in it.answer.lower()]

    def _mark(self, item_id: str) -> Text:
        if item_id in self.ws.forget_ids:
            return Text("F", style="bold red")
        if item_id in self.ws.retain_ids:
            return Text("R", style="bold green")
        return Text(" ")

    def refresh_items(self) -> None:
        t = self.query_one("#fs-table", DataTable)
        keep, keep_id = t.cursor_row, self.current_id()
        t.clear()
        pending = self.ws.baseline_pending
        shown = self.visible_items()
        for it in shown:
            t.add_row(self._mark(it.id), it.id, known_cell(self.ws.baseline_scores.get(it.id), pending),
                      it.question, it.answer, key=it.id)
        if t.row_count:
            # the cursor stays on its item while the filter changes (a toggle then hits the row it shows)
            ids = [it.id for it in shown]
            row = ids.index(keep_id) if keep_id in ids else min(max(keep, 0), t.row_count - 1)
            t.move_cursor(row=row)
        self.refresh_counts()

    def refresh_marks(self) -> None:
        t = self.query_one("#fs-table", DataTable)
        pending = self.ws.baseline_pending
        for it in self.visible_items():
            try:
                t.update_cell(it.id, "set", self._mark(it.id))
                t.update_cell(it.id, "known", known_cell(self.ws.baseline_scores.get(it.id), pending))
            except Exception:  # row filtered out meanwhile
                pass
        self.refresh_counts()

    def refresh_counts(self) -> None:
        ws = self.ws
        n = len(ws.items or [])
        known = sum(1 for v in ws.baseline_scores.values() if v >= 0.5)
        src = ws.session.data.path
        text = (f"[b]{len(ws.forget_ids)}[/b] forget · [b]{len(ws.retain_ids)}[/b] retain · {n} items"
                f" · {known} known · {src}") if ws.items is not None else f"no data loaded · {src}"
        self.query_one("#fs-counts", Static).update(text)

    def current_id(self) -> str | None:
        t = self.query_one("#fs-table", DataTable)
        if not t.row_count:
            return None
        try:
            return t.coordinate_to_cell_key(t.cursor_coordinate).row_key.value
        except Exception:
            return None

    # ------------------------------------------------------------------ events
    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "fs-search":
            self.refresh_items()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "fs-search":
            self.query_one("#fs-table", DataTable).focus()

    def on_search_input_back(self, event: SearchInput.Back) -> None:
        event.stop()
        self.query_one("#fs-table", DataTable).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "fs-open":
            self.post_message(ActionRequested("open_data"))

    def action_toggle_forget(self) -> None:
        self._toggle("forget")

    def action_toggle_retain(self) -> None:
        self._toggle("retain")

    def _toggle(self, which: str) -> None:
        """Toggle the row under the cursor, say what happened, and move to the next row."""
        item_id = self.current_id()
        if not item_id:
            return
        mine = self.ws.forget_ids if which == "forget" else self.ws.retain_ids
        now = "out of" if item_id in mine else "into"
        self.post_message(self.Toggled(item_id, which))
        self.query_one("#fs-hint", Static).update(
            f"[b]{escape(item_id)}[/b] {now} the {which} set · the cursor moved to the next row ↓")
        self._advance()

    def action_focus_search(self) -> None:
        self.query_one("#fs-search", Input).focus()

    def _advance(self) -> None:
        t = self.query_one("#fs-table", DataTable)
        if t.cursor_row < t.row_count - 1:
            t.move_cursor(row=t.cursor_row + 1)
