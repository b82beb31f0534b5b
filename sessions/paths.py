"""The app's autosave file, and the per-user directories (re-exported from :mod:`backends.paths`).

The directories (``config_dir``, ``data_dir``, ``cache_dir`` and their
``UNLEARN_TUI_*_DIR`` overrides) are defined once, in the engine:
:mod:`backends.paths`.  The directories are not created here; pass
``create=True`` to make them.
"""

from __future__ import annotations

from pathlib import Path

from unlearn_tui.backends.paths import APP_NAME, cache_dir, config_dir, data_dir

__all__ = ["APP_NAME", "config_dir", "data_dir", "cache_dir", "AUTOSAVE_NAME", "LEGACY_AUTOSAVE_NAMES",
           "AUTOSAVE_DIR", "autosave_path", "autosave_dir", "session_autosave_path", "legacy_autosave_paths"]

AUTOSAVE_NAME = "autosave.session.json"
LEGACY_AUTOSAVE_NAMES = ("autosave.toml", "autosave.json")
AUTOSAVE_DIR = "autosaves"


def autosave_path() -> Path:
    """The one shared autosave file of earlier versions (still offered for restore, never written).

    One file, written atomically (:func:`backends.fileio.atomic_write`), holds
    everything the restore needs: a JSON object ``{"format": 1, "path": the
    session's file or null, "saved_at": seconds, "session": its TOML text}``.
    (Earlier versions still wrote a pair, ``autosave.toml`` + ``autosave.json``,
    that a crash could leave half written: :func:`legacy_autosave_paths`.)
    Today every session has its own autosave: :func:`session_autosave_path`.
    """
    return data_dir() / AUTOSAVE_NAME


def autosave_dir() -> Path:
    """The folder of the per-session autosaves (:func:`session_autosave_path`)."""
    return data_dir() / AUTOSAVE_DIR


def session_autosave_path(session_path: str | Path | None, instance: str) -> Path:
    """The autosave of one session: keyed by its file (the resolved path), or, for an untitled
    session, by the app instance (``instance``) that edits it, so two instances never share one.

    The file is the JSON object of :func:`autosave_path` plus ``"pid"`` and ``"instance"``
    (who wrote it: an autosave of a running instance is never offered to another one).
    """
    import hashlib

    if session_path is None:
        safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in instance)[:64]
        return autosave_dir() / f"untitled-{safe}.session.json"
    p = Path(session_path).expanduser()
    try:
        p = p.resolve()
    except OSError:
        p = p.absolute()
    digest = hashlib.sha1(str(p).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    stem = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in p.stem)[:40] or "session"
    return autosave_dir() / f"{stem}-{digest}.session.json"


def legacy_autosave_paths() -> tuple[Path, ...]:
    """The two files of the old autosave pair (never restored: a half-written pair cannot be told)."""
    return tuple(data_dir() / n for n in LEGACY_AUTOSAVE_NAMES)
