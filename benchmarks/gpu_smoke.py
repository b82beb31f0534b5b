"""GPU readiness smoke test: six methods on a few built-in facts, timed, with peak GPU memory and scores.

    python benchmarks/gpu_smoke.py                         # the embedded SmolLM2 model, bf16, 10 facts
    python benchmarks/gpu_smoke.py --model /models/llama-3-8b --device-map auto
    python benchmarks/gpu_smoke.py --device cpu --model tiny:llama --facts 2     # CPU dry run (seconds)

Loads the model (a built-in name, a local Hugging Face folder, a .gguf file or
a hub id; the GPU machine has no internet, so a local folder or the embedded
GGUF is what works there), forgets ``--facts`` facts of ``builtin:world-facts``
with "I don't know"-style targets (``targets.mode = "idk"``) and the same
number of retain facts, and runs ROME, MEMIT, AlphaEdit, WISE, GRACE and GD
each from the unedited weights (one transaction per method, rolled back after
its evaluation).  Prints the device and dtype actually used, seconds per
edit, ``torch.cuda.max_memory_allocated`` (reset per method; edit and
evaluation), where the float64 solves ran, and the score table (forget /
retain / rephrase ROUGE-1, composite).  Exits 1 when any edited weight or
wrapper state, or any score, is not finite, when a method fails, or when
the weights are not restored bit for bit at the end.

Method settings are the methods' defaults (layers chosen by depth) on a real
model; on a ``tiny:`` model (the dry run) short optimisations and a small
statistics budget keep it to seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # as the other benchmarks (benchmarks.common)

METHODS = ("rome", "memit", "alphaedit", "wise", "grace", "gd")
DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
          "fp32": "float32", "float32": "float32", "auto": "auto"}
# the dry run on a tiny random model: a few optimisation steps, a small key-statistics budget
TINY_PARAMS = {
    "rome": {"v_steps": 6, "templates": 0, "token_budget": 512},
    "memit": {"v_steps": 6, "templates": 0, "token_budget": 512},
    "alphaedit": {"v_steps": 6, "templates": 0, "token_budget": 512},
    "wise": {"n_iter": 4},
    "grace": {"n_iter": 6},
    "gd": {"epochs": 1, "max_steps": 2},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct",
                    help="built-in name, local model folder, .gguf file or hub id (default: the embedded model)")
    ap.add_argument("--facts", type=int, default=10, help="facts to forget (and as many to retain)")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="weights dtype (default bf16)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (without --device-map)")
    ap.add_argument("--device-map", default=None,
                    help='accelerate placement: auto | balanced | balanced_low_0 | sequential | a JSON table '
                         '{"module": "device", ...}')
    ap.add_argument("--max-memory", default=None, help='with --device-map: JSON {"0": "70GiB", "cpu": "64GiB"}')
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    ap.add_argument("--max-new-tokens", type=int, default=32, help="generation length of the evaluation")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    return ap.parse_args(argv)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(float(x))


def _state_tensors(w) -> dict:
    import torch

    get = getattr(w, "get_state", None)
    state = get() if get is not None else {}
    return {k: v for k, v in (state.items() if isinstance(state, dict) else []) if isinstance(v, torch.Tensor)}


def _non_finite_edits(handle, tx) -> list[str]:
    """Names of the edited parameters and wrapper-state tensors holding a NaN or inf."""
    import torch

    bad = [n for n in tx.names if not bool(torch.isfinite(handle.parameter(n)).all())]
    for w in handle.wrappers:
        for k, v in _state_tensors(w).items():
            if (v.is_floating_point() and v.numel() and not bool(torch.isfinite(v).all())):
                bad.append(f"{getattr(w, 'name', type(w).__name__)}.{k}")
    return bad


def _fmt(x, width: int = 8, digits: int = 3) -> str:
    if x is None:
        return "-".rjust(width)
    if isinstance(x, float):
        return f"{x:.{digits}f}".rjust(width)
    return str(x).rjust(width)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from unlearn_tui.backends.editing.linalg import solve_device
    from unlearn_tui.backends.errors import UserError
    from unlearn_tui.backends.model import state_hash
    from unlearn_tui.backends.runner import RunResult, Workbench, result_row
    from unlearn_tui.backends.spec import RunConfig, new_session

    names = [m.strip().lower() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        print(f"unknown method(s) {', '.join(unknown)}; expected some of {', '.join(METHODS)}", file=sys.stderr)
        return 2
    cuda = torch.cuda.is_available()
    print(f"torch {torch.__version__}, CUDA {'yes: ' + torch.cuda.get_device_name(0) if cuda else 'no'}"
          f"{f' ({torch.cuda.device_count()} device(s))' if cuda else ''}")
    if not cuda:
        print("note: no CUDA here; this is a CPU dry run (peak GPU memory is not measured)")
    tiny = args.model.startswith("tiny:")
    model_cfg = {"name": args.model, "device": args.device, "dtype": DTYPES[args.dtype]}
    if args.device_map:
        dm = args.device_map.strip()
        model_cfg["device_map"] = json.loads(dm) if dm.startswith("{") else dm
        model_cfg["device"] = "auto"
        if args.max_memory:
            model_cfg["max_memory"] = json.loads(args.max_memory)
    runs = [RunConfig(m, dict(TINY_PARAMS[m]) if tiny else {}) for m in names]
    session = new_session(model=model_cfg,
                          data={"path": "builtin:world-facts", "forget": args.facts, "retain": args.facts},
                          targets={"mode": "idk"}, eval={"max_new_tokens": args.max_new_tokens}, runs=runs)
    wb = Workbench(session)
    problems: list[str] = []
    try:
        t0 = time.perf_counter()
        wb.load_data()
        handle = wb.load_model()
        load_s = time.perf_counter() - t0
        p = wb.prepare()
    except UserError as e:
        print(f"error: {e.where + ': ' if e.where else ''}{e.message}", file=sys.stderr)
        return 1
    dtype = str(handle.dtype).replace("torch.", "")
    where = f"device {handle.input_device}, dtype {dtype}" + (f"; {handle.placement()}" if handle.device_map else "")
    print(f"model {handle.name}: {where}; loaded in {load_s:.1f}s")
    layer = handle.adapter.n_layers // 2
    print(f"float64 solves for layer {layer} run on {solve_device(handle.layer_device(layer))} "
          f"(the layer is on {handle.layer_device(layer)})")
    print(f"{len(p.forget)} forget, {len(p.retain)} retain, {len(p.rephrase)} rephrase items; "
          f"{len(p.requests)} edit requests")
    base_hash = state_hash(handle.model)
    t1 = time.perf_counter()
    baseline = wb.evaluate(p)
    print(f"baseline evaluated in {time.perf_counter() - t1:.1f}s")

    rows = []
    for i, run_cfg in enumerate(runs):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        row: dict = {"method": run_cfg.method}
        try:
            tx, method, report, seconds = wb.apply(run_cfg, list(p.requests), index=i)
            try:
                if cuda:
                    torch.cuda.synchronize()
                    row["peak_edit_mib"] = torch.cuda.max_memory_allocated() / 2**20
                bad = _non_finite_edits(handle, tx)
                if bad:
                    problems.append(f"{run_cfg.method}: non-finite {', '.join(bad[:5])}")
                row["edited"] = len(tx.names) + sum(len(_state_tensors(w)) for w in handle.wrappers)
                t2 = time.perf_counter()
                ev = wb.evaluate(p)
                eval_s = time.perf_counter() - t2
            finally:
                tx.rollback()
            if cuda:
                torch.cuda.synchronize()
                row["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
            res = RunResult(i, run_cfg.method, run_cfg.method, {}, session.targets.mode,
                            session.targets.merge_factor, ev, seconds, eval_s, report)
            flat = result_row(res)
            row.update({"s_per_edit": seconds / max(1, len(p.requests)), "seconds": seconds, "eval_s": eval_s,
                        "forget": flat.get("forget.rouge1"), "retain": flat.get("retain.rouge1"),
                        "rephrase": flat.get("rephrase.rouge1"), "composite": flat.get("composite")})
            for k in ("forget", "retain", "composite") + (("rephrase",) if p.rephrase else ()):
                if not _finite(row[k]):
                    problems.append(f"{run_cfg.method}: score {k} is {row[k]!r}")
        except Exception as exc:  # noqa: BLE001 - a smoke test reports every failure and goes on
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            problems.append(f"{run_cfg.method}: {type(exc).__name__}: {first[:200]}")
            row["error"] = first[:200]
            traceback.print_exc(file=sys.stderr)
        rows.append(row)
        print(f"  {run_cfg.method}: {row.get('seconds', float('nan')):.2f}s"
              + (f", peak {row['peak_mib']:.0f} MiB" if "peak_mib" in row else "")
              + (f"  ERROR {row['error']}" if "error" in row else ""), flush=True)

    if state_hash(handle.model) != base_hash:
        problems.append("the weights were not restored bit for bit after the runs")

    base = result_row(RunResult(-1, "baseline", "baseline", {}, session.targets.mode, session.targets.merge_factor,
                                baseline, 0.0, 0.0, {}))
    print()
    head = (f"{'method':<10}{'s/edit':>8}{'peak MiB':>10}{'edit MiB':>10}{'forget':>8}{'retain':>8}"
            f"{'rephrase':>9}{'composite':>10}")
    print(head)
    print("-" * len(head))
    print(f"{'baseline':<10}{_fmt(None)}{_fmt(None, 10)}{_fmt(None, 10)}{_fmt(base.get('forget.rouge1'))}"
          f"{_fmt(base.get('retain.rouge1'))}{_fmt(base.get('rephrase.rouge1'), 9)}{_fmt(base.get('composite'), 10)}")
    for r in rows:
        print(f"{r['method']:<10}{_fmt(r.get('s_per_edit'), 8, 2)}{_fmt(r.get('peak_mib'), 10, 0)}"
              f"{_fmt(r.get('peak_edit_mib'), 10, 0)}{_fmt(r.get('forget'))}{_fmt(r.get('retain'))}"
              f"{_fmt(r.get('rephrase'), 9)}{_fmt(r.get('composite'), 10)}")
    print("(ROUGE-1 recall of the greedy answers against the original answers: forget low, retain high; "
          "peak = torch.cuda.max_memory_allocated over edit + evaluation, edit = over the edit alone)")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": handle.name, "device": str(handle.input_device),
                                               "dtype": dtype, "baseline": base, "rows": rows}, indent=2,
                                              default=str))
    if problems:
        print("\nFAILED:")
        for line in problems:
            print(f"  {line}")
        return 1
    print("\nall weights and scores finite; weights restored bit for bit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
