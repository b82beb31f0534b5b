"""A sweep on the embedded model: Ray (local, N workers) against the same trials one after another.

The grid (issue 17): 3 methods (rome, memit, grace) x 2 merge factors (1, 2) on
10 built-in facts (10 retain, no rephrase, idk targets), default
hyper-parameters.  ``unlearn-tui sweep`` runs it twice, each into its own empty
``--out``: with ``--local`` (sequential, in one process) and on a local Ray
of ``--num-cpus`` CPUs (one trial per CPU: ``cpus_per_trial = 1``).  Printed:
the wall time of each (the processes' own, model loads included), the ratio,
and whether the two give the same scores per trial (they must).

Usage::

    python benchmarks/bench_sweep.py [--num-cpus 2] [--facts 10] [--out /tmp/unlearn-tui-sweep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KEYS = ("method", "merge_factor", "composite")


def sweep_text(facts: int, methods: list[str], merges: list[int], tokens: int) -> str:
    q = lambda xs: "[" + ", ".join(json.dumps(x) for x in xs) + "]"  # noqa: E731
    return (f'version = 1\n[model]\nname = "smollm2-135m-instruct"\n'
            f'[data]\npath = "builtin:world-facts"\nforget = {facts}\nretain = {facts}\nrephrase = false\n'
            f'[targets]\nmode = "idk"\n[eval]\nmax_new_tokens = {tokens}\n'
            f'[[runs]]\nmethod = "none"\n'
            f'[sweep]\nmethod = {q(methods)}\nmerge_factor = {q(merges)}\ncpus_per_trial = 1\n')


def run(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        print(p.stdout[-2000:], p.stderr[-2000:])
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return wall, p.stdout


def rows(out: Path) -> list[dict]:
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    return sorted(({k: r.get(k) for k in KEYS} | {"forget": (r.get("forget") or {}).get("rouge1"),
                                                   "retain": (r.get("retain") or {}).get("rouge1")}
                   for r in lines), key=lambda r: (r["method"], r["merge_factor"]))


def main(argv: list[str] | None = None) -> int:
    from benchmarks.common import machine_line

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--facts", type=int, default=10)
    ap.add_argument("--methods", default="rome,memit,grace")
    ap.add_argument("--merges", default="1,2")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path("/tmp/unlearn-tui-sweep"))
    a = ap.parse_args(argv)
    try:
        import ray  # noqa: F401
    except ImportError:
        print("skipped: Ray is not installed (pip install 'unlearn-tui[ray]')")
        return 0
    shutil.rmtree(a.out, ignore_errors=True)
    a.out.mkdir(parents=True)
    sweep = a.out / "sweep.toml"
    sweep.write_text(sweep_text(a.facts, a.methods.split(","), [int(m) for m in a.merges.split(",")],
                                a.max_new_tokens))
    exe = str(Path(sys.executable).parent / "unlearn-tui")
    print(machine_line())
    seq, _ = run([exe, "sweep", str(sweep), "--out", str(a.out / "sequential"), "--local", "--quiet"])
    print(f"sequential (--local): {seq:.0f} s", flush=True)
    par, table = run([exe, "sweep", str(sweep), "--out", str(a.out / "ray"), "--num-cpus", str(a.num_cpus),
                      "--quiet"])
    print(f"Ray, {a.num_cpus} CPUs (cpus_per_trial = 1): {par:.0f} s")
    print(f"ratio sequential / Ray: {seq / par:.2f}x")
    s, r = rows(a.out / "sequential"), rows(a.out / "ray")
    print("same scores per trial:", s == r)
    for x in r:
        print(f"  {x['method']:6s} m={x['merge_factor']}: forget R1 {x['forget']:.3f}, retain R1 {x['retain']:.3f}, "
              f"composite {x['composite']:.3f}")
    print(table[-3000:])
    return 0 if s == r else 1


if __name__ == "__main__":
    raise SystemExit(main())
