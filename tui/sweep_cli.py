"""``unlearn-tui sweep SWEEP.toml [--out DIR] [--address ray://...]``: a grid of headless runs.

The sweep file and the engine are :mod:`sessions.sweep`; this is the command:
it validates everything first (one-line errors naming ``file:line`` and the
key, exit 2, nothing written), runs the trials (Ray tasks, or one after
another in this process without Ray or with ``--local``) under a progress bar
over the trials with an ETA, and prints one table.  ``--out DIR`` keeps every
finished trial (``DIR/trials/HASH.json``), so the same command run again skips
them, and writes ``DIR/results.jsonl`` and ``DIR/results.csv``.  Exit codes:
0 when every trial finished, 1 when some failed (their one-line errors are in
the table and the files), 2 for bad input, 130 when interrupted (the finished
trials are kept).  Never imports Textual.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .cli import EXIT_CANCELLED, EXIT_USAGE, PlainProgress, fail, one_line, warn

EXIT_TRIALS_FAILED = 1


def sweep_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unlearn-tui sweep",
                                description="Run every trial of a sweep file (a session plus a [sweep] grid) "
                                            "and print one table.")
    p.add_argument("sweep", help="sweep TOML file: a session plus a [sweep] table")
    p.add_argument("--out", help="folder for the results (results.jsonl, results.csv, trials/); running the "
                                 "same sweep again skips the trials finished there")
    p.add_argument("--address", help="join this Ray cluster (ray://HOST:PORT or HOST:PORT) instead of starting "
                                     "a local one; its nodes need unlearn-tui installed")
    p.add_argument("--local", action="store_true",
                   help="run the trials one after another in this process, even with Ray installed")
    p.add_argument("--num-cpus", type=int, metavar="N",
                   help="CPUs of the local Ray (default: all of this machine's)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow the session's model.trust_remote_code = true (runs Python code shipped with the "
                        "model); without it such a sweep is refused")
    return p


def check_out_dir(text: str) -> Path:
    """Validate ``--out DIR`` before anything runs (UserError naming ``--out``); nothing is created."""
    from unlearn_tui.backends.errors import UserError
    from unlearn_tui.backends.fileio import probe_writable

    if not text.strip():
        raise UserError('expected a folder for the sweep\'s results, got ""', "--out")
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} is a file; expected a folder for the sweep's results", "--out")
    parent = path if path.is_dir() else (path.parent if str(path.parent) else Path("."))
    if not parent.is_dir():
        raise UserError(f"directory {parent} does not exist", "--out")
    try:
        probe_writable(parent / ("results.jsonl" if path.is_dir() else path.name))
    except OSError as exc:
        raise UserError(f"cannot write to {parent} ({exc.strerror})", "--out") from None
    return path


def _fmt(v: Any) -> str:
    return "—" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def _value(v: Any) -> str:
    if isinstance(v, list):
        return f"[{len(v)} ids]" if v and all(isinstance(x, str) for x in v) else str(v)
    return str(v)


def sweep_table(sweep: Any, results: list, title: str = "unlearn-tui sweep") -> Any:
    """One row per trial: the values that differ between trials, then the scores (rich Table)."""
    from rich.table import Table

    from .results_store import LOW_BASELINE_R1

    axes = list(sweep.axes)
    if "method" not in axes:
        axes.insert(0, "method")
    t = Table(title=title, header_style="bold")
    t.add_column("#", justify="right")
    for a in axes:
        t.add_column(a, justify="left")
    cols = ["status", "forget R1 ↓", "retain R1 ↑", "rephr. R1 ↓", "forget P ↓", "retain P ↑", "composite ↑",
            "Δ comp ↑", "seconds"]
    for c in cols:
        t.add_column(c, justify="left" if c == "status" else "right")
    failed = [r for r in results if not r.ok]
    if failed:
        t.add_column("error", justify="left", overflow="fold")
    low = []
    for r in results:
        run = r.run or {}

        def score(split: str, key: str, run: dict = run) -> str:
            return _fmt((run.get(split) or {}).get(key))
        status = ("ok" if r.ok else "failed") + (" (kept)" if r.cached else "")
        delta = r.delta
        row = [str(r.trial.index + 1), *(_value(r.trial.values.get(a, "—")) for a in axes), status,
               score("forget", "rouge1"), score("retain", "rouge1"), score("rephrase", "rouge1"),
               score("forget", "probability"), score("retain", "probability"), _fmt(r.composite),
               "—" if delta is None else f"{delta:+.3f}", _fmt(run.get("seconds"))]
        if failed:
            row.append(r.error or "")
        t.add_row(*row)
        base_f = ((r.baseline or {}).get("forget") or {}).get("rouge1")
        if base_f is not None and base_f < LOW_BASELINE_R1:
            low.append(r.trial.index + 1)
    caption = (f"{len(results)} trials · {len(results) - len(failed)} finished · {len(failed)} failed · "
               "↑ higher is better · ↓ lower is better · Δ comp = composite − the trial's baseline composite")
    if low:
        caption += (f"\nthe unedited model hardly knows the forget set in trial(s) {', '.join(map(str, low[:8]))}"
                    f"{' …' if len(low) > 8 else ''}: a high composite is not forgetting there; read Δ comp")
    t.caption = caption
    return t


def sweep(args: argparse.Namespace) -> int:
    from rich.console import Console

    from unlearn_tui.backends import events as ev
    from unlearn_tui.backends.errors import Cancelled, UserError
    from unlearn_tui.sessions import sweep as sw

    try:
        spec = sw.load_sweep(args.sweep, allow_remote_code=args.trust_remote_code)
        if args.num_cpus is not None and args.num_cpus < 1:
            raise UserError(f"expected a number of CPUs >= 1, got {args.num_cpus}", "--num-cpus")
        if args.local and args.address:
            raise UserError("--local runs in this process; it cannot join a Ray cluster", "--address")
        if args.address is not None and not args.address.strip():
            raise UserError('expected a Ray cluster address (ray://HOST:PORT or HOST:PORT), got ""', "--address")
        out = check_out_dir(args.out) if args.out is not None else None
    except UserError as exc:
        return fail(str(exc))

    console = Console(stderr=True)
    table_out = Console() if Console().is_terminal else Console(width=160)
    trials = spec.trials()
    where = f"; results in {out}" if out is not None else " (no --out: nothing is kept; give --out DIR to resume)"
    print(f"unlearn-tui: sweep of {len(trials)} trial(s){where}", file=sys.stderr)
    plain = None if args.quiet or console.is_terminal else PlainProgress()
    bar = None
    if not args.quiet and console.is_terminal:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       TimeRemainingColumn(), console=console, transient=True)
    task = None

    def say(line: str) -> None:
        if bar is not None:   # above the bar
            bar.console.print(f"unlearn-tui: {one_line(line)}", highlight=False, markup=False)
        else:
            print(f"unlearn-tui: {one_line(line)}", file=sys.stderr)

    def on_event(e: Any) -> None:
        nonlocal task
        if isinstance(e, sw.SweepStarted):
            how = "as Ray tasks" if e.backend == "ray" else "one after another in this process"
            kept = f"; {e.finished} finished before, kept" if e.finished else ""
            say(f"all {e.total} trial(s) finished before (kept); nothing to run" if e.total == e.finished
                else f"running {e.total - e.finished} trial(s) {how}{kept}")
            if bar is not None:
                task = bar.add_task("sweep", total=e.total, completed=e.finished)
        elif isinstance(e, ev.Log) and e.level != "info":
            warn(e.message) if e.level == "warning" else print(f"{e.level}: {one_line(e.message)}", file=sys.stderr)
        elif isinstance(e, sw.TrialFinished) and not e.result.cached:
            r = e.result
            what = (f"composite {_fmt(r.composite)}" if r.ok else f"failed: {r.error}")
            line = f"trial {r.trial.index + 1}/{e.total} {spec.describe(r.trial)}: {what}"
            if not args.quiet:
                say(line)
            if bar is not None and task is not None:
                bar.update(task, completed=e.done)
        if isinstance(e, sw.TrialEvent):   # a trial running in this process: its own stages
            e = e.labelled()
            if bar is not None and task is not None and isinstance(e, ev.Progress):
                of = f" {e.done}/{e.total}" if e.total else ""
                bar.update(task, description=f"sweep · {e.stage}{of}")
        if plain is not None and isinstance(e, (ev.StageStarted, ev.Progress)):
            plain(e)

    backend = "local" if args.local else "ray"
    try:
        if bar is not None:
            with bar:
                results = sw.run_sweep(spec, out, on_event, address=args.address, backend=backend,
                                       num_cpus=args.num_cpus)
        else:
            results = sw.run_sweep(spec, out, on_event, address=args.address, backend=backend,
                                   num_cpus=args.num_cpus)
    except UserError as exc:
        return fail(str(exc))
    except (Cancelled, KeyboardInterrupt):
        kept = (f"the finished trials are kept in {out}; run the same command again to resume"
                if out is not None else "nothing was kept (no --out)")
        print(f"unlearn-tui: interrupted; {kept}", file=sys.stderr)
        return EXIT_CANCELLED
    except Exception as exc:   # Ray could not start or join its cluster: one line, not a traceback
        return fail(f"the sweep could not run: {type(exc).__name__}: {exc} "
                    f"(--local runs the trials in this process, without Ray)")
    table_out.print(sweep_table(spec, results))
    failed = [r for r in results if not r.ok]
    if failed:
        print(f"unlearn-tui: {len(failed)} of {len(results)} trial(s) failed"
              f"{'; their errors are in ' + str(out / sw.RESULTS_JSONL) if out is not None else ''}"
              f"{'; run the sweep again to retry them' if out is not None else ''}", file=sys.stderr)
        return EXIT_TRIALS_FAILED
    return 0


__all__ = ["sweep_parser", "sweep", "sweep_table", "check_out_dir", "EXIT_USAGE", "EXIT_TRIALS_FAILED"]
