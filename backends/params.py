"""Typed hyper-parameters: one dataclass per method drives TOML, CLI and TUI.

Declare fields with :func:`param`, which records help text and bounds in the
field metadata.  :func:`parse_params` validates a raw mapping (from TOML or a
form) against the dataclass and raises :class:`UserError` naming the key, the
value and what was expected.  :func:`describe` lists the fields for a form.

``None`` as a default means "auto": the method resolves it from the model
(for instance a layer index scaled to the model's depth).

Numbers must be finite (``nan``/``inf`` are refused) unless a field opts in
with ``param(..., finite=False)``; integers must fit in 64 bits.  List fields
check their elements: ``list[int]``/``list[float]`` by the annotation, a bare
``list`` with numeric ``min``/``max`` bounds as a list of numbers.  A Params
class may check combinations of fields in ``__post_init__`` by raising
``UserError(message, "params.FIELD")``; :func:`parse_params` re-prefixes that
``where`` with its own (``runs[0].params.FIELD``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from .errors import UserError

_INT64 = (-(2**63), 2**63 - 1)


def param(default: Any, help: str, *, min: float | None = None, max: float | None = None,
          choices: tuple | None = None, auto: str | None = None, finite: bool = True) -> Any:
    """A hyper-parameter field. ``auto`` documents what ``None`` resolves to.

    ``finite=False`` lets the field (or its list elements) take ``nan``/``inf``.
    """
    meta = {"help": help, "min": min, "max": max, "choices": choices, "auto": auto, "finite": finite}
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
    finite: bool = True


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
                             m.get("max"), m.get("choices"), m.get("auto"), optional,
                             m.get("finite", True)))
    return out


def describe(cls: type) -> list[FieldInfo]:
    """Fields for building a form or a help listing."""
    return fields_of(cls)


def _item_types(tp: Any) -> tuple[type, ...] | None:
    """Element base types of the list member of an annotation (``list[int]`` -> (int,)), else None."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for a in typing.get_args(tp):
            found = _item_types(a)
            if found is not None:
                return found
        return None
    if origin in (list, tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        if not args:
            return None
        bases: list[type] = []
        for a in args:
            b, _ = _base_types(a)
            bases.extend(b)
        return tuple(dict.fromkeys(bases))
    return None


def _number(value: Any, bases: tuple[type, ...]) -> Any:
    """``value`` as the first of ``bases`` it fits (bool, int, float, str, object), else None."""
    for b in bases:
        if b is object:
            return value
        if b is bool:
            if isinstance(value, bool):
                return value
        elif b is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        elif b is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                try:
                    return float(value)
                except OverflowError:  # an integer too large for a float
                    return math.inf if value > 0 else -math.inf
        elif b is list:
            if isinstance(value, (list, tuple)):
                return list(value)
        elif isinstance(value, b):
            return value
    return None


def _check_number(v: Any, info: FieldInfo, where: str, what: str = "a value", shown: Any = None) -> None:
    """Finite (unless the field opts out), 64-bit for integers, within min/max."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return
    shown = v if shown is None else shown
    if isinstance(v, float) and not math.isfinite(v) and info.finite:
        big = " (too large for a float)" if isinstance(shown, int) else ""
        raise UserError(f"expected a finite number, got {_show(shown)}{big}", where)
    if isinstance(v, int) and not _INT64[0] <= v <= _INT64[1]:
        raise UserError(f"expected {what} within the 64-bit integer range, got {_show(shown)}", where)
    if info.min is not None and v < info.min:
        raise UserError(f"expected {what} >= {info.min}, got {_show(shown)}", where)
    if info.max is not None and v > info.max:
        raise UserError(f"expected {what} <= {info.max}, got {_show(shown)}", where)


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
    ok = _number(value, bases)
    if ok is None:
        raise UserError(f"expected {expected}, got {_show(value)}", where)
    if info.choices is not None and ok not in info.choices:
        raise UserError(f"expected one of {', '.join(map(repr, info.choices))}, got {_show(value)}", where)
    if isinstance(ok, str) and "\x00" in ok:
        raise UserError(f"expected text without NUL characters, got {_show(value)}", where)
    if isinstance(ok, list):
        items = _item_types(hints[name])
        if items is None and (isinstance(info.min, (int, float)) or isinstance(info.max, (int, float))):
            items = (float,)  # a bare list with numeric bounds holds numbers
        converted = []
        for j, v in enumerate(ok):
            if items is None:
                converted.append(v)
                _check_number(v, info, where, "values")
                continue
            if isinstance(v, (list, tuple, dict)):
                got = None
            else:
                got = _number(v, items)
            if got is None:
                raise UserError(f"expected a list of {_plural(items)}, got {_show(v)} (element {j + 1})", where)
            _check_number(got, info, where, "values", shown=v)
            converted.append(got)
        return converted
    _check_number(ok, info, where, shown=value)
    return ok


def _show(v: Any, limit: int = 60) -> str:
    """``repr(v)``, shortened in the middle past ``limit`` characters (one line)."""
    text = repr(v)
    return text if len(text) <= limit else f"{text[:limit // 2 - 2]}...{text[-(limit // 2 - 2):]}"


def _plural(bases: tuple[type, ...]) -> str:
    names = {bool: "booleans", int: "integers", float: "numbers", str: "strings", list: "lists",
             dict: "tables", object: "values"}
    return " or ".join(names.get(b, b.__name__) for b in bases)


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
    try:
        return cls(**kwargs)
    except UserError as e:  # a cross-field check in __post_init__: locate it under ``where``
        if e.where == "params" or (e.where or "").startswith("params."):
            e.where = where + e.where[len("params"):]
        elif not e.where:
            e.where = where
        raise


def to_dict(params: Any) -> dict[str, Any]:
    """The explicit values of a params instance (``None`` kept as "auto")."""
    out = {}
    for f in dataclasses.fields(params):
        v = getattr(params, f.name)
        out[f.name] = "auto" if v is None else v
    return out
