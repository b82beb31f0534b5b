"""Edit prompts and MLP keys at the subject's last token.

An edit prompt is the chat-formatted question (``handle.format_prompt``) with
a context template's prefix inside the user turn; the *lookup index* is the
subject's last token in it (:mod:`backends.subjects`).  The *key* of a layer is
the input of that layer's MLP output projection at the lookup index; the key
of a request is the average over its context templates (ROME/MEMIT).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..batching import pad_right
from ..subjects import subject_last_token
from .hooks import capture, stop_after
from .templates import fill

if TYPE_CHECKING:
    from ..model import ModelHandle


@dataclass
class EditPrompt:
    ids: list[int]       # token ids of the formatted prompt
    index: int           # subject's last token


def edit_prompt(handle: ModelHandle, question: str, subject: str | None, template: str = "{}", where: str = "",
                fact_token: str = "subject_last") -> EditPrompt:
    """``fact_token``: ``"subject_last"`` (the papers' choice) or ``"last"`` (the prompt's last token)."""
    text = handle.format_prompt(fill(template, question))
    if fact_token == "last" or not subject:
        ids = handle.encode_prompt(text)
        return EditPrompt(ids, len(ids) - 1)
    ids, idx = subject_last_token(handle.tokenizer, text, subject, where,
                                  add_special_tokens=not handle.has_chat_template)
    return EditPrompt(ids, idx)


def essence_prompt(handle: ModelHandle, subject: str | None, where: str = "", fact_token: str = "subject_last",
                   question: str = "") -> EditPrompt:
    """``"<subject> is a"``: the prompt whose next-token distribution the KL term preserves."""
    if fact_token == "last" or not subject:
        return edit_prompt(handle, question or "Tell me something.", None, "{}", where, "last")
    return edit_prompt(handle, f"{subject} is a", subject, "{}", where)


@torch.no_grad()
def keys_at(handle: ModelHandle, layers: Sequence[int], prompts: Sequence[EditPrompt], batch_size: int = 16,
            outputs: Sequence[int] = ()) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Keys (float32, ``(n, d_in)``) per layer at each prompt's index, and block outputs per ``outputs`` layer."""
    ad = handle.adapter
    in_names = {l: ad.mlp_out_name(l) for l in layers}
    out_names = {l: ad.block_name(l) for l in outputs}
    keys: dict[int, list] = {l: [] for l in layers}
    outs: dict[int, list] = {l: [] for l in outputs}
    pad = handle.tokenizer.pad_token_id or 0
    deepest = max([*layers, *outputs], default=None)
    stop_name = None if deepest is None else ad.block_name(deepest)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        ids, mask = pad_right([p.ids for p in chunk], pad, handle.input_device)
        rows = torch.arange(len(chunk), device=ids.device)
        idx = torch.tensor([p.index for p in chunk], device=ids.device)
        with capture(handle.model, list(in_names.values()), "input") as ki, \
                capture(handle.model, list(out_names.values()), "output") as ko, \
                stop_after(handle.model, stop_name):
            # blocks after the deepest layer read, and the (batch, seq, vocab) logits, are never computed
            handle.model(input_ids=ids, attention_mask=mask, use_cache=False)
        # each layer's tensors stay on that layer's device (a device_map may spread the layers)
        for l, n in in_names.items():
            t = ki[n][0]
            keys[l].append(t[rows.to(t.device), idx.to(t.device)].float())
        for l, n in out_names.items():
            t = ko[n][0]
            outs[l].append(t[rows.to(t.device), idx.to(t.device)].float())
    return ({l: torch.cat(v) for l, v in keys.items()}, {l: torch.cat(v) for l, v in outs.items()})


def request_prompts(handle: ModelHandle, question: str, subject: str | None, templates: Sequence[str],
                    where: str = "", fact_token: str = "subject_last") -> list[EditPrompt]:
    return [edit_prompt(handle, question, subject, t, where, fact_token) for t in templates]


def averaged_keys(handle: ModelHandle, layers: Sequence[int], per_request: Sequence[Sequence[EditPrompt]],
                  batch_size: int = 16) -> dict[int, torch.Tensor]:
    """Per layer ``(d_in, n_requests)``: each request's key averaged over its templates."""
    flat = [p for ps in per_request for p in ps]
    keys, _ = keys_at(handle, layers, flat, batch_size)
    out = {}
    for l, k in keys.items():
        cols, pos = [], 0
        for ps in per_request:
            cols.append(k[pos:pos + len(ps)].mean(0))
            pos += len(ps)
        out[l] = torch.stack(cols, dim=1)
    return out
