"""``unlearn-tui export SESSION.toml OUT_DIR [--delta] [--run N | --steps-only] [--force]``: take the edited model away.

Replays the session's edits on its model and writes the result
(:mod:`backends.export`): a Hugging Face folder (``save_pretrained``,
safetensors) that plain ``AutoModelForCausalLM.from_pretrained`` loads, or,
with ``--delta``, only the changed tensors plus the WISE/GRACE/IKE wrapper
state, for :func:`backends.export.apply_delta` on the base model.

Which edits: by default every ``[[runs]]`` entry, applied one after another
on top of each other and kept (not rolled back as ``replay`` does; nothing is
evaluated), then the session's recorded ``[[steps]]`` (the app's kept step
edits); ``--run N`` keeps only run N (counted from 1, as the tables show)
before the steps; ``--steps-only`` applies only the steps (the app's edited
model exactly).  Everything is checked before the model loads (one-line
errors, exit 2, nothing written); the folder appears only when complete.
Exit codes: 0 written, 2 bad input, 130 interrupted (nothing written).
Never imports Textual.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli import EXIT_CANCELLED, PlainProgress, apply_sidecar, fail, located

WRAPPER_METHODS = ("wise", "grace", "ike")


def export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unlearn-tui export",
                                description="Replay a session's edits and write the edited model as a Hugging "
                                            "Face folder (or, with --delta, only what changed).")
    p.add_argument("session", help="session TOML file")
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder to write (new, empty, or an earlier export)")
    p.add_argument("--delta", action="store_true",
                   help="write only the changed tensors plus the WISE/GRACE/IKE state; load with "
                        "unlearn_tui.backends.export.apply_delta(base_model, OUT_DIR)")
    p.add_argument("--run", type=int, metavar="N",
                   help="keep only run N (1 = the first [[runs]] entry) before the [[steps]]; default: every run, "
                        "one after another")
    p.add_argument("--steps-only", action="store_true",
                   help="apply only the session's [[steps]] (the app's step edits), no [[runs]]")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR even when it is not an earlier export")
    p.add_argument("--device", help="device override: auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--dtype", help="dtype override: auto, float32, bfloat16, float16")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow the session's model.trust_remote_code = true (runs Python code shipped with the "
                        "model)")
    return p


def chosen_runs(session, run: int | None, steps_only: bool) -> list[int]:
    """The indexes of the runs to keep (UserError naming ``--run``)."""
    from unlearn_tui.backends.errors import UserError

    n = len(session.runs)
    if steps_only:
        if run is not None:
            raise UserError("give --run N or --steps-only, not both", "--run")
        return []
    if run is None:
        return list(range(n))
    if not 1 <= run <= n:
        raise UserError(f"expected a run number from 1 to {n} (the session has {n} [[runs]] entr"
                        f"{'y' if n == 1 else 'ies'}), got {run}", "--run")
    return [run - 1]


def export_model(args: argparse.Namespace) -> int:
    from unlearn_tui.backends.errors import Cancelled, NonFiniteError, UserError

    from .cli import _protected_files, load_with_overrides

    session = None
    overridden: list[str] = []
    try:
        session = load_with_overrides(args, overridden)
        runs = chosen_runs(session, args.run, args.steps_only)
        used = [session.runs[i].method for i in runs] + [s.method for s in session.steps]
        wrapped = sorted({m for m in used if m in WRAPPER_METHODS})
        if wrapped and not args.delta:
            raise UserError(f"{', '.join(m.upper() for m in wrapped)} edits live in inference-time wrappers that a "
                            "plain Hugging Face folder cannot carry; export with --delta (the changed tensors plus "
                            "the wrapper state and a loader)", "export")
        if args.delta and session.finetune is not None:
            raise UserError("a delta cannot carry the session's [finetune] step (a fresh load of the model is not "
                            "the fine-tuned base); export the full folder instead (without --delta)", "--delta")
        protect = [p for _, p in _protected_files(session, args.session)]
        from unlearn_tui.backends.export import check_out_dir, export_workbench
        from unlearn_tui.backends.runner import Workbench

        out = check_out_dir(args.out_dir, args.force, protect)
        apply_sidecar(session, args.session)          # the model-written targets replay uses
        progress = (lambda e: None) if args.quiet else PlainProgress()

        def say(line: str) -> None:
            if not args.quiet:
                print(PlainProgress.PREFIX + line, file=sys.stderr, flush=True)

        wb = Workbench(session, progress)
        wb.load_data()
        wb.load_model()
        for k, i in enumerate(runs):
            r = session.runs[i]
            say(f"export: run {i + 1} ({r.label or r.method}), {k + 1} of {len(runs)} kept")
            wb.keep(r, index=i)
        if session.steps:
            say(f"export: {len(session.steps)} recorded step edit(s)")
            wb.replay_steps(session.steps)
        export_workbench(wb, out, delta=args.delta, force=args.force, session_name=Path(args.session).name,
                         protect=protect)
    except (UserError, NonFiniteError) as exc:
        return fail(located(exc, session, tuple(overridden)))
    except Cancelled:
        print("unlearn-tui: cancelled; nothing was written", file=sys.stderr)
        return EXIT_CANCELLED
    except KeyboardInterrupt:
        print("unlearn-tui: interrupted; nothing was written", file=sys.stderr)
        return EXIT_CANCELLED
    what = "delta" if args.delta else "model"
    print(f"unlearn-tui: exported the edited {what} ({len(wb.undo_stack)} kept edit(s)) to {out}")
    return 0
