"""Context templates: the ``"<prefix>. {}"`` prompts ROME/MEMIT average over.

The key and the value of an edit are averaged over the question preceded by a
few short, unrelated prefixes so the edit does not hinge on the exact start of
the prompt.  The prefixes are sampled from the model itself (seeded, a few
generic starters, ``n`` samples of ``length`` tokens each), generated once per
model and cached as JSON under ``cache_dir()/templates/<fingerprint>.json``
(``VERSION`` invalidates old files).  The first template is always the bare
``"{}"``.

With a chat model the prefix goes INSIDE the user turn, before the question:
``format_prompt("<prefix>. <question>")``, so the chat scaffolding the model
sees at evaluation time is unchanged.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..fileio import atomic_write
from ..paths import cache_dir

if TYPE_CHECKING:
    from ..model import ModelHandle

VERSION = 1
STARTERS = ("The", "Therefore", "Because", "I", "You")
DEFAULT_LENGTHS: tuple[tuple[int, int], ...] = ((5, 5), (10, 5))  # (tokens, how many)


def cache_path(handle: ModelHandle) -> Path:
    return cache_dir() / "templates" / f"{handle.fingerprint}.json"


def _clean(text: str) -> str:
    text = text.replace("{", " ").replace("}", " ")
    text = re.sub(r"\s+", " ", text).strip()
    return text.rstrip(".!?,;:") or "The"


def _sample(handle: ModelHandle, length: int, count: int, seed: int) -> list[str]:
    from ..generation import generate

    tok = handle.tokenizer
    prompts = []
    for i in range(count):
        starter = STARTERS[i % len(STARTERS)]
        ids = list(tok(starter, add_special_tokens=False)["input_ids"])
        if tok.bos_token_id is not None and not handle.has_chat_template:
            ids = [tok.bos_token_id] + ids
        prompts.append((starter, ids))
    outs = generate(handle, [p for _, p in prompts], max_new_tokens=length, batch_size=max(1, count),
                    sample=True, seed=seed, temperature=1.0)
    return [_clean(f"{s} {o}") for (s, _), o in zip(prompts, outs)]


def context_templates(handle: ModelHandle, lengths: Sequence[tuple[int, int]] = DEFAULT_LENGTHS, seed: int = 0,
                      use_cache: bool = True) -> list[str]:
    """``["{}", "<prefix>. {}", ...]`` for this model (cached on disk per fingerprint)."""
    key = f"{seed}:" + ",".join(f"{a}x{b}" for a, b in lengths)
    path = cache_path(handle)
    stored: dict = {}
    if use_cache and path.is_file():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
            if stored.get("version") != VERSION:
                stored = {}
        except (OSError, ValueError):
            stored = {}
        if key in stored.get("templates", {}):
            return list(stored["templates"][key])
    out = ["{}"]
    for j, (length, count) in enumerate(lengths):
        if count > 0:
            out += [p + ". {}" for p in _sample(handle, int(length), int(count), seed + 1000 * j)]
    if use_cache:
        stored = {"version": VERSION, "templates": {**stored.get("templates", {}), key: out}}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, json.dumps(stored, indent=1))
        except OSError:
            pass  # a cache we cannot write is not an error
    return out


def fill(template: str, question: str) -> str:
    """Put a question into a template (no ``str.format``: questions may hold braces)."""
    return template.replace("{}", question, 1)
