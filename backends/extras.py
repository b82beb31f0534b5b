"""The unlearning field's opt-in metrics and attacks (``[eval] extra``), computed beside an evaluation.

Each name of :data:`backends.spec.EVAL_EXTRAS` is one block of results, under
exactly that name in the baseline and in every run (``replay --out``, the
sweep's ``results.jsonl``):

``mia``
    ``{"loss_auc", "zlib_auc", "mink_auc", "minkpp_auc", "privleak"}``: the
    ROC AUC of LOSS, zlib, Min-K% and Min-K%++ membership scores of the forget
    items (members) against the *holdout* items (non-members: data items the
    session neither forgets nor retains, ``[eval] holdout``), and MUSE's
    PrivLeak, the Min-K% AUC relative to the retain-only model's (see
    :mod:`backends.field_metrics` for every formula); the per-item scores
    behind them in ``mia_items``.
``forget_quality``
    TOFU's forget quality: the p-value of the two-sample KS test between the
    forget items' truth ratios under this model and under the *retain-only*
    model.  Beside it ``forget_quality_ks`` (the statistic) and
    ``truth_ratio_tofu`` (TOFU's aggregate of the forget items' ratios).
``model_utility``
    TOFU's model utility: the harmonic mean of probability, ROUGE-L recall and
    truth-ratio score on the retain split and on the TOFU real-authors and
    world-facts sets (``[eval] utility_data``; by default those files in the
    shared data folder; the sets found are listed in ``model_utility_parts``).
``perplexity``
    Perplexity of a held text (``[eval] perplexity_text``, else the built-in
    text we wrote, :func:`backends.mia.heldout_text`).
``relearn``
    ``{"before", "after", ...}``: the relearning attack
    (:func:`backends.attacks.relearn`): fine-tune on half the forget items and
    measure ROUGE-1 on the other half before and after; the weights are
    restored exactly afterwards.
``mcq`` / ``in_context``
    Attack *splits* beside forget / retain / rephrase: each forget question as
    a multiple choice (gold among its perturbed answers) and preceded by a few
    unrelated question–answer pairs (:mod:`backends.attacks`).

The retain-only model (forget quality, PrivLeak) exists only in the
fine-tuned-knowledge setting: the base model fine-tuned by ``[finetune]`` on
its training items *minus* the forget items (cached like any fine-tune).
Without ``[finetune]`` those two numbers are ``null`` and a log line says why.
Data without perturbed answers (PISTOL) gets answers of other items with the
same question template (:mod:`backends.perturb`), and the results say how many
were derived.  ``extra_seconds`` gives what each block cost.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .events import CancelToken, EventCallback, Log, Tracker, ignore
from .metrics import EvalResult, EvalSettings
from .model import ModelHandle

MIA_KEYS = ("loss_auc", "zlib_auc", "mink_auc", "minkpp_auc")
NEEDS_PERTURBED = ("forget_quality", "model_utility", "mcq")
UTILITY_FILES = {"real_authors": "tofu/real_authors_perturbed.json", "world_facts": "tofu/world_facts_perturbed.json"}
IN_CONTEXT_K = 3


@dataclass
class Reference:
    """The retain-only model's numbers that forget quality and PrivLeak compare against."""

    ratios: list[float]
    mia: dict[str, float | None]
    finetune: dict
    seconds: float


@dataclass
class Inputs:
    """Everything the extras need besides the model (built once per selection by the workbench)."""

    forget: list                     # forget items, perturbed answers derived where missing
    retain: list                     # retain items, likewise
    holdout: list                    # non-members for the MIA
    utility: dict[str, list] = field(default_factory=dict)   # set name -> items (model utility)
    text: str = ""                   # held text for perplexity
    demos: list = field(default_factory=list)   # unrelated QA pairs for the in-context attack
    reference: Reference | None = None
    reference_why: str = ""          # why there is no reference (forget quality / PrivLeak are null)
    seed: int = 0
    relearn_epochs: int = 2
    relearn_lr: float = 2e-4
    derived: int = 0                 # items whose perturbed answers were derived


def reference_answer(it: Any) -> str:
    """The answer TOFU's truth ratio compares perturbed answers with: the paraphrased answer when the
    data has one (TOFU's ``paraphrased_answer`` column), else the gold answer."""
    para = getattr(it, "extra", {}).get("paraphrased_answer")
    return para if isinstance(para, str) and para.strip() else it.answer


def _tf(handle: ModelHandle, items: Sequence[Any], settings: EvalSettings, tracker: Tracker | None = None,
        reference: bool = True) -> list[tuple[float, list[float]]]:
    """Per item: (mean log-prob of its reference (or gold) answer, mean log-probs of its perturbed answers)."""
    from .generation import answer_stats

    pairs, owners = [], []
    for i, it in enumerate(items):
        prompt = handle.prompt_ids(it.question)
        pairs.append((prompt, handle.encode_answer(reference_answer(it) if reference else it.answer)))
        owners.append((i, True))
        for wrong in it.perturbed_answers:
            pairs.append((prompt, handle.encode_answer(wrong)))
            owners.append((i, False))
    stats = answer_stats(handle, pairs, settings.top_k, settings.batch_size,
                         on_batch=tracker.step if tracker is not None else None)
    out: list[tuple[float, list[float]]] = [(0.0, []) for _ in items]
    for (i, gold), st in zip(owners, stats):
        if gold:
            out[i] = (st.mean_logprob, out[i][1])
        else:
            out[i][1].append(st.mean_logprob)
    return out


def truth_ratios(handle: ModelHandle, items: Sequence[Any], settings: EvalSettings,
                 tracker: Tracker | None = None) -> list:
    """TOFU's ratio R per item with perturbed answers (see :func:`field_metrics.tofu_truth_ratio`)."""
    from .field_metrics import tofu_truth_ratio

    with_pert = [it for it in items if it.perturbed_answers]
    return [tofu_truth_ratio(lp, wrong) for lp, wrong in _tf(handle, with_pert, settings, tracker)]


def mia_aucs(handle: ModelHandle, members: Sequence[Any], nonmembers: Sequence[Any], settings: EvalSettings,
             tracker: Tracker | None = None, items: dict | None = None) -> dict[str, float | None]:
    """The four membership AUCs of ``members`` against ``nonmembers``; ``items``, when given, receives
    the per-item scores (``{"forget": [{"id", "loss", "zlib", "mink", "minkpp"}, ...], "holdout": [...]}``)."""
    from . import field_metrics, mia

    on_batch = tracker.step if tracker is not None else None
    m = mia.item_scores(handle, members, settings.batch_size, on_batch=on_batch)
    n = mia.item_scores(handle, nonmembers, settings.batch_size, on_batch=on_batch)
    if items is not None:
        items["forget"] = [{"id": it.id, **sc} for it, sc in zip(members, m)]
        items["holdout"] = [{"id": it.id, **sc} for it, sc in zip(nonmembers, n)]
    return dict(field_metrics.mia_aucs(m, n))


def build_reference(handle: ModelHandle, inp: Inputs, settings: EvalSettings, finetune: dict,
                    on_event: EventCallback = ignore, cancel: CancelToken | None = None) -> Reference:
    """The retain-only model's truth ratios on the forget items and its MIA AUCs (``handle`` is that model)."""
    t0 = time.perf_counter()
    n_pert = sum(1 + len(it.perturbed_answers) for it in inp.forget if it.perturbed_answers)
    tracker = Tracker(on_event, cancel, "extras: retain-only model", n_pert + len(inp.forget) + len(inp.holdout),
                      detail="truth ratios and membership scores")
    ratios = [r for r in truth_ratios(handle, inp.forget, settings, tracker) if r is not None]
    aucs = mia_aucs(handle, inp.forget, inp.holdout, settings, tracker) if inp.holdout else dict.fromkeys(MIA_KEYS)
    return Reference(ratios, aucs, finetune, time.perf_counter() - t0)


def _finite(v: Any) -> Any:
    return v if isinstance(v, (int, float)) and math.isfinite(v) else None


def compute(handle: ModelHandle, wanted: Sequence[str], inp: Inputs, settings: EvalSettings, base: EvalResult,
            on_event: EventCallback = ignore, cancel: CancelToken | None = None) -> None:
    """Add the ``wanted`` extras to ``base`` (an evaluation of ``handle`` on the session's splits) in place:
    blocks into ``base.extra``, attack splits into ``base.splits``, costs into ``base.extra_seconds``."""
    from . import field_metrics

    cancel = cancel or CancelToken()
    out = base.extra
    seconds = base.extra_seconds
    if inp.derived and any(w in NEEDS_PERTURBED for w in wanted):
        out["perturbed_derived"] = inp.derived
    for name in wanted:
        t0 = time.perf_counter()
        if name == "mia":
            block: dict[str, Any] = dict.fromkeys(MIA_KEYS)
            if inp.holdout:
                tr = Tracker(on_event, cancel, "extras: membership inference", len(inp.forget) + len(inp.holdout),
                             detail=f"{len(inp.forget)} forget vs {len(inp.holdout)} holdout")
                per_item: dict = {}
                block.update(mia_aucs(handle, inp.forget, inp.holdout, settings, tr, per_item))
                out["mia_items"] = per_item     # per item: the scores behind the AUCs
            else:
                on_event(Log("extras: no holdout items (every data item is selected or trained on): "
                             "membership inference is null", "warning"))
            ref = inp.reference.mia.get(field_metrics.PRIVLEAK_SCORE) if inp.reference is not None else None
            mine = block.get(field_metrics.PRIVLEAK_SCORE)
            block["privleak"] = field_metrics.privleak(mine, ref)
            block["holdout"] = len(inp.holdout)
            out["mia"] = block
        elif name == "forget_quality":
            n = sum(1 + len(it.perturbed_answers) for it in inp.forget if it.perturbed_answers)
            tr = Tracker(on_event, cancel, "extras: forget quality", max(1, n), detail="truth ratios")
            ratios = [r for r in truth_ratios(handle, inp.forget, settings, tr) if r is not None]
            out["truth_ratio_tofu"] = field_metrics.truth_ratio_score(ratios, forget_like=True)
            if inp.reference is not None and ratios and inp.reference.ratios:
                fq = field_metrics.forget_quality(ratios, inp.reference.ratios)
                out["forget_quality"] = _finite(fq["pvalue"])
                out["forget_quality_ks"] = _finite(fq["statistic"])
            else:
                out["forget_quality"] = None
                out["forget_quality_ks"] = None
                on_event(Log(f"extras: forget_quality is null ({inp.reference_why or 'no truth ratios'})",
                             "warning"))
        elif name == "model_utility":
            parts = model_utility_parts(handle, inp, settings, base, on_event, cancel)
            nums = [v for p in parts.values() for v in p.values() if isinstance(v, (int, float))]
            out["model_utility"] = _finite(field_metrics.model_utility(parts)) if nums else None
            out["model_utility_parts"] = parts
        elif name == "perplexity":
            from . import mia

            tr = Tracker(on_event, cancel, "extras: perplexity", 1, detail="held text")
            res = mia.perplexity(handle, inp.text, batch_size=max(1, settings.batch_size // 2))
            tr.step()
            out["perplexity"] = _finite(res["perplexity"])
            out["perplexity_tokens"] = res["tokens"]
        elif name == "relearn":
            from .attacks import relearn

            if len(inp.forget) < 2:
                out["relearn"] = None
                on_event(Log("extras: relearn needs at least 2 forget items; it is null", "warning"))
            else:
                out["relearn"] = relearn(handle, inp.forget, settings, epochs=inp.relearn_epochs, lr=inp.relearn_lr,
                                         seed=inp.seed, on_event=on_event, cancel=cancel)
        elif name == "mcq":
            from .attacks import evaluate_mcq, mcq_items

            mcq = mcq_items(inp.forget, seed=inp.seed)
            if mcq:
                base.splits["mcq"] = evaluate_mcq(handle, mcq, settings, on_event, cancel)
            else:
                on_event(Log("extras: no forget item has perturbed answers: no mcq split", "warning"))
        elif name == "in_context":
            from .attacks import in_context_items
            from .metrics import evaluate_split

            ctx = in_context_items(inp.forget, inp.demos, k=min(IN_CONTEXT_K, len(inp.demos)), seed=inp.seed)
            base.splits["in_context"] = evaluate_split(handle, "in_context", ctx, settings, on_event, cancel)
        seconds[name] = time.perf_counter() - t0


def model_utility_parts(handle: ModelHandle, inp: Inputs, settings: EvalSettings, base: EvalResult,
                        on_event: EventCallback = ignore, cancel: CancelToken | None = None) -> dict[str, dict]:
    """Per set (``retain`` and each utility set): TOFU's probability, ROUGE-L recall and truth-ratio score."""
    from . import field_metrics
    from .generation import generate

    parts: dict[str, dict] = {}
    retain = base.splits.get("retain")
    sets = dict(inp.utility)
    n = sum(1 + len(it.perturbed_answers) for it in inp.retain if it.perturbed_answers)
    n += sum(2 + len(it.perturbed_answers) for items in sets.values() for it in items)
    tracker = Tracker(on_event, cancel, "extras: model utility", max(1, n),
                      detail=" + ".join(["retain", *sets]))
    if retain is not None and retain.items:
        part: dict[str, Any] = {"probability": retain.mean("probability"),
                                "rougeL": sum(field_metrics.rougeL_recall(s.answer, s.generation)
                                              for s in retain.items) / len(retain.items)}
        ratios = [r for r in truth_ratios(handle, inp.retain, settings, tracker) if r is not None]
        if ratios:
            part["truth_ratio"] = field_metrics.truth_ratio_score(ratios, forget_like=False)
        parts["retain"] = part
    for name, items in sets.items():
        if not items:
            continue
        tf = _tf(handle, items, settings, tracker, reference=False)
        gens = generate(handle, [handle.prompt_ids(it.question) for it in items], settings.max_new_tokens,
                        settings.batch_size, on_batch=tracker.step)
        ratios = [field_metrics.tofu_truth_ratio(lp, wrong) for lp, wrong in tf if wrong]
        part = {"probability": sum(field_metrics.tofu_probability(lp, wrong) for lp, wrong in tf) / len(tf),
                "rougeL": sum(field_metrics.rougeL_recall(it.answer, g) for it, g in zip(items, gens)) / len(items)}
        ratios = [r for r in ratios if r is not None]
        if ratios:
            part["truth_ratio"] = field_metrics.truth_ratio_score(ratios, forget_like=False)
        parts[name] = part
    return parts


def utility_sets(files: Sequence[str], base_dir: Path, limit: int | None, data_dir: Path | None = None
                 ) -> tuple[dict[str, list], str]:
    """The model-utility sets: the given files (names: their stems), else TOFU's real-authors and
    world-facts files of the shared data folder where present; and a line saying which were used."""
    from . import data
    from .paths import shared_data_dir

    found: dict[str, list] = {}
    if files:
        for f in files:
            p = Path(f).expanduser()
            p = p if p.is_absolute() else base_dir / p
            found[p.stem] = data.load_items(str(p))[: limit or None]
    else:
        root = data_dir or shared_data_dir()
        for name, rel in UTILITY_FILES.items():
            if (root / rel).is_file():
                found[name] = data.load_items(str(root / rel), format="tofu")[: limit or None]
    missing = [n for n in UTILITY_FILES if n not in found] if not files else []
    note = "model utility over retain" + "".join(f" + {n} ({len(v)})" for n, v in found.items())
    if missing:
        note += f"; not found: {', '.join(missing)} (looked in {data_dir or shared_data_dir()})"
    return found, note


__all__ = ["Inputs", "Reference", "compute", "build_reference", "model_utility_parts", "utility_sets",
           "truth_ratios", "mia_aucs", "reference_answer", "MIA_KEYS"]
