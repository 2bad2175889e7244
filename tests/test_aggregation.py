"""Aggregation registry: hand-computed values, a naive noisy-OR reference, 0 lesions, monotonicity."""
from __future__ import annotations

import math
from decimal import Decimal, getcontext
from functools import reduce

import numpy as np
import pytest

from lesiontriage import aggregation
from lesiontriage.aggregation import AGGREGATORS, EPS, aggregate, register

METHODS = ("mean", "max", "noisy_or")


def naive_noisy_or(p) -> float:
    return 1.0 - reduce(lambda acc, x: acc * (1.0 - x), p, 1.0)


def test_registry_has_the_three_rules():
    assert set(METHODS) <= set(AGGREGATORS)


@pytest.mark.parametrize("probs, expected", [
    ([0.2, 0.5], {"mean": 0.35, "max": 0.5, "noisy_or": 0.6}),  # 1 - 0.8 * 0.5
    ([0.1, 0.1, 0.1], {"mean": 0.1, "max": 0.1, "noisy_or": 0.271}),  # 1 - 0.9^3
    ([0.9], {"mean": 0.9, "max": 0.9, "noisy_or": 0.9}),
    ([0.0, 0.0], {"mean": 0.0, "max": 0.0, "noisy_or": 0.0}),
    ([0.5, 0.25, 0.75], {"mean": 0.5, "max": 0.75, "noisy_or": 1 - 0.5 * 0.75 * 0.25}),
])
def test_hand_computed(probs, expected):
    for method, value in expected.items():
        assert aggregate(probs, method) == pytest.approx(value, abs=1e-12), method


@pytest.mark.parametrize("method", METHODS)
def test_no_lesion_gives_zero(method):
    assert aggregate([], method) == 0.0
    assert aggregate(np.array([]), method, weights=[]) == 0.0


def test_noisy_or_matches_naive_reference():
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 30):
        for _ in range(50):
            p = rng.uniform(0, 0.999, n)
            assert aggregate(p, "noisy_or") == pytest.approx(naive_noisy_or(p), abs=1e-12)


def test_noisy_or_is_accurate_for_many_small_probabilities():
    """1000 lesions at p = 1e-9: the naive product loses most digits, log1p/expm1 keeps them."""
    p = [1e-9] * 1000
    getcontext().prec = 50
    exact = float(1 - (1 - Decimal("1e-9")) ** 1000)
    got = aggregate(p, "noisy_or")
    assert abs(got - exact) / exact < 1e-12
    assert abs(naive_noisy_or(p) - exact) / exact > 1e-9  # why the stable form matters


def test_noisy_or_clips_certain_lesions():
    assert aggregate([1.0], "noisy_or") == pytest.approx(1 - EPS, abs=1e-15)
    assert aggregate([1.0, 1.0, 0.3], "noisy_or") < 1.0
    assert math.isfinite(aggregate([1.0] * 100, "noisy_or"))


def test_unknown_method_lists_the_valid_names():
    with pytest.raises(ValueError) as info:
        aggregate([0.5], "median")
    msg = str(info.value)
    assert "'median'" in msg and all(m in msg for m in METHODS)
    with pytest.raises(ValueError):
        aggregate([], "median")  # validated even without lesions (the pipeline relies on it)


@pytest.mark.parametrize("bad", [[0.5, float("nan")], [1.2], [-0.1], [float("inf")]])
def test_invalid_probabilities(bad):
    with pytest.raises(ValueError):
        aggregate(bad, "mean")


def test_ordering_and_monotonicity():
    rng = np.random.default_rng(1)
    for _ in range(300):
        p = rng.uniform(0, 1, rng.integers(1, 8))
        mean, mx, nor = (aggregate(p, m) for m in METHODS)
        assert mean <= mx + 1e-12 and mx <= nor + 1e-12
        i = rng.integers(len(p))
        q = p.copy()
        q[i] = min(1.0, q[i] + rng.uniform(0, 0.5))
        for m in METHODS:  # raising one lesion's probability never lowers the score
            assert aggregate(q, m) >= aggregate(p, m) - 1e-12, m
        extra = np.append(p, rng.uniform(0, 1))
        # one more lesion never lowers max or noisy-OR (the mean may go either way)
        assert aggregate(extra, "max") >= mx - 1e-12
        assert aggregate(extra, "noisy_or") >= nor - 1e-12


def test_weights():
    p = [0.8, 0.2]
    for m in METHODS:
        assert aggregate(p, m, weights=[1, 1]) == pytest.approx(aggregate(p, m))
    assert aggregate(p, "mean", weights=[0.25, 0.75]) == pytest.approx(0.25 * 0.8 + 0.75 * 0.2)
    assert aggregate(p, "max", weights=[0.5, 1.0]) == pytest.approx(0.4)
    assert aggregate(p, "noisy_or", weights=[0.5, 1.0]) == pytest.approx(1 - 0.6 * 0.8)
    assert aggregate(p, "noisy_or", weights=[0.0, 1.0]) == pytest.approx(0.2)  # a discarded detection
    assert aggregate(p, "mean", weights=[0.0, 0.0]) == 0.0
    with pytest.raises(ValueError, match="2 probabilities but 1 weights"):
        aggregate(p, "mean", weights=[1.0])


def test_register_new_rule(monkeypatch):
    monkeypatch.setattr(aggregation, "AGGREGATORS", dict(AGGREGATORS))

    @register("second_highest")
    def _second(p, w):
        q = np.sort(w * p)
        return float(q[-2]) if q.size > 1 else float(q[-1])

    assert aggregate([0.1, 0.9, 0.5], "second_highest") == 0.5
    assert aggregate([], "second_highest") == 0.0
    with pytest.raises(ValueError, match="already registered"):
        register("mean")(lambda p, w: 0.0)
    assert "second_highest" not in AGGREGATORS  # the real registry is untouched
