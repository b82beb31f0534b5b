"""Subjects: detect what a question is about, and find it in a tokenized prompt.

Locate-and-edit methods (ROME, MEMIT, AlphaEdit) read the MLP key at the
LAST token of the subject inside the prompt the model sees.

* :func:`detect_subject` guesses the subject of a question with no model and
  no NLP dependency.  It looks at the last sentence (the last question of a
  merged prompt; a ``.`` after an initial or abbreviation such as ``J.`` or
  ``U.S.`` ends none, nor does one inside quotes); when that sentence only says
  "Which category is it?" (a pronoun), the statements before it are read too.
  In it, in order: the first quoted title, in full and without its quotes
  (``"Which author wrote the dystopian novel 'Brave New World'?"`` -> ``"Brave
  New World"``; apostrophes inside words, as in ``'Midnight's Children'``, are
  not quotes); else the longest run of capitalised words that is not a
  question word opening the sentence (``"Who painted the Mona Lisa?"`` ->
  ``"Mona Lisa"``; ``"United States of America"`` keeps its ``of``; a run stops
  at punctuation, so ``"Stockholm, Sweden"`` is two; a date such as ``"April
  1912"`` only when nothing else is capitalised; a trailing possessive ``'s`` is
  dropped); otherwise the noun phrase after the last preposition (``"How many
  legs does a spider have?"`` -> ``"a spider"``), otherwise the phrase after the
  verb of the question, without a leading or trailing verb (``"Who invented the
  telephone?"`` -> ``"telephone"``).  An item's own ``subject`` always wins,
  and a session can override it (``[data.subjects]``).
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
# words a lower-case subject does not start with ("its fjords" -> "fjords", "not a capital" -> "a capital")
STOP_HEAD = {"its", "their", "his", "her", "our", "my", "your", "not"}
PRONOUNS = {"it", "this", "that", "these", "those", "they", "them", "he", "she", "him", "her", "one"}
# a capitalised run made only of these (and numbers) is a date, the weakest kind of subject
_WEAK = {"january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
         "november", "december", "monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"}
_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "mt", "vs", "no", "jr", "sr", "prof", "gen", "col", "lt"}
# a word: letters/digits (any script) with inner apostrophes, hyphens and dots ("O'Neill", "U.S", "Prize-winning")
_WORD = re.compile(r"[^\W_](?:[\w'’\-.]*[^\W_])?\.?")
_OPEN_QUOTES = {"'": "'’", "‘": "’'", '"': '"”', "“": '”"'}


def _is_abbreviation(word: str) -> bool:
    """``J.``, ``U.S.``, ``Dr.``: a dot after it does not end a sentence."""
    w = word.rstrip(".")
    return len(w) == 1 or "." in w or w.lower() in _ABBREVIATIONS


def quoted_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the quoted titles in ``text`` (inside the quotes), in order.

    An opening quote (``'``, ``"``, curly ones) starts the text or follows a space or an opening
    bracket/dash/comma and is followed by a non-space; its closing quote is preceded by a
    non-space and followed by the end, a space or punctuation.  Apostrophes inside words
    (``Midnight's Children``, ``O'Neill``) are therefore neither.
    """
    out = []
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        closers = _OPEN_QUOTES.get(ch)
        if closers and (i == 0 or text[i - 1].isspace() or text[i - 1] in "([{,;:—–-") \
                and i + 1 < n and not text[i + 1].isspace():
            j = i + 1
            found = None
            while j < n:
                if text[j] in closers and not text[j - 1].isspace() and \
                        (j + 1 == n or text[j + 1].isspace() or text[j + 1] in "?.!,;:)]}—–-"):
                    found = j
                    break
                j += 1
            if found is not None and sum(c.isalnum() for c in text[i + 1:found]) >= 2:   # not rock 'n' roll
                out.append((i + 1, found))
                i = found + 1
                continue
        i += 1
    return out


def _sentences(text: str) -> list[tuple[int, int]]:
    """Spans of the sentences of ``text``: they end at ``?``/``!``, or at a ``.`` that does not follow
    an initial or abbreviation (``J. Alfred``, ``U.S. state``), and never inside quotes."""
    quotes = quoted_spans(text)
    spans, start = [], 0
    for m in re.finditer(r"[.?!]+(?=\s+\S)", text):
        pos = m.start()
        if any(a <= pos < b for a, b in quotes):
            continue
        if m.group(0) == ".":
            before = re.search(r"(\S+)$", text[start:pos + 1])
            if before and _is_abbreviation(before.group(1)):
                continue
        spans.append((start, m.end()))
        start = m.end()
        while start < len(text) and text[start].isspace():
            start += 1
    spans.append((start, len(text)))
    return [(a, b) for a, b in spans if text[a:b].strip()]


def _words(text: str) -> list[tuple[str, int, int]]:
    out = []
    for m in _WORD.finditer(text):
        w = m.group(0)
        core = w.rstrip(".")
        keep_dot = w.endswith(".") and "." in core     # "U.S." keeps its dot, "Paris." does not
        w = w if keep_dot else core
        if w:
            out.append((w, m.start(), m.start() + len(w)))
    return out


def _capitalised(w: str) -> bool:
    return w[:1].isupper() or (w[:1].isdigit() and len(w) >= 3) or (w[:1].isalpha() and w[1:] != w[1:].lower())


def _joined(text: str, a: tuple[str, int, int], b: tuple[str, int, int]) -> bool:
    """Whether words ``a`` and ``b`` are adjacent in ``text`` (only spaces, or an initial's dot, between)."""
    gap = text[a[2]:b[1]]
    return not gap.strip() or (gap.strip() == "." and _is_abbreviation(a[0]))


def _strong(words: Sequence[tuple[str, int, int]]) -> bool:
    return any(not (w.lower() in _WEAK or w.replace(",", "").isdigit()) for w, _, _ in words)


def _named_entity(text: str, initial: set[int]) -> str | None:
    """The longest run of capitalised words (connectors allowed inside; the later one on ties; a date
    only when nothing else), or ``None``.  ``initial``: start offsets of sentence-initial words."""
    words = _words(text)
    best: tuple[int, int] | None = None
    best_key = (-1, -1)
    i = 0
    while i < len(words):
        w = words[i][0]
        if _capitalised(w) and not (words[i][1] in initial and w.lower() in QUESTION_WORDS):
            j = i
            while j + 1 < len(words):
                nxt = words[j + 1][0]
                if not _joined(text, words[j], words[j + 1]) or words[j + 1][1] in initial:
                    break
                if _capitalised(nxt):
                    j += 1
                elif nxt.lower() in CONNECTORS and j + 2 < len(words) and _capitalised(words[j + 2][0]) \
                        and _joined(text, words[j + 1], words[j + 2]):
                    j += 2
                else:
                    break
            key = (int(_strong(words[i:j + 1])), j - i)
            if key >= best_key:
                best, best_key = (i, j), key
            i = j + 1
        else:
            i += 1
    if best is None:
        return None
    found = text[words[best[0]][1]:words[best[1]][2]]
    # "the Earth's oceans": the entity is the possessor
    return found[:-2] if len(found) > 2 and found[-2:] in ("'s", "’s") else found


def _phrase(text: str) -> str | None:
    """A lower-case question's subject: the noun phrase after the last preposition / auxiliary,
    otherwise everything after the question word(s); without a leading or trailing verb."""
    words = _words(text)
    lowered = [w.lower() for w, _, _ in words]

    def trimmed(tail: list[int]) -> list[int]:
        while tail and lowered[tail[-1]] in STOP_TAIL:
            tail.pop()
        while len(tail) > 1 and (lowered[tail[0]] in STOP_TAIL or lowered[tail[0]] in STOP_HEAD):
            tail.pop(0)
        return tail

    for k in range(len(words) - 2, -1, -1):
        if lowered[k] in PREPOSITIONS:
            tail = trimmed(list(range(k + 1, len(words))))
            if tail and not all(lowered[t] in {"the", "a", "an"} for t in tail):
                return text[words[tail[0]][1]:words[tail[-1]][2]]
    tail = trimmed([t for t in range(len(words)) if lowered[t] not in QUESTION_WORDS])
    if tail:
        return text[words[tail[0]][1]:words[tail[-1]][2]]
    return None


def _detect_in(text: str, initial: set[int]) -> str | None:
    quotes = quoted_spans(text)
    for a, b in quotes:
        title = text[a:b].strip().rstrip(".,;:").strip()
        if title:
            return title
    return _named_entity(text, initial) or _phrase(text)


def detect_subject(question: str) -> str | None:
    """Best-effort subject of a question (see the module doc); ``None`` when nothing fits."""
    text = question.strip()
    spans = _sentences(text)
    if not spans:
        return None
    # the last sentence (the last question of a merged prompt) ...
    a, b = spans[-1]
    found = _detect_in(text[a:b], {0})
    # ... unless it only says "Which category is it?": then the statements before it (back to the
    # previous question) say what "it" is
    if found is None or found.lower() in PRONOUNS:
        k = len(spans) - 1
        while k > 0 and not text[spans[k - 1][0]:spans[k - 1][1]].rstrip().endswith("?"):
            k -= 1
        if k < len(spans) - 1:
            a = spans[k][0]
            initial = {s - a for s, _ in spans[k:]}
            wider = _detect_in(text[a:b], initial)
            if wider and wider.lower() not in PRONOUNS:
                return wider
    return found


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
