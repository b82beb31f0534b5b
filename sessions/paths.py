"""Per-user directories (config, data, cache) and the autosave file.

Light on purpose: ``backends`` imports this too.  Each directory can be
overridden with an environment variable (tests use these):
``UNLEARN_TUI_CONFIG_DIR``, ``UNLEARN_TUI_DATA_DIR``, ``UNLEARN_TUI_CACHE_DIR``.
The directories are not created here; pass ``create=True`` to make them.
"""

from __future__ import annotations

import os
from pathlib import Path

APP_NAME = "unlearn-tui"


def _dir(env: str, kind: str, create: bool) -> Path:
    value = os.environ.get(env)
    if value:
        path = Path(value).expanduser()
    else:
        import platformdirs

        fn = {"config": platformdirs.user_config_dir, "data": platformdirs.user_data_dir,
              "cache": platformdirs.user_cache_dir}[kind]
        path = Path(fn(APP_NAME, appauthor=False))
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def config_dir(create: bool = False) -> Path:
    """User configuration (themes, preferences)."""
    return _dir("UNLEARN_TUI_CONFIG_DIR", "config", create)


def data_dir(create: bool = False) -> Path:
    """User data (autosave, saved sessions and results)."""
    return _dir("UNLEARN_TUI_DATA_DIR", "data", create)


def cache_dir(create: bool = False) -> Path:
    """Caches (statistics, downloaded data); safe to delete."""
    return _dir("UNLEARN_TUI_CACHE_DIR", "cache", create)


AUTOSAVE_NAME = "autosave.session.json"
LEGACY_AUTOSAVE_NAMES = ("autosave.toml", "autosave.json")


def autosave_path() -> Path:
    """Where the TUI autosaves the current session.

    One file, written atomically (``sessions.writer.atomic_write``), holds
    everything the restore needs: a JSON object ``{"format": 1, "path": the
    session's file or null, "saved_at": seconds, "session": its TOML text}``.
    (Earlier versions wrote a pair, ``autosave.toml`` + ``autosave.json``,
    that a crash could leave half written: :func:`legacy_autosave_paths`.)
    """
    return data_dir() / AUTOSAVE_NAME


def legacy_autosave_paths() -> tuple[Path, ...]:
    """The two files of the old autosave pair (never restored: a half-written pair cannot be told)."""
    return tuple(data_dir() / n for n in LEGACY_AUTOSAVE_NAMES)
