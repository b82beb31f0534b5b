"""The ``unlearn-tui`` entry point.

``unlearn-tui [SESSION.toml]`` starts the Textual app; ``unlearn-tui replay
SESSION.toml`` runs a session headlessly with a rich progress bar and table.
``--help`` imports neither Textual nor torch, and ``replay`` never imports
Textual (tests check both).  User errors print one line and exit with code 2;
problems found after loading (a layer out of range for the model) still name
the session's ``file:line`` and key.  A session with ``model.trust_remote_code = true``
also needs ``--trust-remote-code`` on the command line.

The session file stays the user's own: the targets and paraphrases the model
writes during a ``replay`` are cached in a **sidecar** next to it
(``session.toml`` -> ``.session.generated.toml``, see :func:`sidecar_path`), read
back by the next replay so replays stay exact (``--regenerate`` writes them
again; deleting the sidecar does too).  ``--save`` writes them into the session
file itself instead (comments kept); ``--no-save`` caches nothing.  ``--out`` is
written before any cache, so a cache that cannot be written costs a warning,
never the results.  Library warnings (deprecations and the like) are not printed;
with stderr not a terminal, progress is plain lines (stage, done/total, ETA).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

EXIT_USAGE = 2
EXIT_CANCELLED = 130
SUBCOMMANDS = ("replay", "sweep", "paper", "export", "cache")


def version() -> str:
    try:
        from importlib.metadata import version as dist_version

        return dist_version("unlearn-tui")
    except Exception:  # not installed as a distribution (a source checkout)
        try:
            from unlearn_tui import __version__

            return str(__version__)
        except Exception:
            return "unknown"


def _app_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="unlearn-tui",
        description="A terminal workbench for making LLMs forget facts by knowledge editing.",
        epilog="Headless: unlearn-tui replay SESSION.toml [--out results.json]  (see 'unlearn-tui replay --help'). "
               "Caches: unlearn-tui cache [list | prune KIND...]  (see 'unlearn-tui cache --help')")
    p.add_argument("session", nargs="?", help="session TOML to open in the app")
    p.add_argument("--model", help="model to open (built-in name, hub id, folder, .gguf, or tiny:llama)")
    p.add_argument("--device", help="device override: auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a session's model.trust_remote_code = true (runs Python code shipped with the model)")
    p.add_argument("--version", action="version", version=f"unlearn-tui {version()}")
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
    r.add_argument("--save", action="store_true",
                   help="write the model-written targets and paraphrases into the session file itself "
                        "(default: a sidecar next to it, .NAME.generated.toml, read back by the next replay)")
    r.add_argument("--no-save", action="store_true",
                   help="cache the model-written targets and paraphrases nowhere (neither sidecar nor session)")
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
    files = [("the session file", Path(session_path).expanduser()),
             ("the session's cache of model-written material", sidecar_path(session_path))]
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


# ==================================================================== the sidecar of generated material
SIDECAR_FORMAT = 1


def sidecar_path(session_path: str | Path) -> Path:
    """Where ``replay`` caches model-written material for a session: ``session.toml`` ->
    ``.session.generated.toml`` in the same folder (a dot file: the session stays the user's own)."""
    p = Path(session_path).expanduser()
    stem = p.name[:-5] if p.name.endswith(".toml") else p.name
    return p.with_name(f".{stem}.generated.toml")


def _toml_str(v) -> str:
    return json.dumps(str(v), ensure_ascii=False)   # a JSON string is a TOML basic string


def sidecar_text(session_name: str, targets: list[dict], paraphrases: list[dict]) -> str:
    lines = [f"# Model-written targets and paraphrases cached by `unlearn-tui replay {session_name}`.",
             "# The next replay reads them back, so it is exact; delete this file or pass --regenerate",
             "# to have them written again, or --save to keep them in the session file itself.",
             f"version = {SIDECAR_FORMAT}", f"session = {_toml_str(session_name)}", ""]
    for t in targets:
        lines += ["[[targets]]", f"id = {_toml_str(t['id'])}", f"target = {_toml_str(t['target'])}",
                  f"source = {_toml_str(t.get('source') or 'self-improve')}"]
        for flag in ("leak", "mentions_subject"):
            if isinstance(t.get(flag), bool):
                lines.append(f"{flag} = {'true' if t[flag] else 'false'}")
        lines.append("")
    for p in paraphrases:
        lines += ["[[paraphrases]]", f"id = {_toml_str(p['id'])}", f"question = {_toml_str(p['question'])}",
                  f"source = {_toml_str(p.get('source') or 'model')}", ""]
    return "\n".join(lines)


def read_sidecar(session_path: str | Path) -> tuple[list[dict], list[dict]]:
    """(target records, paraphrase records) of the session's sidecar; ([], []) when there is none.
    A sidecar that cannot be read is a warning (the material is then generated again), never an error."""
    from unlearn_tui.backends.compat import tomllib

    path = sidecar_path(session_path)
    if not path.is_file():
        return [], []
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
        targets = [dict(t) for t in raw.get("targets", []) if isinstance(t, dict)]
        paras = [dict(p) for p in raw.get("paraphrases", []) if isinstance(p, dict)]
        for rec in targets:
            if not (isinstance(rec.get("id"), str) and isinstance(rec.get("target"), str)):
                raise ValueError("a [[targets]] entry needs id and target strings")
        for rec in paras:
            if not (isinstance(rec.get("id"), str) and isinstance(rec.get("question"), str)):
                raise ValueError("a [[paraphrases]] entry needs id and question strings")
    except (OSError, UnicodeDecodeError, ValueError, tomllib.TOMLDecodeError) as exc:
        warn(f"{path}: cannot read the cached model-written material ({one_line(exc)}); it is generated again")
        return [], []
    return targets, paras


def apply_sidecar(session, session_path: str | Path) -> int:
    """Add the sidecar's material to ``session`` where the session has none of its own; returns how many."""
    from unlearn_tui.backends.errors import UserError
    from unlearn_tui.sessions import Paraphrase

    targets, paras = read_sidecar(session_path)
    n = 0
    for rec in targets:
        if session.target_for(rec["id"]) is not None:
            continue                                  # the user's own target wins
        try:
            session.set_target(rec["id"], rec["target"], source=rec.get("source") or "self-improve",
                               leak=rec.get("leak") if isinstance(rec.get("leak"), bool) else None,
                               mentions_subject=rec.get("mentions_subject")
                               if isinstance(rec.get("mentions_subject"), bool) else None)
            n += 1
        except (UserError, TypeError):
            continue
    have = {p.id for p in session.data.paraphrases}
    for rec in paras:
        if rec["id"] not in have:
            session.data.paraphrases.append(Paraphrase(rec["id"], rec["question"], rec.get("source") or "model"))
            n += 1
    return n


def generated_material(session, original) -> tuple[list[dict], list[dict]]:
    """The model-written targets and paraphrases in ``session`` that the user's file (``original``,
    the session as loaded from disk) does not hold itself."""
    from unlearn_tui import sessions

    own_t = {t.id for t in original.targets.items}
    own_p = {p.id for p in original.data.paraphrases}
    plain = sessions.to_plain(session)
    targets = [t for t in plain["targets"].get("items") or [] if t.get("source") != "custom" and t["id"] not in own_t]
    paras = [p for p in plain["data"].get("paraphrases") or [] if p["id"] not in own_p]
    return targets, paras


def cache_sidecar(session, path: str, original) -> None:
    """Write the model-written material of ``session`` to the sidecar (only when it changed)."""
    from unlearn_tui.backends.fileio import atomic_write

    targets, paras = generated_material(session, original)
    side = sidecar_path(path)
    if not targets and not paras:
        return
    text = sidecar_text(Path(path).name, targets, paras)
    try:
        if side.is_file() and side.read_text(encoding="utf-8") == text:
            return
    except (OSError, UnicodeDecodeError):
        pass
    atomic_write(side, text)
    print(f"unlearn-tui: cached {len(targets)} model-written targets and {len(paras)} paraphrases in {side} "
          f"(the session file is unchanged; --regenerate to redo, --save to keep them in the session)",
          file=sys.stderr)


class PlainProgress:
    """Progress as plain lines on stderr when it is not a terminal (a log, CI): each stage once when it
    starts, then at most every ``every`` seconds and at its end: ``stage done/total ETA``.  Every line
    starts with :attr:`PREFIX` (``unlearn-tui: progress:``), so a log reader can tell it from the one
    ``unlearn-tui: error:`` line a failure prints."""

    def __init__(self, stream=None, every: float = 5.0, clock=None) -> None:
        import time

        self.stream = stream if stream is not None else sys.stderr
        self.every, self.clock = every, clock or time.monotonic
        self._last: dict[str, float] = {}

    def __call__(self, e) -> None:
        from unlearn_tui.backends import events as ev

        from .progress import fmt_seconds

        if isinstance(e, ev.StageStarted):
            total = f" 0/{e.total}" if e.total else ""
            detail = f" ({e.detail})" if e.detail else ""
            self._print(f"{e.stage}{detail}{total}")
            self._last[e.stage] = self.clock()
        elif isinstance(e, ev.Progress):
            now = self.clock()
            final = e.total is not None and e.done >= e.total
            if not final and now - self._last.get(e.stage, -1e9) < self.every:
                return
            self._last[e.stage] = now
            total = e.total if e.total else "?"
            eta = "done" if final else f"ETA {fmt_seconds(e.eta_s)}"
            self._print(f"{e.stage} {e.done}/{total} · elapsed {fmt_seconds(e.elapsed_s)} · {eta}")

    PREFIX = "unlearn-tui: progress: "

    def _print(self, line: str) -> None:
        print(self.PREFIX + one_line(line), file=self.stream, flush=True)


def quiet_libraries() -> None:
    """No library warnings on the terminal (``past_key_values`` deprecations and the like)."""
    import logging
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for category in (DeprecationWarning, FutureWarning, UserWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("ignore", message=r".*past_key_values.*")
    for name in ("transformers", "torch", "huggingface_hub", "accelerate", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if "transformers" in sys.modules:    # already imported: its own verbosity switch too
        try:
            sys.modules["transformers"].logging.set_verbosity_error()
        except Exception:
            pass


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
          f"in {path} (--save; --regenerate to redo)", file=sys.stderr)


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


def load_with_overrides(args: argparse.Namespace, overridden: list[str]):
    """The session of ``args.session`` with ``--device``/``--dtype`` applied (their names appended to
    ``overridden``); raises the loader's UserError."""
    from unlearn_tui import sessions
    from unlearn_tui.sessions.loader import check_override

    session = sessions.load(args.session, allow_remote_code=args.trust_remote_code)
    for flag, key in (("--device", "device"), ("--dtype", "dtype")):
        value = getattr(args, key)
        if value is not None:
            setattr(session.model, key, check_override(key, value, flag))
            overridden.append(flag)
    return session


def replay(args: argparse.Namespace) -> int:
    from unlearn_tui import sessions
    from unlearn_tui.backends.errors import Cancelled, NonFiniteError, UserError
    from unlearn_tui.backends.fileio import atomic_write

    session = None
    overridden: list[str] = []
    try:
        session = load_with_overrides(args, overridden)
        out = check_out(args.out, session, args.session) if args.out is not None else None
        from unlearn_tui.tui.replay_view import run_with_progress

        original = copy.deepcopy(session)                # what the user's file holds
        cached_before = (sessions.to_plain(session)["targets"].get("items"),
                         sessions.to_plain(session)["data"].get("paraphrases"))
        if not args.regenerate:
            apply_sidecar(session, args.session)         # the last replay's model-written material
        plain = None if args.quiet or sys.stderr.isatty() else PlainProgress()
        result = run_with_progress(session, quiet=args.quiet, regenerate=args.regenerate, plain=plain)
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
    if args.no_save:
        return 0
    kept = f"the results are in {out}" if out is not None else "the results were printed above"
    if args.save:
        try:
            cache_generated(session, args.session, cached_before)
        except (UserError, OSError) as exc:
            warn(f"could not cache the model-written targets and paraphrases in the session file ({exc}); "
                 f"{kept}; the next replay will generate them again")
        return 0
    try:
        cache_sidecar(session, args.session, original)
    except OSError as exc:
        warn(f"could not cache the model-written targets and paraphrases in {sidecar_path(args.session)} "
             f"({exc.strerror or exc}); {kept}; the next replay will generate them again")
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


def misspelt_subcommand(word: str) -> str | None:
    """The subcommand ``word`` (not a session file) most likely means, or None."""
    import difflib

    if word.startswith("-") or word.endswith(".toml") or os.path.exists(word) or "/" in word:
        return None
    close = difflib.get_close_matches(word.lower(), SUBCOMMANDS, n=1, cutoff=0.6)
    return close[0] if close else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "replay":
        quiet_libraries()
        return replay(_replay_parser().parse_args(argv[1:]))
    if argv and argv[0] == "sweep":   # a grid of headless runs (tui/sweep_cli.py)
        quiet_libraries()
        from .sweep_cli import sweep, sweep_parser

        return sweep(sweep_parser().parse_args(argv[1:]))
    if argv and argv[0] == "export":   # the edited model as a folder (tui/export_cli.py)
        quiet_libraries()
        from .export_cli import export_model, export_parser

        return export_model(export_parser().parse_args(argv[1:]))
    if argv and argv[0] == "paper":   # the paper's grids (tui/paper_cli.py)
        quiet_libraries()
        from .paper_cli import paper, paper_parser

        return paper(paper_parser().parse_args(argv[1:]))
    if argv and argv[0] == "cache":   # see and prune the on-disk caches (tui/cache_cli.py)
        from .cache_cli import cache

        return cache(argv[1:])
    if argv:
        guess = misspelt_subcommand(argv[0])
        if guess is not None:
            return fail(f"unknown command {argv[0]!r}; did you mean `{guess}`? (unlearn-tui {guess} --help)")
    quiet_libraries()
    return launch(_app_parser().parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
