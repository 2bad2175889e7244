"""Close-up image score: the lesion aggregate blended with two whole-frame views of the photo.

Why: the seed paper compares the two-stage path (detect -> classify crops -> aggregate) with a
direct whole-image classifier. On close-ups (dermoscopy, a clinical photo of one lesion) the crop
classifier sees the detected box, which is sometimes a part of the lesion or a neighbouring spot,
while a view of the whole frame sees the lesion whole and in context. Two such views exist:

* the **direct whole-image classifier** (the paper's baseline, trained on whole photos), and
* the **full-frame view**: the lesion classifier itself applied to the whole photo, as if the
  frame were one lesion crop. On a close-up that *is* what the classifier was trained on (a lesion
  with some skin around it), without the detector's cropping errors.

The close-up score is a weighted mean ``w_lesion x lesion aggregate + w_whole x whole-image p +
w_frame x full-frame p`` (the weights sum to 1): an ensemble of the paper's strategies, chosen on
validation by ``lesiontriage train hybrid`` (table in ``models/metadata.json`` ``pipeline.hybrid_choice``).

On a wide-field photo (several small moles) both frame views are out of distribution (neither
model was trained on scenes), so the blend applies only when the largest kept lesion box covers at
least ``closeup_min_box_fraction`` of the image. ``train hybrid`` sets that gate above every wide-field
validation photo (real mole photos + synthetic scenes; 15%, pushed there by one 14% box); since stop 33
``train closeup-rule`` re-chooses it on every labelled validation photo with the labelled validation scenes' AUC as
the guard (train/closeup_rule.py): 5%. Optionally (``ramp_from``, a "soft gate") the views'
weights do not drop to 0 just under the gate but shrink linearly from full at the gate to 0 at
``ramp_from``: a clinical close-up whose detected box covers only 10% of the frame still gets most
of the frame views' help (validation: derm7pt clinical 0.756 -> 0.784), while a wide-field photo,
whose largest mole box covers < 1% of the frame (median), gets none. With both weights 0 the score
is the paper's pure two-stage score.

When the detector keeps no lesion at all, the two-stage score is 0 by definition, which makes a
close-up whose lesion the detector missed "routine": 7 of the 38 such ISIC 2018 test photos are
malignant. With ``no_lesion_views`` the score of such a photo is the two views' weighted mean instead
(the lesion aggregate's weight is 0; validation macro AUC 0.855 -> 0.878, mostly PAD-UFES-20 and SD-198).

**Main lesion in the ramp** (``ramp_primary_lesion``): a photo whose largest kept box covers between ``ramp_from``
and the gate of the frame (2-15%) is typically a clinical close-up: one lesion the photo was taken of, plus a few
spots, freckles or hair-line detections around it (derm7pt clinical validation photos: median 3 kept boxes). The
mean over all of them dilutes the lesion the photo is about, so there the lesion term is the p of the detector's most
confident box (the "main lesion"), whatever the aggregate. Frame-filling dermoscopy lesions (above the gate) keep the
aggregate: their several boxes are mostly parts of one lesion, and averaging them helped. Wide-field photos (under
``ramp_from``) keep it too. ``lesiontriage train hybrid`` switches it on only when it gains on its validation sample
*and* on every labelled validation photo (train/main_lesion_check.py). Stop 32: the sample gained (macro AUC 0.9017
-> 0.9082, derm7pt clinical 0.793 -> 0.824; 0.8963 -> 0.9013 with the previous lesion classifier), all 802 photos
gained only 0.9031 -> 0.9072 (derm7pt clinical 0.812 -> 0.821), under the 0.005 bar: ``train hybrid`` leaves it off.
Stop 33: with the 5% gate (ramp 2-5%) it adds +0.0001 on every labelled validation photo: off (``train closeup-rule``).

Lesion probabilities (box colours) never change: only the image-level triage score does, and the
result says how it was made.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from lesiontriage.aggregation import aggregate


def largest_box_fraction(boxes: np.ndarray, width: float, height: float) -> float:
    """Area of the largest box / image area (boxes xyxy in the same pixel frame as width x height)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if not len(b) or width <= 0 or height <= 0:
        return 0.0
    areas = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    return float(areas.max() / (float(width) * float(height)))


def main_lesion_index(detector_scores: Sequence[float]) -> int:
    """The photo's main lesion: its most confident detection (the first on a tie, i.e. the detector's order)."""
    scores = np.asarray(detector_scores, dtype=np.float64).reshape(-1)
    if not len(scores):
        raise ValueError("a photo without a kept lesion has no main lesion")
    return int(np.argmax(scores))


@dataclass(frozen=True)
class HybridRule:
    """How a close-up's triage score combines the lesion aggregate and the two whole-frame views."""

    whole_image_weight: float = 0.0  # direct whole-image classifier; 0 with full_frame_weight 0 = off
    closeup_min_box_fraction: float = 0.15  # largest kept box / image area needed to call a photo a close-up
    full_frame_weight: float = 0.0  # the lesion classifier on the whole frame
    ramp_from: float | None = None  # soft gate: views' weights ramp 0 -> full between this fraction and the gate
    no_lesion_views: bool = False  # no lesion kept: score from the two views alone (else 0 by definition)
    ramp_primary_lesion: bool = False  # in the soft gate's ramp the lesion term is the main lesion's p, not the aggregate

    def __post_init__(self) -> None:
        w, f = float(self.whole_image_weight), float(self.full_frame_weight)
        if w < 0 or f < 0 or w + f > 1 + 1e-9:
            raise ValueError(f"close-up blend weights must be >= 0 and sum to <= 1, got whole {w}, full frame {f}")
        if self.ramp_from is not None and not 0 <= float(self.ramp_from) < float(self.closeup_min_box_fraction):
            raise ValueError(f"ramp_from must lie in [0, gate {self.closeup_min_box_fraction}), got {self.ramp_from}")

    def view_scale(self, box_fraction: float) -> float:
        """Share of the views' weights a photo gets: 1 at or above the gate, 0 below it (hard gate) or
        linearly down to 0 at ``ramp_from`` (soft gate)."""
        gate = float(self.closeup_min_box_fraction)
        if box_fraction >= gate:
            return 1.0
        if self.ramp_from is None or box_fraction <= self.ramp_from:
            return 0.0
        return (box_fraction - float(self.ramp_from)) / (gate - float(self.ramp_from))

    def for_photo(self, boxes: np.ndarray, width: float, height: float) -> HybridRule | None:
        """The blend this photo gets, or None when none applies: see :meth:`for_fraction`."""
        has_lesion = bool(len(np.asarray(boxes).reshape(-1, 4)))
        return self.for_fraction(largest_box_fraction(boxes, width, height) if has_lesion else 0.0, has_lesion)

    def for_fraction(self, box_fraction: float, has_lesion: bool = True) -> HybridRule | None:
        """The blend for a photo whose largest kept box covers ``box_fraction`` of it: the weights scaled
        by :meth:`view_scale`; with no kept lesion the views alone (``no_lesion_views``, weights renormalised
        to sum to 1). None: the pure two-stage score (blend off, under the gate / ramp, or no lesion)."""
        if not self.active:
            return None
        if not has_lesion:
            if not self.no_lesion_views:
                return None
            total = float(self.whole_image_weight) + float(self.full_frame_weight)
            return HybridRule(self.whole_image_weight / total, self.closeup_min_box_fraction, self.full_frame_weight / total)
        k = self.view_scale(box_fraction)
        if k <= 0:
            return None
        return HybridRule(self.whole_image_weight * k, self.closeup_min_box_fraction, self.full_frame_weight * k)

    def uses_main_lesion(self, box_fraction: float) -> bool:
        """True when a photo whose largest kept box covers ``box_fraction`` of it is scored on its main lesion:
        the blend is on, ``ramp_primary_lesion`` is set and the photo lies inside the soft gate's ramp."""
        return (self.active and self.ramp_primary_lesion and self.ramp_from is not None
                and 0.0 < self.view_scale(box_fraction) < 1.0)

    def lesion_term(self, p: Sequence[float], detector_scores: Sequence[float], aggregate_name: str,
                    box_fraction: float) -> tuple[float, int | None]:
        """(lesion term of the image score, index of the main lesion when it stood in for the aggregate, else None).
        ``p`` and ``detector_scores`` are the kept lesions' malignancy and detection scores, in the same order;
        no lesion gives 0 (the aggregate of nothing)."""
        p = np.asarray(p, dtype=np.float64).reshape(-1)
        if len(p) and self.uses_main_lesion(box_fraction):
            main = main_lesion_index(detector_scores)
            return float(p[main]), main
        return float(aggregate(p, aggregate_name)), None

    @property
    def lesion_weight(self) -> float:
        return 1.0 - float(self.whole_image_weight) - float(self.full_frame_weight)

    @property
    def active(self) -> bool:
        return self.whole_image_weight > 0 or self.full_frame_weight > 0

    def applies(self, boxes: np.ndarray, width: float, height: float) -> bool:
        """True when :meth:`for_photo` blends this photo at all."""
        return self.for_photo(boxes, width, height) is not None

    def blend(self, lesion_score: float, whole_image_score: float | None = None,
              full_frame_score: float | None = None) -> float:
        """The close-up score; a view with weight > 0 must be given."""
        out = self.lesion_weight * float(lesion_score)
        for weight, score, name in ((self.whole_image_weight, whole_image_score, "whole-image"),
                                    (self.full_frame_weight, full_frame_score, "full-frame")):
            if weight > 0:
                if score is None:
                    raise ValueError(f"the close-up blend gives the {name} view weight {weight} but no {name} score")
                out += float(weight) * float(score)
        return out

    def describe(self, aggregate_label: str, lesion_score: float, whole_image_score: float | None,
                 full_frame_score: float | None, main_lesion: int | None = None) -> str:
        """'blended score (0.5 x lesion mean 0.20 + 0.25 x whole-image classifier 0.60 + ...)'; with
        ``main_lesion`` (0-based) the lesion term reads 'main lesion #k' instead of the aggregate."""
        what = f"main lesion #{main_lesion + 1}" if main_lesion is not None else f"lesion {aggregate_label}"
        lesion_part = [f"{self.lesion_weight:.2g} x {what} {lesion_score:.2f}"] if self.lesion_weight > 1e-9 else []
        parts = [*lesion_part, *self.view_terms(whole_image_score, full_frame_score)]
        return "blended score (" + " + ".join(parts) + ")"

    def view_terms(self, whole_image_score: float | None, full_frame_score: float | None) -> list[str]:
        """'0.2 x whole-image classifier 0.08', '0.6 x lesion classifier on the whole photo 0.11' for the
        views that entered the score: the one wording of the tier reason and the app's caption."""
        terms = []
        if self.whole_image_weight > 0 and whole_image_score is not None:
            terms.append(f"{self.whole_image_weight:.2g} x whole-image classifier {whole_image_score:.2f}")
        if self.full_frame_weight > 0 and full_frame_score is not None:
            terms.append(f"{self.full_frame_weight:.2g} x lesion classifier on the whole photo {full_frame_score:.2f}")
        return terms
