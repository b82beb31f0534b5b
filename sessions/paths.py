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


def autosave_path() -> Path:
    """Where the TUI autosaves the current session."""
    return data_dir() / "autosave.toml"
