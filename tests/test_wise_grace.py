"""WISE and GRACE on tiny random models: routing, bit-exact pass-through, accumulation,
rollback, persistence, codebook rules and parameter errors."""

from __future__ import annotations

import pytest

from unlearn_tui.backends.errors import Cancelled, NonFiniteError, UserError
from unlearn_tui.backends.events import CancelToken, Progress
from unlearn_tui.backends.targets import Request
from unlearn_tui.backends.tiny import ALL_ARCHS

TARGET = "I don't know."
UNRELATED = "The quick brown fox jumps over the lazy dog."
NEUTRAL = "What is 12 plus 30?"   # one of WISE's out-of-scope prompts (backends.editing.lifelong)

# The tiny random models have 32-wide hidden states, a 488-token vocabulary and (tied) unembeddings
# with std 0.02, so the largest logit any hidden state can produce is about 0.64: no edit can lift a
# token's probability much above ~2x uniform (0.002 -> ~0.004).  The tests therefore check what an
# edit can do here: the target tokens become top-ranked under teacher forcing (MRR) and the target's
# probability rises towards that ceiling.  Their activations are also tiny (the main-memory output
# norm is ~0.005), so WISE gets absolute routing margins and a looser norm constraint sized for them.
# Their target NLL also cannot fall much below ln(488) ~ 6.2, so the first-token term (which doubles
# that unreachable NLL) only fights the routing margins; it is off here and tested on its own.  On
# tiny gpt2 one edit's score overlaps the out-of-scope scores, so these tests keep the paper's
# threshold rule (act_ratio x min in-scope); above_out_of_scope is tested on its own too.
WISE_FAST = {"n_iter": 60, "edit_lr": 0.05, "norm_constraint": 1.0, "act_margin": [0.01, 0.2, 0.1],
             "first_token_weight": 0.0, "above_out_of_scope": False}
GRACE_FAST = {"n_iter": 80, "edit_lr": 0.3}


def _requests(n: int, start: int = 0) -> list[Request]:
    from tests.conftest import make_items

    items = make_items(start + n)[start:]
    return [Request(prompt=f"{it.question} ({it.id})", target=TARGET, subject=it.subject, item_ids=[it.id])
            for it in items]


def _ctx(cancel: CancelToken | None = None, on_event=None):
    from unlearn_tui.backends.runner import EditContext

    return EditContext(on_event or (lambda e: None), cancel or CancelToken(), [], [], {}, seed=0)


def _apply(handle, name: str, params: dict, reqs, keep: bool = True, ctx=None):
    from unlearn_tui.backends.methods import make

    m = make(name, params)
    with handle.transaction(m.touched_parameters(handle), keep_after=keep) as tx:
        report = m.apply(handle, reqs, ctx or _ctx())
    return tx, report


def _logits(handle, question: str):
    import torch

    ids = torch.tensor([handle.prompt_ids(question)])
    with torch.no_grad():
        return handle.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]


def _target_stats(handle, question: str, target: str = TARGET):
    """Teacher-forced statistics (probability, MRR) of the target after the question."""
    from unlearn_tui.backends.editing.lifelong import end_ids
    from unlearn_tui.backends.generation import answer_stats

    return answer_stats(handle, [(handle.prompt_ids(question), handle.encode_answer(target) + end_ids(handle))])[0]


def _wrapper(handle, kind: str):
    return next(w for w in handle.wrappers if getattr(w, "name", "") == kind)


# ----------------------------------------------------------------------------------------- shared pieces


def test_suffix_runner_matches_full_forward(tiny_handle):
    import torch

    from unlearn_tui.backends.editing.lifelong import SuffixRunner, sequence_batch

    h = tiny_handle
    runner = SuffixRunner(h, 2)
    b = sequence_batch(h, [h.prompt_ids("What is the capital of France?"), h.prompt_ids("Hi")], [[5, 6, 7], [8]])
    prep = runner.prepare(b.ids, b.mask)
    assert runner.fast is True
    rows, pos, _ = b.target_positions()
    with torch.no_grad():
        full = h.model(input_ids=b.ids, attention_mask=b.mask).logits[rows, pos]
        mine = runner.logits(prep, rows, pos)
    assert torch.allclose(full, mine, atol=1e-4)


def test_ties_merge_trims_elects_signs_and_averages_agreeing_values():
    import torch

    from unlearn_tui.backends.editing.wise_memory import ties_merge

    a = torch.tensor([4.0, -1.0, 2.0, 0.0])
    b = torch.tensor([2.0, 3.0, -6.0, 0.0])
    c = torch.tensor([0.0, 0.0, 0.0, 5.0])
    merged = ties_merge([a, b, c], density=1.0)
    # element 0: both positive -> mean 3; element 1: sum +2 -> only b agrees -> 3;
    # element 2: sum -4 -> only b agrees -> -6; element 3: only c -> 5
    assert merged.tolist() == [3.0, 3.0, -6.0, 5.0]
    trimmed = ties_merge([a, b], density=0.5)   # keeps a: {4, 2}, b: {3, -6}
    assert trimmed.tolist() == [4.0, 3.0, -6.0, 0.0]     # element 2: 2 - 6 < 0, so only b counts


# ----------------------------------------------------------------------------------------- WISE


def test_wise_routes_edit_prompt_to_side_memory_and_unrelated_prompt_to_main(tiny_handle):
    import torch

    h = tiny_handle
    req = _requests(1)
    before_unrelated = _logits(h, NEUTRAL)
    before_edit = _logits(h, req[0].prompt)
    before = _target_stats(h, req[0].prompt)
    _, report = _apply(h, "wise", WISE_FAST, req)
    mem = _wrapper(h, "wise")
    assert report["memory_edits"] == 1 and h.wrappers == [mem]
    edit = mem.describe_query(h, req[0].prompt)
    other = mem.describe_query(h, NEUTRAL)
    assert edit["wise_route"] == "side" and other["wise_route"] == "main"
    assert edit["wise_act"] >= edit["wise_threshold"] > other["wise_act"]
    # the main memory answers unrelated prompts exactly as before; the edit prompt changed
    assert torch.equal(_logits(h, NEUTRAL), before_unrelated)
    assert not torch.equal(_logits(h, req[0].prompt), before_edit)
    after = _target_stats(h, req[0].prompt)   # moved towards the refusal (see WISE_FAST for the ceiling)
    assert after.mrr >= 0.5 and after.mrr > 5 * before.mrr
    assert after.probability > 1.3 * before.probability


def test_wise_never_writes_model_weights(llama_handle):
    from unlearn_tui.backends.model import state_hash

    h = llama_handle
    before = state_hash(h.model)
    _apply(h, "wise", {"n_iter": 3}, _requests(2))
    assert state_hash(h.model) == before


@pytest.mark.parametrize("retrieve", [False, True], ids=["merge", "retrieve"])
def test_wise_sequential_edits_accumulate_first_edit_holds_after_tenth(llama_handle, retrieve):
    h = llama_handle
    reqs = _requests(10)
    s0 = _target_stats(h, reqs[0].prompt)
    after_first = None
    for i, r in enumerate(reqs):   # step mode: one apply per request, each kept
        _apply(h, "wise", {**WISE_FAST, "save_freq": 2, "merge_freq": 4, "retrieve": retrieve}, [r])
        if i == 0:
            after_first = _target_stats(h, r.prompt)
    mem = _wrapper(h, "wise")
    assert len([w for w in h.wrappers if w.name == "wise"]) == 1
    assert len(mem.edits) == 10 and len(mem.shards) == 1     # edits 9 and 10 pending in one shard
    if retrieve:   # edits 1-4 and 5-8 frozen in their own side memories; 9-10 in the active one
        assert [m["edits"] for m in mem.archive] == [4, 4] and mem.active_from == 8 and mem.merged is None
        assert len(mem.memories()) == 3
        assert mem.describe_query(h, reqs[0].prompt)["wise_memory"] in ("0", "1", "2")
    else:          # merged twice (after edits 4 and 8) into the one side memory
        assert mem.archive == [] and mem.merged is not None and len(mem.memories()) == 1
    assert mem.describe_query(h, reqs[0].prompt)["wise_route"] == "side"
    assert after_first.mrr >= 0.5 and after_first.probability > 1.3 * s0.probability
    last = _target_stats(h, reqs[0].prompt)   # still holds after the 10th edit and two merges
    assert last.mrr >= 0.4 and last.mrr > 5 * s0.mrr and last.probability > 1.2 * s0.probability
    assert mem.describe_query(h, NEUTRAL)["wise_route"] == "main"


def test_wise_retrieval_answers_with_the_memory_most_over_its_threshold(tiny_handle):
    """Top-1 by score / threshold (not by raw score); below every threshold the main memory answers."""
    import torch

    from unlearn_tui.backends.editing.lifelong import weight_apply
    from unlearn_tui.backends.editing.wise_memory import WiseMemory, projection_inputs, template_header_len

    h = tiny_handle
    layer = h.adapter.n_layers - 1
    w = h.adapter.mlp_out(layer).weight
    layout = h.adapter.spec.out_proj_layout
    g = torch.Generator().manual_seed(0)
    M = torch.randn(tuple(w.shape), generator=g) * float(w.float().std())
    mem = WiseMemory(layer, layout, tuple(w.shape), skip=template_header_len(h), pool="max")
    base = _logits(h, UNRELATED)
    s = float(mem.scores_of(projection_inputs(h, layer, h.prompt_ids(UNRELATED)), M))
    assert s > 0
    # memory 1 scores twice as high, but memory 0 is further over its own threshold (2.0 vs 1.33)
    mem.archive = [{"delta": M, "threshold": 0.5 * s, "edits": 1},
                   {"delta": 2 * M, "threshold": 1.5 * s, "edits": 1}]
    h.add_wrapper(mem)
    info = mem.describe_query(h, UNRELATED)
    assert info["wise_route"] == "side" and info["wise_memory"] == "0"
    assert info["wise_act"] == pytest.approx(s, rel=1e-4) and info["wise_threshold"] == pytest.approx(0.5 * s)
    # the output is the main memory's plus memory 0's offset, from the first token after the header
    h.remove_wrapper(mem)

    def expected_hook(mod, args, out):
        d = weight_apply(args[0], M.to(args[0].dtype), layout)
        d[:, :mem.skip] = 0
        return out + d

    hd = h.adapter.mlp_out(layer).register_forward_hook(expected_hook)
    try:
        want = _logits(h, UNRELATED)
    finally:
        hd.remove()
    h.add_wrapper(mem)
    assert torch.allclose(_logits(h, UNRELATED), want, atol=1e-5)
    # both memories below their thresholds: main memory, bit for bit
    mem.archive = [{"delta": M, "threshold": 1.5 * s, "edits": 1}, {"delta": 2 * M, "threshold": 3 * s, "edits": 1}]
    assert mem.describe_query(h, UNRELATED)["wise_memory"] == "-"
    assert torch.equal(_logits(h, UNRELATED), base)


def test_wise_first_token_weight_lifts_the_first_target_token():
    """The extra first-token NLL term moves the first refusal token more than the plain mean NLL does."""
    from unlearn_tui.backends import tiny

    def first_token_logprob(weight: float) -> float:
        h = tiny.handle("llama")
        req = _requests(1)
        _apply(h, "wise", {**WISE_FAST, "n_iter": 20, "first_token_weight": weight}, req)
        first = h.encode_answer(req[0].target)[0]
        return float(_logits(h, req[0].prompt)[-1].log_softmax(-1)[first])

    assert first_token_logprob(4.0) > first_token_logprob(0.0) + 0.1   # measured: -5.80 vs -6.11


def test_wise_threshold_sits_between_out_of_scope_and_in_scope_scores():
    import torch

    from unlearn_tui.backends.editing.wise_memory import WiseMemory

    mem = WiseMemory(0, "out_in", (2, 3), pool="max")
    mem.delta = torch.eye(2, 3)
    mem.acts = [torch.tensor([[4.0, 0.0, 0.0]]), torch.tensor([[0.0, 6.0, 0.0]])]   # in-scope scores 4 and 6
    mem.edits = [{}, {}]
    mem.update_threshold(0.5, torch.tensor([1.0, 2.0]), position=0.75)   # separable: 2 + 0.75 * (4 - 2)
    assert mem.threshold == pytest.approx(3.5)
    mem.update_threshold(0.5, torch.tensor([1.0, 2.0]))                  # default: halfway
    assert mem.threshold == pytest.approx(3.0)
    mem.update_threshold(0.5, torch.tensor([5.0]), position=0.75)        # overlap: the paper's 0.5 x min
    assert mem.threshold == pytest.approx(2.0)
    mem.update_threshold(0.5, torch.tensor([5.0]), above_out_of_scope=True)   # overlap, but never route 5.0
    assert 5.0 < mem.threshold < 5.0001
    mem.active_from = 1                                                  # retrieval: only the active edits
    mem.update_threshold(0.9, None)
    assert mem.threshold == pytest.approx(5.4)


def test_wise_cancel_restores_side_memory_exactly(llama_handle):
    import torch

    h = llama_handle
    reqs = _requests(3)
    _apply(h, "wise", {"n_iter": 5}, reqs[:1])
    mem = _wrapper(h, "wise")
    state = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in mem.get_state().items()}
    out_before = _logits(h, reqs[0].prompt)
    cancel = CancelToken()
    seen = []

    def on_event(e):
        if isinstance(e, Progress) and e.stage.startswith("wise: edit"):
            seen.append(e)
            if len(seen) == 3:
                cancel.cancel()

    with pytest.raises(Cancelled):
        _apply(h, "wise", {"n_iter": 5}, reqs[1:], ctx=_ctx(cancel, on_event))
    assert h.wrappers == [mem] and len(mem.edits) == 1 and mem.enabled
    assert torch.equal(mem.delta, state["delta"]) and mem.threshold == state["threshold"]
    assert torch.equal(_logits(h, reqs[0].prompt), out_before)


def test_wise_non_finite_update_is_rolled_back(llama_handle, monkeypatch):
    import torch

    from unlearn_tui.backends.editing.wise_memory import WiseMemory

    original = WiseMemory._new_shard

    def poisoned(self, seed, ratio, device):   # a shard whose masked elements start as NaN
        shard = original(self, seed, ratio, device)
        shard["tau"][shard["mask"]] = float("nan")
        return shard

    monkeypatch.setattr(WiseMemory, "_new_shard", poisoned)
    h = llama_handle
    before = _logits(h, UNRELATED)
    with pytest.raises(NonFiniteError):
        _apply(h, "wise", {"n_iter": 2}, _requests(1))
    assert h.wrappers == []
    assert torch.equal(_logits(h, UNRELATED), before)


def test_wise_state_file_recreates_the_edited_model_exactly(tmp_path):
    import torch

    from unlearn_tui.backends import tiny

    h = tiny.handle("llama")
    reqs = _requests(3)
    path = tmp_path / "wise.safetensors"
    _apply(h, "wise", {"n_iter": 5, "save_freq": 2, "merge_freq": 2, "routing_pool": "max",
                       "save_state": str(path)}, reqs)
    expected = [_logits(h, r.prompt) for r in reqs] + [_logits(h, UNRELATED)]
    routes = [_wrapper(h, "wise").describe_query(h, r.prompt) for r in reqs]
    assert path.read_bytes()[:8] != b"\x80\x04"   # safetensors, not pickle

    fresh = tiny.handle("llama")
    _, report = _apply(fresh, "wise", {"load_state": str(path)}, reqs)
    assert report["edits"] == 0 and report["memory_edits"] == 3
    got = [_logits(fresh, r.prompt) for r in reqs] + [_logits(fresh, UNRELATED)]
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    assert [_wrapper(fresh, "wise").describe_query(fresh, r.prompt) for r in reqs] == routes
    assert _wrapper(fresh, "wise").pool == "max"


# ----------------------------------------------------------------------------------------- GRACE


def test_grace_leaves_prompts_outside_every_ball_bit_for_bit_unchanged(tiny_handle):
    import torch

    from unlearn_tui.backends.generation import generate

    h = tiny_handle
    reqs = _requests(3)
    others = [UNRELATED, "Which element has the chemical symbol O?", "How many days are there in a week?"]
    before = [_logits(h, q) for q in others]
    gens_before = generate(h, [h.prompt_ids(q) for q in others], max_new_tokens=8)
    _, report = _apply(h, "grace", GRACE_FAST, reqs)
    cb = _wrapper(h, "grace")
    assert report["entries"] >= 1
    for q, b in zip(others, before):
        assert cb.describe_query(h, q)["grace_hit"] == 0.0
        assert torch.equal(_logits(h, q), b)
    assert generate(h, [h.prompt_ids(q) for q in others], max_new_tokens=8) == gens_before
    assert cb.describe_query(h, reqs[-1].prompt)["grace_hit"] == 1.0


def test_grace_replacement_starts_at_the_hit_and_is_kept_for_generated_tokens(llama_handle):
    import torch

    from unlearn_tui.backends.editing.hooks import capture
    from unlearn_tui.backends.generation import generate

    h = llama_handle
    req = _requests(1)
    prompt = h.prompt_ids(req[0].prompt)
    text_before = generate(h, [prompt, h.prompt_ids(UNRELATED)], max_new_tokens=6)
    _apply(h, "grace", GRACE_FAST, req)
    cb = _wrapper(h, "grace")
    name = h.adapter.mlp_name(cb.layer)
    with capture(h.model, [name], "output") as st:
        text = generate(h, [prompt, h.prompt_ids(UNRELATED)], max_new_tokens=6)
    value = cb.values[0]
    first = st[name][0]                                   # the prompt pass: [2, T, d], left padded
    assert torch.equal(first[0, -1], value)               # replaced at the last prompt token ...
    assert not torch.equal(first[0, -2], value)           # ... not before it
    steps = st[name][1:]
    assert steps and all(torch.equal(s[0, -1], value) for s in steps)   # kept for every generated token
    assert not any(torch.equal(s[1, -1], value) for s in steps)        # the other row never replaced
    # the edited row's generation changed, the other row (same batch) is generated exactly as before
    # (the tiny random model cannot be taught the whole target with one constant value: see WISE_FAST)
    assert text[0] != text_before[0] and text[1] == text_before[1]


def test_grace_codebook_split_and_expand_rules(llama_handle):
    import torch

    h = llama_handle
    a, b = "What do you know about France?", "What do you know about Spain?"
    from unlearn_tui.backends.editing.grace_codebook import mlp_io

    layer = h.adapter.n_layers - 1
    d = float(torch.dist(mlp_io(h, layer, h.prompt_ids(a))[0], mlp_io(h, layer, h.prompt_ids(b))[0]))
    eps = d  # the second key lies within radius + eps of the first
    same = [Request(a, TARGET, None, ["a"]), Request(b, TARGET, None, ["b"])]
    tx, report = _apply(h, "grace", {"eps": eps, "n_iter": 2, "layer": layer}, same)
    cb = _wrapper(h, "grace")
    assert report["actions"] == {"add": 1, "expand": 1, "split": 0}
    assert len(cb) == 1 and float(cb.radii[0]) == pytest.approx(max(eps, d), rel=1e-5)
    assert cb.item_ids[0] == ["a", "b"]
    tx.undo()
    assert h.wrappers == []
    other = [Request(a, TARGET, None, ["a"]), Request(b, "Something else entirely.", None, ["b"])]
    _, report = _apply(h, "grace", {"eps": eps, "n_iter": 2, "layer": layer}, other)
    cb = _wrapper(h, "grace")
    assert report["actions"] == {"add": 1, "expand": 0, "split": 1}
    assert torch.allclose(cb.radii, torch.tensor([d / 2, d / 2]), rtol=1e-5)
    assert cb.describe_query(h, a)["grace_hit"] == 1.0 and cb.describe_query(h, b)["grace_hit"] == 1.0


def test_grace_sequential_edits_accumulate_first_edit_holds_after_tenth(llama_handle):
    h = llama_handle
    reqs = _requests(10)
    s0 = _target_stats(h, reqs[0].prompt)
    for r in reqs:
        _apply(h, "grace", GRACE_FAST, [r])
    cb = _wrapper(h, "grace")
    assert len([w for w in h.wrappers if w.name == "grace"]) == 1
    assert len(cb.log) == 10
    assert cb.describe_query(h, reqs[0].prompt)["grace_hit"] == 1.0
    last = _target_stats(h, reqs[0].prompt)
    assert last.mrr >= 0.2 and last.mrr > 5 * s0.mrr and last.probability > 1.2 * s0.probability


def _full_forward_nll(handle, layer: int, prompt: list[int], tgt: list[int], v):
    """The reference: the whole ``prompt + target`` through the model, the MLP output from the last prompt
    token on replaced by ``v`` (what inference does for a hit), the mean NLL of the target."""
    import torch

    last = len(prompt) - 1
    ids = torch.tensor([prompt + tgt[:-1]])

    def hook(m, args, out):
        return torch.cat([out[:, :last], v.to(out.dtype).expand_as(out[:, last:])], dim=1)

    hd = handle.adapter.mlp(layer).register_forward_hook(hook)
    try:
        logits = handle.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits[0, last:]
    finally:
        hd.remove()
    return torch.nn.functional.cross_entropy(logits.float(), torch.tensor(tgt))


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_grace_replayed_suffix_gives_the_full_forward_loss_and_gradient(arch):
    """The fast path (cached prefix, blocks 0..L-1 replayed, the suffix only) is the full forward's math, in
    every family the adapters know."""
    import torch

    from unlearn_tui.backends import tiny
    from unlearn_tui.backends.editing.grace_codebook import ValueRunner, _ReplayedEdit, _SuffixEdit, mlp_io
    from unlearn_tui.backends.editing.lifelong import end_ids

    h = tiny.handle(arch)
    layer = 1
    runner = ValueRunner(h, layer)
    prompt = h.prompt_ids("What do you know about France?")
    tgt = h.encode_answer(TARGET) + end_ids(h)
    edit = runner.edit(prompt, tgt)
    assert isinstance(edit, _ReplayedEdit) and runner.replayed is True and runner.fast is True
    assert runner.header() is not None and prompt[:len(runner.header()[0])] == runner.header()[0]
    key, out0 = mlp_io(h, layer, prompt)
    assert torch.allclose(edit.key, key, atol=1e-5) and torch.allclose(edit.out0, out0, atol=1e-6)
    g = torch.Generator().manual_seed(1)
    v0 = out0 + torch.randn(out0.shape, generator=g) * float(out0.norm())
    losses, grads = [], []
    for fn in (lambda v: _full_forward_nll(h, layer, prompt, tgt, v),
               lambda v: torch.nn.functional.cross_entropy(edit.logits(v).float(), edit.gold),
               lambda v: torch.nn.functional.cross_entropy(_SuffixEdit(runner, prompt, tgt, edit.gold).logits(v)
                                                           .float(), edit.gold)):
        v = v0.clone().requires_grad_(True)
        loss = fn(v)
        loss.backward()
        losses.append(float(loss.detach()))
        grads.append(v.grad)
    assert losses[1] == pytest.approx(losses[0], rel=1e-5) and losses[2] == pytest.approx(losses[0], rel=1e-5)
    assert torch.allclose(grads[1], grads[0], rtol=1e-4, atol=1e-7)
    assert torch.allclose(grads[2], grads[0], rtol=1e-4, atol=1e-7)
    # steps do not leak into each other (each runs on its own copy of the prefix cache)
    with torch.no_grad():
        first = edit.logits(v0)
        edit.logits(out0)
        assert torch.equal(edit.logits(v0), first)
    assert edit.past.get_seq_length() == len(prompt) - 1
    # the replay put every block's and MLP's own forward back
    assert not any("forward" in m.__dict__ for i in range(h.adapter.n_layers)
                   for m in (h.adapter.block(i), h.adapter.mlp(i)))


def test_grace_key_scale_in_one_padded_pass_matches_one_prompt_at_a_time(tiny_handle):
    import torch

    from unlearn_tui.backends.editing.grace_codebook import key_scale, mlp_io
    from unlearn_tui.backends.editing.lifelong import NEUTRAL_PROMPTS

    h = tiny_handle
    prompts = [h.prompt_ids(q) for q in NEUTRAL_PROMPTS[:6]]
    assert len({len(p) for p in prompts}) > 1   # the batch is padded
    one_by_one = float(torch.stack([mlp_io(h, 2, p)[0] for p in prompts]).norm(dim=-1).mean())
    assert key_scale(h, 2, prompts) == pytest.approx(one_by_one, rel=1e-5)


def test_grace_falls_back_to_the_suffix_runner_when_the_replay_disagrees(monkeypatch):
    """When the first-use check fails, training runs on SuffixRunner: the same codebook, within rounding."""
    import torch

    from unlearn_tui.backends import tiny
    from unlearn_tui.backends.editing import grace_codebook

    reqs = _requests(2)
    params = {**GRACE_FAST, "n_iter": 6, "eps": 1e-6}
    fast_h = tiny.handle("llama")
    _, fast = _apply(fast_h, "grace", params, reqs)
    monkeypatch.setattr(grace_codebook.ValueRunner, "_agrees", lambda self, *a: False)
    slow_h = tiny.handle("llama")
    _, slow = _apply(slow_h, "grace", params, reqs)
    assert [e["iterations"] for e in slow["per_edit"]] == [e["iterations"] for e in fast["per_edit"]] == [6, 6]
    a, b = _wrapper(fast_h, "grace"), _wrapper(slow_h, "grace")
    assert torch.allclose(a.keys, b.keys, atol=1e-5) and torch.allclose(a.values, b.values, atol=1e-4)


def test_produces_target_needs_every_target_token_ahead_by_the_margin():
    import torch

    from unlearn_tui.backends.editing.grace_codebook import greedy_margin, produces_target

    gold = torch.tensor([1, 0])
    lg = torch.tensor([[0.0, 2.0, 1.0], [3.0, 1.0, 2.5]])
    assert produces_target(lg, gold) and produces_target(lg, gold, 0.4)
    assert not produces_target(lg, gold, 0.5)                      # position 1 leads by 0.5 only
    assert not produces_target(torch.tensor([[0.0, 2.0, 2.0], [3.0, 1.0, 2.5]]), gold)   # a tie is no lead
    assert not produces_target(lg, torch.tensor([2, 0]))
    assert greedy_margin(torch.float32) < greedy_margin(torch.bfloat16) == greedy_margin(torch.float16)


def test_grace_value_training_stops_once_greedy_decoding_gives_the_target(llama_handle):
    """The early stop: training ends at the first value under which the target is the greedy continuation,
    long before stop_loss (unreachable on the tiny model), and generation then produces it."""
    from unlearn_tui.backends.editing.grace_codebook import ValueRunner, greedy_margin, produces_target
    from unlearn_tui.backends.editing.lifelong import end_ids
    from unlearn_tui.backends.generation import generate

    h = llama_handle
    question = "What do you know about France?"
    prompt = h.prompt_ids(question)
    # the end token alone (an empty answer) is a target one value can make the argmax on the tiny model
    assert generate(h, [prompt], max_new_tokens=4) != [""]
    runner = ValueRunner(h, h.adapter.n_layers - 1)
    edit = runner.edit(prompt, end_ids(h))
    assert not produces_target(edit.logits(edit.out0).detach(), edit.gold)   # not before training
    _, report = _apply(h, "grace", {**GRACE_FAST, "n_iter": 50, "stop_loss": 0.0}, [Request(question, "", None, ["a"])])
    info = report["per_edit"][0]
    assert 1 < info["iterations"] < 50 and info["nll"] > 1.0   # the greedy rule stopped it, not the NLL rule
    cb = _wrapper(h, "grace")
    assert produces_target(edit.logits(cb.values[0]).detach(), edit.gold, greedy_margin(h.dtype))
    assert generate(h, [prompt], max_new_tokens=4) == [""]


def test_grace_state_file_recreates_the_codebook_exactly(tmp_path):
    import torch

    from unlearn_tui.backends import tiny

    h = tiny.handle("gpt2")
    reqs = _requests(2)
    path = tmp_path / "grace.safetensors"
    _, report = _apply(h, "grace", {"n_iter": 5, "eps": 0.01, "save_state": str(path)}, reqs)
    assert report["actions"]["add"] == 2   # keys 0.13 apart: two entries with this radius
    expected = [_logits(h, r.prompt) for r in reqs]
    fresh = tiny.handle("gpt2")
    _apply(fresh, "grace", {"load_state": str(path)}, reqs)
    assert all(torch.equal(a, _logits(fresh, r.prompt)) for a, r in zip(expected, reqs))
    assert _wrapper(fresh, "grace").labels == [TARGET, TARGET]


# ----------------------------------------------------------------------------------------- params


@pytest.mark.parametrize("name", ["wise", "grace"])
def test_bad_hyper_parameters_name_the_key(llama_handle, name, tmp_path):
    from unlearn_tui.backends.methods import make

    with pytest.raises(UserError) as e:
        make(name, {"layer": 99}).touched_parameters(llama_handle)
    assert e.value.where == "params.layer" and "99" in str(e.value)
    with pytest.raises(UserError) as e:
        _apply(llama_handle, name, {"load_state": str(tmp_path / "missing.safetensors")}, _requests(1))
    assert e.value.where == "params.load_state"
    assert llama_handle.wrappers == []
    if name == "wise":
        with pytest.raises(UserError) as e:
            _apply(llama_handle, name, {"save_freq": 3, "merge_freq": 4}, _requests(1))
        assert e.value.where == "params.merge_freq"


def test_params_are_plain_data_and_defaults_are_auto():
    from unlearn_tui.backends.methods import get
    from unlearn_tui.backends.params import describe

    wise = {f.name: f for f in describe(get("wise").Params)}
    grace = {f.name: f for f in describe(get("grace").Params)}
    for key in ("mask_ratio", "act_ratio", "alpha", "beta", "gamma", "edit_lr", "n_iter", "norm_constraint",
                "save_freq", "merge_freq", "load_state", "save_state"):
        assert key in wise
    for key in ("eps", "edit_lr", "n_iter", "eps_expand", "val_init", "load_state", "save_state"):
        assert key in grace
    assert wise["layer"].default is None and grace["layer"].default is None and grace["eps"].default is None


@pytest.mark.parametrize("name", ["wise", "grace"])
def test_easyedit_hparams_map_onto_our_params(name, tmp_path):
    from unlearn_tui.backends.methods import get

    cls = get(name)
    if name == "wise":
        yaml_text = ("alg_name: \"WISE\"\nmodel_name: ./llama-2-7b\ndevice: 0\nmask_ratio: 0.2\nedit_lr: 1.0\n"
                     "n_iter: 70\nnorm_constraint: 1.0e-3\nact_margin: [5.0, 20.0, 10.0]\nact_ratio: 0.88\n"
                     "save_freq: 500\nmerge_freq: 1000\nmerge_alg: 'ties'\nobjective_optimization: 'only_label'\n"
                     "inner_params:\n- model.layers[27].mlp.down_proj.weight\n")
        expected = {"mask_ratio": 0.2, "edit_lr": 1.0, "n_iter": 70, "norm_constraint": 1e-3,
                    "act_margin": [5.0, 20.0, 10.0], "act_ratio": 0.88, "save_freq": 500, "merge_freq": 1000,
                    "merge_alg": "ties", "layer": 27}
    else:
        yaml_text = ("alg_name: \"GRACE\"\nmodel_name: ./llama-2-7b\ndevice: 0\ninner_params:\n"
                     "- model.layers[27].mlp.down_proj.weight\nedit_lr: 1.0\nn_iter: 100\neps: 1.0\n"
                     "dist_fn: euc\nval_init: cold\nval_train: sgd\nval_reg: None\nreg: early_stop\n"
                     "replacement: replace_last\neps_expand: coverage\nnum_pert: 8\n")
        expected = {"layer": 27, "edit_lr": 1.0, "n_iter": 100, "eps": 1.0, "dist_fn": "euc", "val_init": "cold",
                    "eps_expand": "coverage"}
    path = tmp_path / "hparams.yaml"
    path.write_text(yaml_text)
    try:
        from unlearn_tui.backends.easyedit import import_hparams
    except ImportError:  # the generic importer is not in this build: check the mapping itself
        fields = {f for f in cls.Params.__dataclass_fields__}
        assert all((v if isinstance(v, str) else v[0]) in fields for v in cls.EASYEDIT_KEYS.values())
        return
    method, params, ignored = import_hparams(path)
    assert method == name
    assert params == expected
    assert "model_name" in ignored and "device" in ignored
    from unlearn_tui.backends.methods import make

    make(name, params)   # the imported values validate


def test_grace_keys_every_question_of_a_merged_request(llama_handle):
    """Query merging: a merged request's questions, each asked alone, hit the codebook (one entry each)."""
    from unlearn_tui.backends.editing.grace_codebook import GraceCodebook

    items = _requests(4)
    merged = [Request(prompt=" ".join(r.prompt for r in pair), target=pair[0].target, subject=None,
                      item_ids=[i for r in pair for i in r.item_ids], questions=[r.prompt for r in pair],
                      targets=[r.target for r in pair]) for pair in (items[:2], items[2:])]
    _, report = _apply(llama_handle, "grace", GRACE_FAST, merged)
    cb = llama_handle.find_wrapper(GraceCodebook)
    assert report["edits"] == 2 and all(e["members"] == 2 for e in report["per_edit"])
    for r in items:
        assert cb.describe_query(llama_handle, r.prompt)["grace_hit"] == 1.0, r.prompt
    # the merged prompt itself is not what was keyed: an unrelated question still misses
    assert cb.describe_query(llama_handle, "What colour is the sky on a clear day?")["grace_hit"] == 0.0


def test_out_of_scope_questions_ask_no_fact_of_the_benchmark_sets(shared_data):
    """WISE's out-of-scope examples (and GRACE's neutral prompts) must not be forget or retain items of the data
    we measure on: none asks the same fact (same subject and most content words) as a question of TOFU's
    217-item factual set or of builtin:world-facts."""
    import json
    from importlib import resources

    from unlearn_tui.backends.editing.lifelong import NEUTRAL_PROMPTS, NEUTRAL_QUESTIONS
    from unlearn_tui.backends.selfimprove import paraphrase_jaccard
    from unlearn_tui.backends.subjects import detect_subject

    files = [shared_data / "tofu" / "real_authors_perturbed.json", shared_data / "tofu" / "world_facts_perturbed.json"]
    lines = [line for f in files for line in f.read_text(encoding="utf-8").splitlines()]
    lines += resources.files("unlearn_tui.backends").joinpath("builtin", "world_facts.jsonl").read_text(
        encoding="utf-8").splitlines()
    questions = [json.loads(line)["question"] for line in lines if line.strip()]
    assert len(questions) >= 217 + 80

    def subject(q: str) -> str:
        return (detect_subject(q) or "").strip("'\" ").lower()

    by_subject: dict = {}
    for q in questions:
        by_subject.setdefault(subject(q), []).append(q)
    clashes = [(n, q) for n in NEUTRAL_QUESTIONS + NEUTRAL_PROMPTS for q in by_subject.get(subject(n), [])
               if paraphrase_jaccard(n, q) > 0.5]   # "largest island" vs "largest desert in the world": 0.5
    assert clashes == []
    # the check finds the three that were there until stop 27
    for old in ("Who wrote the novel Don Quixote?", "Who was the first president of the United States?",
                "What is the largest island in the world?"):
        assert any(paraphrase_jaccard(old, q) > 0.5 for q in by_subject.get(subject(old), []))
