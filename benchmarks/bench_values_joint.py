"""MEMIT's value optimisation: every request alone vs several requests sharing one forward per step.

Usage::

    python benchmarks/bench_values_joint.py [--facts 10] [--rounds 2] [--threads 1] [--method memit]
                                            [--max-rows 48]

The first ``--facts`` built-in facts (``idk`` targets) on the embedded model, the method's last layer and
its default value settings (``values.optimise_values``): ``joint`` (the requests' rows in one batch, at
most ``--max-rows`` rows together) and one request at a time alternate for ``--rounds`` rounds.  The
one-time checks of the batched step and the block replay run first, untimed.  Printed per run: seconds,
steps per request, the mean final NLL; then the medians and their ratio, and the largest relative
difference of the deltas (the two must agree up to rounding).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--facts", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--method", default="memit", choices=("memit", "alphaedit"))
    ap.add_argument("--max-rows", type=int, default=None)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from unlearn_tui.backends import data, methods
    from unlearn_tui.backends.editing import values
    from unlearn_tui.backends.editing.locate import _members, templates_for
    from unlearn_tui.backends.model import ModelSpec, load
    from unlearn_tui.backends.targets import build_requests, simple_targets

    h = load(ModelSpec())
    items = data.load_items("builtin:world-facts")[:args.facts]
    reqs = build_requests(items, simple_targets("idk", items, data.builtin_refusals(), 0), 1)
    m = methods.make(args.method, {})
    layer = m.layers(h)[-1]
    templates = templates_for(h, m.params, 0)
    members = [_members(r, m.params) for r in reqs]
    rows = args.max_rows or values.JOINT_ROWS
    values.optimise_values(h, layer, members[:1], templates, dataclasses.replace(m.params, v_steps=1))  # checks
    times: dict[bool, list[float]] = {True: [], False: []}
    last: dict[bool, list] = {}
    for _ in range(args.rounds):
        for joint in (True, False):
            t = time.perf_counter()
            res = values.optimise_values(h, layer, members, templates, m.params, joint=joint, max_rows=rows)
            dt = time.perf_counter() - t
            times[joint].append(dt)
            last[joint] = res
            print(f"  {'together' if joint else 'one at a time':14s} {dt:7.2f} s  steps {[r.steps for r in res]}  "
                  f"mean NLL {sum(r.nll for r in res) / len(res):.4f}", flush=True)
    a, b = statistics.median(times[True]), statistics.median(times[False])
    diff = max(float((x.delta - y.delta).norm()) / max(1e-12, float(y.delta.norm()))
               for x, y in zip(last[True], last[False]))
    print(f"{args.method}, layer {layer}, {len(reqs)} requests, {len(templates)} templates + essence, at most {rows} "
          f"rows together, {args.threads} thread(s), {h.device}: median together {a:.2f} s, one at a time {b:.2f} s, "
          f"ratio {b / a:.2f}x; deltas differ by at most {diff:.1e} (relative)")


if __name__ == "__main__":
    main()
