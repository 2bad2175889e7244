"""Metric code checked against naive reference implementations and hand-computed cases
(issue 12 item 9): AUC / AP with bootstrap CIs, paired tests, strata, calibration, operating points."""
from __future__ import annotations

import json
import math
import time

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from lesiontriage.evaluate.calibration import (
    apply_temperature,
    binary_nll,
    expected_calibration_error,
    fit_temperature,
    fit_temperature_multiclass,
    multiclass_nll,
    prob_to_logit,
    top_label_ece,
)
from lesiontriage.evaluate.metrics import (
    ap_ci,
    ap_rows,
    auc_ci,
    auc_rows,
    metrics_by_stratum,
    paired_bootstrap_test,
)
from lesiontriage.evaluate.operating_points import (
    choose_threshold_at_ppv,
    confusion_at,
    ppv_npv_at_prevalence,
    threshold_at_ppv,
    threshold_at_sensitivity,
    wilson_ci,
)


# ------------------------------------------------------------------ naive references

def naive_auc(y, p) -> float:
    """Share of (positive, negative) pairs ranked correctly, ties one half."""
    pos = [s for s, t in zip(p, y) if t == 1]
    neg = [s for s, t in zip(p, y) if t == 0]
    score = 0.0
    for a in pos:
        for b in neg:
            score += 1.0 if a > b else 0.5 if a == b else 0.0
    return score / (len(pos) * len(neg))


def sample(n: int, seed: int, prevalence: float = 0.2, sep: float = 1.0, decimals: int | None = None):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(int)
    p = 1 / (1 + np.exp(-(rng.normal(size=n) + sep * (2 * y - 1))))
    if decimals is not None:
        p = np.round(p, decimals)  # creates ties
    return y, p


# ------------------------------------------------------------------ AUC / AP

@pytest.mark.parametrize("decimals", [None, 1])
def test_auc_matches_pair_counting(decimals):
    y, p = sample(300, seed=1, decimals=decimals)
    res = auc_ci(y, p, n_boot=200)
    assert res.value == pytest.approx(naive_auc(y, p), abs=1e-12)
    assert res.n == 300 and res.n_pos == int(y.sum())


def test_ap_hand_computed():
    # ranking 1, 0, 1, 0: precision 1 at recall 0.5, precision 2/3 at recall 1
    assert ap_ci([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1], n_boot=0).value == pytest.approx(0.5 + 0.5 * 2 / 3)
    # a tie between the first positive and a negative forms one threshold: P=1/2 at R=1/2, then P=2/3
    assert ap_ci([1, 0, 1], [0.5, 0.5, 0.2], n_boot=0).value == pytest.approx(0.25 + 0.5 * 2 / 3)
    assert ap_ci([0, 1, 1], [0.1, 0.5, 0.9], n_boot=0).value == pytest.approx(1.0)


def test_row_functions_match_sklearn_on_every_row():
    rng = np.random.default_rng(3)
    pos = np.round(rng.random((20, 15)) * 0.7 + 0.3, 1)  # heavy ties
    neg = np.round(rng.random((20, 40)) * 0.8, 1)
    y = np.r_[np.ones(15), np.zeros(40)]
    aucs, aps = auc_rows(pos, neg), ap_rows(pos, neg)
    for r in range(20):
        s = np.r_[pos[r], neg[r]]
        assert aucs[r] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert aps[r] == pytest.approx(average_precision_score(y, s), abs=1e-12)


def test_bootstrap_ci_contains_estimate_and_narrows_with_n():
    small = auc_ci(*sample(150, seed=5), n_boot=500)
    large = auc_ci(*sample(3000, seed=5), n_boot=500)
    for r in (small, large):
        assert r.ci_low <= r.value <= r.ci_high
        assert r.ok
    assert (large.ci_high - large.ci_low) < 0.6 * (small.ci_high - small.ci_low)
    ap_small, ap_large = ap_ci(*sample(150, seed=6), n_boot=500), ap_ci(*sample(3000, seed=6), n_boot=500)
    assert ap_small.ci_low <= ap_small.value <= ap_small.ci_high
    assert (ap_large.ci_high - ap_large.ci_low) < (ap_small.ci_high - ap_small.ci_low)


def test_bootstrap_is_stratified_and_seeded():
    # two positives among 60: an unstratified bootstrap would draw replicates without positives
    y = np.zeros(60, int)
    y[[3, 40]] = 1
    p = np.linspace(0, 1, 60)
    a = auc_ci(y, p, n_boot=300, seed=7)
    assert math.isfinite(a.ci_low) and math.isfinite(a.ci_high)
    assert a == auc_ci(y, p, n_boot=300, seed=7)
    assert a != auc_ci(y, p, n_boot=300, seed=8)


def test_bootstrap_speed_on_realistic_size():
    y, p = sample(1500, seed=2)
    t0 = time.perf_counter()
    auc_ci(y, p, n_boot=1000)
    ap_ci(y, p, n_boot=1000)
    assert time.perf_counter() - t0 < 4.0  # brief: < 2 s each on this 2-core machine


def test_degenerate_one_class_is_flagged_not_raised():
    r = auc_ci([0, 0, 0, 0], [0.1, 0.2, 0.3, 0.4])
    assert math.isnan(r.value) and "one class" in r.flag and not r.ok
    d = r.to_dict()
    assert d["value"] is None and json.dumps(d)
    assert math.isnan(ap_ci([1, 1], [0.2, 0.3]).value)
    assert "one class" in paired_bootstrap_test([1, 1], [0.1, 0.2], [0.2, 0.1]).flag


@pytest.mark.parametrize("y,p,msg", [
    ([0, 1, 2], [0.1, 0.2, 0.3], "0/1"),
    ([0, 1], [0.1], "scores for"),
    ([0, 1], [0.1, float("nan")], "non-finite"),
    ([0, float("nan")], [0.1, 0.2], "missing labels"),
])
def test_bad_input_gives_clear_error(y, p, msg):
    with pytest.raises(ValueError, match=msg):
        auc_ci(y, p)


def test_paired_test_identical_and_clearly_better():
    y, p = sample(400, seed=11, sep=1.5)
    same = paired_bootstrap_test(y, p, p.copy(), n_boot=500)
    assert same.p_value == 1.0 and same.delta == 0.0
    rng = np.random.default_rng(12)
    worse = p + rng.normal(0, 0.5, size=p.size)
    better = paired_bootstrap_test(y, p, worse, n_boot=500)
    assert better.delta > 0 and better.ci_low > 0
    assert better.p_value < 0.01
    assert better.value_a == pytest.approx(roc_auc_score(y, p))
    assert better.value_b == pytest.approx(roc_auc_score(y, worse))
    # swapping the predictors flips the sign, not the evidence
    swapped = paired_bootstrap_test(y, worse, p, n_boot=500)
    assert swapped.delta == pytest.approx(-better.delta) and swapped.p_value == better.p_value
    ap = paired_bootstrap_test(y, p, worse, metric="ap", n_boot=300)
    assert ap.delta == pytest.approx(average_precision_score(y, p) - average_precision_score(y, worse))


def test_paired_test_two_similar_predictors_not_significant():
    y, p = sample(300, seed=21)
    rng = np.random.default_rng(22)
    a = p + rng.normal(0, 0.05, p.size)
    b = p + rng.normal(0, 0.05, p.size)
    res = paired_bootstrap_test(y, a, b, n_boot=1000)
    assert res.ci_low < 0 < res.ci_high
    assert res.p_value > 0.05


def test_metrics_by_stratum_counts_and_small_flag():
    y1, p1 = sample(200, seed=31)
    y2, p2 = sample(20, seed=32, prevalence=0.5)
    df = pd.DataFrame({
        "y": np.r_[y1, y2, [np.nan]],
        "p": np.r_[p1, p2, [0.5]],
        "src": ["a"] * 200 + ["b"] * 20 + ["a"],
    })
    df.loc[5, "src"] = None
    t = metrics_by_stratum(df, "y", "p", "src", n_boot=100).set_index("stratum")
    assert list(t.index) == ["all", "(missing)", "a", "b"]
    assert t.loc["all", "n"] == 220  # unlabelled row dropped
    assert t.loc["a", "n"] == 199 and t.loc["b", "n"] == 20
    assert t.loc["b", "n_pos"] == int(y2.sum())
    assert bool(t.loc["b", "small"]) and not bool(t.loc["a", "small"])
    assert t.loc["a", "auc"] == pytest.approx(roc_auc_score(np.delete(y1, 5), np.delete(p1, 5)))
    assert "one class" in t.loc["(missing)", "flag"] and math.isnan(t.loc["(missing)", "auc"])
    with pytest.raises(ValueError, match="not in the table"):
        metrics_by_stratum(df, "y", "score", "src")


# ------------------------------------------------------------------ calibration

def test_ece_hand_computed():
    r = expected_calibration_error([0, 1, 1, 1], [0.1, 0.1, 0.9, 0.9], n_bins=2)
    # bin [0, .5): mean p .1, freq .5 -> gap .4, weight .5; bin [.5, 1]: .9 vs 1 -> .1, weight .5
    assert r.ece == pytest.approx(0.5 * 0.4 + 0.5 * 0.1)
    assert r.mce == pytest.approx(0.4)
    assert list(r.counts) == [2, 2]
    assert r.bin_edges.tolist() == [0.0, 0.5, 1.0]
    assert r.mean_predicted.tolist() == pytest.approx([0.1, 0.9])
    assert r.observed_frequency.tolist() == pytest.approx([0.5, 1.0])


def test_ece_edges_empty_bins_and_p_equal_one():
    r = expected_calibration_error([1, 0], [1.0, 0.0], n_bins=15)
    assert r.counts[0] == 1 and r.counts[-1] == 1 and r.counts.sum() == 2
    assert r.ece == pytest.approx(0.0)
    assert math.isnan(r.mean_predicted[5])
    d = r.to_dict()
    assert d["mean_predicted"][5] is None and json.dumps(d)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        expected_calibration_error([0, 1], [0.5, 1.5])


def test_ece_small_for_calibrated_large_for_overconfident():
    rng = np.random.default_rng(41)
    p = rng.random(20000)
    y = (rng.random(20000) < p).astype(int)
    assert expected_calibration_error(y, p).ece < 0.02
    overconf = apply_temperature(prob_to_logit(p) * 4, 1.0)
    assert expected_calibration_error(y, overconf).ece > 0.1


def test_fit_temperature_recovers_known_scale():
    rng = np.random.default_rng(42)
    z = rng.normal(0, 2, 20000)
    y = (rng.random(z.size) < 1 / (1 + np.exp(-z))).astype(int)
    t = fit_temperature(3.0 * z, y)
    assert t == pytest.approx(3.0, rel=0.08)
    # it is the NLL minimiser: a fine grid does no better
    grid = np.linspace(1.5, 5, 200)
    best = grid[np.argmin([binary_nll(3.0 * z, y, g) for g in grid])]
    assert abs(best - t) < 0.03
    calibrated = apply_temperature(3.0 * z, t)
    assert expected_calibration_error(y, calibrated).ece < expected_calibration_error(y, apply_temperature(3.0 * z, 1.0)).ece
    # ranking unchanged
    assert roc_auc_score(y, calibrated) == pytest.approx(roc_auc_score(y, 3.0 * z))


def test_fit_temperature_bounded_on_separable_data():
    t = fit_temperature([-2.0, -1.0, 1.0, 2.0], [0, 0, 1, 1])
    assert t == pytest.approx(0.05, rel=0.01)  # NLL keeps falling as T -> 0: stops at the bound


def test_fit_temperature_multiclass_recovers_known_scale():
    rng = np.random.default_rng(43)
    z = rng.normal(0, 1.5, (8000, 5))
    pr = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    y = np.array([rng.choice(5, p=row) for row in pr])
    t = fit_temperature_multiclass(z / 2.0, y)  # under-confident by 2x
    assert t == pytest.approx(0.5, rel=0.08)
    assert multiclass_nll(z / 2.0, y, t) < multiclass_nll(z / 2.0, y, 1.0)
    probs = apply_temperature(z / 2.0, t)
    assert probs.shape == (8000, 5) and np.allclose(probs.sum(1), 1)
    assert top_label_ece(y, probs).ece < top_label_ece(y, apply_temperature(z / 2.0, 1.0)).ece
    with pytest.raises(ValueError, match="class indices"):
        fit_temperature_multiclass(z, np.full(8000, 7))


# ------------------------------------------------------------------ operating points

@pytest.mark.parametrize("k,n,lo,hi", [
    (0, 10, 0.0, 0.2775), (5, 10, 0.2366, 0.7634), (10, 10, 0.7225, 1.0),
    (81, 263, 0.2553, 0.3662),  # Newcombe (1998), Table I
])
def test_wilson_known_values(k, n, lo, hi):
    got = wilson_ci(k, n)
    assert got[0] == pytest.approx(lo, abs=5e-5) and got[1] == pytest.approx(hi, abs=5e-5)


def test_threshold_at_sensitivity_toy_exact():
    pos = np.arange(1, 21) / 100.0  # 20 positives: 0.01 .. 0.20
    neg = np.array([0.005, 0.015, 0.5])
    y = np.r_[np.ones(20), np.zeros(3)]
    p = np.r_[pos, neg]
    # 95% of 20 = 19 positives -> the 19th highest positive score = 0.02
    assert threshold_at_sensitivity(y, p, 0.95) == pytest.approx(0.02)
    assert threshold_at_sensitivity(y, p, 0.90) == pytest.approx(0.03)
    assert threshold_at_sensitivity(y, p, 1.0) == pytest.approx(0.01)


def test_threshold_at_sensitivity_is_highest_feasible_against_brute_force():
    y, p = sample(500, seed=51, decimals=2)
    for target in (0.8, 0.9, 0.95):
        thr = threshold_at_sensitivity(y, p, target)
        feasible = [t for t in np.unique(p) if confusion_at(y, p, t).sensitivity >= target]
        assert thr == pytest.approx(max(feasible))


def test_threshold_at_ppv_and_fallback():
    # descending: 1 1 1 1 1 0 1 0 0 0 1
    p = np.array([0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.5, 0.4, 0.3])
    y = np.array([1, 1, 1, 1, 1, 0, 1, 0, 0, 0, 1])
    c = choose_threshold_at_ppv(y, p, 0.8, min_calls=3)
    # PPV at 0.65: 6/7 = 0.857 (>= .8); at 0.6: 6/8 = .75; lowest attaining threshold is 0.65
    assert c.attained and float(c) == pytest.approx(0.65)
    assert c.ppv == pytest.approx(6 / 7) and c.sensitivity == pytest.approx(6 / 7) and c.n_calls == 7
    assert threshold_at_ppv(y, p, 0.8, min_calls=3) == pytest.approx(0.65)
    # a plain float, so it combines with the 'refer' threshold as callers expect
    assert max(threshold_at_ppv(y, p, 0.8, min_calls=3), 0.7) == pytest.approx(0.7)
    # unattainable: top score made negative, PPV 0.99 needs all calls right, min_calls=6
    c2 = choose_threshold_at_ppv(np.r_[0, y[1:]], p, 0.99, min_calls=6)
    assert not c2.attained and "not reachable" in c2.reason
    # eligible: 0.7 (4/6), .65 (5/7), .6 (5/8), ..., .3 (6/11): the best PPV is at .65
    assert float(c2) == pytest.approx(0.65) and c2.ppv == pytest.approx(5 / 7)
    assert json.dumps(c2.to_dict())
    with pytest.raises(ValueError, match="no positive"):
        threshold_at_ppv(np.zeros(11), p, 0.8)


def test_confusion_at_counts_and_cis():
    y = [1, 1, 1, 0, 0, 0, 0, 1]
    p = [0.9, 0.6, 0.4, 0.7, 0.2, 0.1, 0.5, 0.5]
    op = confusion_at(y, p, 0.5)  # >= 0.5 is positive
    assert (op.tp, op.fp, op.tn, op.fn) == (3, 2, 2, 1)
    assert op.sensitivity == pytest.approx(3 / 4) and op.specificity == pytest.approx(2 / 4)
    assert op.ppv == pytest.approx(3 / 5) and op.npv == pytest.approx(2 / 3)
    assert op.sensitivity_ci == pytest.approx(wilson_ci(3, 4))
    assert op.n == 8 and json.dumps(op.to_dict())
    none = confusion_at(y, p, 2.0)
    assert none.tp == 0 and math.isnan(none.ppv) and none.to_dict()["ppv"] is None


def test_ppv_npv_at_prevalence_bayes():
    ppv, npv = ppv_npv_at_prevalence(0.9, 0.8, 0.1)
    assert ppv == pytest.approx(0.09 / (0.09 + 0.18)) and npv == pytest.approx(0.72 / 0.73)
    # at the test set's own prevalence it reproduces the empirical PPV / NPV
    y, p = sample(2000, seed=61)
    op = confusion_at(y, p, 0.5)
    ppv2, npv2 = ppv_npv_at_prevalence(op.sensitivity, op.specificity, y.mean())
    assert ppv2 == pytest.approx(op.ppv) and npv2 == pytest.approx(op.npv)
    with pytest.raises(ValueError, match="prevalence"):
        ppv_npv_at_prevalence(0.9, 0.8, 1.5)
