"""The method seam: every registered method implements the contract, Params is the only home of a default,
and the per-method behaviour is chosen by types (solver objects, loss hooks), not by name."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

from unlearn_tui.backends import methods, tiny, training
from unlearn_tui.backends.editing.grace_codebook import GraceConfig
from unlearn_tui.backends.editing.wise_memory import WiseConfig
from unlearn_tui.backends.events import CancelToken
from unlearn_tui.backends.methods.base import EditContext, Method, MethodBase, RetainWhen, settings_view
from unlearn_tui.backends.params import param
from unlearn_tui.backends.targets import Request
from tests.conftest import make_items

REFUSAL = "I'm sorry, I don't know the answer to that question."
ENGINE_CONFIGS = (WiseConfig, GraceConfig, training.TrainConfig)
FINETUNE = ("ga", "gd", "kl", "dpo", "npo", "simnpo", "undial")


class _Stop(Exception):
    """Raised by a spy once it has seen what the method passes to the engine."""


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _requests(items):
    return [Request(it.question, REFUSAL, it.subject, [it.id], [it.question], [it.answer]) for it in items]


def _ctx(forget=(), retain=(), seed=0, state=None):
    return EditContext(lambda e: None, CancelToken(), list(forget), list(retain),
                       state if state is not None else {}, seed=seed)


# --------------------------------------------------------------------------- the contract


@pytest.mark.parametrize("name", methods.names())
def test_every_registered_method_implements_the_contract(name):
    cls = methods.get(name)
    assert cls.name == name and cls.summary
    assert issubclass(cls, MethodBase)
    assert dataclasses.is_dataclass(cls.Params)
    m = methods.make(name, {})
    assert isinstance(m, Method)
    assert isinstance(m.params, cls.Params)
    assert isinstance(m.needs_retain, bool)
    # real types in the seam, not Any
    for hook, params in (("touched_parameters", ("handle",)), ("apply", ("handle", "requests", "ctx"))):
        sig = inspect.signature(getattr(cls, hook))
        got = [str(sig.parameters[p].annotation) for p in params]
        assert got[0] == "ModelHandle", (name, hook, got)
        if hook == "apply":
            assert got[1] == "Sequence[Request]" and got[2] == "EditContext", (name, got)


def test_a_method_without_its_hooks_cannot_be_instantiated():
    class Half(MethodBase):
        name = "half"

        def touched_parameters(self, handle):
            return []

    with pytest.raises(TypeError, match="apply"):
        Half(None)


def test_edit_context_has_one_home():
    from unlearn_tui.backends import runner

    assert runner.EditContext is EditContext


def test_needs_retain_is_never_written_on_the_instance():
    for name in ("dpo", "npo", "simnpo", "rmu"):
        cls = methods.get(name)
        assert isinstance(inspect.getattr_static(cls, "needs_retain"), RetainWhen)
        assert cls.needs_retain is True
        on, off = methods.make(name, {}), methods.make(name, {"alpha": 0})
        assert on.needs_retain is True and off.needs_retain is False
        assert "needs_retain" not in vars(on) and "needs_retain" not in vars(off)
    for name in methods.names():
        assert "needs_retain" not in vars(methods.make(name, {}))


# --------------------------------------------------------------------------- defaults live in Params only


@pytest.mark.parametrize("cfg", ENGINE_CONFIGS, ids=lambda c: c.__name__)
def test_engine_configs_declare_no_defaults(cfg):
    assert all(f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
               for f in dataclasses.fields(cfg))
    with pytest.raises(TypeError):
        cfg()


def test_value_settings_are_the_params_themselves():
    import unlearn_tui.backends.editing.values as values

    assert not hasattr(values, "ValueSettings")


def test_settings_view_copies_params_and_refuses_gaps():
    @dataclasses.dataclass
    class P:
        a: int = param(3, "a")
        b: float | None = param(None, "b", auto="resolved")
        c: str = param("x", "c")

    @dataclasses.dataclass(frozen=True)
    class View:
        a: int
        b: float
        seed: int

    assert settings_view(View, P(), b=0.5, seed=7) == View(3, 0.5, 7)
    assert settings_view(View, P(a=9, b=2.0), seed=1) == View(9, 2.0, 1)
    with pytest.raises(TypeError, match="auto"):
        settings_view(View, P(), seed=1)            # an auto field left unresolved
    with pytest.raises(TypeError, match="seed"):
        settings_view(View, P(), b=0.5)             # neither in Params nor resolved
    with pytest.raises(TypeError, match="nope"):
        settings_view(View, P(), b=0.5, seed=1, nope=2)

    @dataclasses.dataclass
    class WithDefault:
        a: int = 1

    with pytest.raises(TypeError, match="default"):
        settings_view(WithDefault, P())


def _defaults_match(cfg, params, resolved: set[str]):
    """Every field of the engine config that the method did not resolve is the Params value."""
    names = {f.name for f in dataclasses.fields(cfg)}
    for n in names - resolved:
        assert getattr(cfg, n) == getattr(params, n), n
    return names


def test_wise_engine_config_is_the_params_defaults(monkeypatch):
    from unlearn_tui.backends.editing import wise_memory

    seen = {}

    def spy(mem, handle, runner, question, target, item_ids, cfg, on_step):
        seen["cfg"] = cfg
        raise _Stop

    monkeypatch.setattr(wise_memory, "train_edit", spy)
    h = tiny.handle("llama")
    m = methods.make("wise", {})
    with pytest.raises(_Stop):
        with h.transaction(m.touched_parameters(h)):
            m.apply(h, _requests(make_items(1)), _ctx(seed=5))
    cfg, p = seen["cfg"], methods.get("wise").Params()
    resolved = {"alpha", "beta", "gamma", "edit_lr", "norm_constraint", "seed"}
    _defaults_match(cfg, p, resolved)
    # the three settings whose engine-side defaults used to differ from the app's
    assert (cfg.retrieve, cfg.above_out_of_scope, cfg.first_token_weight) == (True, True, 1.0)
    assert cfg.edit_lr == 0.05 and cfg.seed == 5
    assert cfg.norm_constraint == pytest.approx(2.5 * float(h.adapter.mlp_out(m.layer(h)).weight.float().std()))


def test_grace_engine_config_is_the_params_defaults(monkeypatch):
    from unlearn_tui.backends.editing import grace_codebook

    seen = {}

    def spy(cb, handle, runner, question, target, item_ids, cfg, on_step):
        seen["cfg"] = cfg
        raise _Stop

    monkeypatch.setattr(grace_codebook, "add_edit", spy)
    h = tiny.handle("llama")
    m = methods.make("grace", {"eps": 0.75})
    with pytest.raises(_Stop):
        with h.transaction(m.touched_parameters(h)):
            m.apply(h, _requests(make_items(1)), _ctx(seed=3))
    cfg = seen["cfg"]
    _defaults_match(cfg, m.params, {"seed"})
    assert cfg == GraceConfig(eps=0.75, edit_lr=1.0, n_iter=60, eps_expand="coverage", val_init="warm",
                              stop_loss=0.05, seed=3)


@pytest.mark.parametrize("name", FINETUNE)
def test_finetune_engine_config_is_the_params_defaults(monkeypatch, name):
    seen = {}

    def spy(handle, objective, cfg, params, forget, retain, ctx, reference=None, stage="train"):
        seen["objective"], seen["cfg"] = objective, cfg
        raise _Stop

    monkeypatch.setattr(training, "train", spy)
    h = tiny.handle("llama")
    items = make_items(6)
    m = methods.make(name, {})
    with pytest.raises(_Stop):
        with h.transaction(m.touched_parameters(h)):
            m.apply(h, _requests(items[:3]), _ctx(items[:3], items[3:], seed=4))
    cfg = seen["cfg"]
    assert seen["objective"] is m
    _defaults_match(cfg, m.params, {"lr", "seed", "kl_top_k", "reference"})
    assert cfg.epochs == 10 and cfg.lr == 1e-4 and cfg.seed == 4 and cfg.kl_top_k is None
    assert cfg.reference == ("precomputed" if name in ("kl", "dpo", "npo") else None)
    # the config a caller builds from the method is the one the method trains with
    assert m.train_config(_ctx(seed=4), 0, int(h.model.config.vocab_size)) == cfg


def test_locate_edit_kernels_read_the_methods_params(monkeypatch):
    from unlearn_tui.backends.editing import locate, values

    seen = []
    real = locate.optimise_value

    def spy(handle, layer, question, subject, target, templates, settings, *a, **k):
        seen.append(settings)
        return real(handle, layer, question, subject, target, templates, settings, *a, **k)

    monkeypatch.setattr(locate, "optimise_value", spy)           # ROME
    monkeypatch.setattr(values, "optimise_value", spy)           # MEMIT/AlphaEdit (through optimise_values)
    for name in ("rome", "memit"):
        h = tiny.handle("llama")
        m = methods.make(name, {"v_steps": 2, "templates": 0, "token_budget": 512, "mom2_adjustment": False}
                         if name == "rome" else {"v_steps": 2, "templates": 0, "token_budget": 512})
        with h.transaction(m.touched_parameters(h)) as tx:
            m.apply(h, _requests(make_items(1)), _ctx())
        tx.rollback()
        assert seen[-1] is m.params


# --------------------------------------------------------------------------- types instead of name switches


def test_spread_methods_choose_their_solver():
    from unlearn_tui.backends.editing.locate import LeastSquares, NullSpaceProjection

    memit = methods.make("memit", {"mom2_update_weight": 123.0}).solver()
    alpha = methods.make("alphaedit", {"l2": 4.0, "nullspace_threshold": 0.5, "relative_threshold": True}).solver()
    assert type(memit) is LeastSquares and memit.mom2_update_weight == 123.0
    assert type(alpha) is NullSpaceProjection
    assert (alpha.l2, alpha.nullspace_threshold, alpha.relative_threshold) == (4.0, 0.5, True)


def test_the_spread_driver_follows_the_solver_not_the_name():
    """AlphaEdit's name with MEMIT's solver runs MEMIT: same weights, no null-space report, no history."""
    from unlearn_tui.backends.editing.locate import LeastSquares, apply_spread
    from unlearn_tui.backends.model import state_hash

    reqs = _requests(make_items(2))
    fast = {"v_steps": 3, "templates": 0, "token_budget": 512, "layers": [1, 2]}
    results = {}
    for label, name, solver_of in (("memit", "memit", None), ("renamed", "alphaedit", "memit")):
        h = tiny.handle("llama")
        m = methods.make("memit", fast)
        ctx = _ctx(state={})
        calls = []

        class Counting(LeastSquares):
            def update(self, layer, K, R, mats):
                calls.append(layer)
                return super().update(layer, K, R, mats)

        with h.transaction(m.touched_parameters(h)) as tx:
            report = apply_spread(h, reqs, m.params, m.layers(h), ctx, Counting(m.params.mom2_update_weight), name)
        results[label] = (state_hash(h.model), report, ctx.state, calls)
        tx.rollback()
    (h1, r1, s1, c1), (h2, r2, s2, c2) = results["memit"], results["renamed"]
    assert h1 == h2 and c1 == c2 == [1, 2]
    assert "null_space_dims" not in r2 and "history" not in s2 and "nullspace" not in s2
    assert r1["batches"] == r2["batches"]


def test_alphaedit_solver_keeps_the_session_history():
    h = tiny.handle("llama")
    m = methods.make("alphaedit", {"v_steps": 2, "templates": 0, "token_budget": 512, "layers": [1, 2]})
    state: dict = {}
    with h.transaction(m.touched_parameters(h), keep_after=True):
        report = m.apply(h, _requests(make_items(2)), _ctx(state=state))
    assert set(report["null_space_dims"]) == {1, 2} and report["accumulated_edits"] == 1
    (entry,) = state["history"]
    assert entry["layers"] == (1, 2) and all(k.shape[1] == 2 for k in entry["keys"].values())


def test_each_finetune_class_owns_its_loss_terms():
    assert methods.get("ga").has_retain_term is False
    assert not methods.make("ga", {}).trains_retain()
    assert methods.make("gd", {}).trains_retain() and not methods.make("gd", {"alpha": 0}).trains_retain()
    # GA and GD use the base's ascent and retain NLL; KL brings its KL term, DPO and NPO their preference terms
    assert "retain_term" in vars(methods.get("kl")) and "forget_term" not in vars(methods.get("kl"))
    assert "forget_term" in vars(methods.get("dpo")) and "forget_term" in vars(methods.get("npo"))
    assert "objective" not in {f.name for f in dataclasses.fields(training.TrainConfig)}
    assert methods.get("kl").reference_needs.retain_dist and not methods.get("gd").reference_needs.any
    assert methods.get("dpo").reference_needs.refusal and not methods.get("npo").reference_needs.refusal


def test_the_training_loop_uses_the_objectives_hooks():
    """A subclass that halves GD's forget term changes the loss by exactly that: the loop has no name switch."""
    GD = methods.get("gd")

    class HalfGD(GD):
        name = "half-gd"

        def forget_term(self, b):
            return 0.5 * super().forget_term(b)

    h = tiny.handle("llama")
    items = make_items(6)
    f_ex = training.forget_examples(h, _requests(items[:3]))
    r_ex = training.retain_examples(h, items[3:])
    pad = h.tokenizer.pad_token_id
    idx_f, idx_r = [0, 1, 2], [0, 1, 2]
    with torch.no_grad():
        full, parts = training.step_loss(GD(GD.Params()), h.model, pad, f_ex, r_ex, idx_f, idx_r, None)
        half, hparts = training.step_loss(HalfGD(GD.Params()), h.model, pad, f_ex, r_ex, idx_f, idx_r, None)
    assert list(parts) == ["forget_nll", "retain_nll"] and parts == hparts
    assert float(full) == pytest.approx(-parts["forget_nll"] + parts["retain_nll"], rel=1e-6)
    assert float(half) == pytest.approx(-0.5 * parts["forget_nll"] + parts["retain_nll"], rel=1e-6)
