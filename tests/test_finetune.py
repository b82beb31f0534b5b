"""Fine-tuning unlearning baselines (GA, GD, KL, DPO, NPO) and their training loop, on tiny random models."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from unlearn_tui.backends import methods, tiny, training
from unlearn_tui.backends.errors import Cancelled, NonFiniteError, UserError
from unlearn_tui.backends.events import CancelToken, Progress
from unlearn_tui.backends.model import state_hash
from unlearn_tui.backends.runner import EditContext
from unlearn_tui.backends.targets import Request
from tests.conftest import ROOT, make_items

REFUSAL = "I'm sorry, I don't know the answer to that question."


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread (and the machine is shared)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _requests(items):
    return [Request(it.question, REFUSAL, it.subject, [it.id], [it.question], [it.answer]) for it in items]


def _ctx(forget, retain, events=None, cancel=None, seed=0):
    return EditContext((events.append if events is not None else (lambda e: None)), cancel or CancelToken(),
                       forget, retain, {}, seed=seed)


def _data(n_forget=4, n_retain=4):
    items = make_items(n_forget + n_retain)
    return items[:n_forget], items[n_forget:]


def _params(handle):
    return {n: p.detach().clone() for n, p in handle.model.named_parameters()}


def _run(handle, name, params, forget, retain, **ctx_kw):
    m = methods.make(name, params)
    with handle.transaction(m.touched_parameters(handle)) as tx:
        report = m.apply(handle, _requests(forget), _ctx(forget, retain, **ctx_kw))
    return m, tx, report


def _train_config(handle, method, ctx, retain_ex=()):
    """The loop's settings exactly as ``apply`` resolves them from the method's Params."""
    return method.train_config(ctx, sum(len(e.completion) for e in retain_ex), int(handle.model.config.vocab_size))


def _objective(handle, method, forget_ex, retain_ex, reference):
    """The objective over every example at once (one deterministic batch)."""
    with torch.no_grad():
        loss, parts = training.step_loss(method, handle.model, handle.tokenizer.pad_token_id, forget_ex, retain_ex,
                                         list(range(len(forget_ex))), list(range(len(retain_ex))), reference)
    return float(loss), parts


# --------------------------------------------------------------------------- registry and params


def test_registry_and_params_need_no_torch():
    code = ("import sys, dataclasses\n"
            "from unlearn_tui.backends import methods\n"
            "from unlearn_tui.backends.params import describe\n"
            "names = methods.names()\n"
            "for n in ('ga', 'gd', 'kl', 'dpo', 'npo'):\n"
            "    assert n in names, n\n"
            "    cls = methods.get(n)\n"
            "    assert cls.name == n and cls.summary\n"
            "    assert describe(cls.Params)\n"
            "    methods.make(n, {'epochs': 2})\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_needs_retain_flags_and_params():
    assert methods.get("ga").needs_retain is False
    assert methods.get("gd").needs_retain and methods.get("kl").needs_retain
    # DPO/NPO need retain only while their retain term is on
    assert methods.make("npo", {}).needs_retain is True
    assert methods.make("npo", {"alpha": 0}).needs_retain is False
    assert methods.make("dpo", {"alpha": 0.0}).needs_retain is False
    with pytest.raises(UserError, match="lr"):
        methods.make("ga", {"lr": -1.0}, where="runs[0].params")
    with pytest.raises(UserError, match="tuning"):
        methods.make("gd", {"tuning": "qlora"}, where="runs[0].params")
    with pytest.raises(UserError, match="unknown key"):
        methods.make("ga", {"beta": 0.1})  # GA has no preference temperature


def test_layer_out_of_range_names_key_and_value(llama_handle):
    m = methods.make("ga", {"layers": [1, 9]})
    with pytest.raises(UserError) as exc:
        m.touched_parameters(llama_handle)
    assert exc.value.where == "params.layers" and "9" in exc.value.message and "0..3" in exc.value.message


def test_retain_required_is_a_clear_error(llama_handle):
    forget, _ = _data()
    before = state_hash(llama_handle.model)
    for name in ("gd", "kl", "npo", "dpo"):
        with pytest.raises(UserError, match="needs retain data") as exc:
            _run(llama_handle, name, {"epochs": 1}, forget, [])
        assert exc.value.where == "data.retain"
    assert state_hash(llama_handle.model) == before
    # without the retain term NPO runs on forget data alone
    _, tx, report = _run(llama_handle, "npo", {"epochs": 1, "alpha": 0}, forget, [])
    assert report["steps"] == 1 and report["retain_examples"] == 0
    tx.rollback()


def test_runner_refuses_retain_methods_without_retain(tmp_path):
    from unlearn_tui import sessions
    from unlearn_tui.backends.runner import Workbench

    path = tmp_path / "facts.jsonl"
    path.write_text("\n".join(json.dumps({"question": it.question, "answer": it.answer}) for it in make_items(4)))
    s = sessions.new_session(model={"name": "tiny:llama"}, data={"path": str(path), "forget": 2, "retain": 0},
                             runs=[{"method": "gd"}])
    wb = Workbench(s)
    wb.load_data()
    with pytest.raises(UserError, match="needs retain data"):
        wb.make_method(s.runs[0], 0)


# --------------------------------------------------------------------------- losses


@pytest.mark.parametrize("objective", ["ga", "gd", "kl", "dpo", "npo"])
def test_each_loss_decreases_its_objective(llama_handle, objective):
    forget, retain = _data()
    h = llama_handle
    f_ex = training.forget_examples(h, _requests(forget))
    r_ex = training.retain_examples(h, retain)
    m = methods.make(objective, {"epochs": 6, "lr": 2e-3, "batch_size": 4, "warmup_epochs": 0, "seed": 0})
    ctx = _ctx(forget, retain)
    cfg = _train_config(h, m, ctx, r_ex)
    ref = training.build_reference(m, cfg, h.model, h.tokenizer.pad_token_id, f_ex, r_ex, ctx)
    before, _ = _objective(h, m, f_ex, r_ex, ref)
    params = [p for n, p in h.model.named_parameters() if n in training.trainable_names(h, [2, 3], "block")]
    for p in params:
        p.requires_grad_(True)
    res = training.train(h, m, cfg, params, f_ex, r_ex, ctx, ref)
    for p in params:
        p.requires_grad_(False)
    after, _ = _objective(h, m, f_ex, r_ex, ref)
    assert res.steps == 6
    assert after < before - 1e-3, (objective, before, after)
    assert all(p.grad is None for p in params)


def test_ga_raises_forget_loss_and_gd_bounds_retain_loss(llama_handle):
    forget, retain = _data()
    h = llama_handle
    f_ex = training.forget_examples(h, _requests(forget))
    r_ex = training.retain_examples(h, retain)
    probe = methods.make("gd", {})
    _, start = _objective(h, probe, f_ex, r_ex, None)
    common = {"epochs": 12, "lr": 1e-2, "layers": [1, 2, 3], "warmup_epochs": 0}
    _, tx, _ = _run(h, "ga", common, forget, retain)
    _, after_ga = _objective(h, probe, f_ex, r_ex, None)
    tx.rollback()
    _, tx, _ = _run(h, "gd", common, forget, retain)
    _, after_gd = _objective(h, probe, f_ex, r_ex, None)
    tx.rollback()
    # (a random tiny model's logits are nearly uniform -- NLL ~ log(vocab) -- and only blocks train,
    # so the NLLs move by tenths here, by whole nats on a real model)
    assert after_ga["forget_nll"] > start["forget_nll"] + 0.3
    assert after_gd["forget_nll"] > start["forget_nll"] + 0.3
    # GD holds the retain answers within a bound of where they started, GA does not pull them down
    assert after_gd["retain_nll"] < start["retain_nll"] + 0.05
    assert after_gd["retain_nll"] < after_ga["retain_nll"] - 0.1


def test_dpo_prefers_the_refusal(llama_handle):
    forget, retain = _data()
    h = llama_handle
    f_ex = training.forget_examples(h, _requests(forget))
    dpo = methods.make("dpo", {"batch_size": 4})
    ctx = _ctx(forget, retain)
    ref = training.build_reference(dpo, _train_config(h, dpo, ctx), h.model, h.tokenizer.pad_token_id, f_ex, [],
                                   ctx)
    _, tx, _ = _run(h, "dpo", {"epochs": 8, "lr": 2e-3, "warmup_epochs": 0}, forget, retain)
    live = training.LiveReference(h.model, None)   # a copy of the trained model
    tx.rollback()
    gold_p, ref_p = training.pack([e.gold for e in f_ex], 0), training.pack([e.refusal for e in f_ex], 0)
    gold_gain = live.forget_logp("gold", [], gold_p) - ref.gold_logp
    refusal_gain = live.forget_logp("refusal", [], ref_p) - ref.refusal_logp
    assert (refusal_gain > gold_gain).all()
    assert float(refusal_gain.mean()) > 0 > float(gold_gain.mean())


# --------------------------------------------------------------------------- reference


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_precomputed_reference_equals_live_copy(arch):
    h = tiny.handle(arch)
    forget, retain = _data(5, 6)
    f_ex = training.forget_examples(h, _requests(forget))
    r_ex = training.retain_examples(h, retain)
    pad = h.tokenizer.pad_token_id
    pre = training.PrecomputedReference(h.model, pad, f_ex, r_ex, True, True, True, None, batch_size=3)
    live = training.LiveReference(h.model, None)
    # train the model so "current" differs from the reference; the live copy must not follow it
    names = training.trainable_names(h, [0, 1, 2, 3], "block")
    params = [h.parameter(n) for n in names]
    for p in params:
        p.requires_grad_(True)
    ga = methods.make("ga", {"epochs": 3, "lr": 1e-2, "warmup_epochs": 0})
    ctx = _ctx(forget, retain)
    training.train(h, ga, _train_config(h, ga, ctx), params, f_ex, [], ctx)
    for p in params:
        p.requires_grad_(False)
    idx = [4, 0, 2]
    for which in ("gold", "refusal"):
        p = training.pack([getattr(f_ex[i], which) for i in idx], pad)
        torch.testing.assert_close(pre.forget_logp(which, idx, p), live.forget_logp(which, idx, p),
                                   rtol=1e-5, atol=1e-4)
    r_idx = [5, 1, 3, 0]
    rp = training.pack([r_ex[i] for i in r_idx], pad)
    with torch.no_grad():
        cur = training.completion_logits(h.model, rp)
    kl_pre, kl_live = pre.retain_kl(cur, r_idx, rp), live.retain_kl(cur, r_idx, rp)
    assert float(kl_live.mean()) > 1e-3  # the model moved, so KL is not trivially zero
    torch.testing.assert_close(kl_pre, kl_live, rtol=1e-4, atol=1e-5)


def test_top_k_reference_matches_live_and_bounds_full_kl(llama_handle):
    h = llama_handle
    forget, retain = _data(2, 5)
    r_ex = training.retain_examples(h, retain)
    pad = h.tokenizer.pad_token_id
    vocab = h.model.config.vocab_size
    pre = training.PrecomputedReference(h.model, pad, [], r_ex, False, False, True, 16)
    full = training.PrecomputedReference(h.model, pad, [], r_ex, False, False, True, None)
    live = training.LiveReference(h.model, 16)
    big = training.PrecomputedReference(h.model, pad, [], r_ex, False, False, True, vocab - 1)
    assert pre.nbytes < full.nbytes
    with torch.no_grad():
        for p in h.model.parameters():
            p.add_(torch.randn_like(p) * 0.02, alpha=1.0)
    idx = list(range(len(r_ex)))
    rp = training.pack(r_ex, pad)
    with torch.no_grad():
        cur = training.completion_logits(h.model, rp)
    k16, k16_live, kfull = pre.retain_kl(cur, idx, rp), live.retain_kl(cur, idx, rp), full.retain_kl(cur, idx, rp)
    torch.testing.assert_close(k16, k16_live, rtol=1e-4, atol=1e-5)
    assert (k16 >= -1e-6).all() and (k16 <= kfull + 1e-5).all()      # bucketing never overstates KL
    # keeping (almost) the whole vocabulary gives the full KL
    assert training.resolve_kl_top_k(None, 10, vocab) is None
    assert training.resolve_kl_top_k(None, 10 ** 6, 49152) == training.KL_AUTO_TOP_K
    assert training.resolve_kl_top_k(0, 10, vocab) is None
    torch.testing.assert_close(big.retain_kl(cur, idx, rp), kfull, rtol=1e-3, atol=1e-4)


def test_bucketed_kl_stays_finite_when_a_model_puts_nearly_all_its_mass_on_the_top_tokens():
    """A memorised answer (PISTOL after its fine-tune): the top-k mass rounds to 1 in float32, and
    ``log(1 - sum(top))`` was -inf, so KL's loss became inf at its second step.  The rest mass is now the
    logsumexp of the other entries: finite, and equal to the float64 value."""
    vocab, k = 4096, 8
    logits = torch.full((3, vocab), -30.0)
    logits[:, :k] = torch.tensor([10.0, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0, -4.0])
    cur = torch.log_softmax(logits, dim=-1)
    assert float(torch.logsumexp(cur[:, :k], dim=-1).min()) >= 0.0          # the top-k mass rounds to >= 1
    ref = torch.log_softmax(logits + torch.linspace(0.0, 15.0, vocab), dim=-1)  # a reference with mass left over
    idx, vals, rest = training.top_k_table(ref, k)
    assert torch.isfinite(rest).all()
    kl = training.bucket_kl(cur, idx, vals, rest)
    assert torch.isfinite(kl).all()
    # the exact bucketed KL in float64
    c64, r64 = cur.double(), ref.double()
    top = r64.gather(1, idx)
    mask = torch.ones_like(r64, dtype=torch.bool).scatter(1, idx, False)
    r_rest = torch.logsumexp(r64.masked_fill(~mask, float("-inf")), dim=-1)
    c_rest = torch.logsumexp(c64.masked_fill(~mask, float("-inf")), dim=-1)
    want = (top.exp() * (top - c64.gather(1, idx))).sum(-1) + r_rest.exp() * (r_rest - c_rest)
    torch.testing.assert_close(kl.double(), want, rtol=1e-4, atol=1e-6)
    assert training.rest_logmass(cur, torch.arange(vocab).expand(3, vocab)).eq(float("-inf")).all()   # no rest


@pytest.mark.parametrize("name", ["kl", "npo", "dpo"])
def test_training_with_precomputed_or_live_reference_agrees(name):
    forget, retain = _data()
    finals = {}
    reports = {}
    for ref in ("precomputed", "live"):
        h = tiny.handle("llama")
        _, _, rep = _run(h, name, {"epochs": 3, "lr": 1e-3, "reference": ref, "warmup_epochs": 0}, forget, retain)
        finals[ref] = _params(h)
        reports[ref] = rep
    assert reports["precomputed"]["reference"]["kind"] == "precomputed"
    assert reports["live"]["reference"]["kind"] == "live"
    assert reports["precomputed"]["reference"]["bytes"] < reports["live"]["reference"]["bytes"]
    for a, b in zip(reports["precomputed"]["history"], reports["live"]["history"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-4)
    for n in finals["live"]:
        torch.testing.assert_close(finals["precomputed"][n], finals["live"][n], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- weights, transactions, loop


@pytest.mark.parametrize("tuning", ["full", "lora"])
def test_touched_parameters_cover_exactly_what_changes(tiny_handle, tuning):
    h = tiny_handle
    forget, retain = _data()
    keys = list(h.model.state_dict())
    before = _params(h)
    m, tx, report = _run(h, "gd", {"epochs": 2, "lr": 1e-2, "tuning": tuning, "layers": [1, -1],
                                    "warmup_epochs": 0}, forget, retain)
    after = _params(h)
    touched = set(m.touched_parameters(h))
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and changed <= touched
    assert changed == touched
    assert all(".layers.1." in n or ".layers.3." in n or ".h.1." in n or ".h.3." in n for n in touched)
    # LoRA is merged and gone: same modules, same parameter names, nothing left trainable
    assert list(h.model.state_dict()) == keys
    assert not any("lora" in n for n, _ in h.model.named_modules())
    assert not any(p.requires_grad for p in h.model.parameters())
    assert report["trained_parameters"] == sum(h.parameter(n).numel() for n in touched)
    tx.rollback()
    assert all(torch.equal(before[n], p) for n, p in h.model.named_parameters())


@pytest.mark.parametrize("tuning", ["full", "lora"])
def test_cancel_rolls_back_exactly(llama_handle, tuning):
    h = llama_handle
    forget, retain = _data()
    before = state_hash(h.model)
    keys = list(h.model.state_dict())
    cancel = CancelToken()
    seen = []

    def on_event(e):
        seen.append(e)
        if isinstance(e, Progress) and e.stage.endswith("train") and e.done == 2:
            cancel.cancel()

    m = methods.make("kl", {"epochs": 5, "tuning": tuning, "lr": 1e-2})
    with pytest.raises(Cancelled):
        with h.transaction(m.touched_parameters(h)):
            m.apply(h, _requests(forget), EditContext(on_event, cancel, forget, retain, {}))
    assert state_hash(h.model) == before
    assert list(h.model.state_dict()) == keys
    assert not any(p.requires_grad or p.grad is not None for p in h.model.parameters())
    assert sum(isinstance(e, Progress) and e.stage.endswith("train") for e in seen) == 2


def test_progress_events_carry_losses_and_report_history(llama_handle):
    forget, retain = _data(6, 4)
    events = []
    _, tx, rep = _run(llama_handle, "gd", {"epochs": 3, "batch_size": 4}, forget, retain, events=events)
    tx.rollback()
    steps = [e for e in events if isinstance(e, Progress) and e.stage == "gd: train"]
    assert len(steps) == rep["steps"] == 6 and steps[-1].total == 6  # ceil(6/4) steps x 3 epochs
    assert [e.loss for e in steps] == [h["loss"] for h in rep["history"]]
    assert all(isinstance(e.loss, float) for e in steps)
    assert rep["seconds_per_epoch"] > 0 and rep["epochs_run"] == 3


def test_seeded_runs_are_deterministic(llama_handle):
    forget, retain = _data()
    hashes = []
    rng_before = torch.random.get_rng_state()
    for seed in (3, 3, 4):
        h = tiny.handle("llama")
        _run(h, "npo", {"epochs": 2, "tuning": "lora", "batch_size": 2, "seed": seed, "lr": 1e-2}, forget, retain)
        hashes.append(state_hash(h.model))
    assert hashes[0] == hashes[1] != hashes[2]
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the global RNG is left alone


def test_early_stops(llama_handle):
    forget, retain = _data()
    _, tx, rep = _run(llama_handle, "ga", {"epochs": 10, "stop_forget_nll": 0.01}, forget, retain)
    tx.rollback()
    assert rep["steps"] == 1 and rep["stopped"].startswith("forget NLL")
    _, tx, rep = _run(llama_handle, "ga", {"epochs": 10, "batch_size": 2, "max_steps": 3}, forget, retain)
    tx.rollback()
    assert rep["steps"] == 3 and rep["stopped"] == "max_steps 3"
    _, tx, rep = _run(llama_handle, "gd", {"epochs": 20, "lr": 1e-2, "warmup_epochs": 0, "stop_retain_ratio": 1.005,
                                           "alpha": 0.001, "layers": [0, 1, 2, 3]}, forget, retain)
    tx.rollback()
    retain_nll = [h["retain_nll"] for h in rep["history"]]
    assert rep["steps"] < 20 and rep["stopped"].startswith("retain NLL")
    assert retain_nll[-1] > 1.005 * retain_nll[0] and all(r <= 1.005 * retain_nll[0] for r in retain_nll[:-1])


def test_non_finite_loss_rolls_back(llama_handle, monkeypatch):
    forget, retain = _data()
    before = state_hash(llama_handle.model)
    real = training.step_loss
    calls = []

    def poisoned(*a, **k):
        loss, parts = real(*a, **k)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 3 else loss), parts

    monkeypatch.setattr(training, "step_loss", poisoned)
    with pytest.raises(NonFiniteError, match="step 3"):
        _run(llama_handle, "gd", {"epochs": 4, "batch_size": 2, "lr": 1e-2}, forget, retain)
    assert state_hash(llama_handle.model) == before
    assert not any(p.requires_grad for p in llama_handle.model.parameters())


def test_gradient_clipping_bounds_the_gradient(llama_handle, monkeypatch):
    forget, _ = _data()
    h = llama_handle
    f_ex = training.forget_examples(h, _requests(forget))
    names = training.trainable_names(h, [3], "mlp")
    params = [h.parameter(n) for n in names]
    real = torch.nn.utils.clip_grad_norm_
    clipped = []

    def spy(ps, max_norm, *a, **k):
        total = real(ps, max_norm, *a, **k)
        clipped.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in ps]))))
        return total

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    reported = {}
    for clip in (0.0, 1e-3):
        ga = methods.make("ga", {"epochs": 1, "lr": 1e-3, "batch_size": 4, "warmup_epochs": 0,
                                 "max_grad_norm": clip})
        ctx = _ctx(forget, [])
        for p in params:
            p.requires_grad_(True)
        with h.transaction(names) as tx:
            res = training.train(h, ga, _train_config(h, ga, ctx), params, f_ex, [], ctx)
        tx.rollback()
        for p in params:
            p.requires_grad_(False)
        reported[clip] = res.history[0]["grad_norm"]
        if clip == 0.0:
            assert not clipped          # clipping off: never called
    assert reported[0.0] > 1e-2
    assert reported[1e-3] == pytest.approx(reported[0.0], rel=1e-5)   # the history keeps the pre-clip norm
    assert len(clipped) == 1 and clipped[0] <= 1e-3 * 1.0001           # the step saw gradients scaled to the bound


def test_merged_requests_train_on_each_question(llama_handle):
    forget, retain = _data(4, 2)
    merged = [Request(" ".join(i.question for i in forget[:2]), REFUSAL, None, [forget[0].id, forget[1].id],
                      [forget[0].question, forget[1].question], [forget[0].answer, forget[1].answer])]
    ex = training.forget_examples(llama_handle, merged)
    assert [e.question for e in ex] == [forget[0].question, forget[1].question]
    assert ex[0].gold.completion == llama_handle.encode_answer(forget[0].answer)
    assert ex[1].refusal.completion == llama_handle.encode_answer(REFUSAL)
    bad = [Request("q", REFUSAL, None, ["a"], ["q1", "q2"], ["only one"])]
    with pytest.raises(UserError, match="gold answers"):
        training.forget_examples(llama_handle, bad)


def test_loss_only_on_completion_tokens(llama_handle):
    h = llama_handle
    forget, _ = _data(2, 0)
    ex = training.forget_examples(h, _requests(forget))
    p = training.pack([e.gold for e in ex], h.tokenizer.pad_token_id)
    assert training.split_rows(p) == [len(e.gold.completion) for e in ex]
    gold = p.targets[p.target_mask].tolist()
    assert gold == ex[0].gold.completion + ex[1].gold.completion
