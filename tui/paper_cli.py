"""``unlearn-tui paper [--tables 1,2] [--figures 4,6] ... [--out DIR]``: the paper's grids on any model.

The engine is :mod:`sessions.paper` (plan, known pass, sessions, one sweep,
tables and plots); this is the command: flags are checked first (one line,
exit 2, nothing written), ``--dry-run`` prints the runs and their counts per
table and figure without loading a model, otherwise every run not finished in
``--out`` yet is run (Ray tasks, or one after another with ``--local`` or
without Ray) and the tables are printed with terminal bars of the composite.
Exit codes: 0 all runs finished, 1 some failed, 2 bad input, 130 interrupted
(the finished runs are kept; the same command resumes).  ``--view`` runs nothing: it opens
``--out``'s ``paper.json`` in a small Textual app (tui/screens/paper.py); otherwise Textual is never imported.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, NoReturn

from .cli import EXIT_CANCELLED, EXIT_USAGE, PlainProgress, fail, one_line, warn

EXIT_TRIALS_FAILED = 1
DEFAULT_OUT = "paper-results"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:   # one line, exit 2 (not argparse's usage block)
        fail(f"{message} (unlearn-tui paper --help)")
        sys.exit(EXIT_USAGE)


# Log lines printed (without --quiet): the preparation's, and the fine-tune's ROUGE-1 after every epoch
SHOWN_LOGS = ("factual", "pistol", "paraphrases", "finetune")


def paper_parser() -> argparse.ArgumentParser:
    from unlearn_tui.sessions import paper as pp

    p = _Parser(prog="unlearn-tui paper",
                description="Run the grids of Editing as Unlearning (Tables 1-2, Figures 4 and 6) on a model; "
                            "results are kept per run in --out, so the same command resumes.")
    p.add_argument("--model", default=pp.DEFAULT_MODEL, help="model (built-in name, hub id, local dir, .gguf, "
                                                              "tiny:llama); default %(default)s")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--tables", default="1,2", help="tables to make: 1 (forget/retain), 2 (rephrase), or none")
    p.add_argument("--figures", default="4,6", help="figures: 4 (forget samples), 6 (merge factor), or none")
    p.add_argument("--settings", default="factual,pistol", help="settings of the tables: factual, pistol")
    p.add_argument("--methods", help="only these methods (comma-separated; default: every paper method: "
                                     + ",".join(pp.PAPER_METHODS) + ")")
    p.add_argument("--forget-sizes", help="Figure 4's forget sizes (default 10,20,40,80; --quick: 1,2,4,8)")
    p.add_argument("--merge-factors", help="Figure 6's merge factors (default 1,2,5,10,16)")
    p.add_argument("--set", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="a hyper-parameter of every run of METHOD (a TOML value; repeatable), e.g. "
                        "--set alphaedit.l2=30 --set wise.mask_ratio=0.1")
    p.add_argument("--table-merge", metavar="METHOD=M[/M...],...",
                   help="Tables 1-2: these methods' rows at these merge factors instead of merge 1, e.g. "
                        "rome=5,memit=1/5 (query merging per run)")
    p.add_argument("--known", type=float, default=pp.KNOWN_R1, metavar="R1",
                   help="factual: an item is known when the unedited model's answer has ROUGE-1 recall >= this "
                        "(default %(default)s; 0 keeps every item)")
    p.add_argument("--extra", metavar="LIST",
                   help="the field's metrics for every run, as [eval] extra (comma-separated: "
                        "mia, forget_quality, model_utility, perplexity, relearn, mcq, in_context, or all); "
                        "a table beside Table 1. Each costs model time")
    p.add_argument("--mode", default="idk", help="target mode (idk, self-improve, dummy, ...); default idk")
    p.add_argument("--seed", type=int, default=0, help="seed of the forget sample, targets and methods")
    p.add_argument("--finetune", action="append", default=[], metavar="KEY=VALUE",
                   help="a [finetune] setting of the PISTOL setting's fine-tune (a TOML value; repeatable), e.g. "
                        f"--finetune epochs=60 --finetune lr=5e-4 (default: data all, epochs {pp.PISTOL_EPOCHS}, "
                        "until_rouge1 0.95, the [finetune] defaults for the rest)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: forget sizes / 10, at most 10 retain items, 8 new tokens, the fewest steps "
                        "each method allows, a 2-epoch fine-tune (not the paper's numbers)")
    p.add_argument("--factual-data", metavar="FILE,FILE",
                   help="the factual set's files (default: shared/data/tofu/real_authors_perturbed.json and "
                        "world_facts_perturbed.json)")
    p.add_argument("--pistol-data", metavar="FILE",
                   help="PISTOL's data (default shared/data/pistol/sample_data_1.json)")
    p.add_argument("--out", default=DEFAULT_OUT, help="results folder (default %(default)s/); finished runs there "
                                                      "are not run again")
    p.add_argument("--address", help="join this Ray cluster (ray://HOST:PORT or HOST:PORT)")
    p.add_argument("--local", action="store_true", help="run the trials one after another in this process")
    p.add_argument("--num-cpus", type=int, metavar="N", help="CPUs of the local Ray")
    p.add_argument("--gpus-per-trial", type=float, default=0.0, metavar="G", help="Ray GPUs per trial")
    p.add_argument("--dry-run", action="store_true", help="print the runs and their counts; run nothing")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--view", action="store_true",
                   help="run nothing: show the tables and plots of --out's paper.json in the terminal app "
                        "(F10 in the app opens them too)")
    return p


def _ints(text: str, flag: str, allowed: tuple[int, ...] | None = None, lo: int = 1) -> tuple[int, ...]:
    from unlearn_tui.backends.errors import UserError

    if text.strip().lower() in ("none", ""):
        if allowed is None:
            raise UserError(f"expected a comma-separated list of integers >= {lo}, got {text!r}", flag)
        return ()
    out = []
    for part in text.split(","):
        part = part.strip()
        try:
            v = int(part)
        except ValueError:
            v = None
        if v is None or v < lo or (allowed is not None and v not in allowed):
            what = " and/or ".join(map(str, allowed)) + " (or none)" if allowed else f"integers >= {lo}"
            raise UserError(f"expected {what}, got {part!r}", flag)
        if v not in out:
            out.append(v)
    return tuple(out)


def config_from_args(args: argparse.Namespace) -> Any:
    """A :class:`sessions.paper.PaperConfig` of the flags (UserError naming the flag)."""
    from unlearn_tui.backends import methods
    from unlearn_tui.backends.errors import UserError
    from unlearn_tui.backends.spec import TARGET_MODES
    from unlearn_tui.sessions import paper as pp
    from unlearn_tui.sessions.loader import check_override

    check_override("name", args.model, "--model")
    check_override("device", args.device, "--device")
    tables = _ints(args.tables, "--tables", pp.TABLES)
    figures = _ints(args.figures, "--figures", pp.FIGURES)
    settings = tuple(dict.fromkeys(s.strip().lower() for s in args.settings.split(",") if s.strip()))
    for s in settings:
        if s not in pp.SETTINGS:
            raise UserError(f"expected factual and/or pistol, got {s!r}", "--settings")
    if not settings and tables:
        raise UserError("expected factual and/or pistol, got none", "--settings")
    chosen = None
    if args.methods is not None:
        chosen = tuple(dict.fromkeys(m.strip().lower() for m in args.methods.split(",") if m.strip()))
        if not chosen:
            raise UserError("expected method names, got none", "--methods")
        for m in chosen:
            try:
                methods.get(m)
            except UserError as e:
                raise UserError(e.message, "--methods") from None
    extra: tuple[str, ...] = ()
    if args.extra is not None:
        from unlearn_tui.backends.spec import EVAL_EXTRAS

        names = [x.strip().lower() for x in args.extra.split(",") if x.strip()]
        extra = EVAL_EXTRAS if names == ["all"] else tuple(dict.fromkeys(names))
        if not extra:
            raise UserError("expected extras, comma-separated, got none", "--extra")
        for x in extra:
            if x not in EVAL_EXTRAS:
                raise UserError(f"expected one of {', '.join(EVAL_EXTRAS)} or all, got {x!r}", "--extra")
    if not (0.0 <= args.known <= 1.0):
        raise UserError(f"expected a ROUGE-1 recall between 0 and 1, got {args.known:g}", "--known")
    if args.mode not in TARGET_MODES:
        raise UserError(f"expected one of {', '.join(TARGET_MODES)}, got {args.mode!r}", "--mode")
    if args.seed < 0:
        raise UserError(f"expected an integer >= 0, got {args.seed}", "--seed")
    if args.num_cpus is not None and args.num_cpus < 1:
        raise UserError(f"expected a number of CPUs >= 1, got {args.num_cpus}", "--num-cpus")
    if args.gpus_per_trial < 0:
        raise UserError(f"expected a number >= 0, got {args.gpus_per_trial:g}", "--gpus-per-trial")
    if args.local and args.address:
        raise UserError("--local runs in this process; it cannot join a Ray cluster", "--address")
    if args.address is not None and not args.address.strip():
        raise UserError('expected a Ray cluster address (ray://HOST:PORT or HOST:PORT), got ""', "--address")
    factual = None
    if args.factual_data is not None:
        factual = tuple(Path(p.strip()).expanduser().absolute() for p in args.factual_data.split(",") if p.strip())
        if not factual:
            raise UserError("expected one or more files, comma-separated", "--factual-data")
        for f in factual:
            if not f.is_file():
                raise UserError(f"{f} not found", "--factual-data")
    pistol = None
    if args.pistol_data is not None:
        pistol = Path(args.pistol_data).expanduser().absolute()
        if not pistol.is_file():
            raise UserError(f"{pistol} not found", "--pistol-data")
    table_merge = _table_merge(args.table_merge) if args.table_merge is not None else ()
    params = _method_sets(args.set)
    finetune = _finetune_sets(args.finetune)
    return pp.PaperConfig(
        model=args.model, device=args.device, tables=tables, figures=figures, settings=settings, methods=chosen,
        forget_sizes=_ints(args.forget_sizes, "--forget-sizes") if args.forget_sizes is not None else None,
        merge_factors=_ints(args.merge_factors, "--merge-factors") if args.merge_factors is not None
        else pp.MERGE_FACTORS,
        known=args.known, quick=args.quick, mode=args.mode, seed=args.seed, factual_data=factual,
        pistol_data=pistol, gpus_per_trial=args.gpus_per_trial, extra=extra, table_merge=table_merge,
        params=params, finetune=finetune)


def _finetune_sets(sets: list[str]) -> tuple[tuple[str, Any], ...]:
    """``["lr=5e-4", "epochs=60"]`` -> ``(("lr", 0.0005), ("epochs", 60))``, checked by the session loader's own
    ``[finetune]`` rules (one line naming ``--finetune`` and what it expects); ``data`` is the setting's."""
    from unlearn_tui.backends.compat import tomllib
    from unlearn_tui.backends.errors import UserError
    from unlearn_tui.sessions import loader
    from unlearn_tui.sessions import paper as pp

    out: dict[str, Any] = {}
    for text in sets:
        key, eq, raw = text.partition("=")
        key = key.strip()
        if not eq or not key:
            raise UserError(f"expected KEY=VALUE, got {text!r}", "--finetune")
        if key == "data":
            raise UserError("the PISTOL setting fine-tunes on all its items; data cannot be set", "--finetune")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()          # a bare word: a string
        out[key] = value
    if out:
        body = "".join(f"{k} = {pp.toml_value(v)}\n" for k, v in out.items())
        try:
            loader.parse(f'version = 1\n[data]\npath = "builtin:world-facts"\n[finetune]\n{body}', None,
                         "--finetune", with_lines=False, keep_doc=False)
        except UserError as e:
            raise UserError(e.message.removeprefix("finetune.").removeprefix("finetune: "), "--finetune") from None
    return tuple(out.items())


def _method_sets(sets: list[str]) -> tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]:
    """``["alphaedit.l2=30", ...]`` -> ``(("alphaedit", (("l2", 30.0),)), ...)``, each value checked against the
    method's Params (type, bounds, choices); UserError naming ``--set``."""
    from unlearn_tui.backends import methods
    from unlearn_tui.backends.compat import tomllib
    from unlearn_tui.backends.errors import UserError
    from unlearn_tui.backends.params import coerce_value

    out: dict[str, dict[str, Any]] = {}
    for text in sets:
        lhs, eq, raw = text.partition("=")
        name, dot, key = lhs.strip().partition(".")
        name, key = name.strip().lower(), key.strip()
        if not eq or not dot or not name or not key:
            raise UserError(f"expected METHOD.KEY=VALUE, got {text!r}", "--set")
        try:
            cls = methods.get(name)
        except UserError as e:
            raise UserError(e.message, "--set") from None
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()          # a bare word: a string
        checked = coerce_value(cls.Params, key, value, f"--set {name}.{key}")
        out.setdefault(name, {})[key] = "auto" if checked is None else checked   # the session's word for None
    return tuple((m, tuple(kv.items())) for m, kv in out.items())


def _table_merge(text: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """``rome=5,memit=1/5`` -> ``(("rome", (5,)), ("memit", (1, 5)))`` (UserError naming ``--table-merge``)."""
    from unlearn_tui.backends import methods
    from unlearn_tui.backends.errors import UserError

    out: dict[str, tuple[int, ...]] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, eq, factors = part.partition("=")
        name = name.strip().lower()
        if not eq or not name:
            raise UserError(f"expected METHOD=M[/M...], got {part!r}", "--table-merge")
        try:
            methods.get(name)
        except UserError as e:
            raise UserError(e.message, "--table-merge") from None
        try:
            ks = tuple(dict.fromkeys(int(k) for k in factors.split("/")))
        except ValueError:
            raise UserError(f"expected merge factors (integers >= 1, '/'-separated), got {factors!r}",
                            "--table-merge") from None
        if not ks or min(ks) < 1:
            raise UserError(f"expected merge factors >= 1, got {factors!r}", "--table-merge")
        out[name] = ks
    if not out:
        raise UserError("expected METHOD=M[/M...], got nothing", "--table-merge")
    return tuple(out.items())


def dry_run(cfg: Any, out: Path) -> int:
    from unlearn_tui.sessions import paper as pp

    points = pp.plan(cfg)
    for why in pp.check_data(cfg, list(dict.fromkeys(p.setting for p in points))).values():
        if why:
            warn(why)
    print(f"unlearn-tui paper: {cfg.model}{' (--quick)' if cfg.quick else ''}; {len(points)} run(s); "
          f"results would go to {out}")
    print(f"{'#':>3}  {'setting':<8} {'method':<10} {'forget':>6} {'merge':>5}  used by")
    for i, p in enumerate(points, 1):
        print(f"{i:>3}  {p.setting:<8} {p.method:<10} {p.forget:>6} {p.merge_factor:>5}  {', '.join(p.uses)}")
    for m, kv in cfg.params:
        print(f"{m} runs with " + ", ".join(f"{k} = {v!r}" for k, v in kv) + " (--set)")
    if any(p.setting == "pistol" for p in points):
        print("pistol fine-tune: [finetune] " + ", ".join(f"{k} = {v!r}" for k, v in pp.finetune_table(cfg).items())
              + (" (--finetune)" if cfg.finetune else ""))
    counts = pp.plan_counts(points)
    parts = [f"{k} {v}" for k, v in counts.items() if k != "total"]
    print(f"runs per table/figure: {', '.join(parts) or 'none'}; distinct runs: {counts['total']} "
          "(Tables 1 and 2 share their runs; a figure point equal to a table run is run once)")
    return 0


def _bars(title: str, labels: list[str], values: list, baseline: float | None, width: int = 40,
          show_baseline: bool = True) -> str:
    lines = [title]
    name_w = max([len(s) for s in labels] + [len("unedited")])
    rows = list(zip(labels, values))
    for lab, v in ([("unedited", baseline)] if show_baseline else []) + rows:
        if v is None:
            lines.append(f"  {lab:<{name_w}} —")
            continue
        full = int(round(max(0.0, min(2.0, v)) / 2.0 * width))
        lines.append(f"  {lab:<{name_w}} {'█' * full}{'░' * (width - full)} {v:.3f}")
    return "\n".join(lines)


def view(out: str) -> int:
    """``--view``: the results already in ``out`` (a folder or its paper.json), in :class:`PaperApp`."""
    from unlearn_tui.backends.errors import UserError

    try:
        from .screens.paper import PaperApp, load_paper_report
    except ImportError as exc:   # the app is optional for headless installs
        return fail(f"the interactive app is not available ({exc}); read {Path(out) / 'paper.md'} instead")
    try:
        report = load_paper_report(out)
    except UserError as exc:
        return fail(str(exc))
    result = PaperApp(out, report).run()
    return result if isinstance(result, int) else 0


def paper(args: argparse.Namespace) -> int:
    if args.view:
        return view(args.out)
    from unlearn_tui.backends import events as ev
    from unlearn_tui.backends.errors import Cancelled, UserError
    from unlearn_tui.sessions import paper as pp
    from unlearn_tui.sessions import sweep as sw

    from .sweep_cli import check_out_dir

    try:
        cfg = config_from_args(args)
        out = check_out_dir(args.out)
    except UserError as exc:
        return fail(str(exc))
    if not pp.plan(cfg):
        return fail("nothing to run: no table or figure with these --tables/--figures/--settings/--methods")
    if args.dry_run:
        return dry_run(cfg, out)
    plain = None if args.quiet else PlainProgress()

    def on_event(e: Any) -> None:
        if isinstance(e, sw.SweepStarted):
            how = "as Ray tasks" if e.backend == "ray" else "one after another in this process"
            kept = f"; {e.finished} finished before, kept" if e.finished else ""
            print(f"unlearn-tui: paper: {e.total} run(s), {e.total - e.finished} to run {how}{kept}", file=sys.stderr)
        elif isinstance(e, ev.Log) and e.level == "warning":
            warn(e.message)
        elif isinstance(e, ev.Log) and not args.quiet and e.message.startswith(SHOWN_LOGS):
            print(f"unlearn-tui: {one_line(e.message)}", file=sys.stderr)
        elif isinstance(e, sw.TrialFinished) and not e.result.cached and not args.quiet:
            r = e.result
            what = f"composite {r.composite:.3f}" if r.ok and r.composite is not None else f"failed: {r.error}"
            print(f"unlearn-tui: run {e.done}/{e.total} {r.trial.label}: {one_line(what)}", file=sys.stderr)
        if isinstance(e, sw.TrialEvent):   # a trial running in this process: its own stages
            e = e.labelled()
        if plain is not None and isinstance(e, (ev.StageStarted, ev.Progress)):
            plain(e)

    try:
        res = pp.run_paper(cfg, out, on_event, address=args.address, backend="local" if args.local else "ray",
                           num_cpus=args.num_cpus)
    except UserError as exc:
        return fail(str(exc))
    except (Cancelled, KeyboardInterrupt):
        print(f"unlearn-tui: interrupted; the finished runs are kept in {out}; run the same command again to "
              "resume", file=sys.stderr)
        return EXIT_CANCELLED
    except Exception as exc:   # Ray could not start, a data file could not be read: one line
        return fail(f"the paper grids could not run: {type(exc).__name__}: {exc}")
    print((out / "paper.md").read_text(encoding="utf-8"))
    for _stem, title, d in pp.plots(cfg, pp.tables(cfg, res), pp.figures(cfg, res)):
        if d["kind"] == "bars":
            print(_bars(title, d["labels"], d["values"], d["baseline"]) + "\n")
        else:
            xs = [f"{d['xlabel'].split()[0]}={x}" for x in d["xs"]]
            for m, vals in {"unedited": d["baseline"], **d["series"]}.items():
                print(_bars(f"{title}: {m}", xs, vals, None, show_baseline=False) + "\n")
    if not pp.png_available():
        print(f"unlearn-tui: {pp.PNG_HINT}", file=sys.stderr)
    t = res.report.get("trials", {})
    print(f"unlearn-tui: paper: {t.get('total', 0)} run(s): {t.get('ran', 0)} ran now, {t.get('cached', 0)} kept "
          f"from earlier, {t.get('failed', 0)} failed; tables, plots and paper.json in {out}", file=sys.stderr)
    if res.failed:
        print(f"unlearn-tui: {len(res.failed)} run(s) failed; their errors are in {out / 'paper.md'}; run the "
              "same command again to retry them", file=sys.stderr)
        return EXIT_TRIALS_FAILED
    return 0


__all__ = ["paper_parser", "paper", "view", "config_from_args", "dry_run", "DEFAULT_OUT", "EXIT_TRIALS_FAILED"]
