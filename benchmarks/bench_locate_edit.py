"""ROME / MEMIT / AlphaEdit on the embedded model: quality, seconds per edit, peak RSS.

Usage::

    python benchmarks/bench_locate_edit.py quality [--methods rome memit alphaedit] [--forget 10] [--retain 10]
    python benchmarks/bench_locate_edit.py sweep [--methods rome memit] [--forget 40] [--merge 1 2 5 10]
    python benchmarks/bench_locate_edit.py vs [--rev d29ab26] [--rounds 3] [--facts 10] [--methods rome memit]

``quality``: builtin:world-facts, the first N items forgotten with ``idk``
targets, the next M retained; prints baseline and edited ROUGE-1 on forget /
retain / rephrase, seconds per edit (method apply time / edits) and the peak
RSS during the edit against the RSS with the model loaded (sampled every
20 ms), as ratios against the EasyEdit reference (ROME 84 s/edit, MEMIT
42 s/edit with the tied-embedding lookup patched).  ``sweep``: the paper's
Figure 6 — composite ``1 - R1(forget) + R1(retain)`` per merge factor.
CPU seconds of the process (``time.process_time``) are printed next to wall
time: on a shared machine the wall time mostly measures the other tenants.
``--threads`` sets torch's intra-op threads (default 1: on a shared machine
oversubscribed threads are far slower).  Covariance statistics are computed
once and cached (their cost is reported separately by bench_stats.py), and so
are AlphaEdit's null-space bases (their time is printed).

``vs``: seconds per edit of the code at a git revision (``--rev``, default
d29ab26, before the speed work) against the working tree, with forget /
retain / rephrase ROUGE-1 of each.  Both sides replay the same session
through their own command line (``replay --out``): the embedded model, the
first ``--facts`` built-in facts forgotten with ``idk`` targets, the next
``--retain`` retained, one ``[[runs]]`` per method at its defaults.  The
revision runs from a temporary ``git worktree`` (``python -m tui.cli`` with
the worktree on ``PYTHONPATH``: at d29ab26 the packages were the top-level
``backends``/``tui``; a later revision gets an ``unlearn_tui`` folder of
links), the working tree the same way through links to its own folders, each
in a subprocess with its own cache folder (the statistics' corpus changed
between the two).  A warm-up replay of one fact per side fills each cache
(covariance statistics, AlphaEdit's null-space bases, the context templates)
before anything is timed; the working tree's context templates are then
copied over the revision's, so both edit with the same prompts.  Seconds per
edit is the results JSON's ``seconds`` (the method's apply, evaluation
excluded, the cached statistics read included; printed too) over the
edits.  Rounds alternate the order of the sides; medians and their ratio are
printed, with the value-optimisation steps per edit.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REFERENCE = {"rome": 84.0, "memit": 42.0, "alphaedit": 42.0}
REF_RSS_GB = 4.3


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


class PeakRSS:
    def __init__(self, every: float = 0.02) -> None:
        self.every = every
        self.peak = 0.0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb())
            time.sleep(self.every)

    def __enter__(self):
        self.peak = rss_mb()
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_mb())


def setup(args):
    import torch

    torch.set_num_threads(args.threads)
    from unlearn_tui.backends import data
    from unlearn_tui.backends.model import ModelSpec, load

    handle = load(ModelSpec())
    items = data.load_items("builtin:world-facts")
    return handle, items


def evaluate(handle, forget, retain):
    from unlearn_tui.backends import data
    from unlearn_tui.backends.metrics import EvalSettings, evaluate as ev

    res = ev(handle, {"forget": forget, "retain": retain, "rephrase": data.rephrase_split(forget)},
             EvalSettings(max_new_tokens=32, batch_size=16))
    return {s: res.splits[s].rouge1 for s in res.splits}, res


def run_method(handle, name, forget, retain, merge, params, seed=0):
    from unlearn_tui.backends import data, methods
    from unlearn_tui.backends.events import CancelToken
    from unlearn_tui.backends.methods.base import EditContext
    from unlearn_tui.backends.targets import build_requests, simple_targets

    targets = simple_targets("idk", forget, data.builtin_refusals(), seed)
    reqs = build_requests(forget, targets, merge)
    m = methods.make(name, params)
    ctx = EditContext(lambda e: None, CancelToken(), forget, retain, {}, seed=seed)
    # statistics first (cached; bench_stats.py measures them), so the edit timing is the edit itself
    if name in ("memit", "alphaedit") or getattr(m.params, "mom2_adjustment", False):
        from unlearn_tui.backends import stats

        layers = m.layers(handle) if hasattr(m, "layers") and callable(m.layers) else [m.layer(handle)]
        layers = layers if isinstance(layers, list) else [layers]
        mats, _ = stats.second_moments(handle, layers, m.params.corpus, m.params.token_budget, m.params.stats_tol)
        if name == "alphaedit":  # the null-space bases are derived statistics, cached on disk the same way
            t_ns = time.perf_counter()
            for l in layers:
                stats.nullspace_basis(handle, l, mats[l], m.params.nullspace_threshold, m.params.relative_threshold)
            print(f"# alphaedit null-space bases for layers {layers}: {time.perf_counter() - t_ns:.2f} s "
                  f"(cold the first time, then read from the statistics cache)", flush=True)
    from unlearn_tui.backends.editing.locate import templates_for

    templates_for(handle, m.params, seed)
    base_rss = rss_mb()
    t0 = time.perf_counter()
    c0 = time.process_time()
    with PeakRSS() as peak:
        tx_cm = handle.transaction(m.touched_parameters(handle))
        tx = tx_cm.__enter__()
        try:
            report = m.apply(handle, reqs, ctx)
        except BaseException:
            tx_cm.__exit__(*sys.exc_info())
            raise
        tx_cm.__exit__(None, None, None)
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - c0
    scores, res = evaluate(handle, forget, retain)
    gens = {s: [i.generation for i in res.splits[s].items] for s in res.splits}
    tx.rollback()
    return {"method": name, "merge": merge, "edits": len(reqs), "seconds": seconds,
            "s_per_edit": seconds / max(1, len(reqs)),
            "cpu_s_per_edit": cpu / max(1, len(reqs)), "base_rss_mb": base_rss, "peak_rss_mb": peak.peak,
            "scores": scores, "composite": res.composite, "generations": gens,
            "report": {k: v for k, v in report.items() if k != "per_edit"},
            "per_edit": report.get("per_edit", [])}


def weights_mb(handle) -> float:
    return sum(p.numel() * p.element_size() for p in handle.model.parameters()) / 2 ** 20


def cmd_quality(args):
    handle, items = setup(args)
    forget, retain = items[:args.forget], items[args.forget:args.forget + args.retain]
    base, _ = evaluate(handle, forget, retain)
    wmb = weights_mb(handle)
    print(f"embedded model: {handle.name}, layers {handle.adapter.n_layers}, tied embeddings "
          f"{handle.adapter.tied_embeddings}, weights {wmb:.0f} MB, torch threads {args.threads}")
    print(f"baseline ROUGE-1: forget {base['forget']:.3f}  retain {base['retain']:.3f}  "
          f"rephrase {base['rephrase']:.3f}")
    rows = []
    for name in args.methods:
        params = json.loads(args.params.get(name, "{}")) if isinstance(args.params, dict) else {}
        r = run_method(handle, name, forget, retain, 1, params)
        s = r["scores"]
        ok = s["forget"] <= 0.2 and s["retain"] >= 0.8 * base["retain"]
        extra = r["peak_rss_mb"] - r["base_rss_mb"]
        print(f"{name:10s} forget {s['forget']:.3f}  retain {s['retain']:.3f} ({s['retain'] / max(base['retain'], 1e-9):.2f}x "
              f"baseline)  rephrase {s['rephrase']:.3f}  bar {'MET' if ok else 'NOT MET'}")
        print(f"{'':10s} {r['s_per_edit']:.1f} s/edit wall, {r['cpu_s_per_edit']:.1f} CPU-s/edit "
              f"({r['edits']} edits, {r['seconds']:.1f} s); reference "
              f"{REFERENCE[name]:.0f} s/edit -> {REFERENCE[name] / r['s_per_edit']:.1f}x (wall), "
              f"{REFERENCE[name] / r['cpu_s_per_edit']:.1f}x (CPU); "
              f"RSS loaded {r['base_rss_mb']:.0f} MB, peak during edit {r['peak_rss_mb']:.0f} MB "
              f"(+{extra:.0f} MB = {extra / wmb:.2f}x weights; reference peak {REF_RSS_GB} GB)")
        for g in r["generations"]["forget"][:3]:
            print(f"{'':10s}   forget gen: {g[:80]!r}")
        rows.append(r)
        sys.stdout.flush()
    if args.json:
        Path(args.json).write_text(json.dumps({"baseline": base, "runs": rows}, indent=1, default=str))


def cmd_sweep(args):
    handle, items = setup(args)
    forget, retain = items[:args.forget], items[args.forget:args.forget + args.retain]
    base, res = evaluate(handle, forget, retain)
    print(f"baseline: forget {base['forget']:.3f} retain {base['retain']:.3f} composite {res.composite:.3f}")
    out = []
    for name in args.methods:
        params = json.loads(args.params.get(name, "{}")) if isinstance(args.params, dict) else {}
        for m in args.merge:
            r = run_method(handle, name, forget, retain, m, params)
            s = r["scores"]
            print(f"{name:6s} merge {m:2d}: {r['edits']:2d} edits  forget {s['forget']:.3f}  retain "
                  f"{s['retain']:.3f}  rephrase {s['rephrase']:.3f}  composite {r['composite']:.3f}  "
                  f"{r['s_per_edit']:.1f} s/edit wall, {r['cpu_s_per_edit']:.1f} CPU-s/edit")
            out.append(r)
            sys.stdout.flush()
    if args.json:
        Path(args.json).write_text(json.dumps({"baseline": base, "runs": out}, indent=1, default=str))


ROOT = Path(__file__).resolve().parents[1]
SPLITS = ("forget", "retain", "rephrase")
VS_SESSION = """version = 1
[model]
name = "smollm2-135m-instruct"
[data]
path = "builtin:world-facts"
forget = {facts}
retain = {retain}
[targets]
mode = "idk"
[eval]
max_new_tokens = 32
batch_size = 16
"""


def _links(folder: Path, tree: Path) -> Path:
    """``folder/unlearn_tui/{backends,sessions,tui,themes}`` -> ``tree``'s folders; returns ``folder``."""
    pkg = folder / "unlearn_tui"
    pkg.mkdir(parents=True)
    for name in ("backends", "sessions", "tui", "themes"):
        if (tree / name).is_dir():
            (pkg / name).symlink_to(tree / name, target_is_directory=True)
    return folder


def _replay(side: dict, session: Path, out: Path, threads: int) -> dict:
    if out.exists():
        out.unlink()
    env = dict(os.environ, PYTHONPATH=side["path"], UNLEARN_TUI_CACHE_DIR=str(side["cache"]), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.pop("PYTHONSAFEPATH", None)
    cmd = [sys.executable, "-m", side["module"], "replay", str(session), "--out", str(out), "--quiet", "--no-save"]
    proc = subprocess.run(cmd, cwd=session.parent, env=env, capture_output=True, text=True)  # no stray imports
    if proc.returncode != 0:
        raise SystemExit(f"{side['label']}: replay failed ({proc.returncode})\n{proc.stdout[-2000:]}\n"
                         f"{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def _summary(data: dict) -> dict:
    runs = {}
    for run in data["runs"]:
        rep = run.get("report") or {}
        edits = max(1, int(rep.get("edits") or 1))
        steps = [e["steps"] for e in rep.get("per_edit", []) if "steps" in e]
        runs[run["method"]] = {"s_per_edit": run["seconds"] / edits, "seconds": run["seconds"], "edits": edits,
                               "stats_s": float((rep.get("stats") or {}).get("seconds") or 0.0),
                               "steps": sum(steps) / len(steps) if steps else float("nan"),
                               "r1": {s: run[s]["rouge1"] for s in SPLITS if s in run}}
    return {"runs": runs, "baseline": {s: data["baseline"][s]["rouge1"] for s in SPLITS if s in data["baseline"]}}


def _r1(r: dict) -> str:
    return "/".join(f"{r.get(s, float('nan')):.3f}" for s in SPLITS)


def cmd_vs(args):
    import shutil
    import statistics
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="bench-locate-vs-"))
    tree = tmp / "rev"
    subprocess.run(["git", "worktree", "add", "--detach", str(tree), args.rev], cwd=ROOT, check=True,
                   capture_output=True)
    try:
        old_layout = "unlearn_tui" not in (tree / "pyproject.toml").read_text()
        before, after = f"before ({args.rev})", "after (working tree)"
        sides = {
            before: {"label": before, "cache": tmp / "cache-before",
                     "path": str(tree) if old_layout else str(_links(tmp / "pkg-before", tree)),
                     "module": "tui.cli" if old_layout else "unlearn_tui.tui.cli"},
            after: {"label": after, "cache": tmp / "cache-after", "path": str(_links(tmp / "pkg-after", ROOT)),
                    "module": "unlearn_tui.tui.cli"},
        }
        user_models = Path(os.environ.get("UNLEARN_TUI_CACHE_DIR") or Path.home() / ".cache" / "unlearn-tui") / "models"
        for side in sides.values():
            side["cache"].mkdir()
            if user_models.is_dir():   # the converted GGUF weights, keyed per revision: reused, never timed
                (side["cache"] / "models").symlink_to(user_models, target_is_directory=True)
        folder = tmp / "session"
        folder.mkdir()
        runs = "".join(f'[[runs]]\nmethod = "{m}"\n' for m in args.methods)
        warm, timed = folder / "warm.toml", folder / "timed.toml"
        warm.write_text(VS_SESSION.format(facts=1, retain=1) + runs)
        timed.write_text(VS_SESSION.format(facts=args.facts, retain=args.retain) + runs)
        print(f"{', '.join(args.methods)}: {args.facts} built-in facts (idk targets), {args.retain} retained, "
              f"embedded model, {args.threads} thread(s), {args.rounds} round(s)", flush=True)
        for label in (after, before):   # the working tree first: its context templates are the shared ones
            _replay(sides[label], warm, folder / "warm.json", args.threads)
            print(f"  warm-up {label}: statistics, null-space bases, templates cached", flush=True)
        mine = sorted((sides[after]["cache"] / "templates").glob("*.json"))
        theirs = sorted((sides[before]["cache"] / "templates").glob("*.json"))
        if len(mine) == 1 and theirs:
            same = all(t.read_text() == mine[0].read_text() for t in theirs)
            for t in theirs:
                shutil.copyfile(mine[0], t)
            print(f"  context templates: the working tree's, copied to the revision's cache "
                  f"({'they were identical already' if same else 'they differed'})", flush=True)
        else:
            print(f"  context templates: not shared ({len(mine)} / {len(theirs)} files)", flush=True)
        results: dict[str, list[dict]] = {k: [] for k in sides}
        for r in range(args.rounds):
            order = [before, after] if r % 2 == 0 else [after, before]
            for label in order:
                res = _summary(_replay(sides[label], timed, folder / "timed.json", args.threads))
                results[label].append(res)
                line = "  ".join(f"{m} {res['runs'][m]['s_per_edit']:6.2f}" for m in args.methods)
                print(f"  round {r + 1}  {label:22s} s/edit: {line}", flush=True)
        print()
        print(f"{'method':10s} {'before s/edit':>13s} {'after s/edit':>13s} {'ratio':>7s}  {'steps/edit':>13s}  "
              f"{'stats read s':>12s}  R1 forget/retain/rephrase: before | after")
        verdict = []
        for m in args.methods:
            med = {k: statistics.median(x["runs"][m]["s_per_edit"] for x in v) for k, v in results.items()}
            last = {k: v[-1]["runs"][m] for k, v in results.items()}
            stats_s = {k: statistics.median(x["runs"][m]["stats_s"] for x in v) for k, v in results.items()}
            ratio = med[before] / med[after]
            rb, ra = last[before]["r1"], last[after]["r1"]
            r1_ok = (ra["forget"] <= rb["forget"] + 1e-9 and ra["retain"] >= rb["retain"] - 1e-9
                     and ra.get("rephrase", 0) <= rb.get("rephrase", 0) + 1e-9)
            varied = any(x["runs"][m]["r1"] != last[k]["r1"] for k, v in results.items() for x in v)
            print(f"{m:10s} {med[before]:13.2f} {med[after]:13.2f} {ratio:6.2f}x  "
                  f"{last[before]['steps']:5.1f} -> {last[after]['steps']:4.1f}  "
                  f"{stats_s[before]:5.2f} / {stats_s[after]:4.2f}  {_r1(rb)} | {_r1(ra)}"
                  + ("  (R1 varied by round)" if varied else ""))
            verdict.append(f"{m} {'MET' if ratio >= 2.0 and r1_ok else 'NOT MET'} ({ratio:.2f}x, R1 "
                           f"{'equal or better' if r1_ok else 'worse'})")
        for k in sides:
            print(f"baseline R1 {k}: {_r1(results[k][-1]['baseline'])}")
        print("goal >= 2x per edit with R1 equal or better: " + "; ".join(verdict))
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"kept {tmp}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=("quality", "sweep", "vs"))
    ap.add_argument("--methods", nargs="+", default=None)
    ap.add_argument("--forget", type=int, default=None)
    ap.add_argument("--retain", type=int, default=10)
    ap.add_argument("--merge", type=int, nargs="+", default=[1, 2, 5, 10])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--param", action="append", default=[], help='METHOD=JSON, e.g. rome=\'{"v_steps": 20}\'')
    ap.add_argument("--json", default=None)
    ap.add_argument("--rev", default="d29ab26", help="vs: git revision of the 'before' side")
    ap.add_argument("--rounds", type=int, default=3, help="vs: rounds (each runs both sides, alternating order)")
    ap.add_argument("--facts", type=int, default=10, help="vs: built-in facts edited (forget set)")
    ap.add_argument("--keep", action="store_true", help="vs: keep the temporary folder (caches, results JSON)")
    args = ap.parse_args()
    args.params = dict(p.split("=", 1) for p in args.param)
    if args.command == "vs":
        args.methods = args.methods or ["rome", "memit", "alphaedit"]
        cmd_vs(args)
    elif args.command == "quality":
        args.methods = args.methods or ["rome", "memit", "alphaedit"]
        args.forget = args.forget or 10
        cmd_quality(args)
    else:
        args.methods = args.methods or ["rome", "memit"]
        args.forget = args.forget or 40
        cmd_sweep(args)


if __name__ == "__main__":
    main()
