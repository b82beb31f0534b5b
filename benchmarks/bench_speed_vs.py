"""The same headless work with the code at a git revision and with the working tree, side by side.

Usage: python benchmarks/bench_speed_vs.py [--rev d29ab26] [--rounds 3] [--data PATH] [--forget 40]
                                           [--retain rest] [--keep]

Scenario (issue 14, item 1): a ``none`` replay of the embedded model over
TOFU's world-facts file with its perturbed answers (117 items: ``--forget``
forgotten, the rest retained, ``rephrase = true``).  The paraphrases are
chosen once, by the working tree, and written into the session file as
``[[data.paraphrases]]``, so both sides evaluate exactly the same questions
(``--no-save``: neither side writes anything back).  The revision is checked out into a temporary ``git worktree`` and
run from there (at d29ab26 the packages were the top-level ``backends``,
``tui``…, so it runs as ``python -m tui.cli``; the working tree as
``python -m unlearn_tui.tui.cli``).

Each round runs both sides (the order alternates), one after the other, and
prints per side the wall time, peak RSS (of that process, ``wait4``), and the
ratio of the medians; then compares the results: ROUGE-1 / probability / MRR /
top-hit / truth ratio per split and per item generation.  A warm-up replay of
two items per side fills the model cache first (its key changed in issue 12).

Edits and statistics (items 2 and 3) have their own side-by-side scripts:
``bench_locate_edit.py vs`` / ``bench_grace.py`` and ``bench_stats_vs.py``.
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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "tofu" / "world_facts_perturbed.json"

SESSION = """\
version = 1

[model]
name = "smollm2-135m-instruct"

[data]
path = "{data}"
forget = {forget}
retain = {retain}
rephrase = true

[targets]
mode = "idk"

[eval]
max_new_tokens = 32
batch_size = 16

[[runs]]
method = "none"
"""


def _worktree(rev: str, where: Path) -> Path:
    path = where / f"rev-{rev}"
    subprocess.run(["git", "worktree", "add", "--detach", str(path), rev], cwd=ROOT, check=True,
                   capture_output=True, text=True)
    return path


def _remove_worktree(path: Path) -> None:
    subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=ROOT, capture_output=True, text=True)


def _side_command(side: str, tree: Path, session: Path, out: Path) -> tuple[list[str], Path, dict]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if side == "after":
        cmd = [sys.executable, "-m", "unlearn_tui.tui.cli"]
        cwd = ROOT
    else:   # the revision's own top-level packages, from its folder
        cmd = [sys.executable, "-m", "tui.cli"]
        cwd = tree
        env["PYTHONPATH"] = str(tree)
    cmd += ["replay", str(session), "--out", str(out), "--quiet", "--no-save", "--items"]
    return cmd, cwd, env


def _run(cmd: list[str], cwd: Path, env: dict) -> tuple[float, float, int, str]:
    """(wall seconds, peak RSS MiB of that process, exit code, stderr tail)."""
    t = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _pid, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t
        err.seek(0)
        tail = err.read().decode(errors="replace")[-800:]
    return wall, usage.ru_maxrss / 1024, p.returncode, tail


def _compare(a: dict, b: dict) -> list[str]:
    lines = []
    # a run's split summaries sit at the top of its record (RunResult.to_json), the baseline's under "baseline"
    pairs = [("baseline", a["baseline"], b["baseline"])]
    pairs += [(f"run {r1['method']}", r1, r2) for r1, r2 in zip(a["runs"], b["runs"])]
    for label, sa, sb in pairs:
        for split in ("forget", "retain", "rephrase"):
            x, y = sa.get(split) or {}, sb.get(split) or {}
            diffs = {k: abs((x.get(k) or 0.0) - (y.get(k) or 0.0)) for k in
                     ("rouge1", "probability", "mrr", "top_hit", "truth_ratio") if k in x or k in y}
            if diffs:
                lines.append(f"  {label:10s} {split:8s} n={x.get('n')}/{y.get('n')} " +
                             " ".join(f"|d {k}| {v:.2e}" for k, v in diffs.items()))
    ia, ib = a.get("baseline_items", {}), b.get("baseline_items", {})
    same = total = 0
    for split in ia:
        for p, q in zip(ia[split], ib.get(split, [])):
            total += 1
            same += p["generation"] == q["generation"]
    lines.append(f"  baseline generations identical: {same}/{total}")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rev", default="d29ab26")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--forget", default="40")
    ap.add_argument("--retain", default='"rest"')
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (sessions, results)")
    args = ap.parse_args()
    data = Path(args.data).resolve()
    if not data.is_file():
        print(f"skipped: {data} not found (the shared TOFU data)")
        return 0
    sys.path.insert(0, str(ROOT))
    from benchmarks.common import machine_line

    print(machine_line())
    work = Path(tempfile.mkdtemp(prefix="bench-speed-vs-"))
    tree = _worktree(args.rev, work)
    try:
        session = work / "session.toml"
        session.write_text(SESSION.format(data=data, forget=args.forget, retain=args.retain))
        # the paraphrases, chosen once by the working tree (its built-in bank, else generated and checked), then
        # written into the session as [[data.paraphrases]] so both sides ask exactly the same rephrased questions
        t = time.perf_counter()
        gen = subprocess.run([sys.executable, "-m", "unlearn_tui.tui.cli", "replay", str(session), "--quiet",
                              "--no-save", "--out", str(work / "paraphrases.json")], cwd=ROOT, capture_output=True,
                             text=True)
        if gen.returncode != 0:
            print("paraphrase pass failed:", gen.stderr[-800:])
            return 1
        res = json.loads((work / "paraphrases.json").read_text())
        with session.open("a", encoding="utf-8") as f:
            for rec in res["paraphrases"]:
                f.write("\n[[data.paraphrases]]\n" f"id = {json.dumps(rec['id'])}\n"
                        f"question = {json.dumps(rec['paraphrase'])}\nsource = \"custom\"\n")
        print(f"{len(res['paraphrases'])} paraphrases fixed in the session ({time.perf_counter() - t:.0f} s, "
              f"not timed; left out: {len(res.get('paraphrases_left_out', []))})")
        warm = work / "warm.toml"
        warm.write_text(SESSION.format(data=data, forget=1, retain=1).replace("rephrase = true", "rephrase = false"))
        for side in ("before", "after"):
            cmd, cwd, env = _side_command(side, tree, warm, work / f"warm-{side}.json")
            _wall, _rss, rc, tail = _run(cmd, cwd, env)
            if rc != 0:
                print(f"warm-up {side} failed (exit {rc}): {tail}")
                return 1
        times: dict[str, list[float]] = {"before": [], "after": []}
        rss: dict[str, list[float]] = {"before": [], "after": []}
        outs: dict[str, dict] = {}
        for rnd in range(args.rounds):
            order = ("before", "after") if rnd % 2 == 0 else ("after", "before")
            for side in order:
                out = work / f"{side}-{rnd}.json"
                cmd, cwd, env = _side_command(side, tree, session, out)
                wall, peak, rc, tail = _run(cmd, cwd, env)
                if rc != 0:
                    print(f"round {rnd + 1} {side} failed (exit {rc}): {tail}")
                    return 1
                times[side].append(wall)
                rss[side].append(peak)
                outs[side] = json.loads(out.read_text())
                ev = sum(r.get("eval_seconds") or 0.0 for r in outs[side]["runs"])
                print(f"round {rnd + 1} {side:6s}: {wall:8.1f} s (of which the none run's evaluation {ev:.1f} s), "
                      f"peak RSS {peak:7.0f} MiB", flush=True)
        med = {k: statistics.median(v) for k, v in times.items()}
        n_items = sum((outs["after"]["baseline"].get(s) or {}).get("n", 0) for s in ("forget", "retain", "rephrase"))
        print(f"none replay, {n_items} evaluated items (forget + retain + rephrase), {args.rounds} rounds:")
        print(f"  before ({args.rev}): median {med['before']:.1f} s, peak RSS {max(rss['before']):.0f} MiB")
        print(f"  after (working tree): median {med['after']:.1f} s, peak RSS {max(rss['after']):.0f} MiB")
        print(f"  speed-up {med['before'] / med['after']:.2f}x")
        print("scores, before vs after:")
        for line in _compare(outs["before"], outs["after"]):
            print(line)
    finally:
        _remove_worktree(tree)
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
