"""Query merging at the paper's scale: does every question of a merged group get forgotten?

Usage::

    python benchmarks/bench_merge.py [--forget 80] [--merge 5] [--methods rome memit] [--keys each prompt]
                                     [--rome-updates exact memit mean-key] [--retain 60] [--threads 2]
                                     [--json out.json]

Data: TOFU's 217-item factual set (real authors + world facts, with their
perturbed answers) read from ``../shared/data/tofu`` (skipped when absent);
rephrases are our own paraphrases of that set (``backends/builtin/``).  The
embedded model scores every item once (greedy answer, ROUGE-1 recall); the
items it *knows* (R1 >= ``--known``, default 0.5) are kept, in file order: the
first ``--forget`` are forgotten with ``idk`` targets, the next ``--retain``
(default: all the rest) retained.  For each method and each ``merge_keys``
(``each``: every question keyed at its own subject, one value per group —
this code; ``prompt``: the merged prompt keyed at its last subject — the
paper's recipe, and this code before the fix), the edit is applied in a
transaction, the three splits are evaluated, the edit is rolled back.

Printed per run: forget / retain / rephrase ROUGE-1, composite
``1 - R1(forget) + R1(retain)``, retain as a share of the baseline, the
refusal rate on forget and retain (:func:`backends.refusal.is_refusal`),
seconds per edit, and **the worst group**: the group whose members' mean
forget ROUGE-1 is highest, with that mean and its worst member; plus how
many groups have every member at R1 <= 0.2.  The bars of issue 15 (80 forget,
m = 5): forget R1 <= 0.15, retain >= 0.85 x baseline, composite >= 1.65, and
every question of a group forgotten.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOFU = ROOT.parent / "shared" / "data" / "tofu"
FILES = ("real_authors_perturbed.json", "world_facts_perturbed.json")


def load_factual():
    from unlearn_tui.backends import data

    items = []
    for name in FILES:
        part = data.load_items(str(TOFU / name))
        for it in part:
            it.id = f"{name.split('_')[0]}-{it.id}"
        items += part
    return items


def evaluate(handle, splits, max_new_tokens):
    from unlearn_tui.backends.metrics import EvalSettings
    from unlearn_tui.backends.metrics import evaluate as ev

    return ev(handle, splits, EvalSettings(max_new_tokens=max_new_tokens, batch_size=16))


def refusal_rate(split) -> float:
    from unlearn_tui.backends.refusal import is_refusal

    items = split.items
    return sum(bool(is_refusal(i.generation)) for i in items) / max(1, len(items))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--forget", type=int, default=80)
    ap.add_argument("--retain", type=int, default=0, help="0: every other known item")
    ap.add_argument("--merge", type=int, nargs="+", default=[5])
    ap.add_argument("--methods", nargs="+", default=["rome", "memit"])
    ap.add_argument("--keys", nargs="+", default=["each", "prompt"], choices=("each", "prompt"))
    ap.add_argument("--param", action="append", default=[], help='METHOD=JSON, e.g. rome=\'{"merge_update": "memit"}\'')
    ap.add_argument("--rome-updates", nargs="+", default=["exact"], choices=("exact", "mean-key", "memit"),
                    help="ROME's merge_update values to run (each a row)")
    ap.add_argument("--known", type=float, default=0.5)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not all((TOFU / f).is_file() for f in FILES):
        print(f"skipped: the TOFU factual files are not in {TOFU}")
        return 0
    import torch

    torch.set_num_threads(args.threads)
    from unlearn_tui.backends import data, methods, selfimprove
    from unlearn_tui.backends.events import CancelToken
    from unlearn_tui.backends.methods.base import EditContext
    from unlearn_tui.backends.model import ModelSpec, load
    from unlearn_tui.backends.targets import build_requests, simple_targets

    handle = load(ModelSpec())
    items = load_factual()
    for it in items:      # our own paraphrases of the factual set (looked up by question text)
        it.paraphrased_question = it.paraphrased_question or selfimprove.builtin_paraphrase(it)
    t0 = time.perf_counter()
    known_res = evaluate(handle, {"all": items}, args.max_new_tokens)
    r1 = {s.id: s.rouge1 for s in known_res.splits["all"].items}
    known = [it for it in items if r1[it.id] >= args.known]
    print(f"factual set: {len(items)} items, {len(known)} known (R1 >= {args.known}) by {handle.name} "
          f"[{time.perf_counter() - t0:.0f} s]", flush=True)
    if len(known) <= args.forget:
        print(f"only {len(known)} known items: cannot forget {args.forget}")
        return 1
    forget = known[:args.forget]
    retain = known[args.forget:] if not args.retain else known[args.forget:args.forget + args.retain]
    splits = {"forget": forget, "retain": retain, "rephrase": data.rephrase_split(forget)}
    t0 = time.perf_counter()
    base = evaluate(handle, splits, args.max_new_tokens)
    bs = {k: v.rouge1 for k, v in base.splits.items()}
    print(f"forget {len(forget)}, retain {len(retain)}, rephrase {len(splits['rephrase'])}; baseline R1 "
          f"forget {bs['forget']:.3f} retain {bs['retain']:.3f} rephrase {bs['rephrase']:.3f} composite "
          f"{base.composite:.3f}; refusals forget {refusal_rate(base.splits['forget']):.0%} retain "
          f"{refusal_rate(base.splits['retain']):.0%} [{time.perf_counter() - t0:.0f} s]", flush=True)
    extra = dict(p.split("=", 1) for p in args.param)
    targets = simple_targets("idk", forget, data.builtin_refusals(), 0)
    rows = []
    for name in args.methods:
        for m in args.merge:
            reqs = build_requests(forget, targets, m)
            variants = [(k, u) for k in args.keys for u in (args.rome_updates if name == "rome" and k == "each"
                                                            else [None])]
            for keys, update in variants:
                if m == 1 and keys == "prompt":
                    continue
                params = {"merge_keys": keys, **json.loads(extra.get(name, "{}"))}
                if update is not None:
                    params["merge_update"] = update
                meth = methods.make(name, params)
                ctx = EditContext(lambda e: None, CancelToken(), forget, retain, {}, seed=0)
                t0 = time.perf_counter()
                with handle.transaction(meth.touched_parameters(handle)) as tx:
                    report = meth.apply(handle, reqs, ctx)
                seconds = time.perf_counter() - t0
                res = evaluate(handle, splits, args.max_new_tokens)
                tx.rollback()
                s = {k: v.rouge1 for k, v in res.splits.items()}
                by_id = {i.id: i.rouge1 for i in res.splits["forget"].items}
                groups = [[by_id[i] for i in r.item_ids] for r in reqs]
                means = [sum(g) / len(g) for g in groups]
                worst = max(range(len(groups)), key=lambda g: means[g])
                clean = sum(all(x <= 0.2 for x in g) for g in groups)
                stats_s = float(((report.get("stats") or {}).get("seconds")) or 0.0)
                row = {"method": name, "merge": m, "keys": keys, "merge_update": update, "edits": len(reqs), "r1": s,
                       "composite": res.composite, "retain_share": s["retain"] / max(bs["retain"], 1e-9),
                       "refusal_forget": refusal_rate(res.splits["forget"]),
                       "refusal_retain": refusal_rate(res.splits["retain"]),
                       "worst_group": {"items": reqs[worst].item_ids, "mean_r1": means[worst],
                                       "max_r1": max(groups[worst])},
                       "groups_forgotten": clean, "groups": len(groups),
                       "s_per_edit": (seconds - stats_s) / max(1, len(reqs)), "stats_s": stats_s,
                       "generations": {k: [[i.id, i.generation] for i in v.items] for k, v in res.splits.items()}}
                rows.append(row)
                bars = (s["forget"] <= 0.15 and row["retain_share"] >= 0.85 and res.composite >= 1.65
                        and clean == len(groups))
                label = name + ("/" + update if update else "")
                print(f"{label:15s} m={m:<2d} keys={keys:6s} {len(reqs):3d} edits  R1 forget {s['forget']:.3f} "
                      f"retain {s['retain']:.3f} ({row['retain_share']:.2f}x) rephrase {s['rephrase']:.3f}  "
                      f"composite {res.composite:.3f}  refusals forget {row['refusal_forget']:.0%} retain "
                      f"{row['refusal_retain']:.0%}  worst group mean R1 {means[worst]:.2f} (max "
                      f"{max(groups[worst]):.2f})  groups all <= 0.2: {clean}/{len(groups)}  "
                      f"{row['s_per_edit']:.1f} s/edit  bars {'MET' if bars else 'NOT MET'}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"baseline": bs, "baseline_composite": base.composite,
                                               "runs": rows}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
