"""How many model-written paraphrases pass the checks, on the paper's 217-item factual set (issue 15, item 4).

The embedded model (or ``--model``) paraphrases every question of TOFU's real
authors (100) + world facts (117) — our shipped paraphrases are NOT used as
answers here, so every question goes through generation (they are the bank the
prompt's exemplars are retrieved from, the question's own pair excluded) — and
each try is judged by
:func:`backends.selfimprove.paraphrase_verdict` (a question; names the same
subject; no token of the gold answer; not a near-copy) and, unless
``--no-meaning``, by the meaning check (the unedited model still answers a
paraphrase of a question it answers right).  Printed: the share
that passed on the first (greedy) try, within the try budget, how many were
left out, the failure reasons of the left-out items, and examples; for
generation as it is (the question's own words banned, so the model must
reword it: ``generate_paraphrases(reword=True)``) and without the ban, side by
side in one run (``--mode both``); with the prompt's exemplars retrieved from our paraphrase bank
(the default), retrieved only from the other file's questions (``--shots cross``: no exemplar of the
same file), the five fixed generic ones (``--shots generic``: before retrieval), or generic and
retrieved side by side (``--shots compare``); with no new name or number allowed to start a word
(``--name-ban on``, the default: :func:`backends.selfimprove.new_name_tokens`), without, or both
(``--name-ban compare``).  The bar is >= 90% passing.

Usage::

    python benchmarks/bench_paraphrases.py [--model NAME] [--items 217] [--tries 8] [--seed 0] [--mode both]
        [--shots retrieved|cross|generic|compare] [--sample-from K] [--name-ban on|off|compare]
        [--subject-led K]
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TOFU = ROOT.parent / "shared" / "data" / "tofu"


def main(argv: list[str] | None = None) -> int:
    from benchmarks.common import machine_line

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--items", type=int, default=217)
    ap.add_argument("--tries", type=int, default=None, help="tries per question (default: what the tool uses)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mode", choices=("both", "reworded", "plain"), default="both",
                    help="generation with the question's words banned (the default), without, or both side by side")
    ap.add_argument("--show", type=int, default=12, help="passed examples printed per mode")
    ap.add_argument("--no-meaning", action="store_true",
                    help="without the meaning check (the unedited model must still answer a known item's paraphrase)")
    ap.add_argument("--shots", choices=("retrieved", "cross", "generic", "compare"), default="retrieved",
                    help="the prompt's exemplars: retrieved from our paraphrase bank (the tool's default; the "
                         "question's own pair is never used), retrieved only from the OTHER file's questions "
                         "and the generic ones (cross), the five fixed generic ones (generic, before "
                         "retrieval), or generic and retrieved side by side (compare)")
    ap.add_argument("--sample-from", type=int, default=None,
                    help="tries from this one on sample at the tool's temperature, the earlier ones are greedy "
                         "(default: the tool's)")
    ap.add_argument("--name-ban", choices=("on", "off", "compare"), default="on",
                    help="no name or number the question lacks can start a word (on: the tool's default), "
                         "off (before it), or both side by side")
    ap.add_argument("--subject-led", type=int, default=None,
                    help="the last K tries open the reply with the subject (default: the tool's; 0: never)")
    a = ap.parse_args(argv)
    from unlearn_tui.backends import selfimprove as _si

    a.tries = a.tries or _si.PARAPHRASE_TRIES
    a.modes = {"both": (False, True), "reworded": (True,), "plain": (False,)}[a.mode]
    files = [TOFU / "real_authors_perturbed.json", TOFU / "world_facts_perturbed.json"]
    if not all(f.is_file() for f in files):
        print(f"skipped: the TOFU files are not in {TOFU}")
        return 0
    from unlearn_tui.backends import data, selfimprove
    from unlearn_tui.backends.model import ModelSpec, load

    items = []
    for f in files:
        for it in data.load_items(str(f), format="tofu"):
            it.id = f"{f.stem.split('_perturbed')[0]}-{it.id}"
            it.paraphrased_question = None
            items.append(it)
    items = items[: a.items]
    print(machine_line())
    handle = load(ModelSpec(name=a.model))
    n = len(items)
    passed: dict = {}
    from unlearn_tui.backends.selfimprove import _question_key

    by_file = {}   # question -> its file's stem (for --shots cross)
    for it in items:
        by_file[_question_key(it.question)] = it.id.split("-")[0]
    shots = {"retrieved": ("retrieved",), "cross": ("cross",), "generic": ("generic",),
             "compare": ("generic", "retrieved")}[a.shots]
    bans = {"on": (True,), "off": (False,), "compare": (False, True)}[a.name_ban]
    runs = [(reword, shot, nb) for shot in shots for reword in a.modes for nb in bans]
    full_bank = selfimprove.paraphrase_bank()
    for reword, shot, name_ban in runs:
        failures: dict = {}
        if shot == "generic":
            banks = {None: ()}
        elif shot == "retrieved":
            banks = {None: full_bank}
        else:   # cross: an item's exemplars come from the other file's questions (and the generic pairs)
            banks = {stem: tuple((q, p) for q, p in full_bank if by_file.get(_question_key(q)) != stem)
                     for stem in {it.id.split("-")[0] for it in items}}
        t0 = time.perf_counter()
        made = {}
        for stem, bank in banks.items():
            part = [it for it in items if stem is None or it.id.split("-")[0] == stem]
            made.update(selfimprove.generate_paraphrases(handle, part, a.seed, max_tries=a.tries, failures=failures,
                                                         reword=reword, meaning=not a.no_meaning, bank=bank,
                                                         sample_from=a.sample_from, ban_new_names=name_ban,
                                                         **({} if a.subject_led is None
                                                            else {"subject_led": a.subject_led})))
        dt = time.perf_counter() - t0
        passed[(reword, shot, name_ban)] = made
        first = sum(1 for v in made.values() if v[1] == "generated")
        label = ("reworded (question words banned)" if reword else "plain (no ban)") + (
            "" if a.no_meaning else ", meaning check on") + f", {shot} exemplars" + (
            ", new names banned" if name_ban else "")
        print(f"{label}: {n} questions: passed on the first (greedy) try {first} ({first / n:.1%}); "
              f"within {a.tries} tries {len(made)} ({len(made) / n:.1%}); left out {n - len(made)}; {dt:.0f} s")
        reasons: collections.Counter = collections.Counter()
        examples: dict = {}
        for it in items:
            f = failures.get(it.id)
            if not f:
                continue
            texts = f.get("texts") or []
            for r in (f.get("verdict") or {}).get("reasons") or []:
                reasons[r] += 1
                examples.setdefault(r, []).append((it.question, texts[-1] if texts else "?"))
        print("  failure reasons of the left-out items (last try):", dict(reasons) or "none")
        for r, ex in examples.items():
            for q, t in ex[:3]:
                print(f"    [{r}] {q} -> {t}")
        print(f"  passed examples (every {max(1, n // a.show)}-th item):")
        for it in items[:: max(1, n // a.show)]:
            if it.id in made:
                print(f"    {it.question} -> {made[it.id][0]} [{made[it.id][1]}]")
    if len(runs) == 2:
        (ka, kb) = runs
        both = set(passed[ka]) | set(passed[kb])
        print(f"pass rate {ka} / {kb}: {len(passed[ka]) / n:.1%} / {len(passed[kb]) / n:.1%} "
              f"({len(passed[kb]) / max(1, len(passed[ka])):.2f}x); passing with either: {len(both)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
