"""Lifelong unlearning benchmark: WISE and GRACE over 10 and 40 sequential forget edits.

Embedded model (SmolLM2-135M-Instruct), built-in world facts, ``idk`` targets.
For each method and each sequence length N (one ``apply`` with N requests,
applied one after another, starting from the unedited model):

* seconds per edit and the process's peak RSS,
* forget / retain / rephrase ROUGE-1 (greedy generations) vs the baseline,
* WISE: the share of queries routed to the side memory per split (per-item
  routing is in ``--items``); GRACE: the share of queries inside a ball,
* inference overhead: generation throughput (new tokens/s) with the adaptor
  installed vs the same model with it taken off, measured alternately
  (3 rounds, medians) so load changes hit both sides.

The retain split is the same 20 items (41..60 of the set) for every N.

    python benchmarks/bench_lifelong.py --method wise --sizes 10 40
    python benchmarks/bench_lifelong.py --method grace --sizes 10 40 --items

Torch runs single-threaded by default (``--threads``): on a small shared
machine a second intra-op thread only adds contention.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REFERENCE = {"wise": {"s_per_edit": 157.0, "forget_rouge1": 1.0},
             "grace": {"s_per_edit": 3.5, "forget_rouge1": 1.0}}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def load_model():
    from unlearn_tui.backends.errors import UserError
    from unlearn_tui.backends.model import ModelSpec, load

    try:
        return load(ModelSpec())
    except (ValueError, UserError) as exc:  # the GGUF cache writer can fail on some transformers versions
        print(f"# backends.model.load failed ({str(exc).splitlines()[0][:120]}); converting the GGUF locally",
              flush=True)
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unlearn_tui.backends.model import builtin_gguf_path

    out = Path(tempfile.gettempdir()) / "bench-lifelong-smollm2"
    if not (out / "config.json").is_file():
        p = builtin_gguf_path("smollm2-135m-instruct")
        tok = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
        m = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32)
        m.hf_quantizer = None
        if hasattr(m.config, "quantization_config"):
            del m.config.quantization_config
        m.save_pretrained(out)
        tok.save_pretrained(out)
    return load(ModelSpec(name=str(out)))


def throughput(handle, prompts, new_tokens: int) -> float:
    from unlearn_tui.backends.generation import generate

    t = time.perf_counter()
    generate(handle, prompts, max_new_tokens=new_tokens, batch_size=len(prompts))
    return len(prompts) * new_tokens / (time.perf_counter() - t)


def overhead(handle, prompts, new_tokens: int, rounds: int = 3) -> tuple[float, float]:
    """(median tok/s with the adaptors installed, median without), measured alternately.

    The adaptors are taken off and put back between measurements (same model,
    same prompts, interleaved), so a change of the machine's load hits both
    sides alike instead of biasing the ratio.
    """
    import statistics

    wrappers = list(handle.wrappers)
    on, off = [], []
    throughput(handle, prompts, 4)  # warm-up
    for _ in range(rounds):
        on.append(throughput(handle, prompts, new_tokens))
        for w in wrappers:
            handle.remove_wrapper(w)
        try:
            off.append(throughput(handle, prompts, new_tokens))
        finally:
            for w in wrappers:
                handle.add_wrapper(w)
    return statistics.median(on), statistics.median(off)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", choices=("wise", "grace"), required=True)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 40])
    ap.add_argument("--retain", type=int, default=20)
    ap.add_argument("--params", default="{}", help="JSON of method parameters")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0, help="seed of the edit context (WISE's shard masks)")
    ap.add_argument("--items", action="store_true", help="print per-item generations and routing")
    ap.add_argument("--out", default="", help="write the figures as JSON here")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from unlearn_tui.backends import data, methods
    from unlearn_tui.backends.events import CancelToken
    from unlearn_tui.backends.metrics import EvalSettings, evaluate
    from unlearn_tui.backends.methods.base import EditContext
    from unlearn_tui.backends.targets import build_requests, simple_targets

    t0 = time.perf_counter()
    handle = load_model()
    print(f"# model loaded in {time.perf_counter() - t0:.1f} s; peak RSS {peak_rss_mb():.0f} MB", flush=True)
    items = data.load_items("builtin:world-facts")
    max_n = max(args.sizes)
    retain = items[max_n:max_n + args.retain] if len(items) >= max_n + args.retain else items[-args.retain:]
    settings = EvalSettings(max_new_tokens=32, batch_size=16)
    pool = data.builtin_refusals()
    results = {"method": args.method, "params": json.loads(args.params), "seed": args.seed, "runs": []}

    t = time.perf_counter()
    base_forget_all = items[:max_n]
    base = evaluate(handle, {"forget": base_forget_all, "retain": retain,
                             "rephrase": data.rephrase_split(base_forget_all)}, settings)
    base_items = {s: {i.id: i.rouge1 for i in base.splits[s].items} for s in base.splits}
    print(f"# baseline evaluated in {time.perf_counter() - t:.1f} s", flush=True)
    prompts = [handle.prompt_ids(it.question) for it in retain[:8]]

    for n in args.sizes:
        forget = items[:n]
        targets = simple_targets("idk", forget, pool, seed=0)
        reqs = build_requests(forget, targets, 1)
        m = methods.make(args.method, json.loads(args.params))
        ctx = EditContext(lambda e: None, CancelToken(), forget, retain, {}, seed=args.seed)
        rss0 = peak_rss_mb()
        t = time.perf_counter()
        with handle.transaction(m.touched_parameters(handle)) as tx:
            report = m.apply(handle, reqs, ctx)
        secs = time.perf_counter() - t
        rss1 = peak_rss_mb()
        tp_edit, tp_plain = overhead(handle, prompts, 24)
        t = time.perf_counter()
        ev = evaluate(handle, {"forget": forget, "retain": retain, "rephrase": data.rephrase_split(forget)},
                      settings)
        eval_s = time.perf_counter() - t
        row = {"n": n, "seconds_per_edit": secs / n, "apply_seconds": secs, "eval_seconds": eval_s,
               "peak_rss_mb": rss1, "peak_rss_before_mb": rss0, "tokens_per_s_plain": tp_plain,
               "tokens_per_s_with_adaptor": tp_edit, "throughput_ratio": tp_edit / tp_plain}
        for split, s in ev.splits.items():
            b = [base_items[split][i.id] for i in s.items]
            row[f"{split}.rouge1"] = s.rouge1
            row[f"{split}.baseline_rouge1"] = sum(b) / len(b) if b else None
            summ = s.summary()
            for k in ("wise_side", "wise_act", "grace_hit"):
                if k in summ:
                    row[f"{split}.{k}"] = summ[k]
        row["retain_ratio"] = (row["retain.rouge1"] / row["retain.baseline_rouge1"]
                               if row.get("retain.baseline_rouge1") else None)
        keys = ("thresholds", "memories", "entries", "actions", "eps", "margins", "norm_constraint", "lr", "layer")
        row["report"] = {k: report[k] for k in keys if k in report}
        if args.method == "wise":
            pe = report["per_edit"]
            row["report"]["mean_iterations"] = sum(e["iterations"] for e in pe) / len(pe)
            row["report"]["final_nll_mean"] = sum(e["nll"] for e in pe) / len(pe)
        results["runs"].append(row)
        print(f"\n== {args.method}, {n} sequential edits ==")
        print(f"seconds/edit {secs / n:.2f} (reference EasyEdit {REFERENCE[args.method]['s_per_edit']} s; "
              f"speed-up x{REFERENCE[args.method]['s_per_edit'] / (secs / n):.1f})  peak RSS {rss1:.0f} MB")
        for split in ("forget", "retain", "rephrase"):
            extra = "".join(f"  {k} {row[f'{split}.{k}']:.2f}" for k in ("wise_side", "grace_hit")
                            if f"{split}.{k}" in row)
            print(f"{split:9s} ROUGE-1 {row[f'{split}.rouge1']:.3f}  (baseline "
                  f"{row[f'{split}.baseline_rouge1']:.3f}){extra}")
        print(f"retain / baseline {row['retain_ratio']:.3f}")
        print(f"generation {tp_edit:.1f} tok/s with adaptor vs {tp_plain:.1f} without (ratio "
              f"{tp_edit / tp_plain:.3f}; medians of 3 interleaved runs, 8 prompts x 24 new tokens)")
        print("report", json.dumps(row["report"]), flush=True)
        if args.items:
            for split, s in ev.splits.items():
                for i in s.items:
                    route = i.extra.get("wise_route", "") or (
                        "in-ball" if i.extra.get("grace_hit") else ("no-ball" if "grace_hit" in i.extra else ""))
                    act = f" act={i.extra['wise_act']:.3g}" if "wise_act" in i.extra else ""
                    if i.extra.get("wise_route") == "side" and "wise_memory" in i.extra:
                        act += f" mem={i.extra['wise_memory']}"
                    print(f"  {split:8s} {i.id} {route:7s}{act} r1={i.rouge1:.2f} {i.question[:45]!r} -> "
                          f"{i.generation[:60]!r}")
        tx.rollback()
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    print("\nJSON " + json.dumps(results))


if __name__ == "__main__":
    main()
