"""Which detections become lesions: lobe merging, score cut (lower on many-lesion photos), nested parts, cap.

Why a step of its own: on dermoscopy close-ups the detector often returns the whole lesion *and*
boxes around parts of it (a dark globule, one lobe). Each part is then classified from a crop that
shows only a fragment, and the mean over "lesions" dilutes the score of the real lesion (the last
evaluation lost ~0.07 ISIC AUC between ground-truth crops and detected boxes). Non-maximum
suppression does not remove them, because a small box inside a large one has a small IoU.

``nested_containment`` removes a detection when at least that fraction of its area lies inside a
larger detection that is kept (largest first, so a chain of nested boxes collapses onto the
outermost one). Two separate moles in a wide-field photo never contain each other, so the rule
leaves them alone. The value is chosen on validation photos by ``lesiontriage train box-rule``
and stored in ``models/metadata.json`` (``pipeline.nested_containment``; 0 switches it off).

``merge_score`` handles the opposite failure: a large dermoscopic lesion boxed as two or three
overlapping *lobes*, none of which covers the lesion (on the HAM10000 validation photos the best
detection had IoU >= 0.5 with the lesion on 95% of photos but the top-scored one on only 82%).
Confident detections (score >= ``merge_score``) that overlap each other (IoU > ``merge_iou``) are
replaced by their union, scored with the cluster's best score, when that union covers at least
``merge_min_area`` of the photo: lobes of a close-up lesion are large, while two neighbouring moles on
a back photo whose boxes touch are tiny and must stay two lesions (without this floor the first
evaluation of merging cost the real mole test photos 0.04 mAP@0.5). The values are chosen on
validation by ``lesiontriage train box-merge`` (``pipeline.merge_score``; 0 switches it off).

``widefield_score_threshold`` lowers the score cut on a many-lesion photo (at least
``widefield_min_lesions`` detections at the normal cut, e.g. a back with moles), where faint small
detections are real moles far more often than on a close-up (:func:`effective_threshold`; chosen on
validation by ``lesiontriage train widefield-rule``; 0 switches it off).

Used by :class:`lesiontriage.pipeline.TriagePipeline` and mirrored by the evaluation, so the
reports score exactly the lesions the product shows.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


# At most this many lesions per photo: the detector's own cap (detections_per_img). It was 30 until
# stop 20, which silently dropped real moles on a back photographed whole (two synthetic test
# scenes hold 57 and 59 lesions; two real mole photos 43 and 53): test-scene recall was capped at
# 0.848 by the limit alone (0.979 without it), validation mole photos 0.915 -> 0.938.
MAX_LESIONS = 100


@dataclass(frozen=True)
class BoxSelection:
    """The rule that turns raw detections (best first) into the lesions the product reports."""

    score_threshold: float = 0.5
    max_lesions: int = MAX_LESIONS
    nested_containment: float = 0.0  # 0 = off; else drop a box this much inside a larger kept box
    merge_score: float = 0.0  # 0 = off; else overlapping detections at least this confident become their union
    merge_iou: float = 0.0  # ... when their IoU exceeds this
    merge_min_area: float = 0.0  # ... and their union covers at least this fraction of the photo
    widefield_score_threshold: float = 0.0  # 0 = off; else the cut on a photo with ...
    widefield_min_lesions: int = 0  # ... at least this many detections at score_threshold

    @property
    def widefield(self) -> tuple[float, int]:
        return float(self.widefield_score_threshold), int(self.widefield_min_lesions)

    def merge(self, boxes: np.ndarray, scores: np.ndarray, image_size: tuple[float, float] | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
        """The detections with overlapping confident lobes merged (best score first); unchanged when off.
        ``image_size`` (width, height) is in the boxes' pixels (needed when ``merge_min_area`` > 0)."""
        return merge_overlapping(boxes, scores, self.merge_score, self.merge_iou, image_size, self.merge_min_area)

    def apply(self, boxes: np.ndarray, scores: np.ndarray, image_size: tuple[float, float] | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
        """Raw detections -> the reported lesions' boxes and scores (merge, then :meth:`select`)."""
        boxes, scores = self.merge(boxes, scores, image_size)
        keep = self.select(boxes, scores)
        return boxes[keep], scores[keep]

    def select(self, boxes: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """Indices into ``boxes`` of the kept detections, in the input order (best score first)."""
        return select_boxes(boxes, scores, self.score_threshold, self.max_lesions, self.nested_containment, self.widefield)


def _areas(boxes: np.ndarray) -> np.ndarray:
    return np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)


def _intersections(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[N, M] intersection areas of xyxy boxes ``a`` and ``b`` (float64)."""
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    return np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)


def containment(inner: np.ndarray, outer: np.ndarray) -> np.ndarray:
    """[N, M] fraction of each ``inner`` box's area that lies inside each ``outer`` box (xyxy)."""
    inner = np.asarray(inner, dtype=np.float64).reshape(-1, 4)
    outer = np.asarray(outer, dtype=np.float64).reshape(-1, 4)
    inter, area = _intersections(inner, outer), _areas(inner)
    return np.where(area[:, None] > 0, inter / np.maximum(area[:, None], 1e-12), 0.0)


def pairwise_iou(boxes: np.ndarray) -> np.ndarray:
    """[N, N] IoU of xyxy boxes with each other (0 where the union is empty)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    inter, area = _intersections(b, b), _areas(b)
    union = area[:, None] + area[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def suppress_nested(boxes: np.ndarray, containment_threshold: float) -> np.ndarray:
    """Boolean mask of boxes to keep: a box is dropped when >= ``containment_threshold`` of its
    area lies inside a larger box that is itself kept (processed from the largest down)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    n = len(boxes)
    keep = np.ones(n, dtype=bool)
    if n < 2 or containment_threshold <= 0:
        return keep
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    order = np.argsort(-areas, kind="stable")
    frac = containment(boxes, boxes)
    kept_so_far: list[int] = []
    for i in order:
        if any(frac[i, j] >= containment_threshold and areas[j] > areas[i] for j in kept_so_far):
            keep[i] = False
        else:
            kept_so_far.append(int(i))
    return keep


def effective_threshold(scores: np.ndarray, score_threshold: float, widefield: tuple[float, int] = (0.0, 0)) -> float:
    """The score cut for one photo: ``score_threshold``, lowered to ``widefield[0]`` on a many-lesion
    photo (at least ``widefield[1]`` detections at the normal cut: a back or a limb with moles).

    Why: on such photos the small, faint moles the detector scores 0.3-0.5 are real far more often
    than on a close-up, where a low-scored box is a fragment of the one lesion or skin texture; one cut
    for both cost the validation mole photos 3% recall. ``(0, 0)`` = off (``train widefield-rule`` chooses it)."""
    low, min_lesions = widefield
    if low > 0 and min_lesions > 0 and int((np.asarray(scores) >= score_threshold).sum()) >= min_lesions:
        return min(float(score_threshold), float(low))
    return float(score_threshold)


def select_boxes(boxes: np.ndarray, scores: np.ndarray, score_threshold: float, max_lesions: int,
                 nested_containment: float = 0.0, widefield: tuple[float, int] = (0.0, 0)) -> np.ndarray:
    """Indices of the detections kept: score >= the photo's cut (:func:`effective_threshold`), nested
    parts removed, at most ``max_lesions`` (in the input order, which the detector gives best score first)."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    idx = np.flatnonzero(scores >= effective_threshold(scores, score_threshold, widefield))
    if len(idx) and nested_containment > 0:
        idx = idx[suppress_nested(np.asarray(boxes).reshape(-1, 4)[idx], nested_containment)]
    return idx[:max_lesions]


def _clusters(linked: np.ndarray) -> list[list[int]]:
    """Connected components of a symmetric boolean adjacency matrix (union-find), each sorted."""
    parent = list(range(len(linked)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in zip(*np.nonzero(np.triu(linked, 1))):
        parent[root(int(j))] = root(int(i))
    groups: dict[int, list[int]] = {}
    for i in range(len(linked)):
        groups.setdefault(root(i), []).append(i)
    return list(groups.values())


def merge_overlapping(boxes: np.ndarray, scores: np.ndarray, min_score: float, min_iou: float = 0.0,
                      image_size: tuple[float, float] | None = None, min_area_fraction: float = 0.0
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Replace each cluster of overlapping detections with score >= ``min_score`` (linked when their
    IoU > ``min_iou``, transitively) by the cluster's union box, scored with its best score, if the
    union covers at least ``min_area_fraction`` of the image (``image_size`` = (width, height) in
    the boxes' pixels; required when the fraction is > 0).

    Boxes below ``min_score`` and unlinked boxes are returned as they are; the output is sorted
    best score first (ties keep the input order). ``min_score`` <= 0 switches merging off."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    confident = np.flatnonzero(scores >= min_score) if min_score > 0 else np.zeros(0, dtype=int)
    if len(confident) < 2:
        return boxes, scores
    if min_area_fraction > 0 and image_size is None:
        raise ValueError("merge_overlapping: min_area_fraction > 0 needs the image size")
    min_area = min_area_fraction * float(image_size[0]) * float(image_size[1]) if min_area_fraction > 0 else 0.0
    linked = pairwise_iou(boxes[confident]) > min_iou
    drop: list[int] = []
    new_boxes, new_scores = [], []
    for group in _clusters(linked):
        if len(group) < 2:
            continue
        members = confident[group]
        b = boxes[members]
        union = [b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()]
        if (union[2] - union[0]) * (union[3] - union[1]) < min_area:
            continue
        new_boxes.append(union)
        new_scores.append(scores[members].max())
        drop.extend(members.tolist())
    if not new_boxes:
        return boxes, scores
    rest = np.setdiff1d(np.arange(len(boxes)), drop)
    out_boxes = np.vstack([np.asarray(new_boxes, dtype=np.float32), boxes[rest]])
    out_scores = np.concatenate([np.asarray(new_scores, dtype=np.float32), scores[rest]])
    order = np.argsort(-out_scores, kind="stable")
    return out_boxes[order], out_scores[order]
