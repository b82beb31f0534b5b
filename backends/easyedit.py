"""Import an EasyEdit hyper-parameter YAML for one of our methods.

``import_hparams(path, method=None) -> (method_name, params, ignored)``

The method comes from ``method`` or else the YAML's ``alg_name`` (matched
case-insensitively against the registry, ``AlphaEdit`` -> ``alphaedit``).
Each method class declares ``EASYEDIT_KEYS: ClassVar[dict]`` mapping an
EasyEdit key to either our ``Params`` field name, or a pair ``(field,
conversion)`` where the conversion is a callable or one of the names in
:data:`CONVERSIONS` (``"first"``: ``layers: [5]`` -> ``5``; ``"list"``;
``"batch"``; ``"corpus"``: EasyEdit's ``wikipedia`` -> ``hub:wikitext``;
``"template_count"``: ``context_template_length_params`` -> templates per
length).  Converted values are validated against the method's ``Params``
(bounds, types) and a bad one raises :class:`UserError` naming the YAML key.
Every key that maps to nothing (model names, module templates, devices...) is
returned in ``ignored`` so the caller can show it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import UserError

_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _numbers(v: Any) -> Any:
    """PyYAML reads ``5e-1`` (no dot) as text: turn numeric-looking strings into numbers."""
    if isinstance(v, str) and _NUMBER.match(v.strip()):
        f = float(v)
        return int(f) if f.is_integer() and "." not in v and "e" not in v.lower() else f
    if isinstance(v, list):
        return [_numbers(x) for x in v]
    return v


def _first(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        if not v:
            raise ValueError("empty list")
        return v[0]
    return v


def _list(v: Any) -> Any:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _batch(v: Any) -> Any:
    return None if v in (None, 0) else int(v)


def _corpus(v: Any) -> Any:
    s = str(v).strip().lower()
    if s in ("wikipedia", "wiki", "wikitext"):
        return "hub:wikitext"
    return str(v)


def _template_count(v: Any) -> Any:
    # [[length, count], ...] -> the largest count (we use the same count for 5 and 10 tokens)
    if isinstance(v, (list, tuple)) and v and all(isinstance(x, (list, tuple)) and len(x) == 2 for x in v):
        return int(max(x[1] for x in v))
    raise ValueError("expected [[length, count], ...]")


CONVERSIONS: dict[str, Callable[[Any], Any]] = {"first": _first, "list": _list, "batch": _batch,
                                                "corpus": _corpus, "template_count": _template_count}


def _read_yaml(path: str | Path) -> dict:
    import yaml

    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"EasyEdit hparams file not found: {p}", str(path))
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        raise UserError(f"not valid YAML ({getattr(exc, 'problem', exc)})", where) from None
    if not isinstance(data, dict):
        raise UserError("expected a YAML mapping of hyper-parameters", str(p))
    return data


def import_hparams(path: str | Path, method: str | None = None) -> tuple[str, dict[str, Any], list[str]]:
    """(our method name, our params as a raw dict, EasyEdit keys that were ignored)."""
    from . import methods
    from .params import coerce_value

    data = _read_yaml(path)
    where = str(path)
    name = method or data.get("alg_name")
    if not name:
        raise UserError('no method given and the file has no "alg_name"; pass method="rome" (or another)', where)
    key = str(name).strip().lower().replace("-", "").replace("_", "")
    known = {n.replace("-", "").replace("_", ""): n for n in methods.names()}
    if key not in known:
        raise UserError(f'EasyEdit method "{name}" has no counterpart here; expected one of: '
                        f'{", ".join(methods.names())}', f"{where}: alg_name")
    cls = methods.get(known[key])
    mapping: dict[str, Any] = dict(getattr(cls, "EASYEDIT_KEYS", {}) or {})
    params: dict[str, Any] = {}
    ignored: list[str] = []
    for k, v in data.items():
        if k == "alg_name":
            continue
        spec = mapping.get(k)
        if spec is None:
            ignored.append(k)
            continue
        field, conv = (spec, None) if isinstance(spec, str) else (spec[0], spec[1])
        fn = CONVERSIONS.get(conv) if isinstance(conv, str) else conv
        if isinstance(conv, str) and fn is None:
            raise ValueError(f"{cls.__name__}.EASYEDIT_KEYS[{k!r}] names an unknown conversion {conv!r}")
        v = _numbers(v)
        try:
            value = fn(v) if fn is not None else v
        except (ValueError, TypeError) as exc:
            raise UserError(f"cannot convert {v!r} ({exc})", f"{where}: {k}") from None
        params[field] = coerce_value(cls.Params, field, value, f"{where}: {k}")
    return cls.name, params, ignored
