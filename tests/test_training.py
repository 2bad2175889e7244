"""Training loops run end to end on a tiny generated data set (no shared data needed).

These are smoke tests of the real loops (sampling, losses, checkpoints, resume, validation),
sized to take seconds: they prove the commands work on a fresh machine, not that models are good.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from lesiontriage.data.manifest import write_manifest


def _tiny_root(tmp_path, n: int = 24) -> tuple:
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    (root / "ham10000" / "images").mkdir(parents=True)
    rows = []
    for i in range(n):
        img = np.full((60, 80, 3), 190, np.uint8)
        mal = i % 2
        x1, y1 = int(rng.integers(5, 30)), int(rng.integers(5, 20))
        img[y1:y1 + 25, x1:x1 + 30] = (60, 30, 30) if mal else (140, 100, 90)
        name = f"ham10000/images/img_{i:03d}.jpg"
        Image.fromarray(img).save(root / name)
        rows.append(dict(path=name, source="ham10000", modality="dermoscopy", image_id=f"img_{i:03d}",
                         lesion_id=f"L{i}", patient_id=None, group_id=f"ham:L{i}",
                         diagnosis="MEL" if mal else "NV", source_label="mel" if mal else "nv", malignant=mal,
                         boxes=[[float(x1), float(y1), float(x1 + 30), float(y1 + 25)]], width=80, height=60,
                         split="val" if i >= n - 8 else "train"))
    df = pd.DataFrame(rows)
    df["malignant"] = df["malignant"].astype("Int8")
    manifest = tmp_path / "manifest.parquet"
    write_manifest(df, manifest)
    return root, manifest


@pytest.fixture()
def tiny(tmp_path, monkeypatch):
    import lesiontriage.train.classifier as clf
    import lesiontriage.train.detector as det

    monkeypatch.setattr(clf, "RUNS_DIR", tmp_path / "runs")
    monkeypatch.setattr(det, "RUNS_DIR", tmp_path / "runs")
    torch.set_num_threads(1)
    return _tiny_root(tmp_path)


def test_classifier_training_runs_checkpoints_and_resumes(tiny, tmp_path):
    from lesiontriage.train.classifier import ClassifierTrainConfig, ClassifierTrainer

    root, manifest = tiny
    cfg = ClassifierTrainConfig(name="tiny_clf", network={"input_size": 64}, sources=["ham10000"],
                                source_shares={"ham10000": 1.0}, epoch_samples=16, batch_size=8, warmup_epochs=1,
                                epochs=1, num_workers=0, bf16=False, ckpt_every_steps=1)
    out = ClassifierTrainer(cfg, manifest_path=manifest, data_root=root).fit()
    assert [h["epoch"] for h in out["history"]] == [0, 1]
    assert (tmp_path / "runs" / "tiny_clf" / "best.pt").exists()
    assert 0.0 <= out["history"][-1]["val_auc"]["pooled"] <= 1.0
    # Resume: the finished run has nothing left to do and keeps its history.
    again = ClassifierTrainer(cfg, manifest_path=manifest, data_root=root).fit(resume=True)
    assert len(again["history"]) == 2


def test_detector_training_runs_on_tiles(tiny, tmp_path):
    from lesiontriage.train.detector import DetectorTrainConfig, DetectorTrainer

    root, manifest = tiny
    cfg = DetectorTrainConfig(name="tiny_det", network={"long_side": 160}, tile=128, batch_size=2, epoch_tiles=4,
                              epochs=1, bf16=False, source_shares={"ham10000": 1.0}, scenes_dir=str(tmp_path / "none"),
                              val_per_source=3, warmup_steps=1)
    out = DetectorTrainer(cfg, manifest_path=manifest, data_root=root).fit()
    assert len(out["history"]) == 1
    rec = out["history"][0]["val"]
    assert 0.0 <= rec["ham10000/recall_iou0"] <= 1.0
    assert (tmp_path / "runs" / "tiny_det" / "best.pt").exists()


def test_detector_continuation_from_a_shipped_model_scores_it_first(tiny, tmp_path, monkeypatch):
    import lesiontriage.train.detector as det
    from lesiontriage.networks.detector import DetectorConfig, build_detector

    root, manifest = tiny
    torch.manual_seed(3)
    start = build_detector(DetectorConfig(long_side=160), pretrained=False).state_dict()
    asked = []
    monkeypatch.setattr(det, "load_shipped_state", lambda key: asked.append(key) or start)
    cfg = det.DetectorTrainConfig(name="tiny_det_cont", network={"long_side": 160}, tile=128, batch_size=2, epoch_tiles=4,
                                  epochs=1, bf16=False, source_shares={"ham10000": 1.0}, scenes_dir=str(tmp_path / "none"),
                                  val_per_source=3, warmup_steps=1, init_from="detector")
    trainer = det.DetectorTrainer(cfg, manifest_path=manifest, data_root=root)
    out = trainer.fit()
    assert asked == ["detector"]
    assert [h["epoch"] for h in out["history"]] == [-1, 0] and out["history"][0]["init_from"] == "detector"
    assert out["best"]["score"] >= out["history"][0]["val"]["macro_recall_iou50"]  # must beat the start point to ship


def test_tile_dataset_keeps_boxes_inside_the_tile():
    from lesiontriage.data.torch_datasets import DetectionSample, DetectionTileDataset

    rgb = np.zeros((300, 400, 3), np.uint8)
    boxes = np.array([[10, 10, 40, 30], [350, 250, 390, 290]], np.float32)
    ds = DetectionTileDataset([DetectionSample(rgb, boxes, "x", False)], long_side=400, tile=128, seed=0)
    for draw in range(30):
        img, target = ds[(0, draw)]
        assert img.shape == (3, 128, 128)
        b = target["boxes"]
        if len(b):
            assert float(b.min()) >= 0 and float(b.max()) <= 128
            assert bool((b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all())


def test_tile_dataset_carries_box_classes_only_for_the_c2_detector():
    from lesiontriage.data.torch_datasets import DetectionSample, DetectionTileDataset
    from lesiontriage.train.detector import c2_labels

    rgb = np.zeros((200, 200, 3), np.uint8)
    boxes = np.array([[20, 20, 60, 60], [120, 120, 170, 170]], np.float32)
    labels = c2_labels([1.0, float("nan")])  # malignant, unlabelled mole -> benign
    assert labels.tolist() == [2, 1]
    sample = DetectionSample(rgb, boxes, "x", False, labels)
    seen_c2, seen_one = set(), set()
    for draw in range(20):
        seen_c2.update(DetectionTileDataset([sample], long_side=200, tile=200, class_labels=True)[(0, draw)][1]["labels"].tolist())
        seen_one.update(DetectionTileDataset([sample], long_side=200, tile=200)[(0, draw)][1]["labels"].tolist())
    assert seen_c2 == {1, 2} and seen_one == {1}


def test_classifier_continuation_starts_from_given_weights_and_scores_them_first(tiny, tmp_path, monkeypatch):
    import lesiontriage.train.classifier as clf
    from lesiontriage.networks.classifier import ClassifierConfig, LesionClassifier

    root, manifest = tiny
    start = LesionClassifier(ClassifierConfig.from_dict({"input_size": 64}), pretrained=False).state_dict()
    start = {k: (v + 0.01 if v.is_floating_point() else v) for k, v in start.items()}
    asked = []
    monkeypatch.setattr(clf, "load_shipped_state", lambda key: asked.append(key) or start)
    cfg = clf.ClassifierTrainConfig(name="tiny_cont", network={"input_size": 64}, sources=["ham10000"],
                                    source_shares={"ham10000": 1.0}, epoch_samples=16, batch_size=8, warmup_epochs=0,
                                    epochs=1, num_workers=0, bf16=False, init_from="classifier")
    trainer = clf.ClassifierTrainer(cfg, manifest_path=manifest, data_root=root)
    assert asked == ["classifier"]
    assert torch.equal(trainer.model.state_dict()["malignant_head.weight"], start["malignant_head.weight"])
    out = trainer.fit()
    assert [h["epoch"] for h in out["history"]] == [-1, 0]
    assert out["history"][0]["init_from"] == "classifier"
    # the start point is the first "best": the run ships something only if it beats it
    best = torch.load(tmp_path / "runs" / "tiny_cont" / "best.pt", weights_only=False)
    assert best["epoch"] in (-1, 0)
    assert out["best"]["score"] >= out["history"][0]["val_auc"]["macro"]


def test_bf16_autocast_only_where_the_cpu_has_native_bf16():
    from lesiontriage.train.common import cpu_has_native_bf16

    assert cpu_has_native_bf16("flags\t: fpu avx2 avx512f avx512_bf16 amx_tile") is True
    assert cpu_has_native_bf16("flags\t: fpu avx2 amx_bf16") is True
    assert cpu_has_native_bf16("flags\t: fpu sse4_2 avx2 fma") is False


def test_whole_frame_share_shows_boxed_rows_as_the_whole_photo():
    """whole_frame_prob: a boxed training row is sometimes shown whole (the product's full-frame view);
    0 keeps the crop, and validation (no rng) always crops."""
    from lesiontriage.data.torch_datasets import LesionImageDataset

    img = np.zeros((100, 160, 3), np.uint8)
    img[40:60, 70:90] = 200
    rows = pd.DataFrame({"path": ["x.jpg"], "boxes": [[[70.0, 40.0, 90.0, 60.0]]], "malignant": [1], "diagnosis": ["MEL"]})
    kw = dict(input_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, mode="crop", images=[img])
    rng = np.random.default_rng(0)
    always = LesionImageDataset(rows, train=True, whole_frame_prob=1.0, **kw)
    assert always.region(0, rng).shape == img.shape
    never = LesionImageDataset(rows, train=True, whole_frame_prob=0.0, **kw)
    assert never.region(0, rng).shape[:2] != img.shape[:2]
    assert always.region(0, None).shape[:2] != img.shape[:2]  # validation: the crop
    some = LesionImageDataset(rows, train=True, whole_frame_prob=0.3, **kw)
    share = np.mean([some.region(0, np.random.default_rng(i)).shape == img.shape for i in range(400)])
    assert 0.2 < share < 0.4


def test_export_can_ship_the_last_epoch_instead_of_the_best_one(tiny, tmp_path, monkeypatch):
    """A whole-image view is judged on the product's blended score, not on its own validation AUC, so
    `train image-classifier --export-only --export-weights checkpoint.pt` ships the last epoch."""
    from dataclasses import asdict

    import lesiontriage.train.classifier as clf
    from lesiontriage.networks.classifier import ClassifierConfig, LesionClassifier
    from lesiontriage.train.export import export_run
    from lesiontriage.weights import load_weights, read_metadata

    root, manifest = tiny
    start = LesionClassifier(ClassifierConfig.from_dict({"input_size": 64}), pretrained=False).state_dict()
    monkeypatch.setattr(clf, "load_shipped_state", lambda key: start)
    cfg = clf.ClassifierTrainConfig(name="tiny_whole", mode="whole", network={"input_size": 64}, sources=["ham10000"],
                                    source_shares={"ham10000": 1.0}, epoch_samples=16, batch_size=8, warmup_epochs=0,
                                    epochs=1, num_workers=0, bf16=False, init_from="classifier", lr=0.05, head_lr=0.05)
    out = clf.ClassifierTrainer(cfg, manifest_path=manifest, data_root=root).fit()
    out.update(config=asdict(cfg), command="lesiontriage train image-classifier (test)", manifest_hash="test")
    run_dir = tmp_path / "runs" / "tiny_whole"
    last = torch.load(run_dir / "checkpoint.pt", weights_only=False)["model"]
    models_dir = tmp_path / "models"
    export_run("image-classifier", out, data_root=root, manifest_path=manifest, models_dir=models_dir,
               weights_file="checkpoint.pt")
    entry = read_metadata(models_dir)["models"]["image_classifier"]
    assert entry["kind"] == "whole_image_classifier"
    assert entry["validation"]["exported_from"] == "checkpoint.pt"
    assert entry["validation"]["last_epoch"] == 0 and "best_epoch" not in entry["validation"]
    shipped = load_weights(models_dir / entry["file"], entry["sha256"])
    key = "malignant_head.weight"
    assert torch.allclose(shipped[key].float(), last[key].float(), atol=1e-3)
    assert not torch.allclose(last[key].float(), start[key].float(), atol=1e-3)  # it trained: not the start point
    with pytest.raises(ValueError, match="best.pt only"):
        export_run("detector", out, models_dir=models_dir, weights_file="checkpoint.pt")


def test_cli_rejects_an_unknown_export_file_before_training(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import lesiontriage.train.classifier as clf
    from lesiontriage.cli import app

    started = []
    monkeypatch.setattr(clf, "run_training", lambda *a, **k: started.append(a))
    res = CliRunner().invoke(app, ["train", "image-classifier", "--export-weights", "last.pt"])
    assert res.exit_code == 1
    assert "last.pt" in res.output and "Traceback" not in res.output
    assert started == []  # refused before any training starts


def test_cli_exports_nothing_when_no_epoch_beat_the_start_point(monkeypatch):
    from typer.testing import CliRunner

    import lesiontriage.train.classifier as clf
    import lesiontriage.train.export as exp
    from lesiontriage.cli import app

    exported = []
    monkeypatch.setattr(exp, "export_run", lambda *a, **k: exported.append(k) or "models/x.safetensors")
    unbeaten = {"config": {"init_from": "classifier", "export_key": "image_classifier_4"}, "best": {"epoch": -1}}
    monkeypatch.setattr(clf, "run_training", lambda *a, **k: unbeaten)
    res = CliRunner().invoke(app, ["train", "image-classifier"])
    assert res.exit_code == 0 and "nothing exported" in res.output and exported == []
    # The last epoch, asked for by name, still ships; so does a run whose epoch 2 beat its start.
    res = CliRunner().invoke(app, ["train", "image-classifier", "--export-weights", "checkpoint.pt"])
    assert res.exit_code == 0 and len(exported) == 1
    monkeypatch.setattr(clf, "run_training", lambda *a, **k: {**unbeaten, "best": {"epoch": 2}})
    res = CliRunner().invoke(app, ["train", "image-classifier"])
    assert res.exit_code == 0 and len(exported) == 2


def test_greedy_soup_averages_weights_and_keeps_only_candidates_that_help():
    from lesiontriage.train.soup import SoupCandidate, average_states, greedy_soup

    a = {"w": torch.tensor([0.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([1.5, 3.5]), "n": torch.tensor(9)}
    c = {"w": torch.tensor([10.0, 10.0]), "n": torch.tensor(1)}
    avg = average_states([a, b])
    assert torch.equal(avg["w"], torch.tensor([0.75, 2.75])) and int(avg["n"]) == 3  # integer buffers: the first's
    # score: closeness of w to (1, 3); b alone is best, a helps when averaged in, c hurts
    score = lambda s: -float((s["w"] - torch.tensor([1.0, 3.0])).abs().sum())  # noqa: E731
    states = {"a": a, "b": b, "c": c}
    members, best, steps = greedy_soup(states, {k: score(v) for k, v in states.items()}, score)
    assert members == ["b", "a"] and best == pytest.approx(-0.5)
    assert [s["kept"] for s in steps] == [True, False]
    with pytest.raises(ValueError, match="different architectures"):
        average_states([a, {"v": torch.zeros(2), "n": torch.tensor(1)}])
    assert SoupCandidate.parse("run_a:checkpoint.pt") == SoupCandidate("run_a", "checkpoint.pt")
    with pytest.raises(ValueError, match="RUN or RUN"):
        SoupCandidate.parse("run_a:last.pt")


def test_soup_of_two_runs_from_one_start_point_is_written_as_an_exportable_run(tiny, tmp_path, monkeypatch):
    """`train soup`: two tiny whole-image runs from the same start; the soup's best.pt is the average of the
    kept members, its result.json exports like a trained run and metadata.json records the recipe."""
    from dataclasses import asdict

    import lesiontriage.train.classifier as clf
    from lesiontriage.networks.classifier import ClassifierConfig, LesionClassifier
    from lesiontriage.train.export import export_run
    from lesiontriage.train.soup import average_states, make_soup
    from lesiontriage.weights import read_metadata

    root, manifest = tiny
    start = LesionClassifier(ClassifierConfig.from_dict({"input_size": 64}), pretrained=False).state_dict()
    monkeypatch.setattr(clf, "load_shipped_state", lambda key: start)
    runs = tmp_path / "runs"
    for name, seed in (("whole_a", 1), ("whole_b", 2)):
        cfg = clf.ClassifierTrainConfig(name=name, mode="whole", network={"input_size": 64}, sources=["ham10000"],
                                        source_shares={"ham10000": 1.0}, epoch_samples=16, batch_size=8,
                                        warmup_epochs=0, epochs=1, num_workers=0, bf16=False, init_from="classifier",
                                        lr=0.05, head_lr=0.05, seed=seed, patience=5)
        out = clf.ClassifierTrainer(cfg, manifest_path=manifest, data_root=root).fit()
        out.update(config=asdict(cfg), command="test", manifest_hash="test")
        from lesiontriage.train.common import save_result
        save_result(runs / name, out)
    record, out = make_soup(["whole_a:checkpoint.pt", "whole_b:checkpoint.pt"], "whole_soup", command="soup (test)",
                            manifest_path=manifest, data_root=root, runs_dir=runs)
    assert {c["label"] for c in record.candidates} == {"whole_a:checkpoint.pt", "whole_b:checkpoint.pt"}
    assert record.ship == (len(record.members) == 2) and record.members[0] == record.best_single
    member_states = [torch.load(runs / m.split(":")[0] / "checkpoint.pt", weights_only=False)["model"]
                     for m in record.members]
    soup = torch.load(runs / "whole_soup" / "best.pt", weights_only=False)["model"]
    expected = average_states(member_states)
    assert all(torch.allclose(soup[k].float(), expected[k].float()) for k in expected)
    models_dir = tmp_path / "models"
    export_run("image-classifier", out, data_root=root, manifest_path=manifest, models_dir=models_dir)
    entry = read_metadata(models_dir)["models"]["image_classifier"]
    assert entry["training"]["soup"]["members"] == record.members
    assert entry["training"]["command"] == "soup (test)"
    # --uniform: every run averaged and marked for shipping (the product score judges it, not its own AUC)
    uni, _ = make_soup(["whole_a:checkpoint.pt", "whole_b:checkpoint.pt"], "whole_uniform", command="u",
                       manifest_path=manifest, data_root=root, runs_dir=runs, uniform=True)
    assert sorted(uni.members) == ["whole_a:checkpoint.pt", "whole_b:checkpoint.pt"] and uni.ship
    both = average_states([torch.load(runs / r / "checkpoint.pt", weights_only=False)["model"] for r in ("whole_a", "whole_b")])
    soup = torch.load(runs / "whole_uniform" / "best.pt", weights_only=False)["model"]
    assert all(torch.allclose(soup[k].float(), both[k].float()) for k in both)


def test_soup_refuses_runs_from_different_start_points(tiny, tmp_path):
    from lesiontriage.train.common import save_result
    from lesiontriage.train.soup import make_soup

    runs = tmp_path / "runs"
    base = {"network": {"input_size": 64}, "mode": "whole"}
    save_result(runs / "a", {"config": {**base, "init_from": "classifier"}})
    save_result(runs / "b", {"config": {**base, "init_from": ""}})
    with pytest.raises(ValueError, match="start point"):
        make_soup(["a", "b"], "s", command="t", runs_dir=runs)
    with pytest.raises(ValueError, match="at least two"):
        make_soup(["a", "a:best.pt"], "s", command="t", runs_dir=runs)


def test_cli_soup_needs_two_runs_and_fails_in_one_line():
    from typer.testing import CliRunner

    from lesiontriage.cli import app

    res = CliRunner().invoke(app, ["train", "soup", "--runs", "only_one_run"])
    assert res.exit_code == 1
    assert "at least two" in res.output and "Traceback" not in res.output


def test_rank_loss_compares_only_malignant_benign_pairs_of_one_stratum():
    from lesiontriage.train.classifier import within_stratum_rank_loss

    y = torch.tensor([1.0, 0.0, 1.0, 0.0])
    strata = torch.tensor([0, 0, 1, 1])
    # Stratum 0 is ordered right and stratum 1 wrong; the cross-stratum pairs (2 vs 1, 0 vs 3) must not count.
    z = torch.tensor([5.0, -5.0, -1.0, 1.0], requires_grad=True)
    loss = within_stratum_rank_loss(z, y, strata)
    expected = (torch.nn.functional.softplus(torch.tensor(-10.0)) + torch.nn.functional.softplus(torch.tensor(2.0))) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert z.grad[2] < 0 < z.grad[3]  # descent raises the misordered malignant photo, lowers its benign partner
    # Ordering every stratum right lowers the loss; a batch without a same-stratum pair gives 0 and a gradient.
    assert within_stratum_rank_loss(torch.tensor([5.0, -5.0, 3.0, -3.0]), y, strata) < loss
    lone = torch.tensor([2.0, -2.0], requires_grad=True)
    zero = within_stratum_rank_loss(lone, torch.tensor([1.0, 0.0]), torch.tensor([0, 1]))
    zero.backward()
    assert zero.item() == 0.0 and lone.grad is not None


def test_classifier_training_with_the_rank_loss_runs(tiny, tmp_path):
    from lesiontriage.train.classifier import ClassifierTrainConfig, ClassifierTrainer, IndexedSamples

    root, manifest = tiny
    cfg = ClassifierTrainConfig(name="tiny_rank", mode="whole", network={"input_size": 64}, sources=["ham10000"],
                                source_shares={"ham10000": 1.0}, epoch_samples=16, batch_size=8, warmup_epochs=0,
                                epochs=1, num_workers=0, bf16=False, rank_loss_weight=1.0)
    trainer = ClassifierTrainer(cfg, manifest_path=manifest, data_root=root)
    x, y, s, rows = next(iter(torch.utils.data.DataLoader(IndexedSamples(trainer.train_ds, list(range(8))),
                                                          batch_size=8)))
    trainer.model.eval()  # no dropout: the two losses see the same logits
    with_rank = trainer._loss(x, y, s, rows).item()
    trainer.cfg.rank_loss_weight = 0.0
    assert with_rank > trainer._loss(x, y, s, rows).item()  # the ranking term adds a positive amount
    trainer.cfg.rank_loss_weight = 1.0
    out = trainer.fit()
    assert np.isfinite(out["history"][-1]["train_loss"])
