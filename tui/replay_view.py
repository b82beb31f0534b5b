"""Rich rendering for the headless ``replay`` command (no Textual here)."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from unlearn_tui.backends import events as ev


def _fmt(v: Any) -> str:
    return "—" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


EXTRA_COLUMNS = (("forget_quality", "FQ ↑"), ("model_utility", "MU ↑"), ("mia.privleak", "privleak"),
                 ("mia.mink_auc", "MIA AUC"), ("relearn.before", "relearn before"), ("relearn.after", "relearn R1 ↓"),
                 ("mcq.top_hit", "MCQ acc ↓"), ("in_context.rouge1", "ICL R1 ↓"), ("perplexity", "ppl ↓"))
"""The ``[eval] extra`` columns of the replay table (value key, header), shown when some row has a value."""


def results_table(result: Any, title: str = "unlearn-tui results") -> Table:
    """The baseline row, then one row per run; Δ comp is the composite minus the baseline's.  The caption says
    which direction is better per column, and warns when the baseline hardly knows the forget set (then a
    high composite is not forgetting)."""
    from unlearn_tui.backends.metrics import flat_extras
    from unlearn_tui.backends.runner import result_row

    from .results_store import LOW_BASELINE_R1

    t = Table(title=title, header_style="bold")
    cols = ["run", "targets", "m", "forget R1 ↓", "retain R1 ↑", "rephr. R1 ↓", "forget P ↓", "forget MRR ↓",
            "forget hit ↓", "retain P ↑", "composite ↑", "Δ comp ↑"]
    base = {f"{s}.{k}": v for s, summ in result.baseline.summary().items() for k, v in summ.items()}
    base.update(flat_extras(result.baseline))
    base["composite"] = result.baseline.composite
    rows = [result_row(r) for r in result.runs]
    # the [eval] extra columns some row has a number for, in the order of EXTRA_COLUMNS
    extra = [(k, head) for k, head in EXTRA_COLUMNS if any(row.get(k) is not None for row in (base, *rows))]
    for c in [*cols, *(head for _k, head in extra), "seconds"]:
        t.add_column(c, justify="left" if c in ("run", "targets") else "right")

    def add(name: str, mode: str, m: Any, row: dict, seconds: Any, baseline: bool = False) -> None:
        comp, bcomp = row.get("composite"), base.get("composite")
        delta = "—" if baseline or comp is None or bcomp is None else f"{comp - bcomp:+.3f}"
        t.add_row(name, mode, str(m), _fmt(row.get("forget.rouge1")), _fmt(row.get("retain.rouge1")),
                  _fmt(row.get("rephrase.rouge1")), _fmt(row.get("forget.probability")),
                  _fmt(row.get("forget.mrr")), _fmt(row.get("forget.top_hit")),
                  _fmt(row.get("retain.probability")), _fmt(comp), delta,
                  *(_fmt(row.get(k)) for k, _h in extra), _fmt(seconds))

    add("(baseline)", "—", "—", base, None, baseline=True)
    for r, row in zip(result.runs, rows):
        add(r.label, r.target_mode, r.merge_factor, row, r.seconds)
    caption = "↑ higher is better · ↓ lower is better · composite = 1 − forget R1 + retain R1"
    if extra:
        caption += ("\nFQ = forget quality (KS p-value vs the retain-only model) · MU = model utility · privleak: "
                    "0 = like the retain-only model, < 0 still recognisable · MIA AUC: 0.5 = forget looks like holdout")
    f = base.get("forget.rouge1")
    if f is not None and f < LOW_BASELINE_R1:
        caption += (f"\nthe unedited model hardly knows the forget set (baseline forget R1 {f:.2f}): "
                    "a high composite is not forgetting here; read Δ comp")
    t.caption = caption
    return t


def run_with_progress(session: Any, quiet: bool = False, console: Console | None = None,
                      regenerate: bool = False, plain: Any = None):
    """:func:`backends.runner.run` with a progress bar and the table; the targets and paraphrases the
    model wrote (the result's records) are stored in ``session``, so ``replay`` can cache them in its file.
    ``plain`` (without a terminal, unless ``quiet``): also called with every event (``replay``'s plain
    progress lines, tui/cli.py)."""
    from unlearn_tui.backends.runner import run

    from .workspace import store_generated

    console = console or Console(stderr=True)
    out = Console() if Console().is_terminal else Console(width=140)  # files and pipes get the full table
    if quiet or not console.is_terminal:
        def on_event(e: Any) -> None:
            if isinstance(e, ev.Failure):
                pass
            elif isinstance(e, ev.RunStarted):
                print(f"run {e.index + 1}/{e.total_runs}: {e.method}", file=sys.stderr)
            elif isinstance(e, ev.Log) and e.level != "info":
                print(f"{e.level}: {e.message}", file=sys.stderr)
            if plain is not None and not quiet:
                plain(e)
        result = run(session, on_event, regenerate=regenerate)
    else:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True) as bar:
            tasks: dict[str, Any] = {}

            def on_event(e: Any) -> None:
                if isinstance(e, ev.StageStarted):
                    tasks[e.stage] = bar.add_task(f"{e.stage} {e.detail}".strip(), total=e.total)
                elif isinstance(e, ev.Progress):
                    tid = tasks.get(e.stage)
                    if tid is None:
                        tid = tasks[e.stage] = bar.add_task(e.stage, total=e.total)
                    bar.update(tid, completed=e.done, total=e.total,
                               description=f"{e.stage} {e.detail}".strip()[:60])
                elif isinstance(e, ev.RunStarted):
                    console.log(f"run {e.index + 1}/{e.total_runs}: [bold]{e.method}[/]")
                elif isinstance(e, ev.Log) and e.level != "info":
                    console.log(f"{e.level}: {e.message}")
            result = run(session, on_event, regenerate=regenerate)
    store_generated(session, result.new_targets, result.new_paraphrases)
    out.print(results_table(result))
    return result
