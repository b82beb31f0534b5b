"""Perturbed (wrong) answers for data that has none, drawn from the same data set.

TOFU ships three perturbed answers per question, and its truth ratio, the
forget-quality KS test, model utility and the multiple-choice attack all need
them.  PISTOL ships none; its 20 question–answer pairs per contract (``edge``)
follow the same 20 question templates with different entities, so the answer
to the same template about *another* contract is a wrong answer of exactly the
right kind (a date for a date, an amount for an amount).

:func:`question_template` masks a question's entities (capitalised words after
the first, numbers, quoted spans) so "What was the effective date of the
contract between Wnzatj SAS and Jzrcws SA?" and the same question about two
other companies share one template; :func:`derive` gives every item without
perturbed answers up to ``n`` answers of other items with its template that
differ from its own (case- and punctuation-insensitively), chosen by a seeded
shuffle.  Items whose template no other item shares keep none.  Items that
have perturbed answers are returned unchanged.  Torch-free.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

_QUOTED = re.compile(r"(['\"‘’“”]).+?\1")
_NUMBER = re.compile(r"\d[\d,.:/-]*")
_WORD = re.compile(r"[A-Za-z][\w'&.-]*")


def question_template(question: str) -> str:
    """The question with entities masked: quoted spans, numbers and capitalised words after the first."""
    q = _QUOTED.sub(" Q ", question.strip())
    q = _NUMBER.sub(" N ", q)
    words = []
    for i, m in enumerate(_WORD.finditer(q)):
        w = m.group(0)
        words.append("E" if i > 0 and w[0].isupper() and w not in ("Q", "N") else w.lower())
    out: list[str] = []
    for w in words:   # a run of masked words is one entity
        if w == "E" and out and out[-1] == "E":
            continue
        out.append(w)
    return " ".join(out)


def _norm(answer: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", answer.lower()).split())


def derive(items: Sequence[Any], pool: Sequence[Any] | None = None, n: int = 3, seed: int = 0) -> list[Any]:
    """``items`` with up to ``n`` perturbed answers each from ``pool`` (default: ``items``) where they had none.

    The answers come from other pool items with the same :func:`question_template`,
    distinct from the item's own answer and from each other.  Derived items carry
    ``extra["perturbed_source"] = "derived"`` so results can say so.
    """
    pool = list(items if pool is None else pool)
    by_template: dict[str, list[Any]] = {}
    for it in pool:
        by_template.setdefault(question_template(it.question), []).append(it)
    out = []
    for it in items:
        if getattr(it, "perturbed_answers", None):
            out.append(it)
            continue
        own = _norm(it.answer)
        candidates = [o for o in by_template.get(question_template(it.question), []) if o.id != it.id]
        random.Random(f"{seed}:{it.id}").shuffle(candidates)
        chosen: list[str] = []
        seen = {own}
        for o in candidates:
            k = _norm(o.answer)
            if k and k not in seen:
                seen.add(k)
                chosen.append(o.answer)
            if len(chosen) >= n:
                break
        if chosen:
            out.append(replace(it, perturbed_answers=chosen, extra={**it.extra, "perturbed_source": "derived"}))
        else:
            out.append(it)
    return out


def count_derived(items: Sequence[Any]) -> int:
    return sum(1 for it in items if getattr(it, "extra", {}).get("perturbed_source") == "derived")


__all__ = ["question_template", "derive", "count_derived"]
