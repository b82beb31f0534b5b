"""Path dialogs: open session, open data (file or built-in set), save as, import YAML."""

from __future__ import annotations

from pathlib import Path

from rich.markup import escape
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, DirectoryTree, Input, Static


class PathDialog(ModalScreen["str | None"]):
    """Type a path (or pick one in the tree, or a built-in name); dismisses with it or None."""

    AUTO_FOCUS = "#path-input"

    BINDINGS = [Binding("escape", "cancel", "Cancel", id="unlearn.dialog_cancel")]

    def __init__(self, title: str, value: str = "", start: Path | None = None, choices: list[str] | None = None,
                 must_exist: bool = True, ok: str = "Open") -> None:
        super().__init__()
        self.title_text, self.value, self.start = title, value, start or Path.cwd()
        self.choices, self.must_exist, self.ok = choices or [], must_exist, ok

    def compose(self) -> ComposeResult:
        with Vertical(id="path-box", classes="dialog"):
            yield Static(f"[b]{escape(self.title_text)}[/b]")
            if self.choices:
                yield Static("built-in: " + ", ".join(escape(c) for c in self.choices), classes="hint")
            # select_on_focus off: keys typed before the dialog had focus are kept, not selected and
            # replaced by the next key (fast typing lost characters); the cursor starts at the end
            yield Input(self.value, id="path-input", placeholder="path (enter to accept)", select_on_focus=False)
            yield Static("", id="path-error", classes="error")
            yield DirectoryTree(str(self.start), id="path-tree")
            with Horizontal(classes="buttons"):
                yield Button(self.ok, id="ok", variant="primary", compact=True)
                yield Button("Cancel", id="cancel", compact=True)

    def on_mount(self) -> None:
        self.query_one("#path-input", Input).focus()

    def on_directory_tree_file_selected(self, event: DirectoryTree.FileSelected) -> None:
        self.query_one("#path-input", Input).value = str(event.path)
        self.query_one("#path-input", Input).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self._accept()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "ok":
            self._accept()
        else:
            self.dismiss(None)

    def _accept(self) -> None:
        text = self.query_one("#path-input", Input).value.strip()
        if not text:
            self.query_one("#path-error", Static).update("type a path")
            return
        is_special = text.startswith(("builtin:", "hub:")) or text in self.choices
        if self.must_exist and not is_special and not Path(text).expanduser().exists():
            self.query_one("#path-error", Static).update(f"not found: {escape(text)}")
            return
        self.dismiss(text)

    def action_cancel(self) -> None:
        self.dismiss(None)
