"""Where the time goes: cProfile of one paper-scale evaluation, or of one edit, on the embedded model.

Usage: python benchmarks/profile_run.py eval [--items 217] [--top 25]
       python benchmarks/profile_run.py edit [--method rome] [--top 25]

``eval`` scores TOFU's 217 factual items (real authors + world facts, with
their perturbed answers; read from ``../shared/data/tofu``) as one forget
split: the teacher-forced pass and greedy generation.  ``edit`` applies one
method to one built-in fact (statistics warmed first for MEMIT/AlphaEdit, so
the edit itself is profiled).  Prints the wall time and the functions with the
largest cumulative and own time (model forward, the decode loop, the
optimiser…), which is what the speed issue's note quotes.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOFU = ROOT.parent / "shared" / "data" / "tofu"


def _summary(prof: cProfile.Profile, top: int) -> str:
    out = io.StringIO()
    st = pstats.Stats(prof, stream=out)
    st.strip_dirs().sort_stats("cumulative").print_stats(top)
    st.sort_stats("tottime").print_stats(top)
    return out.getvalue()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("eval", "edit"))
    ap.add_argument("--items", type=int, default=217)
    ap.add_argument("--method", default="rome")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from benchmarks.common import machine_line, peak_rss_mb
    from unlearn_tui.backends.data import load_items
    from unlearn_tui.backends.model import ModelSpec, load

    print(machine_line())
    h = load(ModelSpec())
    prof = cProfile.Profile()
    if args.what == "eval":
        from unlearn_tui.backends.metrics import EvalSettings, evaluate

        files = [TOFU / "real_authors_perturbed.json", TOFU / "world_facts_perturbed.json"]
        if not all(f.is_file() for f in files):
            print("skipped: the shared TOFU data is not here")
            return 0
        items = [it for f in files for it in load_items(str(f))][: args.items]
        for k, it in enumerate(items):   # the two files number their items alike: ids made unique
            it.id = f"{k}"
        evaluate(h, {"forget": items[:2]}, EvalSettings(4, 2))   # warm-up (and the one-time path check)
        t = time.perf_counter()
        prof.enable()
        res = evaluate(h, {"forget": items}, EvalSettings())
        prof.disable()
        wall = time.perf_counter() - t
        s = res.splits["forget"]
        print(f"evaluate {len(items)} items ({sum(len(i.perturbed_answers) for i in items)} perturbed answers): "
              f"{wall:.1f} s; ROUGE-1 {s.rouge1:.3f}, probability {s.mean('probability'):.3f}")
    else:
        from unlearn_tui.backends.events import CancelToken
        from unlearn_tui.backends.methods import make
        from unlearn_tui.backends.methods.base import EditContext
        from unlearn_tui.backends.targets import Request

        it = load_items("builtin:world-facts")[0]
        req = Request(prompt=it.question, target="I don't know.", subject=it.subject, item_ids=[it.id])
        m = make(args.method, {})
        ctx = EditContext(lambda e: None, CancelToken(), [], [], {}, seed=0)
        if args.method in ("memit", "alphaedit"):   # statistics cached before the profiled edit
            with h.transaction(m.touched_parameters(h)):
                m.apply(h, [req], ctx)
        t = time.perf_counter()
        with h.transaction(m.touched_parameters(h)):
            prof.enable()
            report = m.apply(h, [req], ctx)
            prof.disable()
        wall = time.perf_counter() - t
        print(f"{args.method} on one fact: {wall:.2f} s; report {report}")
    print(f"peak RSS {peak_rss_mb():.0f} MiB")
    print(_summary(prof, args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
