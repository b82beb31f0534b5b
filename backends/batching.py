"""Padding token-id lists into one batch: the one place that does it.

* :func:`pad_right` pads at the end (teacher-forced passes: statistics, keys,
  training, answer statistics): real tokens start at column 0.
* :func:`pad_left` pads at the start (generation, which appends at the end):
  every row's last real token sits in the last column.

Both return ``(ids, mask)`` as ``long`` tensors on ``device``; ``mask`` is 1 on
real tokens.  torch is imported on the first call, so importing this module
stays cheap.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def _pad(seqs: Sequence[Sequence[int]], pad: int, device: Any, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        cols = slice(width - len(s), width) if left else slice(0, len(s))
        ids[r, cols] = torch.tensor(list(s), dtype=torch.long)
        mask[r, cols] = 1
    return ids.to(device), mask.to(device)


def pad_right(seqs: Sequence[Sequence[int]], pad: int, device: Any = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` with every row padded at the end to the longest row."""
    return _pad(seqs, pad, device, left=False)


def pad_left(seqs: Sequence[Sequence[int]], pad: int, device: Any = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` with every row padded at the start to the longest row."""
    return _pad(seqs, pad, device, left=True)


__all__ = ["pad_left", "pad_right"]
