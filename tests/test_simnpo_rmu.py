"""SimNPO, RMU and UNDIAL (issue 18) on tiny random models: the losses by hand, the precomputed references,
which weights change, cancel and failures roll back exactly, progress, seeds."""

from __future__ import annotations

import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import ROOT, make_items
from unlearn_tui.backends import methods, tiny, training
from unlearn_tui.backends.errors import Cancelled, NonFiniteError, UserError
from unlearn_tui.backends.events import CancelToken, Progress, StageStarted
from unlearn_tui.backends.methods import rmu
from unlearn_tui.backends.methods.base import EditContext
from unlearn_tui.backends.methods.finetune import simnpo_term
from unlearn_tui.backends.model import state_hash
from unlearn_tui.backends.targets import Request

REFUSAL = "I'm sorry, I don't know the answer to that question."
FAST_RMU = {"steps": 40, "lr": 1e-2, "alpha": 100.0}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _requests(items):
    return [Request(it.question, REFUSAL, it.subject, [it.id], [it.question], [it.answer]) for it in items]


def _ctx(forget, retain, events=None, cancel=None, seed=0):
    return EditContext((events.append if events is not None else (lambda e: None)), cancel or CancelToken(),
                       list(forget), list(retain), {}, seed=seed)


def _data(n_forget=4, n_retain=4):
    items = make_items(n_forget + n_retain)
    return items[:n_forget], items[n_forget:]


def _run(handle, name, params, forget, retain, **ctx_kw):
    m = methods.make(name, params)
    with handle.transaction(m.touched_parameters(handle)) as tx:
        report = m.apply(handle, _requests(forget), _ctx(forget, retain, **ctx_kw))
    return m, tx, report


def _params(handle):
    return {n: p.detach().clone() for n, p in handle.model.named_parameters()}


# --------------------------------------------------------------------------- registry


def test_registered_without_torch():
    code = ("import sys\n"
            "from unlearn_tui.backends import methods\n"
            "from unlearn_tui.backends.params import describe\n"
            "for n in ('simnpo', 'rmu', 'undial'):\n"
            "    assert n in methods.names(), n\n"
            "    cls = methods.get(n)\n"
            "    assert cls.name == n and cls.summary and describe(cls.Params)\n"
            "    methods.make(n, {'alpha': 0})\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_defaults_are_the_cited_ones():
    s = methods.get("simnpo").Params()
    assert (s.beta, s.delta, s.gamma, s.alpha) == (4.5, 0.0, 0.125, 1.0)       # open-unlearning SimNPO.yaml
    r = methods.get("rmu").Params()
    assert (r.alpha, r.lr, r.batch_size, r.steps, r.scope) == (1200.0, 5e-5, 4, 80, "mlp_out")   # WMDP
    assert r.layer is None and r.update_layers is None and r.steering_coeff is None and r.steering_scale == 5.0
    for name in ("simnpo", "rmu"):
        assert methods.get(name).needs_retain is True
        assert methods.make(name, {"alpha": 0}).needs_retain is False
    with pytest.raises(UserError, match="unknown key"):
        methods.make("simnpo", {"reference": "live"})          # reference-free: no reference to choose
    with pytest.raises(UserError, match="scope"):
        methods.make("rmu", {"scope": "attention"})


# --------------------------------------------------------------------------- SimNPO


def test_simnpo_term_by_hand():
    # two answers: token log-probs (-1, -2, -3) and (-0.5): mean token NLLs 2 and 0.5
    tok = torch.tensor([-1.0, -2.0, -3.0, -0.5])
    beta, delta = 2.0, 0.5

    def logsig(x):
        return -math.log1p(math.exp(-x))

    want = -(2 / beta) * (logsig(beta * (2.0 - delta)) + logsig(beta * (0.5 - delta))) / 2
    assert float(simnpo_term(beta, delta, tok, [3, 1])) == pytest.approx(want, rel=1e-6)
    # delta = 0 is the paper's form -(2/beta) log sigmoid(-(beta/|y|) log pi(y|x))
    logp = [-6.0, -0.5]
    paper = -(2 / beta) * sum(logsig(-(beta / n) * lp) for lp, n in zip(logp, (3, 1))) / 2
    assert float(simnpo_term(beta, 0.0, tok, [3, 1])) == pytest.approx(paper, rel=1e-6)


def test_simnpo_loss_on_a_batch_equals_the_formula(llama_handle):
    h = llama_handle
    forget, retain = _data(3, 2)
    f_ex = training.forget_examples(h, _requests(forget))
    r_ex = training.retain_examples(h, retain)
    m = methods.make("simnpo", {"beta": 0.7, "delta": 5.0, "gamma": 0.3, "alpha": 2.0})
    with torch.no_grad():
        loss, parts = training.step_loss(m, h.model, h.tokenizer.pad_token_id, f_ex, r_ex, [0, 1, 2], [0, 1], None)

        def token_logps(e):   # one sequence at a time, no padding: log P(answer token | prefix)
            ids = torch.tensor([e.prompt + e.completion])
            logp = torch.log_softmax(h.model(input_ids=ids).logits[0].float(), dim=-1)
            return [float(logp[len(e.prompt) - 1 + j, t]) for j, t in enumerate(e.completion)]

    forget_terms = []
    for fe in f_ex:
        lp = token_logps(fe.gold)
        mean_nll = -sum(lp) / len(lp)
        forget_terms.append(math.log(1 / (1 + math.exp(-0.7 * (mean_nll - 5.0)))))
    forget_term = -(2 / 0.7) * sum(forget_terms) / len(forget_terms)
    r_tok = [x for e in r_ex for x in token_logps(e)]
    retain_nll = -sum(r_tok) / len(r_tok)
    assert parts["forget_term"] == pytest.approx(forget_term, rel=1e-4)
    assert parts["retain_nll"] == pytest.approx(retain_nll, rel=1e-4)
    assert float(loss) == pytest.approx(0.3 * forget_term + 2.0 * retain_nll, rel=1e-4)


def test_simnpo_is_reference_free_and_unlearns(llama_handle):
    h = llama_handle
    forget, retain = _data()
    m = methods.make("simnpo", {})
    assert not m.reference_needs.any
    assert m.train_config(_ctx(forget, retain), 0, int(h.model.config.vocab_size)).reference is None
    f_ex = training.forget_examples(h, _requests(forget))
    probe = methods.make("gd", {})
    with torch.no_grad():
        _, start = training.step_loss(probe, h.model, 0, f_ex, [], list(range(len(f_ex))), [], None)
    # a random model's answers have NLL ~ log(vocab): a margin keeps the sigmoid out of saturation
    _, tx, rep = _run(h, "simnpo", {"epochs": 8, "lr": 1e-2, "warmup_epochs": 0, "beta": 1.0, "delta": 6.5,
                                    "gamma": 1.0}, forget, retain)
    with torch.no_grad():
        _, after = training.step_loss(probe, h.model, 0, f_ex, [], list(range(len(f_ex))), [], None)
    tx.rollback()
    assert rep["reference"] == {} and rep["objective"] == "simnpo" and rep["steps"] == 8
    assert rep["last_loss"] < rep["first_loss"]
    assert after["forget_nll"] > start["forget_nll"] + 0.1


def test_simnpo_cancel_rolls_back_exactly(llama_handle):
    h = llama_handle
    forget, retain = _data()
    before = state_hash(h.model)
    cancel = CancelToken()

    def on_event(e):
        if isinstance(e, Progress) and e.stage == "simnpo: train" and e.done == 2:
            cancel.cancel()

    m = methods.make("simnpo", {"epochs": 5, "lr": 1e-2})
    with pytest.raises(Cancelled):
        with h.transaction(m.touched_parameters(h)):
            m.apply(h, _requests(forget), EditContext(on_event, cancel, forget, retain, {}))
    assert state_hash(h.model) == before
    assert not any(p.requires_grad or p.grad is not None for p in h.model.parameters())


# --------------------------------------------------------------------------- RMU: layers and weights


def _fake(n_layers):
    from unlearn_tui.backends.arch import SPECS, Adapter

    ad = Adapter.__new__(Adapter)
    ad.spec, ad.n_layers, ad.model = SPECS["llama"], n_layers, None
    return SimpleNamespace(adapter=ad)


def test_rmu_layer_follows_wmdps_relative_depth():
    m = methods.make("rmu", {})
    assert m.layer(_fake(32)) == 7 and m.update_layers(_fake(32)) == [5, 6, 7]       # WMDP on Zephyr-7B
    assert m.layer(_fake(30)) == 7 and m.update_layers(_fake(30)) == [5, 6, 7]       # SmolLM2-135M
    assert m.layer(_fake(4)) == 1 and m.update_layers(_fake(4)) == [0, 1]
    assert m.touched_parameters(_fake(32)) == [f"model.layers.{i}.mlp.down_proj.weight" for i in (5, 6, 7)]
    explicit = methods.make("rmu", {"layer": -2, "update_layers": [2, 0]})
    assert explicit.layer(_fake(4)) == 2 and explicit.update_layers(_fake(4)) == [0, 2]
    with pytest.raises(UserError) as exc:
        methods.make("rmu", {"layer": 1, "update_layers": [1, 3]}).touched_parameters(_fake(4))
    assert exc.value.where == "params.update_layers" and "3" in exc.value.message
    with pytest.raises(UserError, match="out of range"):
        methods.make("rmu", {"layer": 9}).touched_parameters(_fake(4))
    with pytest.raises(UserError, match="at least one"):
        methods.make("rmu", {"update_layers": []}).touched_parameters(_fake(4))


@pytest.mark.parametrize("scope", ["mlp_out", "mlp"])
def test_rmu_changes_exactly_the_touched_parameters(tiny_handle, scope):
    h = tiny_handle
    forget, retain = _data()
    before = _params(h)
    m, tx, rep = _run(h, "rmu", {**FAST_RMU, "steps": 4, "scope": scope}, forget, retain)
    after = _params(h)
    touched = set(m.touched_parameters(h))
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == touched
    assert all(torch.equal(before[n], after[n]) for n in before if n not in touched)   # bitwise unchanged
    if scope == "mlp_out":
        assert touched == {h.adapter.mlp_out_weight_name(i) for i in (0, 1)}
    assert rep["trained_parameters"] == sum(h.parameter(n).numel() for n in touched)
    assert not any(p.requires_grad or p.grad is not None for p in h.model.parameters())
    tx.rollback()
    assert all(torch.equal(before[n], p) for n, p in h.model.named_parameters())


# --------------------------------------------------------------------------- RMU: the reference and the losses


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("tokens", ["answer", "all"])
def test_precomputed_retain_activations_equal_a_fresh_forward(arch, tokens):
    h = tiny.handle(arch)
    _, retain = _data(0, 5)
    r_ex = training.retain_examples(h, retain)
    layer = 1
    run = rmu.LayerRunner(h, layer, tokens)
    ref = rmu.ActivationReference(run, r_ex, batch_size=2)   # padded batches of 2
    assert len(ref.rows) == len(r_ex) and ref.nbytes == sum(r.numel() * 4 for r in ref.rows)
    for i, e in enumerate(r_ex):
        ids = torch.tensor([e.prompt + e.completion])
        with torch.no_grad():   # an independent route: the full forward's hidden states (index 0 = embeddings)
            hs = h.model(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1][0]
        start = 0 if tokens == "all" else len(e.prompt)
        torch.testing.assert_close(ref.rows[i], hs[start:].float(), rtol=1e-5, atol=1e-5)
    # the reference keeps its values while the model changes
    kept = [r.clone() for r in ref.rows]
    with torch.no_grad():
        h.adapter.mlp_out(0).weight.add_(0.1)
    assert all(torch.equal(a, b) for a, b in zip(kept, ref.rows))


def test_activation_mse_by_hand():
    acts = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    target = torch.tensor([1.0, 1.0])
    # example 1 = rows 0, 1: per-token means 0.5 and 1.0; example 2 = row 2: 4.0
    assert float(rmu.activation_mse(acts, target, [2, 1])) == pytest.approx(((0.5 + 1.0) / 2 + 4.0) / 2)


def test_rmu_loss_is_the_formula(llama_handle):
    h = llama_handle
    forget, retain = _data(3, 3)
    m = methods.make("rmu", {"alpha": 7.0})
    run = rmu.LayerRunner(h, m.layer(h), "answer")
    f_ex = [e.gold for e in training.forget_examples(h, _requests(forget))]
    r_ex = training.retain_examples(h, retain)
    ref = rmu.ActivationReference(run, r_ex)
    target = torch.full((h.adapter.hidden_size,), 0.3)
    with torch.no_grad():
        loss, parts = m.loss(run, f_ex, r_ex, [2, 0], [1, 2], ref, target)
        expect_f = sum(float((run.activations([f_ex[i]])[0] - target).pow(2).mean()) for i in (2, 0)) / 2
    assert parts["forget_loss"] == pytest.approx(expect_f, rel=1e-5)
    assert parts["retain_loss"] == pytest.approx(0.0, abs=1e-10)   # the model has not moved yet
    assert float(loss) == pytest.approx(expect_f + 7.0 * parts["retain_loss"], rel=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_rmu_steers_forget_activations_and_holds_retain(arch):
    h = tiny.handle(arch)
    forget, retain = _data()
    m = methods.make("rmu", {**FAST_RMU, "seed": 3})
    run = rmu.LayerRunner(h, m.layer(h), "answer")
    f_ex = [e.gold for e in training.forget_examples(h, _requests(forget))]
    r_ex = training.retain_examples(h, retain)
    with torch.no_grad():
        f0, _ = run.activations(f_ex)
        r0, _ = run.activations(r_ex)
    coeff = 5.0 * float(f0.norm(dim=-1).mean())
    _, tx, rep = _run(h, "rmu", {**FAST_RMU, "seed": 3}, forget, retain)
    with torch.no_grad():
        f1, _ = run.activations(f_ex)
        r1, _ = run.activations(r_ex)
    tx.rollback()
    assert rep["steering_coeff"] == pytest.approx(coeff, rel=1e-5)     # auto: 5 x the original forget norm
    u = torch.rand(h.adapter.hidden_size, generator=torch.Generator().manual_seed(3))
    target = coeff * u / u.norm()
    losses = [r["forget_loss"] for r in rep["history"]]
    assert losses[-1] < 0.5 * losses[0]
    assert float((f1 - target).norm(dim=-1).mean()) < 0.7 * float((f0 - target).norm(dim=-1).mean())
    cos0, cos1 = (float(torch.cosine_similarity(f, target[None], dim=-1).mean()) for f in (f0, f1))
    assert cos1 > cos0 + 0.3
    # the retain activations barely move, the forget ones move a lot
    r_move, f_move = float((r1 - r0).norm(dim=-1).mean()), float((f1 - f0).norm(dim=-1).mean())
    assert r_move < 0.1 * f_move and r_move < 0.1 * float(r0.norm(dim=-1).mean())
    assert rep["reference"]["kind"] == "precomputed" and rep["reference"]["bytes"] > 0


def test_fixed_steering_coeff_and_the_direction(llama_handle):
    forget, retain = _data()
    _, tx, rep = _run(llama_handle, "rmu", {"steps": 2, "steering_coeff": 6.5}, forget, retain)
    tx.rollback()
    assert rep["steering_coeff"] == 6.5 and rep["steps"] == 2 and rep["seed"] == 0
    u = torch.rand(llama_handle.adapter.hidden_size, generator=torch.Generator().manual_seed(0))
    assert (u >= 0).all()          # WMDP's direction: uniform in [0, 1) per dimension, normalised


def test_rmu_without_retain(llama_handle):
    forget, _ = _data()
    before = state_hash(llama_handle.model)
    with pytest.raises(UserError, match="needs retain data") as exc:
        _run(llama_handle, "rmu", {"steps": 2}, forget, [])
    assert exc.value.where == "data.retain" and state_hash(llama_handle.model) == before
    _, tx, rep = _run(llama_handle, "rmu", {"steps": 2, "alpha": 0}, forget, [])
    tx.rollback()
    assert rep["retain_examples"] == 0 and "retain_loss" not in rep["history"][0]
    assert rep["reference"]["bytes"] == 0


# --------------------------------------------------------------------------- RMU: progress, cancel, failures, seeds


def test_rmu_progress_events(llama_handle):
    forget, retain = _data(6, 4)
    events = []
    _, tx, rep = _run(llama_handle, "rmu", {"steps": 5, "batch_size": 4}, forget, retain, events=events)
    tx.rollback()
    stages = [e.stage for e in events if isinstance(e, StageStarted)]
    assert stages == ["rmu: reference", "rmu: train"]
    ref = [e for e in events if isinstance(e, Progress) and e.stage == "rmu: reference"]
    assert ref[-1].done == ref[-1].total == 4 + 6     # the retain activations, then the forget norms
    steps = [e for e in events if isinstance(e, Progress) and e.stage == "rmu: train"]
    assert [e.done for e in steps] == [1, 2, 3, 4, 5] and all(e.total == 5 for e in steps)
    assert all(e.eta_s is not None for e in steps) and steps[-1].eta_s == 0.0
    assert [e.loss for e in steps] == [r["loss"] for r in rep["history"]]
    assert rep["steps"] == 5 and rep["epochs_run"] == 2.5 and rep["first_loss"] == rep["history"][0]["loss"]
    assert rep["last_loss"] == rep["history"][-1]["loss"] and rep["seconds"] >= 0


@pytest.mark.parametrize("when", ["reference", "train"])
def test_rmu_cancel_restores_the_weights_exactly(llama_handle, when):
    h = llama_handle
    forget, retain = _data()
    before = state_hash(h.model)
    cancel = CancelToken()
    seen = []

    def on_event(e):
        if isinstance(e, Progress) and e.stage == f"rmu: {when}":
            seen.append(e)
            if when == "reference" or e.done == 2:
                cancel.cancel()

    m = methods.make("rmu", {**FAST_RMU, "steps": 10})
    with pytest.raises(Cancelled):
        with h.transaction(m.touched_parameters(h)):
            m.apply(h, _requests(forget), EditContext(on_event, cancel, forget, retain, {}))
    assert state_hash(h.model) == before
    assert not any(p.requires_grad or p.grad is not None for p in h.model.parameters())
    assert len(seen) == (2 if when == "train" else 1)


def test_rmu_non_finite_loss_rolls_back(llama_handle, monkeypatch):
    h = llama_handle
    forget, retain = _data()
    before = state_hash(h.model)
    real = rmu.RMU.loss
    calls = []

    def poisoned(self, *a, **k):
        loss, parts = real(self, *a, **k)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 3 else loss), parts

    monkeypatch.setattr(rmu.RMU, "loss", poisoned)
    with pytest.raises(NonFiniteError, match="step 3"):
        _run(h, "rmu", {**FAST_RMU, "steps": 6}, forget, retain)
    assert state_hash(h.model) == before
    assert not any(p.requires_grad for p in h.model.parameters())


def test_rmu_seeded_runs_are_deterministic():
    forget, retain = _data()
    hashes = []
    rng_before = torch.random.get_rng_state()
    for seed in (1, 1, 2):
        h = tiny.handle("llama")
        _run(h, "rmu", {"steps": 4, "lr": 1e-2, "seed": seed}, forget, retain)
        hashes.append(state_hash(h.model))
    assert hashes[0] == hashes[1] != hashes[2]
    assert torch.equal(torch.random.get_rng_state(), rng_before)


# --------------------------------------------------------------------------- UNDIAL


def test_undial_defaults_and_retain():
    p = methods.get("undial").Params()
    assert (p.beta, p.gamma, p.alpha) == (10.0, 1.0, 0.0)          # open-unlearning UNDIAL.yaml
    assert methods.get("undial").needs_retain is False
    assert methods.make("undial", {"alpha": 1.0}).needs_retain is True


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_undial_teacher_and_loss_by_hand(arch):
    from unlearn_tui.backends.methods.finetune import UndialTeacher

    h = tiny.handle(arch)
    forget, _ = _data(3, 0)
    f_ex = training.forget_examples(h, _requests(forget))
    beta = 3.0
    teacher = UndialTeacher(h.model, h.tokenizer.pad_token_id, f_ex, beta, None, batch_size=2)
    by_hand = []
    for i, fe in enumerate(f_ex):
        e = fe.gold
        ids = torch.tensor([e.prompt + e.completion])
        with torch.no_grad():
            logits = h.model(input_ids=ids).logits[0].float()
        rows = logits[len(e.prompt) - 1:len(e.prompt) - 1 + len(e.completion)].clone()
        for j, t in enumerate(e.completion):
            rows[j, t] -= beta
        want = torch.log_softmax(rows, dim=-1)
        torch.testing.assert_close(teacher.rows[i][1], want, rtol=1e-5, atol=1e-5)
        by_hand.append((want, torch.log_softmax(logits[len(e.prompt) - 1:len(e.prompt) - 1 + len(e.completion)], -1)))
    m = methods.make("undial", {"beta": beta, "gamma": 0.5})
    m._teacher = teacher
    with torch.no_grad():
        loss, parts = training.step_loss(m, h.model, h.tokenizer.pad_token_id, f_ex, [], [2, 0], [], None)
    kl = torch.cat([(t.exp() * (t - s)).sum(-1) for t, s in (by_hand[2], by_hand[0])]).mean()
    assert parts["forget_kl"] == pytest.approx(float(kl), rel=1e-4)
    assert float(loss) == pytest.approx(0.5 * float(kl), rel=1e-4)
    top = UndialTeacher(h.model, h.tokenizer.pad_token_id, f_ex, beta, 8)
    assert top.nbytes < teacher.nbytes


def test_undial_unlearns_and_rolls_back(llama_handle):
    h = llama_handle
    forget, retain = _data()
    f_ex = training.forget_examples(h, _requests(forget))
    probe = methods.make("gd", {})
    idx = list(range(len(f_ex)))
    with torch.no_grad():
        _, start = training.step_loss(probe, h.model, 0, f_ex, [], idx, [], None)
    before = state_hash(h.model)
    events = []
    m, tx, rep = _run(h, "undial", {"epochs": 6, "lr": 3e-3, "warmup_epochs": 0}, forget, [], events=events)
    with torch.no_grad():
        _, after = training.step_loss(probe, h.model, 0, f_ex, [], idx, [], None)
    tx.rollback()
    assert state_hash(h.model) == before and m._teacher is None
    assert rep["reference"]["kind"] == "precomputed" and rep["reference"]["bytes"] > 0
    # a random model's gold tokens have probability ~1/vocab, so the teacher is close to it (KL ~ 1e-3) and
    # Adam's first step overshoots; after it the KL falls, and the gold answers get less likely
    kls = [r["forget_kl"] for r in rep["history"]]
    assert rep["retain_examples"] == 0 and kls[-1] < kls[1]
    assert after["forget_nll"] > start["forget_nll"] + 0.02
    assert [e.stage for e in events if isinstance(e, StageStarted)] == ["undial: teacher", "undial: train"]
    cancel = CancelToken()

    def on_event(e):
        if isinstance(e, Progress) and e.stage == "undial: train" and e.done == 2:
            cancel.cancel()

    m = methods.make("undial", {"epochs": 5, "lr": 1e-2})
    with pytest.raises(Cancelled):
        with h.transaction(m.touched_parameters(h)):
            m.apply(h, _requests(forget), EditContext(on_event, cancel, forget, retain, {}))
    assert state_hash(h.model) == before and m._teacher is None
    assert not any(p.requires_grad or p.grad is not None for p in h.model.parameters())
