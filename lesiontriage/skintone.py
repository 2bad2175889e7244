"""Skin tone from a photo: the Individual Typology Angle (ITA) of the skin around a lesion.

ITA = arctan((L* - 50) / b*) * 180 / pi in CIELAB (Chardon et al. 1991). Higher is lighter skin.
Categories (Chardon 1991; Del Bino and Bernerd 2013):

    very light   ITA > 55
    light        41 < ITA <= 55
    intermediate 28 < ITA <= 41
    tan          10 < ITA <= 28
    brown       -30 < ITA <= 10
    dark         ITA <= -30

Why these choices:

- Skin is sampled in a ring around the lesion box, excluding the box grown by a margin (lesion
  borders are fuzzy and boxes tight), because the lesion itself is pigmented and would bias
  the estimate dark. Without a box, a ring along the image border is used.
- Inside the ring, pixels that are not plausibly skin are dropped: near-black (dermoscope
  vignette, hair shadows) and specular highlights, then pixels whose L*, a* or b* lies far from
  the ring's median colour by a robust MAD rule (hair, pen marks, gel, ruler).
- The median of L* and of b* over the remaining pixels is used, not the mean (hair, freckles and
  shadows are heavy tails), and ITA is computed from those medians.
- Large photos are subsampled with a stride before the colour conversion: the median of a few
  hundred thousand pixels is as good as that of twelve million and the cost stays in milliseconds.

The estimate is only as good as the photo's white balance: a camera's colour cast shifts b* and
so ITA. It is a proxy for reporting metrics by skin tone, never a diagnosis.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

log = logging.getLogger(__name__)

# (name, lower bound exclusive); ordered from light to dark. 'dark' takes everything at or below -30.
ITA_CATEGORIES: tuple[tuple[str, float], ...] = (
    ("very_light", 55.0),
    ("light", 41.0),
    ("intermediate", 28.0),
    ("tan", 10.0),
    ("brown", -30.0),
    ("dark", -math.inf),
)
CATEGORY_NAMES: tuple[str, ...] = tuple(name for name, _ in ITA_CATEGORIES)

# Approximate correspondence used by Kinyanjui et al. 2020 ("Fairness of classifiers across skin
# tones in dermatology", MICCAI) and Groh et al. 2021 (Fitzpatrick 17k): one ITA band per
# Fitzpatrick type. It is a convention, not a physical identity: Fitzpatrick types describe the
# response to sun (burning / tanning), ITA the measured colour, and studies report only moderate
# correlation between the two.
ITA_TO_FITZPATRICK: dict[str, int] = {
    "very_light": 1,
    "light": 2,
    "intermediate": 3,
    "tan": 4,
    "brown": 5,
    "dark": 6,
}

MIN_SKIN_PIXELS = 200
MAX_SAMPLE_SIDE = 640


@dataclass(frozen=True)
class ItaEstimate:
    """ITA in degrees, its category, how many skin pixels supported it and whether to trust it.

    ``ok`` is False when too few skin pixels were found or the median b* is <= 1 (a colour cast,
    as in many dermoscopy photos, or not skin at all); ``reason`` then says why. ``ita`` may still be a number when not ok.
    """

    ita: float
    category: str | None
    n_pixels: int
    ok: bool
    median_l: float = float("nan")
    median_b: float = float("nan")
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


def ita_category(ita: float) -> str | None:
    """Category name for an ITA value (None for NaN)."""
    if ita is None or (isinstance(ita, float) and math.isnan(ita)):
        return None
    for name, lower in ITA_CATEGORIES:
        if ita > lower:
            return name
    return "dark"


def ita_from_lab(l_star: float, b_star: float) -> float:
    """ITA in degrees. arctan2 equals arctan((L - 50) / b) for b > 0 and stays defined at b = 0."""
    return float(math.degrees(math.atan2(l_star - 50.0, b_star)))


def ring_mask(shape: tuple[int, int], box: Sequence[float] | None, margin: float = 0.25,
              ring: float = 0.6, border: float = 0.12, min_margin_px: int = 3) -> np.ndarray:
    """Boolean (H, W) mask of the peri-lesional ring.

    With a box of size (w, h): the box grown by ``margin * max(w, h)`` (at least ``min_margin_px``)
    is excluded; the ring extends a further ``ring * max(w, h)`` (at least 10% of the shorter image
    side), clipped to the image. Without a box: a band of ``border`` times the shorter side along
    the image edges.
    """
    h, w = int(shape[0]), int(shape[1])
    mask = np.zeros((h, w), dtype=bool)
    if h == 0 or w == 0:
        return mask
    if box is None:
        t = max(1, int(round(border * min(h, w))))
        mask[:t, :] = True
        mask[-t:, :] = True
        mask[:, :t] = True
        mask[:, -t:] = True
        return mask
    x1, y1, x2, y2 = (float(v) for v in box)
    if not (x2 >= x1 and y2 >= y1):
        raise ValueError(f"box {list(box)}: expected [x1, y1, x2, y2] with x2 >= x1 and y2 >= y1")
    size = max(x2 - x1, y2 - y1, 1.0)
    m = max(margin * size, float(min_margin_px))
    r = max(ring * size, 0.10 * min(h, w))

    def clip_rect(pad: float) -> tuple[int, int, int, int]:
        return (max(0, int(math.floor(x1 - pad))), max(0, int(math.floor(y1 - pad))),
                min(w, int(math.ceil(x2 + pad))), min(h, int(math.ceil(y2 + pad))))

    ox1, oy1, ox2, oy2 = clip_rect(m + r)
    ix1, iy1, ix2, iy2 = clip_rect(m)
    mask[oy1:oy2, ox1:ox2] = True
    mask[iy1:iy2, ix1:ix2] = False
    return mask


def _to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB with L* in 0..100 and a*, b* in about -128..127 (skimage, sRGB D65)."""
    from skimage.color import rgb2lab

    return rgb2lab(rgb.astype(np.float64) / 255.0)


def skin_pixels(lab: np.ndarray, mask: np.ndarray, mad_k: float = 3.0) -> np.ndarray:
    """(K, 3) Lab values of the pixels in ``mask`` that look like skin (see module docstring).

    Absolute rules drop what is never skin (near-black, blown or colourless highlights); a robust
    per-channel rule then drops what differs from the ring's own median colour (hair, pen marks,
    gel bubbles, freckles). No absolute hue rule: dermoscopes and phones add colour casts (HAM10000
    skin often has b* < 0), and a hue cut-off would keep a biased handful of pixels from such
    photos; instead a cast shows up as a low median b* and the estimate is flagged.
    """
    px = lab[mask]
    if px.size == 0:
        return px.reshape(0, 3)
    L, a, b = px[:, 0], px[:, 1], px[:, 2]
    chroma = np.hypot(a, b)
    keep = (L > 8.0) & (L < 97.0)                     # vignette / black hair; blown highlights
    keep &= ~((L > 80.0) & (chroma < 6.0))            # specular: bright and colourless
    px = px[keep]
    if px.shape[0] < 10:
        return px
    med = np.median(px, axis=0)
    mad = 1.4826 * np.median(np.abs(px - med), axis=0)
    spread = np.maximum(mad, 2.0)
    inlier = (np.abs(px - med) <= mad_k * spread).all(axis=1)
    return px[inlier]


def estimate_ita(rgb: np.ndarray, box: Sequence[float] | None = None,
                 min_pixels: int = MIN_SKIN_PIXELS, margin: float = 0.25, ring: float = 0.6) -> ItaEstimate:
    """ITA of the peri-lesional skin of an RGB uint8 image (H, W, 3); ``box`` xyxy in its pixels.

    Never raises for an unusable image: returns ``ok=False`` with a reason (malformed arrays and
    boxes do raise ValueError, they are programming errors).
    """
    arr = np.asarray(rgb)
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, :3]
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"estimate_ita: expected an RGB array (H, W, 3), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and arr.size and arr.max() <= 1.0:
            arr = np.clip(arr * 255.0, 0, 255)
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    h, w = arr.shape[:2]
    stride = max(1, int(math.ceil(max(h, w) / MAX_SAMPLE_SIDE)))
    # A lesion box that nearly fills the photo (common in close-ups) leaves no ring once grown by
    # the full margin: shrink the margin before giving up, keeping the box itself excluded.
    for m in (margin, margin / 3.0, 0.0):
        mask = ring_mask((h, w), box, margin=m, ring=ring)[::stride, ::stride]
        if box is None or mask.sum() >= 2 * min_pixels:
            break
    arr = arr[::stride, ::stride]
    if not mask.any():
        return ItaEstimate(float("nan"), None, 0, False, reason="empty ring (box covers the image)")
    px = skin_pixels(_to_lab(arr), mask)
    n = int(px.shape[0])
    if n == 0:
        return ItaEstimate(float("nan"), None, 0, False, reason="no skin-coloured pixels in the ring")
    med_l, med_b = float(np.median(px[:, 0])), float(np.median(px[:, 2]))
    # ITA is defined for b* > 0 only (arctan2 beyond +-90 degrees would read as very light / dark)
    ita = ita_from_lab(med_l, med_b) if med_b > 0 else float("nan")
    reasons = []
    if n < min_pixels:
        reasons.append(f"only {n} skin pixels (< {min_pixels})")
    if med_b <= 1.0:
        reasons.append(f"median b* {med_b:.1f} <= 1: colour cast or not skin, ITA unreliable")
    return ItaEstimate(ita, ita_category(ita), n, not reasons, med_l, med_b, "; ".join(reasons))


# --------------------------------------------------------------------------------------------
# agreement with recorded Fitzpatrick types
# --------------------------------------------------------------------------------------------

_ROMAN = {"I": 1, "II": 2, "III": 3, "IV": 4, "V": 5, "VI": 6}


def parse_fitzpatrick(value: Any) -> int | None:
    """1..6 from 1, 2.0, '3', 'IV', 'type V', 'FST4'; None for missing or unparseable values."""
    if value is None:
        return None
    if isinstance(value, (int, float, np.integer, np.floating)):
        if isinstance(value, (float, np.floating)) and math.isnan(value):
            return None
        v = int(round(float(value)))
        return v if 1 <= v <= 6 and abs(float(value) - v) < 1e-9 else None
    s = str(value).strip().upper()
    for prefix in ("FITZPATRICK", "TYPE", "FST", "FT"):
        if s.startswith(prefix):
            s = s[len(prefix):].strip(" :-_")
    if s in _ROMAN:
        return _ROMAN[s]
    try:
        return parse_fitzpatrick(float(s))
    except ValueError:
        return None


def agreement_with_fitzpatrick(ita_values: Sequence[float], fitz: Sequence[Any]) -> dict[str, Any]:
    """How well ITA tracks recorded Fitzpatrick types, on pairs where both are known.

    Returns Spearman's rho between ITA and the Fitzpatrick type (expected negative: lighter skin,
    higher ITA, lower type) with its p-value, the exact and within-one agreement and the
    linearly weighted Cohen's kappa of the ITA-implied type (``ITA_TO_FITZPATRICK``) against the
    recorded one, and a cross-tab {ita_category: {fitzpatrick: count}}.
    """
    from scipy.stats import spearmanr
    from sklearn.metrics import cohen_kappa_score

    ita = np.asarray(ita_values, dtype=float)
    if len(ita) != len(fitz):
        raise ValueError(f"agreement_with_fitzpatrick: {len(ita)} ITA values for {len(fitz)} Fitzpatrick values")
    ft = np.array([parse_fitzpatrick(v) or 0 for v in fitz])
    ok = np.isfinite(ita) & (ft > 0)
    ita, ft = ita[ok], ft[ok]
    cats = [ita_category(float(v)) for v in ita]
    implied = np.array([ITA_TO_FITZPATRICK[c] for c in cats], dtype=int) if cats else np.zeros(0, int)
    crosstab = {c: {f: 0 for f in range(1, 7)} for c in CATEGORY_NAMES}
    for c, f in zip(cats, ft):
        crosstab[c][int(f)] += 1
    n = int(ok.sum())
    nan = float("nan")
    out: dict[str, Any] = {
        "n": n,
        "n_missing": int(len(ok) - n),
        "spearman_rho": nan,
        "spearman_p": nan,
        "exact_agreement": nan,
        "within_one_agreement": nan,
        "weighted_kappa": nan,
        "crosstab": crosstab,
        "mapping": dict(ITA_TO_FITZPATRICK),
        "mapping_note": ("ITA band -> Fitzpatrick type as in Kinyanjui et al. 2020 / Groh et al. 2021; "
                         "an approximate convention (colour vs sun reaction)"),
    }
    if n >= 3 and len(np.unique(ft)) > 1 and len(np.unique(ita)) > 1:
        rho, p = spearmanr(ita, ft)
        out["spearman_rho"], out["spearman_p"] = float(rho), float(p)
    if n:
        out["exact_agreement"] = float(np.mean(implied == ft))
        out["within_one_agreement"] = float(np.mean(np.abs(implied - ft) <= 1))
        if len(np.unique(np.r_[implied, ft])) > 1:
            out["weighted_kappa"] = float(cohen_kappa_score(ft, implied, weights="linear",
                                                            labels=list(range(1, 7))))
    return out
