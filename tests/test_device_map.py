"""``[model] device_map`` / ``max_memory`` through accelerate, on a CPU-only machine.

What a CPU allows: a tiny llama saved to a folder and loaded with a
``device_map`` table that puts one block on ``"disk"`` (accelerate's offload
hooks: its weights sit on the ``meta`` device and are brought in for every
forward), plus ``max_memory``; and a tiny model dispatched with the hooks on
every block (``force_hooks``) although everything is on the CPU.  Checked:
the session keys and their one-line errors, ``device_of`` against what
accelerate placed, generation and answer statistics equal to the
single-device model's, ROME / MEMIT / GRACE edits equal to the single-device
model's and rolled back bit for bit, an offloaded layer refused in one line,
and (the "meta trick") that no method uses the handle's global ``device``:
with ``handle.device = "meta"`` all six methods of the GPU smoke still run,
because every tensor follows the device of the input or of its layer.

Not testable without GPUs: two real devices (a layer's keys, values,
statistics and updates on a GPU other than the input's), CPU offload from a
GPU, bf16 solves on CUDA, MPS's float64 fallback on a real MPS device.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from unlearn_tui.backends import methods
from unlearn_tui.backends.errors import UserError
from unlearn_tui.backends.events import CancelToken
from unlearn_tui.backends.model import ModelSpec, load, size_bytes, state_hash
from unlearn_tui.backends.runner import EditContext
from unlearn_tui.backends.targets import build_requests, simple_targets

ROOT = Path(__file__).resolve().parents[1]
TARGET = "I don't know."
FAST = {"v_steps": 8, "v_lr": 1.0, "templates": 0, "token_budget": 512, "kl_factor": 0.0625}
SPLIT = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu",
         "model.layers.2": "cpu", "model.layers.3": "disk", "model.norm": "cpu", "lm_head": "cpu"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from unlearn_tui.backends import tiny

    model, tok = tiny.build("llama")
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _split(folder: Path, **kw):
    return load(ModelSpec(name=str(folder), device_map=dict(SPLIT), max_memory={"cpu": "2GiB"}, **kw))


def _items(n):
    from conftest import make_items

    return make_items(n)


def _requests(n=2):
    items = _items(n)
    return build_requests(items, simple_targets("idk", items, [TARGET]), 1)


def _ctx(retain=()):
    return EditContext(lambda e: None, CancelToken(), [], list(retain), {})


# --------------------------------------------------------------------------- session keys


@pytest.mark.parametrize("extra, where, fragment", [
    ('device_map = "autoo"\n', 4, 'did you mean "auto"'),
    ('device = "cpu"\ndevice_map = "auto"\n', 5, 'cannot be combined with device = "cpu"'),
    ('[model.device_map]\n"model.layers.0" = "tpu"\n', 5, 'unknown device "tpu"'),
    ('[model.max_memory]\ncpu = "2GiB"\n', 4, "only applies with device_map"),
    ('device_map = "auto"\n[model.max_memory]\ncpu = "2 gigs"\n', 6, 'bad size "2 gigs"'),
    ('device_map = "auto"\n[model.max_memory]\ntpu = "2GiB"\n', 6, 'unknown device "tpu"'),
    ("device_map = 3\n", 4, "or a table of module = device, got 3"),
    ("device_map = {}\n", 4, "got an empty table"),
])
def test_bad_placement_keys_are_one_line_errors_at_their_line(extra, where, fragment):
    from unlearn_tui.sessions import loads

    with pytest.raises(UserError) as e:
        loads('version = 1\n[model]\nname = "tiny:llama"\n' + extra, "s.toml")
    assert e.value.where == f"s.toml:{where}"
    assert fragment in e.value.message and "\n" not in e.value.message


def test_placement_keys_round_trip():
    from unlearn_tui.sessions import dumps, loads
    from unlearn_tui.sessions.schema import new_session

    s = loads('version = 1\n[model]\nname = "x/y"\ndevice_map = "balanced"\n[model.max_memory]\n'
              'cpu = "8GiB"\n"cuda:0" = 1000\n', "s.toml")
    assert s.model.device_map == "balanced" and s.model.max_memory == {"cpu": "8GiB", "cuda:0": 1000}
    assert loads(dumps(s), "s.toml").model == s.model
    fresh = new_session(model={"name": "x/y", "device_map": dict(SPLIT), "max_memory": {"0": "20GiB"}})
    assert loads(dumps(fresh), "s.toml").model == fresh.model
    assert "device_map" not in dumps(new_session())   # omitted when unset


def test_sizes_and_unavailable_devices():
    assert size_bytes("2GiB") == 2 * 2**30 and size_bytes("500mb") == 500 * 10**6 and size_bytes(7) == 7
    with pytest.raises(UserError, match="bad size"):
        size_bytes("lots")
    if not torch.cuda.is_available():
        with pytest.raises(UserError) as e:
            load(ModelSpec(name="tiny:llama", device_map={"": "cuda:1"}))
        assert e.value.where == "model.device_map" and "CUDA device" in e.value.message


# --------------------------------------------------------------------------- loading a split model


def test_split_folder_loads_where_accelerate_put_it(folder):
    h = _split(folder)
    assert h.device_map == SPLIT
    assert h.is_offloaded("model.layers.3.mlp.down_proj.weight")
    assert not h.is_offloaded("model.layers.1.mlp.down_proj.weight")
    # an offloaded block computes on accelerate's execution device (the CPU here), so do its edits' tensors
    assert h.device_of(3) == torch.device("cpu") == h.device_of("model.layers.3.mlp.down_proj.weight")
    assert h.device_of(h.adapter.mlp_out(1)) == torch.device("cpu") == h.input_device
    assert h.devices == ["cpu"]
    assert "disk: 1 module(s)" in h.placement()
    # the hash and fingerprint read accelerate's copy of offloaded weights: the same model, the same values
    plain = load(ModelSpec(name=str(folder)))
    assert state_hash(h.model) == state_hash(plain.model)
    assert h.fingerprint == plain.fingerprint


def test_unknown_module_in_the_table_is_refused(folder):
    with pytest.raises(UserError) as e:
        load(ModelSpec(name=str(folder), device_map={**SPLIT, "model.layers.9": "cpu"}))
    assert e.value.where == 'model.device_map."model.layers.9"' and "not a module" in e.value.message
    with pytest.raises(UserError, match="places no module holding"):
        load(ModelSpec(name=str(folder), device_map={k: v for k, v in SPLIT.items() if k != "model.layers.2"}))


def test_generation_and_answer_stats_equal_the_single_device_model(folder):
    from unlearn_tui.backends import generation

    plain, split = load(ModelSpec(name=str(folder))), _split(folder)
    prompts = [plain.prompt_ids(it.question) for it in _items(4)]
    assert generation.generate(split, prompts, 12) == generation.generate(plain, prompts, 12)
    pairs = [(p, plain.encode_answer("Paris")) for p in prompts]
    a = generation.answer_stats(plain, pairs)
    b = generation.answer_stats(split, pairs)
    assert [(x.mean_logprob, x.mrr) for x in a] == [(y.mean_logprob, y.mrr) for y in b]


@pytest.mark.parametrize("name, params", [("rome", {"layer": 1, "mom2_adjustment": True}),
                                          ("memit", {"layers": [1, 2]}),
                                          ("grace", {"layer": 1, "n_iter": 10})])
def test_edits_on_a_split_model_equal_single_device_and_roll_back_bit_for_bit(folder, name, params):
    plain, split = load(ModelSpec(name=str(folder))), _split(folder)
    before = state_hash(split.model)
    results = []
    for h in (plain, split):
        m = methods.make(name, {**FAST, **params} if name != "grace" else params)
        with h.transaction(m.touched_parameters(h)) as tx:
            m.apply(h, _requests(), _ctx())
            after = {n: h.parameter(n).detach().clone() for n in tx.names}
            wrapper = h.wrappers[0].get_state() if h.wrappers else {}
            results.append((after, {k: v for k, v in wrapper.items() if isinstance(v, torch.Tensor)}))
        assert all(t.device.type == "cpu" for t in tx.before.values())   # snapshots in CPU memory
        tx.rollback()
    (w_plain, s_plain), (w_split, s_split) = results
    assert w_plain.keys() == w_split.keys() and s_plain.keys() == s_split.keys()
    assert all(torch.equal(w_plain[n], w_split[n]) for n in w_plain)
    assert all(torch.equal(s_plain[k], s_split[k]) for k in s_plain)
    assert w_split or s_split   # something was edited
    assert state_hash(split.model) == before and not split.wrappers


@pytest.mark.parametrize("name, params", [("wise", {"layer": 3, "n_iter": 4}), ("grace", {"layer": 3, "n_iter": 6})])
def test_wrappers_on_an_offloaded_layer_equal_single_device(folder, name, params):
    """WISE and GRACE never write the weights: on a block accelerate offloaded to disk they hook its forward
    (run on the execution device) and give the single-device model's state."""
    plain, split = load(ModelSpec(name=str(folder))), _split(folder)
    assert split.is_offloaded("model.layers.3.mlp.down_proj.weight")
    states = []
    for h in (plain, split):
        m = methods.make(name, params)
        with h.transaction(m.touched_parameters(h)) as tx:
            m.apply(h, _requests(), _ctx())
            states.append({k: v for k, v in h.wrappers[0].get_state().items() if isinstance(v, torch.Tensor)})
        tx.rollback()
    assert states[0].keys() == states[1].keys() and states[0]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_editing_an_offloaded_layer_is_refused_in_one_line(folder):
    h = _split(folder)
    m = methods.make("rome", {**FAST, "layer": 3})
    with pytest.raises(UserError) as e:
        with h.transaction(m.touched_parameters(h)):
            m.apply(h, _requests(1), _ctx())
    assert e.value.where == "model.device_map" and "offloaded" in e.value.message
    assert '"model.layers.3.mlp.down_proj.weight"' in e.value.message and "\n" not in e.value.message


# --------------------------------------------------------------------------- every tensor follows its layer


SIX = [("rome", {**FAST, "layer": 1}), ("memit", {**FAST, "layers": [1, 2]}),
       ("alphaedit", {**FAST, "layers": [1, 2]}), ("wise", {"layer": 2, "n_iter": 4}),
       ("grace", {"layer": 1, "n_iter": 4}), ("gd", {"epochs": 1, "max_steps": 2})]


def test_tiny_dispatch_hooks_every_block_and_no_method_uses_the_global_device():
    """The "meta trick": a tiny model dispatched with accelerate's hooks on every block, and the handle's
    global ``device`` set to ``meta``; any tensor made there instead of on its input's or layer's device would
    be a meta tensor meeting real ones (an error).  All six methods run, and roll back bit for bit."""
    h = load(ModelSpec(name="tiny:llama", device_map={"": "cpu"}))
    assert hasattr(h.model, "_hf_hook") and h.input_device == torch.device("cpu")
    blocks = {i: h.adapter.block(i).__dict__.get("forward") for i in range(h.adapter.n_layers)}
    h.device = "meta"
    base = state_hash(h.model)
    retain = _items(6)[3:]
    for name, params in SIX:
        m = methods.make(name, params)
        with h.transaction(m.touched_parameters(h)) as tx:
            report = m.apply(h, _requests(2), _ctx(retain))
        assert report is not None
        tx.rollback()
        assert state_hash(h.model) == base and not h.wrappers, name
    # the value optimisation's block replay puts accelerate's forward wrappers back
    assert {i: h.adapter.block(i).__dict__.get("forward") for i in blocks} == blocks


def test_layer_tensors_ask_for_their_layers_device(llama_handle, monkeypatch):
    """Keys, values, statistics and WISE's side memory consult ``device_of`` for the layer they belong to (a
    spy: on one CPU every answer is the same, so what is asked is what is checked).  GRACE's key and value are
    read by hooks on its layer's MLP, so they are born on that layer's device and ask nothing."""
    from unlearn_tui.backends.model import ModelHandle

    asked: list[str] = []
    real = ModelHandle.device_of

    def spy(self, what):
        asked.append(what if isinstance(what, (str, int)) else self._module_names().get(id(what), "?"))
        return real(self, what)

    monkeypatch.setattr(ModelHandle, "device_of", spy)
    h = llama_handle
    for name, params, wanted in [("rome", {**FAST, "layer": 1, "mom2_adjustment": True},
                                  {"model.layers.1.mlp", "model.layers.1.mlp.down_proj"}),
                                 ("wise", {"layer": 2, "n_iter": 2}, {"model.layers.2.mlp.down_proj"})]:
        asked.clear()
        m = methods.make(name, params)
        with h.transaction(m.touched_parameters(h)) as tx:
            m.apply(h, _requests(1), _ctx())
        tx.rollback()
        assert wanted <= set(asked), (name, sorted(set(asked)))


def test_float64_solves_stay_on_the_keys_device_and_mps_falls_back_to_cpu():
    from unlearn_tui.backends.editing import linalg

    assert linalg.solve_device("mps") == torch.device("cpu")
    assert linalg.solve_device("cpu") == torch.device("cpu")
    assert linalg.solve_device("cuda:1") == torch.device("cuda", 1)
    g = torch.Generator().manual_seed(0)
    K, R = torch.randn(6, 3, generator=g), torch.randn(4, 3, generator=g)
    C = K @ K.T + torch.eye(6)
    dW = linalg.memit_update(K, R, C, 1.0)
    assert dW.dtype == torch.float32 and dW.device == K.device
    # the same numbers as the float64 formula
    ref = (R.double() @ K.double().T @ torch.linalg.inv(C.double() + K.double() @ K.double().T)).float()
    assert torch.allclose(dW, ref, atol=1e-5)


# --------------------------------------------------------------------------- the GPU smoke script


def test_gpu_smoke_dry_run_on_cpu(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_smoke.py"), "--device", "cpu", "--model", "tiny:llama",
           "--facts", "2"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    text = out.stdout
    assert "device cpu, dtype bfloat16" in text   # the default --dtype bf16, on the CPU
    for name in ("rome", "memit", "alphaedit", "wise", "grace", "gd"):
        assert name in text
    assert "s/edit" in text and "composite" in text and "all weights and scores finite" in text
