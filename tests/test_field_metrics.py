"""The field's metrics (backends.field_metrics) against hand-worked values."""

from __future__ import annotations

import itertools
import math
import random
import zlib

import pytest

from unlearn_tui.backends import field_metrics as fm

# ----------------------------------------------------------------------------- TOFU


def test_truth_ratio_is_geometric_mean_of_perturbed_over_reference():
    # perturbed normalised probabilities 0.1 and 0.4: geometric mean 0.2; reference 0.5 -> R = 0.4
    r = fm.tofu_truth_ratio(math.log(0.5), [math.log(0.1), math.log(0.4)])
    assert r == pytest.approx(0.4, rel=1e-12)
    assert fm.tofu_truth_ratio(math.log(0.5), []) is None
    # the model prefers the wrong answers: R > 1
    assert fm.tofu_truth_ratio(math.log(0.1), [math.log(0.3)]) == pytest.approx(3.0)


def test_truth_ratio_score_forget_and_retain_forms():
    ratios = [0.5, 2.0, 1.0]
    # forget: min(R, 1/R) = 0.5, 0.5, 1 -> 2/3
    assert fm.truth_ratio_score(ratios, forget_like=True) == pytest.approx(2 / 3)
    # retain: max(0, 1 - R) = 0.5, 0, 0 -> 1/6
    assert fm.truth_ratio_score(ratios, forget_like=False) == pytest.approx(1 / 6)
    # TOFU's code form on s = 1/R gives the same numbers: min(s, 1/s) and max(0, 1 - 1/s)
    s = [1 / r for r in ratios]
    assert fm.truth_ratio_score(ratios, True) == pytest.approx(sum(min(x, 1 / x) for x in s) / 3)
    assert fm.truth_ratio_score(ratios, False) == pytest.approx(sum(max(0.0, 1 - 1 / x) for x in s) / 3)
    assert fm.truth_ratio_score([], True) is None
    assert fm.truth_ratio_score([0.25], False) == pytest.approx(0.75)


def _ks_exact_by_enumeration(a, b):
    """Independent exact two-sided KS p-value: every way of splitting the pooled sample into |a| and |b|."""
    def d_stat(x, y):
        pts = sorted(set(x) | set(y))
        return max(abs(sum(v <= t for v in x) / len(x) - sum(v <= t for v in y) / len(y)) for t in pts)

    d_obs = d_stat(a, b)
    pooled = list(a) + list(b)
    hits = total = 0
    for chosen in itertools.combinations(range(len(pooled)), len(a)):
        rest = [pooled[i] for i in range(len(pooled)) if i not in chosen]
        total += 1
        hits += d_stat([pooled[i] for i in chosen], rest) >= d_obs - 1e-12
    return d_obs, hits / total


def test_forget_quality_ks_hand_worked():
    # disjoint samples of 3 and 3: D = 1, and only 2 of the C(6,3) = 20 splits reach D = 1 -> p = 0.1
    res = fm.forget_quality([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    assert set(res) == {"pvalue", "statistic"}
    assert res["statistic"] == pytest.approx(1.0)
    assert res["pvalue"] == pytest.approx(0.1)
    # identical samples: D = 0, p = 1
    same = fm.forget_quality([0.2, 0.5, 0.9], [0.2, 0.5, 0.9])
    assert same["statistic"] == pytest.approx(0.0)
    assert same["pvalue"] == pytest.approx(1.0)


def test_forget_quality_matches_exact_enumeration():
    a = [0.31, 0.72, 1.10, 1.45]
    b = [0.50, 1.30, 1.90, 2.40]
    # ECDFs: at 0.31 a=1/4 b=0; 0.50 1/4,1/4; 0.72 2/4,1/4; 1.10 3/4,1/4 -> D = 1/2
    d, p = _ks_exact_by_enumeration(a, b)
    assert d == pytest.approx(0.5)
    res = fm.forget_quality(a, b)
    assert res["statistic"] == pytest.approx(0.5)
    assert res["pvalue"] == pytest.approx(p)


def test_forget_quality_same_for_ratio_and_its_inverse():
    rng = random.Random(3)
    a = [math.exp(rng.gauss(0.0, 1.0)) for _ in range(25)]
    b = [math.exp(rng.gauss(0.4, 1.0)) for _ in range(30)]
    direct = fm.forget_quality(a, b)
    tofu_form = fm.forget_quality([1 / x for x in a], [1 / x for x in b])   # what TOFU's code feeds it
    assert direct["statistic"] == pytest.approx(tofu_form["statistic"])
    assert direct["pvalue"] == pytest.approx(tofu_form["pvalue"])
    assert 0.0 < direct["pvalue"] < 1.0
    with pytest.raises(ValueError):
        fm.forget_quality([], b)


def test_tofu_probability():
    # 0.6 / (0.6 + 0.2 + 0.1) = 2/3
    p = fm.tofu_probability(math.log(0.6), [math.log(0.2), math.log(0.1)])
    assert p == pytest.approx(2 / 3)
    # tiny probabilities do not underflow to 0/0: q / (q + q + q/3) = 3/7
    assert fm.tofu_probability(-1000.0, [-1000.0, -1000.0 - math.log(3)]) == pytest.approx(3 / 7)
    assert fm.tofu_probability(-1000.0, [-1000.0 - math.log(3)]) == pytest.approx(0.75)
    assert fm.tofu_probability(-2.0, []) == pytest.approx(1.0)


def test_rougeL_recall_is_longest_common_subsequence_with_stemming():
    # every word present but the order reversed: ROUGE-1 recall would be 1, the LCS is one word
    assert fm.rougeL_recall("red green blue yellow", "yellow blue green red") == pytest.approx(0.25)
    # the stemmer maps dogs -> dog, barked -> bark
    assert fm.rougeL_recall("dogs barked", "the dog bark loudly") == pytest.approx(1.0)
    # LCS "the cat on mat" = 4 of 6 gold tokens
    assert fm.rougeL_recall("the cat sat on the mat", "the cat was on a mat") == pytest.approx(4 / 6)


def test_model_utility_harmonic_mean():
    parts = {"retain": {"probability": 0.5, "rougeL": 0.25, "truth_ratio": 1.0}}
    # 3 / (1/0.5 + 1/0.25 + 1/1) = 3/7
    assert fm.model_utility(parts) == pytest.approx(3 / 7)
    nine = {"retain": {"p": 0.5, "r": 0.5, "t": 0.5}, "real_authors": {"p": 0.5, "r": 0.5, "t": 0.5},
            "world_facts": {"p": 0.25, "r": 0.25, "t": 0.25}}
    # 9 / (6 * 2 + 3 * 4) = 9/24
    assert fm.model_utility(nine) == pytest.approx(9 / 24)
    assert fm.model_utility({"retain": {"p": 0.5, "r": 0.0}}) == 0.0
    assert fm.model_utility({}) is None
    assert fm.model_utility({"retain": {"p": None}}) is None
    assert fm.model_utility({"retain": {"p": 0.5, "t": None}}) == pytest.approx(0.5)


# ----------------------------------------------------------------------------- membership inference


def test_auc_counts_pairs_with_half_ties():
    members = [0.9, 0.8, 0.5]
    nonmembers = [0.7, 0.5, 0.1]
    # 0.9 beats all three (3), 0.8 beats all three (3), 0.5 beats 0.1 and ties 0.5 (1.5): 7.5 of 9 pairs
    assert fm.auc(members, nonmembers) == pytest.approx(7.5 / 9)
    assert fm.auc(nonmembers, members) == pytest.approx(1.5 / 9)
    assert fm.auc([1.0, 2.0], [3.0, 4.0]) == pytest.approx(0.0)
    assert fm.auc([5.0], [3.0, 4.0]) == pytest.approx(1.0)
    assert fm.auc([1.0, 1.0], [1.0]) == pytest.approx(0.5)
    assert fm.auc([], [1.0]) is None
    assert fm.auc([1.0], []) is None


def test_auc_equals_roc_trapezoid():
    """The area under the ROC curve swept by thresholds, computed by hand, equals the pair count."""
    rng = random.Random(7)
    members = [round(rng.gauss(0.5, 1.0), 1) for _ in range(15)]   # rounding makes ties
    nonmembers = [round(rng.gauss(0.0, 1.0), 1) for _ in range(12)]
    thresholds = sorted(set(members) | set(nonmembers), reverse=True)
    pts = [(0.0, 0.0)]
    for t in thresholds:
        tpr = sum(m >= t for m in members) / len(members)
        fpr = sum(n >= t for n in nonmembers) / len(nonmembers)
        pts.append((fpr, tpr))
    area = sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in zip(pts, pts[1:]))
    assert fm.auc(members, nonmembers) == pytest.approx(area)


def test_loss_and_zlib_scores():
    lps = [-1.0, -2.0, -3.0]
    assert fm.loss_score(lps) == pytest.approx(-2.0)
    text = "hello hello hello"
    n = len(zlib.compress(text.encode("utf-8")))
    assert fm.zlib_length(text) == n
    assert fm.zlib_score(lps, text) == pytest.approx(-2.0 / n)
    # orientation: a lower NLL (member-like) scores higher under both
    assert fm.loss_score([-0.1, -0.2]) > fm.loss_score(lps)
    assert fm.zlib_score([-0.1, -0.2], text) > fm.zlib_score(lps, text)
    with pytest.raises(ValueError):
        fm.loss_score([])


def test_mink_score_hand_worked():
    lps = [-0.1, -2.0, -0.5, -3.0, -1.0]
    # k = 0.4 of 5 tokens: the 2 lowest, -3 and -2
    assert fm.mink_score(lps) == pytest.approx(-2.5)
    assert fm.MINK_K == 0.4
    assert fm.mink_score(lps, k=0.2) == pytest.approx(-3.0)
    assert fm.mink_score(lps, k=0.6) == pytest.approx((-3.0 - 2.0 - 1.0) / 3)
    assert fm.mink_score(lps, k=1.0) == pytest.approx(sum(lps) / 5)
    # floor(0.4 * 3) = 1 token; floor(0.1 * 5) = 0 -> at least one
    assert fm.mink_score([-1.0, -4.0, -2.0]) == pytest.approx(-4.0)
    assert fm.mink_score(lps, k=0.1) == pytest.approx(-3.0)
    with pytest.raises(ValueError):
        fm.mink_score(lps, k=0.0)


def test_minkpp_score_hand_worked():
    lps = [-1.0, -2.0, -3.0, -0.5, -4.0]
    mus = [-2.0, -2.0, -2.0, -1.0, -2.0]
    sigmas = [1.0, 0.5, 2.0, 0.25, 4.0]
    # z = (l - mu) / sigma = 1, 0, -0.5, 2, -0.5; k = 0.4 -> the 2 lowest: -0.5, -0.5
    assert fm.minkpp_score(lps, mus, sigmas) == pytest.approx(-0.5)
    assert fm.minkpp_score(lps, mus, sigmas, k=0.6) == pytest.approx(-1.0 / 3)
    assert fm.minkpp_score(lps, mus, sigmas, k=1.0) == pytest.approx(2.0 / 5)
    # sigma 0 is floored at 1e-3: (-3 + 2) / 1e-3 = -1000
    assert fm.minkpp_score([-1.0, -3.0], [-2.0, -2.0], [1.0, 0.0], k=0.5) == pytest.approx(-1000.0)
    with pytest.raises(ValueError):
        fm.minkpp_score([-1.0], [-1.0, -2.0], [1.0])


def test_mia_aucs_per_score():
    member = [{"loss": -1.0, "zlib": -0.1, "mink": -2.0, "minkpp": 0.5},
              {"loss": -1.5, "zlib": -0.3, "mink": -2.5, "minkpp": -0.5}]
    nonmember = [{"loss": -2.0, "zlib": -0.2, "mink": -2.5, "minkpp": 1.0},
                 {"loss": -3.0, "zlib": -0.4, "mink": -3.0, "minkpp": 2.0}]
    out = fm.mia_aucs(member, nonmember)
    assert set(out) == {"loss_auc", "zlib_auc", "mink_auc", "minkpp_auc"}
    assert out["loss_auc"] == pytest.approx(1.0)          # both members above both non-members
    assert out["zlib_auc"] == pytest.approx(3 / 4)        # -0.3 loses to -0.2 only
    assert out["mink_auc"] == pytest.approx(3.5 / 4)      # -2.5 ties -2.5
    assert out["minkpp_auc"] == pytest.approx(0.0)
    # an item without a score (no answer tokens) is left out
    empty = {"loss": None, "zlib": None, "mink": None, "minkpp": None}
    assert fm.mia_aucs(member + [empty], nonmember) == out
    assert fm.mia_aucs([empty], nonmember)["loss_auc"] is None


def test_privleak_muse_orientation():
    assert fm.PRIVLEAK_SCORE == "mink_auc"
    # MUSE's AUC is 1 - ours: a model that still knows the forget set (ours 0.999) against a retrained one
    # (0.5): (0.001 - 0.5) / 0.5 * 100 = -99.8
    assert fm.privleak(0.999, 0.5) == pytest.approx(-99.8)
    assert fm.privleak(0.5, 0.5) == pytest.approx(0.0)
    # over-unlearning: members now look less member-like than for the retrained model: (0.7 - 0.5) / 0.5 = +40 %
    assert fm.privleak(0.3, 0.5) == pytest.approx(40.0)
    # reference not at 0.5: (1 - 0.8) - (1 - 0.6) over (1 - 0.6): (0.2 - 0.4) / 0.4 = -50 %
    assert fm.privleak(0.8, 0.6) == pytest.approx(-50.0)
    assert fm.privleak(None, 0.5) is None
    assert fm.privleak(0.5, 1.0) is None
