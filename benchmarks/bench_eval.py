"""Evaluation throughput on the embedded model: batched path vs one item at a time.

Usage: python benchmarks/bench_eval.py [--model NAME] [--items 32] [--batch 16] [--repeats 5] [--stats-only]
                                      [--rev d29ab26]
Both compute the same metrics (generation + teacher-forced pass): ``evaluate``
on all items at once, and a loop calling it for one item at a time; the script
also checks that they agree (``--data`` picks the items, e.g. the TOFU file).

It also times the teacher-forced pass alone (``answer_stats`` on every gold and
perturbed answer) against the version committed at ``--rev`` (default d29ab26,
before the speed work; ``git show REV:backends/generation.py``, imported from a temporary file), side by side
in one run: medians over ``--repeats`` and the ratio, plus the largest
difference in the scores.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_line  # noqa: E402


def _generation_at(rev: str):
    """backends/generation.py as committed at ``rev``, as a module of the package (its relative imports work)."""
    root = Path(__file__).resolve().parents[1]
    src = subprocess.run(["git", "show", f"{rev}:backends/generation.py"], cwd=root, capture_output=True, text=True,
                         check=True).stdout
    tmp = Path(tempfile.mkdtemp()) / "generation_head.py"
    tmp.write_text(src)
    spec = importlib.util.spec_from_file_location("unlearn_tui.backends._generation_head", tmp)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def bench_answer_stats(h, items, batch: int, repeats: int, rev: str = "d29ab26") -> None:
    from unlearn_tui.backends.generation import answer_stats

    before = _generation_at(rev).answer_stats
    old = f"before ({rev})"
    pairs = []
    for it in items:
        p = h.prompt_ids(it.question)
        pairs.append((p, h.encode_answer(it.answer)))
        pairs += [(p, h.encode_answer(w)) for w in getattr(it, "perturbed_answers", None) or []]
    n_tok = sum(len(p) + len(a) for p, a in pairs)
    print(f"answer_stats: {len(pairs)} pairs, {n_tok} tokens, batch {batch}, {repeats} repeats")
    before(h, pairs[:4], batch_size=batch)
    answer_stats(h, pairs[:4], batch_size=batch)  # warm-up
    times: dict[str, list[float]] = {old: [], "after": []}
    outs = {}
    for _ in range(repeats):  # interleaved, so drift in the machine's load hits both alike
        for label, fn in ((old, before), ("after", answer_stats)):
            t = time.perf_counter()
            outs[label] = fn(h, pairs, batch_size=batch)
            times[label].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"  {k:18s} median {v * 1000:8.1f} ms  ({len(pairs) / v:8.1f} pairs/s; runs "
              f"{', '.join(f'{x * 1000:.0f}' for x in times[k])} ms)")
    print(f"  ratio before/after: {med[old] / med['after']:.2f}x")
    a, b = outs[old], outs["after"]
    dp = max(abs(x.probability - y.probability) for x, y in zip(a, b))
    dl = max(abs(x.mean_logprob - y.mean_logprob) for x, y in zip(a, b))
    dm = max(abs(x.mrr - y.mrr) for x, y in zip(a, b))
    same_hit = all(x.top_hit == y.top_hit and x.n_tokens == y.n_tokens for x, y in zip(a, b))
    print(f"  agreement: max |d probability| {dp:.2e}, max |d mean_logprob| {dl:.2e}, max |d mrr| {dm:.2e}, "
          f"identical top_hit/n_tokens {same_hit}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--model", default=None, help="model name (default: the embedded model), e.g. tiny:llama")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--stats-only", action="store_true", help="time answer_stats only (no generation)")
    ap.add_argument("--rev", default="d29ab26", help="git revision whose answer_stats is the 'before' side")
    ap.add_argument("--data", default="builtin:world-facts",
                    help="items to evaluate, e.g. ../shared/data/tofu/world_facts_perturbed.json")
    args = ap.parse_args()
    from unlearn_tui.backends.data import load_items
    from unlearn_tui.backends.metrics import EvalSettings, evaluate
    from unlearn_tui.backends.model import ModelSpec, load

    h = load(ModelSpec(name=args.model) if args.model else ModelSpec())
    items = load_items(args.data)[: args.items]
    print(machine_line())
    print(f"model {h.name} on {h.device}; {len(items)} items, max_new_tokens {args.max_new_tokens}")
    bench_answer_stats(h, items, args.batch, args.repeats, args.rev)
    if args.stats_only:
        return
    evaluate(h, {"forget": items[:2]}, EvalSettings(8, 2))  # warm-up
    t = time.perf_counter()
    batched = evaluate(h, {"forget": items}, EvalSettings(args.max_new_tokens, args.batch))
    tb = time.perf_counter() - t
    t = time.perf_counter()   # a one-item loop: each item evaluated on its own, as a script without batching does
    single_items = [evaluate(h, {"forget": [it]}, EvalSettings(args.max_new_tokens, 1)).splits["forget"].items[0]
                    for it in items]
    ts = time.perf_counter() - t
    from unlearn_tui.backends.metrics import SplitScores

    fb, fs = batched.splits["forget"], SplitScores("forget", single_items)
    same_gen = sum(a.generation == b.generation for a, b in zip(fb.items, fs.items))
    print(f"batched (batch {args.batch}): {len(items) / tb:.2f} items/s ({tb:.1f} s)")
    print(f"one at a time:        {len(items) / ts:.2f} items/s ({ts:.1f} s)")
    print(f"speed-up: {ts / tb:.1f}x")
    print(f"agreement: identical generations {same_gen}/{len(items)}; ROUGE-1 {fb.rouge1:.3f} vs {fs.rouge1:.3f}; "
          f"probability {fb.mean('probability'):.4f} vs {fs.mean('probability'):.4f}")


if __name__ == "__main__":
    main()
