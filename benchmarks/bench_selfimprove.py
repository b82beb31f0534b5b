"""Self-improvement targets on the embedded model: do they name the subject and leak nothing?

Runs the ``self-improve`` pipeline (backends/selfimprove.py) on the first N
forget questions of ``builtin:world-facts`` (TOFU's world_facts file from
../shared/data when the built-in set is absent) and prints

* the share of first-try targets that mention the subject, that pass the leak
  check, that read as a refusal, and that pass every check;
* the share passing after regeneration (the rest fall back to a fixed refusal);
* five examples side by side with the ``idk`` (pool) targets;
* optionally (``--paraphrases``) the same for the generated rephrase set.

Usage::

    python benchmarks/bench_selfimprove.py [--n 20] [--seed 0] [--model NAME] [--paraphrases] [--modes avoidant,incorrect] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHARED_WORLD_FACTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "tofu" / "world_facts_perturbed.json"


def load_items(n: int):
    from unlearn_tui.backends import data
    from unlearn_tui.backends.errors import UserError

    try:
        items = data.load_items("builtin:world-facts")
        where = "builtin:world-facts"
    except UserError:
        items = data.load_items(str(SHARED_WORLD_FACTS), format="tofu")
        where = f"{SHARED_WORLD_FACTS} (builtin:world-facts is absent in this build)"
    return items[:n], where


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--paraphrases", action="store_true")
    ap.add_argument("--modes", default="", help="also run these generated modes, e.g. avoidant,incorrect")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    from unlearn_tui.backends.leak import check_leak, mentions_subject, subject_of
    from unlearn_tui.backends.model import ModelSpec, load
    from unlearn_tui.backends.refusal import is_refusal
    from unlearn_tui.backends.selfimprove import ensure_paraphrases, generate_targets_report
    from unlearn_tui.backends.targets import load_pool, simple_targets
    from unlearn_tui.sessions import new_session

    items, where = load_items(args.n)
    t0 = time.perf_counter()
    handle = load(ModelSpec(name=args.model))
    print(f"model {args.model} loaded in {time.perf_counter() - t0:.1f}s; data {where}; n = {len(items)}; "
          f"seed {args.seed}")
    session = new_session(targets={"mode": "self-improve", "seed": args.seed})
    pool = load_pool(None)
    t0 = time.perf_counter()
    targets, rep = generate_targets_report(handle, "self-improve", items, pool, session.targets)
    secs = time.perf_counter() - t0
    n = len(items)
    ft = rep.first_try
    print(f"\nself-improve targets ({secs:.1f}s for {n} questions, {rep.tries} tries)")
    print(f"  first try: mentions subject {ft['mentions_subject']:.0%}  leak-free {ft['leak_free']:.0%}  "
          f"refusal {ft['refusal']:.0%}  passes every check {ft['passed']:.0%}")
    passed_after = (rep.passed_first + rep.regenerated) / n
    print(f"  after regeneration: {passed_after:.0%} passing ({rep.passed_first} first try + "
          f"{rep.regenerated} regenerated); {rep.fallback} fallback ({rep.fallback / n:.0%})")
    final_leak = sum(1 for it in items if check_leak(targets[it.id].text, it)) / n
    final_ment = sum(1 for it in items if mentions_subject(targets[it.id].text, it)) / n
    final_ref = sum(1 for it in items if is_refusal(targets[it.id].text)) / n
    print(f"  final targets: mention subject {final_ment:.0%}  leak {final_leak:.0%}  refusal {final_ref:.0%}")
    idk = simple_targets("idk", items, pool, args.seed)
    idk_ment = sum(1 for it in items if mentions_subject(idk[it.id].text, it)) / n
    print(f"  idk targets for comparison: mention subject {idk_ment:.0%}")

    print("\nfive examples (question | subject | idk target | self-improve target [source])")
    for it in items[:5]:
        t = targets[it.id]
        print(f"- {it.question} | {subject_of(it)}\n    idk:          {idk[it.id].text}\n"
              f"    self-improve: {t.text}   [{t.source}]")
    print("\nfirst-try texts that failed a check:")
    for it in items:
        if targets[it.id].source != "self-improve":
            print(f"- {it.question} -> {rep.first_texts.get(it.id)!r} (final: {targets[it.id].source})")

    for mode in [m for m in args.modes.split(",") if m]:
        t0 = time.perf_counter()
        out, rep = generate_targets_report(handle, mode, items, pool, session.targets)
        secs = time.perf_counter() - t0
        print(f"\n{mode} targets ({secs:.1f}s): first try passes {rep.first_try['passed']:.0%} "
              f"(leak-free {rep.first_try['leak_free']:.0%}, mentions subject "
              f"{rep.first_try['mentions_subject']:.0%}); after regeneration "
              f"{(rep.passed_first + rep.regenerated) / n:.0%}; fallback {rep.fallback}")
        for it in items[:5]:
            print(f"- {it.question} -> {out[it.id].text} [{out[it.id].source}]")

    if args.paraphrases:
        for it in items:
            it.paraphrased_question = None
        t0 = time.perf_counter()
        recs = ensure_paraphrases(handle, items, session)
        secs = time.perf_counter() - t0
        counts: dict[str, int] = {}
        for r in recs:
            counts[r["source"]] = counts.get(r["source"], 0) + 1
        ment = sum(1 for r in recs if r["mentions_subject"]) / len(recs)
        print(f"\nparaphrases ({secs:.1f}s): sources {counts}; keep the subject {ment:.0%}")
        for r in recs[:5]:
            print(f"- {r['question']} -> {r['paraphrase']} [{r['source']}]")


if __name__ == "__main__":
    main()
