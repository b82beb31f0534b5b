"""Evaluation throughput on the embedded model: batched path vs one item at a time.

Usage: python benchmarks/bench_eval.py [--items 32] [--batch 16]
Both paths compute the same metrics (generation + one teacher-forced pass); the
script also checks that they agree.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_line  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    args = ap.parse_args()
    from unlearn_tui.backends.data import load_items
    from unlearn_tui.backends.metrics import EvalSettings, evaluate
    from unlearn_tui.backends.model import ModelSpec, load

    h = load(ModelSpec())
    items = load_items("builtin:world-facts")[: args.items]
    print(machine_line())
    print(f"model {h.name} on {h.device}; {len(items)} items, max_new_tokens {args.max_new_tokens}")
    evaluate(h, {"forget": items[:2]}, EvalSettings(8, 2))  # warm-up
    t = time.perf_counter()
    batched = evaluate(h, {"forget": items}, EvalSettings(args.max_new_tokens, args.batch))
    tb = time.perf_counter() - t
    t = time.perf_counter()
    single = evaluate(h, {"forget": items}, EvalSettings(args.max_new_tokens, 1))
    ts = time.perf_counter() - t
    fb, fs = batched.splits["forget"], single.splits["forget"]
    same_gen = sum(a.generation == b.generation for a, b in zip(fb.items, fs.items))
    print(f"batched (batch {args.batch}): {len(items) / tb:.2f} items/s ({tb:.1f} s)")
    print(f"one at a time:        {len(items) / ts:.2f} items/s ({ts:.1f} s)")
    print(f"speed-up: {ts / tb:.1f}x")
    print(f"agreement: identical generations {same_gen}/{len(items)}; ROUGE-1 {fb.rouge1:.3f} vs {fs.rouge1:.3f}; "
          f"probability {fb.mean('probability'):.4f} vs {fs.mean('probability'):.4f}")


if __name__ == "__main__":
    main()
