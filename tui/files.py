"""Session files: open, save, save-as, the autosave and its restore (no Textual here).

Saving goes through :func:`sessions.save` (comment-preserving, atomic);
the autosave through :func:`backends.fileio.atomic_write`.  The dialogs that
ask for the paths are in :mod:`tui.file_actions`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from unlearn_tui.backends.errors import UserError

from .workspace import quiet


def save(session: Any, path: str | Path | None = None) -> tuple[Path | None, str | None]:
    """Save ``session`` (to ``path``, default its own file): (where, None), or (None, the one-line error)."""
    from unlearn_tui import sessions

    try:
        return sessions.save(session, path), None
    except UserError as exc:
        return None, quiet(exc)
    except OSError as exc:
        return None, f"cannot save: {exc}"


def open_session(path: str | Path) -> tuple[Any, str | None]:
    """(the session in ``path``, None), or (None, the one-line error)."""
    from unlearn_tui import sessions

    try:
        return sessions.load(path), None
    except UserError as exc:
        return None, quiet(exc)


def builtin_data_names() -> list[str]:
    """The built-in data sets the open-data dialog offers."""
    from unlearn_tui.backends import data as data_mod

    return data_mod.builtin_names()


def data_spec(path: str) -> str:
    """The data spec for what the user typed: a built-in name, ``builtin:``/``hub:`` as is, else an absolute path."""
    if path in builtin_data_names():
        return f"builtin:{path}"
    if path.startswith(("builtin:", "hub:")):
        return path
    return str(Path(path).expanduser().resolve())


def save_as_start(session: Any) -> tuple[Path, str]:
    """(the folder the save-as dialog shows, the path it proposes) for ``session``."""
    current = session.path
    start = current.parent if current else Path.cwd()
    return start, str(current) if current else str(Path.cwd() / "session.toml")


def import_hparams(path: str | Path) -> tuple[Any, str | None]:
    """((method, params, ignored keys), None) from an EasyEdit hparams YAML, or (None, the one-line error)."""
    from unlearn_tui.backends import easyedit

    try:
        return easyedit.import_hparams(path), None
    except UserError as exc:
        return None, quiet(exc)


def remote_code_refusal(session: Any, trusted: bool) -> str | None:
    """The one-line error when ``session`` may not load its model, else None.

    A session with ``[model] trust_remote_code = true`` would run Python code shipped with the
    model; the app loads it only when started with ``--trust-remote-code`` (``trusted``).
    """
    if not getattr(session.model, "trust_remote_code", False) or trusted:
        return None
    where = f"{session.path}: " if session.path is not None else ""
    return (f"{where}model.trust_remote_code = true would run code shipped with the model; the model "
            f"was not loaded: start unlearn-tui with --trust-remote-code to allow it")


def write_autosave(session: Any) -> str | None:
    """Write the autosave file (see below); the one-line error, or None."""
    from unlearn_tui.backends.fileio import atomic_write
    from unlearn_tui.sessions.paths import autosave_path

    try:
        path = autosave_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, autosave_text(session))
    except Exception as exc:  # never let the safety net take the app down
        return f"autosave failed: {quiet(exc)}"
    return None


def drop_autosave() -> None:
    from unlearn_tui.sessions.paths import autosave_path

    try:
        autosave_path().unlink()
    except OSError:
        pass


# ==================================================================== autosave
# The autosave is ONE file (sessions.paths.autosave_path()), replaced atomically by
# backends.fileio.atomic_write, so a crash or a kill mid-write leaves the previous complete
# autosave (never half a pair): a JSON object {"format": 1, "path": the session's file or null,
# "saved_at": seconds since the epoch, "session": the session as TOML text}.  At start-up a file
# that cannot be read, is not UTF-8, not that JSON, or holds a session that does not validate is
# renamed aside (<name>.corrupt-<YYYYmmdd-HHMMSS>) with a one-line warning, and the app starts
# without it.  The old two-file autosave (autosave.toml + autosave.json, written one after the
# other) is never restored, whole or half: its files are renamed aside (<name>.old-<stamp>) with a
# warning.
AUTOSAVE_FORMAT = 1


def autosave_text(session: Any) -> str:
    """The autosave file's content for ``session`` (see above)."""
    from unlearn_tui import sessions

    return json.dumps({"format": AUTOSAVE_FORMAT,
                       "path": str(session.path) if session.path is not None else None,
                       "saved_at": time.time(), "session": sessions.dumps(session)},
                      ensure_ascii=False, indent=1) + "\n"


def _set_aside(path: Path, tag: str) -> Path | None:
    """Rename ``path`` to ``<name>.<tag>-<timestamp>`` next to it (never over a file); None if it fails."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(100):
        dest = path.with_name(f"{path.name}.{tag}-{stamp}" + (f"-{n}" if n else ""))
        if os.path.lexists(dest):
            continue
        try:
            os.rename(path, dest)
        except OSError:
            return None
        return dest
    return None


def _read_autosave(path: Path) -> Any:
    """The session in the autosave file; raises ValueError (one line) when it is not a valid autosave."""
    from unlearn_tui import sessions

    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read it ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text (bad byte at offset {exc.start})") from None
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"not valid JSON ({exc})") from None
    if not isinstance(obj, dict) or obj.get("format") != AUTOSAVE_FORMAT:
        raise ValueError("not an unlearn-tui autosave (no format 1 object)")
    where, toml_text = obj.get("path"), obj.get("session")
    if not isinstance(toml_text, str) or not (where is None or isinstance(where, str)):
        raise ValueError("not an unlearn-tui autosave (session or path missing)")
    try:
        return sessions.loads(toml_text, where)
    except UserError as exc:
        raise ValueError(f"the session in it is invalid ({exc})") from None
    except Exception as exc:  # whatever it holds, a bad autosave must never stop the app
        raise ValueError(f"the session in it cannot be read ({type(exc).__name__}: {exc})") from None


def restore_autosave() -> tuple[Any, bool, list[str]]:
    """(session or None, restored, warnings): the autosave if it is valid (see above)."""
    from unlearn_tui.sessions.paths import autosave_path, legacy_autosave_paths

    problems: list[str] = []
    old = [p for p in legacy_autosave_paths() if os.path.lexists(p)]
    if old:
        moved = [(p, _set_aside(p, "old")) for p in old]
        names = ", ".join(f"{p.name} -> {d.name}" if d else f"{p.name} (could not be renamed)" for p, d in moved)
        problems.append(f"an autosave in the old two-file format was not restored (a crash can leave that "
                        f"pair half written); set aside in {old[0].parent}: {names}")
    path = autosave_path()
    if not os.path.lexists(path):
        return None, False, problems
    try:
        s = _read_autosave(path)
    except ValueError as exc:
        dest = _set_aside(path, "corrupt")
        aside = f"moved to {dest}" if dest else "and it could not be moved aside"
        problems.append(f"the autosave {path} was not restored: {exc}; {aside}")
        return None, False, problems
    return s, True, problems
