"""Operating points: choosing thresholds on validation and reading a confusion matrix at a threshold.

Convention everywhere: a score ``p >= threshold`` is a positive call ('refer'). Thresholds are
chosen on validation and only *applied* to test (DESIGN.md section 5).

- 'refer' uses :func:`threshold_at_sensitivity`: the highest threshold that still catches at least
  the target share of malignant lesions (highest = fewest false referrals for that sensitivity).
- 'urgent' uses :func:`threshold_at_ppv` (details in :func:`choose_threshold_at_ppv`): the lowest threshold whose PPV reaches the target, so
  that as many malignant lesions as possible are flagged urgent at that precision. PPV is not
  monotone in the threshold and is noisy when few lesions are called, so a minimum number of
  positive calls is required, and when the target cannot be reached the threshold with the best
  PPV is returned with ``attained=False`` instead of failing.
- Sensitivity, specificity, PPV and NPV carry 95% Wilson score intervals (good coverage at the
  small counts and extreme proportions we have, unlike the Wald interval).
- PPV and NPV depend on prevalence; :func:`ppv_npv_at_prevalence` re-computes them by Bayes' rule
  for a setting (e.g. primary care) whose prevalence differs from the test set's.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
from scipy.stats import norm

from lesiontriage.evaluate.metrics import _as_binary, _as_scores

log = logging.getLogger(__name__)


def _clean(d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, float) and math.isnan(v):
            v = None
        elif isinstance(v, tuple):
            v = [None if (isinstance(x, float) and math.isnan(x)) else x for x in v]
        out[k] = v
    return out


def wilson_ci(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion k / n; (nan, nan) when n == 0."""
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"wilson_ci: need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return (float("nan"), float("nan"))
    z = float(norm.ppf(1 - alpha / 2))
    phat = k / n
    denom = 1 + z * z / n
    centre = (phat + z * z / (2 * n)) / denom
    half = z * math.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def _ratio(a: int, b: int) -> float:
    return a / b if b else float("nan")


@dataclass(frozen=True)
class OperatingPoint:
    """Confusion matrix at one threshold with the derived rates and their 95% Wilson CIs."""

    threshold: float
    sensitivity: float
    specificity: float
    ppv: float
    npv: float
    tp: int
    fp: int
    tn: int
    fn: int
    sensitivity_ci: tuple[float, float] = (float("nan"), float("nan"))
    specificity_ci: tuple[float, float] = (float("nan"), float("nan"))
    ppv_ci: tuple[float, float] = (float("nan"), float("nan"))
    npv_ci: tuple[float, float] = (float("nan"), float("nan"))

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.tn + self.fn

    def to_dict(self) -> dict[str, Any]:
        d = _clean(asdict(self))
        d["n"] = self.n
        return d


def confusion_at(y: Sequence[Any], p: Sequence[float], thr: float) -> OperatingPoint:
    """Counts and rates for the rule ``p >= thr`` means positive."""
    yy = _as_binary(y)
    pp = _as_scores(p, len(yy))
    if not isinstance(thr, (int, float, np.floating)) or math.isnan(float(thr)):
        raise ValueError(f"confusion_at: threshold must be a number, got {thr!r}")
    call = pp >= thr
    pos = yy == 1
    tp = int(np.count_nonzero(call & pos))
    fp = int(np.count_nonzero(call & ~pos))
    fn = int(np.count_nonzero(~call & pos))
    tn = int(np.count_nonzero(~call & ~pos))
    return OperatingPoint(
        threshold=float(thr),
        sensitivity=_ratio(tp, tp + fn), specificity=_ratio(tn, tn + fp),
        ppv=_ratio(tp, tp + fp), npv=_ratio(tn, tn + fn),
        tp=tp, fp=fp, tn=tn, fn=fn,
        sensitivity_ci=wilson_ci(tp, tp + fn), specificity_ci=wilson_ci(tn, tn + fp),
        ppv_ci=wilson_ci(tp, tp + fp), npv_ci=wilson_ci(tn, tn + fn),
    )


def threshold_at_sensitivity(y: Sequence[Any], p: Sequence[float], target: float = 0.95) -> float:
    """The highest threshold t with sensitivity(p >= t) >= target.

    It is always a positive's score: the k-th highest positive score with k = ceil(target * n_pos).
    Tied scores are all called positive at t, so the achieved sensitivity can exceed the target.
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"threshold_at_sensitivity: target must be in (0, 1], got {target}")
    yy = _as_binary(y)
    pp = _as_scores(p, len(yy))
    pos = np.sort(pp[yy == 1])[::-1]
    if pos.size == 0:
        raise ValueError("threshold_at_sensitivity: no positive samples, sensitivity is undefined")
    # small tolerance so that e.g. 0.95 * 20 = 19.000000000000004 needs 19, not 20, positives
    k = max(1, math.ceil(target * pos.size - 1e-9))
    return float(pos[k - 1])


@dataclass(frozen=True)
class ThresholdChoice:
    """A threshold chosen for a PPV target. ``float(choice)`` is the threshold."""

    threshold: float
    ppv: float
    sensitivity: float
    n_calls: int
    target_ppv: float
    attained: bool
    reason: str

    def __float__(self) -> float:
        return self.threshold

    def to_dict(self) -> dict[str, Any]:
        return _clean(asdict(self))


def _sweep(yy: np.ndarray, pp: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct thresholds (descending) with tp and number of calls at each (p >= t)."""
    order = np.argsort(-pp, kind="stable")
    s, lab = pp[order], yy[order]
    tp = np.cumsum(lab)
    calls = np.arange(1, s.size + 1)
    end = np.r_[s[:-1] != s[1:], True]  # last of each tie group
    return s[end], tp[end], calls[end]


def choose_threshold_at_ppv(y: Sequence[Any], p: Sequence[float], target_ppv: float,
                            min_calls: int = 5) -> ThresholdChoice:
    """The lowest threshold whose PPV >= target_ppv among thresholds with >= ``min_calls`` positive
    calls (maximises sensitivity at that precision).

    Fallback when no such threshold exists: the threshold with the highest PPV (ties: the lowest
    such threshold) among those with enough calls, marked ``attained=False``; if even the top score
    alone has fewer than ``min_calls`` calls, all thresholds are eligible.
    """
    if not 0.0 < target_ppv <= 1.0:
        raise ValueError(f"choose_threshold_at_ppv: target_ppv must be in (0, 1], got {target_ppv}")
    yy = _as_binary(y)
    pp = _as_scores(p, len(yy))
    n_pos = int(yy.sum())
    if n_pos == 0:
        raise ValueError("choose_threshold_at_ppv: no positive samples, PPV cannot be reached")
    thr, tp, calls = _sweep(yy, pp)
    ppv = tp / calls
    eligible = calls >= min_calls
    if not eligible.any():
        eligible = np.ones_like(eligible)
    ok = eligible & (ppv >= target_ppv - 1e-12)
    if ok.any():
        i = int(np.flatnonzero(ok)[-1])  # thresholds descend: the last one is the lowest
        reason = f"lowest threshold with PPV >= {target_ppv:g} and >= {min_calls} calls"
        attained = True
    else:
        best = ppv[eligible].max()
        i = int(np.flatnonzero(eligible & (ppv >= best - 1e-12))[-1])
        reason = (f"PPV {target_ppv:g} not reachable with >= {min_calls} calls; "
                  f"threshold with the best PPV ({best:.3f}) used instead")
        attained = False
        log.warning("choose_threshold_at_ppv: %s", reason)
    return ThresholdChoice(float(thr[i]), float(ppv[i]), float(tp[i] / n_pos), int(calls[i]),
                           float(target_ppv), attained, reason)


def threshold_at_ppv(y: Sequence[Any], p: Sequence[float], target_ppv: float, min_calls: int = 5) -> float:
    """The threshold of :func:`choose_threshold_at_ppv` as a plain float (for 'urgent').

    When the target PPV is unreachable the best-PPV threshold is returned and a warning logged;
    call :func:`choose_threshold_at_ppv` to get the achieved PPV and the ``attained`` flag.
    """
    return choose_threshold_at_ppv(y, p, target_ppv, min_calls=min_calls).threshold


def ppv_npv_at_prevalence(sens: float, spec: float, prevalence: float) -> tuple[float, float]:
    """PPV and NPV by Bayes' rule for a population with the given prevalence.

    PPV = sens*prev / (sens*prev + (1-spec)*(1-prev)); NPV = spec*(1-prev) / (spec*(1-prev) + (1-sens)*prev).
    """
    for name, v in (("sens", sens), ("spec", spec), ("prevalence", prevalence)):
        if not (0.0 <= v <= 1.0):
            raise ValueError(f"ppv_npv_at_prevalence: {name} must be in [0, 1], got {v}")
    tp = sens * prevalence
    fp = (1 - spec) * (1 - prevalence)
    tn = spec * (1 - prevalence)
    fn = (1 - sens) * prevalence
    ppv = tp / (tp + fp) if tp + fp > 0 else float("nan")
    npv = tn / (tn + fn) if tn + fn > 0 else float("nan")
    return float(ppv), float(npv)
