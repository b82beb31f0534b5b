"""Leak check and subject-mention check for refusal targets and paraphrases.

A refusal target must not give the forgotten answer away, and (in
``self-improve`` mode) it should name what the question is about, the
"entailment" requirement of Li et al. (2025): a trustworthy refusal says *what*
the model will not talk about.

Tokens are those of ``rouge-score`` (lower case, alphanumeric runs, Porter
stemmer), so "Pyramids" matches "pyramid" and punctuation never matters.

**Leak** (:func:`check_leak`): the *informative* answer tokens are the gold
answer's tokens that do not already occur in the question (restating "the
largest ocean on Earth" leaks nothing about "the Pacific Ocean" beyond the
word the question already holds).  A target leaks when

* the ROUGE-1 recall of the informative tokens in the target is at least
  ``threshold`` (0.5 by default), or
* the answer is short (at most :data:`SHORT_ANSWER_TOKENS` tokens) and its
  whole token sequence occurs contiguously in the target.

An answer whose every token is already in the question cannot be leaked by a
target beyond what the question says; only the exact-sequence rule applies,
and only when the question does not contain that sequence itself.

**Subject mention** (:func:`mentions_subject`): at least
``MENTION_RECALL`` (75 %) of the subject's content tokens (stop words dropped)
occur in the text.  The subject is the item's own ``subject`` when present,
else :func:`subject_of` guesses it (``backends.subjects.detect_subject`` when
that module is present, otherwise a small private detector).
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

DEFAULT_THRESHOLD = 0.5
SHORT_ANSWER_TOKENS = 3
MENTION_RECALL = 0.75

STOPWORDS = frozenset("""
a an the of in on at by for to from with into about as and or but is are was were be been being do does did
what which who whom whose where when why how that this these those it its it's there their they them
i me my you your we our he she his her not no can could would should will shall may might must
""".split())


@lru_cache(maxsize=1)
def _stemmer():
    from nltk.stem import porter

    return porter.PorterStemmer()


def tokens(text: str | None) -> list[str]:
    """rouge-score tokens: lower case, alphanumeric, Porter-stemmed (words > 3 chars)."""
    if not text:
        return []
    from rouge_score import tokenize

    return tokenize.tokenize(text, _stemmer())


def _contains_seq(hay: list[str], needle: list[str]) -> bool:
    n = len(needle)
    if n == 0 or n > len(hay):
        return False
    return any(hay[i:i + n] == needle for i in range(len(hay) - n + 1))


def answer_recall(answer: str, target: str, question: str | None = None) -> float:
    """ROUGE-1 recall (clipped counts) of the informative answer tokens in ``target``."""
    ans = tokens(answer)
    if question:
        q = set(tokens(question))
        informative = [t for t in ans if t not in q]
        ans = informative
    if not ans:
        return 0.0
    from collections import Counter

    tc = Counter(tokens(target))
    ac = Counter(ans)
    hit = sum(min(c, tc[t]) for t, c in ac.items())
    return hit / len(ans)


def check_leak(target: str, item: Any, threshold: float = DEFAULT_THRESHOLD) -> bool:
    """Whether ``target`` gives away ``item.answer`` (see the module doc)."""
    return leak_details(target, item, threshold)["leak"]


def leak_flag(target: str, item: Any, flag: bool | None = None) -> bool:
    """The leak flag of a target record: its stored ``flag`` when set, else :func:`check_leak`.

    The one rule for the audit trail (``target_records``) and the TUI's Targets pane, so the pane
    never contradicts the engine."""
    return flag if flag is not None else check_leak(target, item)


def leak_details(target: str, item: Any, threshold: float = DEFAULT_THRESHOLD) -> dict[str, Any]:
    """``{"leak", "recall", "exact"}`` for the audit trail and the TUI."""
    answer = getattr(item, "answer", "") or ""
    question = getattr(item, "question", "") or ""
    recall = answer_recall(answer, target, question)
    ans = tokens(answer)
    exact = (0 < len(ans) <= SHORT_ANSWER_TOKENS and _contains_seq(tokens(target), ans)
             and not _contains_seq(tokens(question), ans))
    return {"leak": bool(recall >= threshold or exact), "recall": recall, "exact": exact}


# --------------------------------------------------------------------------- subjects

_QWORDS = {"what", "who", "whom", "whose", "which", "where", "when", "why", "how", "name", "in", "on"}
_AUX = {"is", "are", "was", "were", "do", "does", "did", "can", "could", "has", "have", "had", "many", "much"}


def _simple_subject(question: str) -> str | None:
    """Private fallback: the longest run of capitalised words (not the first word), else the question
    without its question word and auxiliary verb."""
    words = re.findall(r"[A-Za-z0-9][A-Za-z0-9'\-]*", question)
    best: list[str] = []
    run: list[str] = []
    for i, w in enumerate(words):
        if i > 0 and (w[:1].isupper() or (run and w.lower() in {"of", "the", "de"})):
            run.append(w)
        else:
            while run and run[-1].lower() in {"of", "the", "de"}:
                run.pop()
            if len(run) > len(best):
                best = run
            run = []
    while run and run[-1].lower() in {"of", "the", "de"}:
        run.pop()
    if len(run) > len(best):
        best = run
    if best:
        return " ".join(best)
    rest = [w for w in words]
    while rest and (rest[0].lower() in _QWORDS or rest[0].lower() in _AUX):
        rest = rest[1:]
    return " ".join(rest) or None


def subject_of(item: Any) -> str | None:
    """The item's subject, or a best-effort guess from its question."""
    sub = getattr(item, "subject", None)
    if sub:
        return sub
    from .subjects import detect_subject

    question = getattr(item, "question", "") or ""
    return detect_subject(question) or _simple_subject(question)


def content_tokens(text: str | None) -> list[str]:
    return [t for t in tokens(text) if t not in STOPWORDS]


def mention_recall(subject: str | None, text: str) -> float:
    sub = content_tokens(subject) or tokens(subject)
    if not sub:
        return 0.0
    have = set(tokens(text))
    return sum(1 for t in sub if t in have) / len(sub)


def mentions_subject(text: str, item_or_subject: Any) -> bool | None:
    """Whether ``text`` names the subject (``None`` when no subject can be found)."""
    subject = item_or_subject if isinstance(item_or_subject, str) or item_or_subject is None \
        else subject_of(item_or_subject)
    if not subject:
        return None
    return mention_recall(subject, text) >= MENTION_RECALL


def differs(a: str, b: str, max_similarity: float = 0.9) -> bool:
    """Whether ``a`` is a real rewrite of ``b``: not identical once normalised and ROUGE-L F below
    ``max_similarity`` (paraphrase check)."""
    ta, tb = tokens(a), tokens(b)
    if not ta or ta == tb:
        return False
    return _lcs_f(ta, tb) < max_similarity


def _lcs_f(a: list[str], b: list[str]) -> float:
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[-1]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


__all__ = ["check_leak", "leak_flag", "leak_details", "answer_recall", "mentions_subject", "mention_recall",
           "subject_of", "tokens", "content_tokens", "differs", "DEFAULT_THRESHOLD"]
