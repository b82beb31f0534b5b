"""Importing EasyEdit hparams YAML files onto our methods' params."""

from __future__ import annotations

import pytest

from unlearn_tui.backends import methods
from unlearn_tui.backends.easyedit import import_hparams
from unlearn_tui.backends.errors import UserError
from unlearn_tui.backends.params import parse_params

ROME_YAML = """alg_name: "ROME"
model_name: "./hugging_cache/llama-2-7b"
device: 0
layers: [5]
fact_token: "subject_last"
v_num_grad_steps: 20
v_lr: 5e-1
v_loss_layer: 31
v_weight_decay: 1e-3
clamp_norm_factor: 4
kl_factor: 0.0625
mom2_adjustment: false
context_template_length_params: [[5, 10], [10, 10]]
rewrite_module_tmp: "model.layers.{}.mlp.down_proj"
mom2_dataset: "wikipedia"
mom2_n_samples: 100000
mom2_dtype: "float32"
"""

MEMIT_YAML = """alg_name: "MEMIT"
layers: [4, 5, 6, 7, 8]
clamp_norm_factor: 0.75
v_num_grad_steps: 25
v_weight_decay: 0.5
mom2_update_weight: 15000
batch_size: 1
lm_head_module: "lm_head"
"""

ALPHA_YAML = """alg_name: "AlphaEdit"
layers: [4, 5, 6, 7, 8]
nullspace_threshold: 2e-2
L2: 10
v_lr: 1e-1
"""


def _write(tmp_path, text, name="h.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_rome_yaml(tmp_path):
    name, params, ignored = import_hparams(_write(tmp_path, ROME_YAML))
    assert name == "rome"
    assert params["layer"] == 5 and params["v_steps"] == 20 and params["v_lr"] == 0.5
    assert params["mom2_adjustment"] is False and params["corpus"] == "hub:wikitext"
    assert params["templates"] == 10 and params["fact_token"] == "subject_last"
    for k in ("model_name", "device", "v_loss_layer", "rewrite_module_tmp", "mom2_n_samples", "mom2_dtype"):
        assert k in ignored
    assert "layers" not in ignored
    p = parse_params(methods.get(name).Params, params)  # the result is valid for the method
    assert p.layer == 5


def test_memit_and_alphaedit_yaml(tmp_path):
    name, params, ignored = import_hparams(_write(tmp_path, MEMIT_YAML))
    assert name == "memit" and params["layers"] == [4, 5, 6, 7, 8] and params["mom2_update_weight"] == 15000
    assert params["batch_size"] == 1 and ignored == ["lm_head_module"]
    name, params, ignored = import_hparams(_write(tmp_path, ALPHA_YAML, "a.yaml"))
    assert name == "alphaedit" and params["l2"] == 10 and params["nullspace_threshold"] == 0.02
    assert params["v_lr"] == 0.1 and ignored == []


def test_method_argument_overrides_alg_name(tmp_path):
    name, params, _ = import_hparams(_write(tmp_path, MEMIT_YAML), method="alphaedit")
    assert name == "alphaedit" and params["layers"] == [4, 5, 6, 7, 8]
    assert "mom2_update_weight" not in params


def test_errors_name_the_key(tmp_path):
    with pytest.raises(UserError) as e:
        import_hparams(_write(tmp_path, "alg_name: ROME\nv_lr: -3\n"))
    assert "v_lr" in str(e.value)
    with pytest.raises(UserError) as e:
        import_hparams(_write(tmp_path, "alg_name: PMET\n", "b.yaml"))
    assert "PMET" in str(e.value)
    with pytest.raises(UserError):
        import_hparams(_write(tmp_path, "layers: [1]\n", "c.yaml"))
    with pytest.raises(UserError):
        import_hparams(tmp_path / "missing.yaml")
