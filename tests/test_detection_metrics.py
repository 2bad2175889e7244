"""COCO mAP (pycocotools) on toy cases with known values, checked against a naive re-implementation,
plus recall at IoU, IoU statistics and greedy matching (issue 12 items 2 and 9)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from lesiontriage.evaluate.detection import (
    best_iou_per_gt,
    box_iou,
    coco_map,
    coco_map_classes,
    iou_summary,
    match_boxes,
    recall_at_iou,
)

R101 = 51 / 101  # COCO 101-point AP when precision is 1 up to recall 0.5 and 0 beyond


def shifted(box, dx):
    x1, y1, x2, y2 = box
    return [x1 + dx, y1, x2 + dx, y2]


# ------------------------------------------------------------------ naive COCO AP reference

def naive_coco_ap(gt, preds, scores, thr):
    """Greedy matching per image at one IoU threshold, global ranking by score, precision envelope,
    101 recall points: the COCO definition written out plainly (one class, no crowd, no area)."""
    records = []  # (score, is_tp)
    n_gt = sum(len(g) for g in gt)
    for g, d, s in zip(gt, preds, scores):
        order = np.argsort(-np.asarray(s), kind="mergesort")
        used = set()
        for di in order:
            best, bi = min(thr, 1 - 1e-10), -1
            for gi, gb in enumerate(g):
                if gi in used:
                    continue
                iou = box_iou([d[di]], [gb])[0, 0]
                if iou >= best:
                    best, bi = iou, gi
            if bi >= 0:
                used.add(bi)
            records.append((s[di], bi >= 0))
    records.sort(key=lambda r: -r[0])
    tp = np.cumsum([r[1] for r in records])
    fp = np.cumsum([not r[1] for r in records])
    rec = tp / n_gt
    prec = tp / np.maximum(tp + fp, 1)
    for i in range(len(prec) - 2, -1, -1):
        prec[i] = max(prec[i], prec[i + 1])
    total = 0.0
    for r in np.linspace(0, 1, 101):
        idx = np.searchsorted(rec, r, side="left")
        total += prec[idx] if idx < len(prec) else 0.0
    return total / 101


# ------------------------------------------------------------------ coco_map known values

def test_perfect_predictions_give_one():
    gt = [[[10, 10, 50, 60], [100, 100, 140, 130]], [[5, 5, 25, 25]]]
    res = coco_map(gt, gt, [[0.9, 0.8], [0.7]])
    assert res["map50"] == pytest.approx(1.0)
    assert res["map75"] == pytest.approx(1.0)
    assert res["map50_95"] == pytest.approx(1.0)
    assert (res["n_images"], res["n_gt"], res["n_pred"]) == (2, 3, 3)


def test_one_of_two_missed_with_a_single_prediction():
    gt = [[[0, 0, 100, 100], [200, 200, 300, 300]]]
    res = coco_map(gt, [[[0, 0, 100, 100]]], [[0.9]])
    # precision 1 for recall points 0.00 .. 0.50 (51 of 101), 0 beyond
    for key in ("map50", "map75", "map50_95"):
        assert res[key] == pytest.approx(R101)


def test_shifted_box_counts_at_050_not_075():
    gt = [[0, 0, 100, 100]]
    pred = shifted(gt[0], 23)  # IoU = 77 / 123 = 0.626
    assert box_iou([pred], gt)[0, 0] == pytest.approx(77 / 123)
    res = coco_map([gt], [[pred]], [[0.8]])
    assert res["map50"] == pytest.approx(1.0)
    assert res["map75"] == pytest.approx(0.0)
    # matched at IoU thresholds .50, .55, .60 of the ten .50:.05:.95
    assert res["map50_95"] == pytest.approx(0.3)


def test_map50_95_by_hand_two_images():
    # image 1: exact box (IoU 1) scored 0.6; image 2: IoU 84/116 = 0.724 scored 0.9
    gt = [[[0, 0, 100, 100]], [[0, 0, 100, 100]]]
    preds = [[[0, 0, 100, 100]], [shifted([0, 0, 100, 100], 16)]]
    res = coco_map(gt, preds, [[0.6], [0.9]])
    # thresholds .50-.70 (5): both match -> AP 1. thresholds .75-.95 (5): the top-scored detection
    # is a false positive, then a true positive: precision 1/2 at recall 1/2 -> AP 0.5 * 51/101
    expected = (5 * 1.0 + 5 * 0.5 * R101) / 10
    assert res["map50_95"] == pytest.approx(expected)
    assert res["map75"] == pytest.approx(0.5 * R101)
    assert res["map50"] == pytest.approx(1.0)


def test_false_positive_ranked_first_halves_precision():
    gt = [[[0, 0, 50, 50]]]
    res = coco_map(gt, [[[200, 200, 250, 250], [0, 0, 50, 50]]], [[0.9, 0.8]])
    assert res["map50"] == pytest.approx(0.5)
    res2 = coco_map(gt, [[[200, 200, 250, 250], [0, 0, 50, 50]]], [[0.7, 0.8]])
    assert res2["map50"] == pytest.approx(1.0)


def test_matches_naive_reference_on_random_scenes():
    rng = np.random.default_rng(0)
    gt, preds, scores = [], [], []
    for _ in range(25):
        k = rng.integers(0, 5)
        g = []
        for _ in range(k):
            x, y = rng.uniform(0, 800, 2)
            w, h = rng.uniform(8, 120, 2)
            g.append([x, y, x + w, y + h])
        d = [[b[0] + rng.normal(0, 0.12 * (b[2] - b[0])), b[1] + rng.normal(0, 0.12 * (b[3] - b[1])),
              b[2] + rng.normal(0, 0.12 * (b[2] - b[0])), b[3] + rng.normal(0, 0.12 * (b[3] - b[1]))]
             for b in g if rng.random() < 0.85]
        d = [[min(b[0], b[2]), min(b[1], b[3]), max(b[0], b[2]), max(b[1], b[3])] for b in d]
        for _ in range(rng.integers(0, 3)):  # false positives
            x, y = rng.uniform(0, 800, 2)
            d.append([x, y, x + 40, y + 30])
        gt.append(g)
        preds.append(d)
        scores.append(list(rng.random(len(d))))
    res = coco_map(gt, preds, scores)
    thrs = np.linspace(0.5, 0.95, 10)
    naive = [naive_coco_ap(gt, preds, scores, t) for t in thrs]
    assert res["map50"] == pytest.approx(naive[0], abs=1e-9)
    assert res["map75"] == pytest.approx(naive[5], abs=1e-9)
    assert res["map50_95"] == pytest.approx(np.mean(naive), abs=1e-9)
    assert 0.2 < res["map50_95"] < res["map50"] < 1.0  # a non-trivial case


def test_no_predictions_no_ground_truth_and_tiny_boxes():
    gt = [[[0, 0, 10, 10]], []]
    assert coco_map(gt, [[], []], [[], []])["map50"] == pytest.approx(0.0)
    none = coco_map([[], []], [[[0, 0, 5, 5]], []], [[0.5], []])
    assert math.isnan(none["map50"])
    # a 1-pixel box and a zero-width prediction: defined numbers, no NaN
    tiny = coco_map([[[10, 10, 11, 11]]], [[[10, 10, 11, 11], [30, 30, 30, 35]]], [[0.9, 0.95]])
    assert tiny["map50"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"pred_boxes\[0\].*x2 < x1"):
        coco_map([[[0, 0, 10, 10]]], [[[10, 0, 0, 10]]], [[0.5]])
    with pytest.raises(ValueError, match="differ in length"):
        coco_map([[]], [[], []], [[], []])


def test_max_dets_is_not_silently_100():
    gt = [[[i * 20, 0, i * 20 + 10, 10] for i in range(150)]]
    scores = [list(np.linspace(1, 0.1, 150))]
    truncated = coco_map(gt, gt, scores)  # default 100 detections per image
    # recall stops at 100/150: recall points 0.00 .. 0.66 (67 of 101) have precision 1
    assert truncated["map50"] == pytest.approx(67 / 101)
    assert coco_map(gt, gt, scores, max_dets=200)["map50"] == pytest.approx(1.0)


def test_class_aware_map_requires_matching_labels():
    gt = [[[0, 0, 100, 100], [200, 200, 300, 300]]]
    gl = [[1, 0]]
    boxes = [[[0, 0, 100, 100], [200, 200, 300, 300]]]
    right = coco_map_classes(gt, gl, boxes, [[0.9, 0.8]], [[1, 0]])
    assert right["map50"] == pytest.approx(1.0)
    assert right["per_class"][0]["map50"] == pytest.approx(1.0) and right["per_class"][1]["n_gt"] == 1
    wrong = coco_map_classes(gt, gl, boxes, [[0.9, 0.8]], [[1, 1]])
    # class 1 gets its box plus a false positive (at lower score): AP 1; class 0 is missed: AP 0
    assert wrong["per_class"][1]["map50"] == pytest.approx(1.0)
    assert wrong["per_class"][0]["map50"] == pytest.approx(0.0)
    assert wrong["map50"] == pytest.approx(0.5)
    # the one-class evaluator ignores labels
    assert coco_map(gt, boxes, [[0.9, 0.8]])["map50"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="not in categories"):
        coco_map_classes(gt, [[1, 5]], boxes, [[0.9, 0.8]], [[1, 0]])


# ------------------------------------------------------------------ matching, recall, IoU stats

def test_box_iou_known_values():
    iou = box_iou([[0, 0, 10, 10]], [[5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 10, 10], [3, 3, 3, 8]])
    assert iou[0].tolist() == pytest.approx([50 / 150, 0.0, 1.0, 0.0])


def test_match_boxes_greedy_by_score():
    gt = [[0, 0, 100, 100], [90, 0, 190, 100]]
    preds = [[80, 0, 180, 100], [0, 0, 100, 100]]
    # pred 0 (IoU .82 with gt 1, .11 with gt 0) takes gt 1 first when it scores higher
    m = match_boxes(gt, preds, 0.5, scores=[0.9, 0.8])
    assert sorted((d, g) for d, g, _ in m.matches) == [(0, 1), (1, 0)]
    assert m.unmatched_gt == [] and m.unmatched_pred == []
    # a box overlapping both at low IoU: matched at IoU > 0, not at 0.5
    wide = [[50, 0, 140, 100]]
    assert len(match_boxes(gt, wide, 0.5).matches) == 0
    one = match_boxes(gt, wide, 0.0)
    assert len(one.matches) == 1 and len(one.unmatched_gt) == 1
    # a higher-scored duplicate takes the ground truth; the other becomes unmatched
    dup = match_boxes([[0, 0, 10, 10]], [[0, 0, 10, 10], [1, 0, 11, 10]], 0.5, scores=[0.2, 0.9])
    assert dup.matches[0][0] == 1 and dup.unmatched_pred == [0]


def test_recall_at_iou_any_overlap_vs_one_to_one_and_score_filter():
    gt = [[[0, 0, 10, 10], [20, 0, 30, 10]], [[0, 0, 50, 50]]]
    preds = [[[5, 0, 25, 10]], [[0, 0, 50, 50], [100, 100, 120, 120]]]
    scores = [[0.9], [0.2, 0.99]]
    r = recall_at_iou(gt, preds, scores)  # one wide box touches both lesions of image 0
    assert (r.n_found, r.n_gt) == (3, 3) and r.recall == pytest.approx(1.0)
    r1 = recall_at_iou(gt, preds, scores, one_to_one=True)
    assert r1.n_found == 2
    r_thr = recall_at_iou(gt, preds, scores, score_thr=0.5)  # drops the 0.2 exact box
    assert r_thr.n_found == 2 and r_thr.per_image_found == [2, 0]
    r_iou = recall_at_iou(gt, preds, scores, iou_thr=0.5)
    assert r_iou.n_found == 1
    assert r.ci_low < 1.0 and r.ci_high == pytest.approx(1.0)
    assert math.isnan(recall_at_iou([[]], [[]]).recall)


def test_best_iou_and_summary():
    gt = [[[0, 0, 100, 100], [200, 200, 300, 300]], [[0, 0, 10, 10]]]
    preds = [[shifted([0, 0, 100, 100], 23), [200, 200, 300, 300]], [[50, 50, 60, 60]]]
    best = best_iou_per_gt(gt, preds)
    assert best.tolist() == pytest.approx([77 / 123, 1.0, 0.0])
    s = iou_summary(best)
    assert s["n_found"] == 2 and s["n_gt"] == 3
    assert s["median"] == pytest.approx(np.median([77 / 123, 1.0]))
    assert s["median_all"] == pytest.approx(77 / 123)
    assert s["iqr"] == pytest.approx(s["q3"] - s["q1"]) and s["q1"] < s["median"] < s["q3"]
    assert math.isnan(iou_summary([])["median"])
