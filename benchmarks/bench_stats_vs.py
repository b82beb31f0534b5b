"""Cold covariance statistics, before (a git revision) vs the working tree, side by side in one run.

Usage::

    python benchmarks/bench_stats_vs.py [--rounds 3] [--rev d29ab26] [--budget 8192] [--method memit]
                                        [--threads 1]

Times ``stats.second_moments`` for the method's default layers on the embedded
model (``smollm2-135m-instruct``) with the default ``"self"`` corpus and an
EMPTY cache directory, so the time includes sampling the corpus from the model
and the key pass.  The "before" side is the code committed at ``--rev``
(default d29ab26, before the speed work; there the packages were imported as
top-level ``backends``): it is checked out with ``git worktree add`` into a
temporary folder (removed afterwards) and run there in a subprocess with
``PYTHONPATH`` set to that folder.  The "after" side is the working tree, in
a subprocess too.  Each subprocess loads the model (from the usual model
cache, not timed), points ``UNLEARN_TUI_CACHE_DIR`` at a fresh empty folder
and times one cold computation.  The sides alternate (their order flips every
round, so drift in the machine's load hits both alike).  Printed: every run;
the medians over ``--rounds`` of the wall-clock and of the process CPU time
(on a shared machine the CPU time is the steadier figure) and the ratios
before/after; per side the tokens used, whether the estimate converged and
the tokens sampled; and how far apart the two sides' matrices are (relative
Frobenius difference per layer: they come from differently sampled text, so
they agree only statistically).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Run with ``python -c`` in the side's root (sys.path[0] is that folder), PYTHONPATH set to it.
WORKER = r"""
import importlib, json, os, sys, time
from pathlib import Path
import torch
pkg, layers, budget, threads, fresh, out = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), \
    int(sys.argv[4]), sys.argv[5], sys.argv[6]
torch.set_num_threads(threads)
model = importlib.import_module(pkg + ".model")
stats = importlib.import_module(pkg + ".stats")
handle = model.load(model.ModelSpec())          # the model cache stays where it is
os.environ["UNLEARN_TUI_CACHE_DIR"] = fresh     # statistics and corpus: an empty folder
t0, c0 = time.perf_counter(), time.process_time()
mats, info = stats.second_moments(handle, layers, "self", budget)
seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
rows = sampled = 0
for f in Path(fresh).glob("corpora/*.json"):
    chunks = json.loads(f.read_text())["chunks"]
    rows += len(chunks)
    sampled += sum(map(len, chunks))
torch.save({int(l): m.cpu() for l, m in mats.items()}, out)
print("RESULT " + json.dumps({"seconds": seconds, "cpu": cpu, "tokens": info.tokens, "converged": bool(info.converged),
                              "rows": rows, "sampled": sampled, "file": str(getattr(stats, "__file__", ""))}))
"""


def _layers(method: str) -> list[int]:
    """The method's default layers on the embedded model (read from the working tree's method)."""
    from unlearn_tui.backends import methods
    from unlearn_tui.backends.model import ModelSpec, load

    handle = load(ModelSpec())
    m = methods.make(method, {})
    return list(m.layers(handle)) if hasattr(m, "layers") else [m.layer(handle)]


def _run(side_root: Path, pkg: str, layers: list[int], budget: int, threads: int, fresh: Path,
         out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(side_root), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run([sys.executable, "-c", WORKER, pkg, json.dumps(layers), str(budget), str(threads),
                           str(fresh), str(out)], cwd=side_root, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"the {pkg} worker in {side_root} failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="runs per side (medians are printed)")
    ap.add_argument("--rev", default="d29ab26", help="git revision whose backends/ is the 'before' side")
    ap.add_argument("--budget", type=int, default=8192, help="token budget (MEMIT's default is 8192)")
    ap.add_argument("--method", default="memit", help="whose default layers (memit, alphaedit, ...)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in each worker")
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT))
    import torch

    from benchmarks.common import machine_line

    torch.set_num_threads(args.threads)
    layers = _layers(args.method)
    print(machine_line())
    print(f"cold statistics: {args.method} layers {layers}, corpus self, budget {args.budget} tokens, "
          f"empty cache, {args.rounds} round(s), torch threads {args.threads}")
    sys.stdout.flush()
    tmp = Path(tempfile.mkdtemp(prefix="bench-stats-vs-"))
    wt = tmp / "before"
    subprocess.run(["git", "worktree", "add", "--detach", "--quiet", str(wt), args.rev], cwd=ROOT, check=True)
    before, after = f"before ({args.rev})", "after (working tree)"
    sides = {before: (wt, "backends"), after: (ROOT, "unlearn_tui.backends")}
    runs: dict[str, list[dict]] = {before: [], after: []}
    try:
        for r in range(args.rounds):
            order = [before, after] if r % 2 == 0 else [after, before]
            for label in order:
                root, pkg = sides[label]
                fresh = tmp / f"cache-{len(runs[label])}-{'b' if label == before else 'a'}"
                fresh.mkdir()
                res = _run(root, pkg, layers, args.budget, args.threads, fresh, tmp / f"{label[:5]}.pt")
                shutil.rmtree(fresh, ignore_errors=True)
                runs[label].append(res)
                if len(runs[label]) == 1:
                    print(f"  {label} runs {res['file']}")
                print(f"  round {r + 1} {label:22s} {res['seconds']:7.1f} s wall, {res['cpu']:7.1f} s cpu  "
                      f"({res['tokens']} tokens used, "
                      f"converged {res['converged']}; sampled {res['rows']} sequences, {res['sampled']} tokens)")
                sys.stdout.flush()
        med = {k: statistics.median(x["seconds"] for x in v) for k, v in runs.items()}
        cpu = {k: statistics.median(x["cpu"] for x in v) for k, v in runs.items()}
        for k, v in runs.items():
            last = v[-1]
            each = ", ".join(f"{x['seconds']:.1f}" for x in v)
            print(f"{k:24s} median {med[k]:7.1f} s wall ({each}), {cpu[k]:.1f} s cpu over {len(v)} run(s); "
                  f"tokens used {last['tokens']}, "
                  f"converged {last['converged']}, corpus sampled {last['sampled']} tokens in {last['rows']} "
                  f"sequences")
        print(f"ratio before/after (cold): {med[before] / med[after]:.2f}x wall, {cpu[before] / cpu[after]:.2f}x cpu")
        a = torch.load(tmp / f"{before[:5]}.pt", weights_only=True)
        b = torch.load(tmp / f"{after[:5]}.pt", weights_only=True)
        diffs = ", ".join(f"L{l} {float((a[l] - b[l]).norm() / a[l].norm()):.3f}" for l in sorted(a))
        print(f"relative Frobenius difference of C, before vs after (different sampled text): {diffs}")
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(wt)], cwd=ROOT, check=False)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
