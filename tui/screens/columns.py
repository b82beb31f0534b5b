"""The Results pane's column chooser: every column with its direction and meaning; space toggles."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, SelectionList, Static
from textual.widgets.selection_list import Selection


class ColumnChooser(ModalScreen["list[str] | None"]):
    """Dismisses with the keys of the columns to show (in table order), or None (cancelled)."""

    BINDINGS = [Binding("escape", "cancel", "Cancel", id="unlearn.columns_cancel"),
                Binding("enter", "accept", "Apply", id="unlearn.columns_apply", priority=True)]

    def __init__(self, columns, shown: list[str]) -> None:
        super().__init__()
        self.columns, self.shown = tuple(columns), set(shown)

    def compose(self) -> ComposeResult:
        with Vertical(id="columns-box", classes="dialog"):
            yield Static("[b]Results columns[/b]  space: show/hide · enter: apply · esc: cancel "
                         "· ↑ higher is better, ↓ lower is better", classes="hint")
            yield SelectionList(*[Selection(f"{c.label:<15} {c.help}", c.key, c.key in self.shown)
                                  for c in self.columns], id="columns-list")
            with Horizontal(classes="buttons"):
                yield Button("Apply", id="apply", variant="primary", compact=True)
                yield Button("Cancel", id="cancel", compact=True)

    def on_mount(self) -> None:
        self.query_one("#columns-list", SelectionList).focus()

    def chosen(self) -> list[str]:
        picked = set(self.query_one("#columns-list", SelectionList).selected)
        return [c.key for c in self.columns if c.key in picked]

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(self.chosen() if event.button.id == "apply" else None)

    def action_accept(self) -> None:
        self.dismiss(self.chosen())

    def action_cancel(self) -> None:
        self.dismiss(None)
