"""MEMIT (Meng et al., 2023) used for unlearning: batch edits spread over layers.

One ``delta`` per request is optimised at the last layer of the range; the
layers are then updated in order with the covariance-regularised least
squares ``dW = R K^T (lambda C + K K^T)^-1``, each taking its share of the
remaining residual (see :mod:`backends.editing.locate`).  ``C`` comes from
:mod:`backends.stats` (cached, offline by default).  Tied input/output
embeddings need nothing special: logits come from the model's own forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ..editing.locate_params import EASYEDIT_COMMON, LocateParams
from ..params import param
from . import register
from .base import SpreadLayers

if TYPE_CHECKING:
    from ..editing.locate import LeastSquares


@register
class MEMIT(SpreadLayers):
    name: ClassVar[str] = "memit"
    summary: ClassVar[str] = "MEMIT: batch edits spread over several MLP layers (covariance-regularised)"
    needs_retain: ClassVar[bool] = False
    EASYEDIT_KEYS: ClassVar[dict[str, Any]] = {**EASYEDIT_COMMON, "layers": ("layers", "list"),
                                               "mom2_update_weight": "mom2_update_weight",
                                               "batch_size": ("batch_size", "batch")}

    @dataclass
    class Params(LocateParams):
        layers: list[int] | None = param(None, "the MLP layers to spread the edit over", min=0,
                                         auto="layers 4-8 of 32, scaled to the depth")
        # lambda 1000 (not the reference 15000) and the shared clamp 4.0 / weight decay 1e-3: with 15000 the
        # least squares left much of the residual on the embedded model (figures: benchmarks/RESULTS.md)
        mom2_update_weight: float = param(1000.0, "lambda: weight of the key covariance prior", min=0.0,
                                          max=1e9)
        batch_size: int | None = param(None, "requests per MEMIT batch", min=1, auto="all requests at once")

    params: MEMIT.Params

    def solver(self) -> LeastSquares:
        from ..editing.locate import LeastSquares

        return LeastSquares(self.params.mom2_update_weight)

