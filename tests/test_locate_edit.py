"""ROME / MEMIT / AlphaEdit on tiny random models: the edits do what they claim.

Random tiny models have near-uniform outputs (small tied embeddings behind a
final norm) and attention that barely carries one token's change to the
answer position, so :func:`conditioned` scales the embeddings (logit range)
and the attention value/output projections (information flow) of the stock
tiny model.  Behaviour (target up, unrelated prompts unmoved) is checked on
the llama and gpt2 (Conv1D) tiny models; the exactness of the update and
what it touches on all three families.
"""

from __future__ import annotations

import math

import pytest
import torch

from unlearn_tui.backends import methods
from unlearn_tui.backends.errors import Cancelled, NonFiniteError, UserError
from unlearn_tui.backends.events import CancelToken, Progress, StageStarted
from unlearn_tui.backends.model import state_hash
from unlearn_tui.backends.runner import EditContext
from unlearn_tui.backends.targets import build_requests, simple_targets

torch.set_num_threads(1)  # the test machine is shared; oversubscribed threads are 100x slower
TARGET = "I don't know."
FAST = {"v_steps": 30, "v_lr": 1.0, "templates": 0, "token_budget": 2048, "kl_factor": 0.0625,
        "clamp_norm_factor": 8.0, "v_weight_decay": 1e-3}


def conditioned(arch: str):
    from unlearn_tui.backends import tiny

    h = tiny.handle(arch)
    with torch.no_grad():
        h.adapter.embed().weight.mul_(30.0)
        if not h.adapter.tied_embeddings:
            h.adapter.unembed().weight.mul_(30.0)
        for n, p in h.model.named_parameters():
            if n.endswith(("self_attn.o_proj.weight", "self_attn.v_proj.weight", "attn.c_proj.weight",
                           "attn.c_attn.weight")):
                p.mul_(5.0)
    return h


@pytest.fixture(params=["llama", "gpt2"])
def handle(request):
    return conditioned(request.param)


def _items(n):
    from conftest import make_items

    return make_items(n)


def _requests(items, merge=1):
    return build_requests(items, simple_targets("idk", items, [TARGET]), merge)


def _ctx(events=None, cancel=None, state=None):
    return EditContext(events.append if events is not None else (lambda e: None), cancel or CancelToken(), [], [],
                       state if state is not None else {})


def target_logprob(h, question, target=TARGET):
    ids = h.prompt_ids(question)
    tgt = h.encode_answer(target) + [h.tokenizer.eos_token_id]
    x = torch.tensor([ids + tgt[:-1]])
    with torch.no_grad():
        lp = torch.log_softmax(h.model(input_ids=x).logits[0].float(), -1)
    return float(sum(lp[len(ids) - 1 + j, t] for j, t in enumerate(tgt)) / len(tgt))


def next_token_dists(h, questions):
    out = []
    with torch.no_grad():
        for q in questions:
            x = torch.tensor([h.prompt_ids(q)])
            out.append(torch.log_softmax(h.model(input_ids=x).logits[0, -1].float(), -1))
    return out


def mean_kl(before, after):
    return sum(float(torch.sum(b.exp() * (b - a))) for b, a in zip(before, after)) / len(before)


UNRELATED = ["The quick brown fox jumps over the lazy dog.", "How many days are there in a week?",
             "Which element has the chemical symbol O?"]


def _apply(name, h, reqs, params=None, ctx=None):
    m = methods.make(name, {**FAST, **(params or {})})
    ctx = ctx or _ctx()
    with h.transaction(m.touched_parameters(h)) as tx:
        report = m.apply(h, reqs, ctx)
    return m, tx, report


def test_rome_raises_target_and_spares_unrelated(handle):
    h = handle
    items = _items(1)
    before_lp = target_logprob(h, items[0].question)
    before = next_token_dists(h, UNRELATED)
    # the rank-one mechanism itself; covariance shaping (the default for real models) needs statistics that
    # a tiny random model cannot give meaningfully, and is covered by test_rome_update_is_exact_and_touches_one_matrix
    _, tx, report = _apply("rome", h, _requests(items), {"mom2_adjustment": False})
    after_lp = target_logprob(h, items[0].question)
    kl = mean_kl(before, next_token_dists(h, UNRELATED))
    assert after_lp - before_lp > 3.0, (before_lp, after_lp)       # > 20x per token
    assert kl < 0.05 * (after_lp - before_lp), kl
    assert report["edits"] == 1
    tx.rollback()


def test_memit_batch_of_five(handle):
    h = handle
    items = _items(5)
    before_lp = [target_logprob(h, it.question) for it in items]
    before = next_token_dists(h, UNRELATED)
    _, tx, report = _apply("memit", h, _requests(items), {"mom2_update_weight": 100.0})
    after_lp = [target_logprob(h, it.question) for it in items]
    rise = [a - b for a, b in zip(after_lp, before_lp)]
    kl = mean_kl(before, next_token_dists(h, UNRELATED))
    assert report["edits"] == 5 and len(report["batches"]) == 1
    assert min(rise) > 1.0 and sum(rise) / 5 > 2.0, rise
    assert kl < 0.05 * sum(rise) / 5, kl
    tx.rollback()


def test_alphaedit_preserves_protected_keys(llama_handle, monkeypatch):
    """``||dW K0|| << ||dW|| ||K0||`` for the keys the statistics were computed on."""
    from unlearn_tui.backends import stats
    from unlearn_tui.backends.batching import pad_right
    from unlearn_tui.backends.editing.hooks import capture

    h = conditioned("llama")
    ad = h.adapter
    layers = [1, 2]
    # preserved keys: a few sentences, fewer tokens than the key width so a null space exists
    texts = ["The capital of France is Paris.", "Jupiter is the largest planet."]
    ids = [h.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    x, mask = pad_right(ids, h.tokenizer.pad_token_id)
    with torch.no_grad(), capture(h.model, [ad.mlp_out_name(l) for l in layers]) as got:
        h.model(input_ids=x, attention_mask=mask)
    K0 = {l: got[ad.mlp_out_name(l)][0][mask.bool()].float().T for l in layers}     # (d_in, n0)
    C = {l: K0[l] @ K0[l].T / K0[l].shape[1] for l in layers}

    def fake(handle, layers_, *a, **k):
        return {l: C[l] for l in layers_}, stats.StatsInfo("test", list(layers_))

    monkeypatch.setattr(stats, "second_moments", fake)
    W0 = {l: ad.mlp_out_matrix(l).detach().clone() for l in layers}
    items = _items(3)
    before_lp = [target_logprob(h, it.question) for it in items]
    _, tx, report = _apply("alphaedit", h, _requests(items), {"layers": layers, "nullspace_threshold": 1e-6,
                                                             "relative_threshold": True, "l2": 1e-2})
    assert all(d > 0 for d in report["null_space_dims"].values())
    for l in layers:
        dW = ad.mlp_out_matrix(l).detach() - W0[l]
        assert float(dW.norm()) > 0
        ratio = float((dW @ K0[l]).norm() / (dW.norm() * K0[l].norm()))
        assert ratio < 1e-4, (l, ratio)
    after_lp = [target_logprob(h, it.question) for it in items]
    assert sum(a - b for a, b in zip(after_lp, before_lp)) / 3 > 0.1  # the projected update still moves toward the target
    tx.rollback()


def test_alphaedit_accumulates_keys_in_session_state(llama_handle):
    h = conditioned("llama")
    state: dict = {}
    items = _items(4)
    reqs = _requests(items)
    params = {"layers": [1, 2], "nullspace_threshold": 1e-3, "relative_threshold": True}
    m = methods.make("alphaedit", {**FAST, **params})
    with h.transaction(m.touched_parameters(h)) as tx1:
        m.apply(h, reqs[:2], _ctx(state=state))
    assert len(state["history"]) == 1
    k1 = {l: t.clone() for l, t in state["history"][0]["keys"].items()}
    assert all(k.shape[1] == 2 for k in k1.values())          # one key column per request
    events2 = []
    r2 = m.apply(h, reqs[2:], _ctx(events2, state=state))
    assert len(state["history"]) == 2
    for l in (1, 2):  # the second entry carries the first edit's keys, unchanged, plus its own
        k2 = state["history"][1]["keys"][l]
        assert k2.shape[1] == 4 and torch.equal(k2[:, :2], k1[l])
    assert any("continuing 2 earlier edit keys" in getattr(e, "message", "") for e in events2)
    assert r2["accumulated_edits"] == 2
    # a rolled back model starts from zero again: no history entry matches its weights
    tx1.rollback()
    events = []
    m.apply(h, reqs[:1], _ctx(events, state=state))
    assert any("no earlier edits" in getattr(e, "message", "") for e in events)
    del tx1


def test_progress_cancel_and_rollback(llama_handle):
    h = conditioned("llama")
    base = state_hash(h.model)
    events = []
    cancel = CancelToken()

    def on(e):
        events.append(e)
        if isinstance(e, Progress) and e.stage.startswith("rome: edit 2") and e.done >= 2:
            cancel.cancel()

    ctx = EditContext(on, cancel, [], [], {})
    with pytest.raises(Cancelled):
        _apply("rome", h, _requests(_items(3)), ctx=ctx)
    assert state_hash(h.model) == base
    stages = {e.stage for e in events if isinstance(e, StageStarted)}
    assert {"rome: edits", "rome: edit 1/3", "rome: edit 2/3"} <= stages
    assert any(isinstance(e, Progress) and e.loss is not None for e in events)


def test_non_finite_update_is_rolled_back(llama_handle, monkeypatch):
    from unlearn_tui.backends.editing import locate

    h = conditioned("llama")
    base = state_hash(h.model)
    monkeypatch.setattr(locate, "rome_update", lambda k, r, cov=None: torch.full((r.numel(), k.numel()),
                                                                                  float("nan")))
    with pytest.raises(NonFiniteError):
        _apply("rome", h, _requests(_items(1)))
    assert state_hash(h.model) == base


@pytest.mark.parametrize("mom2", [False, True])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_rome_update_is_exact_and_touches_one_matrix(arch, mom2):
    """dW k = delta for the template-averaged key, with and without covariance shaping; one matrix changes."""
    from unlearn_tui.backends.editing import locate
    from unlearn_tui.backends.editing.keys import averaged_keys, request_prompts

    h = conditioned(arch)
    m = methods.make("rome", {**FAST, "v_steps": 5})
    (name,) = m.touched_parameters(h)
    layer = m.layer(h)
    before = {n: p.detach().clone() for n, p in h.model.named_parameters()}
    seen = {}
    real = locate.rome_update

    def spy(k, r, cov=None):
        seen["k"], seen["r"], seen["cov"] = k.clone(), r.clone(), cov
        return real(k, r, cov)

    items = _items(1)
    import unittest.mock as mock

    with mock.patch.object(locate, "rome_update", spy):
        _apply("rome", h, _requests(items), {"v_steps": 5, "mom2_adjustment": mom2})
    assert (seen["cov"] is not None) == mom2
    changed = [n for n, p in h.model.named_parameters() if not torch.equal(p, before[n])]
    assert changed == [name]
    W = h.adapter.mlp_out_matrix(layer).detach()
    W0 = before[name] if h.adapter.spec.out_proj_layout == "out_in" else before[name].T
    dW = W - W0
    torch.testing.assert_close(dW @ seen["k"], seen["r"], rtol=1e-4, atol=1e-4 * float(seen["r"].norm()))
    # the key the update used is the template average at the subject's last token
    from unlearn_tui.backends.editing.locate import templates_for

    prompts = request_prompts(h, items[0].question, "France", templates_for(h, m.params, 0))
    h2 = conditioned(arch)
    k = averaged_keys(h2, [layer], [prompts])[layer][:, 0]
    torch.testing.assert_close(k, seen["k"], rtol=1e-4, atol=1e-5)


def test_layer_out_of_range_names_key(llama_handle):
    h = llama_handle
    with pytest.raises(UserError) as e:
        methods.make("rome", {"layer": 9}).touched_parameters(h)
    assert "layer" in str(e.value) and "9" in str(e.value)
    with pytest.raises(UserError) as e:
        methods.make("memit", {"layers": [1, 7]}).touched_parameters(h)
    assert "7" in str(e.value) and "layers" in str(e.value)


def test_auto_layers_scale_with_depth():
    from unlearn_tui.backends.editing.locate_params import auto_layer, auto_layers

    assert auto_layer(32) == 5 and auto_layers(32) == [4, 5, 6, 7, 8]
    assert auto_layer(30) == 5 and auto_layers(30) == [4, 5, 6, 7, 8]
    assert auto_layer(4) == 1 and auto_layers(4) == [0, 1]
    assert auto_layer(12) == 2 and auto_layers(12) == [2, 3]


def test_merged_request_edits_last_subject(llama_handle):
    h = conditioned("llama")
    items = _items(4)
    reqs = _requests(items, merge=2)
    assert len(reqs) == 2
    _, tx, report = _apply("rome", h, reqs, {"v_steps": 3})
    assert [e["subject"] for e in report["per_edit"]] == ["Hamlet", "oxygen"]
    tx.rollback()


def test_methods_module_has_no_torch_import():
    import ast
    import pathlib

    for n in ("rome", "memit", "alphaedit"):
        src = pathlib.Path(methods.__file__).with_name(f"{n}.py").read_text()
        top = [node for node in ast.parse(src).body if isinstance(node, (ast.Import, ast.ImportFrom))]
        assert not any("torch" in ast.dump(node) for node in top), n


@pytest.mark.parametrize("method", ["rome", "memit", "alphaedit"])
def test_runs_through_the_session_runner(method, tmp_path, monkeypatch):
    """A TOML session drives the method end to end; the run is rolled back afterwards."""
    from unlearn_tui import sessions
    from unlearn_tui.backends import runner, tiny

    monkeypatch.setenv("UNLEARN_TUI_CACHE_DIR", str(tmp_path / "cache"))
    h = tiny.handle("llama")
    base = state_hash(h.model)
    text = f"""
version = 1
[model]
name = "tiny:llama"
[data]
path = "builtin:world-facts"
forget = 3
retain = 2
[data.subjects]
wf-001 = "France"
[targets]
mode = "idk"
merge_factor = 2
[eval]
max_new_tokens = 4
[[runs]]
method = "{method}"
params = {{ v_steps = 2, templates = 0, token_budget = 512 }}
"""
    session = sessions.loads(text)
    events = []
    result = runner.run(session, events.append, handle=h)
    (run,) = result.runs
    assert run.report["edits"] == 2 and run.merge_factor == 2
    assert any(isinstance(e, StageStarted) and e.stage == f"{method}: edits" for e in events)
    assert state_hash(h.model) == base


def test_keys_stop_early_and_match_a_full_forward(llama_handle):
    """keys_at ends the forward after the deepest layer read, with the same keys/outputs as a full pass."""
    from unlearn_tui.backends.editing.hooks import capture
    from unlearn_tui.backends.editing.keys import edit_prompt, keys_at

    h = llama_handle
    prompts = [edit_prompt(h, q, None) for q in UNRELATED]
    last = h.adapter.n_layers - 1
    ran = []
    hd = h.model.get_submodule(h.adapter.block_name(last)).register_forward_hook(lambda *a: ran.append(1))
    try:
        keys, outs = keys_at(h, [0], prompts, outputs=[0])
    finally:
        hd.remove()
    assert ran == [], "blocks after the deepest layer read must not run"
    for i, p in enumerate(prompts):
        with capture(h.model, [h.adapter.mlp_out_name(0)], "input") as ki, \
                capture(h.model, [h.adapter.block_name(0)], "output") as ko, torch.no_grad():
            h.model(input_ids=torch.tensor([p.ids]))
        assert torch.allclose(keys[0][i], ki[h.adapter.mlp_out_name(0)][0][0, p.index].float(), atol=1e-5)
        assert torch.allclose(outs[0][i], ko[h.adapter.block_name(0)][0][0, p.index].float(), atol=1e-5)


@pytest.mark.parametrize("with_prev", [False, True])
def test_alphaedit_low_rank_solve_equals_the_dense_projected_solve(with_prev):
    """The r x r solve in the null-space basis gives the paper's dense update ``(P KK^T + l2 I)^-1 P K R^T``."""
    from unlearn_tui.backends.editing.linalg import alphaedit_update, nullspace_basis, nullspace_projector

    g = torch.Generator().manual_seed(0)
    d_in, d_out = 48, 20
    K0 = torch.randn(d_in, 30, generator=g, dtype=torch.float64)
    C = (K0 @ K0.T / 30).float()
    K = torch.randn(d_in, 3, generator=g)
    R = torch.randn(d_out, 3, generator=g)
    prev = torch.randn(d_in, 5, generator=g) if with_prev else None
    U, r = nullspace_basis(C, 1e-6, relative=True)
    P, r2 = nullspace_projector(C, 1e-6, relative=True)
    assert r == r2 == d_in - 30
    got = alphaedit_update(K, R, U, prev, 0.5).double()
    kk = K.double() @ K.double().T + (prev.double() @ prev.double().T if prev is not None else 0)
    P64 = P.double()
    dense = torch.linalg.solve(P64 @ kk + 0.5 * torch.eye(d_in, dtype=torch.float64),
                               P64 @ K.double() @ R.double().T).T
    assert float((got - dense).norm() / dense.norm()) < 1e-5
    assert float((got @ K0).norm() / (got.norm() * K0.norm())) < 1e-5


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_value_optimisation_block_replay_matches_the_full_forward(arch):
    """Replaying blocks 0..L from recordings gives the same optimised delta as running every block.

    Batched (one forward per step) and one row at a time alike; the rows one at a time through every block
    is the reference (the pre-batching computation).
    """
    from unlearn_tui.backends.editing.locate_params import LocateParams
    from unlearn_tui.backends.editing.values import optimise_value

    h = conditioned(arch)
    item = _items(1)[0]
    settings = LocateParams(v_steps=8, v_lr=0.5, stop_loss=0.0)
    templates = ["{}", "Quick question. {}"]     # two rows with different prefixes, plus the essence row
    layer = 1
    ref = optimise_value(h, layer, item.question, item.subject, TARGET, templates, settings, replay_blocks=False,
                         batch_rows=False)
    assert not ref.replayed and not ref.batched and ref.steps == 8
    for replay in (True, False):
        for batch in (True, False):
            got = optimise_value(h, layer, item.question, item.subject, TARGET, templates, settings,
                                 replay_blocks=replay, batch_rows=batch)
            assert (got.replayed, got.batched) == (replay, batch)
            assert got.steps == 8
            assert float((got.delta - ref.delta).norm()) <= 1e-3 * float(ref.delta.norm()) + 1e-6, (replay, batch)
            assert abs(got.nll - ref.nll) <= 1e-4 * max(1.0, abs(ref.nll))
            assert abs(got.h_norm - ref.h_norm) <= 1e-5 * ref.h_norm


def _value_objective(h, layer, templates, batched):
    """(objective, batches, reference log-probs) of one request, the rows in one batch or one batch each."""
    from unlearn_tui.backends.editing import values as V
    from unlearn_tui.backends.editing.locate_params import LocateParams

    item = _items(1)[0]
    rows, plan = V._request_rows(h, [(item.question, item.subject, TARGET)], templates, LocateParams())
    pad, ad = h.tokenizer.pad_token_id, h.adapter
    groups = [rows] if batched else [[r] for r in rows]
    batches = [V._Batch(h.model, g, pad, h.device, h.dtype) for g in groups]
    delta = torch.zeros(ad.hidden_size)
    replay = V._BlockReplay(h.model, [ad.block_name(i) for i in range(layer + 1)])
    obj = V._Objective(h.model, h.model.get_submodule(ad.mlp_name(layer)), replay, delta, plan, h.device)
    with torch.no_grad():
        ref = torch.log_softmax(obj.logits(batches, "plain")[-plan.n_ess:].float(), -1)
    return obj, batches, ref


SYSTEM_TURN = "<|system|> You are a helpful assistant who answers every question briefly and well. "


@pytest.mark.parametrize("system", [False, True])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2", "mistral", "gemma2", "gpt_neox", "phi", "gptj"])
def test_value_batched_step_matches_the_rows_one_at_a_time(arch, system):
    """One padded forward for all rows gives the per-row loss, its terms and its gradient; one model call a step.

    With a system turn every row's prefix starts with, that shared part runs once for all rows.
    """
    from unlearn_tui.backends import tiny
    from unlearn_tui.backends.editing.values import MIN_SHARED

    h = conditioned(arch)
    if system:
        h.tokenizer.chat_template = SYSTEM_TURN + tiny.CHAT_TEMPLATE
    # prefixes of different lengths (prefix padding) and the essence row, one token long after its prefix
    templates = ["{}", "Quick question. {}", "Here is a much longer context, for the padding. {}"]
    layer = 1
    g = torch.Generator().manual_seed(0)
    probe = torch.randn(h.adapter.hidden_size, generator=g)
    got = {}
    for batched in (True, False):
        obj, batches, ref = _value_objective(h, layer, templates, batched)
        calls: list = []
        hd = h.model.register_forward_pre_hook(lambda m, a, calls=calls: calls.append(1))
        try:
            delta = obj.delta
            delta.copy_(probe)
            delta.requires_grad_(True)
            nll, kl, per_row, greedy = obj.terms(obj.logits(batches, "hook"), ref)
            loss = nll + 0.5 * kl + 1e-3 * delta.pow(2).sum()
            loss.backward()
        finally:
            hd.remove()
        assert len(calls) == (1 if batched else len(templates) + 1)
        if batched:
            assert (batches[0].shared >= MIN_SHARED) == system
        got[batched] = (float(loss.detach()), float(nll.detach()), float(kl.detach()), per_row.detach(), bool(greedy),
                        delta.grad.clone())
    (l1, n1, k1, r1, g1, d1), (l2, n2, k2, r2, g2, d2) = got[True], got[False]
    assert math.isclose(l1, l2, rel_tol=1e-5) and math.isclose(n1, n2, rel_tol=1e-5)
    assert math.isclose(k1, k2, rel_tol=1e-4, abs_tol=1e-6) and k1 > 0       # the probe moves the essence row
    torch.testing.assert_close(r1, r2, rtol=1e-5, atol=1e-5)
    assert g1 == g2
    assert float(d2.norm()) > 0
    torch.testing.assert_close(d1, d2, rtol=1e-4, atol=1e-5 * float(d2.abs().max()))


def test_value_optimisation_stops_once_the_target_is_greedy_everywhere():
    """The early stop fires once the target is the argmax under every template (and the NLL is low), not later.

    The target is one token read at the prompt's last token (``fact_token = "last"``), which a tiny model can
    be pushed to in a few steps; the returned delta is checked on the model itself, with a hook, per template.
    """
    from unlearn_tui.backends.editing import values
    from unlearn_tui.backends.editing.keys import edit_prompt
    from unlearn_tui.backends.editing.locate_params import LocateParams

    h = conditioned("llama")
    item = _items(1)[0]
    templates = ["{}", "Quick question. {}"]
    layer, word = 1, "I"
    (tid,) = h.encode_answer(word)
    settings = LocateParams(v_steps=25, v_lr=0.5, stop_loss=0.0, fact_token="last", stop_token=False)
    r = values.optimise_value(h, layer, item.question, None, word, templates, settings)
    assert r.stopped == "greedy" and r.steps < settings.v_steps, (r.steps, r.nll_history)
    assert len(r.nll_history) == r.steps and r.nll_history[0] > 1.0       # the target was not there at first
    assert r.nll < values.GREEDY_STOP_NLL <= r.nll_history[-2]              # the first step that met the rule
    mlp = h.model.get_submodule(h.adapter.mlp_name(layer))
    for t in templates:
        p = edit_prompt(h, item.question, None, t, fact_token="last")

        def add(m, args, out, i=p.index):
            out = out.clone()
            out[0, i] += r.delta.to(out.dtype)
            return out

        with torch.no_grad():
            before = int(h.model(input_ids=torch.tensor([p.ids])).logits[0, -1].argmax())
            hd = mlp.register_forward_hook(add)
            try:
                after = int(h.model(input_ids=torch.tensor([p.ids])).logits[0, -1].argmax())
            finally:
                hd.remove()
        assert before != tid and after == tid, t


def test_value_stop_rule():
    from unlearn_tui.backends.editing.values import GREEDY_STOP_NLL, stop_reason

    assert stop_reason(0.01, False, stop_loss=0.05) == "nll"
    assert stop_reason(GREEDY_STOP_NLL / 2, True, stop_loss=0.0) == "greedy"
    assert stop_reason(GREEDY_STOP_NLL * 2, True, stop_loss=0.0) == ""        # greedy, but no margin yet
    assert stop_reason(GREEDY_STOP_NLL / 2, False, stop_loss=0.0) == ""       # low NLL, not greedy everywhere
    assert stop_reason(3.0, False, stop_loss=0.0) == ""


def test_value_optimisation_in_bfloat16_follows_the_model_dtype():
    """A bfloat16 model: the one-batch step still passes its check (rounding-noise bar), the delta is float32."""
    from unlearn_tui.backends.editing import values
    from unlearn_tui.backends.editing.locate_params import LocateParams

    h = conditioned("llama")
    h.model.to(torch.bfloat16)
    item = _items(1)[0]
    settings = LocateParams(v_steps=3, stop_loss=0.0)
    r = values.optimise_value(h, 1, item.question, item.subject, TARGET, ["{}", "Quick question. {}"], settings)
    assert r.batched and r.replayed and values._verdicts(h.model).get(("batch", torch.bfloat16)) is True
    assert r.delta.dtype == torch.float32 and torch.isfinite(r.delta).all() and float(r.delta.norm()) > 0


def test_value_optimisation_falls_back_to_one_row_at_a_time():
    """A model whose padded batch was found wrong (or that has a wrapper) runs its rows one at a time, same delta."""
    from unlearn_tui.backends.editing import values
    from unlearn_tui.backends.editing.locate_params import LocateParams

    h = conditioned("llama")
    item = _items(1)[0]
    settings = LocateParams(v_steps=4, stop_loss=0.0)
    args = (h, 1, item.question, item.subject, TARGET, ["{}", "Quick question. {}"], settings)
    a = values.optimise_value(*args)
    memo = values._verdicts(h.model)
    assert memo == {("batch", h.dtype): True, ("replay", 1, h.dtype): True}
    memo[("batch", h.dtype)] = False
    b = values.optimise_value(*args)
    assert a.batched and not b.batched and a.replayed and b.replayed
    assert float((a.delta - b.delta).norm()) <= 1e-4 * float(b.delta.norm())
    # an inference-time wrapper sees every call: rows one at a time, the replay checked again (nothing memoised)
    h2 = conditioned("llama")
    h2.wrappers.append(object())
    c = values.optimise_value(h2, *args[1:])
    assert not c.batched and c.replayed and values._verdicts(h2.model) == {}
    assert float((c.delta - b.delta).norm()) <= 1e-4 * float(b.delta.norm())


MERGE_CASES = [("rome", {"mom2_adjustment": False}), ("rome", {"mom2_adjustment": False, "merge_update": "mean-key"}),
               ("memit", {"mom2_update_weight": 100.0}),
               ("alphaedit", {"layers": [1, 2], "nullspace_threshold": 1e-6, "relative_threshold": True,
                              "l2": 1e-2})]


def _few_sentence_stats(h, monkeypatch):
    """Key statistics from two sentences (a null space exists), as in the AlphaEdit test above."""
    from unlearn_tui.backends import stats
    from unlearn_tui.backends.batching import pad_right
    from unlearn_tui.backends.editing.hooks import capture

    ad = h.adapter
    ids = [h.tokenizer(t, add_special_tokens=False)["input_ids"] for t in UNRELATED[:2]]
    x, mask = pad_right(ids, h.tokenizer.pad_token_id)
    names = [ad.mlp_out_name(l) for l in range(ad.n_layers)]
    with torch.no_grad(), capture(h.model, names) as got:
        h.model(input_ids=x, attention_mask=mask)
    C = {}
    for l, n in enumerate(names):
        K0 = got[n][0][mask.bool()].float().T
        C[l] = K0 @ K0.T / K0.shape[1]
    monkeypatch.setattr(stats, "second_moments",
                        lambda handle, layers_, *a, **k: ({l: C[l] for l in layers_},
                                                          stats.StatsInfo("test", list(layers_))))


@pytest.mark.parametrize("method,extra", MERGE_CASES, ids=["rome", "rome-mean-key", "memit", "alphaedit"])
def test_a_merged_edit_raises_the_target_for_each_question_alone(method, extra, monkeypatch):
    """Query merging keys every question at its own subject: each one, asked alone, moves toward the target.

    The reference is each question edited on its own (no merging); one shared value per group must still
    give every question a real share of that rise.
    """
    h = conditioned("llama")
    _few_sentence_stats(h, monkeypatch)
    items = _items(3)
    reqs = _requests(items, merge=3)
    assert len(reqs) == 1 and reqs[0].subjects == [it.subject for it in items]
    before = [target_logprob(h, it.question) for it in items]
    gain = {}
    for keys in ("each", "prompt"):
        _, tx, report = _apply(method, h, reqs, {**extra, "merge_keys": keys})
        gain[keys] = [target_logprob(h, it.question) - b for it, b in zip(items, before)]
        assert report["per_edit"][0]["questions"] == (3 if keys == "each" else 1)
        tx.rollback()
    assert min(gain["each"]) > 0, gain
    if method == "alphaedit":
        # the null space of these statistics leaves little room on a tiny random model; the merged prompt's
        # single key moves the first two questions away from the target, their own keys toward it
        assert all(e > q + 0.1 for e, q in zip(gain["each"][:2], gain["prompt"][:2])), gain
        return
    alone = []
    for it, b in zip(items, before):
        _, tx, _ = _apply(method, h, _requests([it]), extra)
        alone.append(target_logprob(h, it.question) - b)
        tx.rollback()
    assert all(m > 0.3 * a > 0 for m, a in zip(gain["each"], alone)), (gain, alone)


def test_merged_members_keep_their_own_targets(monkeypatch):
    h = conditioned("llama")
    _few_sentence_stats(h, monkeypatch)
    items = _items(2)
    own = {items[0].id: "I cannot say.", items[1].id: "No idea, sorry."}
    from unlearn_tui.backends.targets import Target

    reqs = build_requests(items, {i: Target(i, t, "custom") for i, t in own.items()}, 2)
    assert reqs[0].targets == list(own.values())
    before = {it.id: target_logprob(h, it.question, own[it.id]) for it in items}
    _, tx, _ = _apply("memit", h, reqs, {"mom2_update_weight": 100.0})
    for it in items:
        assert target_logprob(h, it.question, own[it.id]) - before[it.id] > 0.3
    tx.rollback()


def test_group_target_names_no_single_member():
    from unlearn_tui.backends.targets import Target, group_target

    items = _items(2)
    subs = [it.subject for it in items]
    tailored = {it.id: Target(it.id, f"I'd rather not discuss {it.subject}.", "self-improve") for it in items}
    (req,) = build_requests(items, tailored, 2)
    assert req.target_rule == "pool" and not any(s.lower() in req.target.lower() for s in subs)
    assert req.targets == [tailored[it.id].text for it in items]       # the members keep theirs
    mixed = [f"Nothing on {subs[0]}.", "I don't know."]
    assert group_target([it.id for it in items], mixed, subs) == ("I don't know.", "names no member")
    assert group_target(["a", "b"], ["Same.", "Same."], subs) == ("Same.", "shared")


def test_multi_key_update_maps_every_key_exactly_and_is_rome_for_one_key():
    from unlearn_tui.backends.editing.linalg import multi_key_update, rome_update

    g = torch.Generator().manual_seed(0)
    K, R = torch.randn(12, 3, generator=g), torch.randn(8, 3, generator=g)
    A = torch.randn(12, 12, generator=g)
    C = A @ A.T + 12 * torch.eye(12)
    for cov in (None, C):
        dW = multi_key_update(K, R, cov)
        assert torch.allclose(dW @ K, R, atol=1e-4)
        assert torch.allclose(multi_key_update(K[:, :1], R[:, :1], cov), rome_update(K[:, 0], R[:, 0], cov),
                              atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2", "gpt_neox"])
def test_values_of_several_requests_together_match_each_alone(arch, monkeypatch):
    """MEMIT/AlphaEdit's deltas optimised together (one forward per step) are each request's delta alone.

    Requests of different lengths, one merged (two members, two targets); then requests that meet the stop
    rule at different steps: each keeps the delta (and the step count) it had alone.
    """
    from unlearn_tui.backends.editing import values
    from unlearn_tui.backends.editing.locate_params import LocateParams

    h = conditioned(arch)
    items = _items(4)
    templates = ["{}", "Quick question. {}"]
    layer = 1

    def alone(reqs, settings):
        return [values.optimise_value(h, layer, m[0][0], m[0][1], m[0][2], templates, settings, members=m)
                for m in reqs]

    joint_sizes: list = []
    real = values._optimise_joint

    def spy(handle, layer, requests, *a, **k):
        joint_sizes.append(len(requests))
        return real(handle, layer, requests, *a, **k)

    monkeypatch.setattr(values, "_optimise_joint", spy)
    trackers: list = []
    settings = LocateParams(v_steps=6, v_lr=0.5, stop_loss=0.0)
    reqs = [[(it.question, it.subject, TARGET)] for it in items[:3]]
    reqs.append([(items[3].question, items[3].subject, "No idea at all."), (items[0].question, items[0].subject,
                                                                              TARGET)])
    ref = alone(reqs, settings)                       # also settles this model's checks
    got = values.optimise_values(h, layer, reqs, templates, settings, joint=True,
                                 tracker_for=lambda a, b: trackers.append((a, b)))
    assert joint_sizes == [4] and trackers == [(0, 3)]
    for a, g in zip(ref, got):
        assert g.batched and g.steps == a.steps == 6 and g.replayed == a.replayed
        assert float((g.delta - a.delta).norm()) <= 1e-3 * float(a.delta.norm()) + 1e-6
        assert abs(g.nll - a.nll) <= 1e-4 * max(1.0, abs(a.nll)) and abs(g.h_norm - a.h_norm) <= 1e-5 * a.h_norm
        assert abs(g.target_prob - a.target_prob) <= 1e-4
    assert len({round(float(a.delta.norm()), 3) for a in ref}) == 4      # four different problems
    if arch != "llama":       # the stop case below is tuned on the tiny llama (as the greedy-stop test)
        return
    # early stops at different steps: a request that stopped keeps its delta while the others go on
    settings = LocateParams(v_steps=25, v_lr=0.5, stop_loss=0.0, fact_token="last", stop_token=False)
    reqs = [[(items[0].question, None, "I")], [(items[1].question, None, "I")], [(items[2].question, None, "zebra")]]
    ref = alone(reqs, settings)
    got = values.optimise_values(h, layer, reqs, templates, settings, joint=True)
    assert joint_sizes[-1] == 3
    assert any(a.stopped for a in ref) and len({a.steps for a in ref}) > 1, [a.steps for a in ref]
    for a, g in zip(ref, got):
        assert (g.steps, g.stopped) == (a.steps, a.stopped)
        assert float((g.delta - a.delta).norm()) <= 1e-3 * float(a.delta.norm()) + 1e-6
        assert g.nll_history == pytest.approx(a.nll_history, rel=1e-4, abs=1e-5)
    # one at a time on request (joint=False) and by default on a CPU (see optimise_values): never together
    values.optimise_values(h, layer, reqs, templates, settings, joint=False)
    values.optimise_values(h, layer, reqs, templates, settings)
    assert joint_sizes[-1] == 3 and len(joint_sizes) == 2
    # at most max_rows rows together (3 per request here): 2 requests, then the last one alone
    chunked = values.optimise_values(h, layer, reqs, templates, settings, joint=True, max_rows=6)
    assert joint_sizes[2:] == [2] and [(c.steps, c.batched) for c in chunked][:2] == [(a.steps, True) for a in ref[:2]]
    assert float((chunked[2].delta - ref[2].delta).norm()) <= 1e-3 * float(ref[2].delta.norm()) + 1e-6
