"""``none``: evaluation only; the model is left as it is (the baseline row)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from . import register


@register
class NoEdit:
    name: ClassVar[str] = "none"
    summary: ClassVar[str] = "No edit: evaluate the model as it is"
    needs_retain: ClassVar[bool] = False

    @dataclass
    class Params:
        pass

    def __init__(self, params: "NoEdit.Params") -> None:
        self.params = params

    def touched_parameters(self, handle: Any) -> list[str]:
        return []

    def apply(self, handle: Any, requests: list, ctx: Any) -> dict:
        return {"edits": 0}
