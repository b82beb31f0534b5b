"""GRACE seconds per edit: the code at a git revision (default d29ab26) vs the working tree, interleaved.

Both sides run the same session through the command line (``replay``): the
embedded model (SmolLM2-135M-Instruct), the first ``--facts`` built-in world
facts as the forget set with ``idk`` targets, one ``[[runs]]`` with
``method = "grace"`` at its defaults.  The results JSON's ``seconds`` is the
time spent applying the method (evaluation excluded), so seconds per edit is
``seconds / facts``.  The revision runs from a temporary ``git worktree``
(packages imported as top-level ``backends``/``tui`` there), the working
tree through the installed ``unlearn_tui``, each in its own subprocess, one
after the other in every round (the order alternates), so a change in the
machine's load hits both sides alike.  Prints every round, the medians, the
ratio, and forget / retain / rephrase ROUGE-1 of each side (lower forget and
rephrase is more forgetting; retain should stay at the baseline), compared
with the EasyEdit reference (3.5 s per edit on the same machine kind).

    python benchmarks/bench_grace.py [--rounds 3] [--rev d29ab26] [--facts 10] [--threads 1]

Torch runs with ``--threads`` threads on both sides (default 1: on a small
shared machine a second intra-op thread only adds contention).
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
REFERENCE_S_PER_EDIT = 3.5   # EasyEdit's GRACE on the same machine kind (benchmarks/bench_lifelong.py)

SESSION = """version = 1
[data]
path = "builtin:world-facts"
forget = {facts}
retain = {retain}
[targets]
mode = "idk"
[eval]
max_new_tokens = 32
batch_size = 16
[[runs]]
method = "grace"
"""


def run_side(label: str, cmd: list[str], pythonpath: str, folder: Path, threads: int, facts: int) -> dict:
    out = folder / f"{label}.json"
    if out.exists():
        out.unlink()
    env = dict(os.environ, PYTHONPATH=pythonpath, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.run([*cmd, "replay", str(folder / "s.toml"), "--out", str(out), "--quiet", "--no-save"],
                          cwd=folder, env=env, capture_output=True, text=True)   # cwd: no stray top-level imports
    if proc.returncode != 0:
        raise SystemExit(f"{label}: replay failed ({proc.returncode})\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    data = json.loads(out.read_text())
    run = data["runs"][0]
    return {"s_per_edit": run["seconds"] / facts, "seconds": run["seconds"],
            "r1": {s: run[s]["rouge1"] for s in ("forget", "retain", "rephrase")},
            "baseline": {s: data["baseline"][s]["rouge1"] for s in ("forget", "retain", "rephrase")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rev", default="d29ab26", help="git revision of the 'before' side")
    ap.add_argument("--facts", type=int, default=10, help="built-in facts edited (one GRACE edit each)")
    ap.add_argument("--retain", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-grace-"))
    tree = tmp / "rev"
    subprocess.run(["git", "worktree", "add", "--detach", str(tree), args.rev], cwd=ROOT, check=True,
                   capture_output=True)
    try:
        folder = tmp / "session"
        folder.mkdir()
        (folder / "s.toml").write_text(SESSION.format(facts=args.facts, retain=args.retain))
        before = f"before ({args.rev})"
        sides = {before: ([sys.executable, "-m", "tui.cli"], str(tree)),
                 "after (working tree)": ([sys.executable, "-m", "unlearn_tui.tui.cli"], str(ROOT))}
        print(f"GRACE, {args.facts} built-in facts (idk targets), embedded model, {args.threads} thread(s), "
              f"{args.rounds} round(s); seconds = the results JSON's apply time", flush=True)
        results: dict[str, list[dict]] = {k: [] for k in sides}
        for r in range(args.rounds):
            order = list(sides) if r % 2 == 0 else list(sides)[::-1]
            for label in order:
                cmd, path = sides[label]
                res = run_side("before" if label == before else "after", cmd, path, folder, args.threads, args.facts)
                results[label].append(res)
                print(f"  round {r + 1}  {label:22s} {res['s_per_edit']:6.2f} s/edit  "
                      f"(apply {res['seconds']:.1f} s)", flush=True)
        med = {k: statistics.median(x["s_per_edit"] for x in v) for k, v in results.items()}
        after = "after (working tree)"
        print()
        for k in sides:
            last = results[k][-1]
            r1 = "  ".join(f"{s} {last['r1'][s]:.3f}" for s in ("forget", "retain", "rephrase"))
            same = all(x["r1"] == last["r1"] for x in results[k])
            print(f"{k:22s} median {med[k]:6.2f} s/edit   ROUGE-1 {r1}" + ("" if same else "  (varied by round)"))
        base = results[after][-1]["baseline"]
        print(f"{'baseline (unedited)':22s} {'':19s}   ROUGE-1 "
              + "  ".join(f"{s} {base[s]:.3f}" for s in ("forget", "retain", "rephrase")))
        print(f"ratio before/after: {med[before] / med[after]:.2f}x")
        ref = REFERENCE_S_PER_EDIT
        print(f"vs the EasyEdit reference {ref} s/edit: after is {ref / med[after]:.2f}x faster "
              f"(goal >= 3x, i.e. <= {ref / 3:.2f} s/edit); before was {ref / med[before]:.2f}x")
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
