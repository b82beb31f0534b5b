"""Sessions: the versioned TOML schema, load/validate and atomic save.

Textual-free and torch-free (a test enforces it)::

    s = sessions.load("session.toml")      # validated; UserError on any problem
    s.targets.merge_factor = 2
    s.set_target("wf-001", "I'm not sure.")
    sessions.save(s)                        # comments and key order survive
"""

from __future__ import annotations

from .loader import load, loads
from .schema import (
    SCHEMA_VERSION,
    DataConfig,
    EvalConfig,
    ModelConfig,
    Paraphrase,
    RunConfig,
    Session,
    TargetItem,
    TargetsConfig,
    new_session,
    to_plain,
)
from .writer import atomic_write, clean_stale_temps, dumps, save


def validate(session: Session) -> None:
    """Check an in-memory session (e.g. after edits in the TUI); raises UserError.

    Messages name the key (``targets.merge_factor: ...``) and the session file,
    without line numbers (the text checked is a fresh rendering).
    """
    from .loader import parse
    from .writer import _fresh

    label = str(session.path) if session.path is not None else "<session>"
    parse(_fresh(to_plain(session)).as_string(), session.path, label, with_lines=False,
          keep_doc=False)


__all__ = [
    "SCHEMA_VERSION", "Session", "ModelConfig", "DataConfig", "TargetsConfig", "TargetItem",
    "Paraphrase", "EvalConfig", "RunConfig", "load", "loads", "save", "dumps", "new_session",
    "validate", "to_plain", "atomic_write", "clean_stale_temps",
]
