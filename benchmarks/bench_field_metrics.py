"""The unlearning field's metrics on the fine-tuned-knowledge setting: every method, one table.

PISTOL (``sample_data_1.json`` of the shared data folder): the embedded model
is fine-tuned on the forget + retain items (``[finetune]``, until ROUGE-1
0.95 or 20 epochs; cached), the forget set is the 20 questions of the first
contract (edge ``A_B``), the retain set the next ``--retain`` items, the
holdout (membership non-members) the next ``--holdout`` items, never trained
on.  The retain-only model (forget quality, PrivLeak) is the same fine-tune
without the forget items.  Every method then runs from the fine-tuned model
with its default hyper-parameters and ``idk`` targets, and is scored with
``[eval] extra = [every extra]``.

Printed: per method forget / retain ROUGE-1, forget probability, forget
quality, model utility, PrivLeak, the Min-K% AUC, the relearning attack
(held-out forget R1 before → after), the multiple-choice accuracy on the
forget questions, the in-context forget R1, perplexity of the held text and
the edit seconds; then the seconds each extra adds to an evaluation (median
over the runs) beside the plain evaluation's.

Resumable: each finished run is a line of ``OUT/runs.jsonl``; a second call
skips them (``--fresh`` starts over).

Usage::

    python benchmarks/bench_field_metrics.py --out /tmp/field         # the embedded model, every method
    python benchmarks/bench_field_metrics.py --methods none,rome,npo   # a subset
    python benchmarks/bench_field_metrics.py --methods "rmu,rmu@alpha=100@lr=1e-3" --extras none  # params, no extras
    python benchmarks/bench_field_metrics.py --model tiny:llama --retain 8 --holdout 4 --forget 4  # smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EXTRAS = ["mia", "forget_quality", "model_utility", "perplexity", "relearn", "mcq", "in_context"]
METHODS = ["none", "ike", "rome", "memit", "alphaedit", "wise", "grace", "ga", "gd", "kl", "dpo", "npo",
           "simnpo", "undial", "rmu"]


def session_text(a: argparse.Namespace, ids: list[str]) -> str:
    forget = ids[: a.forget]
    retain = ids[a.forget: a.forget + a.retain]
    holdout = ids[a.forget + a.retain: a.forget + a.retain + a.holdout]
    q = lambda xs: "[" + ", ".join(json.dumps(x) for x in xs) + "]"  # noqa: E731
    return (f'version = 1\n[model]\nname = {json.dumps(a.model)}\n'
            f'[data]\npath = {json.dumps(str(a.data))}\nformat = "pistol"\nforget = {q(forget)}\n'
            f'retain = {q(retain)}\nrephrase = false\n'
            f'[targets]\nmode = "idk"\n'
            f'[eval]\nmax_new_tokens = {a.max_new_tokens}\nextra = {q(a.extras)}\nholdout = {q(holdout)}\n'
            f'utility_items = {a.utility_items}\n'
            f'[finetune]\ndata = "forget+retain"\n'
            f'[[runs]]\nmethod = "none"\n')


def main(argv: list[str] | None = None) -> int:
    from benchmarks.common import machine_line

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "pistol" / "sample_data_1.json")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--forget", type=int, default=20)
    p.add_argument("--retain", type=int, default=60)
    p.add_argument("--holdout", type=int, default=20)
    p.add_argument("--utility-items", type=int, default=40, help="items per TOFU model-utility set")
    p.add_argument("--max-new-tokens", type=int, default=16,
                   help="greedy tokens per answer (PISTOL's answers are dates, names and amounts of <= 10 tokens)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated; METHOD@KEY=VALUE@... sets hyper-parameters (values as TOML), "
                        "the whole string names the row")
    p.add_argument("--extras", default=",".join(EXTRAS), help='comma-separated extras, or "none"')
    p.add_argument("--out", type=Path, default=Path("/tmp/unlearn-tui-field"))
    p.add_argument("--fresh", action="store_true")
    a = p.parse_args(argv)
    a.extras = [] if a.extras.strip() == "none" else [x.strip() for x in a.extras.split(",") if x.strip()]
    if not a.data.is_file():
        print(f"skipped: {a.data} not found (the shared PISTOL data)")
        return 0
    import torch

    from unlearn_tui.backends import data, events
    from unlearn_tui.backends.runner import Workbench
    from unlearn_tui.backends.spec import RunConfig
    from unlearn_tui.sessions import loads

    items = data.load_items(str(a.data), format="pistol")
    ids = [it.id for it in items]
    a.out.mkdir(parents=True, exist_ok=True)
    text = session_text(a, ids)
    (a.out / "session.toml").write_text(text)
    runs_file = a.out / "runs.jsonl"
    if a.fresh and runs_file.exists():
        runs_file.unlink()
    done = {json.loads(line)["method"]: json.loads(line) for line in runs_file.read_text().splitlines()} \
        if runs_file.exists() else {}
    print(machine_line())
    print(f"data {a.data.name}: forget {a.forget} (ids {ids[0]}..{ids[a.forget - 1]}), retain {a.retain}, "
          f"holdout {a.holdout}; utility sets {a.utility_items} items each; extras {', '.join(a.extras) or 'none'}")

    last = [0.0]

    def on_event(e) -> None:
        now = time.perf_counter()
        if isinstance(e, events.Log):
            print(f"  log: {e.message}", flush=True)
        elif isinstance(e, events.Progress) and (now - last[0] > 30 or e.done == e.total):
            last[0] = now
            print(f"  {e.stage} {e.done}/{e.total}", flush=True)

    session = loads(text, a.out / "session.toml")
    wb = Workbench(session, on_event)
    t0 = time.perf_counter()
    wb.load_data()
    wb.load_model()
    p_ = wb.prepare()
    if "(baseline)" not in done:
        t1 = time.perf_counter()
        base = wb.evaluate(p_)
        row = {"method": "(baseline)", "summary": base.summary(), "extra": base.extras_json(),
               "eval_seconds": time.perf_counter() - t1, "seconds": 0.0}
        done["(baseline)"] = row
        with runs_file.open("a") as f:
            f.write(json.dumps(row) + "\n")
    for i, m in enumerate(x.strip() for x in a.methods.split(",") if x.strip()):
        if m in done:
            continue
        print(f"run {m} ...", flush=True)
        try:
            method, params = parse_method(m)
            r = wb.run_one(i, RunConfig(method, params, m), len(METHODS))
        except Exception as exc:   # one method's failure is a row, not the end of the benchmark
            print(f"  {m} failed: {type(exc).__name__}: {exc}")
            continue
        row = {"method": m, "summary": r.eval.summary(), "extra": r.eval.extras_json(),
               "eval_seconds": r.eval_seconds, "seconds": r.seconds}
        done[m] = row
        with runs_file.open("a") as f:
            f.write(json.dumps(row) + "\n")
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    info = wb.finetune_info
    if info is not None:
        print(f"\nfine-tune: ROUGE-1 {info.rouge1} after {info.epochs} epochs ({info.seconds:.0f} s when trained; "
              f"cached {info.cached})")
    print(f"total {time.perf_counter() - t0:.0f} s this call")
    print_table(list(done.values()))
    return 0


def parse_method(spec: str) -> tuple[str, dict]:
    """``"rmu@alpha=100@lr=1e-3"`` -> ``("rmu", {"alpha": 100, "lr": 0.001})`` (values read as TOML)."""
    from unlearn_tui.backends.compat import tomllib

    method, *pairs = spec.split("@")
    params = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        params[key.strip()] = tomllib.loads(f"v = {value.strip()}")["v"]
    return method.strip(), params


def _f(v, fmt: str = "{:.3f}") -> str:
    return "—" if v is None else fmt.format(v)


def print_table(rows: list[dict]) -> None:
    head = ["method", "fgt R1", "ret R1", "fgt P", "FQ", "MU", "privleak", "MinK AUC", "relearn b→a", "MCQ acc",
            "ICL R1", "ppl", "edit s"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        s, x = r["summary"], r["extra"]
        mia = x.get("mia") or {}
        rl = x.get("relearn") or {}
        cells = [r["method"], _f(s.get("forget", {}).get("rouge1")), _f(s.get("retain", {}).get("rouge1")),
                 _f(s.get("forget", {}).get("probability")), _f(x.get("forget_quality"), "{:.2g}"),
                 _f(x.get("model_utility")), _f(mia.get("privleak"), "{:+.1f}"), _f(mia.get("mink_auc")),
                 f"{_f(rl.get('before'), '{:.2f}')}→{_f(rl.get('after'), '{:.2f}')}",
                 _f(s.get("mcq", {}).get("top_hit")), _f(s.get("in_context", {}).get("rouge1")),
                 _f(x.get("perplexity"), "{:.1f}"), _f(r.get("seconds"), "{:.0f}")]
        print("| " + " | ".join(cells) + " |")
    costs: dict[str, list[float]] = {}
    for r in rows:
        for k, v in (r["extra"].get("extra_seconds") or {}).items():
            costs.setdefault(k, []).append(v)
    plain = [r["eval_seconds"] - sum((r["extra"].get("extra_seconds") or {}).values()) for r in rows]
    print("\nseconds each extra adds to one evaluation (median over the rows; plain evaluation "
          f"{statistics.median(plain):.1f} s):")
    for k, v in costs.items():
        print(f"  {k:15s} {statistics.median(v):7.1f} s  (min {min(v):.1f}, max {max(v):.1f})")


if __name__ == "__main__":
    raise SystemExit(main())
