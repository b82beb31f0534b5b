"""The ``unlearn-tui`` entry point.

``unlearn-tui [SESSION.toml]`` starts the Textual app; ``unlearn-tui replay
SESSION.toml`` runs a session headlessly with a rich progress bar and table.
``--help`` imports neither Textual nor torch, and ``replay`` never imports
Textual (tests check both).  User errors print one line and exit with code 2;
problems found after loading (a layer out of range for the model) still name
the session's ``file:line`` and key.  ``--out`` is written before model-written
targets are cached in the session, so a session that cannot take them costs a
warning, never the results.  A session with ``model.trust_remote_code = true``
also needs ``--trust-remote-code`` on the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EXIT_USAGE = 2
EXIT_CANCELLED = 130


def _app_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="unlearn-tui",
        description="A terminal workbench for making LLMs forget facts by knowledge editing.",
        epilog="Headless: unlearn-tui replay SESSION.toml [--out results.json]  (see 'unlearn-tui replay --help')")
    p.add_argument("session", nargs="?", help="session TOML to open in the app")
    p.add_argument("--model", help="model to open (built-in name, hub id, folder, .gguf, or tiny:llama)")
    p.add_argument("--device", help="device override: auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a session's model.trust_remote_code = true (runs Python code shipped with the model)")
    return p


def _replay_parser() -> argparse.ArgumentParser:
    r = argparse.ArgumentParser(prog="unlearn-tui replay",
                                description="Run a session headlessly and print the result table.")
    r.add_argument("session", help="session TOML file")
    r.add_argument("--out", help="write results as JSON to this file")
    r.add_argument("--items", action="store_true", help="include per-item generations in --out")
    r.add_argument("--device", help="device override: auto, cpu, cuda, cuda:N, mps")
    r.add_argument("--dtype", help="dtype override: auto, float32, bfloat16, float16")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.add_argument("--regenerate", action="store_true",
                   help="regenerate model-written targets and paraphrases instead of reusing the session's")
    r.add_argument("--no-save", action="store_true",
                   help="do not cache model-written targets and paraphrases in the session file")
    r.add_argument("--trust-remote-code", action="store_true",
                   help="allow the session's model.trust_remote_code = true (runs Python code shipped with the "
                        "model); without it such a session is refused")
    return r


def one_line(message: str) -> str:
    """Whitespace runs become one space; other control characters are shown escaped."""
    text = " ".join(str(message).split())
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def fail(message: str) -> int:
    print(f"unlearn-tui: error: {one_line(message)}", file=sys.stderr)
    return EXIT_USAGE


def warn(message: str) -> None:
    print(f"unlearn-tui: warning: {one_line(message)}", file=sys.stderr)


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (symlinks and hard links included)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return os.path.realpath(a) == os.path.realpath(b)


def _protected_files(session, session_path: str) -> list[tuple[str, Path]]:
    """Files --out must never replace: the session itself and the files it reads."""
    files = [("the session file", Path(session_path).expanduser())]
    if session is not None:
        if session.data.is_file():
            files.append(("the data file (data.path)", session.resolve(session.data.path)))
        pool = (session.targets.pool or "").strip()
        if pool and pool != "builtin:refusals":
            files.append(("the refusal pool (targets.pool)", session.resolve(pool)))
        name = session.model.name
        if not name.startswith("tiny:") and Path(name).suffix == ".gguf":
            files.append(("the model file (model.name)", session.resolve(name)))
    return files


def check_out(text: str, session=None, session_path: str | None = None) -> Path:
    """Validate ``--out`` before anything runs; returns the path (UserError naming ``--out``)."""
    from unlearn_tui.backends.errors import UserError

    if not text.strip():
        raise UserError('expected a file path for the JSON results, got ""', "--out")
    path = Path(text).expanduser()
    if session_path is not None:
        for what, other in _protected_files(session, session_path):
            if _same_file(path, other):
                raise UserError(f"{path} is {what}; writing the results there would replace it; "
                                "give another file name", "--out")
    check_writable(path)
    return path


def check_writable(path: Path) -> None:
    """Raise UserError unless ``path`` can be created or replaced (nothing is left behind)."""
    import stat

    from unlearn_tui.backends.errors import UserError
    from unlearn_tui.backends.fileio import probe_writable

    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise UserError(f"{path} is a directory; expected a file path for the JSON results", "--out")
    if path.exists() and not stat.S_ISREG(path.stat().st_mode):  # /dev/null, a FIFO: never replace it
        raise UserError(f"{path} is not a regular file; expected a file path for the JSON results", "--out")
    if not parent.is_dir():
        raise UserError(f"directory {parent} does not exist", "--out")
    try:  # a probe: create and remove a temporary file of the atomic writer's naming
        probe_writable(parent / path.name)
    except OSError as exc:
        raise UserError(f"cannot write to {parent} ({exc.strerror})", "--out") from None


def _json_default(v):
    """numpy/torch scalars and arrays as plain numbers; anything else as its text (results are never lost)."""
    for attr in ("item", "tolist"):
        f = getattr(v, attr, None)
        if callable(f):
            try:
                return f()
            except (TypeError, ValueError, RuntimeError):
                pass
    if isinstance(v, (set, frozenset, tuple)):
        return list(v)
    return str(v)


def results_json(data) -> tuple[str, list[str]]:
    """Strict JSON text of ``data`` (``allow_nan=False``) and where non-finite numbers became null.

    NaN and infinities are not JSON: they are written as ``null`` and their key
    paths returned, so the caller can warn instead of losing the results.
    """
    import math

    nulls: list[str] = []

    def clean(v, path: str):
        if isinstance(v, float) and not math.isfinite(v):
            nulls.append(path or "(top)")
            return None
        if isinstance(v, dict):
            return {k: clean(x, f"{path}.{k}" if path else str(k)) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x, f"{path}[{i}]") for i, x in enumerate(v)]
        if not isinstance(v, (str, int, float, bool, type(None))):
            d = _json_default(v)
            return d if isinstance(d, str) else clean(d, path)
        return v

    return json.dumps(clean(data, ""), indent=2, allow_nan=False), nulls


def cache_generated(session, path: str, before: tuple) -> None:
    """Write model-written targets/paraphrases back into the session file, so replays reuse them.

    Only those two lists change: the file is re-read and everything else in it
    (comments included) is kept; command-line overrides such as --device are not saved.
    """
    from unlearn_tui import sessions

    plain = sessions.to_plain(session)
    after = (plain["targets"].get("items"), plain["data"].get("paraphrases"))
    if after == before:
        return
    fresh = sessions.load(path)
    fresh.targets.items = session.targets.items
    fresh.data.paraphrases = session.data.paraphrases
    sessions.save(fresh)
    n_t = sum(1 for t in session.targets.items if t.source != "custom")
    print(f"unlearn-tui: cached {n_t} model-written targets and {len(session.data.paraphrases)} paraphrases "
          f"in {path} (--regenerate to redo, --no-save to skip)", file=sys.stderr)


_OVERRIDES = {"model.device": "--device", "model.dtype": "--dtype", "model.name": "--model"}


def _guess_run(session, key: str) -> int | None:
    """The run a ``params.KEY`` error (raised while applying a method) most likely came from."""
    runs = list(session.runs)
    explicit = [i for i, r in enumerate(runs) if key in (r.params or {})]
    if len(explicit) == 1:
        return explicit[0]
    if len(runs) == 1:
        return 0
    return None


def located(exc, session=None, overridden: tuple[str, ...] = ()) -> str:
    """The one-line message of ``exc``, its ``where`` turned into ``file:line`` when it is a session key.

    Checks that need the model (a layer out of range, an unavailable device) run after
    loading; the session's line index still points at the key.  A key set on the
    command line (``--device``) is named as the flag instead.
    """
    from unlearn_tui.backends.errors import UserError

    if session is None or not isinstance(exc, UserError) or not exc.where:
        return str(exc)
    where = exc.where
    if where in _OVERRIDES and _OVERRIDES[where] in overridden:
        return str(UserError(exc.message, _OVERRIDES[where]))
    if where == "params" or where.startswith("params."):
        key = where.split(".", 2)[1] if "." in where else ""
        index = _guess_run(session, key) if key else (0 if len(session.runs) == 1 else None)
        if index is None:
            return str(exc)
        where = f"runs[{index}].{where}"
    try:
        loc = session.locate(where)
    except Exception:  # locating is a courtesy; never let it hide the error itself
        loc = None
    if loc is None:
        return str(exc)
    return str(UserError(f"{where}: {exc.message}", loc))


def replay(args: argparse.Namespace) -> int:
    from unlearn_tui import sessions
    from unlearn_tui.backends.errors import Cancelled, NonFiniteError, UserError
    from unlearn_tui.backends.fileio import atomic_write
    from unlearn_tui.sessions.loader import check_override

    session = None
    overridden: list[str] = []
    try:
        session = sessions.load(args.session, allow_remote_code=args.trust_remote_code)
        if args.device is not None:
            session.model.device = check_override("device", args.device, "--device")
            overridden.append("--device")
        if args.dtype is not None:
            session.model.dtype = check_override("dtype", args.dtype, "--dtype")
            overridden.append("--dtype")
        out = check_out(args.out, session, args.session) if args.out is not None else None
        from unlearn_tui.tui.replay_view import run_with_progress

        cached_before = (sessions.to_plain(session)["targets"].get("items"),
                         sessions.to_plain(session)["data"].get("paraphrases"))
        result = run_with_progress(session, quiet=args.quiet, regenerate=args.regenerate)
        text, nulls = results_json(result.to_json(items=args.items)) if out is not None else ("", [])
    except (UserError, NonFiniteError) as exc:
        return fail(located(exc, session, tuple(overridden)))
    except Cancelled:
        print("unlearn-tui: cancelled; nothing was written", file=sys.stderr)
        return EXIT_CANCELLED
    except KeyboardInterrupt:
        print("unlearn-tui: interrupted; nothing was written", file=sys.stderr)
        return EXIT_CANCELLED
    # the results first: a session file that cannot take the cache must not cost them
    if out is not None:
        try:
            atomic_write(out, text)
        except OSError as exc:
            return fail(f"--out: cannot write {out} ({exc.strerror})")
        if nulls:
            more = f" and {len(nulls) - 3} more" if len(nulls) > 3 else ""
            warn(f"{len(nulls)} non-finite number(s) (NaN/inf) written as null in {out}: "
                 f"{', '.join(nulls[:3])}{more}")
    if not args.no_save:
        try:
            cache_generated(session, args.session, cached_before)
        except (UserError, OSError) as exc:
            kept = f"the results are in {out}" if out is not None else "the results were printed above"
            warn(f"could not cache the model-written targets and paraphrases in the session file ({exc}); "
                 f"{kept}; the next replay will generate them again")
    return 0


def launch(args: argparse.Namespace) -> int:
    from unlearn_tui.backends.errors import UserError

    try:  # the same checks as replay, before the app starts
        from unlearn_tui.sessions.loader import check_override

        if args.model is not None:
            check_override("name", args.model, "--model")
        if args.device is not None:
            check_override("device", args.device, "--device")
        if args.session is not None:
            from unlearn_tui import sessions

            sessions.load(args.session, allow_remote_code=args.trust_remote_code)
    except UserError as exc:
        return fail(str(exc))
    try:
        from unlearn_tui.tui.app import run_app
    except ImportError as exc:  # the app is optional for headless installs
        return fail(f"the interactive app is not available ({exc}); use 'unlearn-tui replay SESSION.toml'")
    try:
        return run_app(session_path=args.session, model=args.model, device=args.device,
                       trust_remote_code=args.trust_remote_code) or 0
    except UserError as exc:
        return fail(str(exc))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "replay":
        return replay(_replay_parser().parse_args(argv[1:]))
    return launch(_app_parser().parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
