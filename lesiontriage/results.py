"""Result dataclasses returned by :class:`lesiontriage.TriagePipeline`.

They hold raw per-lesion probabilities so the image score can be re-aggregated (mean / max /
noisy-OR) without re-running any network: the app's aggregation selector relies on that.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

INTENDED_USE = (
    "Research and education software. Not a medical device and not a diagnosis: "
    "any concerning skin lesion must be examined by a clinician."
)

SUBTYPES: tuple[str, ...] = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC", "OB")


@dataclass
class Lesion:
    """One detected lesion. ``box`` is [x1, y1, x2, y2] in original-image pixels."""

    index: int
    box: list[float]
    detector_score: float
    p_malignant: float
    subtypes: dict[str, float] = field(default_factory=dict)
    # P(this box fits a real lesion) from its place among the photo's detections (box_rescoring.py);
    # None when no box rescorer is shipped. Ranks boxes; never decides which lesions are kept.
    box_confidence: float | None = None
    # Context around the box in the crop the classifier scored (fraction of the box side; pipeline.crop_margin):
    # wider on a close-up when validation chose so. None: the classifier's trained margin (older results).
    crop_margin: float | None = None

    @property
    def top_subtype(self) -> str:
        return max(self.subtypes, key=self.subtypes.get) if self.subtypes else ""


@dataclass
class QualityReport:
    """Image-quality gate outcome: measured values plus human-readable warnings."""

    blur_laplacian_var: float
    mean_brightness: float
    dark_fraction: float
    bright_fraction: float
    min_side: int
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.warnings


@dataclass
class Tier:
    """Triage tier with the reason shown to the user."""

    name: str  # "routine" | "refer" | "urgent"
    reason: str
    driving_lesion: int | None  # index into TriageResult.lesions, None when no lesion


@dataclass
class TriageResult:
    """Everything one prediction produced."""

    source: str
    width: int
    height: int
    lesions: list[Lesion]
    aggregate: str
    image_score: float
    tier: Tier
    quality: QualityReport | None
    timings_ms: dict[str, float]
    mode: str = "two_stage"  # or "whole_image"
    model_version: str = ""
    intended_use: str = INTENDED_USE
    notes: list[str] = field(default_factory=list)  # e.g. "clinical covariates used (combined model)"
    # Close-up blend (lesiontriage.hybrid): image_score = (1 - w - f) * lesion_score
    #   + w * whole_image_score + f * full_frame_score; both weights are 0 when no blend was applied.
    lesion_score: float | None = None  # the lesion term: aggregate over lesions, or the main lesion's p (None: whole-image mode)
    whole_image_score: float | None = None  # the whole-image classifier's p, when it entered the score
    whole_image_weight: float = 0.0
    full_frame_score: float | None = None  # the lesion classifier's p on the whole photo, when it entered the score
    full_frame_weight: float = 0.0
    # Index into ``lesions`` of the main lesion (most confident detection) when its p alone was the lesion term: a
    # clinical close-up inside the soft gate's ramp (hybrid.HybridRule.lesion_term); None: the aggregate was.
    main_lesion: int | None = None

    @property
    def blended(self) -> bool:
        """True when the close-up blend made the image score."""
        return self.whole_image_weight > 0 or self.full_frame_weight > 0

    @property
    def n_lesions(self) -> int:
        return len(self.lesions)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["n_lesions"] = self.n_lesions
        return d

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)
