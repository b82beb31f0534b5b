"""What WISE and GRACE share before any tensor is touched (torch-free).

Both methods put an inference-time adaptor on ONE layer's MLP output
projection and never write the model's weights: their state lives in the
wrapper, which the transaction snapshots, so ``touched_parameters`` is empty.
Method modules import this at module level (the registry must stay cheap to
import); the tensor work lives in :mod:`.lifelong`, :mod:`.wise_memory` and
:mod:`.grace_codebook`.
"""

from __future__ import annotations

import re
from typing import Any, Callable, ClassVar

from ..errors import UserError
from ..events import Tracker

# both reference configs edit layer 27 of a 32-layer Llama: 27/31 of the way down the stack
REF_DEPTH_SHARE = 0.93


def resolve_layer(handle: Any, layer: int | None, frac: float, key: str) -> int:
    """``layer`` (negative counts from the end) or, when None, ``round(frac * (n - 1))``; range-checked."""
    n = handle.adapter.n_layers
    if layer is None:
        return max(0, min(n - 1, int(round(frac * (n - 1)))))
    if not -n <= layer < n:
        raise UserError(f"layer {layer} is out of range; this model has layers 0..{n - 1}", key)
    return layer % n


def inner_params_layer(value: Any) -> int:
    """EasyEdit's ``inner_params: [model.layers[27].mlp.down_proj.weight]`` -> 27."""
    text = value[0] if isinstance(value, (list, tuple)) and value else value
    m = re.search(r"(?:layers|h)\[?\.?(\d+)\]?", str(text))
    if not m:
        raise ValueError(f"no layer index in {text!r}")
    return int(m.group(1))


class OneLayerAdaptor:
    """Base of the WISE and GRACE method classes: the adaptor's layer and the (empty) touched weights."""

    name: ClassVar[str] = ""
    depth_share: ClassVar[float] = REF_DEPTH_SHARE
    params: Any

    def __init__(self, params: Any) -> None:
        self.params = params

    def layer(self, handle: Any) -> int:
        return resolve_layer(handle, self.params.layer, self.depth_share, "params.layer")

    def touched_parameters(self, handle: Any) -> list[str]:
        self.layer(handle)  # validate before the transaction starts
        return []

    def edit_each(self, requests: list, ctx: Any, n_iter: int,
                  train: Callable[[Any, Callable[[float], None]], dict],
                  detail: Callable[[dict], str]) -> list[dict]:
        """Train the requests one after another with progress per edit and per step; the per-edit reports."""
        edits = Tracker(ctx.on_event, ctx.cancel, f"{self.name}: edits", len(requests))
        per_edit = []
        for i, r in enumerate(requests):
            steps = Tracker(ctx.on_event, ctx.cancel, f"{self.name}: edit {i + 1}/{len(requests)}", n_iter,
                            detail=r.prompt[:60])
            info = train(r, lambda loss: steps.step(loss=loss))
            info["item_ids"] = list(r.item_ids)
            per_edit.append(info)
            edits.step(loss=info.get("nll"), detail=detail(info))
        return per_edit
