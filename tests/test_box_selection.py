"""Box selection: score cut, nested-part suppression and count cap, on hand-made boxes."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lesiontriage.box_selection import BoxSelection, containment, select_boxes, suppress_nested
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
