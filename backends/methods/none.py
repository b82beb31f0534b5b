"""``none``: evaluation only; the model is left as it is (the baseline row)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from . import register
from .base import MethodBase

if TYPE_CHECKING:
    from ..model import ModelHandle
    from ..targets import Request
    from .base import EditContext


@register
class NoEdit(MethodBase):
    name: ClassVar[str] = "none"
    summary: ClassVar[str] = "No edit: evaluate the model as it is"
    needs_retain: ClassVar[bool] = False
    changes_model: ClassVar[bool] = False

    @dataclass
    class Params:
        pass

    params: NoEdit.Params

    def touched_parameters(self, handle: ModelHandle) -> list[str]:
        return []

    def apply(self, handle: ModelHandle, requests: Sequence[Request], ctx: EditContext) -> dict[str, Any]:
        return {"edits": 0}
