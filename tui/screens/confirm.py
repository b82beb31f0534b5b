"""The unsaved-changes modal (quit, open, new session): save / discard / cancel."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Static


class ConfirmQuit(ModalScreen[str]):
    """Dismisses with "save", "discard" or "cancel"."""

    BINDINGS = [Binding("escape", "choose('cancel')", "Cancel", id="unlearn.quit_cancel"),
                Binding("s", "choose('save')", "Save", id="unlearn.quit_save"),
                Binding("d", "choose('discard')", "Discard", id="unlearn.quit_discard")]

    def __init__(self, what: str = "The session has unsaved changes.", verb: str = "quitting") -> None:
        super().__init__()
        self.what, self.verb = what, verb

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm-box", classes="dialog"):
            yield Static(f"[b]{self.what}[/b]\nSave before {self.verb}?", id="confirm-text")
            with Horizontal(classes="buttons"):
                yield Button("Save (s)", id="save", variant="primary")
                yield Button("Discard (d)", id="discard", variant="error")
                yield Button("Cancel (esc)", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#save", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id or "cancel")

    def action_choose(self, choice: str) -> None:
        self.dismiss(choice)


class RestoreAutosave(ModalScreen[str]):
    """An autosave was found: restore it, discard it, or keep it for later (dismisses with that word)."""

    BINDINGS = [Binding("escape", "choose('later')", "Not now", id="unlearn.restore_later"),
                Binding("r", "choose('restore')", "Restore", id="unlearn.restore_yes"),
                Binding("d", "choose('discard')", "Discard", id="unlearn.restore_discard")]

    def __init__(self, offer, later: str = "Not now (esc)") -> None:
        super().__init__()
        self.offer, self.later = offer, later     # ``later``: the esc button's label (Ctrl+O: open the file)

    def compose(self) -> ComposeResult:
        from rich.markup import escape

        o = self.offer
        where = f" ({escape(str(o.session.path))})" if o.session.path is not None else ""
        with Vertical(id="confirm-box", classes="dialog"):
            yield Static(f"[b]Unsaved changes of {escape(o.name)}{where} were autosaved {o.age()}.[/b]\n"
                         "Restore them?", id="restore-text")
            with Horizontal(classes="buttons"):
                yield Button("Restore (r)", id="restore", variant="primary")
                yield Button("Discard (d)", id="discard", variant="error")
                yield Button(self.later, id="later")

    def on_mount(self) -> None:
        self.query_one("#restore", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id or "later")

    def action_choose(self, choice: str) -> None:
        self.dismiss(choice)
