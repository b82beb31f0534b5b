"""Fine-tuning unlearning baselines on the embedded model: quality table, seconds per epoch, peak RSS.

Every method runs in its own subprocess (so peak RSS is per method) on the
embedded SmolLM2-135M-Instruct with the built-in demo facts, 10 forget / 10
retain items, default hyper-parameters, ``idk`` refusal targets, and is then
evaluated by the engine's metrics (ROUGE-1 recall of greedy generations).
Printed:

1. the forget / retain / rephrase ROUGE-1 table with the composite
   ``1 - R1(forget) + R1(retain)``, for "none" (the baseline), "ike",
   optionally the editing methods, and ga / gd / kl / dpo / npo / simnpo / undial / rmu, flagging the runs that COLLAPSE the model
   (forget and retain ROUGE-1 both below 0.1);
2. per fine-tuning method: steps, seconds per epoch, peak RSS during apply
   (the kernel's high-water mark is reset after the model is loaded, via
   /proc/self/clear_refs, and read right after apply, before evaluation),
   peak RSS of the whole process and the RSS before apply;
3. KL / DPO / NPO with the precomputed reference (this project) against the
   same run holding a live reference copy (the reference tools' way; apply
   only, ``--memory-steps`` optimisation steps, no evaluation: Adam state,
   gradients and the copy are all allocated by the first step): peak RSS during apply of each and their ratio, and
   whether both runs end on the same training loss.

The editing methods' rows (rome, memit, alphaedit, wise, grace, when present)
are added with ``--with-editing`` (their own benchmarks cover them in depth).

Usage::

    python benchmarks/bench_finetune.py                  # none, ike, the five baselines, memory comparison
    python benchmarks/bench_finetune.py --with-editing   # + rome/memit/alphaedit/wise/grace rows
    python benchmarks/bench_finetune.py --only ga npo     # a subset (no memory section unless asked)
    python benchmarks/bench_finetune.py --only kl --set epochs=2 --memory

Timings depend on the machine's load; quote them with that caveat.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FINETUNE = ["ga", "gd", "kl", "dpo", "npo", "simnpo", "undial", "rmu"]
EDITING = ["rome", "memit", "alphaedit", "wise", "grace"]
WITH_REFERENCE = ["kl", "dpo", "npo"]
FALLBACK_MODEL_DIR = Path(tempfile.gettempdir()) / "unlearn-tui-bench-smollm2"
FALLBACK_DATA = ROOT.parent / "shared" / "data" / "tofu" / "world_facts_perturbed.json"
COLLAPSE = 0.1
REPORT_KEYS = ("steps", "epochs_run", "seconds", "seconds_per_epoch", "stopped", "first_loss", "last_loss",
               "reference", "trained_parameters", "layers", "lr", "tuning")


# --------------------------------------------------------------------------- child process


def _rss_now_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _hwm_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def resolve_model() -> str:
    """The model name children load: the embedded model, or a dequantized copy of it.

    The second is a workaround for builds whose loader cannot write its GGUF
    cache (transformers refuses ``save_pretrained`` on a GGUF-loaded model);
    it is the same weights, dequantized once and saved as safetensors.
    """
    from unlearn_tui.backends.model import ModelSpec, load
    from unlearn_tui.backends.spec import DEFAULT_MODEL

    try:
        load(ModelSpec())
        return DEFAULT_MODEL
    except ValueError as exc:
        if "gguf" not in str(exc).lower():
            raise
    if (FALLBACK_MODEL_DIR / "config.json").is_file():
        return str(FALLBACK_MODEL_DIR)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unlearn_tui.backends.model import builtin_gguf_path

    p = builtin_gguf_path(DEFAULT_MODEL)
    tok = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are dequantized already
    model.save_pretrained(FALLBACK_MODEL_DIR, safe_serialization=True)
    tok.save_pretrained(FALLBACK_MODEL_DIR)
    return str(FALLBACK_MODEL_DIR)


def data_path() -> str:
    from unlearn_tui.backends import data

    if "world-facts" in data.builtin_names():
        return "builtin:world-facts"
    return str(FALLBACK_DATA)


def child(method: str, params: dict, out: str, n_forget: int, n_retain: int, model: str,
          evaluate: bool = True, eval_tokens: int = 32) -> None:
    """One method in this process: load, apply (peak RSS of apply alone), evaluate, roll back."""
    import torch

    from unlearn_tui import sessions
    from unlearn_tui.backends.params import to_dict
    from unlearn_tui.backends.runner import RunResult, Workbench, result_row

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    t0 = time.perf_counter()
    from unlearn_tui.backends.model import ModelSpec, load

    handle = load(ModelSpec(name=model))
    model_source = model
    load_s = time.perf_counter() - t0
    session = sessions.new_session(data={"path": data_path(), "forget": n_forget, "retain": n_retain},
                                   eval={"max_new_tokens": eval_tokens},
                                   runs=[{"method": method, "params": params}])
    wb = Workbench(session, handle=handle)
    wb.load_data()
    wb.prepare()
    rss_before = _rss_now_kb()
    reset = _reset_hwm()
    tx, method_obj, rep, seconds = wb.apply(session.runs[0])   # inside the transaction, like run_one
    hwm_apply = _hwm_kb() if reset else None
    result = {"method": method, "params": params, "model": model, "data": session.data.path,
              "load_seconds": load_s, "apply_seconds": seconds, "report": {k: rep.get(k) for k in REPORT_KEYS},
              "rss_before_apply_mb": rss_before / 1024,
              "peak_apply_mb": None if hwm_apply is None else hwm_apply / 1024}
    if evaluate:
        t1 = time.perf_counter()
        ev = wb.evaluate()
        res = RunResult(0, method, method, to_dict(method_obj.params), session.targets.mode, 1, ev, seconds,
                        time.perf_counter() - t1, rep)
        result.update(row=result_row(res), eval_seconds=res.eval_seconds,
                      samples={s: [(it.question, it.answer, it.generation) for it in ev.splits[s].items[:2]]
                               for s in ev.splits})
    tx.rollback()
    result["peak_process_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(out).write_text(json.dumps(result, default=str))


# --------------------------------------------------------------------------- parent


def run_child(method: str, params: dict, args, evaluate: bool = True) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, __file__, "--child", method, "--params", json.dumps(params), "--out", out,
           "--forget", str(args.forget), "--retain", str(args.retain), "--model", args.model, "--eval-tokens", str(args.eval_tokens)] + ([] if evaluate else ["--no-eval"])
    t0 = time.perf_counter()
    label = method + ("" if not params else " " + json.dumps(params))
    print(f"  running {label} ...", flush=True)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"method": method, "params": params, "error": f"timed out after {args.timeout} s"}
    if proc.returncode != 0:
        tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-3:]
        return {"method": method, "params": params, "error": " | ".join(tail)}
    data = json.loads(Path(out).read_text())
    os.unlink(out)
    data["wall_seconds"] = time.perf_counter() - t0
    return data


def fmt(v, spec=".3f") -> str:
    return "  -  " if v is None else format(v, spec)


def print_table(results: list[dict], header: bool = True) -> None:
    if header:
        print("\n## forget / retain / rephrase ROUGE-1 (greedy generations), composite = 1 - R1(forget) + R1(retain)")
        print(f"{'method':<16} {'forget':>7} {'retain':>7} {'rephrase':>8} {'composite':>9}  note")
    for r in results:
        name = r["method"] + ("" if not r.get("label") else r["label"])
        if "error" in r:
            print(f"{name:<16} {'':>7} {'':>7} {'':>8} {'':>9}  FAILED: {r['error'][:150]}")
            continue
        row = r["row"]
        f, t, p, c = row["forget.rouge1"], row["retain.rouge1"], row["rephrase.rouge1"], row["composite"]
        note = "COLLAPSED (forget and retain R1 < 0.1)" if (r["method"] != "none" and f is not None and
                                                            t is not None and f < COLLAPSE and t < COLLAPSE) else ""
        print(f"{name:<16} {fmt(f):>7} {fmt(t):>7} {fmt(p):>8} {fmt(c):>9}  {note}", flush=True)


def print_perf(results: list[dict]) -> None:
    print("\n## fine-tuning: seconds per epoch and peak RSS (under CPU contention: 2 cores shared)")
    print(f"{'method':<16} {'steps':>5} {'epochs':>6} {'s/epoch':>8} {'apply s':>8} {'peak apply MB':>19} "
          f"{'peak process MB':>16} {'RSS before MB':>14}  stopped")
    for r in results:
        if "error" in r or r["method"] not in FINETUNE:
            continue
        rep = r["report"]
        name = r["method"] + r.get("label", "")
        print(f"{name:<16} {rep['steps']:>5} {fmt(rep['epochs_run'], '.1f'):>6} {fmt(rep['seconds_per_epoch'], '.2f'):>8}"
              f" {fmt(r['apply_seconds'], '.1f'):>8} {fmt(r['peak_apply_mb'], '.0f'):>19} "
              f"{fmt(r['peak_process_mb'], '.0f'):>16} {fmt(r['rss_before_apply_mb'], '.0f'):>14}  {rep['stopped']}")


def print_memory(pre: dict[str, dict], live: dict[str, dict]) -> None:
    print("\n## precomputed reference (no model copy) vs a live reference copy: peak RSS during apply")
    print(f"{'method':<8} {'precomputed MB':>15} {'live copy MB':>13} {'ratio live/pre':>15} {'saved MB':>9} "
          f"{'ref bytes pre':>14} {'same last loss':>14}")
    for m in WITH_REFERENCE:
        a, b = pre.get(m), live.get(m)
        if not a or not b or "error" in a or "error" in b:
            print(f"{m:<8} (missing: {(a or {}).get('error') or (b or {}).get('error') or 'not run'})")
            continue
        pa, pb = a["peak_apply_mb"], b["peak_apply_mb"]
        la, lb = a["report"]["last_loss"], b["report"]["last_loss"]
        same = la is not None and lb is not None and abs(la - lb) <= 1e-3 * max(1.0, abs(la))
        print(f"{m:<8} {fmt(pa, '.0f'):>15} {fmt(pb, '.0f'):>13} {fmt(pb / pa if pa and pb else None, '.2f'):>15} "
              f"{fmt(pb - pa if pa and pb else None, '.0f'):>9} {a['report']['reference'].get('bytes', 0):>14} "
              f"{str(same):>14}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child")
    ap.add_argument("--params", default="{}")
    ap.add_argument("--out")
    ap.add_argument("--forget", type=int, default=10)
    ap.add_argument("--retain", type=int, default=10)
    ap.add_argument("--only", nargs="*", help="methods to run (default: all)")
    ap.add_argument("--set", nargs="*", default=[], help="param overrides key=value (JSON values) for every method")
    ap.add_argument("--memory", action="store_true", help="run the live-reference comparison (default with no --only)")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--json", help="write every child's result here")
    ap.add_argument("--memory-steps", type=int, default=2,
                    help="optimisation steps of the memory-comparison runs (the peak is reached at the first)")
    ap.add_argument("--eval-tokens", type=int, default=32, help="max new tokens of the evaluation generations")
    ap.add_argument("--memory-first", action="store_true", help="run the memory comparison before the table")
    ap.add_argument("--no-table", action="store_true")
    ap.add_argument("--no-eval", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--with-editing", action="store_true", help="also run the editing methods present in this build")
    ap.add_argument("--model", help="model name for the children (default: the embedded model)")
    args = ap.parse_args()
    if args.child:
        child(args.child, json.loads(args.params), args.out, args.forget, args.retain, args.model, not args.no_eval,
              args.eval_tokens)
        return
    if not args.model:
        args.model = resolve_model()

    from unlearn_tui.backends import methods

    overrides = {}
    for kv in args.set:
        k, _, v = kv.partition("=")
        try:
            overrides[k] = json.loads(v)
        except json.JSONDecodeError:
            overrides[k] = v
    present = methods.names()
    editing = [m for m in EDITING if m in present] if args.with_editing else []
    order = ["none"] + FINETUNE + editing + ["ike"]
    chosen = [m for m in order if not args.only or m in args.only]
    print(f"# bench_finetune: {args.forget} forget / {args.retain} retain, methods: {', '.join(chosen)}"
          f"{'; overrides ' + json.dumps(overrides) if overrides else ''}")
    results: list[dict] = []
    live: dict[str, dict] = {}
    pre: dict[str, dict] = {}
    do_memory = (args.memory or not args.only) and not args.no_memory

    def memory() -> None:
        print("\n  memory comparison (apply only):", flush=True)
        for m in WITH_REFERENCE:
            if args.only and m not in args.only:
                continue
            for ref in ("precomputed", "live"):
                r = run_child(m, {**overrides, "reference": ref, "max_steps": args.memory_steps}, args,
                              evaluate=False)
                r["label"] = "/" + ref
                (live if ref == "live" else pre)[m] = r
        print_perf([x for m in pre for x in (pre[m], live.get(m)) if x])
        print_memory(pre, live)

    if do_memory and args.memory_first:
        memory()
    if not args.no_table:
        for m in chosen:
            params = dict(overrides) if m in FINETUNE else {}
            r = run_child(m, params, args)
            results.append(r)
            print_table([r], header=not results[:-1])
        ok = next((r for r in results if "error" not in r), None)
        if ok:
            print(f"model: {ok['model']}; data: {ok['data']}; model load {ok['load_seconds']:.1f} s; "
                  f"eval max_new_tokens {args.eval_tokens}")
        print_table(results)
        print_perf(results)
    if do_memory and not args.memory_first:
        memory()
    for r in results:
        if "error" in r or r["method"] not in FINETUNE:
            continue
        print(f"\n{r['method']} sample generations:")
        for split, rows in r["samples"].items():
            for q, a, g in rows[:1]:
                print(f"  [{split}] {q} (gold: {a}) -> {g[:90]!r}")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "memory_precomputed": pre, "memory_live": live},
                                              indent=1, default=str))


if __name__ == "__main__":
    main()
