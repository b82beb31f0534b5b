"""Method pane: choose one or several methods; a hyper-parameter form built from ``Params``."""

from __future__ import annotations

import sys
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from rich.markup import escape
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Button, Checkbox, Input, Label, Select, SelectionList, Static

from backends.errors import UserError


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


class MethodPane(Vertical):
    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.ready = False
        self._building = False
        self._method: str | None = None
        self._gen = 0

    def compose(self) -> ComposeResult:
        with Horizontal(id="me-body"):
            with Vertical(id="me-left"):
                yield Static("methods (space: use)", classes="section")
                yield SelectionList(id="me-list")
                yield Button("Import YAML…", id="me-yaml", compact=True)
            with Vertical(id="me-right"):
                yield Static("", id="me-title", classes="section")
                yield VerticalScroll(id="me-form")

    def on_mount(self) -> None:
        self.refresh_all()
        self.ready = True

    def refresh_all(self) -> None:
        from backends import methods

        sl = self.query_one("#me-list", SelectionList)
        chosen = [r.method for r in self.app.session.runs]
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
        self.show_form(first)

    def on_selection_list_selection_toggled(self, event: SelectionList.SelectionToggled) -> None:
        if self._building:
            return
        self.app.set_methods(list(event.selection_list.selected))
        self.show_form(event.selection.value)

    def on_selection_list_selection_highlighted(self, event: SelectionList.SelectionHighlighted) -> None:
        if not self._building:
            self.show_form(event.selection.value)

    def show_form(self, name: str | None) -> None:
        from backends import methods
        from backends.params import describe

        self._method = name
        self._gen = getattr(self, "_gen", 0) + 1
        g = self._gen
        form = self.query_one("#me-form", VerticalScroll)
        form.remove_children()
        title = self.query_one("#me-title", Static)
        if name is None:
            title.update("no method")
            return
        try:
            cls = methods.get(name)
        except UserError as exc:
            title.update(escape(str(exc)))
            return
        used = name in [r.method for r in self.app.session.runs]
        title.update(f"[b]{escape(name)}[/b] — {escape(getattr(cls, 'summary', ''))}"
                     + ("" if used else "  [dim](not used; space to use)[/dim]"))
        fields = describe(cls.Params)
        if not fields:
            form.mount(Static("no hyper-parameters", classes="hint"))
            return
        current = self.app.method_params(name)
        rows = []
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

    def _set(self, field: str, value: Any, err_id: str) -> None:
        from backends import methods
        from backends.params import coerce_value

        if self._method is None:
            return
        err = self.query_one(f"#{err_id}", Static)
        cls = methods.get(self._method)
        try:
            coerced = coerce_value(cls.Params, field, value, f"{self._method}.{field}")
        except UserError as exc:
            err.update(escape(str(exc)))
            self.app.param_invalid(self._method, field, str(exc))
            return
        err.update("")
        self.app.set_param(self._method, field, coerced)

    def _field(self, wid: str | None) -> str | None:
        prefix = f"mp{getattr(self, '_gen', 0)}-"
        return wid[len(prefix):] if wid and wid.startswith(prefix) else None

    def on_input_changed(self, event: Input.Changed) -> None:
        name = self._field(event.input.id)
        if name:
            event.stop()
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
        if event.button.id == "me-yaml":
            self.app.action_import_yaml()
