"""Typed user settings (``config_dir()/settings.toml``).

Every field has a default; a bad value is reported (as a notification) and
the default kept, so a broken settings file never stops the app::

    theme = "unlearn-light"
    autosave_seconds = 20

The app itself writes one key, ``results_columns`` (the Results pane's column
chooser: the columns shown, by key; absent = the defaults), with
:func:`save_value`, which keeps the rest of the file as the user wrote it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from unlearn_tui.backends.compat import tomllib


@dataclass
class Settings:
    theme: str = "unlearn-dark"          # a theme name (ours, the user's or Textual's)
    autosave_seconds: float = 15.0       # how often unsaved changes are written to the autosave file
    progress_hz: float = 10.0            # at most this many progress messages per second
    # known scores (does the unedited model know the fact?) of the rows on screen and the selected items, in
    # the background, cached per model and item (tui/known.py)
    baseline_on_load: bool = True
    baseline_limit: int = 200            # ... at most this many evaluated per data file opened (cached ones are free)
    wide_min_width: int = 160            # from this many columns (and wide_min_height rows) every pane
    wide_min_height: int = 40            # is shown side by side; below, the panes are tabs
    max_log_lines: int = 500
    known_batch: int = 4                 # known scores: items per background batch (visible rows first)
    # the Results columns the user chose (column keys, in table order); None: the defaults.  Written by the
    # app (the column chooser), restored at the next launch
    results_columns: list[str] | None = None

    LIMITS = {"autosave_seconds": (1.0, 3600.0), "progress_hz": (0.5, 60.0), "baseline_limit": (0, 100000),
              "wide_min_width": (40, 10000), "wide_min_height": (10, 10000), "max_log_lines": (10, 100000),
              "known_batch": (1, 1000)}


def settings_path() -> Path:
    from unlearn_tui.sessions.paths import config_dir

    return config_dir() / "settings.toml"


def load(path: Path | None = None) -> tuple[Settings, list[str]]:
    path = path or settings_path()
    s = Settings()
    if not path.is_file():
        return s, []
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        return s, [f"{path}: cannot read the settings ({' '.join(str(exc).split())}); using defaults"]
    problems = []
    types = {f.name: type(f.default) for f in dataclasses.fields(Settings)}
    for key, value in raw.items():
        if key not in types:
            problems.append(f"{path}: unknown setting {key!r}")
            continue
        if key == "results_columns":
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                s.results_columns = list(value)
            else:
                problems.append(f"{path}: {key}: expected a list of column keys, got {value!r}")
            continue
        want = types[key]
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            problems.append(f"{path}: {key}: expected {want.__name__}, got {value!r}")
            continue
        lo_hi = Settings.LIMITS.get(key)
        if lo_hi and not lo_hi[0] <= value <= lo_hi[1]:
            problems.append(f"{path}: {key}: expected {lo_hi[0]}..{lo_hi[1]}, got {value!r}")
            continue
        setattr(s, key, value)
    return s, problems


def save_value(key: str, value: object, path: Path | None = None) -> str | None:
    """Set one key of the settings file (None removes it), keeping the user's other keys and comments;
    returns the one-line error, or None."""
    import tomlkit

    from unlearn_tui.backends.fileio import atomic_write

    path = path or settings_path()
    try:
        doc = tomlkit.parse(path.read_text(encoding="utf-8")) if path.is_file() else tomlkit.document()
    except Exception as exc:  # a file we cannot parse is not rewritten (the user's to fix)
        return f"{path}: not written ({' '.join(str(exc).split())})"
    if value is None:
        doc.pop(key, None)
    else:
        doc[key] = value
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, tomlkit.dumps(doc))
    except OSError as exc:
        return f"{path}: not written ({exc.strerror or exc})"
    return None
