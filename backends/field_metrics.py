"""The unlearning field's metrics, as pure functions of numbers a model pass produced.

Everything here takes plain floats (length-normalised log-probabilities,
per-token log-probabilities, generations) and returns plain floats, so it is
testable without a model; :mod:`backends.mia` runs the model passes.  Notation:
``lp(a)`` is the mean over the answer tokens of ``log P(token | prompt, prefix)``,
so ``exp(lp(a)) = P(a|q)^(1/|a|)`` is the length-normalised probability, and
TOFU's "loss" of an answer is ``-lp(a)``.

TOFU (Maini et al. 2024, "TOFU: A Task of Fictitious Unlearning for LLMs";
locuslab/tofu ``aggregate_eval_stat.py``)
--------------------------------------------------------------------------
* Truth ratio of one question (:func:`tofu_truth_ratio`)::

      R = exp( mean_i lp(perturbed_i) - lp(paraphrased) )

  the geometric mean of the perturbed (wrong) answers' normalised probabilities
  over the paraphrased answer's; the caller passes the gold answer where an
  item has no paraphrased answer.  R < 1: the model prefers the right answer.
  TOFU's code stores the reciprocal, ``exp(perturb_loss - paraphrased_loss)``
  ``= 1/R``.
* Truth-ratio score of a split (:func:`truth_ratio_score`), per TOFU's
  ``get_model_utility``: forget split ``mean(min(R, 1/R))`` (symmetric, so the
  orientation does not matter); every other split ``mean(max(0, 1 - R))``
  (TOFU writes ``max(0, 1 - 1/s)`` with its ``s = 1/R``).
* Forget quality (:func:`forget_quality`): the p-value of the two-sample
  Kolmogorov-Smirnov test between the forget-split truth ratios of the
  unlearned model and of a model trained without the forget set (TOFU's
  retain-only model), ``scipy.stats.ks_2samp`` with its defaults.  TOFU feeds
  it ``1/R``; the KS statistic depends only on the ranks of the pooled sample,
  which ``x -> 1/x`` reverses for both samples alike, so ``R`` gives the same
  statistic and p-value.
* Probability on the real-authors / world-facts sets (:func:`tofu_probability`)::

      p_gold / (p_gold + sum_i p_perturbed_i),   p = exp(lp(answer))

  (normalised probabilities of the gold answer and of each perturbed option);
  on the retain set TOFU uses the plain ``exp(lp(gold))``.
* ROUGE (:func:`rougeL_recall`): ROUGE-L recall of the gold answer against the
  greedy generation, rouge-score with the Porter stemmer.
* Model utility (:func:`model_utility`): the harmonic mean of nine numbers:
  for each of retain, real authors, world facts: the mean probability (retain:
  ``exp(lp(gold))``; real authors / world facts: :func:`tofu_probability`),
  the mean ROUGE-L recall and the retain-form truth-ratio score
  ``mean(max(0, 1 - R))``.  0 when any of them is 0.

Membership inference (all scores oriented "higher = more likely a training member")
-----------------------------------------------------------------------------------
Per answer, from its per-token log-probabilities ``l_1..l_n``:

* LOSS (Yeom et al. 2018): ``mean(l)`` (minus the mean NLL).
* zlib (Carlini et al. 2021, "Extracting Training Data from Large Language
  Models"): ``mean(l) / zlib_len(text)`` = ``-(mean NLL) / zlib_len``, with
  ``zlib_len`` the length in bytes of ``zlib.compress`` of the UTF-8 text.
  Carlini et al. rank by the ratio ``NLL / zlib_len`` (low = memorised); this
  is its negation.
* Min-K% Prob (Shi et al. 2024, "Detecting Pretraining Data from Large Language
  Models"): the mean of the ``K = max(1, floor(k n))`` lowest ``l_t``.  ``k = 0.4``
  as in OpenUnlearning's TOFU / MUSE configs; ``floor`` as in Shi et al.'s and
  OpenUnlearning's code.
* Min-K%++ (Zhang et al. 2024, "Min-K%++: Improved Baseline for Detecting
  Pre-Training Data from Large Language Models"): the same mean over the
  lowest K of ``(l_t - mu_t) / sigma_t`` with ``mu_t = E_z[log p(z)]`` and
  ``sigma_t^2 = E_z[log p(z)^2] - mu_t^2`` under the model's next-token
  distribution at position t; ``sigma_t`` is floored at ``1e-3`` (OpenUnlearning
  clamps the variance at ``1e-6``).
* AUC (:func:`auc`): ROC AUC with the members (forget set) as positives, i.e.
  ``P(score(member) > score(non-member)) + P(=)/2`` = Mann-Whitney ``U / (n1 n2)``.
  1: members fully separable (not forgotten), 0.5: indistinguishable.

MUSE (Shi et al. 2024, "MUSE: Machine Unlearning Six-Way Evaluation for Language Models")
-----------------------------------------------------------------------------------------
* PrivLeak (:func:`privleak`) from the Min-K% Prob AUC (forget vs holdout) of
  the unlearned and of the retrained (retain-only) model::

      PrivLeak = (AUC_u - AUC_r) / AUC_r * 100     in MUSE's AUC orientation,

  and MUSE reports its AUC as ``1 -`` the conventional one above (its target
  model scores about -100 %, OpenUnlearning's ``privleak`` converts the same
  way).  With conventional AUCs ``u``, ``r`` that is ``(r - u) / (1 - r) * 100``:
  0 = leaks like the retrained model, large negative = under-unlearning
  (members still recognisable), large positive = over-unlearning.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence

SIGMA_FLOOR = 1e-3
MINK_K = 0.4
MIA_KEYS = ("loss", "zlib", "mink", "minkpp")
# MUSE computes PrivLeak from the Min-K% Prob attack
PRIVLEAK_SCORE = "mink_auc"


# --------------------------------------------------------------------------- TOFU

def tofu_truth_ratio(reference_mean_logprob: float, perturbed_mean_logprobs: Sequence[float]) -> float | None:
    """``R = exp(mean(perturbed) - reference)``; None without perturbed answers.

    ``reference_mean_logprob`` is ``lp`` of the paraphrased answer (the gold
    answer where there is none); every input is a mean per-token log-probability.
    """
    if not perturbed_mean_logprobs:
        return None
    mean_wrong = math.fsum(perturbed_mean_logprobs) / len(perturbed_mean_logprobs)
    return math.exp(mean_wrong - reference_mean_logprob)


def truth_ratio_score(ratios: Sequence[float], forget_like: bool) -> float | None:
    """TOFU's split aggregate of truth ratios ``R`` (as :func:`tofu_truth_ratio` returns them).

    ``forget_like`` (the forget split): ``mean(min(R, 1/R))`` — 1 when the model
    cannot tell right from wrong answers, near 0 when it strongly prefers either.
    Otherwise (retain, real authors, world facts): ``mean(max(0, 1 - R))`` —
    high when the model prefers the right answer.  TOFU's code holds
    ``s = exp(perturb_loss - paraphrased_loss) = 1/R`` and writes these as
    ``min(s, 1/s)`` and ``max(0, 1 - 1/s)``.  None for no ratios.
    """
    vals = [float(r) for r in ratios if r is not None]
    if not vals:
        return None
    if forget_like:
        parts = [min(r, 1.0 / r) if r > 0 else 0.0 for r in vals]
    else:
        parts = [max(0.0, 1.0 - r) for r in vals]
    return math.fsum(parts) / len(parts)


def forget_quality(unlearned_ratios: Sequence[float], retain_only_ratios: Sequence[float]) -> dict[str, float]:
    """TOFU's forget quality: the two-sample KS test between two models' forget-split truth ratios.

    Returns ``{"pvalue", "statistic"}`` of ``scipy.stats.ks_2samp(unlearned, retain_only)``
    (default, two-sided; exact for small samples).  High p-value: the unlearned
    model's ratios are distributed like those of a model that never saw the
    forget set.  TOFU passes ``1/R``; passing ``R`` gives the same numbers (see
    the module docstring).
    """
    from scipy.stats import ks_2samp

    a = [float(x) for x in unlearned_ratios]
    b = [float(x) for x in retain_only_ratios]
    if not a or not b:
        raise ValueError("forget quality needs truth ratios from both models")
    res = ks_2samp(a, b)
    return {"pvalue": float(res.pvalue), "statistic": float(res.statistic)}


def tofu_probability(gold_mean_logprob: float, perturbed_mean_logprobs: Sequence[float]) -> float:
    """``p_gold / (p_gold + sum p_perturbed)`` with ``p = exp(mean log-prob)`` (TOFU, real authors / world facts).

    Computed in log space (stable for very small probabilities).  Without
    perturbed answers it is 1.
    """
    logs = [float(gold_mean_logprob)] + [float(x) for x in perturbed_mean_logprobs]
    top = max(logs)
    denom = math.fsum(math.exp(x - top) for x in logs)
    return math.exp(logs[0] - top) / denom


_ROUGE_L = None


def rougeL_recall(gold: str, generation: str) -> float:
    """ROUGE-L recall of ``gold`` in ``generation`` (rouge-score, Porter stemmer on), as TOFU scores ROUGE."""
    global _ROUGE_L
    if _ROUGE_L is None:
        from rouge_score import rouge_scorer

        _ROUGE_L = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return float(_ROUGE_L.score(gold, generation)["rougeL"].recall)


def model_utility(parts: Mapping[str, Mapping[str, float | None]]) -> float | None:
    """TOFU's model utility: the harmonic mean of every number in ``parts``.

    ``parts`` maps a set name to its numbers, e.g. ``{"retain": {"probability":
    .., "rougeL": .., "truth_ratio": ..}, "real_authors": {..}, "world_facts": {..}}``.
    TOFU uses, per set: the mean probability (retain: ``exp(lp(gold))``; real
    authors / world facts: :func:`tofu_probability`), the mean ROUGE-L recall,
    and the retain-form truth-ratio score (:func:`truth_ratio_score` with
    ``forget_like=False``); the forget split is not part of it.  None values
    are skipped; 0 if any number is 0 (or negative); None if there is none.
    """
    vals = [float(v) for sub in parts.values() for v in sub.values() if v is not None]
    if not vals:
        return None
    if any(v <= 0 for v in vals):
        return 0.0
    from scipy.stats import hmean

    return float(hmean(vals))


# --------------------------------------------------------------------------- membership inference

def _mean(xs: Sequence[float]) -> float:
    if not xs:
        raise ValueError("a membership score needs at least one token log-probability")
    return math.fsum(xs) / len(xs)


def _k_count(n: int, k: float) -> int:
    if not 0 < k <= 1:
        raise ValueError(f"k must be in (0, 1], got {k}")
    return max(1, int(math.floor(n * k + 1e-9)))


def loss_score(logprobs: Sequence[float]) -> float:
    """LOSS attack: the mean token log-probability (minus the mean NLL; higher = member)."""
    return _mean([float(x) for x in logprobs])


def zlib_length(text: str) -> int:
    """Length in bytes of the zlib-compressed UTF-8 text (at least 1)."""
    return max(1, len(zlib.compress(text.encode("utf-8"))))


def zlib_score(logprobs: Sequence[float], text: str) -> float:
    """zlib attack: ``-(mean NLL) / zlib_length(text)`` (Carlini et al.'s ratio, negated: higher = member)."""
    return loss_score(logprobs) / zlib_length(text)


def mink_score(logprobs: Sequence[float], k: float = MINK_K) -> float:
    """Min-K% Prob: the mean of the ``max(1, floor(k n))`` lowest token log-probabilities (higher = member)."""
    vals = sorted(float(x) for x in logprobs)
    if not vals:
        raise ValueError("a membership score needs at least one token log-probability")
    return _mean(vals[:_k_count(len(vals), k)])


def minkpp_score(logprobs: Sequence[float], mus: Sequence[float], sigmas: Sequence[float],
                 k: float = MINK_K) -> float:
    """Min-K%++: the mean of the lowest ``max(1, floor(k n))`` of ``(l_t - mu_t) / max(sigma_t, 1e-3)``."""
    if not (len(logprobs) == len(mus) == len(sigmas)):
        raise ValueError("logprobs, mus and sigmas must have one value per token")
    z = sorted((float(lp) - float(m)) / max(float(s), SIGMA_FLOOR) for lp, m, s in zip(logprobs, mus, sigmas))
    if not z:
        raise ValueError("a membership score needs at least one token log-probability")
    return _mean(z[:_k_count(len(z), k)])


def auc(member_scores: Sequence[float], nonmember_scores: Sequence[float]) -> float | None:
    """ROC AUC with members as positives (higher score = more member-like), ties counted 1/2.

    Equals the Mann-Whitney ``U`` of the members over ``n_members * n_nonmembers``.
    None when either side is empty.
    """
    a = [float(x) for x in member_scores]
    b = [float(x) for x in nonmember_scores]
    if not a or not b:
        return None
    from scipy.stats import mannwhitneyu

    u = mannwhitneyu(a, b, alternative="two-sided").statistic  # U of the first sample
    return float(u) / (len(a) * len(b))


def mia_aucs(member: Sequence[Mapping[str, float | None]],
             nonmember: Sequence[Mapping[str, float | None]]) -> dict[str, float | None]:
    """``{loss_auc, zlib_auc, mink_auc, minkpp_auc}`` from per-item score dicts (keys ``loss, zlib, mink, minkpp``).

    Items whose score is None (an answer of no tokens) are left out of that AUC.
    """
    out: dict[str, float | None] = {}
    for key in MIA_KEYS:
        pos = [v for v in (m.get(key) for m in member) if v is not None]
        neg = [v for v in (n.get(key) for n in nonmember) if v is not None]
        out[f"{key}_auc"] = auc(pos, neg)
    return out


def privleak(auc_unlearned: float | None, auc_retain_only: float | None) -> float | None:
    """MUSE's PrivLeak in percent from two conventional AUCs (members positive, see :func:`auc`).

    MUSE's AUC is ``1 - AUC``: ``(AUC'_u - AUC'_r) / AUC'_r * 100`` with
    ``AUC' = 1 - AUC``, i.e. ``(r - u) / (1 - r) * 100``.  Negative: the
    forget set is still more recognisable than for the retrained model
    (under-unlearning; a model that never unlearned is near -100); positive:
    over-unlearning.  None when either AUC is missing or the reference is 1.
    Use the Min-K% AUCs (:data:`PRIVLEAK_SCORE`) to match MUSE.
    """
    if auc_unlearned is None or auc_retain_only is None:
        return None
    ref = 1.0 - float(auc_retain_only)
    if ref <= 0:
        return None
    return ((1.0 - float(auc_unlearned)) - ref) / ref * 100.0


__all__ = [
    "MIA_KEYS", "MINK_K", "PRIVLEAK_SCORE", "SIGMA_FLOOR", "auc", "forget_quality", "loss_score", "mia_aucs",
    "mink_score", "minkpp_score", "model_utility", "privleak", "rougeL_recall", "tofu_probability",
    "tofu_truth_ratio", "truth_ratio_score", "zlib_length", "zlib_score",
]
