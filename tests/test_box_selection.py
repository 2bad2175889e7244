"""Box selection: score cut, nested-part suppression and count cap, on hand-made boxes."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lesiontriage.box_selection import (BoxSelection, containment, merge_overlapping, pairwise_iou, select_boxes,
                                         suppress_nested)
from lesiontriage.train.box_rule import BoxRuleStudy, PhotoDetections, choose, rule_table, score_rule


def test_containment_fractions_hand_computed():
    inner = np.array([[10, 10, 20, 20], [0, 0, 10, 10]])
    outer = np.array([[0, 0, 15, 15]])
    # box 1: overlap 5x5 of 10x10 = 0.25; box 2: entirely inside = 1.0
    np.testing.assert_allclose(containment(inner, outer)[:, 0], [0.25, 1.0])
    assert containment(np.array([[5, 5, 5, 9]]), outer)[0, 0] == 0.0  # zero-area box


def test_part_inside_lesion_is_dropped_but_separate_moles_are_kept():
    boxes = np.array([
        [100, 100, 300, 300],  # the lesion
        [150, 150, 200, 200],  # a globule inside it
        [400, 400, 440, 440],  # a separate mole
        [280, 280, 330, 330],  # straddles the lesion's corner: 0.16 inside
    ], dtype=float)
    keep = suppress_nested(boxes, 0.7)
    assert keep.tolist() == [True, False, True, True]
    assert suppress_nested(boxes, 0.0).all()  # off


def test_nested_chain_collapses_to_outermost_and_order_is_preserved():
    boxes = np.array([[40, 40, 60, 60], [0, 0, 100, 100], [20, 20, 80, 80]], dtype=float)
    scores = np.array([0.9, 0.8, 0.7])
    assert select_boxes(boxes, scores, 0.5, 30, 0.8).tolist() == [1]
    assert select_boxes(boxes, scores, 0.5, 30, 0.0).tolist() == [0, 1, 2]


def test_score_cut_before_suppression_and_cap_after():
    boxes = np.array([[40, 40, 60, 60], [0, 0, 100, 100], [200, 200, 220, 220], [300, 300, 320, 320]], dtype=float)
    scores = np.array([0.9, 0.3, 0.8, 0.6])
    # the big box is below the cut, so it cannot suppress the small one
    assert select_boxes(boxes, scores, 0.5, 30, 0.8).tolist() == [0, 2, 3]
    assert BoxSelection(0.5, 2, 0.8).select(boxes, scores).tolist() == [0, 2]
    assert select_boxes(np.zeros((0, 4)), np.zeros(0), 0.5, 30, 0.8).tolist() == []


def _photo(stratum, y, p_parts, p_lesion):
    boxes = [[0, 0, 200, 200]] + [[50 + 10 * i, 50, 60 + 10 * i, 60] for i in range(len(p_parts))]
    return PhotoDetections(stratum, y, np.array(boxes, float), np.linspace(0.9, 0.6, len(boxes)),
                           np.array([p_lesion, *p_parts], float))


def test_study_prefers_suppression_when_parts_dilute_the_lesion_score():
    rng = np.random.default_rng(0)
    photos = []
    for k in range(40):
        y = k % 2
        # the whole-lesion crop is informative, the part crops are noise
        photos.append(_photo("a/b", y, rng.uniform(0, 1, 3).tolist(), 0.7 + 0.2 * y + rng.normal(0, 0.05)))
    study = BoxRuleStudy(containments=(0.0, 0.8))
    table = rule_table(photos, study)
    mean = table[table["aggregate"] == "mean"].set_index("containment")
    assert mean.loc[0.8, "macro"] > mean.loc[0.0, "macro"] + 0.1
    assert mean.loc[0.8, "mean_lesions"] == 1.0
    assert choose(table, study) == (0.8, False)  # no TTA probabilities: TTA stays off
    assert score_rule(photos, 0.8, "mean", 0.5, 30)["n"].eq(1).all()


def test_choose_keeps_off_without_a_real_gain():
    table = pd.DataFrame([{"containment": 0.0, "flip_tta": False, "aggregate": "mean", "macro": 0.80},
                          {"containment": 0.7, "flip_tta": False, "aggregate": "mean", "macro": 0.803},
                          {"containment": 0.0, "flip_tta": True, "aggregate": "mean", "macro": 0.801},
                          {"containment": 0.7, "flip_tta": True, "aggregate": "mean", "macro": 0.808},
                          {"containment": 0.7, "flip_tta": False, "aggregate": "max", "macro": 0.99}])
    assert choose(table, BoxRuleStudy(min_gain=0.005, tta_min_gain=0.002)) == (0.0, False)  # TTA +0.001 at "off"
    assert choose(table, BoxRuleStudy(min_gain=0.001, tta_min_gain=0.002)) == (0.7, True)  # TTA +0.005 at 0.7
    assert choose(table, BoxRuleStudy(min_gain=0.001, tta_min_gain=0.01)) == (0.7, False)


def test_study_table_has_tta_rows_when_tta_probabilities_exist():
    photos = [_photo("a/b", k % 2, [0.5], 0.3 + 0.4 * (k % 2)) for k in range(10)]
    for ph in photos:
        ph.p_tta = 1.0 - ph.p  # a TTA that reverses the ranking must show up in its own rows
    table = rule_table(photos, BoxRuleStudy(containments=(0.0,)))
    assert set(table["flip_tta"]) == {False, True}
    plain = table[(~table["flip_tta"]) & (table["aggregate"] == "max")]["macro"].iloc[0]
    flipped = table[(table["flip_tta"]) & (table["aggregate"] == "max")]["macro"].iloc[0]
    assert plain == 1.0 and flipped == 0.0


def test_overlapping_lobes_merge_into_their_union_but_separate_moles_do_not():
    boxes = np.array([
        [105, 0, 185, 135],   # right lobe of one lesion
        [14, 13, 99, 110],    # left lobe: does not touch the right one ...
        [90, 20, 120, 100],   # ... but this bridge overlaps both
        [300, 300, 320, 320],  # a separate mole
        [310, 310, 330, 330],  # overlaps the mole, but below the merge score
    ], dtype=float)
    scores = np.array([0.9, 0.86, 0.8, 0.95, 0.4])
    merged, ms = merge_overlapping(boxes, scores, 0.7, 0.0)
    assert ms.tolist() == pytest.approx([0.95, 0.9, 0.4])  # best first; the cluster keeps its best score
    np.testing.assert_allclose(merged[1], [14, 0, 185, 135])  # the union of the three lobes (transitive)
    np.testing.assert_allclose(merged[[0, 2]], boxes[[3, 4]])  # untouched
    # a stricter link (IoU > 0.1) leaves lobes that only just touch apart
    assert len(merge_overlapping(boxes, scores, 0.7, 0.1)[0]) == 5
    # off, or a single confident box: unchanged
    for args in ((0.0, 0.0), (0.92, 0.0)):
        b, s = merge_overlapping(boxes, scores, *args)
        np.testing.assert_array_equal(b, boxes.astype(np.float32))


def test_box_selection_apply_merges_then_selects():
    boxes = np.array([[0, 0, 60, 100], [40, 0, 100, 100], [45, 45, 55, 55]], dtype=float)
    scores = np.array([0.9, 0.8, 0.6])
    b, s = BoxSelection(0.5, 10, 0.8, merge_score=0.7, merge_min_area=0.5).apply(boxes, scores, (100, 100))
    np.testing.assert_allclose(b, [[0, 0, 100, 100]])  # lobes merged, then the globule inside is suppressed
    assert s.tolist() == pytest.approx([0.9])
    assert len(BoxSelection(0.5, 10, 0.0).apply(boxes, scores)[0]) == 3
    assert len(BoxSelection(0.5, 10, 0.0, merge_score=0.7, merge_min_area=0.5).apply(boxes, scores, (200, 200))[0]) == 3
    with pytest.raises(ValueError):
        BoxSelection(merge_score=0.7, merge_min_area=0.5).apply(boxes, scores)  # the floor needs the photo size
    np.testing.assert_allclose(pairwise_iou(boxes[:2])[0, 1], (20 * 100) / (100 * 100))


def _lobed_photos():
    """Close-ups whose lesion the detector boxes as two overlapping lobes, and a back photo with two
    neighbouring moles whose (slightly loose) boxes touch: merging must fuse the first, not the second."""
    from lesiontriage.train.box_merge import DetectedPhoto

    lesion = np.array([[10, 10, 210, 140]], float)
    lobes = np.array([[10, 10, 112, 110], [100, 40, 210, 140]], float)  # IoU with the lesion 0.39 and 0.42
    ham = [DetectedPhoto("ham10000", lesion, lobes, np.array([0.9, 0.85]), (220, 150)) for _ in range(5)]
    moles_gt = np.array([[100, 100, 120, 120], [122, 100, 142, 120]], float)
    touching = np.array([[100, 100, 123, 120], [121, 100, 142, 120]], float)  # the boxes of two neighbours overlap
    moles = [DetectedPhoto("moles", moles_gt, touching, np.array([0.9, 0.8]), (1000, 800))]
    return ham + moles


def test_merge_study_measures_lobes_merged_and_moles_kept():
    from lesiontriage.train.box_merge import BoxMergeStudy, detection_scores

    photos, study = _lobed_photos(), BoxMergeStudy()
    off = detection_scores(photos, 0.0, 0.0, study)
    on = detection_scores(photos, 0.7, 0.0, study)
    assert off["ham_map50"] == pytest.approx(0.0)  # no lobe reaches IoU 0.5
    assert on["ham_map50"] == pytest.approx(1.0, abs=1e-6)  # the union is the lesion
    assert on["moles_recall_iou0"] == off["moles_recall_iou0"] == 1.0
    assert on["moles_kept_per_photo"] == 1.0  # without an area floor the neighbours are fused ...
    assert on["moles_map50"] < off["moles_map50"]
    floor = detection_scores(photos, 0.7, 0.0, study, min_area=0.05)
    assert floor["moles_kept_per_photo"] == 2.0 and floor["moles_map50"] == off["moles_map50"]  # ... with one, not
    assert floor["ham_map50"] == pytest.approx(1.0, abs=1e-6)  # while the close-up's lobes still merge


def test_merge_choice_needs_map_gain_without_costing_recall_or_auc():
    from lesiontriage.train.box_merge import BoxMergeStudy, choose

    study = BoxMergeStudy()
    table = pd.DataFrame([
        {"merge_score": 0.0, "merge_iou": 0.0, "ham_map50": 0.80, "moles_recall_iou0": 0.94, "scenes_recall_iou0": 0.97, "macro_auc": 0.85},
        {"merge_score": 0.5, "merge_iou": 0.0, "ham_map50": 0.90, "moles_recall_iou0": 0.90, "scenes_recall_iou0": 0.97, "macro_auc": 0.85},
        {"merge_score": 0.6, "merge_iou": 0.0, "ham_map50": 0.88, "moles_recall_iou0": 0.94, "scenes_recall_iou0": 0.97, "macro_auc": 0.83},
        {"merge_score": 0.7, "merge_iou": 0.1, "ham_map50": 0.85, "moles_recall_iou0": 0.94, "scenes_recall_iou0": 0.968, "macro_auc": 0.849},
    ])
    assert choose(table, study) == (0.7, 0.1, 0.0)  # the two better-mAP rules cost recall / AUC
    tie = pd.concat([table, table.iloc[[3]].assign(merge_min_area=0.05)], ignore_index=True)
    assert choose(tie, study) == (0.7, 0.1, 0.05)  # equal mAP: the rule with an area floor changes fewer photos
    table["moles_map50"] = [0.70, 0.70, 0.70, 0.65]
    assert choose(table, study) == (0.0, 0.0, 0.0)  # ... and now the third costs wide-field mAP
    table.loc[3, "moles_map50"] = 0.70
    table.loc[3, "ham_map50"] = 0.805  # below min_map_gain: stay off
    assert choose(table, study) == (0.0, 0.0, 0.0)


# ---- many-lesion photos' lower score cut (box_selection.effective_threshold, train widefield-rule) ----

def _moles(n_confident: int, faint: float = 0.35) -> tuple[np.ndarray, np.ndarray]:
    """``n_confident`` separate small moles at 0.9, then one faint mole at ``faint`` (best first)."""
    boxes = np.array([[40.0 * i, 10, 40.0 * i + 20, 30] for i in range(n_confident + 1)])
    return boxes, np.array([0.9] * n_confident + [faint])


def test_faint_mole_is_kept_only_on_a_many_lesion_photo():
    from lesiontriage.box_selection import effective_threshold

    back_boxes, back_scores = _moles(5)
    few_boxes, few_scores = _moles(4)
    rule = (0.3, 5)
    assert effective_threshold(back_scores, 0.5, rule) == 0.3
    assert effective_threshold(few_scores, 0.5, rule) == 0.5
    assert select_boxes(back_boxes, back_scores, 0.5, 100, 0.0, rule).tolist() == [0, 1, 2, 3, 4, 5]
    assert select_boxes(few_boxes, few_scores, 0.5, 100, 0.0, rule).tolist() == [0, 1, 2, 3]
    assert select_boxes(back_boxes, back_scores, 0.5, 100).tolist() == [0, 1, 2, 3, 4]  # off by default
    faint_boxes, faint_scores = _moles(5, faint=0.25)
    assert 5 not in select_boxes(faint_boxes, faint_scores, 0.5, 100, 0.0, rule).tolist()  # below even the low cut
    # the lower cut never raises the normal one
    assert effective_threshold(back_scores, 0.5, (0.7, 1)) == 0.5


def test_box_selection_and_the_evaluation_apply_the_same_many_lesion_rule():
    from lesiontriage.evaluate.run import kept_index
    from lesiontriage.evaluate.tables import kept_detections

    boxes, scores = _moles(6)
    sel = BoxSelection(score_threshold=0.5, widefield_score_threshold=0.3, widefield_min_lesions=5)
    expected = sel.select(boxes, scores).tolist()
    assert expected == list(range(7))
    assert kept_index(scores, 0.5, 100, boxes, 0.0, sel.widefield).tolist() == expected
    assert kept_index(scores, 0.5, 100, boxes, 0.8, sel.widefield).tolist() == expected  # nested path too
    kb, ks = kept_detections(boxes, scores, 0.5, 100, 0.0, sel.widefield)
    assert len(kb) == 7 and ks.min() == pytest.approx(0.35)


def test_widefield_rule_choice_needs_a_mole_gain_and_guards():
    from lesiontriage.train.widefield_rule import WidefieldStudy, choose

    study = WidefieldStudy()
    base = {"moles_recall": 0.938, "scenes_recall": 0.970, "pad_ufes20_recall": 0.931, "ham10000_recall": 0.993,
            "widefield_precision": 0.75, "macro_auc": 0.85, "scene_auc": 0.90}
    rows = [{"threshold": 0.0, "min_lesions": 0, **base},
            {"threshold": 0.3, "min_lesions": 5, **base, "moles_recall": 0.969},
            {"threshold": 0.3, "min_lesions": 8, **base, "moles_recall": 0.969},  # same gain, more conservative
            {"threshold": 0.2, "min_lesions": 3, **base, "moles_recall": 0.985, "widefield_precision": 0.65}]
    assert choose(pd.DataFrame(rows), study) == (0.3, 8)  # the biggest gain fails the precision guard
    rows[1]["scene_auc"] = rows[2]["scene_auc"] = 0.88
    assert choose(pd.DataFrame(rows), study) == (0.0, 0)  # scene malignancy guard
    rows[1]["scene_auc"] = rows[2]["scene_auc"] = 0.90
    rows[1]["ham10000_recall"] = rows[2]["ham10000_recall"] = 0.99
    assert choose(pd.DataFrame(rows), study) == (0.0, 0)  # a close-up set lost recall


def test_widefield_study_counts_recall_precision_and_kept_boxes_per_set():
    from lesiontriage.train.box_merge import DetectedPhoto
    from lesiontriage.train.widefield_rule import WidefieldStudy, detection_scores

    boxes, scores = _moles(8)  # 8 confident moles + one faint one at 0.35
    gt = boxes.copy()  # every box is a real mole
    back = DetectedPhoto("moles", gt, boxes, scores, (400, 40))
    # a close-up: one lesion and a faint fragment elsewhere (not a lesion)
    close = DetectedPhoto("ham10000", np.array([[10.0, 10, 90, 90]]), np.array([[10.0, 10, 90, 90], [150, 150, 160, 160]]),
                          np.array([0.9, 0.35]), (200, 200))
    photos = [(p, p.boxes, p.scores) for p in (back, close)]
    off = detection_scores(photos, (0.0, 0), WidefieldStudy())
    on = detection_scores(photos, (0.3, 8), WidefieldStudy())
    assert off["moles_recall"] == pytest.approx(8 / 9) and on["moles_recall"] == 1.0
    assert off["moles_kept_per_photo"] == 8 and on["moles_kept_per_photo"] == 9
    assert on["moles_precision"] == 1.0
    # the close-up has one confident box: the lower cut does not apply, the fragment stays out
    assert on["ham10000_kept_per_photo"] == off["ham10000_kept_per_photo"] == 1
    assert on["ham10000_precision"] == 1.0
