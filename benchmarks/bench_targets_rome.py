"""idk vs self-improve targets for ROME (the paper's Figure 6, left) on the embedded model.

Builds one session in code (builtin:world-facts; the first ``--forget`` items
forgotten, the next ``--retain`` retained, rephrase split on), evaluates the
unedited model once, then runs the method with ``idk`` targets and with
``self-improve`` targets, each from the unedited model (the runner rolls every
run back).  Prints, per split, ROUGE-1 recall of the gold answer (lower is
better on forget / rephrase, higher on retain) and the refusal-quality means
(target similarity, refused, fluency), the composite ``1 - R1(forget) +
R1(retain)``, and the self-improve/idk ratios.

Usage::

    python benchmarks/bench_targets_rome.py [--forget 10] [--retain 10] [--method rome] [--threads 1]

``--method`` defaults to ``rome`` when ``backends.methods.names()`` lists it,
else the first available of memit, alphaedit, ike (the script says which).
Timings depend on the machine; ours were taken on 2 shared, busy cores.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KEYS = ("rouge1", "target_similarity", "refused", "fluency")


def pick_method(wanted: str | None) -> str:
    from unlearn_tui.backends import methods

    names = methods.names()
    if wanted:
        return wanted
    for m in ("rome", "memit", "alphaedit", "ike"):
        if m in names:
            return m
    raise SystemExit(f"no editing method available (have {names})")


def fmt(v) -> str:
    return "   -  " if v is None else f"{v:6.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--forget", type=int, default=10)
    ap.add_argument("--retain", type=int, default=10)
    ap.add_argument("--method", default=None)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest on a shared CPU)")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from unlearn_tui.backends.model import ModelSpec, load
    from unlearn_tui.backends.runner import Workbench
    from unlearn_tui.sessions import RunConfig, new_session

    method = pick_method(args.method)
    t0 = time.perf_counter()
    handle = load(ModelSpec(name=args.model))
    print(f"model {args.model} loaded in {time.perf_counter() - t0:.1f}s; method {method}; "
          f"forget {args.forget}, retain {args.retain}; threads {torch.get_num_threads()}")
    session = new_session(data={"path": "builtin:world-facts", "forget": args.forget, "retain": args.retain,
                                "rephrase": True},
                          targets={"mode": "idk", "seed": args.seed}, runs=[RunConfig(method)])
    wb = Workbench(session, handle=handle)
    wb.load_data()
    rows = {}
    t0 = time.perf_counter()
    wb.prepare()
    rows["unedited (idk)"] = (wb.evaluate(), None, time.perf_counter() - t0)
    for mode in ("idk", "self-improve"):
        session.targets.mode = mode
        session.targets.items.clear()
        t0 = time.perf_counter()
        wb.prepare()
        tsecs = time.perf_counter() - t0
        res = wb.run_one(0, session.runs[0])
        rows[f"{method} + {mode}"] = (res.eval, res, tsecs)
        print(f"{mode}: targets {tsecs:.1f}s, {method} apply {res.seconds:.1f}s "
              f"({res.seconds / max(1, args.forget):.2f}s/edit), eval {res.eval_seconds:.1f}s")
        for rec in wb.target_records()[:3]:
            print(f"   {rec['question']} -> {rec['target']} [{rec['source']}]")

    print()
    header = f"{'':26s}" + "".join(f"{s + '.' + k[:8]:>18s}" for s in ("forget", "rephrase", "retain")
                                   for k in ("rouge1",)) + f"{'composite':>12s}"
    print(header)
    for name, (ev, _, _) in rows.items():
        line = f"{name:26s}"
        for s in ("forget", "rephrase", "retain"):
            line += f"{fmt(ev.splits[s].summary().get('rouge1')):>18s}" if s in ev.splits else f"{'-':>18s}"
        line += f"{fmt(ev.composite):>12s}"
        print(line)
    print("\nrefusal quality (means; forget | rephrase)")
    print(f"{'':26s}{'target_sim':>22s}{'refused':>22s}{'fluency':>22s}")
    for name, (ev, _, _) in rows.items():
        line = f"{name:26s}"
        for k in ("target_similarity", "refused", "fluency"):
            f = ev.splits["forget"].summary().get(k)
            r = ev.splits["rephrase"].summary().get(k) if "rephrase" in ev.splits else None
            line += f"{fmt(f) + ' | ' + fmt(r):>22s}"
        print(line)
    a = rows[f"{method} + idk"][0]
    b = rows[f"{method} + self-improve"][0]
    print("\nratios self-improve / idk:")
    for s in ("forget", "rephrase", "retain"):
        for k in ("rouge1", "refused", "target_similarity"):
            x, y = a.splits[s].summary().get(k), b.splits[s].summary().get(k)
            if x is not None and y is not None:
                print(f"  {s}.{k}: {y:.3f} / {x:.3f} = {y / x:.2f}" if x else f"  {s}.{k}: {y:.3f} / 0")
    print(f"  composite: {b.composite:.3f} vs {a.composite:.3f}")


if __name__ == "__main__":
    main()
