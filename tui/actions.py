"""The one registry of bindable actions.

Every user-facing action is listed here once with an id, a default key, a
description and where it shows.  The App builds its ``BINDINGS`` from this
list (each :class:`Binding` carries ``id="unlearn.<id>"``), the help screen
and the command palette list it, and a user keymap
(``config_dir()/keymap.toml``) re-binds actions by id::

    # keymap.toml
    run = "ctrl+r"
    cancel = "ctrl+k,f9"       # several keys: comma separated
    [keys]                     # the same, inside a table, also works
    probe = "f7"
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from textual.binding import Binding

from unlearn_tui.backends.compat import tomllib

PREFIX = "unlearn."


@dataclass(frozen=True)
class ActionSpec:
    id: str            # stable id used by the keymap (without the "unlearn." prefix)
    key: str           # default key(s), Textual syntax, comma separated
    action: str        # Textual action string, e.g. "run" -> App.action_run
    description: str   # short text for the footer / help / palette
    group: str = "app"
    show: bool = True  # shown in the footer
    priority: bool = False  # works even when a text input has focus
    scope: str = "app"      # "app" or the pane whose BINDINGS hold it (forget, targets, results, probe)

    @property
    def binding_id(self) -> str:
        return PREFIX + self.id


ACTIONS: tuple[ActionSpec, ...] = (
    ActionSpec("help", "f1", "help", "Help", "app"),
    ActionSpec("tab_forget", "f2", "show_tab('forget')", "Forget set", "panes", show=False, priority=True),
    ActionSpec("tab_targets", "f3", "show_tab('targets')", "Targets", "panes", show=False, priority=True),
    ActionSpec("tab_method", "f4", "show_tab('method')", "Method", "panes", show=False, priority=True),
    ActionSpec("tab_run", "f5", "show_tab('run')", "Run", "panes", show=False, priority=True),
    ActionSpec("tab_results", "f6", "show_tab('results')", "Results", "panes", show=False, priority=True),
    ActionSpec("tab_probe", "f7", "show_tab('probe')", "Probe", "panes", show=False, priority=True),
    ActionSpec("run", "ctrl+r", "run", "Run", "run", priority=True),
    ActionSpec("cancel", "ctrl+k", "cancel", "Cancel", "run", priority=True),
    ActionSpec("step", "ctrl+t", "step", "Step", "run", priority=True),
    ActionSpec("undo_edit", "ctrl+z", "undo_edit", "Undo edit", "run", show=False),
    ActionSpec("redo_edit", "ctrl+y", "redo_edit", "Redo edit", "run", show=False),
    ActionSpec("replay", "f8", "replay", "Replay session", "run", show=False),
    ActionSpec("save", "ctrl+s", "save", "Save", "session", priority=True),
    ActionSpec("save_as", "f12", "save_as", "Save as", "session", show=False),
    ActionSpec("open_session", "ctrl+o", "open_session", "Open session", "session", show=False, priority=True),
    ActionSpec("new_session", "ctrl+n", "new_session", "New session", "session", show=False, priority=True),
    ActionSpec("open_data", "ctrl+l", "open_data", "Open data", "session", show=False, priority=True),
    ActionSpec("self_improve", "ctrl+g", "self_improve", "Self-improve targets", "targets", show=False),
    ActionSpec("import_yaml", "ctrl+e", "import_yaml", "Import EasyEdit YAML", "method", show=False),
    ActionSpec("probe", "ctrl+b", "probe", "Probe", "probe", show=False, priority=True),
    ActionSpec("export_model", "ctrl+x", "export_model", "Export edited model…", "session", show=False),
    ActionSpec("export_delta", "ctrl+shift+x", "export_model(True)", "Export edited model as a delta…", "session",
               show=False),
    ActionSpec("paper_results", "f10", "paper_results", "Paper results…", "session", show=False),
    ActionSpec("quit", "ctrl+q", "quit", "Quit", "app", priority=True),
    # pane actions (bound on the pane; active while focus is inside it)
    ActionSpec("toggle_forget", "space", "toggle_forget", "Forget", "forget", scope="forget"),
    ActionSpec("toggle_retain", "r", "toggle_retain", "Retain", "forget", scope="forget"),
    ActionSpec("focus_search", "slash", "focus_search", "Search", "forget", scope="forget"),
    ActionSpec("merge_up", "plus", "merge(1)", "Merge+", "targets", scope="targets"),
    ActionSpec("merge_down", "minus", "merge(-1)", "Merge−", "targets", scope="targets"),
    ActionSpec("reset_target", "delete", "reset_target", "Reset", "targets", scope="targets"),
    ActionSpec("move_up", "alt+up", "move(-1)", "Move up", "targets", show=False, scope="targets"),
    ActionSpec("move_down", "alt+down", "move(1)", "Move down", "targets", show=False, scope="targets"),
    ActionSpec("results_columns", "c", "columns", "Choose columns", "results", show=False, scope="results"),
    ActionSpec("results_deltas", "d", "toggle_deltas", "Δ vs baseline", "results", show=False, scope="results"),
    ActionSpec("results_compare", "a", "compare", "A/B two runs", "results", show=False, scope="results"),
    ActionSpec("results_charts", "g", "toggle_charts", "Charts", "results", show=False, scope="results"),
    ActionSpec("results_export", "x", "export", "Export CSV/SVG", "results", show=False, scope="results"),
)

BY_ID = {a.id: a for a in ACTIONS}


def bindings(scope: str = "app") -> list[Binding]:
    return [Binding(a.key, a.action, a.description, show=a.show, priority=a.priority, id=a.binding_id)
            for a in ACTIONS if a.scope == scope]


def pane_bindings(scope: str) -> list[Binding]:
    return bindings(scope)


def keymap_path() -> Path:
    from unlearn_tui.sessions.paths import config_dir

    return config_dir() / "keymap.toml"


def load_keymap(path: Path | None = None) -> tuple[dict[str, str], list[str]]:
    """(binding id -> keys, problems).  A missing file is no problem; a bad one never raises."""
    path = path or keymap_path()
    if not path.is_file():
        return {}, []
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        return {}, [f"{path}: cannot read the keymap ({' '.join(str(exc).split())})"]
    table = dict(raw.get("keys", {})) if isinstance(raw.get("keys"), dict) else {}
    table.update({k: v for k, v in raw.items() if k != "keys"})
    out: dict[str, str] = {}
    problems: list[str] = []
    for key, value in table.items():
        aid = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if aid not in BY_ID:
            problems.append(f"{path}: unknown action {key!r}")
            continue
        if isinstance(value, list):
            value = ",".join(str(v) for v in value)
        if not isinstance(value, str) or not value.strip():
            problems.append(f"{path}: {key}: expected a key such as \"ctrl+r\"")
            continue
        out[BY_ID[aid].binding_id] = value.replace(" ", "")
    return out, problems


def current_keys(app) -> dict[str, str]:
    """Action id -> the keys in effect (after the user keymap)."""
    keymap = getattr(app, "user_keymap", None) or {}   # what the App passed to set_keymap
    return {a.id: keymap.get(a.binding_id, a.key) for a in ACTIONS}
