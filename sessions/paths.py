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
           "autosave_path", "legacy_autosave_paths"]

AUTOSAVE_NAME = "autosave.session.json"
LEGACY_AUTOSAVE_NAMES = ("autosave.toml", "autosave.json")


def autosave_path() -> Path:
    """Where the TUI autosaves the current session.

    One file, written atomically (:func:`backends.fileio.atomic_write`), holds
    everything the restore needs: a JSON object ``{"format": 1, "path": the
    session's file or null, "saved_at": seconds, "session": its TOML text}``.
    (Earlier versions wrote a pair, ``autosave.toml`` + ``autosave.json``,
    that a crash could leave half written: :func:`legacy_autosave_paths`.)
    """
    return data_dir() / AUTOSAVE_NAME


def legacy_autosave_paths() -> tuple[Path, ...]:
    """The two files of the old autosave pair (never restored: a half-written pair cannot be told)."""
    return tuple(data_dir() / n for n in LEGACY_AUTOSAVE_NAMES)
