"""Probe pane: ask the current (edited) model anything; see the unedited model's answer beside it."""

from __future__ import annotations

from rich.markup import escape
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, Input, Static

from . import ActionRequested, Revisions


class ProbePane(Vertical):
    def __init__(self, workspace, **kw) -> None:
        super().__init__(**kw)
        self.ws = workspace
        self.ready = False
        self._revs = Revisions()

    def compose(self) -> ComposeResult:
        with Horizontal(classes="pane-head"):
            yield Input(placeholder="ask the model a question and press enter", id="pb-question")
            yield Button("Ask", id="pb-ask", compact=True)
        with Horizontal(id="pb-answers"):
            with Vertical(classes="answer"):
                yield Static("[b]edited model[/b]", classes="section")
                yield Static("", id="pb-edited")
            with Vertical(classes="answer"):
                yield Static("[b]unedited model[/b]", classes="section")
                yield Static("", id="pb-original")
        yield Static("", id="pb-score", classes="hint")

    def on_mount(self) -> None:
        self._revs.changed(self.ws, "probe")
        self.ready = True

    def refresh_from(self, ws) -> None:
        """The latest answers (a probe, a step) and step mode's score line."""
        self.ws = ws
        if not self._revs.changed(ws, "probe"):
            return
        if ws.probe is not None:
            question, edited, original = ws.probe
            if edited is None:
                self.pending()
            else:
                self.show(question, edited, original)
        if ws.probe_note:
            self.score(ws.probe_note)

    @property
    def question(self) -> str:
        return self.query_one("#pb-question", Input).value.strip()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "pb-question":
            self.post_message(ActionRequested("probe"))

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "pb-ask":
            self.post_message(ActionRequested("probe"))

    def show(self, question: str, edited: str, original: str) -> None:
        self.query_one("#pb-edited", Static).update(escape(edited) or "[dim](empty)[/dim]")
        self.query_one("#pb-original", Static).update(escape(original) or "[dim](empty)[/dim]")

    def pending(self) -> None:
        self.query_one("#pb-edited", Static).update("[dim]thinking…[/dim]")
        self.query_one("#pb-original", Static).update("[dim]thinking…[/dim]")

    def score(self, text: str) -> None:
        self.query_one("#pb-score", Static).update(text)
