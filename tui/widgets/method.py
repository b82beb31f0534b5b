"""Method pane: choose one or several methods; a hyper-parameter form built from ``Params``."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.segment import Segment
from rich.style import Style as RichStyle
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.strip import Strip
from textual.widgets import Button, Checkbox, Input, Label, OptionList, Select, SelectionList, Static
from textual.widgets.option_list import OptionDoesNotExist

from unlearn_tui.backends.compat import tomllib
from unlearn_tui.backends.errors import UserError

from . import ActionRequested, Revisions

QUICK_BUDGET = 2048   # tokens: the method form's quick statistics budget (the params' minimum is 256)


def stats_hint(budget: Any, model: str = "", device: str | None = None) -> str:
    """What the statistics budget costs: the model's own generated tokens, and the time they take
    (≈, from the sampling rate measured on this model and device, else an estimate: tui/sampling_rate.py)."""
    from .. import sampling_rate

    try:
        n = int(budget)
    except (TypeError, ValueError):
        return "key statistics: sampled from the model once per model and budget, then cached"
    share = f"{QUICK_BUDGET / max(n, 1):.0%} of that" if n > QUICK_BUDGET else "the budget now set"
    quick = sampling_rate.duration(QUICK_BUDGET / sampling_rate.rate(model, device)[0])
    return (f"key statistics: the model generates {n:,} tokens once per model and budget, "
            f"{sampling_rate.cost(n, model, device)} (on a CPU the longest step of a first ROME/MEMIT/AlphaEdit "
            f"run), then they are cached; the quick budget ({QUICK_BUDGET:,} tokens, ≈ {quick}) costs {share}, "
            f"with a noisier covariance")


def parse_text(text: str) -> Any:
    """A form field's text as a value: "auto"/"" -> None, TOML literals, else the string."""
    t = text.strip()
    if t == "" or t.lower() == "auto":
        return None
    try:
        return tomllib.loads(f"v = {t}")["v"]
    except tomllib.TOMLDecodeError:
        return t


def show_value(v: Any) -> str:
    if v is None:
        return "auto"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(show_value(x) for x in v) + "]"
    return str(v)


class CheckList(SelectionList):
    """A SelectionList whose rows read ``[x] name`` / ``[ ] name`` (the stock toggle looks the same
    checked or not; only its colour differs)."""

    def _get_left_gutter_width(self) -> int:
        return 4

    def render_line(self, y: int) -> Strip:
        line = OptionList.render_line(self, y)
        _, scroll_y = self.scroll_offset
        index = scroll_y + y
        try:
            selection = self.get_option_at_index(index)
        except OptionDoesNotExist:
            return line
        on = selection.value in self._selected
        base = next(iter(line)).style or self.rich_style
        mark = self.get_component_rich_style("selection-list--button-selected" if on else "selection-list--button")
        style = base + RichStyle(bold=on, color=mark.bgcolor if on else None, meta={"option": index})
        return Strip([Segment("[x] " if on else "[ ] ", style=style), *line])


class MethodPane(Vertical):
    class MethodsChanged(Message):
        """The methods to run, in order."""

        def __init__(self, names: list[str]) -> None:
            super().__init__()
            self.names = names

    class ParamChanged(Message):
        """A valid (coerced) value for ``method.field``; None is "auto"."""

        def __init__(self, method: str, field: str, value: Any) -> None:
            super().__init__()
            self.method, self.field, self.value = method, field, value

    class ParamInvalid(Message):
        def __init__(self, method: str, field: str, message: str) -> None:
            super().__init__()
            self.method, self.field, self.message = method, field, message

    def __init__(self, workspace, **kw) -> None:
        super().__init__(**kw)
        self.ws = workspace
        self.ready = False
        self._building = False
        self._method: str | None = None
        self._gen = 0
        self._revs = Revisions()
        self._built: dict[str, str] = {}   # input id -> the text the form was built with

    def compose(self) -> ComposeResult:
        with Horizontal(id="me-body"):
            with Vertical(id="me-left"):
                yield Static("space: use/drop", classes="section")
                yield CheckList(id="me-list")
                yield Static("", id="me-selected", classes="hint")
                yield Button("Import YAML…", id="me-yaml", compact=True)
            with Vertical(id="me-right"):
                yield Static("", id="me-title", classes="section")
                yield VerticalScroll(id="me-form")

    def on_mount(self) -> None:
        self._revs.changed(self.ws, "form", "session")
        self._revs.changed(self.ws, "runs")
        self.refresh_all()
        self.ready = True

    def refresh_from(self, ws) -> None:
        """The list and the form are rebuilt for a new session or imported values; a change of the
        chosen methods that did not come from this list rebuilds the list."""
        self.ws = ws
        rebuild = self._revs.changed(ws, "form", "session")
        runs = self._revs.changed(ws, "runs")
        if rebuild:
            self.refresh_all()
        elif runs:
            chosen = [r.method for r in ws.session.runs]
            if sorted(self.query_one("#me-list", SelectionList).selected) != sorted(chosen):
                self.refresh_all()
            else:
                self._title(self._method)
                self._show_selected()

    def refresh_all(self) -> None:
        from unlearn_tui.backends import methods

        sl = self.query_one("#me-list", SelectionList)
        chosen = [r.method for r in self.ws.session.runs]
        self._building = True
        try:
            names = methods.names()
            sl.clear_options()
            for n in names:
                sl.add_option((n, n, n in chosen))
            for n in chosen:
                if n not in names:
                    sl.add_option((f"{n} (not in this build)", n, True))
        finally:
            self._building = False
        first = self._method if self._method in names else (chosen[0] if chosen else (names[0] if names else None))
        values = [sl.get_option_at_index(i).value for i in range(sl.option_count)]
        if first in values:
            # the list's cursor on the method whose form is shown: the first Down moves from there
            # (with no highlight, OptionList spends the first Down on highlighting row 0)
            self._building = True
            try:
                sl.highlighted = values.index(first)
            finally:
                self._building = False
        self.show_form(first)
        self._show_selected()

    def _show_selected(self) -> None:
        chosen = self._chosen()
        self.query_one("#me-selected", Static).update(
            "selected: " + escape(", ".join(chosen)) if chosen else "selected: none (space to use a method)")

    def on_selection_list_selection_toggled(self, event: SelectionList.SelectionToggled) -> None:
        if self._building:
            return
        self.post_message(self.MethodsChanged(list(event.selection_list.selected)))
        self._show_selected()
        if event.selection.value != self._method:
            self.show_form(event.selection.value)
        else:
            self._title(self._method)
        name = event.selection.value
        used = name in event.selection_list.selected
        self.notify(f"{name}: {'used' if used else 'not used'} · selected: "
                    f"{', '.join(event.selection_list.selected) or 'none'}", timeout=2)

    def on_selection_list_selection_highlighted(self, event: SelectionList.SelectionHighlighted) -> None:
        if not self._building and event.selection.value != self._method:
            self.show_form(event.selection.value)

    def _model_device(self) -> tuple[str, str | None]:
        """The model's name and the device it runs on (the loaded model's, else the session's ``[model]``)."""
        return self.ws.model_name, getattr(self.ws, "model_device", None)

    def show_form(self, name: str | None) -> None:
        from unlearn_tui.backends.params import describe

        self._method = name
        self._built = {}
        self._gen = getattr(self, "_gen", 0) + 1
        g = self._gen
        form = self.query_one("#me-form", VerticalScroll)
        form.remove_children()
        cls = self._title(name)
        if cls is None:
            return
        fields = describe(cls.Params)
        if not fields:
            form.mount(Static("no hyper-parameters", classes="hint"))
            return
        current = self.ws.method_params(name)
        rows = []
        if any(f.name == "token_budget" for f in fields):
            budget = current.get("token_budget", next(f.default for f in fields if f.name == "token_budget"))
            rows.append(Vertical(
                Static(escape(stats_hint(budget, *self._model_device())), classes="hint", id=f"me-stats{g}"),
                Button(f"Quick statistics ({QUICK_BUDGET:,} tokens)", id="me-quick-stats", compact=True),
                classes="param"))
        for f in fields:
            value = current.get(f.name, f.default)
            if value == "auto":
                value = None
            wid = f"mp{g}-{f.name}"
            if f.type_name == "a boolean" and not f.optional:
                control = Checkbox(f.name, bool(value), id=wid, compact=True)
            elif f.choices:
                control = Select([(str(c), c) for c in f.choices], value=value if value in f.choices else
                                 f.choices[0], allow_blank=False, id=wid, compact=True)
            else:
                control = Input(show_value(value), id=wid, compact=True,
                                placeholder="auto" if f.optional else f.type_name)
                self._built[wid] = show_value(value)   # its Changed on mount is not an edit
            bounds = []
            if f.min is not None:
                bounds.append(f"≥ {f.min:g}")
            if f.max is not None:
                bounds.append(f"≤ {f.max:g}")
            hint = f.help + (f" ({', '.join(bounds)})" if bounds else "") + (f" — auto: {f.auto}" if f.auto else "")
            rows.append(Vertical(
                Horizontal(Label(f.name, classes="param-name"), control, classes="param-row"),
                Static(escape(hint), classes="hint"),
                Static("", id=f"me-err{g}-{f.name}", classes="error"),
                classes="param"))
        form.mount_all(rows)

    def _title(self, name: str | None):
        """Show the form's title; returns the method class (None: no such method)."""
        from unlearn_tui.backends import methods

        title = self.query_one("#me-title", Static)
        if name is None:
            title.update("no method")
            return None
        try:
            cls = methods.get(name)
        except UserError as exc:
            title.update(escape(str(exc)))
            return None
        used = name in self._chosen()
        title.update(f"[b]{escape(name)}[/b] — {escape(getattr(cls, 'summary', ''))}"
                     + ("" if used else "  [dim](not used; space to use)[/dim]"))
        return cls

    def _chosen(self) -> list[str]:
        """The methods checked in the list (what the workspace will hold once it handled our message)."""
        try:
            return list(self.query_one("#me-list", SelectionList).selected)
        except Exception:
            return [r.method for r in self.ws.session.runs]

    def _set(self, field: str, value: Any, err_id: str) -> None:
        from unlearn_tui.backends import methods
        from unlearn_tui.backends.params import coerce_value

        if self._method is None:
            return
        err = self.query_one(f"#{err_id}", Static)
        cls = methods.get(self._method)
        try:
            coerced = coerce_value(cls.Params, field, value, f"{self._method}.{field}")
        except UserError as exc:
            err.update(escape(str(exc)))
            self.post_message(self.ParamInvalid(self._method, field, str(exc)))
            return
        err.update("")
        if field == "token_budget" and coerced is not None:    # the cost line follows the budget typed
            hint = self.query(f"#me-stats{self._gen}")
            if hint:
                hint.first().update(escape(stats_hint(coerced, *self._model_device())))
        self.post_message(self.ParamChanged(self._method, field, coerced))

    def _field(self, wid: str | None) -> str | None:
        prefix = f"mp{getattr(self, '_gen', 0)}-"
        return wid[len(prefix):] if wid and wid.startswith(prefix) else None

    def on_input_changed(self, event: Input.Changed) -> None:
        name = self._field(event.input.id)
        if name:
            event.stop()
            if self._built.pop(event.input.id, None) == event.value:
                return    # the form was just built with this text: opening a session does not change it
            self._set(name, parse_text(event.value), f"me-err{self._gen}-{name}")

    def on_checkbox_changed(self, event: Checkbox.Changed) -> None:
        name = self._field(event.checkbox.id)
        if name:
            event.stop()
            self._set(name, bool(event.value), f"me-err{self._gen}-{name}")

    def on_select_changed(self, event: Select.Changed) -> None:
        name = self._field(event.select.id)
        if name:
            event.stop()
            self._set(name, event.value, f"me-err{self._gen}-{name}")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "me-quick-stats":
            event.stop()
            # through the field's own input, so the form, its checks and the workspace stay one path
            self.query_one(f"#mp{self._gen}-token_budget", Input).value = str(QUICK_BUDGET)
            self.query_one(f"#me-stats{self._gen}", Static).update(
                escape(stats_hint(QUICK_BUDGET, *self._model_device())))
            return
        if event.button.id == "me-yaml":
            self.post_message(ActionRequested("import_yaml"))
