"""`lesiontriage evaluate`: report assembly (pure functions on hand-made tables), the table
builder and cache (no network), the orchestration with a tiny random classifier (checks that the
evaluation reproduces the pipeline's own numbers), and a run with the shipped models when present."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score

from lesiontriage.evaluate import tables as T
from lesiontriage.evaluate.embedding import embed_2d, embedding_json, embedding_table
from lesiontriage.evaluate.run import (
    EvalItem,
    EvalSettings,
    ImageRecord,
    ModelInfo,
    PredictionCache,
    _sample,
    build_tables,
    model_info,
)
from lesiontriage.paths import MODELS_DIR

HEADLINE_KEYS = ("lesion_auc", "lesion_ap", "lesion_auc_clinical", "lesion_auc_smartphone", "detection_map50",
                 "detection_map50_95", "detection_recall_iou0", "widefield_recall", "ece",
                 "specificity_at_95_sensitivity", "image_auc.two_stage.mean", "image_auc.two_stage.max",
                 "image_auc.two_stage.noisy_or", "image_auc.direct.whole", "image_auc.one_step_c2.max")


# ---------------------------------------------------------------------------------------------
# hand-made tables
# ---------------------------------------------------------------------------------------------

def _images(n: int = 80, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    y = np.array([1, 0] * (n // 2))
    splits = np.where(np.arange(n) < n // 2, "isic2018_test", "pad_ufes20_test")
    df = pd.DataFrame({
        "split": splits, "path": [f"img{i}.jpg" for i in range(n)], "image_id": [f"id{i}" for i in range(n)],
        "source": np.where(splits == "isic2018_test", "isic2018_task3_test", "pad_ufes20_subset"),
        "modality": np.where(splits == "isic2018_test", "dermoscopy", "smartphone"),
        "synthetic": False, "malignant": pd.array(y, dtype="Int8"),
        "biopsied": pd.array([bool(i % 3) for i in range(n)], dtype="boolean"),
        "status": "ok", "n_gt": 1, "diagnosis": np.where(y == 1, "MEL", "NV"), "lesion_index": 0,
    })
    signal = y * 1.2 + rng.normal(0, 1, n)
    p = 1 / (1 + np.exp(-signal))
    for agg in T.AGGREGATIONS:
        df[f"score_two_stage_{agg}"] = p
    df["score_direct_whole"] = 1 / (1 + np.exp(-(y * 0.3 + rng.normal(0, 1, n))))
    df["p_gt"] = p
    df["logit_gt"] = np.log(p / (1 - p)) * 2.0  # raw logit for T = 2
    df["p_detected"] = p
    df["no_lesion_detected"] = pd.array([i == 3 for i in range(n)], dtype="boolean")
    return df


def test_groups_exclude_synthetic_from_pooled_and_add_biopsied_subset():
    df = _images(20)
    df.loc[0:3, "split"] = "scenes_test"
    df.loc[0:3, "synthetic"] = True
    groups = dict(T.evaluation_groups(df, T.SPLIT_ORDER))
    assert not groups["all_real_test"][0:3].any() and groups["all_real_test"][4:].all()
    assert groups["split=scenes_test"].sum() == 4
    bio = groups["split=pad_ufes20_test/biopsied"]
    assert bio.sum() == int((df["split"].eq("pad_ufes20_test") & df["biopsied"]).sum())
    assert list(groups)[:1] == ["all_real_test"]


def test_ranking_rows_match_sklearn_and_skip_missing_and_unlabelled():
    df = _images(60)
    df.loc[5, "malignant"] = pd.NA  # out of scope: never scored
    df.loc[6, "score_two_stage_mean"] = np.nan  # failed image: counted as missing
    rows = T.ranking_rows(df, T.evaluation_groups(df, T.SPLIT_ORDER), {"two_stage.mean": "score_two_stage_mean",
                                                                       "absent": "no_such_column"}, n_boot=200)
    assert {r["score"] for r in rows} == {"two_stage.mean"}
    r = next(r for r in rows if r["group"] == "all_real_test")
    ok = df["malignant"].notna() & df["score_two_stage_mean"].notna()
    y, p = df.loc[ok, "malignant"].astype(int), df.loc[ok, "score_two_stage_mean"]
    assert r["n"] == ok.sum() and r["n_missing_score"] == 1
    assert r["auc"] == pytest.approx(roc_auc_score(y, p))
    assert r["ap"] == pytest.approx(average_precision_score(y, p))
    assert r["auc_ci_low"] <= r["auc"] <= r["auc_ci_high"]


def test_one_class_group_is_flagged_not_scored():
    df = _images(20)
    df["malignant"] = pd.array([0] * 20, dtype="Int8")
    rows = T.ranking_rows(df, [("all", pd.Series(True, index=df.index))], {"s": "p_gt"}, n_boot=50)
    assert rows[0]["auc"] is None or math.isnan(rows[0]["auc"])
    assert "one class" in rows[0]["flag"]
    paired = T.paired_rows(df, [("all", pd.Series(True, index=df.index))], [("a", "p_gt", "b", "p_detected")], n_boot=50)
    assert all("one class" in r["flag"] for r in paired)


def test_paired_rows_identical_scores_give_p_one():
    df = _images(60)
    rows = T.paired_rows(df, [("all", pd.Series(True, index=df.index))], [("gt", "p_gt", "det", "p_detected")], n_boot=200)
    auc = next(r for r in rows if r["metric"] == "auc")
    assert auc["delta"] == pytest.approx(0.0) and auc["p_value"] == pytest.approx(1.0)


def test_operating_points_at_shipped_threshold_and_prevalence():
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    p = np.array([0.9, 0.8, 0.6, 0.2, 0.7, 0.3, 0.2, 0.1, 0.1, 0.05])
    df = pd.DataFrame({"split": "isic2018_test", "synthetic": False, "malignant": pd.array(y, dtype="Int8"),
                       "modality": "dermoscopy", "score_two_stage_mean": p})
    rows = T.operating_point_rows(df, [("all", pd.Series(True, index=df.index))],
                                  {"two_stage.mean": {"refer": 0.5, "urgent": 0.85}}, prevalences=(0.02,),
                                  scores={"two_stage.mean": "score_two_stage_mean"})
    refer = next(r for r in rows if r["point"] == "shipped_refer")
    # p >= 0.5: TP = 3 (0.9, 0.8, 0.6), FP = 1 (0.7), FN = 1, TN = 5
    assert (refer["tp"], refer["fp"], refer["fn"], refer["tn"]) == (3, 1, 1, 5)
    sens, spec = 3 / 4, 5 / 6
    assert refer["ppv_at_2pct"] == pytest.approx(sens * 0.02 / (sens * 0.02 + (1 - spec) * 0.98))
    s95 = next(r for r in rows if r["point"] == "sensitivity_95")
    assert s95["sensitivity"] == 1.0 and s95["threshold"] == pytest.approx(0.2)
    assert s95["threshold_chosen_on"].startswith("this test group")


def test_shipped_thresholds_read_from_metadata():
    """The product's score (metadata mode two_stage) is the hybrid strategy; the paper's lesions-only
    score has its own thresholds."""
    meta = {"triage": {"two_stage": {"thresholds": {"mean": {"refer": 0.2, "urgent": 0.6}}},
                       "lesions_only": {"thresholds": {"max": {"refer": 0.1, "urgent": 0.5}}},
                       "whole_image": {"thresholds": {"whole": {"refer": 0.3, "urgent": 0.7}}}}}
    thr = T.shipped_thresholds(meta)
    assert thr == {"hybrid.mean": {"refer": 0.2, "urgent": 0.6}, "two_stage.max": {"refer": 0.1, "urgent": 0.5},
                   "direct.whole": {"refer": 0.3, "urgent": 0.7}}
    assert T.shipped_thresholds({}) == {}


def test_calibration_before_after_uses_raw_logit_and_temperature():
    df = _images(80)
    out = T.calibration_section(df, [("all", pd.Series(True, index=df.index))], temperature=2.0, n_boot=20)
    g = out["groups"]["all"]
    # 'after' = sigmoid(logit / T) must reproduce the stored calibrated p exactly
    after_mean = np.nansum(np.array(g["after"]["mean_predicted"], dtype=float) * np.array(g["after"]["counts"])) / g["n"]
    assert after_mean == pytest.approx(df["p_gt"].mean(), rel=1e-9)
    assert g["ece_before"]["value"] != pytest.approx(g["ece_after"]["value"])
    same = T.calibration_section(df, [("all", pd.Series(True, index=df.index))], temperature=1.0, logit_col="absent", n_boot=5)
    assert same["groups"]["all"]["ece_before"]["value"] == pytest.approx(same["groups"]["all"]["ece_after"]["value"])


def test_detection_metrics_toy_cases():
    gt = [np.array([[10, 10, 20, 20], [50, 50, 60, 60]], float), np.array([[0, 0, 10, 10]], float)]
    perfect = T.detection_metrics(gt, [g.copy() for g in gt], [np.array([0.9, 0.8]), np.array([0.7])], score_threshold=0.5)
    assert perfect["map50"]["value"] == pytest.approx(1.0) and perfect["recall_iou0"]["value"] == 1.0
    assert perfect["iou"]["median"] == pytest.approx(1.0)
    # second image's box scores below the pipeline threshold: still in mAP, not in recall
    low = T.detection_metrics(gt, [g.copy() for g in gt], [np.array([0.9, 0.8]), np.array([0.2])], score_threshold=0.5)
    assert low["recall_iou0"]["n_found"] == 2 and low["recall_iou0"]["n"] == 3
    assert low["map50"]["value"] == pytest.approx(1.0)
    # the pipeline keeps at most max_kept boxes per image
    capped = T.detection_metrics(gt, [g.copy() for g in gt], [np.array([0.9, 0.8]), np.array([0.7])], 0.5, max_kept=1)
    assert capped["recall_iou0"]["n_found"] == 2 and capped["detections_per_image_kept"]["mean"] == 1.0
    # in-spec recall: on a 1000 px image the 10 px boxes are 1% of the side (below the 1.5% floor), on a
    # 100 px image 10%; the missed box of image 2 is in spec, so in-spec recall is 0 of 1
    spec = T.detection_metrics(gt, [g.copy() for g in gt], [np.array([0.9, 0.8]), np.array([0.2])], 0.5,
                               image_sides=[1000.0, 100.0])
    assert spec["recall_iou0_in_spec"]["n"] == 1 and spec["recall_iou0_in_spec"]["n_found"] == 0
    assert spec["recall_iou0_in_spec"]["n_below_spec"] == 2 and "recall_iou0_in_spec" not in low
    assert [len(g) for g in T.in_spec_gt(gt, [500.0, 500.0])] == [2, 1]  # 10 px of 500 = 2%: all in spec


def test_error_rows_list_worst_false_negatives_and_positives():
    df = _images(40)
    out = T.error_rows(df, [("all", pd.Series(True, index=df.index))], "gt_box", "p_gt", k=3)["all"]
    mal = df[df["malignant"] == 1].sort_values("p_gt")
    ben = df[df["malignant"] == 0].sort_values("p_gt", ascending=False)
    assert [r["image_id"] for r in out["false_negatives"]] == mal["image_id"].head(3).tolist()
    assert [r["image_id"] for r in out["false_positives"]] == ben["image_id"].head(3).tolist()


def test_headline_has_every_named_key_in_metric_shape_and_statuses():
    df = _images(80)
    ctx = T.ReportContext(status={"classifier": "ok", "detector": "ok", "image_classifier": "ok",
                                  "detector_c2": "not available: detector_c2 not trained"}, n_boot=50, n_boot_paired=50)
    sections = {"lesion_level": T.lesion_level_section(df, df, ctx), "image_level": T.image_level_section(df, ctx),
                "calibration": T.calibration_report(df, df, ctx), "detection": {"one_class": {}}}
    out = T.headline(sections, df, ctx, {"command": "test"})
    for key in HEADLINE_KEYS:
        assert set(out[key]) >= {"value", "ci_low", "ci_high", "n", "split"}, key
    assert out["lesion_auc"]["value"] == pytest.approx(roc_auc_score(df.loc[df["split"] == "isic2018_test", "malignant"].astype(int),
                                                                      df.loc[df["split"] == "isic2018_test", "p_detected"]))
    assert out["image_auc.one_step_c2.max"]["value"] is None and "not trained" in out["image_auc.one_step_c2.max"]["status"]
    assert out["detection_map50"]["value"] is None  # no detection sets given
    json.dumps(T.jsonable(out), allow_nan=False)
    no_det = T.ReportContext(status={"classifier": "ok", "detector": "not available: detector not trained"})
    out2 = T.headline(sections, df, no_det, {})
    assert out2["lesion_auc"]["status"].startswith("not available: detector")
    assert out2["image_auc.two_stage.mean"]["status"].startswith("not available: detector")
    assert out2["lesion_auc_gt_boxes"]["value"] is not None


def test_no_lesion_counts_and_fitzpatrick_note_is_honest():
    df = _images(40)
    counts = T.no_lesion_counts(df)
    assert counts["isic2018_test"]["n_no_lesion"] == 1 and counts["isic2018_test"]["n_malignant_with_no_lesion"] == 0
    assert "near zero" in T.fitzpatrick_note(0.03, 400) and "does not recover" in T.fitzpatrick_note(0.03, 400)
    assert "expected direction" in T.fitzpatrick_note(-0.7, 400)
    assert "undefined" in T.fitzpatrick_note(None, 2)


def test_jsonable_cleans_nan_numpy_and_na():
    obj = {"a": np.float32(1.5), "b": float("nan"), "c": [np.int64(2), pd.NA, (1, np.inf)], "d": np.bool_(True)}
    assert T.jsonable(obj) == {"a": 1.5, "b": None, "c": [2, None, [1, None]], "d": True}


# ---------------------------------------------------------------------------------------------
# embedding
# ---------------------------------------------------------------------------------------------

def test_embedding_keeps_separated_clusters_apart():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, (30, 64))
    b = rng.normal(6, 1, (30, 64))
    coords, info = embed_2d(np.vstack([a, b]), seed=0)
    assert coords.shape == (60, 2) and info["method"] in ("pca+tsne", "pca+umap")
    # nearest neighbour in the map belongs to the same cluster
    d = np.linalg.norm(coords[:, None] - coords[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    labels = np.r_[np.zeros(30), np.ones(30)]
    assert (labels[d.argmin(axis=1)] == labels).mean() > 0.95
    with pytest.raises(ValueError, match="NaN"):
        embed_2d(np.full((4, 3), np.nan))


def test_embedding_table_drops_rows_without_features():
    les = _images(12)
    feats = np.random.default_rng(1).normal(size=(12, 8)).astype(np.float32)
    feats[2] = np.nan
    table, info = embedding_table(les, feats, seed=0)
    assert len(table) == 11 and {"x", "y", "malignant", "subtype"} <= set(table.columns)
    js = embedding_json(table)
    assert len(js["x"]) == len(js["malignant"]) == 11


# ---------------------------------------------------------------------------------------------
# run.py without a network: sampling, cache, table building
# ---------------------------------------------------------------------------------------------

def test_sample_is_seeded_and_class_balanced():
    rows = pd.DataFrame({"malignant": pd.array([1] * 10 + [0] * 90, dtype="Int8")})
    a, b = _sample(rows, 20, seed=3), _sample(rows, 20, seed=3)
    assert a.index.tolist() == b.index.tolist() and len(a) == 20
    assert int(a["malignant"].sum()) == 10
    assert len(_sample(rows, None, 0)) == 100


def test_cache_roundtrip_and_invalidated_by_a_changed_file(tmp_path):
    img = tmp_path / "a.jpg"
    img.write_bytes(b"one")
    cache = PredictionCache(tmp_path / "cache")
    key = PredictionCache.stamp(str(img))
    cache.put("det", "sha-1", key, {"v": 1})
    cache.flush()
    again = PredictionCache(tmp_path / "cache")
    assert again.get("det", "sha-1", key) == {"v": 1}
    assert again.get("det", "sha-2", key) is None  # another model
    img.write_bytes(b"changed content")
    assert PredictionCache.stamp(str(img)) != key


def test_scene_index_adapter_reads_relative_paths_box_labels_and_caps(tmp_path):
    from lesiontriage.evaluate.run import scene_items

    (tmp_path / "scenes" / "test" / "img").mkdir(parents=True)
    rows = []
    for i in range(5):
        rows.append({"path": f"img/scene_{i}.jpg", "scene_id": f"scene_{i}",
                     "boxes": [[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0], [40.0, 40.0, 45.0, 45.0]],
                     "box_malignant": [i % 2, 0, None], "box_diagnosis": ["MEL" if i % 2 else "NV", "NV", None],
                     "box_kind": ["pasted", "pasted", "background_mole"], "synthetic": True})
    index = tmp_path / "scenes" / "test" / "scenes.parquet"
    pd.DataFrame(rows).to_parquet(index)
    items, why = scene_items(EvalSettings(scenes_index=index, scenes_max=3))
    assert why == "" and len(items) == 3
    it = items[0]
    assert it.synthetic and it.split == "scenes_test" and not it.single_lesion and it.detect_eval
    assert Path(it.abs_path) == (tmp_path / "scenes" / "test" / it.path).resolve()
    assert it.box_malignant[2] is None and it.box_diagnosis[2] is None  # background mole: label unknown
    assert it.malignant == int(any(m == 1 for m in it.box_malignant if m is not None))
    missing, why = scene_items(EvalSettings(scenes_index=tmp_path / "nope.parquet"))
    assert missing == [] and "not built" in why


def test_model_info_reports_missing_models(tmp_path):
    info = model_info(tmp_path)
    assert not info.ok("classifier") and "not trained" in info.status["classifier"]
    (tmp_path / "classifier.safetensors").write_bytes(b"x")
    (tmp_path / "metadata.json").write_text(json.dumps({"models": {"classifier": {"file": "classifier.safetensors",
                                                                                  "sha256": "abc"}}}))
    info = model_info(tmp_path)
    assert info.ok("classifier") and info.sha256["classifier"] == "abc"
    assert not info.ok("detector") and "detector not trained" in info.status["detector"]


def test_build_tables_scene_matching_and_no_lesion_score():
    info = ModelInfo({"models": {"classifier": {"temperature": 2.0}}},
                     {"classifier": "c", "detector": "d"}, {"classifier": "ok", "detector": "ok"})
    logit = lambda p: float(np.log(p / (1 - p)) * 2.0)  # noqa: E731 - raw logit for T = 2
    scene = EvalItem("scenes_test", "s.jpg", "/x/s.jpg", "s", "synthetic_scenes", "synthetic_widefield", None, 1,
                     gt_boxes=[[0, 0, 10, 10], [100, 100, 110, 110]], box_malignant=[1, 0], box_diagnosis=["MEL", "NV"],
                     single_lesion=False, synthetic=True, detect_eval=True)
    det = {"boxes": np.array([[1, 1, 9, 9], [300, 300, 310, 310], [0, 0, 1, 1]], np.float32),
           "scores": np.array([0.9, 0.8, 0.1], np.float32)}
    rec = ImageRecord(scene, (400, 400), {
        "det": det,
        "cls_det": {"index": np.array([0, 1]), "logit": np.array([logit(0.7), logit(0.2)]), "sub": np.full((2, 8), 0.125)},
        "cls_gt": {"logit": np.array([logit(0.6), logit(0.1)]), "sub": np.full((2, 8), 0.125), "feat": np.ones((2, 4), np.float16)},
    })
    photo = EvalItem("isic2018_test", "i.jpg", "/x/i.jpg", "i", "isic2018_task3_test", "dermoscopy", "MEL", 1)
    rec2 = ImageRecord(photo, (224, 224), {
        "det": {"boxes": np.zeros((1, 4), np.float32), "scores": np.array([0.2], np.float32)},
        "cls_det": {"index": np.zeros(0, int), "logit": np.zeros(0), "sub": np.zeros((0, 8))},
        "cls_gt": {"logit": np.array([logit(0.9)]), "sub": np.full((1, 8), 0.125), "feat": np.ones((1, 4), np.float16)},
    })
    tabs = build_tables([rec, rec2], info, "mean", kept_threshold=0.5, max_lesions=30)
    les, img = tabs.lesions, tabs.images
    s = les[les["split"] == "scenes_test"].set_index("lesion_index")
    assert s.loc[0, "p_gt"] == pytest.approx(0.6) and s.loc[0, "p_detected"] == pytest.approx(0.7) and s.loc[0, "detected"]
    assert s.loc[1, "p_detected"] == 0.0 and not s.loc[1, "detected"]  # missed lesion scores 0
    si = img[img["split"] == "scenes_test"].iloc[0]
    assert si["score_two_stage_max"] == pytest.approx(0.7)
    assert si["score_two_stage_mean"] == pytest.approx(0.45)
    assert si["score_two_stage_noisy_or"] == pytest.approx(1 - 0.3 * 0.8)
    assert si["n_detected"] == 2
    pi = img[img["split"] == "isic2018_test"].iloc[0]
    assert pi["no_lesion_detected"] and pi["score_two_stage_mean"] == 0.0
    assert les[les["split"] == "isic2018_test"].iloc[0]["p_detected"] == 0.0
    assert tabs.features.shape == (3, 4) and len(tabs.detections) == 2


# ---------------------------------------------------------------------------------------------
# orchestration with a network
# ---------------------------------------------------------------------------------------------

def _photo(path: Path, seed: int, size=(160, 120), blob=True) -> None:
    rng = np.random.default_rng(seed)
    arr = np.empty((size[1], size[0], 3), np.uint8)
    arr[:] = (200 + rng.integers(-10, 10), 160 + rng.integers(-10, 10), 140)
    arr = np.clip(arr.astype(int) + rng.integers(-8, 8, arr.shape), 0, 255).astype(np.uint8)
    if blob:
        yy, xx = np.mgrid[: size[1], : size[0]]
        cx, cy = size[0] // 2 + rng.integers(-10, 10), size[1] // 2 + rng.integers(-10, 10)
        arr[(xx - cx) ** 2 + (yy - cy) ** 2 < (20 + seed) ** 2] = (90 - 5 * seed, 60, 50)
    Image.fromarray(arr).save(path, quality=92)


def _items(root: Path) -> list[EvalItem]:
    items = []
    for i in range(4):
        p = root / f"photo{i}.jpg"
        _photo(p, i)
        mal = i % 2
        items.append(EvalItem("pad_ufes20_test", p.name, str(p), f"photo{i}", "pad_ufes20_subset", "smartphone",
                              "MEL" if mal else "NV", mal, gt_boxes=[[50.0, 30.0, 110.0, 90.0]], box_malignant=[mal],
                              box_diagnosis=["MEL" if mal else "NV"], detect_eval=True, biopsied=bool(i % 2),
                              fitzpatrick=2 + i % 2))
    for i in range(2):
        p = root / f"isic{i}.jpg"
        _photo(p, 10 + i, size=(96, 96))
        items.append(EvalItem("isic2018_test", p.name, str(p), f"isic{i}", "isic2018_task3_test", "dermoscopy",
                              "BCC" if i else "NV", i))
    bad = root / "broken.jpg"
    bad.write_bytes(b"not an image")
    items.append(EvalItem("isic2018_test", bad.name, str(bad), "broken", "isic2018_task3_test", "dermoscopy", "NV", 0))
    return items


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> Path:
    """A random-weight classifier (no detector, no whole-image model): exercises every path that
    needs a network in ~1 s per image on 2 cores."""
    torch = pytest.importorskip("torch")
    from lesiontriage.networks.classifier import ClassifierConfig, LesionClassifier
    from lesiontriage.weights import save_weights, write_metadata

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("models")
    cfg = ClassifierConfig(input_size=96)
    sha = save_weights(LesionClassifier(cfg, pretrained=False).state_dict(), out / "classifier.safetensors")
    write_metadata(out, {"models": {"classifier": {"file": "classifier.safetensors", "sha256": sha, "config": cfg.to_dict(),
                                                   "temperature": 1.7}},
                         "pipeline": {"torch_threads": 1}})
    return out


def test_evaluate_with_tiny_classifier_reproduces_pipeline_and_marks_missing_models(tiny_models, tmp_path):
    from lesiontriage.evaluate.run import evaluate
    from lesiontriage.pipeline import TriagePipeline

    items = _items(tmp_path)
    manifest = pd.DataFrame({"path": [it.path for it in items], "boxes": [it.gt_boxes for it in items]})
    settings = EvalSettings(models_dir=tiny_models, out_dir=tmp_path / "reports", cache_dir=tmp_path / "cache", n_boot=30,
                            n_boot_paired=30, n_boot_map=0, progress=False, pad_ita_all=False, command="pytest", workers=1)
    res = evaluate(settings, manifest=manifest, items=items)
    img = pd.read_parquet(res.files["images"])
    les = pd.read_parquet(res.files["lesions"])
    assert (img.loc[img["image_id"] == "broken", "status"].iloc[0]).startswith("error:")
    assert len(les) == 6  # every readable labelled photo has one ground-truth lesion

    # the evaluation's ground-truth-crop probability equals the pipeline's own classify() on that crop
    pipe = TriagePipeline.from_dir(tiny_models)
    loaded = pipe.load(items[0].abs_path)
    box = np.asarray(items[0].gt_boxes, np.float32) * loaded.scale
    p_pipe, _ = pipe.classify(pipe._crop_batch(loaded.rgb, box, pipe.classifier.config))
    assert les.loc[les["image_id"] == "photo0", "p_gt"].iloc[0] == pytest.approx(float(p_pipe[0]), abs=1e-5)

    summary = json.loads((tmp_path / "reports" / "summary.json").read_text())
    for key in HEADLINE_KEYS:
        assert set(summary[key]) >= {"value", "ci_low", "ci_high", "n", "split"}, key
    assert "not available: detector" in summary["lesion_auc"]["status"]
    assert "not available: image_classifier" in summary["image_auc.direct.whole"]["status"]
    det = json.loads((tmp_path / "reports" / "detection.json").read_text())
    assert det["one_class"]["status"].startswith("not available: detector")
    assert "detector_c2 not trained" in det["c2"]["status"]
    prov = summary["provenance"]
    assert prov["command"] == "pytest" and prov["model_sha256"]["classifier"] and prov["seed"] == 0
    assert prov["manifest_hash"]
    ll = json.loads((tmp_path / "reports" / "lesion_level.json").read_text())
    gt_rows = [r for r in ll["metrics"] if r["score"] == "gt_box" and r["group"] == "split=pad_ufes20_test"]
    assert gt_rows and gt_rows[0]["n"] == 4
    # second run: everything from the cache, same numbers
    res2 = evaluate(settings, manifest=manifest, items=items)
    assert res2.n_computed == 1  # only the unreadable file is retried
    les2 = pd.read_parquet(res2.files["lesions"])
    assert np.allclose(les2["p_gt"], les["p_gt"])


def test_worker_processes_give_the_same_predictions(tiny_models, tmp_path):
    from lesiontriage.evaluate.run import evaluate

    items = _items(tmp_path)
    manifest = pd.DataFrame({"path": [it.path for it in items], "boxes": [it.gt_boxes for it in items]})
    out = {}
    for w in (1, 2):
        s = EvalSettings(models_dir=tiny_models, out_dir=tmp_path / f"r{w}", cache_dir=None, n_boot=0, n_boot_paired=0,
                         n_boot_map=0, progress=False, pad_ita_all=False, embedding=False, workers=w)
        out[w] = evaluate(s, manifest=manifest, items=items).tables.images.set_index("image_id")
    cols = ["p_gt", "ita"]
    assert np.allclose(out[1][cols].astype(float), out[2].loc[out[1].index, cols].astype(float), atol=1e-4, equal_nan=True)
    assert out[2].loc["broken", "status"].startswith("error:")


@pytest.mark.models
def test_evaluate_with_shipped_models_matches_predict(tmp_path):
    from lesiontriage.evaluate.run import evaluate, model_info
    from lesiontriage.pipeline import TriagePipeline

    info = model_info(MODELS_DIR)
    if not (info.ok("classifier") and info.ok("detector")):
        pytest.skip("shipped classifier + detector not in models/ yet")
    every = _items(tmp_path)
    items = every[:3] + every[4:5]  # three photos with a GT box (own full-frame stage), one without (GT-crop stage)
    manifest = pd.DataFrame({"path": [it.path for it in items], "boxes": [it.gt_boxes for it in items]})
    settings = EvalSettings(models_dir=MODELS_DIR, out_dir=tmp_path / "reports", cache_dir=None, n_boot=20,
                            n_boot_paired=20, n_boot_map=0, progress=False, pad_ita_all=False, embedding=False, workers=1)
    res = evaluate(settings, manifest=manifest, items=items)
    img = pd.read_parquet(res.files["images"]).set_index("image_id")
    pipe = TriagePipeline.from_dir(MODELS_DIR)
    for it in items:
        for agg in T.AGGREGATIONS:
            res_agg = pipe.predict(it.abs_path, agg)
            assert img.loc[it.image_id, f"score_two_stage_{agg}"] == pytest.approx(res_agg.lesion_score, abs=1e-5), (it.image_id, agg)
            if info.ok("image_classifier"):  # the product's score, close-up blend included
                assert img.loc[it.image_id, f"score_hybrid_{agg}"] == pytest.approx(res_agg.image_score, abs=1e-5), (it.image_id, agg)
                assert bool(img.loc[it.image_id, "hybrid_blended"]) == res_agg.blended
        if res_agg.full_frame_score is not None:
            assert img.loc[it.image_id, "score_direct_frame"] == pytest.approx(res_agg.full_frame_score, abs=1e-5)
        if info.ok("image_classifier"):
            whole = pipe.predict(it.abs_path, whole_image=True).image_score
            assert img.loc[it.image_id, "score_direct_whole"] == pytest.approx(whole, abs=1e-5)
    prov = json.loads((tmp_path / "reports" / "summary.json").read_text())["provenance"]
    assert prov["model_sha256"]["detector"]
    # the settings that made the numbers besides the weights (box rule, merging, blend) are stated
    assert prov["pipeline"]["merge_score"] == pipe.settings.merge_score
    assert prov["pipeline"]["whole_image_weight"] == pipe.settings.whole_image_weight


# ---------------------------------------------------------------------------------------------
# CPU budget: C=2 sample, full-run projection, fast model copies
# ---------------------------------------------------------------------------------------------

def _labelled_items(n_pos: int, n_neg: int, split: str = "isic2018_test") -> list[EvalItem]:
    return [EvalItem(split, f"{split}{i}.jpg", f"/x/{split}{i}.jpg", f"{split}{i}", "src", "dermoscopy",
                     "MEL" if i < n_pos else "NV", int(i < n_pos)) for i in range(n_pos + n_neg)]


def test_c2_sample_is_capped_per_split_seeded_and_keeps_the_malignant_share():
    from lesiontriage.evaluate.run import mark_c2_sample

    items = _labelled_items(40, 160) + _labelled_items(5, 15, "pad_ufes20_test")
    counts = mark_c2_sample(items, 50, seed=0)
    assert counts == {"isic2018_test": {"n_images": 200, "n_c2": 50}, "pad_ufes20_test": {"n_images": 20, "n_c2": 20}}
    isic = [it for it in items if it.split == "isic2018_test"]
    chosen = [it for it in isic if it.c2]
    assert len(chosen) == 50 and sum(it.malignant for it in chosen) == 10  # 20% malignant, as in the split
    assert all(it.c2 for it in items if it.split == "pad_ufes20_test")  # under the cap: complete
    again = _labelled_items(40, 160)
    mark_c2_sample(again, 50, seed=0)
    assert [it.c2 for it in again] == [it.c2 for it in isic]  # seeded
    mark_c2_sample(again, 50, seed=1)
    assert [it.c2 for it in again] != [it.c2 for it in isic]
    mark_c2_sample(again, None, seed=0)
    assert all(it.c2 for it in again)  # no cap: every image


def test_stage_tags_and_counts_skip_c2_outside_the_sample():
    from lesiontriage.evaluate.run import stage_counts, stage_tags

    info = ModelInfo({}, {k: k for k in ("classifier", "detector", "image_classifier", "detector_c2")},
                     {k: "ok" for k in ("classifier", "detector", "image_classifier", "detector_c2")})
    a, b = _labelled_items(1, 1)
    b.c2 = False
    eng = {"thr": 0.5, "max": 30}
    assert "c2" in stage_tags(info, eng, a) and "c2" not in stage_tags(info, eng, b)
    assert set(stage_tags(info, eng, b)) == {"ita", "det", "cls_det", "cls_gt", "whole"}
    counts = stage_counts([a, b], info)["isic2018_test"]
    assert counts == {"decode": 2, "ita": 2, "detect": 2, "classify_detected": 2, "classify_gt": 2, "whole_image": 2,
                      "detect_c2": 1}


def test_lobe_merging_reuses_cached_detections_but_not_their_classification():
    from lesiontriage.evaluate.run import merged_detections, stage_tags

    info = ModelInfo({}, {k: k for k in ("classifier", "detector")}, {k: "ok" for k in ("classifier", "detector")})
    item = _labelled_items(1, 0)[0]
    off = stage_tags(info, {"thr": 0.5, "max": 30, "merge": (0.0, 0.0)}, item)
    on = stage_tags(info, {"thr": 0.5, "max": 30, "merge": (0.7, 0.0, 0.0)}, item)
    assert on["det"] == off["det"]  # the cache holds the detector's raw output
    assert on["cls_det"] != off["cls_det"]  # the classified crops are the merged boxes
    wide = stage_tags(info, {"thr": 0.5, "max": 30, "merge": (0.7, 0.0, 0.0), "wide": [0.3, 8]}, item)
    assert wide["det"] == on["det"] and wide["cls_det"] != on["cls_det"]  # a lower cut on many-lesion photos keeps more
    det = {"boxes": np.array([[0, 0, 60, 100], [40, 0, 100, 100], [200, 0, 210, 10]], np.float32),
           "scores": np.array([0.9, 0.8, 0.95], np.float32)}
    merged = merged_detections(det, (0.7, 0.0, 0.0), (300, 200))
    np.testing.assert_allclose(merged["boxes"], [[200, 0, 210, 10], [0, 0, 100, 100]])
    np.testing.assert_allclose(merged["scores"], [0.95, 0.9])
    assert merged_detections(det, (0.0, 0.0, 0.0), (300, 200)) is det
    # a union under the area floor (0.5 of the photo here) stays two boxes
    assert len(merged_detections(det, (0.7, 0.0, 0.5), (300, 200))["boxes"]) == 3


def test_projection_multiplies_per_stage_cpu_by_full_run_stage_counts():
    from lesiontriage.evaluate.run import POOL_EFFICIENCY, projected_full_seconds

    def rec(split: str, cpu: dict[str, float], cached: bool = False) -> ImageRecord:
        it = _labelled_items(1, 0, split)[0]
        return ImageRecord(it, (10, 10), seconds={k: 2 * v for k, v in cpu.items()}, cpu_stages=cpu,
                           cpu_seconds=sum(cpu.values()), cached=cached)

    records = [rec("isic2018_test", {"decode": 0.1, "detect": 1.0, "detect_c2": 1.0}),
               rec("isic2018_test", {"decode": 0.1, "detect": 3.0}),  # outside the C=2 sample
               rec("isic2018_test", {"decode": 50.0, "detect": 50.0}, cached=True),  # from the cache: not timed
               rec("pad_ufes20_test", {"decode": 0.2, "detect": 4.0})]
    counts = {"isic2018_test": {"decode": 100, "detect": 100, "detect_c2": 10},
              "sd198_test": {"decode": 10, "detect": 10}}  # not in the run: pooled stage means
    p = projected_full_seconds(records, counts, workers=2, report_cpu=8.0, startup_cpu=5.0)
    isic = 100 * 0.1 + 100 * 2.0 + 10 * 1.0
    sd = 10 * (0.4 / 3) + 10 * (8.0 / 3)  # pooled over the three fresh records: decode (0.1+0.1+0.2)/3, detect (1+3+4)/3
    assert p["projected_inference_cpu_seconds"]["isic2018_test"] == pytest.approx(isic)
    assert p["projected_inference_cpu_seconds"]["sd198_test"] == pytest.approx(sd)
    assert p["projected_inference_wall_seconds"]["isic2018_test"] == pytest.approx(2 * isic)
    cores = min(2, __import__("os").cpu_count() or 1)
    wall = p["projected_full_run_wall_seconds"]
    assert wall["inference"] == pytest.approx((isic + sd) / (cores * POOL_EFFICIENCY) if cores > 1 else isic + sd)
    assert wall["reports"] == pytest.approx(8.0 * 110 / 4 / cores)  # x full / run images, over the section processes
    assert wall["total"] == pytest.approx(5.0 + wall["inference"] + wall["reports"])
    assert p["full_counts"] == {"isic2018_test": 100, "sd198_test": 10}


def test_c2_sample_is_stated_in_the_one_step_headline_only_when_sampled():
    from lesiontriage.evaluate.run import _c2_notes, _note_c2_sample

    sampling = {"n_c2": {"isic2018_test": 300, "pad_ufes20_test": 184}, "n_evaluated": {"isic2018_test": 1512,
                                                                                       "pad_ufes20_test": 184}}
    summary = {"image_auc.one_step_c2.max": {"value": 0.7, "n": 300}, "image_auc.two_stage.mean": {"value": 0.8},
               "image_auc.one_step_c2.mean": {"value": None, "status": "not available"}}
    _note_c2_sample(summary, sampling)
    assert "300 of the 1512" in summary["image_auc.one_step_c2.max"]["note"]
    assert "note" not in summary["image_auc.two_stage.mean"] and "note" not in summary["image_auc.one_step_c2.mean"]
    notes = _c2_notes(sampling)
    assert len(notes) == 1 and "isic2018_test" in notes[0] and "300 of 1512" in notes[0]


def _tiny_detector(seed: int, long_side: int = 128):
    torch = pytest.importorskip("torch")
    from lesiontriage.networks.detector import DetectorConfig, build_detector

    torch.manual_seed(seed)
    return build_detector(DetectorConfig(long_side=long_side, box_score_thresh=0.0), pretrained=False).eval()


def test_fast_detectors_match_eager_and_share_only_equal_prefixes():
    torch = pytest.importorskip("torch")
    from lesiontriage.networks.fast import ENGINE_FAST_DET, _prefix, fast_detectors

    one, c2, other = _tiny_detector(0), _tiny_detector(1), _tiny_detector(2)
    _prefix(c2.backbone).load_state_dict(_prefix(one.backbone).state_dict())  # fine-tuned with frozen early layers
    fast, info = fast_detectors({"detector": one, "detector_c2": c2, "other": other})
    assert all(v["engine"] == ENGINE_FAST_DET and v["max_rel_diff"] < 1e-3 for v in info.values())
    assert info["detector"]["shared_prefix"] and info["detector_c2"]["shared_prefix"] and not info["other"]["shared_prefix"]
    img = torch.rand(3, 90, 160)  # non-square, another size than the traced probe
    cache = fast["detector"].backbone.prefix
    hits = cache.hits
    with torch.inference_mode():
        for key, eager in (("detector", one), ("detector_c2", c2), ("other", other)):
            ref, got = eager([img])[0], fast[key]([img])[0]
            assert len(ref["scores"]) == len(got["scores"]) > 0, key
            assert torch.allclose(ref["scores"].sort().values, got["scores"].sort().values, atol=1e-4), key
            assert torch.allclose(ref["boxes"].sort(0).values, got["boxes"].sort(0).values, atol=1e-2), key
    assert cache.hits == hits + 1  # the C=2 pass reused the one-class prefix of the same image
    with torch.inference_mode():
        fast["detector_c2"]([torch.rand(3, 90, 160)])  # another image: computed, not reused
    assert cache.hits == hits + 1


def test_fast_detectors_fall_back_to_eager_when_a_copy_cannot_be_built():
    torch = pytest.importorskip("torch")
    from lesiontriage.networks.fast import ENGINE_EAGER, fast_detectors

    det = _tiny_detector(0)
    det.backbone.body = torch.nn.Identity()  # not a timm EfficientNet: no prefix to freeze
    fast, info = fast_detectors({"detector": det})
    assert fast["detector"] is det and info["detector"]["engine"] == ENGINE_EAGER and info["detector"]["reason"]


def test_fast_classifier_matches_the_eager_outputs():
    torch = pytest.importorskip("torch")
    from lesiontriage.networks.fast import ENGINE_FAST_CLS, fast_classifier
    from lesiontriage.networks.classifier import ClassifierConfig, LesionClassifier

    torch.manual_seed(0)
    model = LesionClassifier(ClassifierConfig(input_size=64), pretrained=False).eval()
    fast, info = fast_classifier(model)
    assert info["engine"] == ENGINE_FAST_CLS and fast.config is model.config
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.inference_mode():
        for ref, got in zip(model.outputs(x), fast.outputs(x)):
            assert torch.allclose(ref.float(), got.float(), atol=1e-4, rtol=1e-4)


def test_report_sections_in_worker_processes_equal_the_inline_ones():
    from lesiontriage.evaluate.run import report_sections

    df = _images(240)
    ctx = T.ReportContext(status={"classifier": "ok", "detector": "ok", "image_classifier": "ok"}, n_boot=40,
                          n_boot_paired=40, seed=3)
    jobs = {"image_level": (T.image_level_section, (df, ctx)), "lesion_level": (T.lesion_level_section, (df, df, ctx)),
            "calibration": (T.calibration_report, (df, df, ctx))}
    inline, cpu1, _ = report_sections(jobs, workers=1)
    parallel, cpu2, wall2 = report_sections(jobs, workers=2, min_rows=200)
    assert set(parallel) == set(jobs) and set(cpu2) == set(wall2) == set(jobs)
    dump = lambda x: json.dumps(T.jsonable(x), sort_keys=True, allow_nan=False)  # noqa: E731
    assert all(dump(parallel[k]) == dump(inline[k]) for k in jobs)  # seeded per section: same numbers anywhere
    assert all(v > 0 for v in cpu1.values())


def test_flip_views_average_like_the_pipeline():
    torch = pytest.importorskip("torch")
    from lesiontriage.evaluate.run import average_views, torch_cat_flips
    from lesiontriage.networks.classifier import ClassifierConfig, LesionClassifier
    from lesiontriage.pipeline import TriagePipeline

    torch.manual_seed(0)
    model = LesionClassifier(ClassifierConfig(input_size=64), pretrained=False).eval()
    batch = torch.rand(2, 3, 64, 64) * 2 - 1
    want_logit, want_sub = TriagePipeline.heads(model, batch, tta=True)  # mean logits, then softmax
    logit, sub, _ = model.outputs(torch_cat_flips(batch))
    got_logit, got_sub = average_views(logit.numpy(), sub.numpy(), 3)
    assert np.allclose(got_logit, want_logit.numpy(), atol=1e-5)
    assert np.allclose(got_sub, torch.softmax(want_sub.float(), -1).numpy(), atol=1e-5)


def test_a_chosen_closeup_crop_margin_keys_the_classified_stages_but_not_the_detections():
    from lesiontriage.evaluate.run import engine_settings, stage_tags
    from lesiontriage.pipeline import PipelineSettings

    info = ModelInfo({}, {k: k for k in ("classifier", "detector")}, {k: "ok" for k in ("classifier", "detector")})
    item = _labelled_items(1, 0)[0]
    trained = stage_tags(info, engine_settings(PipelineSettings()), item)
    wider = stage_tags(info, engine_settings(PipelineSettings(closeup_crop_margin=0.75)), item)
    other_gate = stage_tags(info, engine_settings(PipelineSettings(closeup_crop_margin=0.75, closeup_min_box_fraction=0.3)), item)
    assert wider["det"] == trained["det"]
    assert wider["cls_det"] != trained["cls_det"] and wider["cls_gt"] != trained["cls_gt"]
    assert other_gate["cls_det"] != wider["cls_det"]  # the gate decides which photos get the wider context
    assert engine_settings(PipelineSettings()) == engine_settings(PipelineSettings(closeup_crop_margin=None))
