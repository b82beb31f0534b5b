"""Value optimisation with and without the block replay (backends/editing/values.py, ``_BlockReplay``).

One forget request of builtin:world-facts on the embedded model, MEMIT's last
layer and default value settings; the optimisation runs alternately with the
replay of blocks 0..L and with every block, ``--rounds`` times each, and the
script prints the minimum seconds of each, their ratio, and whether both
paths reached the same NLL and delta norm.

    python benchmarks/bench_value_replay.py [--rounds 2] [--threads 2] [--method memit]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--method", default="memit", choices=("rome", "memit", "alphaedit"))
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from unlearn_tui.backends import data, methods
    from unlearn_tui.backends.editing.locate import templates_for
    from unlearn_tui.backends.editing.values import optimise_value
    from unlearn_tui.backends.model import ModelSpec, load
    from unlearn_tui.backends.subjects import resolve_subject
    from unlearn_tui.backends.targets import build_requests, simple_targets

    h = load(ModelSpec())
    items = data.load_items("builtin:world-facts")[:1]
    req = build_requests(items, simple_targets("idk", items, data.builtin_refusals(), 0), 1)[0]
    m = methods.make(args.method, {})
    layer = m.layers(h)[-1] if hasattr(m, "layers") else m.layer(h)
    templates = templates_for(h, m.params, 0)
    settings = m.params          # the value optimisation reads the method's Params (v_steps, v_lr, ...)
    times: dict[bool, list[float]] = {True: [], False: []}
    last = {}
    for _ in range(args.rounds):
        for replay in (True, False):
            t = time.perf_counter()
            vr = optimise_value(h, layer, req.prompt, resolve_subject(req), req.target, templates, settings,
                                replay_blocks=replay)
            times[replay].append(time.perf_counter() - t)
            last[replay] = vr
    fast, full = min(times[True]), min(times[False])
    print(f"{args.method}, layer {layer} of {h.adapter.n_layers}, {len(templates)} templates + essence, "
          f"{settings.v_steps} steps max, torch threads {args.threads}")
    print(f"with block replay    {fast:.2f} s (replay used: {last[True].replayed}; steps {last[True].steps})")
    print(f"every block each step {full:.2f} s (steps {last[False].steps})")
    print(f"speed-up {full / fast:.2f}x; NLL {last[True].nll:.4f} vs {last[False].nll:.4f}; "
          f"||delta|| {float(last[True].delta.norm()):.3f} vs {float(last[False].delta.norm()):.3f}")


if __name__ == "__main__":
    main()
