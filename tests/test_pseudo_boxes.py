"""Detector pseudo-boxes for box-less labelled sets (data/pseudo_boxes.py) and their use in classifier training."""
from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image

from lesiontriage.data.pseudo_boxes import apply_pseudo_boxes, build_pseudo_boxes, cache_path, pseudo_box
from lesiontriage.errors import UnreadableImageError
from lesiontriage.imaging import load_image


class _FakePipe:
    """Detects a fixed set of boxes in loaded-image pixels; the loader halves every photo (a downscaling decode)."""

    def __init__(self, boxes: np.ndarray) -> None:
        self.boxes = boxes
        self.detected = 0

    def load(self, path):
        img = load_image(path)
        if img.rgb.shape[0] < 40:
            raise UnreadableImageError(f"{path}: too small to read")
        img.rgb = img.rgb[::2, ::2]
        return img

    def detect(self, rgb):
        self.detected += 1
        return self.boxes.copy(), np.linspace(0.9, 0.6, len(self.boxes)).astype(np.float32)


def _photo(root, name: str, size=(120, 80)) -> str:
    (root / "derm7pt" / "images").mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), 150, np.uint8)).save(root / "derm7pt" / "images" / name)
    return f"derm7pt/images/{name}"


def test_pseudo_box_is_the_largest_kept_box_in_stored_pixels(tmp_path):
    path = _photo(tmp_path, "a.jpg")
    boxes = np.array([[0, 0, 10, 10], [5, 5, 45, 35], [20, 20, 25, 25]], np.float32)  # loaded (halved) pixels
    pb = pseudo_box(_FakePipe(boxes), path, (120, 80), data_root=tmp_path)
    assert pb.box == [10.0, 10.0, 90.0, 70.0]  # the 40x30 box, doubled back to the stored 120x80 image
    assert pb.n_kept == 3
    assert abs(pb.detector_score - 0.75) < 1e-6  # the score of that box, not of the best-scored one
    assert abs(pb.box_fraction - (40 * 30) / (60 * 40)) < 1e-6


def test_pseudo_box_cache_is_reused_and_bad_photos_get_no_box(tmp_path, capsys):
    rows = pd.DataFrame({"path": [_photo(tmp_path, "a.jpg"), _photo(tmp_path, "b.jpg", (60, 30))],
                         "width": [120, 60], "height": [80, 30]})
    pipe = _FakePipe(np.array([[5, 5, 45, 35]], np.float32))
    cache = cache_path("ab" * 32, runs_dir=tmp_path / "runs")
    assert cache_path("ab" * 32, "r1") != cache_path("ab" * 32, "r2")  # another box rule, another cache
    table = build_pseudo_boxes(pipe, rows, cache, data_root=tmp_path)
    assert cache.exists() and pipe.detected == 1  # b.jpg could not be read: no detection, no crash
    assert table.set_index("path").loc[rows["path"][1], "box"] is None
    assert "b.jpg" in capsys.readouterr().out
    again = build_pseudo_boxes(pipe, rows.iloc[:1], cache, data_root=tmp_path)
    assert pipe.detected == 1 and len(again) == 1  # read from the cache, only the asked rows


def test_apply_pseudo_boxes_fills_only_boxless_rows_of_the_named_sources():
    rows = pd.DataFrame({
        "source": ["derm7pt", "derm7pt", "ham10000", "sd198_tumour_subset", "derm7pt"],
        "path": ["d1", "d2", "h1", "s1", "d3"],
        "boxes": [[], [[1.0, 2.0, 3.0, 4.0]], [], [], []],
    })
    table = pd.DataFrame({"path": ["d1", "d2", "h1", "s1", "d3"],
                          "box": [[0.0, 0.0, 5.0, 5.0], [9.0, 9.0, 9.5, 9.5], [1.0, 1.0, 2.0, 2.0], [2.0, 2.0, 6.0, 6.0], None]})
    out = apply_pseudo_boxes(rows, table, ["derm7pt"])
    assert out["pseudo_box"].tolist() == [True, False, False, False, False]
    assert out["boxes"][0] == [[0.0, 0.0, 5.0, 5.0]]
    assert out["boxes"][1] == [[1.0, 2.0, 3.0, 4.0]]  # a given box is never replaced
    assert out["boxes"][3] == [] and out["boxes"][4] == []  # another source; no box kept
    assert rows["boxes"][0] == []  # the input is not modified


def test_per_row_whole_frame_share():
    """Pseudo-boxed rows may show the whole photo more often than rows with a given box."""
    from lesiontriage.data.torch_datasets import LesionImageDataset

    img = np.zeros((100, 160, 3), np.uint8)
    rows = pd.DataFrame({"path": ["x.jpg", "y.jpg"], "boxes": [[[70.0, 40.0, 90.0, 60.0]]] * 2,
                         "malignant": [1, 0], "diagnosis": ["MEL", "NV"]})
    ds = LesionImageDataset(rows, train=True, whole_frame_prob=[0.0, 1.0], input_size=32, mean=(0.5,) * 3,
                            std=(0.5,) * 3, mode="crop", images=[img, img])
    rng = np.random.default_rng(0)
    assert ds.region(0, rng).shape[:2] != img.shape[:2]
    assert ds.region(1, rng).shape == img.shape


def test_scene_lesion_auc_scores_given_boxes_with_moles_as_benign(tmp_path):
    """The product check's wide-field guard: every labelled box of the validation scenes, in decoded pixels."""
    from lesiontriage.train.product_check import scene_lesion_auc, validation_scene_dirs

    scene_dir = tmp_path / "runs" / "scenes" / "val_11"
    scene_dir.mkdir(parents=True)
    Image.fromarray(np.full((100, 200, 3), 120, np.uint8)).save(scene_dir / "s0.jpg")
    pd.DataFrame({"path": ["s0.jpg"], "synthetic": [True],
                  "boxes": [[[10.0, 10.0, 30.0, 30.0], [50.0, 10.0, 70.0, 30.0], [100.0, 50.0, 120.0, 70.0],
                             [150.0, 50.0, 170.0, 70.0]]],
                  "box_kind": [["pasted", "pasted", "background_mole", "pasted"]],
                  "box_malignant": [[1, 0, None, None]]}).to_parquet(scene_dir / "scenes.parquet")
    (tmp_path / "runs" / "scenes" / "test").mkdir()

    class Pipe:
        seen: list = []

        def load(self, path):
            img = load_image(path)
            img.scale = 0.5  # a downscaling decode: boxes must follow it
            return img

        def lesion_probabilities(self, rgb, boxes):
            self.seen.append(boxes.copy())
            return np.array([0.9, 0.2, 0.4]), np.zeros((3, 8))

    assert validation_scene_dirs(tmp_path / "runs") == [scene_dir]
    auc, n = scene_lesion_auc(Pipe(), [scene_dir])
    assert n == 3  # the unlabelled pasted lesion is left out, the mole counts as benign
    assert auc == 1.0  # malignant 0.9 above benign 0.2 and 0.4
    assert np.allclose(Pipe.seen[0][2], [50.0, 25.0, 60.0, 35.0])


def test_classifier_trainer_crops_boxless_rows_by_pseudo_boxes(tmp_path, monkeypatch):
    """pseudo_box_sources: derm7pt rows get the detector's box in train and val; their whole-photo share is
    pseudo_whole_prob while boxed rows keep whole_frame_prob."""
    import lesiontriage.data.pseudo_boxes as pb
    import lesiontriage.pipeline as pipeline
    import lesiontriage.train.classifier as clf
    from lesiontriage.data.manifest import write_manifest
    from lesiontriage.train.classifier import ClassifierTrainConfig, ClassifierTrainer

    root = tmp_path / "data"
    rows = []
    for i in range(12):
        src = "derm7pt" if i % 2 else "ham10000"
        (root / src / "images").mkdir(parents=True, exist_ok=True)
        name = f"{src}/images/p{i}.jpg"
        Image.fromarray(np.full((80, 120, 3), 100 + i, np.uint8)).save(root / name)
        rows.append(dict(path=name, source=src, modality="clinical" if src == "derm7pt" else "dermoscopy",
                         image_id=f"p{i}", lesion_id=f"L{i}", patient_id=None, group_id=f"g{i}",
                         diagnosis="MEL" if i % 3 == 0 else "NV", source_label="x", malignant=int(i % 3 == 0),
                         boxes=[] if src == "derm7pt" else [[10.0, 10.0, 50.0, 40.0]], width=120, height=80,
                         split="val" if i >= 8 else "train"))
    df = pd.DataFrame(rows)
    df["malignant"] = df["malignant"].astype("Int8")
    write_manifest(df, tmp_path / "manifest.parquet")

    class Pipe(_FakePipe):
        metadata = {"models": {"detector": {"sha256": "cd" * 32}}}
        box_selection = "rule"

        def load(self, path):
            return load_image(path)

    monkeypatch.setattr(pipeline.TriagePipeline, "from_dir", classmethod(lambda cls, *a, **k: Pipe(np.array([[20, 20, 60, 50]], np.float32))))
    monkeypatch.setattr(pb, "RUNS_DIR", tmp_path / "runs")
    monkeypatch.setattr(clf, "RUNS_DIR", tmp_path / "runs")
    cfg = ClassifierTrainConfig(name="t", network={"input_size": 32}, sources=["ham10000", "derm7pt"],
                                source_shares={"ham10000": 0.5, "derm7pt": 0.5}, pseudo_box_sources=["derm7pt"],
                                pseudo_whole_prob=0.7, whole_frame_prob=0.1, bf16=False, num_workers=0)
    trainer = ClassifierTrainer(cfg, manifest_path=tmp_path / "manifest.parquet", data_root=root)
    tr = trainer.train_rows
    assert tr["pseudo_box"].tolist() == (tr["source"] == "derm7pt").tolist()
    assert all(b == [[20.0, 20.0, 60.0, 50.0]] for b in tr.loc[tr["pseudo_box"], "boxes"])
    assert trainer.val_rows["pseudo_box"].sum() == (trainer.val_rows["source"] == "derm7pt").sum() > 0
    probs = dict(zip(tr["source"], trainer.train_ds.whole_frame_prob))
    assert probs == {"derm7pt": 0.7, "ham10000": 0.1}
    assert len(list((tmp_path / "runs" / "data").glob(f"pseudo_boxes_{'cd' * 6}_*.parquet"))) == 1
    assert trainer.val_ds.region(int(np.flatnonzero(trainer.val_rows["pseudo_box"])[0])).shape[:2] != (80, 120)
