"""Subjects: detect what a question is about, and find it in a tokenized prompt.

Locate-and-edit methods (ROME, MEMIT, AlphaEdit) read the MLP key at the
LAST token of the subject inside the prompt the model sees.

* :func:`detect_subject` guesses the subject of a question with no model and
  no NLP dependency: the longest run of capitalised words that is not just the
  question word at the start (``"Who painted the Mona Lisa?"`` -> ``"Mona
  Lisa"``; ``"United States of America"`` keeps its ``of``), otherwise the noun
  phrase after the last preposition (``"How many legs does a spider have?"``
  -> ``"a spider"``), otherwise the phrase after the verb of the question.
  An item's own ``subject`` always wins, and a session can override it
  (``[data.subjects]``).
* :func:`subject_last_token` maps the subject to a token index by character
  offsets (fast tokenizers' ``offset_mapping``): the LAST occurrence of the
  subject in the prompt text (the chat template's system turn comes first and
  for a merged prompt the last question's subject is the one nearest the end),
  matched exactly first and case-insensitively as a fallback.  A subject that
  does not occur raises :class:`UserError` naming the item.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from .errors import UserError

QUESTION_WORDS = {"what", "who", "whom", "whose", "which", "where", "when", "why", "how", "is", "are", "was",
                  "were", "do", "does", "did", "can", "could", "in", "on", "at", "name", "tell", "give", "list",
                  "according", "the", "a", "an", "i", "describe", "explain"}
CONNECTORS = {"of", "the", "de", "von", "van", "and", "da", "del", "la", "le", "du", "&"}
PREPOSITIONS = {"of", "in", "on", "at", "by", "for", "about", "from", "to", "with", "into", "does", "did",
                "do", "is", "was", "are", "were", "has", "have"}
STOP_TAIL = {"have", "has", "had", "do", "does", "did", "be", "is", "are", "was", "were", "called", "named",
             "known", "located", "found", "made", "use", "used", "live", "born", "die", "mean", "contain",
             "produce", "weigh", "measure", "take", "last", "orbit", "travel", "play", "belong", "come",
             "speak", "spoken", "write", "written", "wrote", "invent", "invented", "discover", "discovered"}
_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9'’\-\.]*")


def _words(text: str) -> list[tuple[str, int, int]]:
    out = []
    for m in _WORD.finditer(text):
        w = m.group(0).rstrip(".")
        if w:
            out.append((w, m.start(), m.start() + len(w)))
    return out


def _capitalised(w: str) -> bool:
    return w[:1].isupper() or (w[:1].isdigit() and len(w) >= 3)


def detect_subject(question: str) -> str | None:
    """Best-effort subject of a question (see the module doc); ``None`` when nothing fits."""
    text = question.strip()
    # keep the last question of a merged prompt
    parts = [p for p in re.split(r"(?<=[?.!])\s+", text) if p.strip()]
    if parts:
        text = parts[-1]
    words = _words(text)
    if not words:
        return None
    # 1. named entity: longest run of capitalised words (connectors allowed inside)
    best: tuple[int, int] | None = None
    i = 0
    while i < len(words):
        w = words[i][0]
        if _capitalised(w) and not (i == 0 and w.lower() in QUESTION_WORDS):
            j = i
            while j + 1 < len(words):
                nxt = words[j + 1][0]
                if _capitalised(nxt):
                    j += 1
                elif nxt.lower() in CONNECTORS and j + 2 < len(words) and _capitalised(words[j + 2][0]):
                    j += 2
                else:
                    break
            span = (i, j)
            if best is None or (span[1] - span[0]) >= (best[1] - best[0]):
                best = span
            i = j + 1
        else:
            i += 1
    if best is not None:
        return text[words[best[0]][1]:words[best[1]][2]]
    # 2. the noun phrase after the last preposition / auxiliary
    lowered = [w.lower() for w, _, _ in words]
    for k in range(len(words) - 2, -1, -1):
        if lowered[k] in PREPOSITIONS:
            tail = list(range(k + 1, len(words)))
            while tail and lowered[tail[-1]] in STOP_TAIL:
                tail.pop()
            if tail and not all(lowered[t] in {"the", "a", "an"} for t in tail):
                return text[words[tail[0]][1]:words[tail[-1]][2]]
    # 3. everything after the question word(s), minus a trailing verb
    tail = [t for t in range(len(words)) if lowered[t] not in QUESTION_WORDS]
    while tail and lowered[tail[-1]] in STOP_TAIL:
        tail.pop()
    if tail:
        return text[words[tail[0]][1]:words[tail[-1]][2]]
    return None


def resolve_subject(request: Any) -> str:
    """The request's subject, detected from its (last) question when absent."""
    subject = getattr(request, "subject", None)
    if subject and subject.strip():
        return subject.strip()
    questions = getattr(request, "questions", None) or [request.prompt]
    found = detect_subject(questions[-1])
    if not found:
        ids = ", ".join(getattr(request, "item_ids", []) or ["?"])
        raise UserError(f'could not detect a subject in "{questions[-1]}"; give it with [data.subjects] '
                        f'(item id = "subject")', f"item {ids}")
    return found


def find_last(text: str, subject: str) -> tuple[int, int] | None:
    """Character span of the last occurrence (exact, then case-insensitive)."""
    pos = text.rfind(subject)
    if pos < 0:
        pos = text.lower().rfind(subject.lower())
    if pos < 0:
        return None
    return pos, pos + len(subject)


def token_at_char_end(offsets: Sequence[tuple[int, int]], end: int) -> int:
    """Index of the last token that starts before character ``end`` and is not empty."""
    idx = None
    for i, (s, e) in enumerate(offsets):
        if e > s and s < end:
            idx = i
    if idx is None:
        raise ValueError("no token before the given character position")
    return idx


def subject_last_token(tokenizer: Any, text: str, subject: str, where: str = "",
                       add_special_tokens: bool = False) -> tuple[list[int], int]:
    """(token ids of ``text``, index of the subject's last token in them)."""
    span = find_last(text, subject)
    if span is None:
        raise UserError(f'the subject "{subject}" does not occur in the prompt "{text.strip()[-200:]}"; '
                        f'fix it in [data.subjects]', where or None)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=add_special_tokens)
        ids = list(enc["input_ids"])
        return ids, token_at_char_end(enc["offset_mapping"], span[1])
    # slow tokenizers: tokenize the prefix that ends with the subject
    ids = list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
    prefix = list(tokenizer(text[:span[1]], add_special_tokens=add_special_tokens)["input_ids"])
    return ids, max(0, min(len(prefix), len(ids)) - 1)
