"""Value optimisation paths (backends/editing/values.py): one batch per step or one row at a time, block replay or not.

One forget request of builtin:world-facts on the embedded model, MEMIT's last
layer (``--method rome``: ROME's layer) and default value settings; the
optimisation runs alternately with each of the four paths — all rows (context
templates + essence prompt) in ONE padded forward per step or one forward per
row, blocks 0..L replayed from recordings or every block run — ``--rounds``
times each, and the script prints the minimum seconds of each, the ratio to
the slowest path (rows one at a time, every block: the computation before the
batching), the steps taken and why the loop stopped, and whether every path
reached the same NLL and delta norm.  ``--no-stop`` runs all ``v_steps``
(times the step itself, without the early stop).  The one-time checks of the
batched step and of the replay (once per loaded model) run first, untimed.

    python benchmarks/bench_value_replay.py [--rounds 2] [--threads 2] [--method memit] [--no-stop]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PATHS = ((True, True), (True, False), (False, True), (False, False))   # (batch_rows, replay_blocks)


def label(batch: bool, replay: bool) -> str:
    return f"{'one batch' if batch else 'row by row'}, {'block replay' if replay else 'every block'}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--method", default="memit", choices=("rome", "memit", "alphaedit"))
    ap.add_argument("--no-stop", action="store_true", help="run all v_steps (no early stop)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from unlearn_tui.backends import data, methods
    from unlearn_tui.backends.editing import values
    from unlearn_tui.backends.editing.locate import templates_for
    from unlearn_tui.backends.model import ModelSpec, load
    from unlearn_tui.backends.subjects import resolve_subject
    from unlearn_tui.backends.targets import build_requests, simple_targets

    if args.no_stop:
        values.stop_reason = lambda *a, **k: ""
    h = load(ModelSpec())
    items = data.load_items("builtin:world-facts")[:1]
    req = build_requests(items, simple_targets("idk", items, data.builtin_refusals(), 0), 1)[0]
    m = methods.make(args.method, {})
    layer = m.layers(h)[-1] if hasattr(m, "layers") else m.layer(h)
    templates = templates_for(h, m.params, 0)
    settings = m.params          # the value optimisation reads the method's Params (v_steps, v_lr, ...)
    import dataclasses

    # the one-time checks (padded batch vs one row at a time, replay vs every block) are made per loaded model:
    # made here, untimed
    values.optimise_value(h, layer, req.prompt, resolve_subject(req), req.target, templates,
                          dataclasses.replace(settings, v_steps=1))
    times: dict[tuple, list[float]] = {p: [] for p in PATHS}
    last = {}
    for _ in range(args.rounds):
        for batch, replay in PATHS:
            t = time.perf_counter()
            vr = values.optimise_value(h, layer, req.prompt, resolve_subject(req), req.target, templates, settings,
                                       replay_blocks=replay, batch_rows=batch)
            times[(batch, replay)].append(time.perf_counter() - t)
            last[(batch, replay)] = vr
    slow = min(times[(False, False)])
    print(f"{args.method}, layer {layer} of {h.adapter.n_layers}, {len(templates)} templates + essence, "
          f"{settings.v_steps} steps max{' (no early stop)' if args.no_stop else ''}, torch threads {args.threads}, "
          f"{h.device}, {h.dtype}")
    for p in PATHS:
        vr = last[p]
        best = min(times[p])
        print(f"  {label(*p):28s} {best:7.2f} s  {slow / best:5.2f}x  (used: batched {vr.batched}, replay "
              f"{vr.replayed}; steps {vr.steps}, stopped {vr.stopped or '-'}; NLL {vr.nll:.4f}, "
              f"||delta|| {float(vr.delta.norm()):.3f})")


if __name__ == "__main__":
    main()
