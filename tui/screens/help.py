"""Help screen: every action, its key (after the user keymap) and what it does."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Static

from ..actions import ACTIONS, current_keys


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,f1,q", "dismiss", "Close", id="unlearn.help_close")]

    def compose(self) -> ComposeResult:
        with Vertical(id="help-box", classes="dialog"):
            yield Static("[b]unlearn-tui — keys[/b]   (rebind in keymap.toml by action id; ctrl+p: all commands)")
            yield DataTable(id="help-table", cursor_type="row", zebra_stripes=True)
            yield Static("escape: close", classes="hint")

    def on_mount(self) -> None:
        t = self.query_one("#help-table", DataTable)
        t.add_columns("key", "action", "id", "where")
        keys = current_keys(self.app)
        for a in ACTIONS:
            t.add_row(keys[a.id], a.description, a.id, a.scope if a.scope != "app" else "anywhere")
        t.focus()

    def action_dismiss(self, result=None) -> None:  # type: ignore[override]
        self.dismiss(None)
