"""Covariance statistics on the embedded model: cold vs cached time, tokens used, quality per budget.

Usage::

    python benchmarks/bench_stats.py [--budgets 2048 8192 24576] [--method memit] [--forget 10]
                                     [--corpus self] [--no-quality] [--profile N]

For each token budget: the cold computation of the method's layers (a fresh
cache directory; for ``self`` the sampled text is generated too, and the time
to sample it is printed separately), then the cached load (ratio cold/cached),
the tokens actually used (the early stop can end before the budget), and —
unless ``--no-quality`` — forget / retain / rephrase ROUGE-1 of the method on
builtin:world-facts (first N forget, next 10 retain, ``idk`` targets).
The reference (EasyEdit) spent 500 s on statistics for 5 layers of a
2,000-line corpus before crashing on the tied embeddings.
``benchmarks/bench_stats_vs.py`` times the cold statistics against an earlier
git revision, side by side.  ``--profile N``: the first budget's cold
computation INCLUDING the sampling of the self corpus (none is copied or
sampled beforehand) runs under cProfile, and the N functions with the most
own time are printed (where the cold time goes).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", type=int, nargs="+", default=[2048, 8192, 24576])
    ap.add_argument("--method", default="memit")
    ap.add_argument("--corpus", default="self")
    ap.add_argument("--forget", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-quality", action="store_true")
    ap.add_argument("--fresh-corpus", action="store_true", help="sample the self corpus again (cold)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="profile the first budget's cold computation, sampling included; print the top N")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from unlearn_tui.backends import data, methods, stats
    from unlearn_tui.backends.model import ModelSpec, load

    handle = load(ModelSpec())  # the model cache stays where it is; only the stats cache is fresh
    from unlearn_tui.sessions.paths import cache_dir

    real = cache_dir()
    tmp = tempfile.mkdtemp(prefix="bench-stats-")
    os.environ["UNLEARN_TUI_CACHE_DIR"] = tmp
    # the sampled text is reused (timed below), unless a cold corpus is asked for
    if (real / "corpora").is_dir() and not (args.fresh_corpus or args.profile):
        shutil.copytree(real / "corpora", Path(tmp) / "corpora")
    if (real / "templates").is_dir():
        shutil.copytree(real / "templates", Path(tmp) / "templates")
    m = methods.make(args.method, {})
    layers = m.layers(handle) if args.method != "rome" else [m.layer(handle)]
    print(f"{args.method} layers {layers}, corpus {args.corpus}, key width {handle.adapter.mlp_width}, "
          f"torch threads {args.threads}")
    if args.corpus == "self" and not args.profile:
        t0 = time.perf_counter()
        n = 0
        for chunk in stats.corpus_chunks(handle, "self", tokens=max(args.budgets)):  # sized to the largest
            n += len(chunk)
            if n >= max(args.budgets):
                break
        print(f"self corpus ready ({n} tokens; sampled once per model and cached, reused if present): "
              f"{time.perf_counter() - t0:.1f} s")
    items = data.load_items("builtin:world-facts")
    forget, retain = items[:args.forget], items[args.forget:args.forget + 10]
    if not args.no_quality:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_locate_edit import evaluate, run_method

        base, _ = evaluate(handle, forget, retain)
        print(f"baseline ROUGE-1: forget {base['forget']:.3f} retain {base['retain']:.3f} "
              f"rephrase {base['rephrase']:.3f}")
    for k, budget in enumerate(args.budgets):
        t0 = time.perf_counter()
        if args.profile and k == 0:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.enable()
            _, info = stats.second_moments(handle, layers, args.corpus, budget)
            prof.disable()
            print(f"profile of the cold computation, budget {budget}, sampling included: "
                  f"{time.perf_counter() - t0:.1f} s")
            pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(args.profile)
        else:
            _, info = stats.second_moments(handle, layers, args.corpus, budget)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        _, info2 = stats.second_moments(handle, layers, args.corpus, budget)
        warm = time.perf_counter() - t0
        line = (f"budget {budget:6d}: cold {cold:6.2f} s ({info.tokens} tokens used, converged {info.converged}), "
                f"cached {warm:.3f} s -> {cold / max(warm, 1e-9):.0f}x")
        if not args.no_quality:
            r = run_method(handle, args.method, forget, retain, 1, {"token_budget": budget, "corpus": args.corpus})
            s = r["scores"]
            line += (f"; {args.method}: forget {s['forget']:.3f} retain {s['retain']:.3f} "
                     f"rephrase {s['rephrase']:.3f} ({r['s_per_edit']:.1f} s/edit)")
        print(line)
        sys.stdout.flush()


if __name__ == "__main__":
    main()
