"""Theme files (TOML) -> ``textual.theme.Theme`` objects.

Our own themes live in the ``themes`` package (``themes/*.toml``); users add
theme files to ``config_dir()/themes/``.  A file holds the ``Theme`` fields
(``name``, ``primary`` (required), ``secondary``, ``accent``, ``foreground``,
``background``, ``surface``, ``panel``, ``boost``, ``warning``, ``error``,
``success``, ``dark``, ``luminosity_spread``, ``text_alpha``) and an optional
``[variables]`` table.  A bad file is reported (the App shows a
notification) and skipped; it never stops the start-up.
"""

from __future__ import annotations

from pathlib import Path

from textual.color import Color, ColorParseError
from textual.theme import Theme

from unlearn_tui.backends.compat import tomllib
from unlearn_tui.backends.errors import UserError

COLOR_KEYS = ("primary", "secondary", "accent", "foreground", "background", "surface", "panel", "boost",
              "warning", "error", "success")
FLOAT_KEYS = ("luminosity_spread", "text_alpha")
KNOWN = set(COLOR_KEYS) | set(FLOAT_KEYS) | {"name", "dark", "variables"}
DEFAULT_DARK = "unlearn-dark"
DEFAULT_LIGHT = "unlearn-light"


def builtin_dir() -> Path:
    from unlearn_tui import themes

    return Path(themes.__file__).resolve().parent


def user_dir() -> Path:
    from unlearn_tui.sessions.paths import config_dir

    return config_dir() / "themes"


def theme_from_toml(text: str, label: str, default_name: str) -> Theme:
    """Parse one theme file; raises UserError naming the file and key."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"not valid TOML ({exc})", label) from None
    unknown = sorted(set(raw) - KNOWN)
    if unknown:
        raise UserError(f"unknown key {unknown[0]!r}; expected some of {', '.join(sorted(KNOWN))}", label)
    name = raw.get("name", default_name)
    if not isinstance(name, str) or not name.strip():
        raise UserError("name: expected a non-empty string", label)
    if "primary" not in raw:
        raise UserError("primary: missing; every theme needs a primary colour", label)
    kwargs: dict = {}
    for key in COLOR_KEYS:
        if key in raw:
            value = raw[key]
            if not isinstance(value, str):
                raise UserError(f"{key}: expected a colour string such as \"#2bb3a3\", got {value!r}", label)
            try:
                Color.parse(value)
            except ColorParseError:
                raise UserError(f"{key}: {value!r} is not a colour", label) from None
            kwargs[key] = value
    for key in FLOAT_KEYS:
        if key in raw:
            if not isinstance(raw[key], (int, float)) or isinstance(raw[key], bool):
                raise UserError(f"{key}: expected a number", label)
            kwargs[key] = float(raw[key])
    dark = raw.get("dark", True)
    if not isinstance(dark, bool):
        raise UserError("dark: expected true or false", label)
    variables = raw.get("variables", {})
    if not isinstance(variables, dict) or not all(isinstance(v, str) for v in variables.values()):
        raise UserError("variables: expected a table of strings", label)
    return Theme(name=name.strip(), dark=dark, variables=dict(variables), **kwargs)


def load_dir(directory: Path) -> tuple[list[Theme], list[str]]:
    themes: list[Theme] = []
    problems: list[str] = []
    if not directory.is_dir():
        return themes, problems
    for path in sorted(directory.glob("*.toml")):
        try:
            text = path.read_text(encoding="utf-8")
            themes.append(theme_from_toml(text, str(path), path.stem))
        except UserError as exc:
            problems.append(str(exc))
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"{path}: cannot read ({exc})")
    return themes, problems


def load_all() -> tuple[list[Theme], list[str]]:
    """Our themes, then the user's (a user theme with the same name replaces ours)."""
    ours, p1 = load_dir(builtin_dir())
    theirs, p2 = load_dir(user_dir())
    return ours + theirs, p1 + p2
