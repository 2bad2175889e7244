"""Calibration: expected calibration error with the bins of a reliability diagram, and temperature
scaling (binary and multiclass).

Why these definitions:

- The malignancy score is a probability of the positive class, so the binary ECE compares, per
  equal-width bin of p, the mean predicted p with the observed fraction of malignant lesions
  (not the 'confidence of the predicted class' variant, which folds p=0.1 and p=0.9 together).
  For the sub-type head, :func:`top_label_ece` uses the usual top-label definition.
- Temperature scaling keeps the ranking (AUC unchanged) and fixes over-confidence with one
  parameter fitted on validation. The negative log-likelihood is convex in 1/T, so a bounded
  scalar minimisation (scipy's Brent) finds the global optimum without torch.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit, logsumexp, softmax

log = logging.getLogger(__name__)

T_MIN, T_MAX = 0.05, 20.0


@dataclass(frozen=True)
class ReliabilityBins:
    """ECE plus everything needed to draw a reliability diagram.

    ``bin_edges`` has n_bins + 1 values; the other arrays have one value per bin, NaN for an empty
    bin. ``mce`` is the largest gap over non-empty bins.
    """

    ece: float
    mce: float
    bin_edges: np.ndarray
    mean_predicted: np.ndarray
    observed_frequency: np.ndarray
    counts: np.ndarray
    n: int

    def to_dict(self) -> dict[str, Any]:
        def clean(a: np.ndarray) -> list[Any]:
            return [None if (isinstance(v, float) and math.isnan(v)) else v for v in a.tolist()]

        return {
            "ece": None if math.isnan(self.ece) else self.ece,
            "mce": None if math.isnan(self.mce) else self.mce,
            "n": self.n,
            "bin_edges": self.bin_edges.tolist(),
            "mean_predicted": clean(self.mean_predicted),
            "observed_frequency": clean(self.observed_frequency),
            "counts": self.counts.astype(int).tolist(),
        }


def _check_probs(p: Sequence[float] | np.ndarray, name: str = "p") -> np.ndarray:
    arr = np.asarray(p, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of probabilities, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: {int((~np.isfinite(arr)).sum())} non-finite probabilities")
    if arr.size and (arr.min() < 0 or arr.max() > 1):
        raise ValueError(f"{name}: probabilities must lie in [0, 1], got [{arr.min():.4g}, {arr.max():.4g}]")
    return arr


def _check_labels(y: Sequence[Any] | np.ndarray, n: int, name: str = "y") -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"{name}: expected {n} labels, got shape {arr.shape}")
    try:
        arr = arr.astype(float)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: labels must be numeric") from None
    if np.isnan(arr).any():
        raise ValueError(f"{name}: {int(np.isnan(arr).sum())} missing labels")
    return arr


def _binned(conf: np.ndarray, outcome: np.ndarray, n_bins: int) -> ReliabilityBins:
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    n = int(conf.size)
    # bins [e0, e1), [e1, e2), ..., [e_{k-1}, 1]: p == 1 falls in the last bin
    idx = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, n_bins - 1)
    counts = np.bincount(idx, minlength=n_bins).astype(float)
    sum_p = np.bincount(idx, weights=conf, minlength=n_bins)
    sum_y = np.bincount(idx, weights=outcome, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.where(counts > 0, sum_p / counts, np.nan)
        freq = np.where(counts > 0, sum_y / counts, np.nan)
    if n == 0:
        return ReliabilityBins(float("nan"), float("nan"), edges, mean_p, freq, counts, 0)
    gaps = np.abs(freq - mean_p)
    nonempty = counts > 0
    ece = float(np.sum(counts[nonempty] / n * gaps[nonempty]))
    mce = float(np.max(gaps[nonempty]))
    return ReliabilityBins(ece, mce, edges, mean_p, freq, counts, n)


def expected_calibration_error(y: Sequence[Any], p: Sequence[float], n_bins: int = 15) -> ReliabilityBins:
    """Binary ECE with equal-width bins: sum_b (n_b / N) * |mean(y in b) - mean(p in b)|."""
    pp = _check_probs(p)
    yy = _check_labels(y, pp.size)
    if not np.isin(yy, (0.0, 1.0)).all():
        raise ValueError("y: binary ECE needs 0/1 labels")
    return _binned(pp, yy, n_bins)


def top_label_ece(y: Sequence[int], probs: np.ndarray, n_bins: int = 15) -> ReliabilityBins:
    """Top-label ECE for a multiclass head: bins the max probability, outcome = prediction correct."""
    pr = np.asarray(probs, dtype=float)
    if pr.ndim != 2:
        raise ValueError(f"probs: expected shape (N, C), got {pr.shape}")
    yy = _check_labels(y, pr.shape[0]).astype(int)
    conf = pr.max(axis=1)
    correct = (pr.argmax(axis=1) == yy).astype(float)
    return _binned(_check_probs(conf, "max prob"), correct, n_bins)


# --------------------------------------------------------------------------------------------
# temperature scaling
# --------------------------------------------------------------------------------------------

def prob_to_logit(p: Sequence[float] | np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """Logit of probabilities, clipped to [eps, 1 - eps] (for stored probabilities, not logits)."""
    arr = np.clip(np.asarray(p, dtype=float), eps, 1 - eps)
    return np.log(arr) - np.log1p(-arr)


def binary_nll(logits: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of sigmoid(logit / T), computed stably."""
    z = np.asarray(logits, dtype=float) / temperature
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def multiclass_nll(logits: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of softmax(logits / T)."""
    z = np.asarray(logits, dtype=float) / temperature
    return float(np.mean(logsumexp(z, axis=1) - z[np.arange(z.shape[0]), y]))


def _fit_inverse_temperature(nll_of_a, t_min: float, t_max: float) -> float:
    # NLL is convex in a = 1/T, so bounded Brent on a is exact up to tolerance.
    res = minimize_scalar(nll_of_a, bounds=(1.0 / t_max, 1.0 / t_min), method="bounded",
                          options={"xatol": 1e-6, "maxiter": 500})
    t = float(1.0 / res.x)
    if t <= t_min * 1.001 or t >= t_max * 0.999:
        log.warning("fitted temperature %.4g is at the bound [%g, %g]: the validation set may be "
                    "separable or one-class", t, t_min, t_max)
    return t


def fit_temperature(logits: Sequence[float], y: Sequence[Any], t_min: float = T_MIN,
                    t_max: float = T_MAX) -> float:
    """Temperature T minimising the NLL of sigmoid(logit / T) on validation, T in [t_min, t_max]."""
    z = np.asarray(logits, dtype=float)
    if z.ndim != 1:
        raise ValueError(f"logits: binary temperature needs a 1-D array, got shape {z.shape}")
    if not np.isfinite(z).all():
        raise ValueError(f"logits: {int((~np.isfinite(z)).sum())} non-finite values")
    yy = _check_labels(y, z.size)
    if not np.isin(yy, (0.0, 1.0)).all():
        raise ValueError("y: binary temperature scaling needs 0/1 labels")
    if z.size == 0:
        raise ValueError("fit_temperature: no samples")
    return _fit_inverse_temperature(lambda a: float(np.mean(np.logaddexp(0.0, a * z) - yy * a * z)),
                                    t_min, t_max)


def fit_temperature_multiclass(logits: np.ndarray, y: Sequence[int], t_min: float = T_MIN,
                               t_max: float = T_MAX) -> float:
    """Temperature T minimising the NLL of softmax(logits / T); logits (N, C), y class indices."""
    z = np.asarray(logits, dtype=float)
    if z.ndim != 2:
        raise ValueError(f"logits: expected shape (N, C), got {z.shape}")
    if not np.isfinite(z).all():
        raise ValueError(f"logits: {int((~np.isfinite(z)).sum())} non-finite values")
    yy = _check_labels(y, z.shape[0])
    if (yy != np.round(yy)).any() or yy.min(initial=0) < 0 or yy.max(initial=0) >= z.shape[1]:
        raise ValueError(f"y: class indices must be integers in [0, {z.shape[1] - 1}]")
    if z.shape[0] == 0:
        raise ValueError("fit_temperature_multiclass: no samples")
    yi = yy.astype(int)
    picked = z[np.arange(z.shape[0]), yi]
    return _fit_inverse_temperature(lambda a: float(np.mean(logsumexp(a * z, axis=1) - a * picked)),
                                    t_min, t_max)


def apply_temperature(logits: Sequence[float] | np.ndarray, temperature: float) -> np.ndarray:
    """Calibrated probabilities: sigmoid(z / T) for 1-D logits, softmax(z / T) over the last axis
    for 2-D logits."""
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    z = np.asarray(logits, dtype=float) / temperature
    if z.ndim <= 1:
        return expit(z)
    return softmax(z, axis=-1)

