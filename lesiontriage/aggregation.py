"""Image score from per-lesion malignancy probabilities: a small registry of aggregators.

``aggregate(probs, "mean" | "max" | "noisy_or")`` turns the p_malignant of every lesion found in a
photo into one image-level score. New rules register themselves with ``@register("name")``
(as timm registers models), so the CLI, the app selector and the tier fitting pick them up.

* ``mean``     the average lesion: robust to one noisy lesion, but dilutes one bad lesion among
               many benign moles.
* ``max``      the worst lesion: what a clinician triages on.
* ``noisy_or`` 1 - prod_i (1 - p_i): the probability that at least one lesion is malignant if
               lesions were independent. (Seed 000 printed a different formula; this is the
               standard noisy-OR.) Computed as -expm1(sum log1p(-p_i)) so that many small
               probabilities do not underflow to 0 or round to 1.

**No lesion found.** Every aggregator returns 0.0 for an empty list: no detected lesion means no
evidence of malignancy in the image. It is *not* a statement that the skin is healthy; the
pipeline reports "no lesion found" separately (tier reason, lesion count), so the user is told
to retake the photo or use the whole-image mode rather than being reassured by the 0.

**Optional weights** (e.g. detector scores in [0, 1]) are read as the probability that each
detection is a real lesion: ``max`` and ``noisy_or`` then use P(real and malignant) = w_i p_i,
and ``mean`` becomes the w-weighted average. All-ones weights give the plain rules.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

#: An aggregator maps probabilities p (shape [n], n >= 1, in [0, 1]) and weights w (same shape,
#: in [0, 1]) to one score in [0, 1].
Aggregator = Callable[[np.ndarray, np.ndarray], float]

AGGREGATORS: dict[str, Aggregator] = {}

#: noisy-OR clips p to [0, 1 - EPS] so log1p(-p) stays finite.
EPS = 1e-7


def register(name: str) -> Callable[[Aggregator], Aggregator]:
    """Decorator adding an aggregator under ``name`` (a duplicate name is an error, not an override)."""

    def deco(fn: Aggregator) -> Aggregator:
        if name in AGGREGATORS:
            raise ValueError(f"aggregator {name!r} is already registered")
        AGGREGATORS[name] = fn
        return fn

    return deco


@register("mean")
def _mean(p: np.ndarray, w: np.ndarray) -> float:
    total = float(w.sum())
    return float((w * p).sum() / total) if total > 0 else 0.0


@register("max")
def _max(p: np.ndarray, w: np.ndarray) -> float:
    return float((w * p).max())


@register("noisy_or")
def _noisy_or(p: np.ndarray, w: np.ndarray) -> float:
    q = np.clip(w * p, 0.0, 1.0 - EPS)
    return float(-np.expm1(np.log1p(-q).sum()))


def _as_unit_array(values: Sequence[float], what: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} must be finite, got {arr.tolist()}")
    if arr.size and (arr.min() < -1e-6 or arr.max() > 1 + 1e-6):
        raise ValueError(f"{what} must lie in [0, 1], got min {arr.min():.6g}, max {arr.max():.6g}")
    return np.clip(arr, 0.0, 1.0)


def aggregate(probs: Sequence[float], method: str, weights: Sequence[float] | None = None) -> float:
    """Image score in [0, 1] from per-lesion probabilities; 0.0 when there is no lesion.

    Raises ValueError for an unknown ``method`` (listing the valid ones), for probabilities or
    weights outside [0, 1] or not finite, and for weights of the wrong length.
    """
    fn = AGGREGATORS.get(method)
    if fn is None:
        raise ValueError(f"unknown aggregation {method!r}: choose one of {', '.join(AGGREGATORS)}")
    p = _as_unit_array(probs, "probabilities")
    if weights is None:
        w = np.ones_like(p)
    else:
        w = _as_unit_array(weights, "weights")
        if w.shape != p.shape:
            raise ValueError(f"got {p.size} probabilities but {w.size} weights")
    if p.size == 0:
        return 0.0
    return float(fn(p, w))
