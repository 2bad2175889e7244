"""TriagePipeline + CLI on the shipped models (skipped until models/ holds trained weights)."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lesiontriage.errors import ImageError, ModelError
from lesiontriage.hybrid import largest_box_fraction
from lesiontriage.paths import MODELS_DIR

pytestmark = pytest.mark.skipif(not (MODELS_DIR / "metadata.json").exists() or not (MODELS_DIR / "classifier.safetensors").exists(),
                                reason="no trained models in models/ yet")


def skin_photo(seed: int, size=(900, 700), n_spots: int = 3) -> np.ndarray:
    """A generated skin-like photo with dark mole-like spots (no data set needed)."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = np.array([200, 160, 140], dtype=np.float32) + rng.normal(0, 8, 3)
    img = np.clip(base + rng.normal(0, 4, (h, w, 3)), 0, 255).astype(np.uint8)
    for _ in range(n_spots):
        cx, cy = int(rng.uniform(0.15, 0.85) * w), int(rng.uniform(0.15, 0.85) * h)
        r = int(rng.uniform(0.03, 0.08) * w)
        colour = tuple(int(c) for c in rng.uniform([40, 25, 20], [110, 70, 55]))
        cv2.ellipse(img, (cx, cy), (r, int(r * rng.uniform(0.7, 1.0))), float(rng.uniform(0, 180)), 0, 360, colour, -1)
    return cv2.GaussianBlur(img, (5, 5), 1.2)


@pytest.fixture(scope="module")
def pipe():
    from lesiontriage import TriagePipeline

    return TriagePipeline.from_dir()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("photos")
    paths = []
    for i in range(4):
        p = d / f"photo_{i}.jpg"
        Image.fromarray(skin_photo(i)).save(p, quality=92)
        paths.append(p)
    return paths


def test_predict_path_bytes_and_pil_agree(pipe, photos):
    p = photos[0]
    a = pipe.predict(p)
    b = pipe.predict(p.read_bytes(), name=p.name)
    c = pipe.predict(Image.open(p))
    assert a.n_lesions == b.n_lesions == c.n_lesions
    assert a.image_score == pytest.approx(b.image_score, abs=1e-5)
    assert a.image_score == pytest.approx(c.image_score, abs=1e-5)


def test_result_is_well_formed(pipe, photos):
    res = pipe.predict(photos[1])
    assert res.width == 900 and res.height == 700
    assert 0.0 <= res.image_score <= 1.0
    assert res.tier.name in {"routine", "refer", "urgent"} and res.tier.reason
    for les in res.lesions:
        x1, y1, x2, y2 = les.box
        assert 0 <= x1 < x2 <= 900 + 1 and 0 <= y1 < y2 <= 700 + 1
        assert 0 <= les.p_malignant <= 1 and 0 <= les.detector_score <= 1
        assert sum(les.subtypes.values()) == pytest.approx(1.0, abs=1e-4)
    assert {"decode", "detect", "classify"} <= set(res.timings_ms)
    d = json.loads(res.to_json())
    assert d["n_lesions"] == res.n_lesions and "research" in d["intended_use"].lower()


def test_reaggregate_orders_scores_without_rerunning(pipe, photos):
    res = pipe.predict(photos[2], "mean")
    if res.n_lesions < 2:
        pytest.skip("need two lesions to compare aggregations")
    mx = pipe.reaggregate(res, "max")
    nor = pipe.reaggregate(res, "noisy_or")
    assert mx.lesions is res.lesions
    assert res.image_score <= mx.image_score + 1e-9 <= nor.image_score + 2e-9
    # inside the soft gate's ramp with the main-lesion rule on, every aggregate's lesion term is the main lesion's p
    main = mx.lesions[mx.main_lesion].p_malignant if mx.main_lesion is not None else None
    assert mx.lesion_score == pytest.approx(main if main is not None else max(l.p_malignant for l in res.lesions))
    assert (mx.main_lesion is not None) == pipe.hybrid_rule.uses_main_lesion(
        largest_box_fraction(np.array([l.box for l in res.lesions]), res.width, res.height))
    # a blended photo (close-up, soft gate) keeps its views and weights; the score is the same weighted mean
    expected = pipe.result_rule(mx).blend(mx.lesion_score, mx.whole_image_score, mx.full_frame_score) if mx.blended \
        else mx.lesion_score
    assert mx.image_score == pytest.approx(expected)


def test_unknown_aggregation_is_refused(pipe, photos):
    with pytest.raises(ValueError, match="noisy_or"):
        pipe.predict(photos[0], "median")


def test_predict_batch_keeps_going_after_a_bad_file(pipe, photos, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image at all")
    out = pipe.predict_batch([photos[0], bad, photos[1]])
    assert len(out) == 3
    assert isinstance(out[1], ImageError) and "broken.jpg" in str(out[1])
    assert not isinstance(out[0], ImageError) and not isinstance(out[2], ImageError)


def test_parallel_predictions_equal_serial(pipe, photos):
    serial = [pipe.predict(p).image_score for p in photos * 2]
    with ThreadPoolExecutor(8) as pool:
        parallel = list(pool.map(lambda p: pipe.predict(p).image_score, photos * 2))
    assert parallel == pytest.approx(serial, abs=1e-6)


def test_gradcam_overlay_has_crop_shape(pipe, photos):
    res = pipe.predict(photos[0])
    if not res.lesions:
        pytest.skip("no lesion detected")
    cam = pipe.gradcam(photos[0], 0, result=res)
    size = pipe.classifier.config.input_size
    assert cam.shape == (size, size, 3) and cam.dtype == np.uint8


def test_tampered_weights_are_refused(tmp_path):
    from lesiontriage import TriagePipeline

    copy = tmp_path / "models"
    shutil.copytree(MODELS_DIR, copy, ignore=shutil.ignore_patterns("reports"))
    target = copy / "classifier.safetensors"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    expected = json.loads((copy / "metadata.json").read_text())["models"]["classifier"]["sha256"]
    with pytest.raises(ModelError) as err:
        TriagePipeline.from_dir(copy)
    assert "classifier.safetensors" in str(err.value) and expected[:12] in str(err.value)


def test_cli_predict_folder_with_a_bad_file(photos, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for p in photos[:2]:
        shutil.copy(p, folder / p.name)
    (folder / "zero.jpg").write_bytes(b"")
    out = tmp_path / "results.csv"
    proc = subprocess.run([sys.executable, "-m", "lesiontriage.cli", "predict", str(folder), "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    err_lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(err_lines) == 1 and "zero.jpg" in err_lines[0]
    df = pd.read_csv(out)
    assert list(df.columns) == ["image", "status", "image_score", "tier", "n_lesions", "lesions"]
    assert len(df) == 3
    bad = df[df["image"].str.endswith("zero.jpg")].iloc[0]
    assert bad["status"].startswith("error:")
    good = df[df["status"] == "ok"]
    assert len(good) == 2 and all(isinstance(json.loads(x), list) for x in good["lesions"])


def test_ensemble_option_averages_two_classifiers(tmp_path, photos, pipe):
    """classifier_2 = a copy of classifier: the ensemble must reproduce the single model exactly;
    asking for an ensemble without classifier_2 is a clear ModelError."""
    from lesiontriage import TriagePipeline

    copy = tmp_path / "models"
    shutil.copytree(MODELS_DIR, copy, ignore=shutil.ignore_patterns("reports"))
    meta = json.loads((copy / "metadata.json").read_text())
    if "classifier_2" not in meta["models"]:
        with pytest.raises(ModelError, match="classifier_2"):
            TriagePipeline.from_dir(copy, ensemble=True)
    meta["models"]["classifier_2"] = dict(meta["models"]["classifier"])
    (copy / "metadata.json").write_text(json.dumps(meta))
    both = TriagePipeline.from_dir(copy, ensemble=True)
    single = TriagePipeline.from_dir(copy, ensemble=False)
    assert both.second_classifier is not None and single.second_classifier is None
    a, b = both.predict(photos[1]), single.predict(photos[1])
    assert [l.p_malignant for l in a.lesions] == pytest.approx([l.p_malignant for l in b.lesions], abs=1e-5)


def test_clinical_answers_change_the_result_through_the_shipped_combined_model(pipe, photos):
    from lesiontriage.context_models import CombinedClinicalModel

    model = CombinedClinicalModel.from_dir(MODELS_DIR)
    if model is None:
        pytest.skip("no models/clinical_combined.safetensors (run `lesiontriage research clinical`)")
    base = pipe.predict(photos[0])
    if not base.lesions:
        pytest.skip("no lesion found on the generated photo")
    old = model.apply(base, {"age": 85, "grew": "yes", "bleed": "yes", "changed": "yes"}, pipe)
    young = model.apply(base, {"age": 20, "grew": "no", "bleed": "no", "changed": "no"}, pipe)
    assert old.image_score > young.image_score
    assert old.notes and "clinical covariates used" in old.notes[0] and not base.notes
    assert model.apply(base, {}, pipe) is base
    # a close-up's blend with the whole-image classifier does not survive the clinical model (its score is
    # the aggregate of the combined lesion probabilities), not even after switching the aggregation
    import dataclasses

    blended = dataclasses.replace(base, whole_image_score=0.9, whole_image_weight=0.5)
    combined = model.apply(blended, {"age": 85, "grew": "yes"}, pipe)
    assert combined.whole_image_score is None
    assert pipe.reaggregate(combined, "max").image_score == pytest.approx(max(l.p_malignant for l in combined.lesions))


def test_management_suggestion_from_the_shipped_model(pipe, photos):
    from lesiontriage.context_models import ManagementModel

    model = ManagementModel.from_dir(MODELS_DIR)
    if model is None:
        pytest.skip("no models/management.safetensors (run `lesiontriage research management`)")
    alone = model.suggest(pipe, photos[0])
    pair = model.suggest(pipe, photos[0], photos[1], {"sex": "female", "region": "trunk", "elevation3": "flat"})
    for s in (alone, pair):
        assert s.suggestion in s.probabilities and sum(s.probabilities.values()) == pytest.approx(1.0)
    assert (alone.variant, pair.variant) == ("dermoscopy_only", "pair")
    with pytest.raises(ImageError):
        model.suggest(pipe, b"not an image")


def test_box_selection_and_flip_tta_follow_the_settings(pipe, photos):
    """The shipped settings (chosen by `train box-rule`) are what predict() applies: nested parts of
    a lesion are dropped, and TTA averages the flipped crops' logits."""
    import dataclasses

    import torch

    from lesiontriage.pipeline import TriagePipeline

    class FixedDetector(torch.nn.Module):
        def forward(self, images):
            h, w = images[0].shape[-2:]
            boxes = torch.tensor([[0.1 * w, 0.1 * h, 0.6 * w, 0.6 * h],   # a lesion
                                  [0.2 * w, 0.2 * h, 0.3 * w, 0.3 * h],   # a part inside it
                                  [0.7 * w, 0.7 * h, 0.9 * w, 0.9 * h]])  # another lesion
            return [{"boxes": boxes, "scores": torch.tensor([0.9, 0.8, 0.7])}]

    def variant(**settings) -> TriagePipeline:
        p = TriagePipeline(FixedDetector(), pipe.det_cfg, pipe.classifier, pipe.clf_meta, pipe.metadata,
                           settings=dataclasses.replace(pipe.settings, **settings))
        return p

    off = variant(nested_containment=0.0, flip_tta=False, merge_score=0.0).predict(photos[0])
    on = variant(nested_containment=0.8, flip_tta=False, merge_score=0.0).predict(photos[0])
    assert off.n_lesions == 3 and on.n_lesions == 2
    assert [l.detector_score for l in on.lesions] == pytest.approx([0.9, 0.7])
    # lobe merging: the confident overlapping pair becomes its union (here the lesion's own box) ...
    merged = variant(nested_containment=0.0, flip_tta=False, merge_score=0.75, merge_min_area=0.1).predict(photos[0])
    assert merged.n_lesions == 2 and merged.lesions[0].box == pytest.approx(on.lesions[0].box, abs=1e-3)
    # ... unless the union covers less of the photo than the area floor
    assert variant(nested_containment=0.0, flip_tta=False, merge_score=0.75, merge_min_area=0.5).predict(photos[0]).n_lesions == 3
    tta = variant(nested_containment=0.8, flip_tta=True, merge_score=0.0).predict(photos[0])
    batch = pipe._crop_batch(pipe.load(photos[0]).rgb, np.array([on.lesions[0].box], np.float32), pipe.classifier.config)
    with torch.inference_mode():
        views = [pipe.classifier(v)[0].float() for v in (batch, batch.flip(-1), batch.flip(-2))]
    t = float(pipe.clf_meta.get("temperature", 1.0))
    expected = torch.sigmoid(torch.stack(views).mean(0) / t).item()
    assert tta.lesions[0].p_malignant == pytest.approx(expected, abs=1e-4)
    assert on.lesions[0].p_malignant == pytest.approx(torch.sigmoid(views[0] / t).item(), abs=1e-4)


def test_fast_cpu_copies_predict_what_the_eager_models_predict(pipe, photos):
    """The shipped pipeline runs frozen oneDNN copies by default (the speed target needs them); they
    must give the eager models' boxes, probabilities and sub-types, and Grad-CAM keeps gradients."""
    from lesiontriage.networks.fast import ENGINE_FAST_CLS, ENGINE_FAST_DET
    from lesiontriage.pipeline import TriagePipeline

    assert pipe.inference_engine["detector"]["engine"] == ENGINE_FAST_DET
    assert pipe.inference_engine["classifier"]["engine"] == ENGINE_FAST_CLS
    eager = TriagePipeline.from_dir(fast=False)
    assert eager.inference_engine == {} and eager.fast_detector is None
    for p in photos[:2]:
        a, b = pipe.predict(p), eager.predict(p)
        assert a.n_lesions == b.n_lesions > 0
        assert np.allclose([l.box for l in a.lesions], [l.box for l in b.lesions], atol=0.5)
        assert np.allclose([l.p_malignant for l in a.lesions], [l.p_malignant for l in b.lesions], atol=1e-4)
        assert np.allclose([list(l.subtypes.values()) for l in a.lesions],
                           [list(l.subtypes.values()) for l in b.lesions], atol=1e-4)
    whole_a, whole_b = pipe.predict(photos[0], whole_image=True), eager.predict(photos[0], whole_image=True)
    assert whole_a.image_score == pytest.approx(whole_b.image_score, abs=1e-4)


def test_close_up_score_blends_the_whole_image_classifier_and_wide_field_does_not(pipe, photos):
    """A close-up (one large box) gets (1 - w) * lesion aggregate + w * whole-image p; a photo whose
    largest box is under the gate keeps the pure two-stage score; re-aggregation keeps the blend."""
    import dataclasses

    import torch

    from lesiontriage.pipeline import TriagePipeline

    def detector_with(box_fraction_side: float):
        class FixedDetector(torch.nn.Module):
            def forward(self, images):
                h, w = images[0].shape[-2:]
                s = box_fraction_side
                boxes = torch.tensor([[0.1 * w, 0.1 * h, (0.1 + s) * w, (0.1 + s) * h]])
                return [{"boxes": boxes, "scores": torch.tensor([0.9])}]
        return FixedDetector()

    settings = dataclasses.replace(pipe.settings, whole_image_weight=0.5, closeup_min_box_fraction=0.15, full_frame_weight=0.0,
                                   closeup_ramp_from=None)  # hard gate (the soft one: test_soft_gate_and_many_lesion_photos)
    variant = lambda side: TriagePipeline(detector_with(side), pipe.det_cfg, pipe.classifier, pipe.clf_meta, pipe.metadata,
                                          pipe.image_classifier, pipe.image_clf_meta, settings=settings)
    whole = pipe.predict(photos[1], whole_image=True).image_score
    close = variant(0.6).predict(photos[1])  # box covers 36% of the image
    assert close.whole_image_score == pytest.approx(whole, abs=1e-4) and close.whole_image_weight == 0.5
    assert close.lesion_score == pytest.approx(close.lesions[0].p_malignant)
    assert close.image_score == pytest.approx(0.5 * close.lesion_score + 0.5 * whole, abs=1e-6)
    assert "whole-image" in close.tier.reason and "whole_image" in close.timings_ms
    again = pipe.reaggregate(close, "max")
    assert again.image_score == pytest.approx(0.5 * close.lesions[0].p_malignant + 0.5 * whole, abs=1e-6)
    far = variant(0.2).predict(photos[1])  # 4% of the image: a wide-field-sized lesion
    assert far.whole_image_score is None and far.image_score == pytest.approx(far.lesion_score)
    off = TriagePipeline(detector_with(0.6), pipe.det_cfg, pipe.classifier, pipe.clf_meta, pipe.metadata,
                         None, None, settings=settings).predict(photos[1])  # no whole-image model installed
    assert off.whole_image_score is None and off.image_score == pytest.approx(off.lesion_score)


def test_close_up_score_blends_the_full_frame_view_of_the_lesion_classifier(pipe, photos):
    """With both views on, a close-up's score is w_lesion * aggregate + w_whole * whole-image p + w_frame *
    the lesion classifier's p on the whole photo (flip TTA and ensemble as configured); the tier reason
    and the app's caption name every part; re-aggregation keeps it; below the gate nothing is blended."""
    import dataclasses

    import torch

    from lesiontriage.app_support import aggregation_sentence
    from lesiontriage.pipeline import TriagePipeline

    class FixedDetector(torch.nn.Module):
        def __init__(self, side: float) -> None:
            super().__init__()
            self.side = side

        def forward(self, images):
            h, w = images[0].shape[-2:]
            return [{"boxes": torch.tensor([[0.1 * w, 0.1 * h, (0.1 + self.side) * w, (0.1 + self.side) * h]]),
                     "scores": torch.tensor([0.9])}]

    settings = dataclasses.replace(pipe.settings, whole_image_weight=0.2, full_frame_weight=0.5, closeup_min_box_fraction=0.15,
                                   closeup_ramp_from=None)
    variant = lambda side: TriagePipeline(FixedDetector(side), pipe.det_cfg, pipe.classifier, pipe.clf_meta, pipe.metadata,
                                          pipe.image_classifier, pipe.image_clf_meta, settings=settings)
    close_pipe = variant(0.6)
    close = close_pipe.predict(photos[1])
    img = close_pipe.load(photos[1])
    frame = float(close_pipe.lesion_probabilities(img.rgb)[0][0])  # the whole frame as one crop
    whole = pipe.predict(photos[1], whole_image=True).image_score
    assert close.full_frame_score == pytest.approx(frame, abs=1e-5) and close.full_frame_weight == 0.5
    assert close.whole_image_score == pytest.approx(whole, abs=1e-4) and close.whole_image_weight == 0.2
    assert frame != pytest.approx(close.lesion_score, abs=1e-4)  # a different view from the lesion crop
    expected = 0.3 * close.lesion_score + 0.2 * whole + 0.5 * frame
    assert close.image_score == pytest.approx(expected, abs=1e-5)
    assert "whole photo" in close.tier.reason and "whole-image" in close.tier.reason and "full_frame" in close.timings_ms
    again = close_pipe.reaggregate(close, "max")
    assert again.image_score == pytest.approx(0.3 * max(l.p_malignant for l in close.lesions) + 0.2 * whole + 0.5 * frame, abs=1e-5)
    caption = aggregation_sentence("mean", 1, close.image_score, close.lesion_score, close.whole_image_score,
                                   close.whole_image_weight, close.full_frame_score, close.full_frame_weight)
    assert f"0.5 x lesion classifier on the whole photo {frame:.2f}" in caption and f"= {close.image_score:.2f}" in caption
    far = variant(0.2).predict(photos[1])
    assert far.full_frame_score is None and far.full_frame_weight == 0.0 and far.image_score == pytest.approx(far.lesion_score)


def test_soft_gate_and_many_lesion_photos(pipe, photos):
    """A box under the gate still gets part of the close-up blend with a soft gate (weights scaled by
    the ramp), and a photo with more than 30 lesions keeps every one (the old cap dropped moles),
    classified without flip TTA above ``flip_tta_max_crops``."""
    import dataclasses

    import torch

    from lesiontriage.pipeline import TriagePipeline

    class GridDetector(torch.nn.Module):
        def __init__(self, n: int, side: float) -> None:
            super().__init__()
            self.n, self.side = n, side

        def forward(self, images):
            h, w = images[0].shape[-2:]
            k = int(np.ceil(np.sqrt(self.n)))
            cell = 1.0 / k
            boxes = [[(i % k) * cell * w, (i // k) * cell * h, ((i % k) * cell + self.side) * w, ((i // k) * cell + self.side) * h]
                     for i in range(self.n)]
            return [{"boxes": torch.tensor(boxes, dtype=torch.float32), "scores": torch.linspace(0.95, 0.9, self.n)}]

    def variant(n: int, side: float, **kw) -> TriagePipeline:
        s = dataclasses.replace(pipe.settings, flip_tta=True, **kw)
        return TriagePipeline(GridDetector(n, side), pipe.det_cfg, pipe.classifier, pipe.clf_meta, pipe.metadata,
                              pipe.image_classifier, pipe.image_clf_meta, settings=s)

    # one box covering 0.3 x 0.3 = 9% of the frame: under the 15% gate, 7/13 of the way up a ramp from 2%
    soft = variant(1, 0.3, whole_image_weight=0.2, full_frame_weight=0.6, closeup_min_box_fraction=0.15,
                   closeup_ramp_from=0.02).predict(photos[1])
    k = (0.09 - 0.02) / 0.13
    assert soft.whole_image_weight == pytest.approx(0.2 * k, abs=1e-3) and soft.full_frame_weight == pytest.approx(0.6 * k, abs=1e-3)
    assert soft.image_score == pytest.approx((1 - 0.8 * k) * soft.lesion_score + 0.2 * k * soft.whole_image_score
                                             + 0.6 * k * soft.full_frame_score, abs=1e-3)
    hard = variant(1, 0.3, whole_image_weight=0.2, full_frame_weight=0.6, closeup_min_box_fraction=0.15,
                   closeup_ramp_from=None).predict(photos[1])
    assert not hard.blended and hard.image_score == pytest.approx(hard.lesion_score)

    many = variant(40, 0.05, flip_tta_max_crops=24)
    res = many.predict(photos[0])
    assert res.n_lesions == 40  # more than the old cap of 30
    img = many.load(photos[0])
    boxes, _ = many.detect(img.rgb)
    plain = many.classify(many._crop_batch(img.rgb, boxes, many.classifier.config), tta=False)[0]
    assert [l.p_malignant for l in res.lesions] == pytest.approx(plain.tolist(), abs=1e-5)  # no flips above 24 crops
    few = variant(4, 0.05, flip_tta_max_crops=24)
    img_boxes, _ = few.detect(img.rgb)
    batch = few._crop_batch(img.rgb, img_boxes, few.classifier.config)
    assert few.lesion_probabilities(img.rgb, img_boxes)[0] == pytest.approx(few.classify(batch, tta=True)[0], abs=1e-5)

    # a chosen close-up crop context (pipeline.closeup_crop_margin): every crop of a close-up (largest box >= the
    # gate) uses it, scores and the shown crop alike; a photo under the gate keeps the trained margin
    trained_margin = pipe.classifier.config.crop_margin
    closeup = variant(1, 0.5, closeup_crop_margin=None, closeup_min_box_fraction=0.15)
    wider = variant(1, 0.5, closeup_crop_margin=1.0, closeup_min_box_fraction=0.15)
    res_t, res_w = closeup.predict(photos[1]), wider.predict(photos[1])
    assert res_t.lesions[0].crop_margin == trained_margin and res_w.lesions[0].crop_margin == 1.0
    assert res_w.lesions[0].p_malignant != pytest.approx(res_t.lesions[0].p_malignant, abs=1e-6)
    side_t, side_w = closeup.crop(photos[1], res_t.lesions[0]).shape[0], wider.crop(photos[1], res_w.lesions[0]).shape[0]
    assert side_w == pytest.approx(side_t * 3.0 / (1 + 2 * trained_margin), rel=0.02)
    assert res_w.to_dict()["lesions"][0]["crop_margin"] == 1.0
    grid = variant(9, 0.1, closeup_crop_margin=1.0, closeup_min_box_fraction=0.15)  # 1% boxes: not a close-up
    plain_grid = variant(9, 0.1, closeup_crop_margin=None, closeup_min_box_fraction=0.15)
    res_g, res_p = grid.predict(photos[0]), plain_grid.predict(photos[0])
    assert {l.crop_margin for l in res_g.lesions} == {trained_margin}
    assert [l.p_malignant for l in res_g.lesions] == pytest.approx([l.p_malignant for l in res_p.lesions], abs=1e-6)
    assert grid.crop_margin(0.2) == 1.0 and grid.crop_margin(0.1) == trained_margin


def test_clinical_close_up_in_the_ramp_is_scored_on_its_main_lesion(pipe, photos):
    """With ``closeup_ramp_primary_lesion`` a photo inside the soft gate's ramp (largest box 2-15% of the frame)
    takes its most confident detection's p as the lesion term, whatever the aggregate; that lesion drives the
    tier and the caption says so. Off, or on a frame-filling close-up, the aggregate over every box stays."""
    import dataclasses

    import torch

    from lesiontriage.app_support import aggregation_sentence
    from lesiontriage.pipeline import TriagePipeline

    class ThreeSpots(torch.nn.Module):
        """Three disjoint boxes; the second (the largest side) is the most confident, the first is not."""

        def __init__(self, main_side: float) -> None:
            super().__init__()
            self.main_side = main_side

        def forward(self, images):
            h, w = images[0].shape[-2:]
            s = self.main_side
            boxes = [[0.02 * w, 0.02 * h, 0.10 * w, 0.10 * h], [0.30 * w, 0.30 * h, (0.30 + s) * w, (0.30 + s) * h],
                     [0.85 * w, 0.85 * h, 0.95 * w, 0.95 * h]]
            return [{"boxes": torch.tensor(boxes, dtype=torch.float32), "scores": torch.tensor([0.6, 0.8, 0.55])}]

    def variant(main_side: float, on: bool) -> TriagePipeline:
        s = dataclasses.replace(pipe.settings, whole_image_weight=0.2, full_frame_weight=0.6, closeup_min_box_fraction=0.15,
                                closeup_ramp_from=0.02, no_lesion_views=True, closeup_ramp_primary_lesion=on)
        return TriagePipeline(ThreeSpots(main_side), pipe.det_cfg, pipe.classifier, pipe.clf_meta, pipe.metadata,
                              pipe.image_classifier, pipe.image_clf_meta, settings=s)

    on = variant(0.3, True).predict(photos[1])  # main box 9% of the frame: inside the ramp
    assert on.n_lesions == 3 and on.blended
    main = max(range(3), key=lambda i: on.lesions[i].detector_score)
    assert on.lesions[main].detector_score == pytest.approx(0.8) and on.main_lesion == main
    ps = [l.p_malignant for l in on.lesions]
    assert on.lesion_score == pytest.approx(ps[main]) and on.lesion_score != pytest.approx(float(np.mean(ps)), abs=1e-6)
    k = (0.09 - 0.02) / 0.13
    assert on.image_score == pytest.approx((1 - 0.8 * k) * ps[main] + 0.2 * k * on.whole_image_score
                                           + 0.6 * k * on.full_frame_score, abs=1e-3)
    assert on.tier.driving_lesion == main and f"main lesion #{main + 1}" in on.tier.reason
    assert on.to_dict()["main_lesion"] == main
    again = variant(0.3, True).reaggregate(on, "max")  # the aggregate does not enter a main-lesion score
    assert again.lesion_score == pytest.approx(ps[main]) and again.image_score == pytest.approx(on.image_score)
    caption = aggregation_sentence("mean", 3, on.image_score, on.lesion_score, on.whole_image_score,
                                   on.whole_image_weight, on.full_frame_score, on.full_frame_weight, on.main_lesion)
    assert f"main lesion (#{main + 1}" in caption and "other 2 boxes" in caption
    off = variant(0.3, False).predict(photos[1])
    assert off.main_lesion is None and off.lesion_score == pytest.approx(float(np.mean([l.p_malignant for l in off.lesions])))
    big = variant(0.5, True).predict(photos[1])  # main box 25% of the frame: above the gate, the aggregate stays
    assert big.main_lesion is None and big.lesion_score == pytest.approx(float(np.mean([l.p_malignant for l in big.lesions])))


def test_photo_without_a_kept_lesion_is_scored_by_the_whole_photo_views(pipe, photos):
    """A detector miss must not make a close-up 'routine' by definition: with ``no_lesion_views`` the
    score is the views' renormalised mean and the tier says why; without it the score stays 0."""
    import dataclasses

    import torch

    from lesiontriage.pipeline import TriagePipeline

    class NoBoxes(torch.nn.Module):
        def forward(self, images):
            return [{"boxes": torch.zeros((0, 4)), "scores": torch.zeros(0)}]

    def variant(on: bool) -> TriagePipeline:
        s = dataclasses.replace(pipe.settings, whole_image_weight=0.1, full_frame_weight=0.7, closeup_min_box_fraction=0.15,
                                closeup_ramp_from=0.02, no_lesion_views=on)
        return TriagePipeline(NoBoxes(), pipe.det_cfg, pipe.classifier, pipe.clf_meta, pipe.metadata,
                              pipe.image_classifier, pipe.image_clf_meta, settings=s)

    on = variant(True).predict(photos[1])
    assert on.n_lesions == 0 and on.blended and on.lesion_score == 0.0
    whole = pipe.predict(photos[1], whole_image=True).image_score
    frame = float(variant(True).lesion_probabilities(variant(True).load(photos[1]).rgb)[0][0])
    assert on.image_score == pytest.approx(0.125 * whole + 0.875 * frame, abs=1e-4)
    assert "no lesion box found" in on.tier.reason and "closer" in on.tier.reason and ".." not in on.tier.reason
    thr, _ = pipe.thresholds("two_stage", "mean")
    assert on.tier.name == ("urgent" if on.image_score >= thr["urgent"] else "refer" if on.image_score >= thr["refer"] else "routine")
    off = variant(False).predict(photos[1])
    assert off.image_score == 0.0 and off.tier.name == "routine" and not off.blended


def test_box_confidence_is_the_rescorer_over_the_merged_detections(pipe, photos):
    """Each kept lesion carries the shipped box rescorer's confidence, computed over every merged
    detection of the photo (not only the kept ones), and the kept boxes are the detector score's."""
    if pipe.box_rescorer is None:
        pytest.skip("no box rescorer shipped")
    img = pipe.load(photos[2])
    raw_boxes, raw_scores = pipe.detect_raw(img.rgb)
    size = (img.rgb.shape[1], img.rgb.shape[0])
    merged_boxes, merged_scores = pipe.box_selection.merge(raw_boxes, raw_scores, size)
    expected = pipe.box_rescorer.score(merged_boxes, merged_scores, size)
    keep = pipe.box_selection.select(merged_boxes, merged_scores)
    boxes, scores, confidence = pipe.detect_scored(img.rgb)
    np.testing.assert_allclose(boxes, merged_boxes[keep])
    np.testing.assert_allclose(confidence, expected[keep])
    res = pipe.predict(photos[2])
    assert [l.box_confidence for l in res.lesions] == pytest.approx(list(confidence), abs=1e-6)
    exported = json.loads(res.to_json())["lesions"]
    assert [l["box_confidence"] for l in exported] == pytest.approx(list(confidence), abs=1e-6)
