"""Run pane: stage, item i/n, progress bar with ETA, loss sparkline, log; run/cancel/step/undo/redo."""

from __future__ import annotations

from rich.markup import escape
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, ProgressBar, RichLog, Sparkline, Static

from . import ActionRequested


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "--:--"
    s = int(round(s))
    return f"{s // 60:02d}:{s % 60:02d}" if s < 3600 else f"{s // 3600}h{(s % 3600) // 60:02d}m"


class RunPane(Vertical):
    MAX_LOSSES = 200

    BUTTONS = {"rn-run": "run", "rn-cancel": "cancel", "rn-step": "step", "rn-undo": "undo_edit",
               "rn-redo": "redo_edit"}

    def __init__(self, workspace, **kw) -> None:
        super().__init__(**kw)
        self.ws = workspace
        self.ready = False
        self.losses: list[float] = []

    def compose(self) -> ComposeResult:
        with Horizontal(classes="pane-head"):
            yield Button("Run", id="rn-run", variant="primary", compact=True)
            yield Button("Cancel", id="rn-cancel", variant="error", compact=True)
            yield Button("Step", id="rn-step", compact=True)
            yield Button("Undo", id="rn-undo", compact=True)
            yield Button("Redo", id="rn-redo", compact=True)
        yield Static("idle", id="rn-stage")
        yield Static("", id="rn-item")
        yield ProgressBar(total=1, id="rn-bar", show_eta=False, show_percentage=True)
        yield Static("", id="rn-eta", classes="hint")
        yield Static("loss", classes="section")
        yield Sparkline([], id="rn-loss")
        yield Static("", id="rn-status")
        yield RichLog(id="rn-log", max_lines=500, wrap=True, markup=True)

    def on_mount(self) -> None:
        self.query_one("#rn-log", RichLog).max_lines = self.ws.settings.max_log_lines
        self.ready = True

    def refresh_from(self, ws) -> None:
        """Nothing of the workspace is shown here: the App routes the engine's progress to this pane."""
        self.ws = ws

    def on_button_pressed(self, event: Button.Pressed) -> None:
        action = self.BUTTONS.get(event.button.id or "")
        if action:
            self.post_message(ActionRequested(action))

    # ------------------------------------------------------------------ updates from the App
    def stage(self, stage: str, total: int | None, detail: str = "") -> None:
        self.query_one("#rn-stage", Static).update(f"[b]{escape(stage)}[/b] {escape(detail)}")
        bar = self.query_one("#rn-bar", ProgressBar)
        bar.update(total=total, progress=0)
        self.query_one("#rn-item", Static).update(f"0/{total}" if total else "")
        self.query_one("#rn-eta", Static).update("")

    def progress(self, m) -> None:
        bar = self.query_one("#rn-bar", ProgressBar)
        bar.update(total=m.total, progress=m.done)
        detail = f"  {escape(m.detail)}" if m.detail else ""
        self.query_one("#rn-item", Static).update(f"item {m.done}/{m.total if m.total else '?'}{detail}")
        self.query_one("#rn-eta", Static).update(
            f"elapsed {fmt_seconds(m.elapsed_s)} · ETA {fmt_seconds(m.eta_s)}")
        if m.losses:
            self.losses.extend(m.losses)
            self.losses = self.losses[-self.MAX_LOSSES:]
            self.query_one("#rn-loss", Sparkline).data = list(self.losses)
            self.query_one("#rn-stage", Static).update(
                f"[b]{escape(m.stage)}[/b]  loss {self.losses[-1]:.4g}")

    def reset_loss(self) -> None:
        self.losses = []
        self.query_one("#rn-loss", Sparkline).data = []

    def status(self, text: str) -> None:
        self.query_one("#rn-status", Static).update(text)

    def log_line(self, text: str, level: str = "info") -> None:
        style = {"warning": "yellow", "error": "bold red"}.get(level)
        line = escape(text)
        self.query_one("#rn-log", RichLog).write(f"[{style}]{line}[/]" if style else line)

    def idle(self, text: str = "idle") -> None:
        self.query_one("#rn-stage", Static).update(text)
