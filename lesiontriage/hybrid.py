"""Close-up image score: the lesion aggregate blended with the direct whole-image classifier.

Why: the seed paper compares the two-stage path (detect -> classify crops -> aggregate) with a
direct whole-image classifier. On close-ups (dermoscopy, a clinical photo of one lesion) the two see
the same lesion in different ways: the crop classifier sees the detected box, which is sometimes a
part of the lesion or a neighbouring spot; the whole-image classifier sees the lesion in context.
Averaging them is an ensemble of the paper's two strategies, and on validation it beat both
(``lesiontriage train hybrid``; table in ``models/metadata.json`` ``pipeline.hybrid_choice``).

On a wide-field photo (several small moles) the whole-image classifier is out of its training
distribution (it was trained on close-ups), so the blend applies only when the largest kept lesion
box covers at least ``closeup_min_box_fraction`` of the image: that gate is set above every
wide-field validation photo (real mole photos + synthetic scenes). With ``whole_image_weight`` 0 the
score is the paper's pure two-stage score. Lesion probabilities (box colours) never change: only
the image-level triage score does, and the result says how it was made.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def largest_box_fraction(boxes: np.ndarray, width: float, height: float) -> float:
    """Area of the largest box / image area (boxes xyxy in the same pixel frame as width x height)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if not len(b) or width <= 0 or height <= 0:
        return 0.0
    areas = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    return float(areas.max() / (float(width) * float(height)))


@dataclass(frozen=True)
class HybridRule:
    """How a close-up's triage score combines the lesion aggregate and the whole-image score."""

    whole_image_weight: float = 0.0  # 0 = off: the pure two-stage score
    closeup_min_box_fraction: float = 0.15  # largest kept box / image area needed to call a photo a close-up

    def applies(self, boxes: np.ndarray, width: float, height: float) -> bool:
        """True for a close-up with at least one kept lesion, when the blend is switched on."""
        return self.whole_image_weight > 0 and largest_box_fraction(boxes, width, height) >= self.closeup_min_box_fraction

    def blend(self, lesion_score: float, whole_image_score: float) -> float:
        w = float(self.whole_image_weight)
        return (1.0 - w) * float(lesion_score) + w * float(whole_image_score)
