"""Error modal: the one-line message of an engine error; the app keeps running."""

from __future__ import annotations

from rich.markup import escape
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Static


class ErrorModal(ModalScreen[None]):
    BINDINGS = [Binding("escape,enter", "close", "Close", id="unlearn.error_close")]

    def __init__(self, message: str, title: str = "Error") -> None:
        super().__init__()
        self.message, self.title_text = message, title

    def compose(self) -> ComposeResult:
        with Vertical(id="error-box", classes="dialog"):
            yield Static(f"[b]{escape(self.title_text)}[/b]")
            yield Static(escape(self.message), id="error-message")
            yield Button("OK", id="ok", variant="primary", compact=True)

    def on_mount(self) -> None:
        self.query_one("#ok", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(None)

    def action_close(self) -> None:
        self.dismiss(None)
