"""Architecture drift guard: every family in ``backends.arch.SPECS``, loaded through the real loader.

For each family a tiny random model (``backends.tiny``) is saved with the tiny
tokenizer as a Hugging Face folder and loaded back with
``backends.model.load`` (the path a user's local model takes).  The adapter
must name real modules of the installed transformers (the unembedding, the
MLP projections, the final norm), and ROME, WISE and GRACE must run on it:
ROME rewrites exactly the MLP output matrix it names (a low-rank update), WISE
and GRACE install their adaptor without writing a weight and change the edited
prompt's logits while an unrelated prompt passes through bit for bit,
generation works under the edit, and rolling the transaction back restores
the weights and the generations exactly.

The models are untrained and tiny (hidden 32, see ``backends.tiny``), so the
hyper-parameters below are small step counts that keep the whole file fast;
behaviour is asserted as "the method did what it says", not as edit quality
(``tests/test_locate_edit.py`` and ``tests/test_wise_grace.py`` do that on
the public tiny models).
"""

from __future__ import annotations

import pytest
import torch

from unlearn_tui.backends import tiny
from unlearn_tui.backends.arch import SPECS
from unlearn_tui.backends.events import CancelToken, Log
from unlearn_tui.backends.model import ModelSpec, load, state_hash
from unlearn_tui.backends.targets import Request

FAMILIES = sorted(SPECS)
TARGET = "I don't know."
UNRELATED = "The quick brown fox jumps over the lazy dog."

ROME_FAST = {"v_steps": 8, "v_lr": 0.5, "templates": 0, "mom2_adjustment": False, "kl_factor": 0.0625,
             "clamp_norm_factor": 8.0}
WISE_FAST = {"n_iter": 8, "edit_lr": 0.05, "norm_constraint": 1.0, "act_margin": [0.01, 0.2, 0.1],
             "first_token_weight": 0.0, "above_out_of_scope": False, "contexts": 0}
# an explicit radius: the automatic one (0.25 x the key norm) covers every prompt on tiny random gemma, whose
# scaled embeddings keep the last-token keys of all chat prompts within ~0.3 of each other
GRACE_FAST = {"n_iter": 8, "edit_lr": 0.3, "eps": 0.05}


@pytest.fixture(scope="module")
def saved_folders(tmp_path_factory):
    """family -> a saved tiny model folder (built once per module), with the built model's state hash."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()   # the from-config builds warn about untrained weights
    out: dict[str, tuple] = {}

    def get(family: str):
        if family not in out:
            model, tok = tiny.build(family)
            folder = tmp_path_factory.mktemp(f"tiny-{family}")
            model.save_pretrained(folder)
            tok.save_pretrained(folder)
            out[family] = (folder, state_hash(model), model.config.tie_word_embeddings)
        return out[family]

    yield get
    transformers.logging.set_verbosity(verbosity)


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def loaded(family, saved_folders):
    folder, built_hash, tied = saved_folders(family)
    h = load(ModelSpec(name=str(folder), device="cpu", dtype="float32"))
    return h, built_hash, tied


def _requests(n: int) -> list[Request]:
    from tests.conftest import make_items

    return [Request(prompt=f"{it.question} ({it.id})", target=TARGET, subject=it.subject, item_ids=[it.id])
            for it in make_items(n)]


def _ctx(events: list | None = None):
    from unlearn_tui.backends.runner import EditContext

    return EditContext(events.append if events is not None else (lambda e: None), CancelToken(), [], [], {},
                       seed=0)


def _apply(handle, name: str, params: dict, reqs, events: list | None = None):
    from unlearn_tui.backends.methods import make

    m = make(name, params)
    touched = m.touched_parameters(handle)
    with handle.transaction(touched, keep_after=True) as tx:
        report = m.apply(handle, reqs, _ctx(events))
    return m, touched, tx, report


def _logits(handle, text: str) -> torch.Tensor:
    ids = torch.tensor([handle.prompt_ids(text)])
    with torch.no_grad():
        return handle.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1]


def _generations(handle, questions: list[str]) -> list[str]:
    from unlearn_tui.backends.generation import generate

    return generate(handle, [handle.prompt_ids(q) for q in questions], max_new_tokens=6)


def _suffix_warnings(events: list) -> list[str]:
    return [e.message for e in events if isinstance(e, Log) and "suffix shortcut" in e.message]


# ----------------------------------------------------------------------------------------- coverage


def test_every_family_has_a_tiny_config():
    assert set(tiny.ALL_ARCHS) == set(SPECS)
    assert set(tiny.ARCHS) <= set(tiny.ALL_ARCHS)
    with pytest.raises(ValueError, match="unknown tiny architecture"):
        tiny.config("mamba", 100)


# ----------------------------------------------------------------------------------------- adapter


def test_loader_round_trip_and_adapter_names_real_modules(loaded, family):
    h, built_hash, tied = loaded
    a, model = h.adapter, h.model
    assert model.config.model_type == family and a.spec.family == family
    assert state_hash(model) == built_hash              # the folder loads back to the same weights
    assert a.n_layers == 4 and a.hidden_size == 32 and a.mlp_width == 64
    modules = dict(model.named_modules())
    for layer in range(a.n_layers):
        for name in (a.block_name(layer), a.mlp_name(layer), a.mlp_out_name(layer), *a.mlp_in_names(layer)):
            assert name in modules, name
        assert a.mlp_out_weight_name(layer) in dict(model.named_parameters())
        assert tuple(a.mlp_out_matrix(layer).shape) == (a.hidden_size, a.mlp_width)
        assert all(hasattr(m, "weight") for m in a.mlp_in(layer))
    assert a.embed() is model.get_input_embeddings()
    assert a.unembed() is model.get_output_embeddings()
    assert a.unembed().weight.shape == (model.config.vocab_size, a.hidden_size)
    assert a.tied_embeddings == bool(tied)
    assert a.final_norm() is modules[a.spec.final_norm]   # (OLMo's layer norm has no weight)
    # the key the editors read (input of the MLP output projection) has the MLP width, and the final norm
    # output through the unembedding gives the model's logits
    keys, finals = [], []
    k_hook = a.mlp_out(1).register_forward_pre_hook(lambda m, args: keys.append(args[0]))
    n_hook = a.final_norm().register_forward_hook(lambda m, args, out: finals.append(out))
    ids = torch.tensor([h.prompt_ids("What is the capital of France?")])
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits
    finally:
        k_hook.remove()
        n_hook.remove()
    assert keys and keys[0].shape[-1] == a.mlp_width
    with torch.no_grad():
        mine = a.unembed_logits(finals[-1])
    torch.testing.assert_close(mine, logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_suffix_runner_logits_equal_the_full_forward(family, saved_folders):
    """WISE/GRACE train through SuffixRunner: its logits must be the model's own, head included."""
    from unlearn_tui.backends.editing.lifelong import SuffixRunner, sequence_batch

    h = load(ModelSpec(name=str(saved_folders(family)[0]), device="cpu", dtype="float32"))
    runner = SuffixRunner(h, 2)
    b = sequence_batch(h, [h.prompt_ids("What is the capital of France?"), h.prompt_ids("Hi")], [[5, 6, 7], [8]])
    prep = runner.prepare(b.ids, b.mask)
    assert runner.fast is True
    rows, pos, _ = b.target_positions()
    with torch.no_grad():
        full = h.model(input_ids=b.ids, attention_mask=b.mask).logits[rows, pos]
        mine = runner.logits(prep, rows, pos)
    torch.testing.assert_close(mine, full, rtol=0, atol=1e-6)


def test_adapter_finds_parts_by_their_other_transformers_names():
    """A GPT-NeoX laid out as before transformers 5 (``embed_out``, no accessors) still resolves."""
    from torch import nn

    from unlearn_tui.backends.arch import Adapter

    class Cfg:
        model_type = "gpt_neox"
        hidden_size = 8

    class Old(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = Cfg()
            self.gpt_neox = nn.Module()
            self.gpt_neox.embed_in = nn.Embedding(5, 8)
            self.gpt_neox.layers = nn.ModuleList([nn.Module()])
            self.gpt_neox.final_layer_norm = nn.LayerNorm(8)
            self.embed_out = nn.Linear(8, 5, bias=False)

    old = Old()
    a = Adapter.for_model(old)
    assert a.unembed() is old.embed_out and a.embed() is old.gpt_neox.embed_in
    assert not a.tied_embeddings
    del old.embed_out
    with pytest.raises(AttributeError, match="lm_head.*embed_out"):
        a.unembed()


# ----------------------------------------------------------------------------------------- methods


def test_rome_rewrites_exactly_the_mlp_out_matrix_it_names(loaded, family, monkeypatch):
    from unlearn_tui.backends.editing import locate
    from unlearn_tui.backends.editing.hooks import capture
    from unlearn_tui.backends.editing.keys import edit_prompt
    from unlearn_tui.backends.methods import make

    h, _, _ = loaded
    a = h.adapter
    reqs = _requests(2)
    base = state_hash(h.model)
    gens_before = _generations(h, [reqs[1].prompt, UNRELATED])
    edit_before = _logits(h, reqs[1].prompt)
    params = {n: p.detach().clone() for n, p in h.model.named_parameters()}
    layer = make("rome", ROME_FAST).layer(h)
    name = f"{a.spec.layers}.{layer}.{a.spec.mlp_out}.weight"
    # the key of the first request, read on the unedited model: the MLP output projection's input at the
    # subject's last token of the bare edit prompt (no context templates)
    first = edit_prompt(h, reqs[0].prompt, reqs[0].subject)
    with capture(h.model, [a.mlp_out_name(layer)], "input") as st, torch.no_grad():
        h.model(input_ids=torch.tensor([first.ids]))
    key0 = st[a.mlp_out_name(layer)][0][0, first.index].float()
    calls: list[tuple] = []
    real = locate.rome_update

    def spy(k, r, cov=None):   # the key, the residual and the (out, in) matrix before this edit's write
        calls.append((k.clone(), r.clone(), a.mlp_out_matrix(layer).detach().clone()))
        return real(k, r, cov)

    monkeypatch.setattr(locate, "rome_update", spy)
    _, touched, tx, report = _apply(h, "rome", ROME_FAST, reqs)
    assert touched == [name] and report["edits"] == 2 and len(calls) == 2
    changed = [n for n, p in h.model.named_parameters() if not torch.equal(p, params[n])]
    assert changed == [name]
    torch.testing.assert_close(calls[0][0], key0, rtol=1e-4, atol=1e-5)
    # each edit is rank one and maps its key exactly onto its residual (in the module's own layout)
    afters = [calls[1][2], a.mlp_out_matrix(layer).detach()]
    for (k, r, W_before), W_after in zip(calls, afters):
        dW = (W_after - W_before).double()
        assert int(torch.linalg.matrix_rank(dW, rtol=1e-4)) == 1
        torch.testing.assert_close((dW @ k.double()).float(), r.float(), rtol=1e-3, atol=1e-3 * float(r.norm()))
    assert not torch.equal(_logits(h, reqs[1].prompt), edit_before)
    gens = _generations(h, [reqs[1].prompt, UNRELATED])
    assert len(gens) == 2 and all(isinstance(g, str) for g in gens)
    tx.rollback()
    assert state_hash(h.model) == base
    assert _generations(h, [reqs[1].prompt, UNRELATED]) == gens_before


@pytest.mark.parametrize("method", ["wise", "grace"])
def test_lifelong_adaptor_installs_routes_and_rolls_back(loaded, family, method):
    h, _, _ = loaded
    reqs = _requests(2)
    base = state_hash(h.model)
    edit_before = _logits(h, reqs[1].prompt)
    other_before = _logits(h, UNRELATED)
    gens_before = _generations(h, [reqs[1].prompt, UNRELATED])
    events: list = []
    _, touched, tx, report = _apply(h, method, WISE_FAST if method == "wise" else GRACE_FAST, reqs, events)
    assert touched == [] and report["edits"] == 2
    (wrapper,) = h.wrappers
    assert wrapper.name == method
    assert state_hash(h.model) == base                              # the weights are never written
    assert _suffix_warnings(events) == []                           # the fast path matched this family
    info = wrapper.describe_query(h, reqs[1].prompt)
    if method == "wise":
        assert report["memory_edits"] == 2 and info["wise_route"] == "side"
    else:
        assert report["entries"] >= 1 and info["grace_hit"] == 1.0
        assert wrapper.describe_query(h, UNRELATED)["grace_hit"] == 0.0
    assert not torch.equal(_logits(h, reqs[1].prompt), edit_before)
    if method == "grace" or wrapper.describe_query(h, UNRELATED)["wise_route"] == "main":
        assert torch.equal(_logits(h, UNRELATED), other_before)    # outside the edit: bit for bit
    gens = _generations(h, [reqs[1].prompt, UNRELATED])
    assert len(gens) == 2 and all(isinstance(g, str) for g in gens)
    tx.rollback()
    assert h.wrappers == [] and state_hash(h.model) == base
    assert torch.equal(_logits(h, reqs[1].prompt), edit_before)
    assert _generations(h, [reqs[1].prompt, UNRELATED]) == gens_before

