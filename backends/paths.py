"""Per-user directories: configuration, data and caches.

The engine's caches (dequantized models, covariance statistics, context
templates) and the app's files live under these.  Each directory can be
overridden with an environment variable (tests use these):
``UNLEARN_TUI_CONFIG_DIR``, ``UNLEARN_TUI_DATA_DIR``, ``UNLEARN_TUI_CACHE_DIR``;
otherwise ``platformdirs`` picks the platform's place.  The directories are
not created here; pass ``create=True`` to make them.  Torch-free and light.
"""

from __future__ import annotations

import os
from pathlib import Path

APP_NAME = "unlearn-tui"

ENV = {"config": "UNLEARN_TUI_CONFIG_DIR", "data": "UNLEARN_TUI_DATA_DIR", "cache": "UNLEARN_TUI_CACHE_DIR"}


def _dir(kind: str, create: bool) -> Path:
    value = os.environ.get(ENV[kind])
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
    return _dir("config", create)


def data_dir(create: bool = False) -> Path:
    """User data (autosave, saved sessions and results)."""
    return _dir("data", create)


def cache_dir(create: bool = False) -> Path:
    """Caches (statistics, downloaded data); safe to delete."""
    return _dir("cache", create)


def shared_data_dir() -> Path:
    """Third-party evaluation data (TOFU, PISTOL): ``UNLEARN_TUI_PAPER_DATA``, else ``shared/data`` beside
    the checkout, else beside the working directory.  Nothing is copied from it; it may not exist."""
    env = os.environ.get("UNLEARN_TUI_PAPER_DATA")
    if env:
        return Path(env).expanduser()
    here = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    cwd = Path.cwd().parent / "shared" / "data"
    return here if here.is_dir() or not cwd.is_dir() else cwd
