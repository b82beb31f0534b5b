"""Refusal targets and edit requests (query merging).

A *target* is the text a forgotten question should now produce.  This module
builds the per-item targets for a session (``idk``: a refusal drawn
deterministically from a pool; ``dummy``; ``custom``/hand-edited items kept in
the session) and turns forget items plus targets into edit :class:`Request`\\ s.

Query merging (Li et al., 2025): with ``merge_factor = m`` consecutive forget
questions are concatenated into ONE prompt that maps to ONE target, so ``n``
items become ``ceil(n/m)`` edits.  Exact format: the questions of a group,
each stripped, joined with a single space, in forget-set order::

    "What is the capital of France? Who wrote Hamlet?"

A request keeps every member: its question, its own subject and its own
target (``questions``, ``subjects``, ``targets``).  The locate-and-edit
methods use them (one value optimised for the whole group, every question's
own subject keyed: see :mod:`backends.editing.locate`); the other methods
edit the merged prompt.

The **group target** (``target``, what the merged prompt maps to) is chosen
explicitly, by :func:`group_target`: the members' target when they all have
the same one; otherwise the first member target that names none of the
group's subjects (a pool refusal never does); otherwise (every member's
target is tailored to its own subject, as self-improved ones are) a refusal
from the built-in pool, picked by the group's item ids — so a group target
never names one member's subject for the others.  ``subject`` is the last
question's subject (the merged prompt's key, read at the last occurrence).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import UserError

# the vocabularies are the experiment description's (one statement of each); re-exported here
from .spec import DEFAULT_DUMMY, GENERATED_SOURCES, TARGET_MODES, TARGET_SOURCES

__all__ = ["TARGET_MODES", "TARGET_SOURCES", "GENERATED_SOURCES", "DEFAULT_DUMMY", "Target", "Request",
           "pick_from_pool", "load_pool", "simple_targets", "build_requests", "group_target"]


@dataclass
class Target:
    item_id: str
    text: str
    source: str              # one of spec.TARGET_SOURCES
    leak: bool | None = None
    mentions_subject: bool | None = None


@dataclass
class Request:
    """One edit: a (possibly merged) question mapped to one target."""

    prompt: str                      # the user question text (merged questions joined by a space)
    target: str
    subject: str | None
    item_ids: list[str] = field(default_factory=list)
    questions: list[str] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)   # gold answers (for fine-tuning baselines)
    subjects: list[str | None] = field(default_factory=list)   # each member question's own subject
    targets: list[str] = field(default_factory=list)           # each member's own target
    target_rule: str = "single"      # how ``target`` was chosen (see group_target)


def pick_from_pool(pool: Sequence[str], seed: int, key: str) -> str:
    """A deterministic choice that depends only on (seed, key), not on order."""
    if not pool:
        raise UserError("the refusal pool is empty; expected at least one sentence", "targets.pool")
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return pool[int.from_bytes(digest[:8], "big") % len(pool)]


def load_pool(path: str | None, session: Any = None) -> list[str]:
    from . import data

    if not path:
        return data.builtin_refusals()
    p = session.resolve(path) if session is not None and not path.startswith("builtin:") else path
    return data.load_lines(p)


def simple_targets(mode: str, items: Sequence[Any], pool: Sequence[str], seed: int = 0,
                   dummy: str = DEFAULT_DUMMY, overrides: dict[str, Any] | None = None) -> dict[str, Target]:
    """Targets that need no model: ``idk``, ``dummy``, ``incorrect`` from perturbed answers, and overrides.

    ``overrides`` maps item id to an object with ``target``/``source`` (the
    session's ``[[targets.items]]``); they always win, so hand edits survive.
    Modes that need the model (self-improve, avoidant, generated incorrect)
    are filled by the caller for the items left out here.
    """
    if mode not in TARGET_MODES:
        raise UserError(f'unknown target mode "{mode}"; expected one of {", ".join(TARGET_MODES)}',
                        "targets.mode")
    overrides = overrides or {}
    out: dict[str, Target] = {}
    for it in items:
        o = overrides.get(it.id)
        if o is not None:
            out[it.id] = Target(it.id, o.target, o.source, getattr(o, "leak", None),
                                getattr(o, "mentions_subject", None))
        elif mode == "idk":
            out[it.id] = Target(it.id, pick_from_pool(pool, seed, it.id), "pool")
        elif mode == "dummy":
            out[it.id] = Target(it.id, dummy, "dummy")
        elif mode == "incorrect" and getattr(it, "perturbed_answers", None):
            wrong = it.perturbed_answers[int(hashlib.sha256(f"{seed}:{it.id}".encode()).hexdigest(), 16)
                                         % len(it.perturbed_answers)]
            out[it.id] = Target(it.id, wrong, "perturbed")
        elif mode == "custom":
            raise UserError(f'item "{it.id}" has no custom target; add a [[targets.items]] entry with '
                            f'id = "{it.id}" and target = "..."', "targets.items")
    return out


def _names(text: str, subject: str | None) -> bool:
    return bool(subject) and subject.strip().lower() in text.lower()


def group_target(ids: Sequence[str], texts: Sequence[str], subjects: Sequence[str | None],
                 pool: Sequence[str] | None = None, seed: int = 0) -> tuple[str, str]:
    """(the merged prompt's target, the rule that chose it); see the module doc."""
    if len(set(texts)) == 1:
        return texts[0], "single" if len(texts) == 1 else "shared"
    for text in texts:
        if not any(_names(text, s) for s in subjects):
            return text, "names no member"
    if pool is None:
        from . import data

        pool = data.builtin_refusals()
    generic = [t for t in pool if not any(_names(t, s) for s in subjects)] or list(pool)
    return pick_from_pool(generic, seed, "+".join(ids)), "pool"


def build_requests(items: Sequence[Any], targets: dict[str, Target], merge_factor: int = 1,
                   subjects: dict[str, str] | None = None, pool: Sequence[str] | None = None,
                   seed: int = 0) -> list[Request]:
    """Group forget items into edit requests (see the module doc for the format and the group target)."""
    if merge_factor < 1:
        raise UserError(f"merge_factor must be >= 1, got {merge_factor}", "targets.merge_factor")
    subjects = subjects or {}
    reqs = []
    for start in range(0, len(items), merge_factor):
        group = items[start:start + merge_factor]
        missing = [it.id for it in group if it.id not in targets]
        if missing:
            raise UserError(f"no target for item(s) {', '.join(missing)}", "targets")
        subs = [subjects.get(it.id) or getattr(it, "subject", None) for it in group]
        texts = [targets[it.id].text for it in group]
        ids = [it.id for it in group]
        target, rule = group_target(ids, texts, subs, pool, seed)
        reqs.append(Request(prompt=" ".join(it.question.strip() for it in group),
                            target=target, subject=subs[-1],
                            item_ids=ids, questions=[it.question for it in group],
                            answers=[it.answer for it in group], subjects=subs, targets=texts, target_rule=rule))
    return reqs
