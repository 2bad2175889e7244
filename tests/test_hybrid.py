"""The close-up blend (lesiontriage.hybrid) and its validation study (train/hybrid.py)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lesiontriage.hybrid import HybridRule, largest_box_fraction
from lesiontriage.train.hybrid import CloseUp, choose_gate, choose_weight, choose_weights, score_table, weight_pairs


def test_largest_box_fraction_is_hand_computed():
    boxes = np.array([[0, 0, 10, 10], [10, 10, 50, 30]], float)  # areas 100 and 800
    assert largest_box_fraction(boxes, 100, 40) == pytest.approx(800 / 4000)
    assert largest_box_fraction(np.zeros((0, 4)), 100, 40) == 0.0


def test_rule_applies_only_to_close_ups_and_only_when_switched_on():
    big, small = np.array([[0, 0, 60, 60]], float), np.array([[0, 0, 10, 10]], float)
    rule = HybridRule(whole_image_weight=0.5, closeup_min_box_fraction=0.15)
    assert rule.applies(big, 100, 100) and not rule.applies(small, 100, 100)
    assert not rule.applies(np.zeros((0, 4)), 100, 100)  # no lesion kept: nothing to blend
    assert not HybridRule(0.0, 0.15).applies(big, 100, 100)
    assert rule.blend(0.2, 0.6) == pytest.approx(0.4)
    assert HybridRule(0.25).blend(0.2, 0.6) == pytest.approx(0.75 * 0.2 + 0.25 * 0.6)


def test_gate_is_the_smallest_candidate_above_every_wide_field_photo():
    assert choose_gate([0.001, 0.14, 0.05], (0.05, 0.1, 0.15, 0.2)) == 0.15
    assert choose_gate([0.1], (0.05, 0.1)) == float("inf")  # none above: the blend cannot be gated, stays off


def _photos(whole_informative: bool, n: int = 200, seed: int = 0) -> list[CloseUp]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        y = int(i % 2)
        lesion = np.clip(0.3 + 0.2 * y + rng.normal(0, 0.25, 2), 0, 1)  # weakly informative
        whole = float(np.clip((0.3 + 0.4 * y if whole_informative else 0.5) + rng.normal(0, 0.15), 0, 1))
        out.append(CloseUp("a" if i < n // 2 else "b", y, lesion, 0.5, whole))
    return out


def test_study_turns_the_blend_on_only_when_it_helps():
    weights = (0.0, 0.25, 0.5, 0.75)
    helpful = score_table(_photos(True), weights, 0.15, "mean")
    assert choose_weight(helpful, 0.005) > 0
    assert helpful["blended_share"].iloc[-1] == 1.0
    noise = score_table(_photos(False), weights, 0.15, "mean")
    assert choose_weight(noise, 0.005) == 0.0
    gated_out = score_table(_photos(True), weights, 0.6, "mean")  # every box fraction 0.5 < gate: nothing blended
    assert gated_out["blended_share"].max() == 0.0 and gated_out["macro"].nunique() == 1


def test_the_app_says_how_a_blended_score_was_made():
    from lesiontriage.app_support import aggregation_sentence

    plain = aggregation_sentence("mean", 2, 0.3)
    assert "whole-image" not in plain
    blended = aggregation_sentence("mean", 2, 0.4, lesion_score=0.2, whole_image_score=0.6, whole_image_weight=0.5)
    assert blended.startswith(plain) and "0.5 x 0.20 + 0.5 x whole-image classifier 0.60 = 0.40" in blended


def test_study_refuses_models_without_a_whole_image_classifier(tmp_path):
    """A clear error naming the metadata file, raised before any data is read."""
    import json
    import shutil

    from lesiontriage.errors import ModelError
    from lesiontriage.paths import MODELS_DIR
    from lesiontriage.train.hybrid import choose_hybrid

    meta = json.loads((MODELS_DIR / "metadata.json").read_text()) if (MODELS_DIR / "metadata.json").exists() else {}
    if "classifier" not in meta.get("models", {}):
        pytest.skip("no trained models in models/ yet")
    models = tmp_path / "models"
    models.mkdir()
    for key in ("classifier", "detector"):
        if key in meta["models"]:
            shutil.copy(MODELS_DIR / meta["models"][key]["file"], models / meta["models"][key]["file"])
    meta["models"] = {k: v for k, v in meta["models"].items() if k in ("classifier", "detector")}
    (models / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="whole-image classifier"):
        choose_hybrid(models, manifest_path=tmp_path / "no_manifest.parquet")


def test_three_way_blend_is_a_weighted_mean_and_refuses_bad_weights():
    rule = HybridRule(0.2, 0.15, full_frame_weight=0.5)
    assert rule.lesion_weight == pytest.approx(0.3)
    assert rule.blend(0.1, 0.6, 0.9) == pytest.approx(0.3 * 0.1 + 0.2 * 0.6 + 0.5 * 0.9)
    assert HybridRule(0.0, 0.15, 0.4).blend(0.1, None, 0.9) == pytest.approx(0.6 * 0.1 + 0.4 * 0.9)  # whole view unused
    assert HybridRule(0.0, 0.15, 0.4).applies(np.array([[0, 0, 60, 60]], float), 100, 100)
    with pytest.raises(ValueError, match="full-frame"):
        rule.blend(0.1, 0.6, None)
    with pytest.raises(ValueError, match="sum to <= 1"):
        HybridRule(0.6, 0.15, 0.6)
    text = rule.describe("mean", 0.1, 0.6, 0.9)
    assert "0.3 x lesion mean 0.10" in text and "0.2 x whole-image classifier 0.60" in text and "whole photo 0.90" in text


def test_weight_pairs_keep_the_lesions_a_say():
    pairs = weight_pairs((0.0, 0.4, 0.8), 0.2)
    assert (0.0, 0.0) in pairs and (0.4, 0.4) in pairs and (0.0, 0.8) in pairs
    assert (0.8, 0.4) not in pairs and (0.4, 0.8) not in pairs


def test_study_picks_the_informative_view():
    """Frame view informative, whole-image view noise: the chosen pair gives the frame the weight."""
    rng = np.random.default_rng(1)
    photos = []
    for i in range(300):
        y = int(i % 2)
        lesion = np.clip(0.3 + 0.1 * y + rng.normal(0, 0.25, 2), 0, 1)
        frame = float(np.clip(0.3 + 0.4 * y + rng.normal(0, 0.12), 0, 1))
        photos.append(CloseUp("a" if i < 150 else "b", y, lesion, 0.5, float(rng.uniform()), frame))
    table = score_table(photos, weight_pairs((0.0, 0.3, 0.6), 0.2), 0.15, "mean")
    whole, frame = choose_weights(table, 0.005)
    assert frame >= 0.3 and whole == 0.0


def test_soft_gate_scales_the_views_linearly_below_the_gate():
    rule = HybridRule(0.2, 0.15, 0.6, ramp_from=0.05)
    assert rule.view_scale(0.15) == 1.0 and rule.view_scale(0.5) == 1.0
    assert rule.view_scale(0.10) == pytest.approx(0.5)  # half-way between 0.05 and 0.15
    assert rule.view_scale(0.05) == 0.0 and rule.view_scale(0.01) == 0.0
    assert HybridRule(0.2, 0.15, 0.6).view_scale(0.14) == 0.0  # hard gate
    box = np.array([[0, 0, 10, 10]], float)  # 100 px of a 1000 px image: fraction 0.10
    photo = rule.for_photo(box, 100, 10)
    assert photo is not None and photo.whole_image_weight == pytest.approx(0.1) and photo.full_frame_weight == pytest.approx(0.3)
    assert photo.blend(0.2, 0.4, 0.8) == pytest.approx(0.6 * 0.2 + 0.1 * 0.4 + 0.3 * 0.8)
    assert rule.for_photo(box, 400, 10) is None  # fraction 0.025: a wide-field mole, no blend
    assert rule.for_photo(np.zeros((0, 4)), 100, 10) is None
    assert HybridRule(0.0, 0.15, 0.0, ramp_from=0.05).for_photo(box, 100, 10) is None  # blend off
    with pytest.raises(ValueError, match="ramp_from"):
        HybridRule(0.2, 0.15, 0.6, ramp_from=0.2)


def test_study_takes_a_soft_gate_only_when_it_helps_and_spares_the_scenes():
    from lesiontriage.train.hybrid import HybridStudy, choose_ramp, photo_score, scene_auc

    rng = np.random.default_rng(2)
    photos = []
    for i in range(300):  # half the photos are clinical close-ups with a small box (fraction 0.1)
        y = int(i % 2)
        lesion = np.clip(0.35 + 0.05 * y + rng.normal(0, 0.25, 2), 0, 1)
        frame = float(np.clip(0.3 + 0.4 * y + rng.normal(0, 0.1), 0, 1))
        photos.append(CloseUp("a" if i < 150 else "b", y, lesion, 0.1 if i >= 150 else 0.5, 0.5, frame))
    pairs = weight_pairs((0.0, 0.4, 0.8), 0.2)
    hard = score_table(photos, pairs, 0.15, "mean")
    soft = {0.02: score_table(photos, pairs, 0.15, "mean", 0.02)}
    assert soft[0.02]["blended_share"].max() == 1.0 and hard["blended_share"].max() == 0.5
    study = HybridStudy()
    hard_macro = float(hard["macro"].max())
    assert float(soft[0.02]["macro"].max()) > hard_macro + study.min_gain
    assert choose_ramp(soft, hard_macro, {0.02: 0.70}, 0.70, study) == 0.02
    assert choose_ramp(soft, hard_macro, {0.02: 0.60}, 0.70, study) is None  # costs the scenes too much
    assert choose_ramp(soft, float(soft[0.02]["macro"].max()), {0.02: 0.7}, 0.7, study) is None  # no gain
    # photo_score is the pipeline's arithmetic: at fraction 0.10 with the ramp from 0.02 the views get 8/13 of their weight
    ph = CloseUp("a", 1, np.array([0.2]), 0.10, 0.4, 0.8)
    k = (0.10 - 0.02) / 0.13
    score, blended = photo_score(HybridRule(0.2, 0.15, 0.6, 0.02), ph, "mean")
    assert blended and score == pytest.approx((1 - 0.8 * k) * 0.2 + k * (0.2 * 0.4 + 0.6 * 0.8))
    scenes = [CloseUp("s", y, np.array([p]), 0.005, 0.5, 0.5) for y, p in ((0, 0.1), (1, 0.3), (0, 0.2), (1, 0.6))]
    assert scene_auc(HybridRule(0.2, 0.15, 0.6, 0.02), scenes, "mean") == pytest.approx(1.0)


def test_no_lesion_photo_is_scored_by_the_views_when_switched_on():
    rule = HybridRule(0.1, 0.15, 0.7, ramp_from=0.02, no_lesion_views=True)
    none = rule.for_photo(np.zeros((0, 4)), 100, 100)
    assert none is not None and none.lesion_weight == pytest.approx(0.0, abs=1e-9)
    assert none.whole_image_weight == pytest.approx(0.125) and none.full_frame_weight == pytest.approx(0.875)
    assert none.blend(0.0, 0.4, 0.8) == pytest.approx(0.125 * 0.4 + 0.875 * 0.8)
    assert "lesion mean" not in none.describe("mean", 0.0, 0.4, 0.8)  # no lesion term when it has no weight
    assert HybridRule(0.1, 0.15, 0.7, ramp_from=0.02).for_photo(np.zeros((0, 4)), 100, 100) is None  # off: 0 by definition
    assert HybridRule(0.0, 0.15, 0.0, no_lesion_views=True).for_photo(np.zeros((0, 4)), 100, 100) is None  # blend off
    from lesiontriage.train.hybrid import photo_score

    ph = CloseUp("a", 1, np.zeros(0), 0.0, 0.4, 0.8)
    assert photo_score(rule, ph, "mean") == (pytest.approx(0.75), True)
    assert photo_score(HybridRule(0.1, 0.15, 0.7), ph, "mean") == (0.0, False)
    from lesiontriage.app_support import aggregation_sentence

    text = aggregation_sentence("mean", 0, 0.75, 0.0, 0.4, 0.125, 0.8, 0.875)
    assert text.startswith("No lesion found") and "whole photo 0.80" in text and "= 0.75" in text


def test_product_check_scores_a_classifier_by_the_shipped_grid():
    """train/product_check: the frame view alone and the best pair of the shipped grid, per candidate."""
    from lesiontriage.pipeline import PipelineSettings
    from lesiontriage.train.product_check import product_score, stratum_macro

    rng = np.random.default_rng(3)
    good, noise = [], []
    for i in range(200):
        y = int(i % 2)
        lesion = np.clip(0.3 + 0.1 * y + rng.normal(0, 0.25, 2), 0, 1)
        frame = float(np.clip(0.3 + 0.4 * y + rng.normal(0, 0.1), 0, 1))
        good.append(CloseUp("a" if i < 100 else "b", y, lesion, 0.5, 0.5, frame))
        noise.append(CloseUp("a" if i < 100 else "b", y, lesion, 0.5, 0.5, float(rng.uniform())))
    settings = PipelineSettings(closeup_min_box_fraction=0.15, closeup_ramp_from=0.02, no_lesion_views=True)
    a, b = product_score("informative frame", good, settings), product_score("noise frame", noise, settings)
    assert a.frame_macro_auc > 0.9 > b.frame_macro_auc
    assert a.product_macro_auc > b.product_macro_auc and a.full_frame_weight >= 0.5
    pure_two_stage = stratum_macro(noise, [float(np.mean(p.lesion_p)) for p in noise])
    assert b.product_macro_auc >= pure_two_stage - 1e-9  # the grid holds the (0, 0) pair: never worse than the lesions
    assert set(a.by_stratum) == {"a", "b"}


def test_crop_margin_replaces_the_trained_one_only_with_a_gain_that_spares_the_scenes():
    from lesiontriage.train.hybrid import BlendChoice, HybridStudy, choose_margin

    def blend(macro: float, scenes: float | None) -> BlendChoice:
        return BlendChoice(0.6, 0.2, 0.02, True, {}, pd.DataFrame(), macro, scenes)

    study = HybridStudy()
    assert choose_margin({0.25: blend(0.89, 0.60), 0.5: blend(0.893, 0.60), 0.75: blend(0.90, 0.60)}, 0.25, study) == 0.75
    assert choose_margin({0.25: blend(0.89, 0.60), 0.75: blend(0.894, 0.60)}, 0.25, study) == 0.25  # under min_gain
    assert choose_margin({0.25: blend(0.89, 0.60), 0.75: blend(0.90, 0.55)}, 0.25, study) == 0.25  # scenes fall 0.05
    assert choose_margin({0.25: blend(0.89, None), 0.75: blend(0.90, 0.55), 1.0: blend(0.91, 0.5)}, 0.25, study) == 1.0


def test_main_lesion_stands_in_for_the_aggregate_only_inside_the_ramp():
    rule = HybridRule(0.2, 0.15, 0.6, ramp_from=0.02, ramp_primary_lesion=True)
    p, scores = [0.9, 0.1, 0.2], [0.6, 0.95, 0.7]  # the most confident detection is the second, not the first
    assert rule.lesion_term(p, scores, "mean", 0.09) == (pytest.approx(0.1), 1)
    assert rule.lesion_term(p, scores, "max", 0.09) == (pytest.approx(0.1), 1)  # whatever the aggregate
    assert rule.lesion_term(p, scores, "mean", 0.30) == (pytest.approx(0.4), None)  # at/above the gate: aggregate
    assert rule.lesion_term(p, scores, "max", 0.01) == (pytest.approx(0.9), None)  # wide-field, under the ramp
    assert rule.lesion_term([], [], "mean", 0.0) == (0.0, None)
    off = HybridRule(0.2, 0.15, 0.6, ramp_from=0.02)
    assert off.lesion_term(p, scores, "mean", 0.09) == (pytest.approx(0.4), None)
    assert not HybridRule(0.2, 0.15, 0.6, ramp_primary_lesion=True).uses_main_lesion(0.09)  # hard gate: no ramp
    assert not HybridRule(0.0, 0.15, 0.0, ramp_from=0.02, ramp_primary_lesion=True).uses_main_lesion(0.09)  # blend off
    assert "main lesion #2 0.10" in rule.describe("mean", 0.1, 0.5, 0.5, main_lesion=1)


def test_study_scores_the_main_lesion_by_detection_score_and_only_when_asked():
    """score_table's main_lesion switch: clinical close-ups whose most confident box carries the signal and whose
    bystander boxes are noise gain from it; without detection scores the lesions' order stands in."""
    rng = np.random.default_rng(0)
    photos = []
    for i in range(300):
        y = int(i % 2)
        main = float(np.clip(0.3 + 0.4 * y + rng.normal(0, 0.1), 0, 1))
        spots = rng.uniform(0, 1, 3)
        lesion = np.r_[spots[:1], main, spots[1:]]
        det = np.array([0.6, 0.9, 0.7, 0.55])
        photos.append(CloseUp("a" if i < 150 else "b", y, lesion, 0.08, 0.5, 0.5, det))
    plain = score_table(photos, [(0.2, 0.2)], 0.15, "mean", 0.02)
    main = score_table(photos, [(0.2, 0.2)], 0.15, "mean", 0.02, main_lesion=True)
    assert float(main["macro"].iloc[0]) > float(plain["macro"].iloc[0]) + 0.05 and bool(main["main_lesion"].iloc[0])
    hard = score_table(photos, [(0.2, 0.2)], 0.15, "mean", None, main_lesion=True)  # no ramp: nothing to switch
    assert float(hard["macro"].iloc[0]) == pytest.approx(float(score_table(photos, [(0.2, 0.2)], 0.15, "mean")["macro"].iloc[0]))
    unordered = CloseUp("a", 1, np.array([0.3, 0.8]), 0.08, 0.5, 0.5)  # no scores: the first is the detector's best
    assert unordered.detection_scores().argmax() == 0
