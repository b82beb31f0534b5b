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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import UserError
from .events import CancelToken, EventCallback, Log, Tracker, ignore
from .leak import check_leak, differs, leak_flag, mentions_subject, subject_of
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
from .spec import GENERATED_MODES  # noqa: E402  (stated once, in the spec)


def _hash(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "big")


def _rotated(exemplars: Sequence, key: int) -> list:
    k = key % len(exemplars)
    return list(exemplars[k:]) + list(exemplars[:k])


def prompt_text(handle: ModelHandle, spec: _Spec, question: str, order_key: int = 0, prefill: str = "") -> str:
    """The full prompt text (instructions + exemplars + the question) for one item.

    ``prefill`` starts the model's reply (the paraphrase openers below).
    """
    shots = _rotated(spec.exemplars, order_key)
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


def _prompt_ids(handle: ModelHandle, spec: _Spec, question: str, order_key: int, prefill: str = "") -> list[int]:
    return handle.encode_prompt(prompt_text(handle, spec, question, order_key, prefill))


_LABELS = ("refusal:", "answer:", "wrong answer:", "rewritten question:", "question:", "assistant:", "a:")


def clean(text: str, max_sentences: int = 2) -> str:
    """The first line of a generation, without labels or quotes, at most ``max_sentences`` sentences."""
    import re

    lines = [ln.strip() for ln in (text or "").strip().splitlines() if ln.strip()]
    t = lines[0] if lines else ""
    changed = True
    while changed:
        changed = False
        for lab in _LABELS:
            if t.lower().startswith(lab):
                t, changed = t[len(lab):].strip(), True
    t = t.strip().strip('"').strip("\u201c\u201d").strip()
    parts = re.split(r"(?<=[.!?])\s+", t)
    t = " ".join(parts[:max_sentences]).strip()
    return t[:400].strip()


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

GENERATED_PARAPHRASE_SOURCES = ("generated", "regenerated", "template")
MIN_QUESTION_RECALL = 0.5   # share of the question's content words a paraphrase keeps (topic drift guard)

# A small model asked to rewrite a question mostly copies it.  The reply is
# therefore started with an opener that forces a different construction; the
# first try uses the first opener for the question's type, regenerations draw
# from all of them (seeded).
_OPENERS = (
    (("how", "many"), ("What is the number of", "Can you tell me how many")),
    (("how", "much"), ("What is the amount of", "Can you tell me how much")),
    (("what",), ("Which", "Can you tell me what", "Do you know what")),
    (("who",), ("Which person", "Can you tell me who", "Do you know who")),
    (("where",), ("In which place", "Can you tell me where")),
    (("when",), ("At what time", "Can you tell me when")),
    ((), ("Can you tell me", "Do you know", "I'd like to know")),
)


def paraphrase_openers(question: str) -> tuple[str, ...]:
    words = question.lower().split()
    for head, openers in _OPENERS:
        if tuple(words[:len(head)]) == head:
            return openers
    return _OPENERS[-1][1]


def paraphrase_verdict(text: str, item: Any) -> dict[str, Any]:
    """Checks of a generated paraphrase: differs from the question, keeps the subject and at least
    half of the question's content words, is not a refusal, and does not contain the answer."""
    from .leak import content_tokens

    ment = mentions_subject(text, item) if text else False
    q = content_tokens(item.question)
    have = set(content_tokens(text))
    kept = sum(1 for t in q if t in have) / len(q) if q else 1.0
    ok = bool(text) and len(text.split()) >= 3 and differs(text, item.question) and ment is not False \
        and kept >= MIN_QUESTION_RECALL and not is_refusal(text) and not check_leak(text, item)
    return {"ok": bool(ok), "mentions_subject": ment}


def generate_paraphrases(handle: ModelHandle, items: Sequence[Any], seed: int = 0, on_event: EventCallback = ignore,
                         cancel: CancelToken | None = None, max_tries: int = MAX_TRIES,
                         batch_size: int = BATCH_SIZE,
                         max_new_tokens: int = 32) -> dict[str, tuple[str, str, bool | None]]:
    """item id -> (paraphrase, source, mentions_subject); checked to differ and keep the subject."""
    from .generation import generate

    spec = _SPECS["paraphrase"]
    out: dict[str, tuple[str, str, bool | None]] = {}
    pending = list(items)
    for attempt in range(max_tries):
        if not pending:
            break
        stage = "paraphrases" + (f" (try {attempt + 1})" if attempt else "")
        tracker = Tracker(on_event, cancel, stage, len(pending), detail=f"{len(pending)} questions")
        openers = []
        for it in pending:
            options = paraphrase_openers(it.question)
            openers.append(options[0] if attempt == 0 else options[_hash(seed, it.id, "opener", attempt)
                                                                     % len(options)])
        prompts = [_prompt_ids(handle, spec, it.question, _hash(seed, it.id, "para", attempt), opener)
                   for it, opener in zip(pending, openers)]
        gens = generate(handle, prompts, max_new_tokens, batch_size, on_batch=tracker.step,
                        sample=attempt > 0, seed=seed * 1013 + attempt * 7919, temperature=SAMPLE_TEMPERATURE)
        still = []
        for it, opener, raw in zip(pending, openers, gens):
            text = clean(opener + " " + raw.strip(), max_sentences=1)
            v = paraphrase_verdict(text, it)
            if v["ok"]:
                out[it.id] = (text, "generated" if attempt == 0 else "regenerated", v["mentions_subject"])
            else:
                still.append(it)
        pending = still
    for it in pending:
        q = it.question.strip()
        text = PARAPHRASE_TEMPLATES[_hash(seed, it.id, "para-template") % len(PARAPHRASE_TEMPLATES)].format(
            question=q)
        out[it.id] = (text, "template", mentions_subject(text, it))
    return out


def ensure_paraphrases(handle: ModelHandle, forget_items: Sequence[Any], stored: Sequence[Any] = (), seed: int = 0,
                       on_event: EventCallback = ignore, cancel: CancelToken | None = None,
                       regenerate: bool = False) -> tuple[list[dict], list[dict]]:
    """A paraphrased question for every forget item: ``(records, written)``.

    ``stored`` are the paraphrases the caller keeps (objects with ``id``,
    ``question``, ``source``: a session's ``[[data.paraphrases]]``).

    * An item with a stored paraphrase keeps it, unless ``regenerate`` is set
      and its source is a generated one (``generated``/``regenerated``/
      ``template``; hand-written ``custom`` paraphrases are never replaced).
    * An item whose data already has a paraphrase keeps it (source ``dataset``:
      the data file holds it).
    * Every other item gets one generated by the model (batched, seeded by
      ``seed``), checked to differ from the question and to keep the subject,
      regenerated with sampling when a check fails and, failing that, a
      template rewrite (source ``template``).

    Nothing is changed in place: ``records`` has one record per forget item
    that has a paraphrase, ``{"id", "question", "paraphrase", "source",
    "mentions_subject"}``; ``written`` holds the records of the paraphrases
    written now, for the caller to store (so a replay reuses them).
    """
    have = {p.id: p for p in stored}
    todo = []
    chosen: dict[str, tuple[str, str]] = {}        # id -> (paraphrase, source)
    for it in forget_items:
        rec = have.get(it.id)
        if rec is not None and not (regenerate and rec.source in GENERATED_PARAPHRASE_SOURCES):
            chosen[it.id] = (rec.question, rec.source)
        elif rec is None and it.paraphrased_question:
            chosen[it.id] = (it.paraphrased_question, "dataset")
        else:
            todo.append(it)
    if todo:
        made = generate_paraphrases(handle, todo, int(seed or 0), on_event, cancel)
        for it in todo:
            text, source, _ = made[it.id]
            chosen[it.id] = (text, source)
        on_event(Log(f"paraphrases: generated {len(todo)} "
                     f"({sum(1 for it in todo if chosen[it.id][1] == 'template')} from a template)"))
    records = [_paraphrase_record(it, *chosen[it.id]) for it in forget_items if it.id in chosen]
    new = {it.id for it in todo}
    return records, [r for r in records if r["id"] in new]


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
