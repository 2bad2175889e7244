"""The browser app without a browser: every page through streamlit.testing.v1.AppTest, plus the
Streamlit-free helpers in lesiontriage.app_support.

Three states are covered:
- no model installed (LESIONTRIAGE_MODELS -> an empty folder): every page renders, says what is
  missing, and shows no exception;
- a stand-in pipeline that honours the TriagePipeline contract (it finds dark blobs with OpenCV), so
  the whole triage page (upload, bad upload, examples, aggregation switch without a model re-run,
  lesion selection, Grad-CAM, no-lesion outcome) is exercised before trained weights exist;
- the shipped models (skipped until models/metadata.json lists a classifier).
"""
from __future__ import annotations

import io
import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from lesiontriage import app_support as sup
from lesiontriage.errors import UnreadableImageError
from lesiontriage.paths import MODELS_DIR, REPO_ROOT
from lesiontriage.results import INTENDED_USE, SUBTYPES, Lesion, QualityReport, Tier, TriageResult

APP = str(REPO_ROOT / "app.py")
PAGES = ["pages/triage.py", "pages/evaluation.py", "pages/clinical.py", "pages/speed.py", "pages/model_card.py"]
TIMEOUT = 60


# ------------------------------------------------------------------------------------------------
# a stand-in pipeline with the TriagePipeline contract
# ------------------------------------------------------------------------------------------------

def _aggregate(ps: list[float], how: str) -> float:
    if not ps:
        return 0.0
    if how == "mean":
        return float(np.mean(ps))
    if how == "max":
        return float(np.max(ps))
    if how == "noisy_or":
        return float(1 - np.prod([1 - p for p in ps]))
    raise ValueError(how)


class FakePipeline:
    """Dark blobs are 'lesions'; darker means more 'malignant'. Counts model runs."""

    def __init__(self) -> None:
        self.metadata = {"models": {"classifier": {"sha256": "fake-classifier"}, "detector": {"sha256": "fake-detector"}},
                         "package_version": "test"}
        self.predict_calls = 0
        self.gradcam_calls = 0

    @staticmethod
    def _decode(image, name):
        try:
            im = Image.open(io.BytesIO(image)) if isinstance(image, (bytes, bytearray)) else image
            im.load()
        except Exception as exc:
            raise UnreadableImageError(name or "image", f"not a readable image ({type(exc).__name__})") from None
        return np.asarray(im.convert("RGB"))

    def _tier(self, lesions, score):
        if not lesions:
            return Tier("routine", "No lesion found. Retake the photo closer, in focus and well lit.", None)
        d = max(range(len(lesions)), key=lambda i: lesions[i].p_malignant)
        name = "urgent" if score >= 0.7 else "refer" if score >= 0.3 else "routine"
        return Tier(name, f"{name.title()}: score {score:.2f}; driven by lesion #{d + 1}.", d)

    def predict(self, image, aggregate="mean", whole_image=False, name=None):
        import cv2

        self.predict_calls += 1
        rgb = self._decode(image, name)
        gray = rgb.mean(axis=2)
        if whole_image:
            score = float(1 - gray.mean() / 255)
            return TriageResult(name or "image", rgb.shape[1], rgb.shape[0], [], aggregate, score,
                                Tier("refer" if score >= 0.3 else "routine", f"Whole image score {score:.2f}.", None),
                                None, {"decode": 1.0, "classify": 2.0}, "whole_image", "test")
        mask = (gray < gray.mean() - 40).astype(np.uint8)
        n, _, stats, _ = cv2.connectedComponentsWithStats(mask)
        lesions = []
        for k in range(1, n):
            x, y, w, h, area = stats[k]
            if area < 20:
                continue
            darkness = float(1 - gray[y:y + h, x:x + w].min() / 255)
            p = float(np.clip(darkness, 0.01, 0.99))
            sub = {s: (0.5 if s == "MEL" else 0.5 / (len(SUBTYPES) - 1)) for s in SUBTYPES}
            lesions.append(Lesion(len(lesions), [float(x), float(y), float(x + w), float(y + h)], 0.9, p, sub))
        score = _aggregate([l.p_malignant for l in lesions], aggregate)
        q = QualityReport(100.0, float(gray.mean()), 0.0, 0.0, int(min(rgb.shape[:2])),
                          ["image is small"] if min(rgb.shape[:2]) < 64 else [])
        return TriageResult(name or "image", rgb.shape[1], rgb.shape[0], lesions, aggregate, score,
                            self._tier(lesions, score), q, {"decode": 1.0, "detect": 2.0, "classify": 3.0, "total": 6.0},
                            "two_stage", "test")

    def reaggregate(self, result, aggregate):
        if result.mode == "whole_image":
            return replace(result, aggregate=aggregate)
        score = _aggregate([l.p_malignant for l in result.lesions], aggregate)
        return replace(result, aggregate=aggregate, image_score=score, tier=self._tier(result.lesions, score))

    def crop(self, image, lesion):
        rgb = self._decode(image, None)
        x1, y1, x2, y2 = (int(v) for v in lesion.box)
        return rgb[max(0, y1 - 5):y2 + 5, max(0, x1 - 5):x2 + 5].copy()

    def gradcam(self, image, lesion_index, result=None):
        self.gradcam_calls += 1
        c = self.crop(image, result.lesions[lesion_index]).astype(np.float32)
        c[..., 0] = 255
        return c.astype(np.uint8)


def scene_jpeg(spots: list[tuple[int, int, int, int]] | None = None, size=(320, 240)) -> bytes:
    """Light 'skin' with dark square spots (x, y, side, grey level)."""
    w, h = size
    arr = np.full((h, w, 3), (220, 180, 150), np.uint8)
    for x, y, s, g in spots if spots is not None else [(40, 40, 30, 20), (200, 60, 24, 90), (120, 160, 20, 60)]:
        arr[y:y + s, x:x + s] = g
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture(autouse=True)
def _clear_streamlit_caches():
    import streamlit as st

    st.cache_data.clear()
    st.cache_resource.clear()
    yield
    st.cache_data.clear()
    st.cache_resource.clear()


@pytest.fixture
def empty_models(tmp_path, monkeypatch):
    d = tmp_path / "models"
    d.mkdir()
    monkeypatch.setenv("LESIONTRIAGE_MODELS", str(d))
    return d


@pytest.fixture
def fake(monkeypatch, empty_models):
    pipe = FakePipeline()
    monkeypatch.setattr(sup, "model_installed", lambda models=None: True)
    monkeypatch.setattr(sup, "load_pipeline", lambda models=None: pipe)
    return pipe


def app_test():
    from streamlit.testing.v1 import AppTest

    return AppTest.from_file(APP, default_timeout=TIMEOUT)


def texts(at) -> str:
    """All visible text of the last run, for 'the user sees X' assertions."""
    parts = []
    for kind in ("title", "header", "subheader", "markdown", "caption", "info", "warning", "error", "success"):
        parts += [str(e.value) for e in getattr(at, kind)]
    parts += [f"{m.label} {m.value}" for m in at.metric]
    parts += [str(s.label) for s in at.get("status")] if at.get("status") else []
    return "\n".join(parts)


def image_captions(at) -> list[str]:
    return [c for el in at.image for c in el.captions]


def upload(at, data: bytes, name: str, mime: str = "image/jpeg"):
    at.file_uploader(key="upload").set_value((name, data, mime))
    return at.run()


# ------------------------------------------------------------------------------------------------
# no model installed: every page renders and says so
# ------------------------------------------------------------------------------------------------

def test_no_model_triage_page_explains_how_to_get_models(empty_models):
    at = app_test().run()
    assert not at.exception
    text = texts(at)
    assert INTENDED_USE in text  # above the page content on every page
    assert "No model installed yet" in text
    assert "LESIONTRIAGE_MODELS" in text
    assert "lesiontriage train classifier" in at.code[0].value
    assert "Traceback" not in text
    assert not at.file_uploader  # nothing to upload into without a model


@pytest.mark.parametrize("page", PAGES[1:])
def test_every_other_page_renders_without_reports(page, empty_models):
    at = app_test().run()
    at.switch_page(page).run()
    assert not at.exception, at.exception
    text = texts(at)
    assert INTENDED_USE in text
    if page != "pages/model_card.py":
        assert "No report yet" in text or "does not exist yet" in text
    else:
        assert "No model installed yet" in text
        for section in ("Model details", "Intended use", "Factors", "Metrics", "Evaluation data", "Training data",
                        "Ethical considerations", "Caveats"):
            assert section in text, section
        licences = " ".join(df.value.to_csv() for df in at.dataframe)
        for licence in ("CC BY-NC 4.0", "CC BY 4.0", "academic research only", "research use only", "licence unknown"):
            assert licence in licences, licence


def test_pipeline_load_error_is_one_line_not_a_traceback(monkeypatch, empty_models):
    from lesiontriage.errors import ModelError

    def boom(models=None):
        raise ModelError("models/classifier.safetensors: sha256 mismatch (expected abc123)")

    monkeypatch.setattr(sup, "model_installed", lambda models=None: True)
    monkeypatch.setattr(sup, "load_pipeline", boom)
    at = app_test().run()
    assert not at.exception
    assert "could not be loaded" in texts(at)
    assert any("sha256 mismatch" in e.value for e in at.error)


# ------------------------------------------------------------------------------------------------
# triage page with the stand-in pipeline
# ------------------------------------------------------------------------------------------------

def test_upload_shows_score_tier_lesions_and_aggregation_reuses_the_result(fake):
    at = upload(app_test().run(), scene_jpeg(), "scene.jpg")
    assert not at.exception, at.exception
    text = texts(at)
    assert "3 lesions found" in text
    score = next(m for m in at.metric if m.label == "Triage score")
    expected = fake.predict(scene_jpeg(), "mean", name="scene.jpg")
    fake.predict_calls -= 1
    assert float(score.value) == pytest.approx(expected.image_score, abs=0.006)
    assert expected.tier.reason in text
    table = next(d.value for d in at.dataframe if "p_malignant" in d.value.columns)
    assert len(table) == 3
    assert list(table["p_malignant"]) == sorted(table["p_malignant"], reverse=True)
    assert table["crop"].str.startswith("data:image/png;base64,").all()
    assert fake.predict_calls == 1

    assert "Score by Mean: the mean of 3 lesion probabilities." in text
    at.button_group(key="aggregation").set_value("max").run()
    assert not at.exception
    assert "Score by Max: the maximum of 3 lesion probabilities." in texts(at)
    score = next(m for m in at.metric if m.label == "Triage score")
    assert float(score.value) == pytest.approx(max(l.p_malignant for l in expected.lesions), abs=0.006)
    at.button_group(key="aggregation").set_value("noisy_or").run()
    noisy = 1 - np.prod([1 - l.p_malignant for l in expected.lesions])
    assert float(next(m for m in at.metric if m.label == "Triage score").value) == pytest.approx(noisy, abs=0.006)
    assert fake.predict_calls == 1, "switching the aggregation must not re-run the models"


def test_bad_upload_shows_error_and_the_app_keeps_working(fake):
    at = upload(app_test().run(), b"this is a text file, not a photo", "notes.jpg")
    assert not at.exception
    assert at.error and "notes.jpg" in at.error[0].value
    assert "Triage score" not in texts(at)
    at = upload(at, scene_jpeg(), "good.jpg")
    assert not at.exception and not at.error
    assert "3 lesions found" in texts(at)


def test_photo_the_display_cannot_decode_still_shows_results(fake, monkeypatch):
    def cannot(data, max_side=1600):
        raise OSError("codec missing")

    monkeypatch.setattr(sup, "decode_for_display", cannot)
    at = upload(app_test().run(), scene_jpeg(), "odd.jpg")
    assert not at.exception
    assert "cannot be shown here" in texts(at) and "3 lesions found" in texts(at)


def test_no_lesion_is_an_explicit_outcome_with_advice(fake):
    at = upload(app_test().run(), scene_jpeg(spots=[]), "clear_skin.jpg")
    assert not at.exception
    text = texts(at)
    assert "No lesion found" in text and "closer" in text
    assert any(m.label == "Lesions found" and str(m.value) == "0" for m in at.metric)
    assert not [d for d in at.dataframe if "p_malignant" in d.value.columns]  # no empty lesion table


def test_selecting_a_lesion_and_gradcam_on_request(fake):
    at = upload(app_test().run(), scene_jpeg(), "scene.jpg")
    pick = next(s for s in at.selectbox if s.key and s.key.startswith("pick_"))
    driving = pick.value
    assert any(f"lesion #{driving + 1} highlighted" in c for c in image_captions(at))
    other = next(i for i in range(len(pick.options)) if i != driving)
    pick.set_value(int(other)).run()
    assert any(f"lesion #{int(other) + 1} highlighted" in c for c in image_captions(at))
    n_images = len(at.image)
    assert fake.gradcam_calls == 0
    next(b for b in at.button if b.label == "Show Grad-CAM").click().run()
    assert not at.exception
    assert fake.gradcam_calls == 1
    assert len(at.image) == n_images + 1
    assert any(c.startswith(f"Grad-CAM, lesion #{int(other) + 1}") for c in image_captions(at))


def test_whole_image_mode_when_its_model_is_installed(fake):
    at = upload(app_test().run(), scene_jpeg(), "scene.jpg")
    assert at.toggle(key="whole_image").disabled  # no image_classifier in the stand-in's metadata
    fake.metadata["models"]["image_classifier"] = {"sha256": "fake-image-classifier"}
    import streamlit as st

    st.cache_data.clear()
    at.run()
    assert not at.toggle(key="whole_image").disabled
    at.toggle(key="whole_image").set_value(True).run()
    assert not at.exception
    text = texts(at)
    assert "Whole-image mode" in text and "No lesion found" not in text
    assert not [d for d in at.dataframe if "p_malignant" in d.value.columns]
    assert not at.get("button_group")  # aggregation does not apply


def test_synthetic_example_is_labelled_and_analysed(fake):
    at = app_test().run()
    ex = at.selectbox(key="example")
    assert any(o.startswith("Synthetic") and "SYNTHETIC" in o for o in ex.options)
    ex.set_value("synthetic:1").run()
    assert not at.exception
    text = texts(at)
    assert "SYNTHETIC image" in text
    assert "Triage score" in text
    assert fake.predict_calls == 1


def test_downloads_are_offered(fake):
    at = upload(app_test().run(), scene_jpeg(), "My Photo 1.jpg")
    labels = [b.proto.label for b in at.get("download_button")]
    assert labels == ["JSON", "CSV", "PNG"]


def test_same_photo_in_a_new_session_reuses_the_result_without_the_progress_box(fake):
    first = upload(app_test().run(), scene_jpeg(), "scene.jpg")
    assert first.get("status"), "the first analysis shows its progress"
    second = upload(app_test().run(), scene_jpeg(), "scene.jpg")  # another browser tab, same photo
    assert not second.exception, second.exception
    assert fake.predict_calls == 1
    assert not second.get("status")  # no progress box to animate: the cached result is shown at once
    assert any(e.label.startswith("Analysed in") for e in second.expander)
    assert "3 lesions found" in texts(second)
    assert [(m.label, m.value) for m in second.metric] == [(m.label, m.value) for m in first.metric]


# ------------------------------------------------------------------------------------------------
# the real TriagePipeline with an untrained classifier (no detector): the contract, end to end
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def untrained_models(tmp_path, monkeypatch):
    """A models/ folder with a randomly initialised classifier and no detector: the real pipeline
    then treats the whole photo as one lesion. Scores are meaningless; the wiring is what is tested."""
    torch = pytest.importorskip("torch")
    try:
        from lesiontriage.networks.classifier import ClassifierConfig, LesionClassifier
        from lesiontriage.weights import save_weights, write_metadata
    except ImportError as exc:
        pytest.skip(f"pipeline modules not importable yet: {exc}")
    torch.manual_seed(0)
    d = tmp_path / "untrained_models"
    cfg = ClassifierConfig(input_size=96)
    sha = save_weights(LesionClassifier(cfg, pretrained=False).state_dict(), d / "classifier.safetensors")
    write_metadata(d, {"models": {"classifier": {"file": "classifier.safetensors", "sha256": sha,
                                                 "config": cfg.to_dict(), "temperature": 1.0}},
                       "package_version": "untrained-test"})
    monkeypatch.setenv("LESIONTRIAGE_MODELS", str(d))
    return d


def test_real_pipeline_untrained_weights_full_page(untrained_models):
    at = app_test()
    at.default_timeout = 120
    at = upload(at.run(), scene_jpeg(size=(400, 300)), "scene.jpg")
    assert not at.exception, at.exception
    text = texts(at)
    assert "Triage score" in text and "1 lesion found" in text and "Tier:" in text
    table = next(d.value for d in at.dataframe if "p_malignant" in d.value.columns)
    assert len(table) == 1 and table["crop"].iloc[0].startswith("data:image/png;base64,")
    at.button_group(key="aggregation").set_value("noisy_or").run()
    assert not at.exception and "Score by Noisy-OR" in texts(at)
    n_images = len(at.image)
    next(b for b in at.button if b.label == "Show Grad-CAM").click().run()
    assert not at.exception and not at.error
    assert len(at.image) == n_images + 1
    at = upload(at, b"%PDF-1.4 not a photo", "report.jpg")
    assert not at.exception and at.error and "report.jpg" in at.error[0].value


# ------------------------------------------------------------------------------------------------
# reports present: evaluation pages render figures with provenance
# ------------------------------------------------------------------------------------------------

def test_evaluation_page_renders_reports_with_provenance(empty_models):
    rep = empty_models / "reports"
    rep.mkdir()
    prov = {"command": "lesiontriage evaluate --out models/reports", "manifest_hash": "abcdef1234567890",
            "model_sha256": {"classifier": "0123456789abcdef0123"}, "seed": 0}
    (rep / "summary.json").write_text(json.dumps({**prov, "lesion_auc": {"value": 0.91, "ci_low": 0.89, "ci_high": 0.93,
                                                                          "n": 1512, "split": "isic2018_test"}}))
    (rep / "lesion_malignancy.json").write_text(json.dumps({**prov, "strata": {
        "all": {"auc": 0.9, "roc": {"fpr": [0, 0.1, 1], "tpr": [0, 0.8, 1]}, "pr": {"recall": [0, 0.5, 1], "precision": [1, 0.9, 0.3]}},
    }, "calibration": {"ece": 0.03, "mean_predicted": [0.1, 0.5, 0.9], "observed_frequency": [0.12, 0.45, 0.88]},
        "confusion": {"matrix": [[10, 2], [3, 7]], "labels": ["benign", "malignant"]},
        "embedding": {"x": list(range(12)), "y": [i % 5 for i in range(12)], "subtype": ["MEL", "NV", "BCC"] * 4}}))
    at = app_test().run()
    at.switch_page("pages/evaluation.py").run()
    assert not at.exception, at.exception
    text = texts(at)
    assert "No report yet" not in text
    assert "lesiontriage evaluate --out models/reports" in text and "abcdef123456" in text
    assert len(at.get("plotly_chart")) == 5  # ROC, PR, reliability, confusion, embedding map
    assert at.dataframe[0].value["value"].iloc[0] == pytest.approx(0.91)


def test_malformed_report_is_reported_not_crashing(empty_models):
    rep = empty_models / "reports"
    rep.mkdir()
    (rep / "detection.json").write_text("{not json")
    at = app_test().run()
    at.switch_page("pages/evaluation.py").run()
    assert not at.exception
    assert any("detection.json" in e.value and "cannot be read" in e.value for e in at.error)


# ------------------------------------------------------------------------------------------------
# app_support helpers
# ------------------------------------------------------------------------------------------------

def _result(ps=(0.1, 0.9), w=400, h=300) -> TriageResult:
    lesions = [Lesion(i, [20.0 + 150 * i, 30.0, 90.0 + 150 * i, 100.0], 0.8, p, {"MEL": p, "NV": 1 - p})
               for i, p in enumerate(ps)]
    return TriageResult("x.jpg", w, h, lesions, "mean", float(np.mean(ps)) if ps else 0.0,
                        Tier("refer", "why", 1 if ps else None), None, {"total": 1.0})


def test_colour_scale_is_continuous_and_ordered():
    lo, mid, hi = sup.malignancy_rgb(0.0), sup.malignancy_rgb(0.5), sup.malignancy_rgb(1.0)
    assert lo[1] > lo[0] and hi[0] > hi[1]  # green at 0, red at 1
    reds = [sup.malignancy_rgb(p)[0] for p in np.linspace(0, 0.5, 6)]
    assert reds == sorted(reds) and len(set(reds)) > 3
    assert sup.malignancy_rgb(float("nan")) == (128, 128, 128)
    assert sup.malignancy_rgb(2.0) == hi


def test_boxes_drawn_in_their_colour_and_legend_appended():
    img = np.full((300, 400, 3), 200, np.uint8)
    res = _result()
    boxed = np.asarray(sup.draw_lesions(img, res))
    # the right edge of lesion #2's box (x=240) is drawn in its colour
    assert tuple(boxed[70, 240]) == sup.malignancy_rgb(0.9)
    assert tuple(boxed[70, 90]) == sup.malignancy_rgb(0.1)
    assert (boxed[60:70, 40:70] == 200).all()  # the inside stays untouched
    full = sup.annotate(img, res)
    assert full.width == 400 and full.height > 300
    legend = np.asarray(full)[300:]
    assert (np.abs(legend.astype(int) - np.array(sup.malignancy_rgb(1.0))).sum(axis=2) < 30).any()


def test_highlight_makes_the_selected_box_thicker():
    img = np.full((300, 400, 3), 200, np.uint8)
    res = _result()
    plain = np.asarray(sup.draw_lesions(img, res, highlight=None))
    hi = np.asarray(sup.draw_lesions(img, res, highlight=0))
    assert (hi != plain).sum() > 0
    changed = np.argwhere((hi != plain).any(axis=2))
    assert changed[:, 1].max() < 200  # only around lesion #1 (x <= 90 + margin)


def test_display_jpeg_is_narrow_enough_for_streamlit_to_pass_it_through():
    big = Image.open(io.BytesIO(sup.display_jpeg(np.zeros((1200, 1600, 3), np.uint8))))
    assert big.format == "JPEG" and big.width == sup.DISPLAY_MAX_WIDTH
    assert big.height == round(1200 * sup.DISPLAY_MAX_WIDTH / 1600)
    assert Image.open(io.BytesIO(sup.display_jpeg(np.zeros((100, 200, 3), np.uint8)))).size == (200, 100)


def test_drawing_key_follows_boxes_and_colours():
    assert sup.drawing_key(_result()) == sup.drawing_key(_result())
    assert sup.drawing_key(_result()) != sup.drawing_key(_result(ps=(0.1, 0.8)))
    assert sup.drawing_key(_result(ps=())) == ()


def test_subtype_bars_sorted_coloured_and_escaped():
    bars = sup.subtype_bars_html({"BKL": 0.1, "NV": 0.7, "MEL": 0.2})
    assert bars.index("NV - naevus") < bars.index("MEL - melanoma") < bars.index("BKL - benign keratosis")
    assert "70%" in bars and "20%" in bars and "10%" in bars
    assert bars.count("#d7191c") == 1 and bars.count("#2b83ba") == 2  # red: malignant types only
    assert "<script>" not in sup.subtype_bars_html({"<script>": 0.5})


def test_tiny_boxes_are_grown_for_display_only():
    res = _result(ps=(0.5,))
    res.lesions[0].box = [100.0, 100.0, 102.0, 101.0]
    (b,) = sup.display_boxes(res, 400, 300)
    assert b[2] - b[0] >= 10 and b[3] - b[1] >= 10
    assert res.lesions[0].box == [100.0, 100.0, 102.0, 101.0]


def test_png_export_has_no_exif_and_display_decode_applies_orientation():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    exif[0x010F] = "PhoneMaker"
    buf = io.BytesIO()
    Image.fromarray(np.zeros((100, 200, 3), np.uint8) + 120).save(buf, "JPEG", exif=exif.tobytes())
    shown = sup.decode_for_display(buf.getvalue())
    assert shown.shape[:2] == (200, 100)
    png = sup.png_bytes(Image.open(io.BytesIO(buf.getvalue())))
    assert png.startswith(b"\x89PNG") and b"eXIf" not in png and b"PhoneMaker" not in png
    assert b"tEXt" not in png and b"iTXt" not in png
    back = Image.open(io.BytesIO(png))
    assert not back.getexif() and "exif" not in back.info


def test_decode_for_display_handles_odd_modes():
    for mode, arr in (("I;16", (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)),
                      ("RGBA", np.dstack([np.full((64, 64, 3), 50, np.uint8), np.zeros((64, 64), np.uint8)])),
                      ("L", np.full((64, 64), 30, np.uint8))):
        buf = io.BytesIO()
        Image.fromarray(arr, mode if mode != "I;16" else None).save(buf, "PNG")
        out = sup.decode_for_display(buf.getvalue())
        assert out.shape == (64, 64, 3) and out.dtype == np.uint8, mode
    assert sup.decode_for_display(buf.getvalue(), max_side=32).shape == (32, 32, 3)


@pytest.mark.parametrize("fmt", ["HEIF", "WEBP", "TIFF"])
def test_decode_for_display_reads_phone_and_other_formats(fmt):
    if fmt == "HEIF":
        pillow_heif = pytest.importorskip("pillow_heif")
        pillow_heif.register_heif_opener()
    arr = np.zeros((120, 160, 3), np.uint8)
    arr[:, :80] = (200, 150, 120)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    out = sup.decode_for_display(buf.getvalue())
    assert out.shape == (120, 160, 3)
    assert abs(int(out[60, 20, 0]) - 200) < 20 and int(out[60, 140].max()) < 20


def test_csv_rows_sorted_by_probability_and_no_lesion_row():
    import pandas as pd

    res = _result(ps=(0.2, 0.7, 0.5))
    df = pd.read_csv(io.StringIO(sup.result_csv(res)))
    assert list(df["lesion"]) == [2, 3, 1]
    assert list(df["p_malignant"]) == [0.7, 0.5, 0.2]
    assert {"image", "image_score", "tier", "x1", "y2", "detector_score", "p_MEL"} <= set(df.columns)
    empty = pd.read_csv(io.StringIO(sup.result_csv(_result(ps=()))))
    assert len(empty) == 1 and empty["n_lesions"].iloc[0] == 0
    assert json.loads(sup.result_json(res))["n_lesions"] == 3


def test_lesion_table_order_and_columns():
    res = _result(ps=(0.2, 0.7))
    t = sup.lesion_table(res, ["a", "b"])
    assert list(t["lesion"]) == ["#2", "#1"] and list(t["crop"]) == ["b", "a"]
    assert "box_confidence" in t.columns and t["box_confidence"].isna().all()  # no rescorer in this result
    assert sup.export_stem("../../My photo (1).HEIC") == "My_photo__1_"


def test_examples_always_include_a_synthetic_scene(tmp_path):
    ex = sup.list_examples(tmp_path)  # no data sets here
    assert ex and all(e.synthetic for e in ex)
    data, name = sup.load_example(ex[0])
    im = Image.open(io.BytesIO(data))
    assert im.size[0] >= 256 and "synthetic" in name
    assert sup.load_example(ex[0])[0] == data  # deterministic for a seed


def test_examples_from_the_data_root_when_present():
    from lesiontriage.paths import data_available

    if not data_available():
        pytest.skip("shared data root absent")
    real = sup.data_examples()
    sources = {e.source for e in real}
    assert {"pad_ufes20_subset", "derm7pt", "moles_widefield_roujiaw"} <= sources
    for e in real:
        assert e.path.is_file() and not e.synthetic


def test_reports_missing_malformed_and_provenance(tmp_path):
    assert sup.list_reports(tmp_path / "nope") == []
    assert sup.load_report("summary", tmp_path) is None
    (tmp_path / "bad.json").write_text("[1, 2")
    assert "cannot be read" in sup.load_report("bad", tmp_path).error
    (tmp_path / "ok.json").write_text(json.dumps({"command": "c", "manifest_hash": "m" * 20, "model_sha256": "s" * 64,
                                                  "x": {"value": 0.5, "ci_low": 0.4, "ci_high": 0.6, "n": 10}}))
    r = sup.load_report("ok", tmp_path)
    text = r.provenance.text()
    assert "`c`" in text and "m" * 12 in text and "s" * 12 in text and "s" * 13 not in text
    assert "not recorded" in sup.Provenance().text()
    rows = sup.metric_rows(r.data)
    assert rows.iloc[0]["metric"] == "x" and rows.iloc[0]["95% CI"] == "0.400 - 0.600"


def test_config_disables_usage_stats_and_runs_headless():
    tomllib = pytest.importorskip("tomllib")
    cfg = tomllib.loads((REPO_ROOT / ".streamlit" / "config.toml").read_text())
    assert cfg["browser"]["gatherUsageStats"] is False
    assert cfg["server"]["headless"] is True
    assert 10 <= cfg["server"]["maxUploadSize"] <= 200


# ------------------------------------------------------------------------------------------------
# shipped models (run once models/ holds trained weights)
# ------------------------------------------------------------------------------------------------

needs_models = pytest.mark.skipif(not sup.model_installed(MODELS_DIR),
                                  reason="no trained model in models/ yet (models/metadata.json lists no classifier)")


def real_app_on_synthetic_example(monkeypatch):
    """The app on the shipped models, after picking the first synthetic example."""
    monkeypatch.delenv("LESIONTRIAGE_MODELS", raising=False)
    at = app_test()
    at.default_timeout = 180
    at.run()
    at.selectbox(key="example").set_value("synthetic:1").run()
    assert not at.exception, at.exception
    return at


@needs_models
@pytest.mark.models
def test_real_models_triage_a_synthetic_scene(monkeypatch):
    at = real_app_on_synthetic_example(monkeypatch)
    text = texts(at)
    assert "Triage score" in text and "Tier" in text
    assert "lesions found" in text.lower() or "No lesion found" in text
    at.button_group(key="aggregation").set_value("noisy_or").run() if at.get("button_group") else None
    assert not at.exception
    at = upload(at, b"\x00" * 10, "zeros.jpg")
    assert not at.exception and at.error and "zeros.jpg" in at.error[0].value


@needs_models
@pytest.mark.models
@pytest.mark.parametrize("page", PAGES[1:])
def test_real_models_other_pages(page, monkeypatch):
    monkeypatch.delenv("LESIONTRIAGE_MODELS", raising=False)
    at = app_test().run()
    at.switch_page(page).run()
    assert not at.exception, at.exception


@needs_models
@pytest.mark.models
def test_real_models_clinical_answers_and_management_suggestion(monkeypatch):
    from lesiontriage.context_models import CombinedClinicalModel, ManagementModel

    if CombinedClinicalModel.from_dir(MODELS_DIR) is None or ManagementModel.from_dir(MODELS_DIR) is None:
        pytest.skip("context models not shipped (run `lesiontriage research`)")
    at = real_app_on_synthetic_example(monkeypatch)
    before = float(next(m for m in at.metric if m.label == "Triage score").value)
    assert "Combined image + clinical model used" not in texts(at)
    at.number_input(key="cov_age").set_value(80).run()
    at.button_group(key="cov_bleed").set_value("yes").run()
    assert not at.exception, at.exception
    assert "Combined image + clinical model used" in texts(at)
    after = float(next(m for m in at.metric if m.label == "Triage score").value)
    assert after != pytest.approx(before, abs=1e-3)
    at.toggle(key="want_management").set_value(True).run()
    assert not at.exception, at.exception
    text = texts(at)
    assert "Suggested management (research output)" in text and "not a clinical decision" in text
