"""Architecture adapter, transactions (bit-for-bit rollback), device/dtype and resolving names."""

from __future__ import annotations

import pytest
import torch

from unlearn_tui.backends import tiny
from unlearn_tui.backends.arch import SPECS, Adapter
from unlearn_tui.backends.errors import Cancelled, NonFiniteError, UserError
from unlearn_tui.backends.events import CancelToken
from unlearn_tui.backends.model import pick_device, pick_dtype, resolve, state_hash


def test_adapter_names_real_modules(tiny_handle):
    a = tiny_handle.adapter
    assert a.n_layers == 4
    for layer in range(a.n_layers):
        assert a.block(layer) is tiny_handle.model.get_submodule(a.block_name(layer))
        assert all(hasattr(m, "weight") for m in a.mlp_in(layer))
        w = a.mlp_out_matrix(layer)
        assert tuple(w.shape) == (a.hidden_size, a.mlp_width)
    assert a.mlp_width == 64 and a.hidden_size == 32
    assert hasattr(a.final_norm(), "weight")
    assert a.unembed().weight.shape[0] == len(tiny_handle.tokenizer)
    # the MLP output projection maps the key (width mlp_width) to the residual stream
    keys = []
    hook = a.mlp_out(1).register_forward_pre_hook(lambda m, args: keys.append(args[0]))
    tiny_handle.model(torch.tensor([tiny_handle.prompt_ids("What is the capital of France?")]))
    hook.remove()
    assert keys and keys[0].shape[-1] == a.mlp_width


def test_tied_embeddings_detected():
    assert tiny.handle("llama").adapter.tied_embeddings
    assert tiny.handle("gpt2").adapter.tied_embeddings
    assert not tiny.handle("qwen2").adapter.tied_embeddings


def test_every_family_has_a_complete_spec():
    assert {"llama", "mistral", "qwen2", "gemma", "gpt2", "gptj", "gpt_neox", "phi"} <= set(SPECS)


def test_unsupported_architecture_is_a_user_error():
    class Cfg:
        model_type = "mamba"

    class M:
        config = Cfg()

    with pytest.raises(UserError, match="unsupported architecture \"mamba\""):
        Adapter.for_model(M())


def test_layer_out_of_range_is_a_user_error(llama_handle):
    with pytest.raises(UserError, match="layers 0..3"):
        llama_handle.adapter.block_name(7)
    assert llama_handle.adapter.block_name(-1).endswith(".3")


def _touch(handle, names, value=1.0):
    with torch.no_grad():
        for n in names:
            handle.parameter(n).add_(value)


def test_transaction_restores_bit_for_bit_on_exception(tiny_handle):
    before = state_hash(tiny_handle.model)
    names = [tiny_handle.adapter.mlp_out_weight_name(1), tiny_handle.adapter.mlp_out_weight_name(2)]
    with pytest.raises(RuntimeError):
        with tiny_handle.transaction(names):
            _touch(tiny_handle, names, 0.123456789)
            assert state_hash(tiny_handle.model) != before
            raise RuntimeError("boom")
    assert state_hash(tiny_handle.model) == before


def test_transaction_restores_on_cancel(llama_handle):
    before = state_hash(llama_handle.model)
    cancel = CancelToken()
    name = llama_handle.adapter.mlp_out_weight_name(0)
    with pytest.raises(Cancelled):
        with llama_handle.transaction([name]):
            _touch(llama_handle, [name])
            cancel.cancel()
            cancel.check()
    assert state_hash(llama_handle.model) == before


def test_non_finite_update_is_rolled_back(llama_handle):
    before = state_hash(llama_handle.model)
    name = llama_handle.adapter.mlp_out_weight_name(2)
    with pytest.raises(NonFiniteError, match="non-finite"):
        with llama_handle.transaction([name]):
            with torch.no_grad():
                llama_handle.parameter(name)[0, 0] = float("nan")
    assert state_hash(llama_handle.model) == before


def test_undo_redo_of_a_kept_transaction(llama_handle):
    before = state_hash(llama_handle.model)
    name = llama_handle.adapter.mlp_out_weight_name(3)
    with llama_handle.transaction([name], keep_after=True) as tx:
        _touch(llama_handle, [name], 0.5)
    after = state_hash(llama_handle.model)
    assert after != before
    tx.undo()
    assert state_hash(llama_handle.model) == before
    tx.redo()
    assert state_hash(llama_handle.model) == after


def test_transaction_removes_wrappers_added_inside(llama_handle):
    class W:
        name = "w"
        installed = 0

        def install(self, handle):
            W.installed += 1

        def remove(self, handle):
            W.installed -= 1

        def transform_question(self, q):
            return "PREFIX " + q

    with pytest.raises(RuntimeError):
        with llama_handle.transaction([]):
            llama_handle.add_wrapper(W())
            assert "PREFIX" in llama_handle.format_prompt("hi")
            raise RuntimeError
    assert llama_handle.wrappers == [] and W.installed == 0
    assert "PREFIX" not in llama_handle.format_prompt("hi")


def test_unknown_parameter_name_is_a_user_error(llama_handle):
    with pytest.raises(UserError, match="no parameter"):
        with llama_handle.transaction(["model.layers.0.mlp.nope.weight"]):
            pass


def test_device_and_dtype_auto_on_cpu():
    assert pick_device("auto") == ("cuda" if torch.cuda.is_available() else pick_device("auto"))
    if not torch.cuda.is_available():
        assert pick_device("auto") in ("cpu", "mps")
        assert pick_dtype("auto", "cpu") is torch.float32
        with pytest.raises(UserError, match="CUDA is not available"):
            pick_device("cuda")
    assert pick_dtype("auto", "cuda") is torch.bfloat16
    assert pick_dtype("float16", "cpu") is torch.float16
    with pytest.raises(UserError, match="unknown dtype"):
        pick_dtype("int3", "cpu")


def test_resolve_names(tmp_path):
    with pytest.raises(UserError, match="not a built-in model"):
        resolve("definitely not a model")
    with pytest.raises(UserError, match="GGUF file not found"):
        resolve(str(tmp_path / "missing.gguf"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(UserError, match="without config.json"):
        resolve(str(tmp_path / "folder"))
    assert resolve("someone/some-model") == ("hub", "someone/some-model")


def test_offline_hub_id_fails_with_one_line_user_error():
    from unlearn_tui.backends.model import ModelSpec, load

    with pytest.raises(UserError) as info:
        load(ModelSpec(name="no-such-owner-xyz/no-such-model-xyz"))
    assert "\n" not in str(info.value) and "no-such-owner-xyz/no-such-model-xyz" in str(info.value)


def test_local_folder_loads_and_trust_remote_code_is_off_by_default(tmp_path, monkeypatch):
    from unlearn_tui.backends.model import ModelSpec, load

    model, tok = tiny.build("gpt2")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    seen = {}
    import transformers

    orig = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*a, **kw):
        seen.update(kw)
        return orig(*a, **kw)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    h = load(ModelSpec(name=str(tmp_path / "m"), device="cpu"))
    assert seen.get("trust_remote_code") is False
    assert h.adapter.spec.family == "gpt2"
    assert state_hash(h.model) == state_hash(model)
