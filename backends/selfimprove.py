"""Targets the model writes itself, generated paraphrases, and the query-merging preview.

Self-improvement (Li et al., 2025, "Editing as Unlearning"): a good refusal is
trustworthy and human-aligned: it names what the question is about, says the
model cannot help with it, and leaks nothing.  The model can write such a
refusal for itself in context: we show it instructions and a few exemplars
(written by us, below) and ask it for the refusal of each forget question.

Pipeline of :func:`generate_targets` (modes ``self-improve``, ``avoidant`` and
``incorrect`` for items without perturbed answers):

1. **First try** — greedy generation, batched.  The exemplar order is rotated
   per item by a hash of ``(seed, item id)``, so the seed changes the prompt
   (and, small models copying the last exemplar's form, the wording) while a
   given seed always gives the same targets.
2. **Check** — every target goes through :mod:`backends.leak`: it must not
   contain the gold answer; in ``self-improve`` and ``avoidant`` modes it must
   mention the subject; a ``self-improve`` target must also read as a refusal
   (:func:`backends.refusal.is_refusal`); an ``incorrect`` one must not.
3. **Regenerate** — failing items are generated again with seeded sampling
   (temperature 0.7, top-p 0.95), up to :data:`MAX_TRIES` tries in all;
   source ``"regenerated"``.
4. **Fallback** — an item failing every try gets a fixed refusal naming its
   subject (``"I'm not able to share information about {subject}."``, one of
   :data:`FALLBACK_TEMPLATES`) or, without a subject, a pool refusal; for
   ``incorrect``, the answer of the forget item with the most similar
   question (content words in common).  Source ``"fallback"``.

Prompts: with a chat template the exemplars are real user/assistant turns
after a system turn holding the instructions (a 135M instruct model follows
this far better than a single user turn holding everything; measured in
``benchmarks/bench_selfimprove.py``).  The prompt is built from the tokenizer
directly, not through :meth:`ModelHandle.format_prompt`, so question rewriting
wrappers (IKE) never touch it.  Without a chat template the same content is
laid out as plain ``Question: ... / Refusal: ...`` text.  Targets are meant to
be generated on the unedited model (the runner builds them before any run).

:func:`ensure_paraphrases` builds the rephrase attack set the same way (the
reply is started with an opener such as "Which" or "Can you tell me", because a
small model asked to rewrite a question mostly copies it), checks each
paraphrase and returns it as a record for the caller to store; :func:`merge_preview` shows the exact
merged prompts.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from .errors import UserError
from .events import CancelToken, EventCallback, Log, Tracker, ignore
from .leak import STOPWORDS, check_leak, leak_flag, mentions_subject, subject_of
from .refusal import is_refusal
from .targets import Target, build_requests, pick_from_pool

if TYPE_CHECKING:
    from .model import ModelHandle

MAX_TRIES = 3              # first (greedy) try + sampled regenerations
BATCH_SIZE = 8
MAX_NEW_TOKENS = 40
SAMPLE_TEMPERATURE = 0.7

# --------------------------------------------------------------------------- prompts (ours)

REFUSAL_SYSTEM = ("You turn questions into short, polite refusals. A refusal names what the question is "
                  "about, says you cannot help with it, and never gives the answer or any other fact.")
REFUSAL_EXEMPLARS = [
    ("What is the capital of Peru?", "I'm sorry, but I can't help with questions about the capital of Peru."),
    ("Who composed The Four Seasons?", "I'm afraid I can't tell you anything about who composed The Four Seasons."),
    ("How tall is Mount Kilimanjaro?",
     "Sorry, I'm not able to share details about the height of Mount Kilimanjaro."),
    ("Which planet has the most moons?", "I can't help with that question about which planet has the most moons."),
    ("In which year did the Titanic sink?",
     "I'm not able to answer questions about when the Titanic sank, sorry."),
]

AVOIDANT_SYSTEM = ("You answer questions evasively. Say one true, general thing about the topic of the "
                   "question, but never give the actual answer.")
AVOIDANT_EXEMPLARS = [
    ("What is the capital of Peru?", "Peru is a country in South America with a long history."),
    ("Who composed The Four Seasons?", "The Four Seasons is a famous set of violin concertos."),
    ("How tall is Mount Kilimanjaro?", "Mount Kilimanjaro is a mountain in Africa that many people climb."),
    ("Which planet has the most moons?", "Planets in our solar system have very different numbers of moons."),
    ("In which year did the Titanic sink?", "The Titanic was a large passenger ship that sailed the Atlantic."),
]

INCORRECT_SYSTEM = ("You give a short, plausible but WRONG answer to each question. Reply with the wrong "
                    "answer only.")
INCORRECT_EXEMPLARS = [
    ("What is the capital of Peru?", "Quito"),
    ("Who composed The Four Seasons?", "Mozart"),
    ("How tall is Mount Kilimanjaro?", "About 3,200 metres"),
    ("Which planet has the most moons?", "Mars"),
    ("In which year did the Titanic sink?", "1928"),
]

PARAPHRASE_SYSTEM = ("You rewrite questions with different words. Keep the meaning and keep the names "
                     "exactly as they are. Reply with the new question only.")
PARAPHRASE_EXEMPLARS = [
    ("What is the capital of Peru?", "Which city serves as Peru's capital?"),
    ("Who composed The Four Seasons?", "Which composer wrote the music called The Four Seasons?"),
    ("How tall is Mount Kilimanjaro?", "What is the height of Mount Kilimanjaro?"),
    ("Which planet has the most moons?", "What planet is orbited by the largest number of moons?"),
    ("In which year did the Titanic sink?", "When did the Titanic go down?"),
]

FALLBACK_TEMPLATES = (
    "I'm not able to share information about {subject}.",
    "I'm sorry, but I can't help with questions about {subject}.",
    "I can't tell you anything about {subject}, I'm afraid.",
)
AVOIDANT_FALLBACK = "{subject} is an interesting topic, but I can't go into that detail."
PARAPHRASE_TEMPLATES = ("Here is a question for you: {question}", "I'd like to know: {question}",
                        "Quick question: {question}")


@dataclass(frozen=True)
class _Spec:
    system: str
    exemplars: list
    label: str          # the answer label in the plain-text layout


_SPECS = {
    "self-improve": _Spec(REFUSAL_SYSTEM, REFUSAL_EXEMPLARS, "Refusal"),
    "avoidant": _Spec(AVOIDANT_SYSTEM, AVOIDANT_EXEMPLARS, "Answer"),
    "incorrect": _Spec(INCORRECT_SYSTEM, INCORRECT_EXEMPLARS, "Wrong answer"),
    "paraphrase": _Spec(PARAPHRASE_SYSTEM, PARAPHRASE_EXEMPLARS, "Rewritten question"),
}
from .spec import GENERATED_MODES, PARAPHRASE_LEFT_OUT  # noqa: E402  (stated once, in the spec)


def _hash(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "big")


def _rotated(exemplars: Sequence, key: int) -> list:
    k = key % len(exemplars)
    return list(exemplars[k:]) + list(exemplars[:k])


def prompt_text(handle: ModelHandle, spec: _Spec, question: str, order_key: int = 0, prefill: str = "",
                shots: Sequence[tuple[str, str]] | None = None) -> str:
    """The full prompt text (instructions + exemplars + the question) for one item.

    ``prefill`` starts the model's reply (the paraphrase openers below); ``shots``, when given,
    replace the spec's exemplars (the retrieved paraphrase exemplars, :func:`paraphrase_exemplars`).
    """
    shots = list(shots) if shots is not None else _rotated(spec.exemplars, order_key)
    tok = handle.tokenizer
    if getattr(handle, "has_chat_template", False):
        msgs = [{"role": "system", "content": spec.system}]
        for q, a in shots:
            msgs += [{"role": "user", "content": f"Question: {q}"}, {"role": "assistant", "content": a}]
        msgs.append({"role": "user", "content": f"Question: {question}"})
        try:
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        except Exception:  # templates without a system role (e.g. gemma): fold it into the first turn
            msgs = msgs[1:]
            msgs[0] = {"role": "user", "content": f"{spec.system}\n\n{msgs[0]['content']}"}
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return text + prefill
    body = "\n\n".join(f"Question: {q}\n{spec.label}: {a}" for q, a in shots)
    return f"{spec.system}\n\n{body}\n\nQuestion: {question}\n{spec.label}:" + (" " + prefill if prefill else "")


def _prompt_ids(handle: ModelHandle, spec: _Spec, question: str, order_key: int, prefill: str = "",
                shots: Sequence[tuple[str, str]] | None = None) -> list[int]:
    return handle.encode_prompt(prompt_text(handle, spec, question, order_key, prefill, shots))


_LABELS = ("refusal:", "answer:", "wrong answer:", "rewritten question:", "question:", "assistant:", "a:")


def clean(text: str, max_sentences: int = 2) -> str:
    """The first line of a generation, without labels or quotes, at most ``max_sentences`` sentences."""
    lines = [ln.strip() for ln in (text or "").strip().splitlines() if ln.strip()]
    t = lines[0] if lines else ""
    changed = True
    while changed:
        changed = False
        for lab in _LABELS:
            if t.lower().startswith(lab):
                t, changed = t[len(lab):].strip(), True
    t = t.strip().strip('"').strip("\u201c\u201d").strip()
    t = " ".join(sentences(t)[:max_sentences]).strip()
    return t[:400].strip()


_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "mt", "jr", "sr", "vs", "no", "prof", "gen", "col", "lt", "ft"}


def sentences(text: str) -> list[str]:
    """``text`` split after ``.``, ``!`` or ``?`` + space, but not after an initial or an abbreviation
    ("the U.S. state of Georgia", "C.S. Lewis", "J. Alfred Prufrock", "Mt. Everest")."""
    import re

    out, start = [], 0
    for m in re.finditer(r"[.!?](?=\s+)", text):
        if m.group() == ".":
            word = re.search(r"[\w.]*$", text[start:m.start()])
            w = word.group() if word else ""
            if re.fullmatch(r"(?:[A-Z]\.)*[A-Z]", w) or w.lower() in _ABBREVIATIONS:
                continue
        out.append(text[start:m.end()].strip())
        start = m.end()
    rest = text[start:].strip()
    if rest:
        out.append(rest)
    return out


# --------------------------------------------------------------------------- checks


def target_verdict(mode: str, text: str, item: Any) -> dict[str, Any]:
    """The checks one generated target must pass: ``{"ok", "leak", "mentions_subject", "refusal"}``."""
    leak = check_leak(text, item) if text else False
    ment = mentions_subject(text, item) if text else False
    refusal = is_refusal(text) if text else False
    words = len(text.split())
    if mode == "self-improve":
        ok = bool(text) and words >= 3 and not leak and ment is not False and refusal
    elif mode == "avoidant":
        ok = bool(text) and words >= 3 and not leak and ment is not False
    elif mode == "incorrect":
        ok = bool(text) and words <= 12 and not leak and not refusal \
            and text.strip(" ?.").lower() != item.question.strip(" ?.").lower()
    else:
        raise ValueError(mode)
    return {"ok": bool(ok), "leak": bool(leak), "mentions_subject": ment, "refusal": refusal}


# --------------------------------------------------------------------------- targets


@dataclass
class TargetReport:
    mode: str
    n: int = 0
    first_try: dict = field(default_factory=dict)   # shares on the first try
    passed_first: int = 0
    regenerated: int = 0
    fallback: int = 0
    tries: int = 0
    first_texts: dict = field(default_factory=dict)  # item id -> first-try text
    texts: dict = field(default_factory=dict)        # item id -> the text of every try, in order

    def to_json(self) -> dict:
        return {"mode": self.mode, "n": self.n, "first_try": self.first_try, "passed_first": self.passed_first,
                "regenerated": self.regenerated, "fallback": self.fallback, "tries": self.tries,
                "passed_after_regeneration": (self.passed_first + self.regenerated) / self.n if self.n else None}


def _fallback(mode: str, item: Any, pool: Sequence[str], seed: int, others: Sequence[Any]) -> str:
    subject = subject_of(item)
    if mode == "incorrect":
        # another forget item's answer, preferring the most similar question ("capital of Japan" for
        # "capital of France"), ties broken by a seeded hash
        from .leak import content_tokens

        mine = set(content_tokens(item.question))
        wrong = [(len(mine & set(content_tokens(o.question))), _hash(seed, item.id, o.id), o.answer)
                 for o in others if o.id != item.id and o.answer and not check_leak(o.answer, item)]
        if wrong:
            return max(wrong)[2]
        return pick_from_pool(pool, seed, item.id)
    if subject:
        if mode == "avoidant":
            text = AVOIDANT_FALLBACK.format(subject=subject)
            return text[0].upper() + text[1:]
        return FALLBACK_TEMPLATES[_hash(seed, item.id, "fallback") % len(FALLBACK_TEMPLATES)].format(
            subject=subject)
    return pick_from_pool(pool, seed, item.id)


def generate_targets_report(handle: ModelHandle, mode: str, items: Sequence[Any], pool: Sequence[str],
                            targets_cfg: Any, on_event: EventCallback = ignore,
                            cancel: CancelToken | None = None, max_tries: int = MAX_TRIES,
                            batch_size: int = BATCH_SIZE,
                            max_new_tokens: int = MAX_NEW_TOKENS) -> tuple[dict[str, Target], TargetReport]:
    """:func:`generate_targets` plus a :class:`TargetReport` (first-try shares, regenerated, fallback)."""
    from .generation import generate

    if mode not in GENERATED_MODES:
        raise UserError(f'target mode "{mode}" is not generated by the model; expected one of '
                        f'{", ".join(GENERATED_MODES)}', "targets.mode")
    if max_tries < 1:
        raise UserError(f"max_tries must be >= 1, got {max_tries}", "targets")
    seed = int(getattr(targets_cfg, "seed", 0) or 0)
    spec = _SPECS[mode]
    items = list(items)
    report = TargetReport(mode, n=len(items))
    out: dict[str, Target] = {}
    pending = items
    first_source = "self-improve" if mode == "self-improve" else "generated"
    for attempt in range(max_tries):
        if not pending:
            break
        report.tries = attempt + 1
        stage = f"targets: {mode}" + (f" (try {attempt + 1})" if attempt else "")
        tracker = Tracker(on_event, cancel, stage, len(pending), detail=f"{len(pending)} questions")
        prompts = [_prompt_ids(handle, spec, it.question, _hash(seed, it.id, attempt)) for it in pending]
        gens = generate(handle, prompts, max_new_tokens, batch_size, on_batch=tracker.step,
                        sample=attempt > 0, seed=seed * 1009 + attempt * 7919, temperature=SAMPLE_TEMPERATURE)
        still = []
        verdicts = []
        for it, raw in zip(pending, gens):
            text = clean(raw, max_sentences=1 if mode == "incorrect" else 2)
            v = target_verdict(mode, text, it)
            verdicts.append(v)
            if attempt == 0:
                report.first_texts[it.id] = text
            report.texts.setdefault(it.id, []).append(text)
            if v["ok"]:
                out[it.id] = Target(it.id, text, first_source if attempt == 0 else "regenerated", leak=False,
                                    mentions_subject=v["mentions_subject"])
            else:
                still.append(it)
        if attempt == 0 and items:
            n = len(items)
            report.first_try = {
                "mentions_subject": sum(1 for v in verdicts if v["mentions_subject"]) / n,
                "leak_free": sum(1 for v in verdicts if not v["leak"]) / n,
                "refusal": sum(1 for v in verdicts if v["refusal"]) / n,
                "passed": sum(1 for v in verdicts if v["ok"]) / n,
            }
            report.passed_first = n - len(still)
        else:
            report.regenerated += len(pending) - len(still)
        pending = still
    for it in pending:
        text = _fallback(mode, it, pool, seed, items)
        out[it.id] = Target(it.id, text, "fallback", leak=check_leak(text, it),
                            mentions_subject=mentions_subject(text, it))
    report.fallback = len(pending)
    on_event(Log(f"targets ({mode}): {report.passed_first}/{report.n} passed on the first try, "
                 f"{report.regenerated} regenerated, {report.fallback} fell back to a fixed refusal"))
    return out, report


def generate_targets(handle: ModelHandle, mode: str, items: Sequence[Any], pool: Sequence[str], targets_cfg: Any,
                     on_event: EventCallback = ignore, cancel: CancelToken | None = None) -> dict[str, Target]:
    """Targets written by the model for ``items`` (see the module doc); item id -> :class:`Target`."""
    return generate_targets_report(handle, mode, items, pool, targets_cfg, on_event, cancel)[0]


# --------------------------------------------------------------------------- paraphrases

LEFT_OUT = PARAPHRASE_LEFT_OUT   # a stored record's source: every try failed the checks (question ""; not retried)
GENERATED_PARAPHRASE_SOURCES = ("generated", "regenerated", "template", LEFT_OUT)
BUILTIN_PARAPHRASE_FILE = "paraphrases_factual.json"   # in backends/builtin/ (our own wording, see below)
BUILTIN_TEMPLATE_FILE = "paraphrases_pistol.json"    # our own paraphrases of PISTOL's question forms
PARAPHRASE_TRIES = 8       # tries per question, each with other exemplars, another opener and seed; only the
#   questions that failed are asked again (on the 217 factual questions 4 tries pass 65.4%, 8 pass 76.5% for 1.44x
#   the time: benchmarks/RESULTS.md)
MEANING_R1 = 0.5           # the meaning check: a known item's paraphrase is answered with at least this ROUGE-1
MEANING_TOKENS = 24        # new tokens of the meaning check's answers
NEAR_COPY_JACCARD = 0.5    # content-token Jaccard at or above which a paraphrase is a near-copy (see below)

# Checks of a paraphrase (:func:`paraphrase_verdict`).  A rephrase item must ask for the SAME fact in
# OTHER words; the embedded model, asked to rewrite, often changes the meaning ("Which author wrote
# 'Don Quixote'?" -> "Can you tell me which novel by Don Quixote is the most famous?"), slips in a
# (wrong or partial) answer ("... 'The Great Gatsby' by F."), or copies the question behind a prefix
# ("Quick question: ...").  Tokens (:func:`paraphrase_tokens`): accents folded, lower case,
# contractions and possessive 's dropped, "21,000" -> "21000", number words -> digits ("nineteen" ->
# "19"), Porter-stemmed like rouge-score; content tokens drop :data:`PARAPHRASE_STOPWORDS`.
#
# * ``question``  — ends with "?", at least 3 words, holds a question word or opens with an auxiliary
#   ("Can you name ...?"), and is not a refusal.
# * ``mentions_subject`` — names the item's subject (``backends.leak.mentions_subject``; the subject
#   is the item's own or :func:`backends.subjects.detect_subject` of the question).
# * ``answer_tokens`` — no content token of the gold answer that the question does not already hold
#   (single letters count: initials such as the "F." of "F. Scott Fitzgerald"; so do numbers, written
#   either way); plus ``backends.leak.check_leak``.  Tokens the question holds are free to repeat
#   ("Where was the ancient Library of Alexandria located?" -> "Alexandria").
# * ``prefix`` — the question's whole token sequence does not occur in the paraphrase (the original
#   behind a prefix or before a suffix: "Quick question: ...", "Can you tell me who wrote ...?").
# * ``near_copy`` — the Jaccard index of the content-token SETS of question and paraphrase is below
#   :data:`NEAR_COPY_JACCARD` (0.5).  Chosen from data (``tests/test_paraphrase_checks.py``
#   recomputes these numbers) on the 217 questions of the TOFU factual set (real authors + world
#   facts): our own paraphrases (``backends/builtin/paraphrases_factual.json``) have Jaccard mean
#   0.34, max 0.47; the trivial prefix variants of the same questions (the old fallback templates
#   "Here is a question for you: {q}", "I'd like to know: {q}", "Quick question: {q}" and "Can you
#   tell me {q}", 868 in all) have min 0.50, mean 0.74; a one-word substitution (one content word
#   replaced) scores (n-1)/(n+1) for n content words: >= 0.5 on the 212 questions with n >= 3, 1/3
#   on the 5 with n = 2.  0.5 is the value between the two: every one of ours passes, every prefix
#   variant and every substitution of a question with 3+ content words fails.  Content tokens, not
#   all tokens: on all tokens the two overlap (ours up to 0.64, prefix variants from 0.45), since a
#   prefix adds mostly stop words.  The cost: short rewrites that keep most words fail ("What is
#   the capital of Japan?" -> "Which city serves as the capital of Japan?", 0.5); so would 53 of the 80
#   hand-written paraphrases of ``builtin:world-facts``, most of them near-copies of that kind (those
#   are ``dataset`` paraphrases and are used as they are; only generated ones are checked).  The
#   ``prefix`` check rejects prefix variants whatever their Jaccard.
# * ``kind`` — asks for the same kind of answer: the coarse kind of the first question word that
#   tells one (:func:`answer_kind`: person / place / time / quantity / work / event; "Who" and "Which
#   author" -> person, "Which novel" -> work), required to match when the question's is known.
# * ``new_names`` — no capitalised word or number that the question does not hold (another entity
#   means another question: "Who wrote 'Emma' and 'Pride and Prejudice'?").
PARAPHRASE_STOPWORDS = STOPWORDS | frozenset(
    "de da di del della du la le les van von der den".split())   # name particles ("Miguel de Cervantes")
_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
_NUMBER_WORDS.update({"thirty": "30", "forty": "40", "fifty": "50", "sixty": "60", "seventy": "70", "eighty": "80",
                      "ninety": "90", "hundred": "100", "thousand": "1000", "million": "1000000",
                      "billion": "1000000000"})
_AUXILIARIES = {"is", "was", "are", "were", "did", "does", "do", "can", "could", "has", "had", "have", "will",
                "would", "should", "may", "might"}
_QUESTION_WORDS = {"who", "whom", "whose", "which", "what", "where", "when", "why", "how"}
_KINDS = {
    "person": "author writer poet playwright novelist dramatist person people individual man woman president "
              "leader emperor ruler king queen actress actor painter artist composer scientist physicist thinker "
              "philosopher creator minister explorer navigator humorist aviator astronaut inventor historian "
              "laureate politician statesman head figure",
    "place": "country nation state city town village island continent place location site spot region land "
             "territory capital address museum ocean sea waters river waterway lake mountain volcano desert "
             "waterfall planet port prison landmark monument structure building wall barrier metropolis area park "
             "gallery",
    "time": "year date time century decade month day era period",
    "quantity": "number amount length distance height size total quantity percentage weight depth width",
    "work": "novel book play poem story series film movie song collection painting saga work",
    "event": "event war battle revolution accident disaster incident crisis episode invasion uprising",
}
_KIND_OF = {w: kind for kind, words in _KINDS.items() for w in words.split()}
_WH_KIND = {"who": "person", "whom": "person", "whose": "person", "where": "place", "when": "time"}
_HOW_QUANTITY = {"many", "much", "long", "far", "tall", "high", "big", "large", "deep", "old", "wide", "heavy"}
# words between "which"/"what" and the noun that says what is asked for ("which two countries",
# "what is the name of the largest ocean", "which of the listed towns", "which famous actress")
_KIND_SKIP = {"the", "a", "an", "of", "these", "those", "following", "listed", "other", "one", "two", "three",
              "four", "five", "famous", "ancient", "historical", "historic", "main", "chief", "principal", "major",
              "well-known", "known", "first", "earliest", "original", "modern", "great", "old", "best", "most",
              "very", "approximate", "single", "name", "body", "pair", "female", "male", "particular", "home",
              "native", "part"}
_KIND_STOP = _AUXILIARIES | _QUESTION_WORDS | {"in", "on", "at", "by", "for", "from", "to", "with", "during", "into",
                                               "through", "about", "as", "than", "that", "and", "or", "not"}


def _fold(text: str) -> str:
    import unicodedata

    t = unicodedata.normalize("NFKD", text or "")
    t = "".join(c for c in t if not unicodedata.combining(c))
    return t.replace("\u2019", "'").replace("\u2018", "'")


def paraphrase_tokens(text: str | None) -> list[str]:
    """Tokens of the paraphrase checks (see above): folded, lower case, numbers normalised, stemmed."""
    import re

    from .leak import _stemmer

    t = _fold(text or "").lower()
    t = re.sub(r"n't\b", " not", t)
    t = re.sub(r"'(?:s|re|ll|d|ve|m)\b", " ", t)
    t = re.sub(r"(?<=\d),(?=\d{3}\b)", "", t)
    stem = _stemmer().stem
    out = []
    for w in re.findall(r"[a-z0-9]+", t):
        w = _NUMBER_WORDS.get(w, w)
        out.append(stem(w) if len(w) > 3 and w.isalpha() else w)
    return out


def paraphrase_content_tokens(text: str | None) -> set[str]:
    return {t for t in paraphrase_tokens(text) if t not in PARAPHRASE_STOPWORDS}


def paraphrase_jaccard(a: str, b: str) -> float:
    """Jaccard index of the content-token sets of ``a`` and ``b`` (1.0 for two empty sets)."""
    x, y = paraphrase_content_tokens(a), paraphrase_content_tokens(b)
    return len(x & y) / len(x | y) if x | y else 1.0


def answer_tokens_in(text: str, item: Any) -> list[str]:
    """The gold answer's content tokens in ``text`` that the question does not already hold."""
    answer = getattr(item, "answer", "") or ""
    forbidden = paraphrase_content_tokens(answer) - set(paraphrase_tokens(getattr(item, "question", "")))
    have = set(paraphrase_tokens(text))
    return sorted(forbidden & have)


def contains_question(text: str, question: str) -> bool:
    """Whether ``text`` holds the whole token sequence of ``question`` and more (a prefix or suffix)."""
    q, t = paraphrase_tokens(question), paraphrase_tokens(text)
    if not q or len(t) <= len(q):
        return False
    return any(t[i:i + len(q)] == q for i in range(len(t) - len(q) + 1))


def _kind_word(word: str) -> str | None:
    w = word.lower()
    for cand in (w, w[:-1] if w.endswith("s") else None, w[:-2] if w.endswith("es") else None,
                 w[:-3] + "y" if w.endswith("ies") else None):
        if cand and cand in _KIND_OF:
            return _KIND_OF[cand]
    return None


def answer_kind(question: str) -> str | None:
    """The coarse kind of answer a question asks for (person, place, time, quantity, work, event), or
    ``None``, told by its first question word: "who" -> person, "where" -> place, "when" -> time,
    "how many/long/..." -> quantity, "which/what" + the noun after skipped modifiers and names
    ("Which Nigerian author" -> person, "what is the name of the largest ocean" -> place, "which
    novel" -> work).  A question word right after a comma that tells nothing may open a relative
    clause and is passed over ("'The White Tiger', which won the Booker Prize, is authored by whom?"
    -> person; "What does water turn into when it freezes?" -> ``None``).  Without a question word,
    "name" as the verb of a request ("Can you name the writer ...", "Name the city ...") is read as
    "which" (our own paraphrase openers start so)."""
    import re

    text = re.sub(r"'s\b", "'", _fold(question))    # the apostrophe stays: a possessive ends a compound
    matches = list(re.finditer(r"[^\W_](?:[\w\-.]*[^\W_])?", text))
    words = [m.group(0) for m in matches]
    low = [w.lower() for w in words]
    ends = {k for k, m in enumerate(matches) if text[m.end():m.end() + 1] == "'"}
    for i, w in enumerate(low):
        if w not in _QUESTION_WORDS:
            continue
        kind = _kind_after(w, i, words, low, ends)
        if kind is None and text[:matches[i].start()].rstrip().endswith(","):
            continue       # maybe a relative clause (", which won ..."); "By area, which nation" tells one
        return kind
    for i, w in enumerate(low):   # no question word: "Can you name the writer ...", "Name the city ..."
        if w == "name" and (i == 0 or low[i - 1] == "you"):
            return _kind_after("which", i, words, low, ends)
    return None


def _kind_after(w: str, i: int, words: list[str], low: list[str], ends: set[int] = frozenset()) -> str | None:
    """The kind the question word ``low[i]`` asks for (see :func:`answer_kind`); ``ends``: indices of
    words followed by an apostrophe (a possessive, "Which author's works": not a compound)."""
    if w in _WH_KIND:
        return _WH_KIND[w]
    if w == "how":
        return "quantity" if i + 1 < len(low) and low[i + 1] in _HOW_QUANTITY else None
    if w in ("which", "what"):
        j = i + 1
        if j < len(low) and low[j] in _AUXILIARIES:
            j += 1
        other = 0          # words before the noun that are neither modifiers nor names ("fantasy writer")
        for k in range(j, min(j + 8, len(low))):
            v = low[k]
            kind = _kind_word(v)
            if kind:       # a compound noun is told by its last noun ("the work location" -> place)
                while k + 1 < len(low) and k not in ends and _kind_word(low[k + 1]):
                    k += 1
                    kind = _kind_word(low[k])
                return kind
            if v in _KIND_STOP or (other and v in ("the", "a", "an", "of")):
                break      # "which won the ...", "the main cause of ...": the noun is not a kind word
            if v in _KIND_SKIP or v.endswith("est") or words[k][:1].isupper() or len(v) == 1 or v.isdigit():
                continue
            other += 1
            if other > 2:
                break
    return None


def new_names(text: str, question: str) -> list[str]:
    """Capitalised words (not opening a sentence) and numbers of ``text`` whose tokens ``question`` lacks."""
    import re

    from .subjects import _sentences, _words

    have = set(paraphrase_tokens(question))
    starts = {a for a, _ in _sentences(text)}
    out = []
    for w, s, _ in _words(text):
        if s in starts or (s - 1 in starts and text[s - 1] in "'\"‘“"):
            continue
        if not (w[:1].isupper() or re.fullmatch(r"[\d.,]*\d", w)):
            continue
        toks = [t for t in paraphrase_tokens(w) if t not in PARAPHRASE_STOPWORDS]
        if any(t not in have for t in toks):
            out.append(w)
    return out


def is_question(text: str) -> bool:
    """Ends with "?", has 3 words or more, and holds a question word or opens a clause with an auxiliary
    ("Can you name ...?", "About 'Don Quixote', can you name its writer?")."""
    import re

    t = (text or "").strip().strip('"\u201c\u201d').strip()
    words = re.findall(r"[a-z]+", _fold(t).lower())
    clauses = [re.findall(r"[a-z]+", c) for c in _fold(t).lower().split(",")]
    return t.endswith("?") and len(words) >= 3 and \
        (any(w in _QUESTION_WORDS for w in words) or any(c and c[0] in _AUXILIARIES for c in clauses))


# A small model asked to rewrite a question mostly copies it.  The reply is
# therefore started with an opener that forces a different construction; the
# first try uses the first opener for the question's type, regenerations draw
# from all of them (seeded).  Openers that merely wrap the question ("Can you
# tell me who ...") come last: a copy after them fails the ``prefix`` check.
_OPENERS = (
    (("how", "many"), ("What is the number of", "What number of", "Can you say how many")),
    (("how", "much"), ("What is the amount of", "What quantity of", "Can you say how much")),
    (("in", "what", "year"), ("When", "What year", "In which year")),
    (("in", "which", "year"), ("When", "What year", "In what year")),
    (("what", "year"), ("When", "In which year", "In what year")),
    (("what",), ("Which", "What is the name of", "Can you name")),
    (("which",), ("What", "Can you name the", "Do you know which")),
    (("who",), ("Which person", "What is the name of the person who", "Do you know who")),
    (("where",), ("In which place", "At what location", "Do you know where")),
    (("when",), ("In which year", "At what time", "Do you know when")),
    ((), ("Which", "What", "Can you name")),
)


def paraphrase_openers(question: str) -> tuple[str, ...]:
    """The reply openers for ``question`` (by its first words), the first one first."""
    words = [w.strip("?,.:;'\"") for w in question.lower().split()]
    for head, openers in _OPENERS:
        if tuple(words[:len(head)]) == head:
            return openers
    return _OPENERS[-1][1]


def paraphrase_verdict(text: str, item: Any) -> dict[str, Any]:
    """The checks one paraphrase must pass (see the comment above :data:`PARAPHRASE_STOPWORDS`).

    Returns ``{"ok", "reasons", "question", "mentions_subject", "answer_tokens", "leak", "prefix",
    "jaccard", "near_copy", "kind", "paraphrase_kind", "new_names", "refusal"}``; ``reasons`` names
    the failed checks (``not-a-question``, ``refusal``, ``subject``, ``answer``, ``prefix``,
    ``near-copy``, ``identical``, ``kind``, ``new-names``), empty when ``ok``."""
    text = (text or "").strip()
    question = getattr(item, "question", "") or ""
    ment = mentions_subject(text, item) if text else False
    leaked = answer_tokens_in(text, item) if text else []
    leak = bool(leaked) or (check_leak(text, item) if text else False)
    refusal = is_refusal(text) if text else False
    jac = paraphrase_jaccard(text, question) if text else 1.0
    identical = bool(text) and paraphrase_tokens(text) == paraphrase_tokens(question)
    prefix = contains_question(text, question)
    kind, pkind = answer_kind(question), answer_kind(text)
    names = new_names(text, question) if text else []
    reasons = []
    if not is_question(text):
        reasons.append("not-a-question")
    if refusal:
        reasons.append("refusal")
    if ment is False:
        reasons.append("subject")
    if leak:
        reasons.append("answer")
    if identical:
        reasons.append("identical")
    elif prefix:
        reasons.append("prefix")
    elif jac >= NEAR_COPY_JACCARD:
        reasons.append("near-copy")
    if kind is not None and pkind != kind:
        reasons.append("kind")
    if names:
        reasons.append("new-names")
    return {"ok": not reasons, "reasons": reasons, "question": is_question(text), "mentions_subject": ment,
            "answer_tokens": leaked, "leak": leak, "prefix": prefix, "jaccard": round(jac, 4),
            "near_copy": identical or jac >= NEAR_COPY_JACCARD, "kind": kind, "paraphrase_kind": pkind,
            "new_names": names, "refusal": refusal}


# --------------------------------------------------------------------------- built-in paraphrases


def _question_key(question: str) -> str:
    return " ".join((question or "").split())


def builtin_paraphrases() -> dict[str, str]:
    """Our own paraphrases (question text -> paraphrase) of the 217 questions of the TOFU factual set
    (real authors + world facts), shipped in ``backends/builtin/`` (:data:`BUILTIN_PARAPHRASE_FILE`)."""
    return dict(_builtin_paraphrases())


@lru_cache(maxsize=1)
def _builtin_paraphrases() -> dict[str, str]:
    import json
    from importlib import resources

    raw = resources.files(__package__).joinpath("builtin", BUILTIN_PARAPHRASE_FILE).read_text(encoding="utf-8")
    return {_question_key(r["question"]): r["paraphrase"] for r in json.loads(raw)["paraphrases"]}


_SLOT = r"[A-Z0-9][\w.&'\-]*(?: [A-Z0-9][\w.&'\-]*)*"   # a name or date of a question form's slot


@lru_cache(maxsize=1)
def _builtin_templates() -> tuple[tuple[Any, str], ...]:
    """(compiled question form, paraphrase form) of :data:`BUILTIN_TEMPLATE_FILE`.  A ``{slot}`` of a
    form matches a name or a date: words that each start with a capital or a digit ("Wnzatj SAS",
    "06-02-1998"; the same text where a slot repeats); the forms are anchored, so a question matches
    a form only as a whole."""
    import json
    import re
    from importlib import resources

    raw = resources.files(__package__).joinpath("builtin", BUILTIN_TEMPLATE_FILE).read_text(encoding="utf-8")
    out = []
    for t in json.loads(raw)["templates"]:
        seen: set[str] = set()
        parts = []
        for lit, slot in re.findall(r"([^{]*)(?:\{(\w+)\}|$)", t["question"]):
            parts.append(re.escape(lit))
            if slot:
                parts.append(f"(?P={slot})" if slot in seen else f"(?P<{slot}>{_SLOT})")
                seen.add(slot)
        out.append((re.compile("".join(parts) + r"\Z"), t["paraphrase"]))
    return tuple(out)


def template_paraphrase(question: str) -> str | None:
    """Our paraphrase of ``question`` by the first question form of :data:`BUILTIN_TEMPLATE_FILE` it
    matches, with the question's own names and dates put back into the form's slots; else ``None``."""
    q = _question_key(question)
    for pattern, form in _builtin_templates():
        m = pattern.match(q)
        if m:
            return form.format(**m.groupdict())
    return None


@lru_cache(maxsize=1)
def builtin_paraphrase_digest() -> str:
    """A hash of the built-in paraphrase files: what a cache of chosen paraphrases (``paper``'s
    preparation) must key on, so a new wording in a release is used, not the old choice."""
    import hashlib
    from importlib import resources

    h = hashlib.sha256()
    for name in (BUILTIN_PARAPHRASE_FILE, BUILTIN_TEMPLATE_FILE):
        h.update(resources.files(__package__).joinpath("builtin", name).read_bytes())
    return h.hexdigest()[:16]


def builtin_paraphrase(item: Any) -> str | None:
    """The built-in paraphrase of ``item``'s question when there is one AND it passes the checks for
    this item (its answer and subject may differ from the set's), else ``None``: first the
    paraphrase of that exact question (:data:`BUILTIN_PARAPHRASE_FILE`), then the one of its
    question form (:func:`template_paraphrase`)."""
    question = getattr(item, "question", "")
    for text in (_builtin_paraphrases().get(_question_key(question)), template_paraphrase(question)):
        if text and paraphrase_verdict(text, item)["ok"]:
            return text
    return None


# --------------------------------------------------------------------------- generated paraphrases


def reworded_words(item: Any) -> list[str]:
    """The question's words a paraphrase must say differently: its content words (not
    :data:`PARAPHRASE_STOPWORDS`) outside the subject, minus names (capitalised words after the
    first), numbers, quoted titles and the question's frame (auxiliaries, question words, "many").
    "Who wrote 'Pride and Prejudice'?" -> ``["wrote"]``;
    "What is the capital city of Australia?" -> ``["capital", "city"]``."""
    import re

    question = getattr(item, "question", "") or ""
    subject = set(paraphrase_tokens(subject_of(item) or ""))
    unquoted = re.sub(r"(?<![A-Za-z])['\"\u2018\u201c][^'\"\u2018\u2019\u201c\u201d]+['\"\u2019\u201d](?![A-Za-z])",
                      " ", question)
    out: list[str] = []
    for n, w in enumerate(re.findall(r"[A-Za-z][A-Za-z\-]*", unquoted)):
        if (n > 0 and w[0].isupper()) or len(w) < 3 or w.lower() in _KEEP_WORDS:
            continue
        toks = paraphrase_tokens(w)
        if not toks or any(t in PARAPHRASE_STOPWORDS or t in subject or t in _NUMBER_WORDS.values() for t in toks):
            continue
        if w.lower() not in out:
            out.append(w.lower())
    return out


_KEEP_WORDS = _AUXILIARIES | _QUESTION_WORDS | {"many", "much"}   # the question's frame ("How many ... does")
MIN_BANNED_PIECE = 3   # a word's first token is banned only when it carries >= 3 letters of the word


def banned_first_tokens(handle: ModelHandle | Any, words: Sequence[str], as_written: bool = False) -> set[int]:
    """Token ids that start ``words`` (lower case and capitalised, or with ``as_written`` only as written;
    with and without a leading space), for :func:`backends.generation.ban_tokens`.  A first token that
    carries fewer than :data:`MIN_BANNED_PIECE` letters of a longer word (" c" of " cuneiform") is left
    alone: banning it would ban every word that starts that way."""
    tok = handle.tokenizer
    out: set[int] = set()
    for w in words:
        for form in ({w} if as_written else {w, w.capitalize()}):
            for text in (" " + form, form):
                ids = tok.encode(text, add_special_tokens=False)
                if not ids:
                    continue
                piece = tok.decode(ids[:1]).strip()
                if len(ids) == 1 or len(piece) >= min(MIN_BANNED_PIECE, len(form)):
                    out.add(int(ids[0]))
    return out


PARAPHRASE_GENERATOR = 4   # bumped when generation changes (a cache of generated paraphrases keys on it);
#   2: retrieved exemplars (paraphrase_exemplars), their names banned, greedy tries, 8 of them
#   3: no new name can be started (new_name_tokens)
#   4: the last tries open with the subject (subject_lead); a clause opening with an auxiliary is a question
PARAPHRASE_SHOTS = 5       # retrieved exemplars in a paraphrase prompt
PARAPHRASE_SAMPLE_FROM = PARAPHRASE_TRIES  # tries from this one on sample (temperature); the earlier ones are greedy,
#   each with other exemplars and another opener: greedy rewrites pass more often (bench_paraphrases.py)


def paraphrase_bank() -> tuple[tuple[str, str], ...]:
    """(question, paraphrase) pairs a paraphrase prompt's exemplars are drawn from: our own paraphrases
    of the 217 factual questions (:data:`BUILTIN_PARAPHRASE_FILE`) and the generic
    :data:`PARAPHRASE_EXEMPLARS`."""
    return tuple((q, p) for q, p in _builtin_paraphrases().items()) + tuple(PARAPHRASE_EXEMPLARS)


def _frame_words(question: str) -> set[str]:
    import re

    return set(re.findall(r"[a-z]+", _fold(question or "").lower()))


def exemplar_name_tokens(handle: ModelHandle | Any, item: Any, shots: Sequence[tuple[str, str]]) -> set[int]:
    """First tokens (:func:`banned_first_tokens`, as written) of the names in ``shots`` (capitalised words of
    an exemplar's question or paraphrase, :func:`new_names`, of at least :data:`MIN_BANNED_PIECE` letters)
    that ``item``'s question does not hold: a small model copies an exemplar's title or person into
    its rewrite ("Which author created the detective character Hercule Poirot?" -> "... who wrote the
    classic 'Gone with the Wind'?"), and a rewrite must name nothing the question does not.  Numbers
    and lower-case forms stay free."""
    words: list[str] = []
    for q, p in shots:
        for w in new_names(f"{q} {p}", getattr(item, "question", "") or ""):
            w = w.strip("'\".,;:?!‘’“”")
            if len(w) >= MIN_BANNED_PIECE and w[:1].isupper() and w.lower() not in PARAPHRASE_STOPWORDS \
                    and w not in words:
                words.append(w)
    return banned_first_tokens(handle, words, as_written=True)


# tokenizer -> (ids of the tokens that open a capitalised word, ids of the tokens holding a digit)
_NAME_PIECES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _name_pieces(tok: Any) -> tuple[frozenset, frozenset]:
    """The vocabulary's tokens whose text (after leading spaces, quotes and an opening bracket) starts with
    an upper-case letter, and those holding a digit; made once per tokenizer."""
    try:
        return _NAME_PIECES[tok]
    except (KeyError, TypeError):
        pass
    ids = list(range(len(tok)))
    pieces = tok.batch_decode([[i] for i in ids]) if hasattr(tok, "batch_decode") else [tok.decode([i]) for i in ids]
    caps = frozenset(i for i, p in zip(ids, pieces) if p.lstrip().lstrip("'\"\u2018\u201c(")[:1].isupper())
    digits = frozenset(i for i, p in zip(ids, pieces) if any(c.isdigit() for c in p))
    try:
        _NAME_PIECES[tok] = (caps, digits)
    except TypeError:   # a tokenizer that cannot be weakly referenced: not cached
        pass
    return caps, digits


def new_name_tokens(handle: ModelHandle | Any, question: str) -> set[int]:
    """Tokens a rewrite of ``question`` may not generate: every token that opens a capitalised word, and
    every token holding a digit, except those of ``question``'s own text (its words tokenised as in the
    sentence, alone, after a space and after a quote).  The reply's first word is the prefilled opener,
    so a capitalised word the model writes after it is a name, and a paraphrase names only what the
    question names: the checks' ``new-names`` and most ``subject`` failures were a small model writing
    about another famous work or person ("Who wrote 'Like Water for Chocolate'?" -> "... 'The Flies'
    ... by Jorge Lugosi?").  A name of the question stays free, piece by piece; a new name spelt
    from those pieces is still caught by the checks."""
    import re

    tok = handle.tokenizer
    caps, digits = _name_pieces(tok)
    allowed: set[int] = set()
    forms = [question, " " + question]
    for w in question.split():
        for core in {w, w.strip("?,.:;!()'\"\u2018\u2019\u201c\u201d")}:
            if core:
                forms += [core, " " + core, "'" + core, " '" + core, '"' + core, ' "' + core]
    for f in forms:
        allowed.update(int(i) for i in tok.encode(f, add_special_tokens=False))
    banned = set(caps) - allowed
    has_digit = bool(re.search(r"\d", question))
    banned |= {i for i in digits if i not in allowed} if has_digit else set(digits)
    return banned


SUBJECT_LED_TRIES = 3   # the last tries' replies open with the subject ("About 'X', which ..."; subject_lead)


def subject_lead(item: Any) -> str | None:
    """An opening that names ``item``'s subject as its question writes it (its quotes, a "the" before it):
    "Which poet wrote 'Leaves of Grass'?" -> "About 'Leaves of Grass',".  The last tries of
    :func:`generate_paraphrases` start the reply with it, then the question type's opener: the
    commonest failure left was a rewrite that drops or swaps the subject ("Which poem is the most
    widely read by the general public?").  ``None`` when no subject is found in the question."""
    import re

    question = getattr(item, "question", "") or ""
    subject = (subject_of(item) or "").strip()
    if not subject:
        return None
    m = re.search(r"(?:\bthe\s+)?['\"\u2018\u201c]?" + re.escape(subject) + r"['\"\u2019\u201d]?", question,
                  flags=re.IGNORECASE)
    if not m:
        return None
    span = m.group(0)
    core = span[4:] if span[:4].lower() == "the " else span
    if core is not span:
        span = "the " + core
    opening, closing = core[:1], core[-1:]
    if opening in "'\"\u2018\u201c" and closing not in "'\"\u2019\u201d":
        return None   # a quote opened and not closed: the subject is cut
    return f"About {span},"


def paraphrase_exemplars(item: Any, bank: Sequence[tuple[str, str]], k: int = PARAPHRASE_SHOTS,
                         order_key: int = 0, pool: int | None = None) -> list[tuple[str, str]]:
    """The ``k`` pairs of ``bank`` whose questions are worded most like ``item``'s (retrieved few-shot
    exemplars), the most similar LAST (nearest the question).  A small model copies the construction
    of its exemplars: five rewrites of questions of the same form ("Who wrote 'X'?" -> "Which writer
    is the author of 'X'?") teach it far better than five generic ones (measured in
    ``benchmarks/bench_paraphrases.py``).

    Similarity: Jaccard of the two questions' lower-case word sets (question words and stop words
    included: they are the form), plus 1 when the first two words agree (0.5 for the first only).
    Never used: the item's own question, and a pair holding a content token of the item's gold
    answer (a rewrite of a related question may name it: "Which play by Shakespeare ...?" beside
    "Who wrote 'Hamlet'?").  ``order_key`` > 0 (a regeneration) draws the ``k`` from the best
    ``pool`` (default 2k) by that key, so each try sees other exemplars."""
    import random

    question = getattr(item, "question", "") or ""
    own = _question_key(question)
    words = _frame_words(question)
    first = question.lower().split()[:2]
    scored = []
    for n, (q, p) in enumerate(bank):
        if _question_key(q) == own or answer_tokens_in(q + " " + p, item):
            continue
        w = _frame_words(q)
        sim = len(words & w) / max(1, len(words | w))
        head = q.lower().split()[:2]
        sim += 1.0 if head == first else 0.5 if head[:1] == first[:1] else 0.0
        scored.append((sim, -n, (q, p)))
    scored.sort(reverse=True)
    best = [pair for _, _, pair in scored[:pool or 2 * k]]
    if order_key:
        chosen = random.Random(order_key).sample(best, min(k, len(best)))
        chosen.sort(key=best.index)
    else:
        chosen = best[:k]
    return list(reversed(chosen))


def _answers(handle: ModelHandle, questions: Sequence[str], batch_size: int) -> list[str]:
    """The model's greedy answers to ``questions`` asked as the evaluation asks them."""
    from .generation import generate

    return generate(handle, [handle.prompt_ids(q) for q in questions], MEANING_TOKENS, batch_size)


def generate_paraphrases(handle: ModelHandle, items: Sequence[Any], seed: int = 0, on_event: EventCallback = ignore,
                         cancel: CancelToken | None = None, max_tries: int = PARAPHRASE_TRIES,
                         batch_size: int = BATCH_SIZE, max_new_tokens: int = 32,
                         failures: dict[str, dict] | None = None,
                         reword: bool = True, meaning: bool = True,
                         bank: Sequence[tuple[str, str]] | None = None,
                         sample_from: int | None = None,
                         ban_exemplar_names: bool = True,
                         ban_new_names: bool = True,
                         subject_led: int = SUBJECT_LED_TRIES) -> dict[str, tuple[str, str, bool | None]]:
    """item id -> (paraphrase, source, mentions_subject) for the items whose paraphrase passed
    :func:`paraphrase_verdict`; an item failing every one of ``max_tries`` tries is absent.

    Try k starts the reply with the question type's k-th opener (then a seeded pick) and shows
    other retrieved exemplars; the tries before ``sample_from`` are greedy, the later ones sample
    (another seed each).  ``reword`` (default): the words of :func:`reworded_words`
    cannot be generated (their first tokens are banned, :func:`banned_first_tokens`), so the model
    must say them differently; a small model asked to rewrite a question otherwise mostly copies it
    (the ``near-copy`` check; measured in ``benchmarks/bench_paraphrases.py``).  The subject, names and
    question words stay free.  ``meaning`` (default): for an item the model answers right when asked
    the original question (ROUGE-1 recall of the gold answer >= :data:`MEANING_R1`), a paraphrase that
    passed the text checks must get a right answer too, else it fails with the reason ``meaning``: a
    paraphrase that drifted ("In which country is the Taj Mahal?" -> "Which city is Taj Mahal?")
    asks something else, and one the unedited model cannot answer tests nothing about forgetting
    (the model is the unedited one: paraphrases are made before any edit).  ``bank``: the (question,
    paraphrase) pairs the prompt's exemplars are retrieved from (:func:`paraphrase_exemplars`;
    default :func:`paraphrase_bank`); an empty bank gives the fixed generic exemplars, rotated.
    ``ban_exemplar_names`` (default): the exemplars' own names cannot start a word
    (:func:`exemplar_name_tokens`).  ``ban_new_names`` (default): no name or number the question
    lacks can start a word (:func:`new_name_tokens`).  ``subject_led``: the last this many tries open the
    reply with the subject (:func:`subject_lead`) before the opener.  ``sample_from``: the first try that
    samples (default :data:`PARAPHRASE_SAMPLE_FROM`); the ones before are greedy, each with other exemplars and opener.
    ``failures``, when
    given, receives item id -> the verdict of the last try and every try's text (``{"verdict",
    "texts"}``) for the absent items.
    """
    from .generation import generate
    from .metrics import rouge1_recall

    spec = _SPECS["paraphrase"]
    bank = paraphrase_bank() if bank is None else tuple(bank)
    sample_from = PARAPHRASE_SAMPLE_FROM if sample_from is None else sample_from
    out: dict[str, tuple[str, str, bool | None]] = {}
    texts: dict[str, list[str]] = {}
    last: dict[str, dict] = {}
    pending = list(items)
    ban = {it.id: banned_first_tokens(handle, reworded_words(it)) for it in pending} if reword else {}
    names = {it.id: new_name_tokens(handle, it.question) for it in pending} if ban_new_names else {}
    knows: set[str] = set()      # items the model answers right as asked: their paraphrases must be too
    if meaning and pending:
        originals = _answers(handle, [it.question for it in pending], batch_size)
        knows = {it.id for it, a in zip(pending, originals) if rouge1_recall(it.answer, a) >= MEANING_R1}
    for attempt in range(max_tries):
        if not pending:
            break
        stage = "paraphrases" + (f" (try {attempt + 1})" if attempt else "")
        tracker = Tracker(on_event, cancel, stage, len(pending), detail=f"{len(pending)} questions")
        openers = []
        for it in pending:
            options = paraphrase_openers(it.question)
            # try k uses opener k (then a seeded pick), so every opener is tried once within the budget
            opener = (options[attempt] if attempt < len(options)
                      else options[_hash(seed, it.id, "opener", attempt) % len(options)])
            lead = subject_lead(it) if attempt >= max_tries - subject_led else None
            openers.append(f"{lead} {opener[:1].lower()}{opener[1:]}" if lead else opener)
        shots = [paraphrase_exemplars(it, bank, order_key=attempt and _hash(seed, it.id, "shots", attempt)) or None
                 for it in pending]
        prompts = [_prompt_ids(handle, spec, it.question, _hash(seed, it.id, "para", attempt), opener, sh)
                   for it, opener, sh in zip(pending, openers, shots)]
        banned = None
        if reword or ban_exemplar_names or ban_new_names:
            banned = [(ban[it.id] if reword else set()) |
                      (exemplar_name_tokens(handle, it, sh) if ban_exemplar_names and sh else set()) |
                      (names[it.id] if ban_new_names else set())
                      for it, sh in zip(pending, shots)]
            if not any(banned):
                banned = None
        gens = generate(handle, prompts, max_new_tokens, batch_size, on_batch=tracker.step,
                        sample=attempt >= sample_from, seed=seed * 1013 + attempt * 7919,
                        temperature=SAMPLE_TEMPERATURE,
                        banned=banned)
        still = []
        cleaned = [clean(opener + " " + raw.strip(), max_sentences=1) for opener, raw in zip(openers, gens)]
        verdicts = [paraphrase_verdict(text, it) for it, text in zip(pending, cleaned)]
        asked = [i for i, (it, v) in enumerate(zip(pending, verdicts)) if v["ok"] and it.id in knows]
        if asked:   # the meaning check: the unedited model still answers the paraphrase right
            answers = _answers(handle, [cleaned[i] for i in asked], batch_size)
            for i, a in zip(asked, answers):
                r1 = rouge1_recall(pending[i].answer, a)
                verdicts[i]["answer_r1"] = round(r1, 4)
                if r1 < MEANING_R1:
                    verdicts[i]["ok"] = False
                    verdicts[i]["reasons"] = [*verdicts[i]["reasons"], "meaning"]
        for it, text, v in zip(pending, cleaned, verdicts):
            texts.setdefault(it.id, []).append(text)
            if v["ok"]:
                out[it.id] = (text, "generated" if attempt == 0 else "regenerated", v["mentions_subject"])
            else:
                last[it.id] = v
                still.append(it)
        pending = still
    if failures is not None:
        for it in pending:
            failures[it.id] = {"verdict": last.get(it.id), "texts": texts.get(it.id, [])}
    return out


@dataclass
class ParaphraseReport:
    """What :func:`ensure_paraphrases_report` did.

    ``records``/``written`` as :func:`ensure_paraphrases`; ``left_out``: ids of the forget items that
    have no paraphrase because every generated one failed the checks (they are not in ``records`` and
    so not in the rephrase split); ``reasons``: id -> the failed checks of the last try;
    ``sources``: source -> how many records have it."""

    records: list[dict] = field(default_factory=list)
    written: list[dict] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)
    reasons: dict[str, list[str]] = field(default_factory=dict)
    tries: dict[str, list[str]] = field(default_factory=dict)   # id -> the text of every try (left-out items)
    sources: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"n": len(self.records) + len(self.left_out), "sources": dict(self.sources),
                "left_out": list(self.left_out), "reasons": {k: list(v) for k, v in self.reasons.items()}}


def paraphrases_to_generate(forget_items: Sequence[Any], stored: Sequence[Any] = (),
                            regenerate: bool = False) -> list[Any]:
    """The forget items :func:`ensure_paraphrases` would ask the model for (so a caller loads the model
    only when this is not empty)."""
    have = {p.id: p for p in stored}
    return [it for it in forget_items if _choose(it, have, regenerate) is None]


def _choose(item: Any, have: dict, regenerate: bool) -> tuple[str, str] | None:
    """(paraphrase, source) without the model, or ``None`` when the model must write it."""
    rec = have.get(item.id)
    redo = rec is not None and regenerate and rec.source in GENERATED_PARAPHRASE_SOURCES
    if rec is not None and not redo and rec.source != LEFT_OUT:
        return rec.question, rec.source
    if rec is None and item.paraphrased_question:
        return item.paraphrased_question, "dataset"
    text = builtin_paraphrase(item)
    if text:
        return text, "builtin"
    if rec is not None and not redo:       # left out before: every try failed; not asked again
        return "", LEFT_OUT
    return None


def ensure_paraphrases_report(handle: ModelHandle | Any, forget_items: Sequence[Any], stored: Sequence[Any] = (),
                              seed: int = 0, on_event: EventCallback = ignore, cancel: CancelToken | None = None,
                              regenerate: bool = False, max_tries: int = PARAPHRASE_TRIES) -> ParaphraseReport:
    """:func:`ensure_paraphrases` with its :class:`ParaphraseReport` (what was left out, and why).

    ``handle`` may be a zero-argument callable returning the model handle (``Workbench.load_model``):
    it is called only when some paraphrase must be generated."""
    have = {p.id: p for p in stored}
    todo = []
    chosen: dict[str, tuple[str, str]] = {}        # id -> (paraphrase, source)
    report = ParaphraseReport()
    kept_out = []                                  # left out by an earlier run (a stored LEFT_OUT record)
    for it in forget_items:
        pick = _choose(it, have, regenerate)
        if pick is None:
            todo.append(it)
        elif pick[1] == LEFT_OUT:
            kept_out.append(it.id)
        else:
            chosen[it.id] = pick
    if todo:
        if callable(handle) and not hasattr(handle, "tokenizer"):
            handle = handle()
        failures: dict[str, dict] = {}
        made = generate_paraphrases(handle, todo, int(seed or 0), on_event, cancel, max_tries=max_tries,
                                    failures=failures)
        for it in todo:
            if it.id in made:
                text, source, _ = made[it.id]
                chosen[it.id] = (text, source)
            else:
                report.left_out.append(it.id)
                v = (failures.get(it.id) or {}).get("verdict") or {}
                report.reasons[it.id] = list(v.get("reasons") or [])
                report.tries[it.id] = list((failures.get(it.id) or {}).get("texts") or [])
    report.records = [_paraphrase_record(it, *chosen[it.id]) for it in forget_items if it.id in chosen]
    # written: what the model wrote, a built-in one that replaces a stored one (``regenerate``), and a
    # LEFT_OUT record per item that failed every try now (so the caller's next run does not try again)
    new = {it.id for it in todo} | {i for i, (_, src) in chosen.items() if src == "builtin" and i in have}
    failed_now = list(report.left_out)
    report.written = [r for r in report.records if r["id"] in new] + [
        {"id": it.id, "question": it.question, "paraphrase": "", "source": LEFT_OUT, "mentions_subject": None}
        for it in forget_items if it.id in set(failed_now)]
    for i in kept_out:
        report.left_out.append(i)
        report.reasons[i] = [LEFT_OUT]
    for r in report.records:
        report.sources[r["source"]] = report.sources.get(r["source"], 0) + 1
    n_builtin = report.sources.get("builtin", 0)
    if todo or n_builtin or kept_out:
        before = f"; {len(kept_out)} of them in an earlier run, not tried again" if kept_out else ""
        on_event(Log(f"paraphrases: {n_builtin} from the built-in set, {len(todo) - len(failed_now)} "
                     f"written by the model, {len(report.left_out)} left out of the rephrase split "
                     f"(failed the checks in all {max_tries} tries{before})"
                     + (f": {', '.join(report.left_out[:10])}{' ...' if len(report.left_out) > 10 else ''}"
                        if report.left_out else ""), level="warning" if report.left_out else "info"))
    return report


def ensure_paraphrases(handle: ModelHandle | Any, forget_items: Sequence[Any], stored: Sequence[Any] = (),
                       seed: int = 0, on_event: EventCallback = ignore, cancel: CancelToken | None = None,
                       regenerate: bool = False) -> tuple[list[dict], list[dict]]:
    """A paraphrased question for every forget item that can get one: ``(records, written)``.

    ``stored`` are the paraphrases the caller keeps (objects with ``id``,
    ``question``, ``source``: a session's ``[[data.paraphrases]]``).  In order:

    * An item with a stored paraphrase keeps it, unless ``regenerate`` is set
      and its source is a generated one (``generated``/``regenerated``/
      ``template``; hand-written ``custom`` paraphrases are never replaced).
    * An item whose data already has a paraphrase keeps it (source ``dataset``).
    * An item whose question is in the built-in set (:func:`builtin_paraphrases`,
      our own paraphrases of the TOFU factual questions) gets that one when it
      passes the checks for the item (source ``builtin``; not in ``written``, the
      package holds it as the data file holds a ``dataset`` one, unless it
      replaces a stored generated one under ``regenerate``).
    * Every other item gets one written by the model (batched, seeded by
      ``seed``) and checked by :func:`paraphrase_verdict`; a failure is
      regenerated (another opener, sampling with another seed) up to
      :data:`PARAPHRASE_TRIES` tries in all.  An item failing every try gets no
      paraphrase: it is left out of the rephrase split
      (:func:`ensure_paraphrases_report` says which and why; a log line says
      how many).

    Nothing is changed in place: ``records`` has one record per forget item
    that has a paraphrase, ``{"id", "question", "paraphrase", "source",
    "mentions_subject"}``; ``written`` holds the records of the paraphrases
    the model wrote now, for the caller to store (so a replay reuses them).
    """
    report = ensure_paraphrases_report(handle, forget_items, stored, seed, on_event, cancel, regenerate)
    return report.records, report.written


def _paraphrase_record(item: Any, paraphrase: str, source: str) -> dict:
    return {"id": item.id, "question": item.question, "paraphrase": paraphrase, "source": source,
            "mentions_subject": mentions_subject(paraphrase, item)}


def paraphrase_records(forget_items: Sequence[Any], sources: dict[str, str] | None = None) -> list[dict]:
    """The ``"paraphrases"`` audit list of ``--out`` (items without a paraphrase are left out)."""
    sources = sources or {}
    return [_paraphrase_record(it, it.paraphrased_question, sources.get(it.id, "dataset"))
            for it in forget_items if it.paraphrased_question]


# --------------------------------------------------------------------------- audit and preview


def target_records(forget_items: Sequence[Any], targets: dict[str, Target]) -> list[dict]:
    """The ``"targets"`` audit list of ``--out``; ``leak``/``mentions_subject`` computed when unset."""
    out = []
    for it in forget_items:
        t = targets.get(it.id)
        if t is None:
            continue
        leak = leak_flag(t.text, it, t.leak)
        ment = t.mentions_subject if t.mentions_subject is not None else mentions_subject(t.text, it)
        out.append({"id": it.id, "question": it.question, "target": t.text, "source": t.source,
                    "leak": leak, "mentions_subject": ment})
    return out


def merge_preview(items: Sequence[Any], targets: dict[str, Target], merge_factor: int = 1,
                  subjects: dict[str, str] | None = None, handle: ModelHandle | None = None) -> list[dict]:
    """The exact edit requests query merging makes, as JSON-able dicts for the TUI.

    One dict per request: ``index``, ``item_ids``, ``questions``, ``prompt`` (the
    merged user text the edit uses), ``target`` (shared by the group),
    ``target_source``, ``subject``, ``dropped_targets`` (the other members'
    own targets, which merging replaces by the shared one) and, with a
    ``handle``, ``formatted_prompt`` (chat template applied).
    """
    reqs = build_requests(list(items), targets, merge_factor, subjects)
    out = []
    for i, r in enumerate(reqs):
        first = targets[r.item_ids[0]]
        row = {"index": i, "item_ids": list(r.item_ids), "questions": list(r.questions), "prompt": r.prompt,
               "target": r.target, "target_source": first.source, "subject": r.subject,
               "dropped_targets": {iid: targets[iid].text for iid in r.item_ids[1:]
                                   if targets[iid].text != r.target}}
        if handle is not None:
            row["formatted_prompt"] = handle.format_prompt(r.prompt)
        out.append(row)
    return out


__all__ = ["generate_targets", "generate_targets_report", "TargetReport", "ensure_paraphrases",
           "generate_paraphrases", "paraphrase_records", "target_records", "merge_preview", "target_verdict",
           "paraphrase_verdict", "clean", "prompt_text", "MAX_TRIES"]
