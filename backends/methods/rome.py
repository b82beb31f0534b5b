"""ROME (Meng et al., 2022) used for unlearning: a rank-one edit of one MLP.

The forget question (chat-formatted, its key read at the subject's last
token and averaged over context templates) is mapped to a refusal target:
``delta`` is optimised so that adding it to layer ``L``'s MLP output makes the
model produce the target, then the output projection gets the rank-one update
``dW = delta u^T / (u . k)`` (``u = k``, or ``C^-1 k`` with
``mom2_adjustment``).  Requests are edited one after the other.

Query merging: a merged request's questions are each keyed at their own
subject and share one ``delta`` (:mod:`backends.editing.locate`); the
``m`` keys become one update by ``merge_update``: ``exact`` (default) maps
every key to ``delta`` exactly with the smallest update in ROME's norm
(rank ``m``, :func:`~backends.editing.linalg.multi_key_update`; rank one for
``m = 1``), ``mean-key`` is ROME's rank-one update of the group's mean key,
``memit`` MEMIT's covariance-regularised least squares at this one layer.

Defaults: like the reference Llama configs, no covariance adjustment; the
layer is the reference layer 5 of 32 scaled to the model's depth.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ..editing.locate_params import EASYEDIT_COMMON, LocateParams, auto_layer
from ..params import param
from . import register
from .base import MethodBase

if TYPE_CHECKING:
    from ..model import ModelHandle
    from ..targets import Request
    from .base import EditContext


@register
class ROME(MethodBase):
    name: ClassVar[str] = "rome"
    summary: ClassVar[str] = "ROME: rank-one edit of one MLP, forget question -> refusal"
    needs_retain: ClassVar[bool] = False
    EASYEDIT_KEYS: ClassVar[dict[str, Any]] = {**EASYEDIT_COMMON, "layers": ("layer", "first"),
                                               "mom2_adjustment": "mom2_adjustment"}

    @dataclass
    class Params(LocateParams):
        layer: int | None = param(None, "the MLP layer to edit", min=0, auto="layer 5 of 32, scaled to the depth")
        # defaults tuned on the embedded model (benchmarks/RESULTS.md): the reference clamp (4.0) and KL weight
        # (0.0625) without the covariance shaping cost retain there
        mom2_adjustment: bool = param(True, "shape the update with the key covariance (C^-1 k)")
        clamp_norm_factor: float = param(2.0, "||delta|| is clamped to this times the residual norm", min=0.01,
                                         max=100.0)
        kl_factor: float = param(0.5, "weight of the KL term on the subject's essence prompt", min=0.0, max=100.0)
        merge_update: str = param("exact", "query merging: the group's keys all mapped exactly to its value "
                                  "(exact, rank m), their mean key (mean-key, rank one), or MEMIT's least squares "
                                  "at this one layer (memit)", choices=("exact", "mean-key", "memit"))
        mom2_update_weight: float = param(15000.0, "merge_update = memit: weight of the key covariance (MEMIT's "
                                          "lambda)", min=0.0, max=1e9)

    params: ROME.Params

    def layer(self, handle: ModelHandle) -> int:
        if self.params.layer is None:
            return auto_layer(handle.adapter.n_layers)
        return handle.adapter.check_layer(self.params.layer, "params.layer", negative=False)

    def touched_parameters(self, handle: ModelHandle) -> list[str]:
        return [handle.adapter.mlp_out_weight_name(self.layer(handle))]

    def apply(self, handle: ModelHandle, requests: Sequence[Request], ctx: EditContext) -> dict[str, Any]:
        from ..editing.locate import apply_rome

        return apply_rome(handle, requests, self.params, self.layer(handle), ctx, self.name)
