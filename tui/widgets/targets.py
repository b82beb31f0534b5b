"""Targets pane: per forget item, the refusal target (editable), target mode, merge factor + preview."""

from __future__ import annotations

from rich.markup import escape
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import Button, Input, Label, ListItem, ListView, Select, Static, TextArea

from unlearn_tui.backends.leak import leak_flag  # noqa: E402  (the engine's leak rule; torch-free)
from unlearn_tui.backends.spec import TARGET_MODES as MODES  # noqa: E402  (the one list of target modes)

from ..actions import pane_bindings
from . import Revisions


def warnings_for(item, text: str | None, flags: dict | None = None) -> list[str]:
    """Inline warnings: the target leaks the gold answer / names the subject.

    The leak warning is the engine's leak flag (:func:`backends.leak.leak_flag`: the record's stored
    flag, else the engine's check), so the pane and the ``--out`` audit trail always agree."""
    out = []
    if not text:
        return out
    low = text.lower()
    flags = flags or {}
    if leak_flag(text, item, flags.get("leak")):
        out.append(f"⚠ leak: the target contains the answer “{item.answer}”")
    subject = getattr(item, "subject", None)
    if flags.get("mentions_subject") or (subject and subject.lower() in low):
        out.append(f"⚠ the target mentions the subject “{subject or '?'}”")
    return out


class TargetsPane(Vertical):
    BINDINGS = pane_bindings("targets")

    class TargetEdited(Message):
        """The user's text for ``item_id``'s target (empty: back to the mode's rule)."""

        def __init__(self, item_id: str, text: str) -> None:
            super().__init__()
            self.item_id, self.text = item_id, text

    class TargetReset(Message):
        def __init__(self, item_id: str) -> None:
            super().__init__()
            self.item_id = item_id

    class ModeChanged(Message):
        def __init__(self, mode: str) -> None:
            super().__init__()
            self.mode = mode

    class MergeFactorChanged(Message):
        def __init__(self, merge_factor: int) -> None:
            super().__init__()
            self.merge_factor = merge_factor

    class Reordered(Message):
        """Move forget item ``item_id`` by ``delta`` places (merging groups in this order)."""

        def __init__(self, item_id: str, delta: int) -> None:
            super().__init__()
            self.item_id, self.delta = item_id, delta

    class SelfImproveRequested(Message):
        """Let the model write targets: for ``item_id``, or (None) for every forget item."""

        def __init__(self, item_id: str | None) -> None:
            super().__init__()
            self.item_id = item_id

    def __init__(self, workspace, **kw) -> None:
        super().__init__(**kw)
        self.ws = workspace
        self.ready = False
        self._loading = False
        self._current: str | None = None
        self._loaded_text = ""
        self._posted: str | None = None    # the last text this pane sent for the current item
        self._revs = Revisions()

    def compose(self) -> ComposeResult:
        with Horizontal(classes="pane-head"):
            yield Label("mode")
            t = self.ws.session.targets
            yield Select([(m, m) for m in MODES], value=t.mode if t.mode in MODES else "idk", allow_blank=False,
                         id="tg-mode", compact=True)
            yield Label("merge")
            yield Input(str(t.merge_factor), id="tg-merge", type="integer", compact=True)
            yield Button("Self-improve", id="tg-self", compact=True)
        with Horizontal(id="tg-body"):
            yield ListView(id="tg-list")
            with Vertical(id="tg-edit"):
                yield Static("", id="tg-question")
                yield TextArea("", id="tg-text", soft_wrap=True, compact=True)
                yield Static("", id="tg-warn", classes="warn")
        yield Static("merged prompts", classes="section")
        with VerticalScroll(id="tg-preview-box"):
            yield Static("", id="tg-preview")

    def on_mount(self) -> None:
        self._revs.changed(self.ws, "items", "selection", "targets", "session")
        self.refresh_all()
        self.ready = True

    # ------------------------------------------------------------------ rendering
    def refresh_from(self, ws) -> None:
        self.ws = ws
        if self._revs.changed(ws, "items", "selection", "targets", "session"):
            self.refresh_all()

    def refresh_all(self) -> None:
        ws = self.ws
        self._loading = True
        try:
            sel = self.query_one("#tg-mode", Select)
            if sel.value != ws.session.targets.mode:
                sel.value = ws.session.targets.mode
            merge = self.query_one("#tg-merge", Input)
            if merge.value != str(ws.session.targets.merge_factor):
                merge.value = str(ws.session.targets.merge_factor)
            lv = self.query_one("#tg-list", ListView)
            ids = [it.id for it in ws.forget_items()]
            if [getattr(i, "name", None) for i in lv.children] != ids:
                lv.clear()
                for it in ws.forget_items():
                    lv.append(ListItem(Label(escape(f"{it.id}  {it.question}")), name=it.id))
                if ids:
                    idx = ids.index(self._current) if self._current in ids else 0
                    lv.index = idx
                    self._show(ids[idx])
                else:
                    self._show(None)
            else:
                self._show(self._current if self._current in ids else (ids[0] if ids else None))
        finally:
            self._loading = False
        self.refresh_preview()

    def _show(self, item_id: str | None) -> None:
        ws = self.ws
        if item_id != self._current:
            self._posted = None
        # only a loaded item is shown: an id may outlive its data (a failed or pending load)
        item = ws.find_item(item_id) if item_id is not None else None
        if item is None:
            item_id = None
        self._current = item_id
        area = self.query_one("#tg-text", TextArea)
        if item is None:
            self.query_one("#tg-question", Static).update("select forget items in the Forget set pane"
                                                          if ws.items is not None else "no data loaded")
            self._loaded_text = ""
            area.load_text("")
            self.query_one("#tg-warn", Static).update("")
            return
        text, source, flags = ws.target_text(item_id)
        self.query_one("#tg-question", Static).update(
            f"[b]{escape(item_id)}[/b] {escape(item.question)}  [dim]gold: {escape(item.answer)} · {source}[/dim]")
        if self._posted is not None and area.text == self._posted:
            self._loaded_text = area.text   # the workspace has yet to catch up with what the user typed
        else:
            self._loaded_text = text or ""
            if area.text != self._loaded_text:
                area.load_text(self._loaded_text)
        self.refresh_warnings(item, text, flags)

    def refresh_warnings(self, item, text, flags) -> None:
        w = warnings_for(item, text, flags)
        self.query_one("#tg-warn", Static).update("\n".join(escape(x) for x in w))

    def refresh_preview(self) -> None:
        self.query_one("#tg-preview", Static).update(self.ws.merge_preview())

    # ------------------------------------------------------------------ events
    def on_list_view_highlighted(self, event: ListView.Highlighted) -> None:
        # Highlighted is delivered later than it is posted: the list (or the data) may have changed
        # since, e.g. a data load failed in between; an item that is no longer a loaded forget item
        # is ignored (the list is rebuilt from the current state anyway)
        if event.item is None or self._loading:
            return
        if event.item.name not in {it.id for it in self.ws.forget_items()}:
            return
        self._loading = True
        try:
            self._show(event.item.name)
        finally:
            self._loading = False

    def on_text_area_changed(self, event: TextArea.Changed) -> None:
        if self._loading or self._current is None or event.text_area.text == self._loaded_text:
            return
        item = self.ws.find_item(self._current)
        if self._current not in self.ws.forget_ids or item is None:
            return
        self._loaded_text = self._posted = event.text_area.text
        self.post_message(self.TargetEdited(self._current, event.text_area.text))

    def on_select_changed(self, event: Select.Changed) -> None:
        if event.select.id == "tg-mode" and not self._loading and event.value in MODES:
            self.post_message(self.ModeChanged(str(event.value)))

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id != "tg-merge" or self._loading:
            return
        try:
            m = int(event.value)
        except ValueError:
            event.input.set_class(True, "-invalid")
            return
        event.input.set_class(m < 1, "-invalid")
        if m >= 1:
            self.post_message(self.MergeFactorChanged(m))

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "tg-self":
            self._posted = None
            self.post_message(self.SelfImproveRequested(self._current))

    def action_merge(self, delta: int) -> None:
        self.post_message(self.MergeFactorChanged(max(1, self.ws.session.targets.merge_factor + delta)))

    def action_move(self, delta: int) -> None:
        if self._current:
            self.post_message(self.Reordered(self._current, delta))

    def action_reset_target(self) -> None:
        if self._current:
            self._posted = None
            self.post_message(self.TargetReset(self._current))

    def current_item(self) -> str | None:
        return self._current
