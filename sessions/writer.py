"""Write a session back to TOML, keeping the user's comments and key order.

A session loaded from a file carries the file's tomlkit document and the
plain form of what it held (``Session._doc`` / ``Session._baseline``).
:func:`dumps` diffs the current session against that baseline and edits only
the keys that changed, so untouched lines (and their comments) stay byte for
byte.  A session without a document is rendered fresh, with short comments.

Saving goes through :func:`backends.fileio.atomic_write`, the one atomic
file writer (its rules, and those for stale temporary files, are in
:mod:`backends.fileio`); ``atomic_write``, ``clean_stale_temps``,
``TEMP_MARK`` and ``STALE_TEMP_SECONDS`` are re-exported here.

The comments of a freshly rendered file are the ``help`` metadata of the
fields of :mod:`backends.spec`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, cast

from unlearn_tui.backends.compat import tomllib
from unlearn_tui.backends.errors import UserError
from unlearn_tui.backends.fileio import STALE_TEMP_SECONDS, TEMP_MARK, atomic_write, clean_stale_temps
from unlearn_tui.backends.spec import DATA_PREFIXES, Session, toml_comment, toml_fields, toml_keys, toml_name

from .schema import plain_from_toml, to_plain

__all__ = ["dumps", "save", "COMMENTS", "atomic_write", "clean_stale_temps", "TEMP_MARK", "STALE_TEMP_SECONDS"]

_MISSING: Any = object()

def _comments() -> dict[tuple[str, str], str]:
    """(section, key) -> the comment a fresh file shows beside the key: the fields' ``help`` metadata."""
    out = {}
    for f in toml_fields(Session):
        cls = f.metadata["table"]
        for k in toml_keys(cls) if cls is not None else ():
            text = toml_comment(cls, k)
            if text:
                out[(toml_name(f), k)] = text
    return out


COMMENTS = _comments()


# -------------------------------------------------------------- tomlkit glue
def _same(a: Any, b: Any) -> bool:
    """Equality that also compares types (``1 != 1.0 != True`` here)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _is_aot(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def _item(v: Any, inline: bool = False) -> Any:
    """A tomlkit item for plain ``v``; ``inline`` keeps tables inline (inside ``{...}``)."""
    import tomlkit

    if isinstance(v, dict):
        t = tomlkit.inline_table() if inline else tomlkit.table()
        for k, x in v.items():
            t.append(k, _item(x, inline))
        return t
    if _is_aot(v):
        if inline:
            arr = tomlkit.array()
            arr.extend(_item(x, True) for x in v)
            return arr
        a = tomlkit.aot()
        for x in v:
            a.append(_item(x))
        return a
    return tomlkit.item(v)


def _sync(tbl: Any, old: dict, new: dict) -> None:
    """Make the tomlkit table ``tbl`` (which reflects ``old``) reflect ``new``."""
    import tomlkit
    from tomlkit.items import AoT, Array, InlineTable

    inline = isinstance(tbl, InlineTable)
    for key in list(old):
        if key not in new and key in tbl:
            del tbl[key]
    for key, nv in new.items():
        ov = old.get(key, _MISSING)
        if _same(ov, nv):
            continue
        cur = tbl[key] if key in tbl else None
        if isinstance(nv, dict):
            if cur is None:
                tbl[key] = tomlkit.inline_table() if inline else tomlkit.table()
                cur = tbl[key]
            if isinstance(cur, dict):
                _sync(cur, ov if isinstance(ov, dict) else {}, nv)
            else:
                tbl[key] = _item(nv, inline)
        elif _is_aot(nv) and isinstance(cur, AoT) and isinstance(ov, list) and len(cur) == len(ov):
            n = min(len(ov), len(nv))
            for i in range(n):
                if not _same(ov[i], nv[i]):
                    _sync(cur[i], ov[i] if isinstance(ov[i], dict) else {}, nv[i])
            for i in reversed(range(n, len(ov))):
                del cur[i]
            for x in nv[n:]:
                cur.append(_item(x))
        else:
            # a user's inline array of tables stays inline
            tbl[key] = _item(nv, inline or isinstance(cur, Array))


def _fresh(plain: dict) -> Any:
    import tomlkit

    doc = tomlkit.document()
    doc.add(tomlkit.comment("unlearn-tui session; relative paths are relative to this file"))
    doc.add("version", plain["version"])
    for section in (toml_name(f) for f in toml_fields(Session) if f.metadata["table"] is not None):
        if section not in plain:   # an optional table the session does not have ([finetune])
            continue
        t = tomlkit.table()
        rows = [(k, v, _item(v)) for k, v in plain[section].items()]
        width = max((len(f"{k} = {it.as_string()}") for k, v, it in rows
                     if not isinstance(v, (dict, list))), default=0)
        for k, v, it in rows:
            text = COMMENTS.get((section, k))
            if text and not isinstance(v, (dict, list)):
                it.comment(text)
                it.trivia.comment_ws = " " * (width - len(f"{k} = {it.as_string()}") + 2)
            t.add(k, it)
        doc.add(tomlkit.nl())
        doc.add(section, t)
    doc.add(tomlkit.nl())
    doc.add("runs", _item(plain["runs"]) if plain["runs"] else tomlkit.array())
    if plain.get("steps"):   # the app's kept step edits (omitted when there are none)
        doc.add(tomlkit.nl())
        doc.add("steps", _item(plain["steps"]))
    return doc


def _render(session: Session) -> tuple[str, Any, dict]:
    """(text, tomlkit document, plain form) for ``session``; does not modify it."""
    import tomlkit

    plain = to_plain(session)
    if session._doc is not None and session._baseline is not None:
        try:
            original = session._doc.as_string()
            doc = tomlkit.parse(original)  # edit a copy
            _sync(doc, session._baseline, plain)
            text = doc.as_string()
            if "\r\n" in original:  # keep Windows line endings
                text = text.replace("\r\n", "\n").replace("\n", "\r\n")
                doc = tomlkit.parse(text)
            if _reads_back(text, plain):
                return text, doc, plain
        except Exception:  # a tomlkit corner case: lose the comments, never the data
            pass
    try:
        doc = _fresh(plain)
        text = doc.as_string()
    except (TypeError, ValueError) as e:  # a value TOML cannot hold (set by code, not a file)
        raise UserError(f"cannot write the session as TOML: {e}", "save") from e
    if not _reads_back(text, plain):  # pragma: no cover - a bug, not a user error
        raise RuntimeError("sessions.dumps produced TOML that does not read back as the session")
    return text, doc, plain


def _reads_back(text: str, plain: dict) -> bool:
    """Whether ``text`` holds exactly ``plain`` (so a sync bug never corrupts a file)."""
    try:
        return _same(plain_from_toml(tomllib.loads(text)), plain)
    except (tomllib.TOMLDecodeError, AttributeError, TypeError, ValueError):
        return False


def dumps(session: Session) -> str:
    """The session as TOML text (the user's comments and key order preserved)."""
    return _render(session)[0]


# --------------------------------------------------------------------- save
def _rebased(p: str | None, old_base: Path, new_base: Path) -> str | None:
    """A relative file path re-expressed relative to ``new_base``."""
    if not p or p.startswith(DATA_PREFIXES) or p.startswith("~") or Path(p).is_absolute():
        return p
    target = old_base / p
    try:
        return Path(os.path.relpath(target, new_base)).as_posix()
    except ValueError:  # different drives on Windows
        return str(target)


def save(session: Session, path: Path | str | None = None) -> Path:
    """Write the session atomically to ``path`` (default: where it came from).

    Relative data/pool paths are re-expressed relative to the new location
    when the directory changes.  Afterwards ``session.path`` is the saved
    file.  Returns that path.
    """
    if path is None:
        if session.path is None:
            raise UserError("the session has no file yet; give a path to save it to", "save")
        target = session.path
    else:
        target = Path(path).expanduser().absolute()
    label = str(path) if path is not None else str(target)
    if target.is_dir():
        raise UserError("is a directory; give a file name for the session", label)
    real = target.resolve() if target.is_symlink() else target   # atomic_write follows the link too
    if not real.parent.is_dir():
        raise UserError(f"cannot save: directory {real.parent} does not exist", label)

    old_base, new_base = session.base_dir(), target.parent
    data_path, pool = session.data.path, session.targets.pool
    if old_base != new_base:
        data_path = cast(str, _rebased(data_path, old_base, new_base))   # a str stays a str
        pool = _rebased(pool, old_base, new_base)
    work = dataclasses.replace(session, data=dataclasses.replace(session.data, path=data_path),
                               targets=dataclasses.replace(session.targets, pool=pool))
    work._doc, work._baseline = session._doc, session._baseline
    text, doc, plain = _render(work)
    try:
        atomic_write(real, text)
    except OSError as e:
        raise UserError(f"cannot save the session: {e.strerror or e}", label) from e
    session.data.path, session.targets.pool = data_path, pool
    session.path = target
    session._doc, session._baseline = doc, plain
    return target
