"""Box confidence: how likely a detection is a well-placed box around a real lesion, from its context.

Why: the detector's score says "this is lesion-like", not "this box fits the lesion". On dermoscopy
close-ups it scores a box around one lobe or a dark globule as highly as the box around the whole
lesion; on the HAM10000 validation photos the best detection had IoU >= 0.5 with the lesion on 92% of
photos but the top-scored one on only 81% (after lobe merging). Whether a box is the lesion is
visible in simple geometry the detector's per-box head never sees together: the box's rank and score
relative to the photo's other boxes, its size and position in the frame, whether it touches the
border, how much it overlaps a better-scored box, how many confident boxes the photo has (one
close-up lesion or a back full of moles).

:class:`BoxRescorer` is a one-hidden-layer perceptron over those :data:`FEATURE_NAMES`, trained on
validation detections by ``lesiontriage train box-rescorer`` (labels: IoU >= 0.5 with a ground-truth
box) and shipped as ``models/box_rescorer.safetensors``. Its output is the reported
``Lesion.box_confidence`` and the score the evaluation ranks boxes by for mAP. It does **not** decide
which boxes are kept or classified: that stays the detector score's rule (:mod:`box_selection`), so
the malignancy path and its validated thresholds are unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

# The feature vector of one box (every value scale-free: fractions of the photo, ranks, scores).
FEATURE_NAMES: tuple[str, ...] = (
    "score",  # detector score
    "log_rank",  # log(1 + rank by score within the photo); 0 for the best box
    "log_area",  # log of the box area as a fraction of the photo
    "width",  # box width / photo width
    "height",  # box height / photo height
    "centre_distance",  # distance of the box centre from the photo centre (fractions of the sides)
    "border_edges",  # how many of the box's edges lie within 2% of the photo border (0-4)
    "iou_with_better",  # largest IoU with a higher-scored box
    "log_confident",  # log(1 + number of boxes with score >= 0.5 in the photo)
    "score_vs_best",  # score / the photo's best score
    "area_vs_largest",  # area / the photo's largest box area
    "confident_area",  # summed area fraction of the photo's boxes with score >= 0.5
    "is_top",  # 1 for the best-scored box
    "best_score",  # the photo's best score
)
CONFIDENT = 0.5  # the score that counts a box as confident in the photo-level features
BORDER = 0.02  # an edge this close to the photo border (fraction of the side) touches it


def box_features(boxes: np.ndarray, scores: np.ndarray, image_size: tuple[float, float]) -> np.ndarray:
    """[N, len(FEATURE_NAMES)] features of every box of one photo; ``image_size`` = (width, height) in
    the boxes' pixels. The photo's whole box list matters (ranks, overlaps), so pass all of them."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    n = len(b)
    if n == 0:
        return np.zeros((0, len(FEATURE_NAMES)))
    width, height = float(image_size[0]), float(image_size[1])
    rank = np.empty(n)
    rank[np.argsort(-s, kind="stable")] = np.arange(n)
    w = np.clip(b[:, 2] - b[:, 0], 0, None) / width
    h = np.clip(b[:, 3] - b[:, 1], 0, None) / height
    area = w * h
    cx = (b[:, 0] + b[:, 2]) / 2 / width - 0.5
    cy = (b[:, 1] + b[:, 3]) / 2 / height - 0.5
    border = ((b[:, 0] < BORDER * width).astype(float) + (b[:, 1] < BORDER * height)
              + (b[:, 2] > (1 - BORDER) * width) + (b[:, 3] > (1 - BORDER) * height))
    iou = _pairwise_iou(b)
    np.fill_diagonal(iou, 0.0)
    better = s[None, :] > s[:, None]  # [i, j]: box j scores higher than box i
    iou_with_better = np.where(better, iou, 0.0).max(axis=1)
    confident = s >= CONFIDENT
    best = float(s.max())
    return np.column_stack([
        s, np.log1p(rank), np.log(area + 1e-6), w, h, np.hypot(cx, cy), border, iou_with_better,
        np.full(n, np.log1p(confident.sum())), s / max(best, 1e-9), area / (area.max() + 1e-9),
        np.full(n, area[confident].sum()), (rank == 0).astype(float), np.full(n, best),
    ])


def _pairwise_iou(b: np.ndarray) -> np.ndarray:
    area = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    iw = np.clip(np.minimum(b[:, None, 2], b[None, :, 2]) - np.maximum(b[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(b[:, None, 3], b[None, :, 3]) - np.maximum(b[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    return inter / np.maximum(area[:, None] + area[None, :] - inter, 1e-9)


@dataclass
class BoxRescorer:
    """Standardise -> ReLU hidden layer -> sigmoid: P(box has IoU >= 0.5 with a lesion)."""

    mean: np.ndarray  # [F]
    std: np.ndarray  # [F]
    w1: np.ndarray  # [F, H]
    b1: np.ndarray  # [H]
    w2: np.ndarray  # [H]
    b2: float

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Probabilities [N] for a feature matrix [N, F]."""
        x = (np.asarray(features, dtype=np.float64) - self.mean) / self.std
        hidden = np.maximum(x @ self.w1 + self.b1, 0.0)
        return 1.0 / (1.0 + np.exp(-(hidden @ self.w2 + self.b2)))

    def score(self, boxes: np.ndarray, scores: np.ndarray, image_size: tuple[float, float]) -> np.ndarray:
        """Box confidences [N] of one photo's boxes (all of them, see :func:`box_features`)."""
        if len(np.asarray(scores).reshape(-1)) == 0:
            return np.zeros(0)
        return self.predict(box_features(boxes, scores, image_size))

    def tensors(self) -> dict[str, np.ndarray]:
        """The arrays saved to safetensors (float32)."""
        return {"mean": self.mean, "std": self.std, "w1": self.w1, "b1": self.b1, "w2": self.w2,
                "b2": np.asarray([self.b2])}

    @classmethod
    def from_tensors(cls, t: dict[str, np.ndarray]) -> "BoxRescorer":
        f = len(FEATURE_NAMES)
        if t["mean"].shape != (f,) or t["w1"].shape[0] != f:
            raise ValueError(f"box rescorer expects {f} features ({', '.join(FEATURE_NAMES)}), "
                             f"the file has {t['mean'].shape[0]}")
        return cls(*(np.asarray(t[k], dtype=np.float64) for k in ("mean", "std", "w1", "b1", "w2")),
                   float(np.asarray(t["b2"]).reshape(-1)[0]))

    def save(self, path: Path) -> str:
        """Write safetensors (float32) through :func:`lesiontriage.weights.save_weights`; returns its sha256."""
        import torch

        from lesiontriage.weights import save_weights

        return save_weights({k: torch.from_numpy(np.asarray(v, dtype=np.float32).copy()) for k, v in self.tensors().items()},
                            path)

    @classmethod
    def load(cls, path: Path, sha256: str) -> "BoxRescorer":
        """Load, refusing a file whose sha256 differs from metadata.json's (like every shipped weight file)."""
        from lesiontriage.weights import load_weights

        return cls.from_tensors({k: v.double().numpy() for k, v in load_weights(path, sha256).items()})
