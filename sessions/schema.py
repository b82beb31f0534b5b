"""The session (schema version 1) as TOML data.

The types and vocabularies are the engine's experiment description,
:mod:`backends.spec` (re-exported here, so ``sessions.schema.Session`` keeps
working).  This module adds the *plain form*: the session as the plain data a
TOML file holds (:func:`to_plain`, :func:`plain_from_toml`), derived from the
fields' metadata.  No validation here: :func:`sessions.loads` validates TOML
into a Session, :func:`sessions.dumps` writes one back.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from unlearn_tui.backends.spec import (
    DATA_FORMATS,
    DATA_PREFIXES,
    DEFAULT_DATA,
    DEFAULT_DUMMY,
    DEFAULT_MODEL,
    DEVICE_PATTERN,
    DTYPES,
    EVAL_LIMITS,
    GENERATED_MODES,
    GENERATED_SOURCES,
    SCHEMA_VERSION,
    SUPPORTED_VERSIONS,
    TARGET_FLAGS,
    TARGET_MODES,
    TARGET_SOURCES,
    DataConfig,
    EvalConfig,
    ModelConfig,
    Paraphrase,
    RunConfig,
    Session,
    TargetItem,
    TargetsConfig,
    new_session,
    toml_default,
    toml_fields,
    toml_name,
)

__all__ = [
    "SCHEMA_VERSION", "SUPPORTED_VERSIONS", "DEFAULT_MODEL", "DEFAULT_DATA", "DEFAULT_DUMMY", "DEVICE_PATTERN",
    "DTYPES", "DATA_FORMATS", "DATA_PREFIXES", "TARGET_MODES", "GENERATED_MODES", "TARGET_SOURCES",
    "GENERATED_SOURCES", "TARGET_FLAGS", "EVAL_LIMITS", "ModelConfig", "Paraphrase", "DataConfig",
    "TargetItem", "TargetsConfig", "EvalConfig", "RunConfig", "Session", "new_session", "to_plain",
    "plain_from_toml",
]


def _toml_value(v: Any) -> Any:
    """Params as TOML holds them: tuples become lists, ``None`` becomes "auto"."""
    if isinstance(v, dict):
        return {str(k): _toml_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_toml_value(x) for x in v]
    if v is None:
        return "auto"
    return v


def _empty(v: Any) -> bool:
    """What an ``omit_empty`` key leaves out of the file: None, "" or an empty list/table (never False or 0)."""
    return v is None or (isinstance(v, (str, list, dict)) and not v)


def _plain(obj: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in toml_fields(type(obj)):
        meta, v = f.metadata, getattr(obj, f.name)
        if meta["omit_empty"] and _empty(v):
            continue
        if meta["table"] is not None:
            v = _plain(v)
        elif meta["tables"] is not None:
            v = [_plain(x) for x in v]
        elif meta["free"]:
            v = _toml_value(copy.deepcopy(dict(v or {})))
        elif v is None and meta["empty"] is not None:
            v = meta["empty"]
        elif isinstance(v, (list, dict)):
            v = type(v)(v)
        elif isinstance(v, str) and not v and meta["empty"] is not None:
            v = meta["empty"]
        out[toml_name(f)] = v
    return out


def to_plain(s: Session) -> dict[str, Any]:
    """The session as plain TOML data, in schema order (what the file holds).

    ``None`` becomes ``""`` for optional strings; empty ``subjects``,
    ``paraphrases`` and ``items`` and unset item flags / run labels are left
    out (the fields' ``empty`` / ``omit_empty`` metadata).  ``dumps``
    compares two of these to edit a user's file in place.
    """
    return _plain(s)


def _from_raw(cls: type, raw: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in toml_fields(cls):
        meta, name = f.metadata, toml_name(f)
        if meta["table"] is not None:
            if meta["omit_empty"] and not isinstance(raw.get(name), dict):
                continue   # an optional table the file does not hold ([finetune])
            out[name] = _from_raw(meta["table"], dict(raw.get(name, {})))
            continue
        if meta["omit_empty"]:
            if name not in raw or _empty(raw[name]):
                continue
            v = raw[name]
        else:
            default = toml_default(cls, name)
            v = raw.get(name, None if default is dataclasses.MISSING else default)
        if meta["tables"] is not None:
            # a missing array comes as the default's dataclasses (``runs``: one "none" run)
            v = [_from_raw(meta["tables"], _plain(x) if dataclasses.is_dataclass(x) else x) for x in v]
        elif meta["free"]:
            v = dict(v)
        elif isinstance(v, dict):
            v = dict(v)
        if meta["fold_case"]:
            v = str(v if v is not None else "").strip().lower()
        out[name] = v
    return out


def plain_from_toml(raw: dict[str, Any]) -> dict[str, Any]:
    """What :func:`to_plain` would give for the session in ``raw`` TOML data.

    Defaults filled in, nothing validated: used to check that a written file
    reads back as the session that was written.
    """
    return _from_raw(Session, raw)
