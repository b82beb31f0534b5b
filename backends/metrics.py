"""Batched evaluation of forget / retain / rephrase splits.

Per item:

* ``rouge1`` — ROUGE-1 recall of the gold answer against the model's greedy
  generation (rouge-score, Porter stemmer on).  This judges forgetting by what
  the model *generates*, not by teacher forcing.
* ``probability`` — ``P(a|q)^(1/|a|)``: exp of the mean log-probability of the
  gold answer tokens after the prompt (teacher forcing).
* ``mrr`` — mean over the gold answer tokens of ``1/rank`` of the gold token
  among the vocabulary logits at its teacher-forced position.
* ``top_hit`` — share of gold answer tokens ranked within ``top_k`` (100).
* ``truth_ratio`` — when perturbed (wrong) answers exist: the geometric mean of
  their length-normalised probabilities divided by the gold answer's
  (> 1 means the model prefers wrong answers).  Our earlier variant, kept
  under its name: it divides by the *gold* answer.
* ``tofu_ratio`` (per item, in ``extra``) and ``truth_ratio_tofu`` (per
  split) — TOFU's truth ratio as TOFU defines it: the same geometric mean over
  the *paraphrased* answer's probability when the data has one (TOFU's
  ``paraphrased_answer``; else the gold answer), aggregated per split as TOFU
  does: ``mean(min(R, 1/R))`` on forget-like splits (1 = the model cannot tell
  right from wrong), ``mean(max(0, 1 - R))`` on the others (high = prefers the
  right answer); see :mod:`backends.field_metrics`.

Teacher-forced numbers for gold and perturbed answers come from one batched
forward pass; generation is batched with left padding.  The composite score is
``1 - R1(forget) + R1(retain)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .events import CancelToken, EventCallback, ItemResult, Tracker, ignore
from .field_metrics import tofu_truth_ratio, truth_ratio_score
from .generation import answer_stats, generate
from .model import ModelHandle

SPLITS = ("forget", "retain", "rephrase")
FORGET_LIKE = ("forget", "rephrase", "mcq", "in_context")
"""Splits of forgotten facts: TOFU's truth-ratio aggregate is ``mean(min(R, 1/R))`` on these and
``mean(max(0, 1 - R))`` on the others (:func:`field_metrics.truth_ratio_score`)."""


def _paraphrased_answer(it: Any) -> str | None:
    """TOFU's ``paraphrased_answer`` column (kept in ``extra`` by the loader), when the item has one."""
    v = getattr(it, "extra", {}).get("paraphrased_answer") if isinstance(getattr(it, "extra", None), dict) else None
    return v if isinstance(v, str) and v.strip() else None
SUMMARY_KEYS = ("rouge1", "probability", "mrr", "top_hit")


@dataclass
class EvalSettings:
    max_new_tokens: int = 32
    batch_size: int = 16
    top_k: int = 100

    @classmethod
    def from_config(cls, cfg: Any) -> EvalSettings:
        if cfg is None:
            return cls()
        return cls(cfg.max_new_tokens, cfg.batch_size, cfg.top_k)


@dataclass
class ItemScore:
    id: str
    question: str
    answer: str
    generation: str
    rouge1: float
    probability: float
    mrr: float
    top_hit: float
    truth_ratio: float | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class SplitScores:
    name: str
    items: list[ItemScore] = field(default_factory=list)

    def mean(self, key: str) -> float | None:
        vals = [getattr(i, key) if hasattr(i, key) else i.extra.get(key) for i in self.items]
        vals = [v for v in vals if v is not None]
        return sum(vals) / len(vals) if vals else None

    @property
    def rouge1(self) -> float | None:
        return self.mean("rouge1")

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: self.mean(k) for k in SUMMARY_KEYS}
        tr = self.mean("truth_ratio")
        if tr is not None:
            out["truth_ratio"] = tr
        ratios = [i.extra["tofu_ratio"] for i in self.items if i.extra.get("tofu_ratio") is not None]
        if ratios:
            out["truth_ratio_tofu"] = truth_ratio_score(ratios, forget_like=self.name in FORGET_LIKE)
        extra_keys = sorted({k for i in self.items for k, v in i.extra.items() if isinstance(v, (int, float))})
        for k in extra_keys:
            out[k] = self.mean(k)
        out["n"] = len(self.items)
        return out


@dataclass
class EvalResult:
    splits: dict[str, SplitScores] = field(default_factory=dict)
    # ``[eval] extra`` blocks (backends.extras): name -> number or table, and the seconds each cost
    extra: dict[str, Any] = field(default_factory=dict)
    extra_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def composite(self) -> float | None:
        f = self.splits.get("forget")
        r = self.splits.get("retain")
        if f is None or f.rouge1 is None:
            return None
        return 1.0 - f.rouge1 + (r.rouge1 if r is not None and r.rouge1 is not None else 0.0)

    def summary(self) -> dict[str, Any]:
        return {name: s.summary() for name, s in self.splits.items()}

    def extras_json(self) -> dict[str, Any]:
        """The ``[eval] extra`` blocks under their own names, and ``extra_seconds`` (empty without extras)."""
        out: dict[str, Any] = dict(self.extra)
        if self.extra_seconds:
            out["extra_seconds"] = dict(self.extra_seconds)
        return out

    def items_json(self) -> dict[str, list[dict]]:
        return {name: [asdict(i) for i in s.items] for name, s in self.splits.items()}


def flat_extras(ev: EvalResult | None) -> dict[str, float | None]:
    """The numbers of the ``[eval] extra`` blocks as flat keys for tables: ``forget_quality``,
    ``model_utility``, ``perplexity``, ``mia.loss_auc`` … ``mia.privleak``, ``relearn.before`` /
    ``relearn.after`` (tables of numbers give ``name.key``; everything else is left out)."""
    out: dict[str, float | None] = {}
    if ev is None:
        return out
    for name, v in ev.extra.items():
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)) or v is None:
            out[name] = float(v) if v is not None else None
        elif isinstance(v, dict):
            for k, x in v.items():
                if isinstance(x, (int, float)) and not isinstance(x, bool):
                    out[f"{name}.{k}"] = float(x)
    return out


_SCORER = None


def rouge1_recall(gold: str, generation: str) -> float:
    """ROUGE-1 recall of ``gold`` in ``generation`` (stemmer on)."""
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
    return float(_SCORER.score(gold, generation)["rouge1"].recall)


def truth_ratio(gold_logprob: float, perturbed_logprobs: Sequence[float]) -> float | None:
    """Geometric mean of perturbed normalised probabilities over the gold one."""
    if not perturbed_logprobs:
        return None
    return math.exp(sum(perturbed_logprobs) / len(perturbed_logprobs) - gold_logprob)


def evaluate_split(handle: ModelHandle, name: str, items: Sequence[Any], settings: EvalSettings,
                   on_event: EventCallback = ignore, cancel: CancelToken | None = None,
                   targets: dict[str, str] | None = None) -> SplitScores:
    """Score one split: a generation pass and one teacher-forced pass.

    With ``targets`` (item id -> refusal target), each item also gets the
    refusal-quality scores (similarity to its target, refused, fluency); an
    item without a target (every retain item) still gets ``refused`` and
    ``fluency``, so the retain split reports the over-refusal rate.
    """
    from .refusal import quality as refusal_quality

    quality = refusal_quality if targets is not None else None
    prompts = [handle.prompt_ids(it.question) for it in items]
    # one teacher-forced pass for gold and perturbed answers of every item
    pairs: list[tuple[list[int], list[int]]] = []
    owners: list[tuple[int, bool]] = []  # (item index, is_gold)
    for i, it in enumerate(items):
        pairs.append((prompts[i], handle.encode_answer(it.answer)))
        owners.append((i, True))
        for wrong in getattr(it, "perturbed_answers", None) or []:
            pairs.append((prompts[i], handle.encode_answer(wrong)))
            owners.append((i, False))
        para = _paraphrased_answer(it)
        if para is not None and getattr(it, "perturbed_answers", None):   # TOFU's truth ratio compares with it
            pairs.append((prompts[i], handle.encode_answer(para)))
            owners.append((i, None))
    # progress counts sequences: teacher-forced pairs, then generations
    tracker = Tracker(on_event, cancel, f"evaluate {name}", len(pairs) + len(items), detail=f"{len(items)} items")
    stats = answer_stats(handle, pairs, settings.top_k, settings.batch_size, on_batch=tracker.step)
    gold = {}
    wrong: dict[int, list[float]] = {}
    para_lp: dict[int, float] = {}
    for (i, is_gold), st in zip(owners, stats):
        if is_gold is None:
            para_lp[i] = st.mean_logprob
        elif is_gold:
            gold[i] = st
        else:
            wrong.setdefault(i, []).append(st.mean_logprob)
    gens = generate(handle, prompts, settings.max_new_tokens, settings.batch_size, on_batch=tracker.step)
    out = SplitScores(name)
    for i, it in enumerate(items):
        st = gold[i]
        score = ItemScore(id=it.id, question=it.question, answer=it.answer, generation=gens[i],
                          rouge1=rouge1_recall(it.answer, gens[i]), probability=st.probability, mrr=st.mrr,
                          top_hit=st.top_hit, truth_ratio=truth_ratio(st.mean_logprob, wrong.get(i, [])))
        if wrong.get(i):
            score.extra["tofu_ratio"] = tofu_truth_ratio(para_lp.get(i, st.mean_logprob), wrong[i])
        if quality is not None:
            score.extra.update(quality(gens[i], targets.get(it.id)))
        for w in handle.wrappers:  # e.g. WISE reports which memory answered
            describe = getattr(w, "describe_query", None)
            if describe is not None:
                score.extra.update(describe(handle, it.question))
        out.items.append(score)
        on_event(ItemResult(name, it.id, gens[i], {"rouge1": score.rouge1, "probability": score.probability}))
    return out


def evaluate(handle: ModelHandle, splits: dict[str, Sequence[Any]], settings: EvalSettings | None = None,
             on_event: EventCallback = ignore, cancel: CancelToken | None = None,
             targets: dict[str, str] | None = None) -> EvalResult:
    """Evaluate every non-empty split in ``splits``.

    ``targets`` (item id -> target text) adds refusal-quality scores to the
    forget and rephrase splits, and ``refused`` / ``fluency`` to every other
    split (retain: the over-refusal rate).
    """
    settings = settings or EvalSettings()
    result = EvalResult()
    for name, items in splits.items():
        if items:
            split_targets = targets if name in ("forget", "rephrase") else {}
            result.splits[name] = evaluate_split(handle, name, items, settings, on_event, cancel,
                                                 split_targets if targets else None)
    return result
