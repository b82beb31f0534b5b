"""Hyper-parameters shared by ROME, MEMIT and AlphaEdit (torch-free).

The value-optimisation, template and statistics fields are declared once in
:class:`LocateParams`; each method's ``Params`` subclasses it and adds its own
fields.  ``None`` layers are "auto": scaled to the model's depth from the
reference Llama configs (ROME edits layer 5 of 32; MEMIT/AlphaEdit layers 4-8
of 32), see :func:`auto_layer` and :func:`auto_layers`.  The MEMIT / AlphaEdit
method base is :class:`backends.methods.base.SpreadLayers`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from ..params import param

if TYPE_CHECKING:
    from ..arch import Adapter

REF_DEPTH = 32
ROME_REF_LAYER = 5
MEMIT_REF_LAYERS = (4, 8)


def auto_layer(n_layers: int, ref: int = ROME_REF_LAYER) -> int:
    return max(0, min(n_layers - 1, int(round(ref * n_layers / REF_DEPTH))))


def auto_layers(n_layers: int, ref: tuple[int, int] = MEMIT_REF_LAYERS) -> list[int]:
    lo = max(0, min(n_layers - 1, int(round(ref[0] * n_layers / REF_DEPTH))))
    hi = max(lo, min(n_layers - 1, int(round(ref[1] * n_layers / REF_DEPTH))))
    return list(range(lo, hi + 1))


def check_layers(layers: list[int], adapter: Adapter, key: str = "layers") -> list[int]:
    """MEMIT/AlphaEdit's layer list: non-empty, each in range (no negative indices), no repeats; sorted."""
    if not layers:
        raise UserError(f"{key} is empty; expected at least one layer index", key)
    out = [adapter.check_layer(l, key, negative=False) for l in layers]
    if len(set(out)) != len(out):
        raise UserError(f"{key} lists a layer twice: {layers}", key)
    return sorted(out)


@dataclass
class LocateParams:
    v_steps: int = param(25, "optimisation steps for the value vector (early stop below stop_loss)", min=1,
                         max=1000)
    v_lr: float = param(0.5, "Adam learning rate of the value optimisation", min=1e-5, max=10.0)
    v_weight_decay: float = param(1e-3, "weight decay on ||delta||^2 / ||h||^2", min=0.0, max=100.0)
    kl_factor: float = param(0.0625, "weight of the KL term on the subject's essence prompt", min=0.0, max=100.0)
    clamp_norm_factor: float = param(4.0, "||delta|| is clamped to this times the residual norm", min=0.01,
                                     max=100.0)
    stop_loss: float = param(0.05, "stop the value optimisation once the target NLL is below this", min=0.0,
                             max=10.0)
    stop_token: bool = param(True, "append the end-of-turn token to the target so the model stops after it")
    fact_token: str = param("subject_last", "where the key is read: the subject's last token (the papers) or "
                            "the prompt's last token", choices=("subject_last", "last"))
    templates: int = param(1, "context templates per length (5 and 10 tokens), plus the bare prompt", min=0,
                           max=20)
    corpus: str = param("self", 'key statistics corpus: "self" (text sampled from the model, offline), '
                        '"hub:wikitext", a .txt file, or an exported .safetensors statistics file')
    token_budget: int = param(8192, "at most this many corpus tokens for the key statistics", min=256,
                              max=100_000_000)
    stats_tol: float = param(0.01, "stop the statistics early when the relative change per batch is below this",
                             min=0.0, max=1.0)
    merge_keys: str = param("each", "query merging: key every question of a group at its own subject, one value "
                            "for the group (each), or the merged prompt at its last subject, as the paper (prompt)",
                            choices=("each", "prompt"))
    merge_targets: str = param("own", "query merging with merge_keys = each: every question keeps its own target "
                               "(own) or all take the group's target (group)", choices=("own", "group"))


# EasyEdit keys shared by the three methods (value conversions: see backends/easyedit.py)
EASYEDIT_COMMON: dict[str, Any] = {
    "v_num_grad_steps": "v_steps",
    "v_lr": "v_lr",
    "v_weight_decay": "v_weight_decay",
    "kl_factor": "kl_factor",
    "clamp_norm_factor": "clamp_norm_factor",
    "mom2_dataset": ("corpus", "corpus"),
    "context_template_length_params": ("templates", "template_count"),
    "fact_token": "fact_token",
}
