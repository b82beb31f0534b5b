"""AlphaEdit (Fang et al., 2025) used for unlearning: null-space constrained MEMIT.

MEMIT's update is projected onto the approximate null space of the
preserved-knowledge keys: ``P = U U^T`` with ``U`` the eigenvectors of the key
second moment ``C`` (:mod:`backends.stats`) whose eigenvalues are below
``nullspace_threshold`` (absolute, as in the paper, or relative to the largest
eigenvalue), so ``dW K0 ~ 0`` for preserved keys.  The keys of earlier edits in
the same session are added to the normal equations so sequential edits do not
undo each other; they live in the session's method state and follow
undo/redo (see :mod:`backends.editing.locate`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ..editing.locate_params import EASYEDIT_COMMON, LocateParams
from ..params import param
from . import register
from .base import SpreadLayers

if TYPE_CHECKING:
    from ..editing.locate import NullSpaceProjection


@register
class AlphaEdit(SpreadLayers):
    name: ClassVar[str] = "alphaedit"
    summary: ClassVar[str] = "AlphaEdit: MEMIT projected onto the null space of preserved keys; sequential-safe"
    needs_retain: ClassVar[bool] = False
    EASYEDIT_KEYS: ClassVar[dict[str, Any]] = {**EASYEDIT_COMMON, "layers": ("layers", "list"),
                                               "nullspace_threshold": "nullspace_threshold", "L2": "l2",
                                               "batch_size": ("batch_size", "batch")}

    @dataclass
    class Params(LocateParams):
        layers: list[int] | None = param(None, "the MLP layers to spread the edit over", min=0,
                                         auto="layers 4-8 of 32, scaled to the depth")
        nullspace_threshold: float = param(2e-2, "eigenvalues of C below this span the protected null space",
                                           min=0.0, max=1e6)
        relative_threshold: bool = param(False, "read nullspace_threshold relative to C's largest eigenvalue")
        # l2 10 is the published value; on the embedded model's factual split (40 forget) 20 scored best of
        # 10 / 20 / 30 / 50 / 100 (composite 1.604 vs 1.579 at 10; benchmarks/RESULTS.md)
        l2: float = param(10.0, "ridge term of the projected normal equations", min=1e-9, max=1e9)
        batch_size: int | None = param(None, "requests per batch", min=1, auto="all requests at once")
        # v_weight_decay / clamp_norm_factor: the shared LocateParams defaults (1e-3, 4.0), as in the Llama
        # configs.  The GPT-J values (0.5, 0.75) left delta too small for a refusal target on the embedded
        # model (figures: benchmarks/RESULTS.md, bench_locate_edit.py quality).

    params: AlphaEdit.Params

    def solver(self) -> NullSpaceProjection:
        from ..editing.locate import NullSpaceProjection

        return NullSpaceProjection(self.params.nullspace_threshold, self.params.relative_threshold, self.params.l2)

