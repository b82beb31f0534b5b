"""The shared-prefix path (KV-cache reuse) gives the plain path's scores and generations, with fewer tokens."""

from __future__ import annotations

import pytest
import torch

from unlearn_tui.backends import generation, shared_prefix, tiny
from unlearn_tui.backends.arch import SPECS
from unlearn_tui.backends.metrics import EvalSettings, evaluate
from unlearn_tui.backends.model import ModelHandle

QUESTIONS = ["Hi there, who are you?", "What is the capital of France?", "Who wrote the play Hamlet?",
             "What is the largest planet in the solar system? Answer briefly.", "Sky?"]
ANSWERS = ["Paris", "William Shakespeare wrote Hamlet.", "Jupiter", "x", "The sky is blue on a clear day.", ""]


@pytest.fixture(scope="module")
def handles():
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    out: dict[str, ModelHandle] = {}

    def get(family: str) -> ModelHandle:
        if family not in out:
            model, tok = tiny.build(family)
            out[family] = ModelHandle(model.eval(), tok, name=family)
        return out[family]

    yield get
    transformers.logging.set_verbosity(verbosity)


def _pairs(h):
    return [(h.prompt_ids(q), h.encode_answer(a) if a else []) for q in QUESTIONS for a in ANSWERS]


@pytest.mark.parametrize("family", sorted(SPECS))
def test_scores_and_greedy_text_equal_the_plain_path(family, handles):
    h = handles(family)
    pairs = _pairs(h)
    assert shared_prefix.verified(h, [p for p, _ in pairs], [a for _, a in pairs])
    for batch in (1, 2, 16):
        fast = shared_prefix.answer_stats(h, pairs, top_k=5, batch_size=batch)
        plain = generation.plain_answer_stats(h, pairs, top_k=5, batch_size=batch)
        for f, p in zip(fast, plain):
            assert f.n_tokens == p.n_tokens
            assert f.mrr == p.mrr and f.top_hit == p.top_hit  # ranks exact
            assert abs(f.mean_logprob - p.mean_logprob) <= 2e-6
    prompts = [h.prompt_ids(q) for q in QUESTIONS]
    for batch in (1, 2, 16):
        assert shared_prefix.greedy(h, prompts, 10, batch) == generation.plain_generate(h, prompts, 10, batch)


def test_each_shared_token_is_encoded_once(handles):
    h = handles("llama")
    # a shared preamble stands in for a chat template's system turn (the tiny template's is 2 tokens)
    pairs = [(h.prompt_ids("Please answer briefly. " + q), h.encode_answer(a)) for q in QUESTIONS for a in ANSWERS
             if a]
    seen: list[int] = []
    hook = h.adapter.embed().register_forward_hook(lambda _m, args, _o: seen.append(int(args[0].numel())))
    try:
        shared_prefix.answer_stats(h, pairs, batch_size=16)
    finally:
        hook.remove()
    prompts = list(dict.fromkeys(tuple(p) for p, _a in pairs))
    n_prefix = shared_prefix._common_prefix(prompts)
    assert n_prefix >= shared_prefix.MIN_PREFIX
    own = [len(p) - n_prefix for p in prompts]
    # one prefix row, each prompt's own tokens (left-padded to the longest in its batch), each answer but its last
    assert seen[0] == n_prefix
    assert seen[1] == len(prompts) * max(own)
    longest = max(len(a) for _p, a in pairs)
    assert sum(seen[2:]) <= len(pairs) * (longest - 1)
    plain_tokens = sum(len(p) + len(a) for p, a in pairs)
    assert sum(seen) * 2 < plain_tokens


def test_duplicate_prompts_decode_once_and_keep_order(handles):
    h = handles("qwen2")
    prompts = [h.prompt_ids(q) for q in ("Sky?", "Hi there, who are you?", "Sky?", "Sky?")]
    calls: list[int] = []
    got = shared_prefix.greedy(h, prompts, 6, 16, on_batch=calls.append)
    assert got == generation.plain_generate(h, prompts, 6, 16)
    assert got[0] == got[2] == got[3] and sum(calls) == len(prompts)


def test_finished_rows_leave_the_batch_and_the_text_is_unchanged(handles, monkeypatch):
    h = handles("qwen2")     # its random weights do not repeat one token forever (llama's and gpt2's do)
    prompts = [h.prompt_ids(q) for q in QUESTIONS]
    # each prompt's first 8 greedy tokens with no end of sequence (min_new_tokens holds it off)
    raw = []
    for p in prompts:
        out = h.model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               max_new_tokens=8, min_new_tokens=8, do_sample=False,
                               pad_token_id=h.tokenizer.pad_token_id)
        raw.append(out[0, len(p):].tolist())
    # end-of-sequence tokens chosen so that rows stop at different steps: row 0 at its 3rd token, row 1 at its 4th
    eos = sorted({raw[0][2], raw[1][3]})
    monkeypatch.setattr(h.model.generation_config, "eos_token_id", eos)
    stops = [next((j for j, t in enumerate(r) if t in eos), None) for r in raw]
    assert any(s is not None and s < 7 for s in stops) and any(s is None or s > 3 for s in stops)
    rows: list[int] = []
    hook = h.adapter.embed().register_forward_hook(lambda _m, args, _o: rows.append(int(args[0].shape[0])))
    try:
        got = shared_prefix.greedy(h, prompts, 8, 16)
    finally:
        hook.remove()
    assert got == generation.plain_generate(h, prompts, 8, 16)
    decode = rows[2:]     # after the prefix row and the prompts' forward: one forward per decoded token
    assert decode[0] == len(prompts) and min(decode) < len(prompts), decode
    assert decode == sorted(decode, reverse=True)


def test_wrappers_and_logits_processing_keep_the_plain_path(handles, monkeypatch):
    h = handles("gpt2")
    assert shared_prefix.usable(h)
    h.wrappers.append(object())          # anything that may hook the model's calls
    try:
        assert not shared_prefix.usable(h) and not shared_prefix.verified(h, [h.prompt_ids("Sky?")])
        used: list[str] = []
        monkeypatch.setattr(shared_prefix, "answer_stats", lambda *a, **k: used.append("fast"))
        generation.answer_stats(h, _pairs(h)[:3])
        assert used == []
    finally:
        h.wrappers.clear()
    h.model.generation_config.repetition_penalty = 1.3
    try:
        assert not shared_prefix.usable(h)
    finally:
        h.model.generation_config.repetition_penalty = 1.0


def test_a_model_where_the_fast_path_disagrees_is_not_verified(handles, monkeypatch):
    """Position ids that count the padding holes (what a model ignoring ``position_ids`` would use) are caught."""
    model, tok = tiny.build("llama", seed=3)
    h = ModelHandle(model.eval(), tok, name="llama")
    real = shared_prefix._Runner.forward

    def shifted(self, ids, mask, pos, cache=None):
        cols = torch.arange(mask.shape[1] - ids.shape[1], mask.shape[1], device=ids.device)
        return real(self, ids, mask, cols[None].expand_as(ids), cache)

    monkeypatch.setattr(shared_prefix._Runner, "forward", shifted)
    monkeypatch.setattr(shared_prefix, "_passed_before", lambda handle: False)   # the probe itself, not a memory
    # a shared preamble: the prefix step runs, so shorter rows have holes after it (a uniform shift per row
    # would not matter to rotary positions)
    pairs = [(h.prompt_ids("Please answer briefly. " + q), h.encode_answer(a) if a else []) for q in QUESTIONS
             for a in ANSWERS]
    assert not shared_prefix.verified(h, [p for p, _ in pairs], [a for _, a in pairs])
    # and the dispatcher then gives the plain path's numbers
    got = generation.answer_stats(h, pairs[:6])
    ref = generation.plain_answer_stats(h, pairs[:6])
    assert [(g.mrr, g.mean_logprob) for g in got] == [(r.mrr, r.mean_logprob) for r in ref]


def test_evaluation_equals_one_item_at_a_time_generations_included(handles):
    """evaluate() (shared prefix, batched) against a one-item-at-a-time plain reference, split by split."""
    from unlearn_tui.backends.data import QAItem

    h = handles("llama")
    items = [QAItem(id=f"q{i}", question=q, answer=ANSWERS[i], perturbed_answers=[ANSWERS[(i + 1) % 5], "no"])
             for i, q in enumerate(QUESTIONS)]
    assert shared_prefix.verified(h, [h.prompt_ids(q) for q in QUESTIONS])
    got = evaluate(h, {"forget": items}, EvalSettings(max_new_tokens=8, batch_size=16)).splits["forget"]
    for it, score in zip(items, got.items):
        prompt = h.prompt_ids(it.question)
        gen = generation.plain_generate(h, [prompt], 8, 1)[0]
        ref = generation.plain_answer_stats(h, [(prompt, h.encode_answer(it.answer))], batch_size=1)[0]
        assert score.generation == gen
        assert score.mrr == ref.mrr and score.top_hit == ref.top_hit
        assert torch.allclose(torch.tensor(score.probability), torch.tensor(ref.probability), rtol=0, atol=1e-6)


def test_a_passed_probe_is_remembered_for_the_next_process_on_the_same_model(tmp_path, monkeypatch):
    """The probe runs once per model, dtype, device and library versions, across processes: a fresh handle of
    the same weights (a new process) skips it; another dtype probes again; a failed probe is not remembered."""
    monkeypatch.setenv("UNLEARN_TUI_CACHE_DIR", str(tmp_path))
    calls: list = []
    real = generation.plain_answer_stats

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(generation, "plain_answer_stats", counted)

    def fresh(dtype=torch.float32) -> ModelHandle:
        model, tok = tiny.build("llama", seed=5)
        return ModelHandle(model.to(dtype).eval(), tok, name="llama")

    h = fresh()
    prompts = [h.prompt_ids(q) for q in QUESTIONS]
    assert shared_prefix.verified(h, prompts) and len(calls) == 1
    assert shared_prefix._probe_file().is_file()
    assert shared_prefix.verified(fresh(), prompts) and len(calls) == 1        # the next "process": no probe
    assert shared_prefix.verified(fresh(torch.float64), prompts) and len(calls) == 2   # another dtype: probed
    monkeypatch.setattr(shared_prefix, "PROBE_CACHE_VERSION", shared_prefix.PROBE_CACHE_VERSION + 1)
    assert shared_prefix.verified(fresh(), prompts) and len(calls) == 3        # a new probe version: probed
    shared_prefix._probe_file().write_text("{not json")                       # a damaged file: probe again
    assert shared_prefix.verified(fresh(), prompts) and len(calls) == 4
    assert shared_prefix.verified(fresh(), prompts) and len(calls) == 4        # and it was written anew
    # a failed probe is not remembered: the next handle probes again
    monkeypatch.setattr(shared_prefix, "PROBE_CACHE_VERSION", 99)
    monkeypatch.setattr(shared_prefix, "greedy", lambda h, ps, *a, **k: ["disagrees"] * len(ps))
    assert not shared_prefix.verified(fresh(), prompts) and len(calls) == 5
    assert not shared_prefix.verified(fresh(), prompts) and len(calls) == 6
