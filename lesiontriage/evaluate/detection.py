"""Detection metrics: COCO mAP through pycocotools, recall at an IoU threshold, per-lesion IoU
statistics and greedy box matching.

Boxes are ``[x1, y1, x2, y2]`` in original-image pixels (DESIGN.md section 7); one list of boxes
per image. pycocotools wants ``[x, y, w, h]`` plus an ``area``; the conversion happens here only.
Points that bit people using pycocotools directly, handled here:

- annotation ids must start at 1: COCOeval marks a detection 'matched' with the id of its ground
  truth and treats id 0 as 'unmatched';
- ``COCO.loadRes`` crashes on an empty result list, so the detection side is built directly;
- the default ``maxDets`` of 100 silently truncates crowded wide-field photos, so it is a parameter;
- a zero-area box (x1 == x2) has IoU 0 with everything in pycocotools (no NaN), so tiny boxes are
  kept as they are; inverted boxes are rejected with an error naming the image.

The numbers are read from ``COCOeval.eval['precision']`` (101-point interpolated precision) in
the same way as ``COCOeval.summarize`` but without its printing.
"""
from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

log = logging.getLogger(__name__)

BoxesLike = Sequence[Sequence[float]] | np.ndarray


def as_boxes(boxes: BoxesLike | None, where: str = "boxes") -> np.ndarray:
    """(K, 4) float array of xyxy boxes; raises ValueError naming ``where`` for malformed input."""
    if boxes is None:
        return np.zeros((0, 4))
    arr = np.asarray(boxes, dtype=float)
    if arr.size == 0:
        return np.zeros((0, 4))
    if arr.ndim == 1 and arr.shape[0] == 4:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"{where}: expected boxes as [x1, y1, x2, y2] rows, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{where}: non-finite box coordinates")
    if (arr[:, 2] < arr[:, 0]).any() or (arr[:, 3] < arr[:, 1]).any():
        raise ValueError(f"{where}: box with x2 < x1 or y2 < y1 (boxes must be xyxy)")
    return arr


def box_iou(a: BoxesLike, b: BoxesLike) -> np.ndarray:
    """Pairwise IoU (len(a), len(b)) of xyxy boxes; 0 where the union is empty."""
    aa, bb = as_boxes(a, "a"), as_boxes(b, "b")
    if len(aa) == 0 or len(bb) == 0:
        return np.zeros((len(aa), len(bb)))
    area_a = (aa[:, 2] - aa[:, 0]) * (aa[:, 3] - aa[:, 1])
    area_b = (bb[:, 2] - bb[:, 0]) * (bb[:, 3] - bb[:, 1])
    iw = np.clip(np.minimum(aa[:, None, 2], bb[None, :, 2]) - np.maximum(aa[:, None, 0], bb[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(aa[:, None, 3], bb[None, :, 3]) - np.maximum(aa[:, None, 1], bb[None, :, 1]), 0, None)
    inter = iw * ih
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / union, 0.0)
    return iou


def _passes(iou: np.ndarray | float, iou_thr: float) -> np.ndarray | bool:
    """IoU criterion: ``iou_thr == 0`` means any overlap (IoU > 0), otherwise IoU >= iou_thr."""
    return iou > 0 if iou_thr <= 0 else iou >= iou_thr


# --------------------------------------------------------------------------------------------
# COCO mAP
# --------------------------------------------------------------------------------------------

def _check_lengths(**lists: Sequence[Any]) -> int:
    lens = {k: len(v) for k, v in lists.items()}
    if len(set(lens.values())) > 1:
        raise ValueError(f"per-image lists differ in length: {lens}")
    return next(iter(lens.values()))


def _coco_eval(gt_boxes: Sequence[BoxesLike], gt_labels: Sequence[Sequence[int]] | None,
               pred_boxes: Sequence[BoxesLike], pred_scores: Sequence[Sequence[float]],
               pred_labels: Sequence[Sequence[int]] | None, categories: Sequence[int],
               max_dets: int) -> dict[str, Any]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    n_img = _check_lengths(gt_boxes=gt_boxes, pred_boxes=pred_boxes, pred_scores=pred_scores)
    cats = [{"id": int(c), "name": str(c)} for c in categories]
    cat_ids = {int(c) for c in categories}
    images = [{"id": i + 1, "width": 1, "height": 1} for i in range(n_img)]
    gts: list[dict[str, Any]] = []
    dts: list[dict[str, Any]] = []
    for i in range(n_img):
        g = as_boxes(gt_boxes[i], f"gt_boxes[{i}]")
        gl = [categories[0]] * len(g) if gt_labels is None else list(gt_labels[i])
        if len(gl) != len(g):
            raise ValueError(f"gt_labels[{i}]: {len(gl)} labels for {len(g)} boxes")
        for box, lab in zip(g, gl):
            if int(lab) not in cat_ids:
                raise ValueError(f"gt_labels[{i}]: label {lab} not in categories {sorted(cat_ids)}")
            w, h = float(box[2] - box[0]), float(box[3] - box[1])
            gts.append({"id": len(gts) + 1, "image_id": i + 1, "category_id": int(lab),
                        "bbox": [float(box[0]), float(box[1]), w, h], "area": w * h, "iscrowd": 0})
        d = as_boxes(pred_boxes[i], f"pred_boxes[{i}]")
        s = np.asarray(pred_scores[i], dtype=float).reshape(-1)
        dl = [categories[0]] * len(d) if pred_labels is None else list(pred_labels[i])
        if len(s) != len(d) or len(dl) != len(d):
            raise ValueError(f"image {i}: {len(d)} predicted boxes, {len(s)} scores, {len(dl)} labels")
        if not np.isfinite(s).all():
            raise ValueError(f"pred_scores[{i}]: non-finite scores")
        for box, sc, lab in zip(d, s, dl):
            if int(lab) not in cat_ids:
                raise ValueError(f"pred_labels[{i}]: label {lab} not in categories {sorted(cat_ids)}")
            w, h = float(box[2] - box[0]), float(box[3] - box[1])
            dts.append({"id": len(dts) + 1, "image_id": i + 1, "category_id": int(lab),
                        "bbox": [float(box[0]), float(box[1]), w, h], "area": w * h, "iscrowd": 0,
                        "score": float(sc)})
    result: dict[str, Any] = {"n_images": n_img, "n_gt": len(gts), "n_pred": len(dts), "max_dets": max_dets}
    nan = float("nan")
    if not gts:
        log.warning("coco_map: no ground-truth boxes, mAP undefined")
        result.update(map50=nan, map75=nan, map50_95=nan, per_class={})
        return result
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink):
        coco_gt = COCO()
        coco_gt.dataset = {"images": images, "annotations": gts, "categories": cats}
        coco_gt.createIndex()
        coco_dt = COCO()
        coco_dt.dataset = {"images": images, "annotations": dts, "categories": cats}
        coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.params.maxDets = [1, 10, int(max_dets)]
        ev.evaluate()
        ev.accumulate()
    prec = ev.eval["precision"][:, :, :, 0, -1]  # [T, R, K] at area 'all', maxDets[-1]
    thrs = ev.params.iouThrs

    def mean_valid(x: np.ndarray) -> float:
        v = x[x > -1]
        return float(v.mean()) if v.size else nan

    i50 = int(np.argmin(np.abs(thrs - 0.5)))
    i75 = int(np.argmin(np.abs(thrs - 0.75)))
    result.update(map50=mean_valid(prec[i50]), map75=mean_valid(prec[i75]), map50_95=mean_valid(prec))
    per_class = {}
    for k, cid in enumerate(ev.params.catIds):
        per_class[int(cid)] = {"map50": mean_valid(prec[i50, :, k]), "map75": mean_valid(prec[i75, :, k]),
                               "map50_95": mean_valid(prec[:, :, k]),
                               "n_gt": sum(1 for g in gts if g["category_id"] == cid)}
    result["per_class"] = per_class
    return result


def coco_map(gt_boxes: Sequence[BoxesLike], pred_boxes: Sequence[BoxesLike],
             pred_scores: Sequence[Sequence[float]], max_dets: int = 100) -> dict[str, Any]:
    """One-class COCO box mAP: ``map50``, ``map75``, ``map50_95`` (+ counts).

    NaN when there is no ground truth at all. Images without ground truth still count through
    their false positives.
    """
    res = _coco_eval(gt_boxes, None, pred_boxes, pred_scores, None, [1], max_dets)
    res.pop("per_class", None)
    return res


def coco_map_classes(gt_boxes: Sequence[BoxesLike], gt_labels: Sequence[Sequence[int]],
                     pred_boxes: Sequence[BoxesLike], pred_scores: Sequence[Sequence[float]],
                     pred_labels: Sequence[Sequence[int]], num_classes: int = 2,
                     max_dets: int = 100) -> dict[str, Any]:
    """Class-aware COCO mAP (e.g. C=2 benign/malignant, labels 0..C-1 or 1..C).

    A prediction only matches a ground truth of the same class. ``map*`` average over classes that
    have ground truth (COCO convention); ``per_class`` holds each class's values.
    """
    labels = {int(x) for ls in gt_labels for x in ls} | {int(x) for ls in pred_labels for x in ls}
    # accept 0-based or 1-based labels; pycocotools itself does not care about the id values
    categories = list(range(num_classes)) if (not labels or min(labels) == 0) else list(range(1, num_classes + 1))
    return _coco_eval(gt_boxes, gt_labels, pred_boxes, pred_scores, pred_labels, categories, max_dets)


# --------------------------------------------------------------------------------------------
# matching, recall and IoU statistics
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MatchResult:
    """One-to-one matches (pred index, gt index, IoU) and what was left unmatched."""

    matches: list[tuple[int, int, float]]
    unmatched_gt: list[int]
    unmatched_pred: list[int]


def match_boxes(gt: BoxesLike, pred: BoxesLike, iou_thr: float = 0.5,
                scores: Sequence[float] | None = None) -> MatchResult:
    """Greedy one-to-one matching, COCO style: predictions in descending score order each take the
    still-unmatched ground truth with the highest IoU passing the criterion (``iou_thr == 0``:
    IoU > 0; otherwise IoU >= iou_thr). Without scores, the given order is the priority."""
    g, d = as_boxes(gt, "gt"), as_boxes(pred, "pred")
    if scores is None:
        order = np.arange(len(d))
    else:
        s = np.asarray(scores, dtype=float).reshape(-1)
        if len(s) != len(d):
            raise ValueError(f"match_boxes: {len(s)} scores for {len(d)} predicted boxes")
        order = np.argsort(-s, kind="stable")
    iou = box_iou(d, g)
    taken = np.zeros(len(g), dtype=bool)
    matches: list[tuple[int, int, float]] = []
    matched_pred: set[int] = set()
    for di in order:
        if len(g) == 0:
            break
        cand = np.where(~taken & _passes(iou[di], iou_thr), iou[di], -1.0)
        gi = int(np.argmax(cand))
        if cand[gi] < 0:
            continue
        taken[gi] = True
        matched_pred.add(int(di))
        matches.append((int(di), gi, float(iou[di, gi])))
    return MatchResult(matches, [int(i) for i in np.flatnonzero(~taken)],
                       [int(i) for i in range(len(d)) if i not in matched_pred])


def _filter(pred: BoxesLike, scores: Sequence[float] | None, score_thr: float, where: str) -> tuple[np.ndarray, np.ndarray | None]:
    d = as_boxes(pred, where)
    if scores is None:
        return d, None
    s = np.asarray(scores, dtype=float).reshape(-1)
    if len(s) != len(d):
        raise ValueError(f"{where}: {len(s)} scores for {len(d)} boxes")
    keep = s >= score_thr
    return d[keep], s[keep]


@dataclass(frozen=True)
class RecallAtIoU:
    """Share of ground-truth boxes found, with a 95% Wilson CI (lesions treated as independent)."""

    recall: float
    ci_low: float
    ci_high: float
    n_found: int
    n_gt: int
    iou_thr: float
    score_thr: float
    one_to_one: bool
    per_image_found: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("per_image_found")
        return {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in d.items()}


def recall_at_iou(gt: Sequence[BoxesLike], preds: Sequence[BoxesLike],
                  scores: Sequence[Sequence[float]] | None = None, iou_thr: float = 0.0,
                  score_thr: float = 0.0, one_to_one: bool = False) -> RecallAtIoU:
    """Recall over all ground-truth boxes of all images.

    ``iou_thr = 0`` means 'touched by any prediction' (IoU > 0), the seed's detection recall;
    otherwise IoU >= iou_thr. Predictions scoring below ``score_thr`` are dropped first. By default
    a ground truth counts as found if *any* kept prediction passes the criterion; with
    ``one_to_one`` the greedy score-ordered matching of :func:`match_boxes` is used instead (one
    big box over two moles then finds only one).
    """
    from lesiontriage.evaluate.operating_points import wilson_ci

    n_img = _check_lengths(gt=gt, preds=preds)
    if scores is not None:
        _check_lengths(gt=gt, scores=scores)
    found_per_image: list[int] = []
    n_gt = 0
    for i in range(n_img):
        g = as_boxes(gt[i], f"gt[{i}]")
        d, s = _filter(preds[i], None if scores is None else scores[i], score_thr, f"preds[{i}]")
        n_gt += len(g)
        if one_to_one:
            found = len(match_boxes(g, d, iou_thr, s).matches)
        else:
            iou = box_iou(g, d)
            found = int(np.count_nonzero(_passes(iou, iou_thr).any(axis=1))) if iou.size else 0
        found_per_image.append(found)
    n_found = int(sum(found_per_image))
    rec = n_found / n_gt if n_gt else float("nan")
    lo, hi = wilson_ci(n_found, n_gt)
    return RecallAtIoU(rec, lo, hi, n_found, n_gt, float(iou_thr), float(score_thr), one_to_one,
                       found_per_image)


def best_iou_per_gt(gt: Sequence[BoxesLike], preds: Sequence[BoxesLike],
                    scores: Sequence[Sequence[float]] | None = None, score_thr: float = 0.0) -> np.ndarray:
    """For every ground-truth box (images concatenated), the best IoU with any kept prediction
    (0 when none overlaps)."""
    n_img = _check_lengths(gt=gt, preds=preds)
    out: list[np.ndarray] = []
    for i in range(n_img):
        g = as_boxes(gt[i], f"gt[{i}]")
        d, _ = _filter(preds[i], None if scores is None else scores[i], score_thr, f"preds[{i}]")
        iou = box_iou(g, d)
        out.append(iou.max(axis=1) if iou.shape[1] else np.zeros(len(g)))
    return np.concatenate(out) if out else np.zeros(0)


def iou_summary(best_ious: Sequence[float]) -> dict[str, Any]:
    """Median and inter-quartile range of per-lesion best IoU, over found lesions (IoU > 0, the
    localisation quality of what was detected) and over all lesions (misses count as 0)."""
    v = np.asarray(best_ious, dtype=float)
    nan = float("nan")

    def stats(x: np.ndarray) -> tuple[float, float, float]:
        if x.size == 0:
            return nan, nan, nan
        q1, med, q3 = np.percentile(x, [25, 50, 75])
        return float(med), float(q1), float(q3)

    found = v[v > 0]
    med, q1, q3 = stats(found)
    med_all, q1_all, q3_all = stats(v)
    return {"median": med, "q1": q1, "q3": q3, "iqr": q3 - q1, "n_found": int(found.size),
            "median_all": med_all, "q1_all": q1_all, "q3_all": q3_all, "n_gt": int(v.size)}
