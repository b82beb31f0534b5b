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


# ==================================================================== autosave
# Every session has its own autosave (sessions.paths.session_autosave_path): keyed by the session's
# file, or, for an untitled session, by the app instance editing it, so two instances never share
# one (a new untitled session never opens with another instance's unsaved choices).  Each is ONE
# file, replaced atomically by backends.fileio.atomic_write, so a crash or a kill mid-write leaves
# the previous complete autosave (never half a pair): a JSON object {"format": 1, "path": the
# session's file or null, "saved_at": seconds since the epoch, "session": the session as TOML text,
# "pid": the writer's process id, "instance": the writer's instance id}.  At start-up the app finds
# the autosave of the session it opens (without one: the newest autosave no running instance owns,
# the single shared autosave of earlier versions included) and ASKS before restoring it
# (:class:`tui.screens.confirm.RestoreAutosave`).  A file that cannot be read, is not UTF-8, not that
# JSON, or holds a session that does not validate is renamed aside (<name>.corrupt-<YYYYmmdd-HHMMSS>)
# with a one-line warning, and the app starts without it.  The old two-file autosave (autosave.toml +
# autosave.json, written one after the other) is never restored, whole or half: its files are
# renamed aside (<name>.old-<stamp>) with a warning.
AUTOSAVE_FORMAT = 1
_LIVE: set[str] = set()          # instances of this process whose app is running (their autosaves are theirs)


def new_instance() -> str:
    """An id for one app instance (its untitled session's autosave is keyed by it)."""
    import uuid

    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


def instance_started(instance: str) -> None:
    _LIVE.add(instance)


def instance_stopped(instance: str) -> None:
    _LIVE.discard(instance)


def autosave_file(session: Any, instance: str) -> Path:
    """Where ``session`` (edited by ``instance``) is autosaved."""
    from unlearn_tui.sessions.paths import session_autosave_path

    return session_autosave_path(session.path, instance)


def write_autosave(session: Any, instance: str = "") -> tuple[Path | None, str | None]:
    """Write the session's autosave file (see above): (its path, None), or (None, the one-line error)."""
    from unlearn_tui.backends.fileio import atomic_write

    try:
        path = autosave_file(session, instance)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, autosave_text(session, instance))
    except Exception as exc:  # never let the safety net take the app down
        return None, f"autosave failed: {quiet(exc)}"
    return path, None


def drop_autosave(path: Path | None = None) -> None:
    """Remove an autosave file (default: the shared one of earlier versions)."""
    from unlearn_tui.sessions.paths import autosave_path

    try:
        (path or autosave_path()).unlink()
    except OSError:
        pass


def autosave_text(session: Any, instance: str = "") -> str:
    """The autosave file's content for ``session`` (see above)."""
    from unlearn_tui import sessions

    return json.dumps({"format": AUTOSAVE_FORMAT,
                       "path": str(session.path) if session.path is not None else None,
                       "saved_at": time.time(), "session": sessions.dumps(session),
                       "pid": os.getpid(), "instance": instance},
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


class AutosaveOffer:
    """A valid autosave the app may restore (it asks first): its file, session, time and writer."""

    def __init__(self, file: Path, session: Any, saved_at: float | None, pid: int | None,
                 instance: str | None) -> None:
        self.file, self.session, self.saved_at, self.pid, self.instance = file, session, saved_at, pid, instance

    @property
    def name(self) -> str:
        return self.session.path.name if self.session.path is not None else "an untitled session"

    def age(self, now: float | None = None) -> str:
        if self.saved_at is None:
            return "at an unknown time"
        s = max(0, int((now or time.time()) - self.saved_at))
        if s < 90:
            return f"{s} s ago"
        if s < 90 * 60:
            return f"{s // 60} min ago"
        if s < 48 * 3600:
            return f"{s // 3600} h ago"
        return f"{s // 86400} days ago"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def owned_elsewhere(pid: Any, instance: Any, me: str = "") -> bool:
    """Whether an autosave belongs to another running instance (then it is never offered)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    if pid != os.getpid():
        return _alive(pid)
    return bool(instance) and instance != me and instance in _LIVE


def _read_autosave(path: Path) -> tuple[Any, dict]:
    """(the session in the autosave file, its JSON object); ValueError (one line) when it is not a valid autosave."""
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
        return sessions.loads(toml_text, where), obj
    except UserError as exc:
        raise ValueError(f"the session in it is invalid ({exc})") from None
    except Exception as exc:  # whatever it holds, a bad autosave must never stop the app
        raise ValueError(f"the session in it cannot be read ({type(exc).__name__}: {exc})") from None


def find_autosave(session_path: str | Path | None = None, me: str = "") -> tuple[AutosaveOffer | None, list[str]]:
    """(the autosave to offer or None, warnings) for an app instance ``me`` opening ``session_path``
    (None: a new untitled session).  See above; nothing is restored here."""
    from unlearn_tui.sessions.paths import autosave_dir, autosave_path, legacy_autosave_paths, session_autosave_path

    problems: list[str] = []
    old = [p for p in legacy_autosave_paths() if os.path.lexists(p)]
    if old:
        moved = [(p, _set_aside(p, "old")) for p in old]
        names = ", ".join(f"{p.name} -> {d.name}" if d else f"{p.name} (could not be renamed)" for p, d in moved)
        problems.append(f"an autosave in the old two-file format was not restored (a crash can leave that "
                        f"pair half written); set aside in {old[0].parent}: {names}")
    wanted = None if session_path is None else session_autosave_path(session_path, me)
    candidates = [autosave_path()]
    if wanted is not None:
        candidates.append(wanted)
    else:
        try:
            candidates += sorted(p for p in autosave_dir().iterdir() if p.name.endswith(".session.json"))
        except OSError:
            pass
    offers: list[AutosaveOffer] = []
    for path in candidates:
        if not os.path.lexists(path):
            continue
        try:
            s, obj = _read_autosave(path)
        except ValueError as exc:
            dest = _set_aside(path, "corrupt")
            aside = f"moved to {dest}" if dest else "and it could not be moved aside"
            problems.append(f"the autosave {path} was not restored: {exc}; {aside}")
            continue
        if wanted is not None and path != wanted and (s.path is None or
                                                      session_autosave_path(s.path, me) != wanted):
            continue                     # the shared autosave of another session
        pid, inst = obj.get("pid"), obj.get("instance")
        if owned_elsewhere(pid, inst, me):
            if wanted is not None:
                problems.append(f"another unlearn-tui (pid {pid}) has unsaved changes to this session; "
                                "they were not offered for restore here")
            continue
        saved = obj.get("saved_at")
        offers.append(AutosaveOffer(path, s, float(saved) if isinstance(saved, (int, float)) else None,
                                    pid if isinstance(pid, int) else None, inst if isinstance(inst, str) else None))
    if not offers:
        return None, problems
    offers.sort(key=lambda o: o.saved_at or 0.0, reverse=True)
    return offers[0], problems
