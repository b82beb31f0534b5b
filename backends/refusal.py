"""Refusal quality of a generation: similarity to its target, refused, fluency.

The point (Li et al., 2025; Hossain & Kagal, 2025): once a fact is forgotten,
the model should answer with a trustworthy refusal, not random tokens and not a
misleading answer.  :func:`quality` scores one generation; the metrics module
calls it for every forget and rephrase item and the per-split means appear next
to ROUGE-1.

* ``target_similarity`` — ROUGE-L F-measure of the generation against the
  item's target (rouge-score, Porter stemmer on); ``None`` target -> omitted.
* ``refused`` — 1.0 when :func:`is_refusal` detects a refusal, else 0.0.
* ``fluency`` — n-gram entropy of the generation, in [0, 1] (see
  :func:`fluency`): repetition loops ("Paris Paris Paris ...") and symbol soup
  score low, ordinary sentences close to 1.

Torch-free; cheap enough to run on every item.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from functools import lru_cache

# --------------------------------------------------------------------------- refusal detector
#
# A refusal is recognised by what it says in its opening (the first two
# sentences): a first-person statement of not knowing / not being able / not
# being willing, or an apology followed by such a statement.  Patterns are
# matched on lower-cased text with curly quotes straightened.  Each pattern is
# anchored on the speaker ("i", "my", "me") or on a fixed refusal phrase so
# that "I can't stress enough how lovely Paris is" is not a refusal while
# "I can't help with that" is.

_NEG_AUX = r"(?:can ?not|can't|cannot|couldn't|could not|won't|will not|am not able to|'m not able to|" \
           r"am unable to|'m unable to|am not in a position to|'m not in a position to|" \
           r"don't|do not|didn't|did not|am not going to|'m not going to|would rather not|'d rather not)"
_REFUSE_VERBS = r"(?:know|answer|help|say|tell|share|provide|give|recall|remember|assist|comment|speak|" \
                r"discuss|confirm|disclose|reveal|offer|shed|talk|go into|get into|guess|answer|respond|" \
                r"find|access|be sure|be certain)"

_PATTERNS = [
    rf"\bi {_NEG_AUX} (?:really |actually |honestly |currently |reliably |possibly |quite )?{_REFUSE_VERBS}\b",
    r"\bi(?:'m| am) (?:not |un)?(?:sure|certain|aware|familiar|informed|equipped|acquainted|briefed|"
    r"knowledgeable|qualified|well-versed|clueless)\b",
    r"\bi(?:'m| am) (?:unable|not able|not in a position|afraid i|at a loss|drawing a blank|uncertain|unaware)\b",
    r"\bi (?:do not|don't|dont) (?:have|hold|possess) (?:any |the |that |this |enough |reliable |specific |"
    r"much |an? )?(?:information|info|knowledge|answer|details?|data|idea|clue|insight|specifics|facts?|"
    r"way|answers)\b",
    r"\bi (?:have|possess|hold) no (?:\w+ )?(?:information|knowledge|answer|details?|data|idea|clue|insight|"
    r"way|access|record)\b",
    r"\bi lack\b",
    r"\bi (?:haven't|have not|never) (?:learned|been (?:briefed|trained|told|informed)|heard|come across|"
    r"encountered|studied)\b",
    r"\b(?:i|we) (?:must |have to )?(?:decline|refrain|abstain)\b",
    r"\bi(?:'d| would) be guessing\b",
    r"\bno idea\b",
    r"\b(?:beyond|outside|out of|not within) (?:my|the scope of my) (?:\w+ )?(?:knowledge|expertise|scope|"
    r"area|understanding|capabilities|abilities|training|reach|information)\b",
    r"\b(?:outside|beyond) what i (?:know|can)\b",
    r"\bmy (?:knowledge|training|information|data|databases?|resources|understanding|records?|memory)"
    r"(?: base)? (?:doesn't|does not|don't|do not|didn't|did not|is not|isn't|are not|aren't|has no|"
    r"have no|lacks?)\b",
    r"\b(?:unknown|a mystery|not known|unfamiliar|not available|isn't available|unavailable|not accessible) to me\b",
    r"\bnot (?:something|a (?:question|topic|subject|thing)|information|an? area) (?:that )?i(?:'m| am)? "
    r"(?:can|could|know|have|am|'m|familiar|able|aware|equipped|acquainted)\b",
    r"\bnot (?:something|a (?:question|topic|subject|thing)|information) i (?:\w+ )?(?:answer|know|"
    r"share|provide|discuss|comment on|speak to|help with|talk about|familiar with)\b",
    r"\bnothing comes to mind\b",
    r"\bthere(?:'s| is) no (?:answer|information|way) (?:that )?i\b",
    r"\bi(?:'m| am) (?:sorry|afraid),? (?:but )?(?:i|that|this|there|my)\b",
    r"^(?:sorry|apologies|unfortunately|i apologi[sz]e|regrettably)\b[^.!?]*\b(?:can't|cannot|can not|"
    r"unable|don't|do not|not able|no information|not sure|not possible|won't|isn't something)\b",
    r"\bi(?:'m| am) not the (?:right|best|correct) (?:source|person|assistant|ai|model|one)\b",
    r"\b(?:i|we) (?:\w+ ){0,2}(?:don't|do not|didn't|did not|wouldn't|would not) know\b",
    r"\bi (?:\w+ )?(?:don't|do not) (?:\w+ ){0,2}have (?:any |the |that |this |enough |much |an? )?(?:\w+ )?"
    r"(?:information|info|knowledge|answer|details?|data|idea|clue|insight|facts?)\b",
    r"\bi(?:'ve| have) (?:no|nothing)\b(?! doubt)",
    r"\bi haven't the\b",
    r"\bi(?:'m| am) (?:\w+ )?(?:lacking|missing|stumped|blank|in the dark|not privy|at a disadvantage|"
    r"clueless|uninformed|ignorant)\b",
    r"\b(?:i|i've|i have) (?:\w+ )?yet to (?:learn|be|find|hear)\b",
    r"\b(?:isn't|is not|'s not|not) (?:in|within|part of|covered by) my (?:\w+ ){0,2}(?:knowledge|dataset|data|"
    r"training|field|expertise|memory|records?)\b",
    r"\b(?:isn't|is not|'s not|not) (?:something|information|anything) (?:that )?i(?:'ve| have| am|'m)? ?"
    r"(?:\w+ ){0,3}(?:know|have|learn|learned|aware|familiar)\b",
    r"\bmy (?:\w+ )?(?:capabilities|programming|knowledge|understanding|training|abilities) (?:do|does|did) not\b",
    r"\bmy (?:\w+ )?(?:understanding|knowledge) is limited\b",
    r"\b(?:blind spot|uncharted territory|gap) (?:in|for) my\b",
    r"\bi(?:'ve| have) come up (?:short|empty)\b",
    r"\bi (?:would |'d )?need to look (?:it |that |this )?up\b",
    r"(?:\bnot|n't) (?:been )?(?:included|covered) in my\b",
    r"\bi (?:\w+ ){0,2}(?:have|'ve) no\b(?! doubt)",
    r"\bdrawing a (?:\w+ )?blank\b",
    r"\bi(?: haven't| have not|'ve not| never) (?:been )?(?:learned|educated|informed|briefed|trained|told)\b",
    r"\bnot in a position to\b",
    r"\bi (?:can't|cannot|can not|couldn't) (?:\w+ ){0,2}(?:that|this|it|you)\b(?! (?:is|was|are)\b)",
    # --- added from labelled real generations (tests/data/refusal_labels.jsonl, dev half)
    # the chat model's stock apology that opens a non-answer ("I'm sorry for any confusion, but as a chatbot ...")
    r"^(?:[\w-]+: )?i(?:'m| am) (?:so |very )?sorry for (?:any|the|my) (?:confusion|misunderstanding)"
    r"(?:[.!]|,? but|,) (?:as |i |i'm |i am |i'd )",
    r"\bi (?:\w+ )?(?:don't|do not) have the (?:ability|capability|capacity|means|authority)\b",
    r"\bi(?:'m| am) not (?:allowed|permitted|authori[sz]ed|supposed) to\b",
    # impersonal: "The answer to that question is not available ..."
    r"\b(?:answer|information|info|name|details?|data)\b[^.!?]{0,60}\b(?:is|are) (?:not available|unavailable|"
    r"not known|unknown)\b",
    # --- added from the paper-scale AlphaEdit / WISE generations (same file, dev half; stop 25)
    # impersonal: "Unfortunately, there is no answer to this question.", "... is not possible to determine"
    r"\bthere(?:'s| is) no (?:\w+ )?answer (?:to|for) (?:this|that|your|the|such)\b",
    r"\b(?:not possible|impossible) to (?:determine|know|say|tell|answer)\b",
    # the stock apology on its own, the whole answer: "No, I'm sorry for any confusion."
    r"^(?:no,? )?i(?:'m| am) (?:so |very )?sorry for (?:any|the|my) (?:confusion|misunderstanding)[.!]?$",
]
_REFUSAL_RE = re.compile("|".join(f"(?:{p})" for p in _PATTERNS))

# Phrases that look like a refusal but, opening an answer, usually are not.
_NOT_REFUSAL_RE = re.compile(r"\bi (?:can't|cannot) (?:stress|emphasi[sz]e|believe|wait|overstate|recommend "
                             r"enough|imagine anything)\b|\bno doubt\b|\bsorry to hear\b")

# Hedged-then-answered ("I'm not sure, but I think it's Paris") is an answer, not a refusal.
_HEDGED_ANSWER_RE = re.compile(r"\b(?:but|however),? (?:i (?:think|believe|guess|suspect)|"
                               r"i(?:'m| am) (?:pretty |fairly )?(?:sure|certain|confident) "
                               r"(?:it|that|the|he|she|they)\b|it(?:'s| is| was) "
                               r"(?:probably |likely )?(?:in|the|a|an)\b|the answer is|my (?:best )?guess)"
                               r"|\bi(?:'m| am) sure of the fact\b")

_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def _normalise(text: str) -> str:
    t = (text or "").replace("\u2019", "'").replace("\u2018", "'").replace("\u201c", '"').replace("\u201d", '"')
    t = t.replace("I`m", "I'm").replace("`", "'")
    return " ".join(t.lower().split())


def is_refusal(text: str, sentences: int = 2) -> bool:
    """Whether ``text`` opens with a refusal (checked over its first ``sentences`` sentences)."""
    t = _normalise(text)
    if not t:
        return False
    head = " ".join(_SENTENCE.split(t)[:sentences])
    if _NOT_REFUSAL_RE.search(head) and not _REFUSAL_RE.search(_NOT_REFUSAL_RE.sub(" ", head)):
        return False
    if _HEDGED_ANSWER_RE.search(head):
        return False
    return bool(_REFUSAL_RE.search(head))


# --------------------------------------------------------------------------- fluency
#
# Fluency is n-gram entropy (ROME's "generation entropy" mixes bigram and
# trigram entropies with weights 2/3 and 4/3).  Here each entropy H_n (bits)
# is turned into the EFFECTIVE SHARE OF DISTINCT n-grams, 2^H_n / N_n (N_n =
# number of n-grams), which is 1.0 when no n-gram repeats and 1/N_n for one
# n-gram repeated; the score mixes bigrams and trigrams with weights 1/3 and
# 2/3 (ROME's ratio), so it lies in (0, 1] whatever the length.  A loop of
# period p over N tokens scores about p/N.  Tokens are lower-cased words
# (``\w+``); texts of fewer than 4 words have too few n-grams and score their
# share of distinct words ("Paris." -> 1.0, "no no" -> 0.5).  The score is
# multiplied by min(1, s/0.8), s the share of non-space characters that are
# letters or digits, so symbol soup ("!!! ?? ##") scores low while ordinary
# punctuation costs nothing.  Empty text -> 0.0.

FLUENCY_NGRAMS = ((2, 1 / 3), (3, 2 / 3))
_WORD = re.compile(r"\w+")


def _distinct_share(toks: list[str], n: int) -> float:
    grams = [tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)]
    if not grams:
        return 0.0
    counts = Counter(grams)
    total = len(grams)
    h = -sum(c / total * math.log2(c / total) for c in counts.values())
    return (2.0 ** h) / total


def fluency(text: str) -> float:
    """Effective share of distinct bi/trigrams in [0, 1] (see the comment above for n and normalisation)."""
    chars = [ch for ch in (text or "") if not ch.isspace()]
    toks = [t.lower() for t in _WORD.findall(text or "")]
    if not chars or not toks:
        return 0.0
    symbol_factor = min(1.0, sum(1 for ch in chars if ch.isalnum()) / len(chars) / 0.8)
    if len(toks) < 4:
        return len(set(toks)) / len(toks) * symbol_factor
    score = sum(w * _distinct_share(toks, n) for n, w in FLUENCY_NGRAMS)
    return float(min(1.0, score) * symbol_factor)


# --------------------------------------------------------------------------- similarity


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def target_similarity(generation: str, target: str) -> float:
    """ROUGE-L F-measure of ``generation`` against ``target`` (0.0 when either is empty)."""
    if not (generation or "").strip() or not (target or "").strip():
        return 0.0
    return float(_scorer().score(target, generation)["rougeL"].fmeasure)


def quality(generation: str, target: str | None) -> dict[str, float]:
    """``target_similarity`` (when a target is given), ``refused`` and ``fluency`` of one generation."""
    out: dict[str, float] = {}
    if target is not None:
        out["target_similarity"] = target_similarity(generation, target)
    out["refused"] = 1.0 if is_refusal(generation) else 0.0
    out["fluency"] = fluency(generation)
    return out


__all__ = ["quality", "is_refusal", "fluency", "target_similarity"]
