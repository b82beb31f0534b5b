"""Robustness attacks on an unlearned model: does the forgetting survive them?

Hossain & Kagal (2025) ask whether an edit that makes a model forget a fact
holds up when the question is asked differently or when the model is briefly
trained again.  Three attacks, each measured on the forget items:

Multiple choice (:func:`mcq_items`, :func:`evaluate_mcq`)
    The question becomes a multiple-choice question whose options are the
    gold answer and (up to ``max_options - 1``) perturbed answers, shuffled
    deterministically from ``(seed, item id)`` and labelled A, B, C, ...::

        {question}
        A. {option}
        B. {option}
        ...
        Answer with the letter of the correct option.

    A model that "forgot" an answer may still recognise it among wrong ones.
    :func:`evaluate_mcq` reads, from ONE teacher-forced forward pass per item
    (batched, right-padded), the logits of the option letters at the first
    answer position: ``probability`` is the gold letter's share of the softmax
    over the letters (chance level ``1 / n_options``, in ``extra["chance"]``),
    ``top_hit`` is 1 when the gold letter has the highest logit (ties count as
    a hit), ``mrr`` is ``1 / rank`` of the gold letter among the letters, and
    ``extra["picked"]`` is the letter the model prefers.  ``generation`` is
    the greedy answer; ``rouge1`` is the ROUGE-1 recall of the gold option
    text in it, or 1.0 when the answer starts with the gold letter (the letter
    alone, or followed by a non-alphanumeric character: "B", "B.", "B) ...").

    The letter tokens: each letter is encoded as an answer
    (``handle.encode_answer``); normally these are single, distinct tokens,
    read at the first answer position.  A tokenizer that starts every letter
    with the same token (a SentencePiece "▁" marker) has that shared prefix
    teacher-forced after the prompt and the letters read at the first position
    where their encodings differ.  Letters that never differ raise UserError.

In context (:func:`in_context_items`)
    Each question is preceded, inside the one user turn, by ``k`` unrelated
    question-answer pairs (demonstrations drawn deterministically from
    ``(seed, item id)``, never an attacked item)::

        Q: {demo question}
        A: {demo answer}

        ... (k times)
        Q: {question}
        A:

    The caller scores the returned items with ``metrics.evaluate_split``
    (split ``"in_context"``).

Relearning (:func:`relearn`)
    The forget items are split into a *train* part (the first
    ``ceil(fraction * n)`` in the given order, ids deduplicated; at least 1,
    at most ``n - 1``) and a *held* part (the rest).  The held part is
    evaluated (``metrics.evaluate_split``: greedy ROUGE-1 recall and the
    teacher-forced probability), the model is fine-tuned on the train part's
    question -> answer pairs, the held part is evaluated again, and the
    weights are put back.  If forgetting was shallow, relearning a few facts
    brings the held ones back (``after`` > ``before``).

    Training: every weight of the transformer blocks (``training.trainable_names``
    with scope "block": embeddings, final norm and unembedding stay fixed), the
    mean next-token NLL over the answer tokens (``finetune_first.examples``:
    the handle's prompt, then the answer and the stop token), AdamW (no weight
    decay, constant ``lr``), gradient clipping at 1.0, mini-batches shuffled by
    a generator seeded with ``seed`` and the global RNG forked, the model left
    in eval mode (no dropout).  Installed inference-time wrappers (WISE, GRACE
    hooks) stay installed: the attack trains the model as it is deployed; the
    wrappers' own state is not trained (each wrapper's state is set again
    before training, ``set_state(get_state())``, which drops caches it built
    under ``torch.inference_mode``, e.g. GRACE's stacked codebook, as those
    cannot take part in autograd).

    Restoration: everything runs inside :meth:`ModelHandle.transaction` over
    the trained weights, and the transaction is always rolled back (on
    success deliberately, by a private exception): the trained weights are
    restored bit for bit, the installed wrappers and their whole state are put
    back as they were at the start, on success, failure and cancel alike.  The
    model's train/eval mode, each parameter's ``requires_grad`` and ``grad``
    are restored as found.  The handle's fingerprint is never changed.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import UserError
from .events import CancelToken, Event, EventCallback, ItemResult, Log, Tracker, ignore

if TYPE_CHECKING:
    from .data import QAItem
    from .metrics import EvalSettings, SplitScores
    from .model import ModelHandle

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MCQ_INSTRUCTION = "Answer with the letter of the correct option."
MCQ_SPLIT = "mcq"
IN_CONTEXT_SPLIT = "in_context"
RELEARN_STAGE = "relearn"
RELEARN_SPLIT = "relearn_held"   # the split name of the held part's evaluations
MAX_GRAD_NORM = 1.0


# --------------------------------------------------------------------------- multiple choice


@dataclass
class MCQItem:
    """One multiple-choice question made from a QA item.

    ``question`` is the full text the model sees (question, options, instruction);
    ``answer`` the gold letter; ``gold_text`` the gold answer; ``options`` the
    option texts in display order, labelled by ``letters``.
    """

    id: str
    question: str
    answer: str
    gold_text: str
    options: list[str]
    letters: list[str]
    source_question: str = ""
    subject: str | None = None
    extra: dict = field(default_factory=dict)


class MCQItems(list):
    """The list :func:`mcq_items` returns; ``skipped`` holds the ids of items without perturbed answers."""

    def __init__(self, items: Sequence[MCQItem] = (), skipped: Sequence[str] = ()) -> None:
        super().__init__(items)
        self.skipped: list[str] = list(skipped)


def _norm(text: str) -> str:
    return " ".join(str(text).split()).casefold()


def mcq_text(question: str, options: Sequence[str], letters: Sequence[str]) -> str:
    """The multiple-choice prompt: the question, one ``"X. option"`` line per option, the instruction."""
    lines = [question.strip()]
    lines += [f"{letter}. {opt}" for letter, opt in zip(letters, options)]
    lines.append(MCQ_INSTRUCTION)
    return "\n".join(lines)


def mcq_items(items: Sequence[Any], seed: int = 0, max_options: int = 4) -> MCQItems:
    """Multiple-choice versions of ``items`` (see the module doc).

    Options: the gold answer plus the first ``max_options - 1`` distinct
    perturbed answers (those equal to the gold answer, ignoring case and
    spacing, are dropped), shuffled by ``random.Random(f"{seed}:{id}")``.
    Items left without a wrong option are skipped; the result (a list) has
    their ids in ``.skipped``.
    """
    if not 2 <= max_options <= len(LETTERS):
        raise UserError(f"max_options must be between 2 and {len(LETTERS)}, got {max_options}", "attacks.mcq")
    out: list[MCQItem] = []
    skipped: list[str] = []
    for it in items:
        gold = str(it.answer)
        seen = {_norm(gold)}
        wrong: list[str] = []
        for w in getattr(it, "perturbed_answers", None) or []:
            key = _norm(w)
            if not key or key in seen:
                continue
            seen.add(key)
            wrong.append(str(w))
            if len(wrong) >= max_options - 1:
                break
        if not wrong:
            skipped.append(str(it.id))
            continue
        options = [gold, *wrong]
        random.Random(f"{seed}:{it.id}").shuffle(options)
        letters = list(LETTERS[:len(options)])
        gold_letter = letters[options.index(gold)]
        out.append(MCQItem(id=str(it.id), question=mcq_text(it.question, options, letters), answer=gold_letter,
                           gold_text=gold, options=options, letters=letters, source_question=it.question,
                           subject=getattr(it, "subject", None)))
    return MCQItems(out, skipped)


def letter_tokens(handle: ModelHandle, letters: Sequence[str]) -> tuple[list[int], list[int]]:
    """(shared prefix to teacher-force, one distinct token per letter) for reading the letters' logits.

    Normally the prefix is empty and the tokens are ``encode_answer(letter)[0]``;
    see the module doc for the fallback.  UserError when the letters cannot
    be told apart by one token.
    """
    codes = [handle.encode_answer(letter) for letter in letters]
    k = 0
    while all(len(c) > k for c in codes) and len({c[k] for c in codes}) == 1:
        k += 1
    toks = [c[k] if len(c) > k else None for c in codes]
    if any(t is None for t in toks) or len(set(toks)) != len(toks):
        raise UserError(f"the tokenizer does not give the option letters {', '.join(letters)} distinct tokens; "
                        "the multiple-choice attack cannot read them", "attacks.mcq")
    return list(codes[0][:k]), [int(t) for t in toks]  # type: ignore[arg-type]


def starts_with_letter(generation: str, letter: str) -> bool:
    """Whether an answer begins with ``letter`` on its own ("B", "B.", "B) x"; not "Bob")."""
    text = generation.lstrip()
    if not text.startswith(letter):
        return False
    rest = text[len(letter):]
    return not rest or not rest[0].isalnum()


def _letter_logits(handle: ModelHandle, rows: Sequence[list[int]], batch_size: int, tracker: Tracker):
    """The logits at the last position of each row, ``[n, vocab]`` float32 on the CPU (one forward per batch).

    Rows are right-padded (causal attention: padding after a position cannot
    change it) and, like :func:`generation.plain_answer_stats`, only the
    gathered positions are unembedded (the final norm's output is captured by a
    hook; the model itself is called, so wrappers' hooks see the call).
    """
    import torch

    from .batching import pad_right
    from .generation import _forward_kwargs

    model, adapter = handle.model, handle.adapter
    pad = handle.tokenizer.pad_token_id
    out: list[Any] = [None] * len(rows)
    extra = _forward_kwargs(model)
    captured: list = []
    hook = adapter.final_norm().register_forward_hook(lambda _m, _a, o: captured.append(o))
    size = max(1, batch_size)
    try:
        for start in range(0, len(rows), size):
            idx = list(range(start, min(len(rows), start + size)))
            ids, mask = pad_right([rows[i] for i in idx], pad, device=handle.input_device)
            cols = [len(rows[i]) - 1 for i in idx]
            captured.clear()
            with torch.inference_mode():
                res = model(input_ids=ids, attention_mask=mask, use_cache=False, **extra)
                if captured:
                    hidden = captured[-1]
                    hidden = hidden[0] if isinstance(hidden, tuple) else hidden
                    dev = hidden.device
                    r_t = torch.arange(len(idx), device=dev)
                    c_t = torch.tensor(cols, dtype=torch.long, device=dev)
                    lg = adapter.unembed_logits(hidden[r_t, c_t]).float()
                else:  # no final-norm output seen: the model's full logits
                    full = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                    dev = full.device
                    lg = full[torch.arange(len(idx), device=dev), torch.tensor(cols, device=dev)].float()
                del res
                lg = lg.cpu()
            for r, i in enumerate(idx):
                out[i] = lg[r]
            tracker.step(len(idx))
    finally:
        hook.remove()
    return out


def evaluate_mcq(handle: ModelHandle, items: Sequence[MCQItem], settings: EvalSettings,
                 on_event: EventCallback = ignore, cancel: CancelToken | None = None) -> SplitScores:
    """Score multiple-choice items (split ``"mcq"``; the scores of the module doc)."""
    import torch

    from .generation import generate
    from .metrics import ItemScore, SplitScores, rouge1_recall

    prompts = [handle.prompt_ids(it.question) for it in items]
    tokens: dict[tuple[str, ...], tuple[list[int], list[int]]] = {}
    rows = []
    for it, p in zip(items, prompts):
        key = tuple(it.letters)
        if key not in tokens:
            tokens[key] = letter_tokens(handle, it.letters)
        rows.append(list(p) + tokens[key][0])
    tracker = Tracker(on_event, cancel, f"evaluate {MCQ_SPLIT}", 2 * len(items), detail=f"{len(items)} items")
    logits = _letter_logits(handle, rows, settings.batch_size, tracker)
    gens = generate(handle, prompts, settings.max_new_tokens, settings.batch_size, on_batch=tracker.step)
    out = SplitScores(MCQ_SPLIT)
    for it, lg, gen in zip(items, logits, gens):
        ids = torch.tensor(tokens[tuple(it.letters)][1], dtype=torch.long)
        sub = lg[ids]
        gi = it.letters.index(it.answer)
        prob = float(torch.softmax(sub, dim=0)[gi])
        rank = int((sub > sub[gi]).sum()) + 1
        picked = it.answer if rank == 1 else it.letters[int(torch.argmax(sub))]
        r1 = rouge1_recall(it.gold_text, gen)
        if starts_with_letter(gen, it.answer):
            r1 = 1.0
        score = ItemScore(id=it.id, question=it.question, answer=it.answer, generation=gen, rouge1=r1,
                          probability=prob, mrr=1.0 / rank, top_hit=1.0 if rank == 1 else 0.0,
                          extra={"picked": picked, "chance": 1.0 / len(it.letters)})
        out.items.append(score)
        on_event(ItemResult(MCQ_SPLIT, it.id, gen, {"rouge1": score.rouge1, "probability": score.probability}))
    return out


# --------------------------------------------------------------------------- in context


def in_context_text(demos: Sequence[Any], question: str) -> str:
    """``"Q: …\\nA: …\\n\\n"`` per demonstration, then ``"Q: {question}\\nA:"``."""
    parts = [f"Q: {d.question.strip()}\nA: {str(d.answer).strip()}\n\n" for d in demos]
    return "".join(parts) + f"Q: {question.strip()}\nA:"


def in_context_items(items: Sequence[Any], demos: Sequence[Any], k: int = 3, seed: int = 0) -> list[QAItem]:
    """``items`` with ``k`` demonstrations before each question (see the module doc).

    Demonstrations come from ``demos`` minus every id in ``items`` (ids
    deduplicated, the pool ordered by id so the order of ``demos`` does not
    matter), sampled without replacement by ``random.Random(f"{seed}:{id}")``.
    The items keep id, answer, perturbed answers and subject;
    ``extra["in_context"]`` lists the demonstrations' ids; no paraphrase.
    UserError when fewer than ``k`` demonstrations are available.
    """
    from .data import QAItem

    if k < 0:
        raise UserError(f"k must be 0 or more, got {k}", "attacks.in_context")
    attacked = {str(it.id) for it in items}
    pool_by_id: dict[str, Any] = {}
    for d in demos:
        if str(d.id) not in attacked:
            pool_by_id.setdefault(str(d.id), d)
    pool = [pool_by_id[i] for i in sorted(pool_by_id)]
    if items and len(pool) < k:
        raise UserError(f"the in-context attack needs {k} demonstration items outside the attacked ones, "
                        f"only {len(pool)} are available", "attacks.in_context")
    out: list[QAItem] = []
    for it in items:
        chosen = random.Random(f"{seed}:{it.id}").sample(pool, k)
        out.append(QAItem(id=str(it.id), question=in_context_text(chosen, it.question), answer=it.answer,
                          paraphrased_question=None,
                          perturbed_answers=list(getattr(it, "perturbed_answers", None) or []),
                          subject=getattr(it, "subject", None),
                          extra={**(getattr(it, "extra", None) or {}), "in_context": [str(d.id) for d in chosen]}))
    return out


# --------------------------------------------------------------------------- relearning


class _Rollback(Exception):
    """Raised at the end of a successful relearning run so the transaction restores everything."""


def relearn_split(items: Sequence[Any], fraction: float = 0.5) -> tuple[list[Any], list[Any]]:
    """(train, held): the first ``ceil(fraction * n)`` items (at least 1, at most n - 1) and the rest.

    Items keep their order; a repeated id is used once (its first item).
    UserError with fewer than 2 distinct items or a fraction outside (0, 1).
    """
    if not 0.0 < fraction < 1.0:
        raise UserError(f"fraction must be between 0 and 1 (exclusive), got {fraction}", "attacks.relearn")
    seen: dict[str, Any] = {}
    for it in items:
        seen.setdefault(str(it.id), it)
    uniq = list(seen.values())
    n = len(uniq)
    if n < 2:
        raise UserError(f"the relearning attack needs at least 2 forget items (one to train on, one to test), "
                        f"got {n}", "attacks.relearn")
    n_train = min(n - 1, max(1, math.ceil(fraction * n)))
    return uniq[:n_train], uniq[n_train:]


def relearn_names(handle: ModelHandle) -> list[str]:
    """The weights relearning trains: every parameter of the transformer blocks."""
    from . import training

    return training.trainable_names(handle, list(range(handle.adapter.n_layers)), "block")


def _mean_nll(handle: ModelHandle, exs: Sequence[Any], batch_size: int) -> float:
    """Mean next-token NLL over all answer tokens of ``exs`` (no grad)."""
    import torch

    from . import training

    pad = handle.tokenizer.pad_token_id
    total, count = 0.0, 0
    size = max(1, batch_size)
    with torch.no_grad():
        for s in range(0, len(exs), size):
            p = training.pack(exs[s:s + size], pad, handle.input_device)
            lp = training.token_logprobs(training.completion_logits(handle.model, p), p)
            total += float(-lp.sum())
            count += int(lp.numel())
    return total / max(1, count)


def _refresh_wrappers(handle: ModelHandle) -> None:
    """Have every stateful wrapper set its own state again, dropping what it derived from it.

    A wrapper may cache tensors built during an evaluation under
    ``torch.inference_mode`` (GRACE's stacked codebook); such tensors cannot
    take part in autograd, so training through the wrapper would fail.
    ``set_state(get_state())`` installs the same entries and drops the caches.
    """
    for w in handle.wrappers:
        get, put = getattr(w, "get_state", None), getattr(w, "set_state", None)
        if get is not None and put is not None:
            put(get())


def _no_item_results(on_event: EventCallback) -> EventCallback:
    """Forward progress and logs of the held-part evaluations, not their per-item results."""

    def forward(event: Event) -> None:
        if not isinstance(event, ItemResult):
            on_event(event)

    return forward


def relearn(handle: ModelHandle, items: Sequence[Any], settings: EvalSettings, fraction: float = 0.5,
            epochs: int = 2, lr: float = 2e-4, batch_size: int = 4, seed: int = 0,
            on_event: EventCallback = ignore, cancel: CancelToken | None = None) -> dict[str, Any]:
    """The relearning attack of the module doc; the model is left exactly as it was.

    Returns ``{"before", "after"}`` (mean ROUGE-1 recall on the held part),
    ``"before_probability"``, ``"after_probability"`` (mean teacher-forced
    probability there), ``"train_ids"``, ``"held_ids"``, ``"steps"``,
    ``"epochs"``, ``"lr"``, ``"seconds"``, ``"train_loss"`` ([first, last]
    mini-batch loss) and ``"train_nll"`` ([before, after]: mean answer-token
    NLL of the whole train part before and after training).  Progress: one
    Tracker, stage ``"relearn"``, counting the two evaluations and every step;
    the cancel token is checked at each.  Raises UserError (fewer than 2
    items, bad settings), Cancelled or the failure, always after restoring.
    """
    import torch

    from . import finetune_first, training
    from .errors import NonFiniteError
    from .metrics import evaluate_split

    if epochs < 1:
        raise UserError(f"epochs must be 1 or more, got {epochs}", "attacks.relearn")
    if not lr > 0:
        raise UserError(f"lr must be positive, got {lr}", "attacks.relearn")
    if batch_size < 1:
        raise UserError(f"batch_size must be 1 or more, got {batch_size}", "attacks.relearn")
    train_items, held = relearn_split(items, fraction)
    cancel = cancel or CancelToken()
    exs = finetune_first.examples(handle, train_items)
    names = relearn_names(handle)
    model = handle.model
    device = handle.input_device
    pad = handle.tokenizer.pad_token_id
    per_epoch = math.ceil(len(exs) / batch_size)
    total_steps = per_epoch * epochs
    eval_events = _no_item_results(on_event)
    result: dict[str, Any] = {"train_ids": [str(it.id) for it in train_items], "held_ids": [str(it.id) for it in held],
                              "steps": 0, "epochs": epochs, "lr": float(lr)}
    was_training = model.training
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    t0 = time.perf_counter()
    tracker = Tracker(on_event, cancel, RELEARN_STAGE, total_steps + 2,
                      detail=f"train on {len(train_items)}, test on {len(held)} forget items; {epochs} epochs, "
                             f"lr {lr:g}")
    try:
        with handle.transaction(names):
            model.eval()
            before = evaluate_split(handle, RELEARN_SPLIT, held, settings, eval_events, cancel)
            result["before"] = float(before.rouge1 or 0.0)
            result["before_probability"] = float(before.mean("probability") or 0.0)
            tracker.step(detail=f"held part before: ROUGE-1 {result['before']:.3f}")
            params = [handle.parameter(n) for n in names]
            train_set = set(names)
            every = list(model.named_parameters())
            grads = {n: p.grad for n, p in every}
            _refresh_wrappers(handle)
            nll_before = _mean_nll(handle, exs, batch_size)
            losses: list[float] = []
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
            gen = torch.Generator().manual_seed(int(seed))
            try:
                for n, p in every:   # only the trained weights collect gradients
                    p.requires_grad_(n in train_set)
                    p.grad = None
                with training.seeded(int(seed)), torch.enable_grad():
                    step = 0
                    for epoch in range(1, epochs + 1):
                        order = torch.randperm(len(exs), generator=gen).tolist()
                        for b in range(per_epoch):
                            batch = training.pack([exs[i] for i in order[b * batch_size:(b + 1) * batch_size]],
                                                  pad, device)
                            loss = -training.token_logprobs(training.completion_logits(model, batch), batch).mean()
                            lv = float(loss.detach())
                            if not math.isfinite(lv):
                                raise NonFiniteError(f"relearn: the loss became {lv} at step {step + 1}; the "
                                                     "weights were restored (lower lr)")
                            opt.zero_grad(set_to_none=True)
                            loss.backward()
                            gn = float(torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM))
                            if not math.isfinite(gn):
                                raise NonFiniteError(f"relearn: a gradient became non-finite at step {step + 1}; "
                                                     "the weights were restored (lower lr)")
                            opt.step()
                            step += 1
                            losses.append(lv)
                            result["steps"] = step
                            tracker.step(loss=lv, detail=f"epoch {epoch}/{epochs} step {step}/{total_steps} "
                                                         f"loss {lv:.3g}")
            finally:
                for n, p in every:
                    p.requires_grad_(flags[n])
                    p.grad = grads[n]
                del opt
            result["train_loss"] = [losses[0], losses[-1]] if losses else []
            result["train_nll"] = [nll_before, _mean_nll(handle, exs, batch_size)]
            after = evaluate_split(handle, RELEARN_SPLIT, held, settings, eval_events, cancel)
            result["after"] = float(after.rouge1 or 0.0)
            result["after_probability"] = float(after.mean("probability") or 0.0)
            tracker.step(detail=f"held part after: ROUGE-1 {result['after']:.3f}")
            raise _Rollback
    except _Rollback:
        pass
    finally:
        model.train(was_training)
    result["seconds"] = time.perf_counter() - t0
    on_event(Log(f"relearn: trained {result['steps']} steps on {len(train_items)} forget items; held-out ROUGE-1 "
                 f"{result['before']:.3f} -> {result['after']:.3f} (weights restored)"))
    return result


__all__ = ["MCQItem", "MCQItems", "mcq_items", "mcq_text", "evaluate_mcq", "letter_tokens", "starts_with_letter",
           "in_context_items", "in_context_text", "relearn", "relearn_split", "relearn_names", "LETTERS",
           "MCQ_INSTRUCTION", "MCQ_SPLIT", "IN_CONTEXT_SPLIT", "RELEARN_STAGE", "RELEARN_SPLIT"]
