"""Run pane: stage, item i/n, progress bar with ETA, loss sparkline, log; run/cancel/step/undo/redo."""

from __future__ import annotations

from rich.markup import escape
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, ProgressBar, RichLog, Sparkline, Static

from . import ActionRequested

BAR_STEPS = 1000   # the bar's total: it shows a weighted fraction (tui/progress.py), not a count


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
        self.query_one("#rn-bar", ProgressBar).update(total=BAR_STEPS if total else None, progress=0)
        self.query_one("#rn-item", Static).update(f"0/{total}" if total else "")
        self.query_one("#rn-eta", Static).update("")

    def progress(self, m) -> None:
        """A progress message: the loss values (the counts and clock come with :meth:`show`)."""
        if m.losses:
            self.losses.extend(m.losses)
            self.losses = self.losses[-self.MAX_LOSSES:]
            self.query_one("#rn-loss", Sparkline).data = list(self.losses)
            self.query_one("#rn-stage", Static).update(
                f"[b]{escape(m.stage)}[/b]  loss {self.losses[-1]:.4g}")

    def show(self, view) -> None:
        """The current stage as :class:`tui.progress.View` (the bar is its weighted fraction; the App's
        one-second timer calls this between events too, so elapsed and ETA tick)."""
        bar = self.query_one("#rn-bar", ProgressBar)
        if view.fraction is None:
            bar.update(total=None)
        else:
            bar.update(total=BAR_STEPS, progress=round(view.fraction * BAR_STEPS))
        if view.phase == "generating":
            what = f"generating answers · {view.counts()} sequences"
        elif view.phase == "scoring":
            what = f"scoring answers · {view.counts()} sequences (then generating)"
        else:
            what = f"item {view.counts()}"
        detail = f"  {escape(view.detail)}" if view.detail and not view.phase else ""
        self.query_one("#rn-item", Static).update(escape(what) + detail)
        self.query_one("#rn-eta", Static).update(view.clock())

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
        """No job: the stage line says ``text``; the bar, the item counter and the clock are cleared."""
        self.query_one("#rn-stage", Static).update(text)
        self.query_one("#rn-bar", ProgressBar).update(total=1, progress=0)
        self.query_one("#rn-item", Static).update("")
        self.query_one("#rn-eta", Static).update("")
