"""The ``unlearn-tui`` entry point.

``unlearn-tui [SESSION.toml]`` starts the Textual app; ``unlearn-tui replay
SESSION.toml`` runs a session headlessly with a rich progress bar and table.
``--help`` imports neither Textual nor torch, and ``replay`` never imports
Textual (tests check both).  User errors print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
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
    return r


def fail(message: str) -> int:
    print(f"unlearn-tui: error: {' '.join(message.split())}", file=sys.stderr)
    return EXIT_USAGE


def check_writable(path: Path) -> None:
    """Raise UserError unless ``path`` can be created or replaced (nothing is left behind)."""
    from backends.errors import UserError

    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise UserError(f"{path} is a directory; expected a file path for the JSON results", "--out")
    if not parent.is_dir():
        raise UserError(f"directory {parent} does not exist", "--out")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".unlearn-tui-", dir=parent)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise UserError(f"cannot write to {parent} ({exc.strerror})", "--out") from None


def write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".unlearn-tui-", dir=path.parent if str(path.parent) else ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def cache_generated(session, path: str, before: tuple) -> None:
    """Write model-written targets/paraphrases back into the session file, so replays reuse them.

    Only those two lists change: the file is re-read and everything else in it
    (comments included) is kept; command-line overrides such as --device are not saved.
    """
    import sessions

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


def replay(args: argparse.Namespace) -> int:
    import sessions
    from backends.errors import Cancelled, NonFiniteError, UserError

    try:
        session = sessions.load(args.session)
        if args.device:
            session.model.device = args.device
        if args.dtype:
            session.model.dtype = args.dtype
        out = Path(args.out) if args.out else None
        if out is not None:
            check_writable(out)
        from tui.replay_view import run_with_progress

        cached_before = (sessions.to_plain(session)["targets"].get("items"),
                         sessions.to_plain(session)["data"].get("paraphrases"))
        result = run_with_progress(session, quiet=args.quiet, regenerate=args.regenerate)
        if not args.no_save:
            cache_generated(session, args.session, cached_before)
    except (UserError, NonFiniteError) as exc:
        return fail(str(exc))
    except Cancelled:
        print("unlearn-tui: cancelled; nothing was written", file=sys.stderr)
        return EXIT_CANCELLED
    except KeyboardInterrupt:
        print("unlearn-tui: interrupted; nothing was written", file=sys.stderr)
        return EXIT_CANCELLED
    if out is not None:
        try:
            write_atomic(out, json.dumps(result.to_json(items=args.items), indent=2))
        except OSError as exc:
            return fail(f"--out: cannot write {out} ({exc.strerror})")
    return 0


def launch(args: argparse.Namespace) -> int:
    from backends.errors import UserError

    try:
        from tui.app import run_app
    except ImportError as exc:  # the app is optional for headless installs
        return fail(f"the interactive app is not available ({exc}); use 'unlearn-tui replay SESSION.toml'")
    try:
        return run_app(session_path=args.session, model=args.model, device=args.device) or 0
    except UserError as exc:
        return fail(str(exc))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "replay":
        return replay(_replay_parser().parse_args(argv[1:]))
    return launch(_app_parser().parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
