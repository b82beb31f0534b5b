"""Typed hyper-parameters: one dataclass per method drives TOML, CLI and TUI.

Declare fields with :func:`param`, which records help text and bounds in the
field metadata.  :func:`parse_params` validates a raw mapping (from TOML or a
form) against the dataclass and raises :class:`UserError` naming the key, the
value and what was expected.  :func:`describe` lists the fields for a form.

``None`` as a default means "auto": the method resolves it from the model
(for instance a layer index scaled to the model's depth).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from .errors import UserError


def param(default: Any, help: str, *, min: float | None = None, max: float | None = None,
          choices: tuple | None = None, auto: str | None = None) -> Any:
    """A hyper-parameter field. ``auto`` documents what ``None`` resolves to."""
    meta = {"help": help, "min": min, "max": max, "choices": choices, "auto": auto}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class FieldInfo:
    name: str
    type_name: str
    default: Any
    help: str
    min: float | None
    max: float | None
    choices: tuple | None
    auto: str | None
    optional: bool


def _base_types(tp: Any) -> tuple[tuple[type, ...], bool]:
    """(accepted base types, whether None is allowed) for a field annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        optional = type(None) in args
        bases: list[type] = []
        for a in args:
            if a is type(None):
                continue
            b, _ = _base_types(a)
            bases.extend(b)
        return tuple(bases), optional
    if origin in (list, tuple):
        return (list,), False
    if origin is dict:
        return (dict,), False
    if tp is typing.Any:
        return (object,), True
    return (tp,), False


def _type_name(bases: tuple[type, ...]) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "a list", dict: "a table"}
    return " or ".join(names.get(b, b.__name__) for b in bases)


def fields_of(cls: type) -> list[FieldInfo]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        bases, optional = _base_types(hints[f.name])
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        m = f.metadata
        out.append(FieldInfo(f.name, _type_name(bases), default, m.get("help", ""), m.get("min"),
                             m.get("max"), m.get("choices"), m.get("auto"), optional))
    return out


def describe(cls: type) -> list[FieldInfo]:
    """Fields for building a form or a help listing."""
    return fields_of(cls)


def coerce_value(cls: type, name: str, value: Any, where: str) -> Any:
    """Validate one field value; returns the (possibly converted) value."""
    hints = typing.get_type_hints(cls)
    if name not in hints:
        raise UserError(unknown_key_message(name, [f.name for f in dataclasses.fields(cls)]), where)
    bases, optional = _base_types(hints[name])
    info = next(f for f in fields_of(cls) if f.name == name)
    expected = _type_name(bases) + (' or "auto"' if optional else "")
    if value is None or (optional and value == "auto"):
        if optional:
            return None
        raise UserError(f"expected {expected}, got nothing", where)
    ok = None
    for b in bases:
        if b is object:
            ok = value
        elif b is bool:
            if isinstance(value, bool):
                ok = value
        elif b is int:
            if isinstance(value, int) and not isinstance(value, bool):
                ok = value
        elif b is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                ok = float(value)
        elif b is list:
            if isinstance(value, (list, tuple)):
                ok = list(value)
        elif isinstance(value, b):
            ok = value
        if ok is not None:
            break
    if ok is None:
        raise UserError(f"expected {expected}, got {value!r}", where)
    if info.choices is not None and ok not in info.choices:
        raise UserError(f"expected one of {', '.join(map(repr, info.choices))}, got {value!r}", where)
    if isinstance(ok, (int, float)) and not isinstance(ok, bool):
        if info.min is not None and ok < info.min:
            raise UserError(f"expected a value >= {info.min}, got {value!r}", where)
        if info.max is not None and ok > info.max:
            raise UserError(f"expected a value <= {info.max}, got {value!r}", where)
    if isinstance(ok, list) and info.min is not None:
        for v in ok:
            if isinstance(v, (int, float)) and v < info.min:
                raise UserError(f"expected values >= {info.min}, got {v!r}", where)
    return ok


def unknown_key_message(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f' (did you mean "{close[0]}"?)' if close else ""
    if not known:
        return f'unknown key "{key}"; this takes no keys'
    return f'unknown key "{key}"{hint}; expected one of: {", ".join(known)}'


def parse_params(cls: type, raw: dict[str, Any] | None, where: str = "params") -> Any:
    """Build ``cls`` from a raw mapping, validating every key and value."""
    raw = dict(raw or {})
    kwargs = {}
    for key, value in raw.items():
        kwargs[key] = coerce_value(cls, key, value, f"{where}.{key}")
    return cls(**kwargs)


def to_dict(params: Any) -> dict[str, Any]:
    """The explicit values of a params instance (``None`` kept as "auto")."""
    out = {}
    for f in dataclasses.fields(params):
        v = getattr(params, f.name)
        out[f.name] = "auto" if v is None else v
    return out
