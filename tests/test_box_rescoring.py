"""Box confidence (box_rescoring.py, train/box_rescorer.py): features, the model file, the decision,
and that mAP ranks by the confidence while the kept boxes stay the detector score's."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lesiontriage.box_rescoring import FEATURE_NAMES, BoxRescorer, box_features
from lesiontriage.errors import ModelError
from lesiontriage.evaluate.tables import detection_metrics
from lesiontriage.paths import MODELS_DIR
from lesiontriage.pipeline import PipelineSettings, TriagePipeline
from lesiontriage.train.box_rescorer import BoxRescorerConfig, decide, fit

COL = {name: i for i, name in enumerate(FEATURE_NAMES)}


def _photo() -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """A 400x300 close-up: one lobe (best score), the whole lesion around it, a mole at the border."""
    boxes = np.array([[150, 100, 220, 170], [100, 60, 300, 240], [0, 0, 30, 20]], dtype=float)
    return boxes, np.array([0.95, 0.90, 0.40]), (400, 300)


def test_features_hand_checked():
    boxes, scores, size = _photo()
    f = box_features(boxes, scores, size)
    assert f.shape == (3, len(FEATURE_NAMES))
    assert f[:, COL["is_top"]].tolist() == [1.0, 0.0, 0.0]
    np.testing.assert_allclose(f[:, COL["log_rank"]], np.log1p([0, 1, 2]))
    np.testing.assert_allclose(f[1, COL["width"]], 200 / 400)
    np.testing.assert_allclose(f[1, COL["height"]], 180 / 300)
    assert f[2, COL["border_edges"]] == 2.0  # left and top edges touch the frame
    assert f[0, COL["border_edges"]] == 0.0
    # the lobe (70x70) lies inside the lesion box (200x180): IoU with the better box is for box 1 only
    np.testing.assert_allclose(f[1, COL["iou_with_better"]], 70 * 70 / (200 * 180))
    assert f[0, COL["iou_with_better"]] == 0.0
    np.testing.assert_allclose(f[:, COL["log_confident"]], np.log1p(2))
    np.testing.assert_allclose(f[:, COL["best_score"]], 0.95)


def test_features_do_not_depend_on_the_decode_resolution():
    boxes, scores, size = _photo()
    np.testing.assert_allclose(box_features(boxes * 2.5, scores, (size[0] * 2.5, size[1] * 2.5)),
                               box_features(boxes, scores, size), atol=1e-12)
    assert box_features(np.zeros((0, 4)), np.zeros(0), size).shape == (0, len(FEATURE_NAMES))


def _synthetic_table(n: int = 600, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Boxes whose correctness depends on the size relative to the photo's largest box, not the score."""
    rng = np.random.default_rng(seed)
    feats, labels = [], []
    for _ in range(n // 3):
        big = rng.uniform(0.3, 0.9)
        boxes = np.array([[0.1, 0.1, 0.1 + big, 0.1 + big], [0.2, 0.2, 0.35, 0.35], [0.5, 0.5, 0.6, 0.6]])
        scores = rng.uniform(0.6, 1.0, 3)
        feats.append(box_features(boxes, scores, (1.0, 1.0)))
        labels.append([1, 0, 0])
    return np.vstack(feats), np.concatenate(labels)


def test_fit_learns_what_the_score_misses_and_round_trips(tmp_path: Path):
    from sklearn.metrics import roc_auc_score

    x, y = _synthetic_table()
    model = fit(x, y, BoxRescorerConfig(hidden=8, max_iter=500))
    xt, yt = _synthetic_table(seed=1)
    assert roc_auc_score(yt, xt[:, COL["score"]]) < 0.7  # the score alone barely ranks them
    assert roc_auc_score(yt, model.predict(xt)) > 0.95
    sha = model.save(tmp_path / "r.safetensors")
    again = BoxRescorer.load(tmp_path / "r.safetensors", sha)
    np.testing.assert_allclose(again.predict(xt), model.predict(xt), atol=1e-5)  # stored as float32
    with pytest.raises(ModelError):
        BoxRescorer.load(tmp_path / "r.safetensors", "0" * 64)


def test_a_file_for_other_features_is_refused():
    t = {"mean": np.zeros(3), "std": np.ones(3), "w1": np.zeros((3, 2)), "b1": np.zeros(2), "w2": np.zeros(2),
         "b2": np.zeros(1)}
    with pytest.raises(ValueError, match="features"):
        BoxRescorer.from_tensors(t)


def test_decision_needs_a_ham_gain_and_guards_the_other_sets():
    cfg = BoxRescorerConfig(min_map_gain=0.01, map_tolerance=0.005)
    base = {"ham10000": 0.76, "moles": 0.82, "scenes": 0.87, "pad_ufes20": 0.54}
    assert decide(base, {**base, "ham10000": 0.85}, cfg)[0]
    assert not decide(base, {**base, "ham10000": 0.765}, cfg)[0]
    ok, why = decide(base, {**base, "ham10000": 0.85, "scenes": 0.86}, cfg)
    assert not ok and "scenes" in why
    assert decide(base, {**base, "ham10000": 0.85, "scenes": 0.866}, cfg)[0]  # within tolerance


def test_map_ranks_by_confidence_but_kept_boxes_follow_the_detector_score():
    gt = [np.array([[0, 0, 100, 100]]), np.array([[0, 0, 100, 100]])]
    # each photo: a wrong lobe scored highest, the right box second
    boxes = [np.array([[0, 0, 40, 40], [0, 0, 100, 100]], float)] * 2
    scores = [np.array([0.95, 0.6])] * 2
    confidence = [np.array([0.1, 0.9])] * 2
    plain = detection_metrics(gt, boxes, scores, 0.5)
    ranked = detection_metrics(gt, boxes, scores, 0.5, rank_scores=confidence)
    assert ranked["map50"]["value"] > plain["map50"]["value"]
    assert ranked["map_detector_score"]["map50"] == pytest.approx(plain["map50"]["value"])
    assert ranked["map_ranked_by"] == "box_confidence" and plain["map_ranked_by"] == "detector_score"
    # the kept set (score >= 0.5) is the same two boxes either way
    assert ranked["detections_per_image_kept"] == plain["detections_per_image_kept"]
    assert ranked["recall_iou50"]["value"] == plain["recall_iou50"]["value"]


def test_rescorer_for_another_detector_or_merge_rule_is_skipped(tmp_path: Path, caplog):
    x, y = _synthetic_table(90)
    sha = fit(x, y, BoxRescorerConfig(hidden=4, max_iter=200)).save(tmp_path / "r.safetensors")
    models = {"detector": {"sha256": "a" * 64},
              "box_rescorer": {"file": "r.safetensors", "sha256": sha, "applies_to_detector_sha256": "a" * 64,
                               "merge_rule": [0.7, 0.0, 0.05]}}
    settings = PipelineSettings(merge_score=0.7, merge_iou=0.0, merge_min_area=0.05)
    assert TriagePipeline.load_box_rescorer(tmp_path, models, settings) is not None
    other_detector = {**models, "detector": {"sha256": "b" * 64}}
    assert TriagePipeline.load_box_rescorer(tmp_path, other_detector, settings) is None
    other_merge = PipelineSettings(merge_score=0.8, merge_iou=0.0, merge_min_area=0.05)
    assert TriagePipeline.load_box_rescorer(tmp_path, models, other_merge) is None
    assert "box confidence off" in caplog.text
    assert TriagePipeline.load_box_rescorer(tmp_path, {"detector": models["detector"]}, settings) is None


def test_shipped_rescorer_matches_the_shipped_detector_and_features():
    meta_path = MODELS_DIR / "metadata.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    entry = (meta.get("models") or {}).get("box_rescorer")
    if not entry:
        pytest.skip("no box rescorer shipped")
    assert entry["features"] == list(FEATURE_NAMES)
    assert entry["applies_to_detector_sha256"] == meta["models"]["detector"]["sha256"]
    p = meta["pipeline"]
    assert entry["merge_rule"] == [p["merge_score"], p["merge_iou"], p["merge_min_area"]]
    model = BoxRescorer.load(MODELS_DIR / entry["file"], entry["sha256"])
    boxes, scores, size = _photo()
    c = model.score(boxes, scores, size)
    assert c.shape == (3,) and np.all((c >= 0) & (c <= 1))
    assert meta["pipeline"]["box_rescorer_choice"]["shipped"] is True


def test_box_table_labels_the_merged_boxes_the_product_would_show():
    from lesiontriage.train.box_merge import DetectedPhoto
    from lesiontriage.train.box_rescorer import box_table, map_by_set, per_photo

    lesion = np.array([[100.0, 60, 300, 240]])
    # two confident overlapping lobes of the lesion (each IoU < 0.5) and a faint patch elsewhere
    raw = np.array([[100.0, 60, 190, 240], [185, 60, 280, 240], [0, 0, 30, 20]])
    photo = DetectedPhoto("ham10000", lesion, raw, np.array([0.95, 0.9, 0.4]), (400, 300))
    unmerged = box_table([photo], (0.0, 0.0, 0.0))
    assert unmerged.labels.tolist() == [0, 0, 0]
    merged = box_table([photo], (0.7, 0.0, 0.05))  # the lobes become their union, as in the product
    assert len(merged.labels) == 2 and merged.labels.tolist() == [1, 0]
    np.testing.assert_allclose(merged.boxes[0][0], [100, 60, 280, 240])  # IoU 0.9 with the lesion
    assert merged.features.shape == (2, len(FEATURE_NAMES))
    # ranking the photo's boxes by a perfect confidence gives mAP 1 for its set
    assert map_by_set(merged, per_photo(merged, merged.labels.astype(float)))["ham10000"] == pytest.approx(1.0)
