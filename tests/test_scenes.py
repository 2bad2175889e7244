"""Synthetic wide-field scenes: determinism, box correctness, lesion sizes, split purity, marking.

Most tests run on a tiny data root generated here (demo-scene backgrounds + drawn lesion photos),
so they need no shared data; the last tests use the real data and manifest and skip without them.
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from lesiontriage import paths
from lesiontriage.data import blend, scenes
from lesiontriage.data.demo_scene import SYNTHETIC, make_demo_scene
from lesiontriage.errors import DataError

SKIN = (222, 170, 138)
LONG_SIDE = 512


# ---- fixture data root ----------------------------------------------------------------------------
def _lesion_photo(rng: np.random.Generator, size: int = 200) -> tuple[np.ndarray, list[float]]:
    """Textured skin with one dark irregular lesion near the centre; returns (rgb, tight box)."""
    img = np.empty((size, size, 3), np.float32)
    img[:] = SKIN
    img *= (1 + cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), 2) * 0.05)[..., None]
    alpha = np.zeros((size, size), np.float32)
    c = size // 2 + int(rng.integers(-10, 11))
    axes = (int(rng.integers(18, 32)), int(rng.integers(14, 26)))
    cv2.ellipse(alpha, (c, c), axes, float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
    colour = np.asarray(rng.choice([[80, 50, 40], [110, 60, 50], [60, 45, 55]]), np.float32)
    img = img * (1 - alpha[..., None]) + colour * alpha[..., None]
    ys, xs = np.nonzero(alpha > 0)
    return np.clip(img, 0, 255).astype(np.uint8), [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def _write(root: Path, rel: str, rgb: np.ndarray) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(p), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])


@pytest.fixture(scope="module")
def fake_data(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    """A data root with, per split: 2 wide-field backgrounds (with mole boxes), 4 boxed smartphone
    lesions and 2 unboxed clinical lesions; plus its manifest as a DataFrame."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    rows = []
    for si, split in enumerate(("train", "val", "test")):
        for k in range(2):
            rgb, boxes = make_demo_scene(seed=100 * si + k, size=(480, 360), n_lesions=3, stamp=False)
            rel = f"moles_widefield_roujiaw/images/{split}_bg{k}.jpg"
            _write(root, rel, rgb)
            rows.append(dict(path=rel, source="moles_widefield_roujiaw", modality="widefield", image_id=f"{split}_bg{k}",
                             diagnosis="OTHER", malignant=pd.NA, boxes=boxes, width=480, height=360, split=split))
        for k in range(6):
            rgb, box = _lesion_photo(rng)
            boxed = k < 4
            src, mod = ("pad_ufes20_subset", "smartphone") if boxed else ("derm7pt", "clinical")
            rel = f"{src}/images/{split}_les{k}.jpg"
            _write(root, rel, rgb)
            mal = k % 2
            rows.append(dict(path=rel, source=src, modality=mod, image_id=f"{split}_les{k}",
                             diagnosis="MEL" if mal else "NV", malignant=mal, boxes=[box] if boxed else [],
                             width=200, height=200, split=split))
    df = pd.DataFrame(rows)
    df["malignant"] = df["malignant"].astype("Int8")
    return root, df


@pytest.fixture(scope="module")
def fake_pools(fake_data) -> dict[str, scenes.ScenePools]:
    root, df = fake_data
    return {s: scenes.screen_pools(scenes.build_pools(df, s), root) for s in ("train", "val", "test")}


# ---- demo scene -----------------------------------------------------------------------------------
def test_demo_scene_is_deterministic_and_boxes_cover_every_spot():
    a, boxes, masks = make_demo_scene(seed=3, size=(800, 600), return_masks=True)
    b, boxes_b = make_demo_scene(seed=3, size=(800, 600))
    c, _ = make_demo_scene(seed=4, size=(800, 600))
    assert SYNTHETIC is True
    assert a.shape == (600, 800, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and boxes == boxes_b
    assert not np.array_equal(a, c)
    assert 3 <= len(boxes) == len(masks) <= 8
    for (x1, y1, x2, y2), (mx, my, alpha) in zip(boxes, masks):
        ys, xs = np.nonzero(alpha >= 0.25)
        # every drawn pixel of opacity >= 0.25 lies in the box, and the box is tight around them
        assert xs.min() + mx >= x1 and xs.max() + mx + 1 <= x2 and ys.min() + my >= y1 and ys.max() + my + 1 <= y2
        assert (x2 - x1) - (xs.max() - xs.min() + 1) <= 1 and (y2 - y1) - (ys.max() - ys.min() + 1) <= 1
        assert max(x2 - x1, y2 - y1) <= 0.1 * 800
        # a spot is visible: its colour differs from the skin around it
        pad = int(max(x2 - x1, y2 - y1))
        wx0, wy0 = max(0, int(x1) - pad), max(0, int(y1) - pad)
        win = a[wy0:int(y2) + pad, wx0:int(x2) + pad]
        m = np.zeros(win.shape[:2], np.uint8)
        m[my - wy0:my - wy0 + alpha.shape[0], mx - wx0:mx - wx0 + alpha.shape[1]] = alpha[:win.shape[0] - (my - wy0), :win.shape[1] - (mx - wx0)] >= 0.5
        assert blend.lesion_contrast(win, m) > 8
    for i, p in enumerate(boxes):  # non-overlapping
        for q in boxes[i + 1:]:
            assert p[2] <= q[0] or q[2] <= p[0] or p[3] <= q[1] or q[3] <= p[1]


def test_demo_scene_phone_size_and_bad_size():
    rgb, boxes = make_demo_scene(seed=1, size=(2000, 1500))
    assert rgb.shape == (1500, 2000, 3) and boxes
    with pytest.raises(ValueError, match="too small"):
        make_demo_scene(size=(10, 10))


def test_demo_closeup_is_one_lesion_large_enough_for_the_closeup_blend():
    """The bench's close-up shot (bench.BENCH_SHOTS) must reach the close-up path: one box over the blend's gate."""
    from lesiontriage.bench import BENCH_SHOTS
    from lesiontriage.hybrid import largest_box_fraction

    shot = {**BENCH_SHOTS["closeup_4032x3024"], "size": (1008, 756)}  # same geometry, a quarter of the side
    for seed in range(3):
        rgb, boxes = make_demo_scene(seed=seed, **shot)
        assert len(boxes) == 1 and largest_box_fraction(boxes, 1008, 756) > 0.05  # the soft gate starts at 0.02
    _, small = make_demo_scene(seed=0, size=(1008, 756), n_lesions=1)
    assert largest_box_fraction(small, 1008, 756) < 0.02  # the default spots stay mole-sized


# ---- pixel operations -----------------------------------------------------------------------------
def test_segment_lesion_finds_the_drawn_blob_and_refuses_a_frame_filling_one():
    rng = np.random.default_rng(5)
    rgb, box = _lesion_photo(rng)
    seg = blend.segment_lesion(rgb)
    truth = np.zeros(rgb.shape[:2], bool)
    truth[int(box[1]):int(box[3]), int(box[0]):int(box[2])] = True
    bb = blend.mask_bbox(seg.mask)
    assert seg.method == "otsu"
    # covers the whole lesion (a box must never cut it), with at most a thin margin of skin
    assert bb[0] <= box[0] + 1 and bb[1] <= box[1] + 1 and bb[2] >= box[2] - 1 and bb[3] >= box[3] - 1
    assert max(box[0] - bb[0], box[1] - bb[1], bb[2] - box[2], bb[3] - box[3]) <= 0.15 * max(box[2] - box[0], box[3] - box[1])
    # with the annotated box the mask never leaves the box and spans it
    seg_b = blend.segment_lesion(rgb, tuple(box))
    assert not (seg_b.mask.astype(bool) & ~truth).any()
    # a lesion running off the photo has no trustworthy extent
    big = np.full((120, 160, 3), SKIN, np.uint8)
    cv2.circle(big, (80, 60), 90, (70, 45, 40), -1)
    assert blend.segment_lesion(big).method == "ellipse"


def test_paste_blends_inside_works_at_the_corner_and_falls_back_to_alpha():
    canvas = np.full((100, 100, 3), SKIN, np.uint8)
    patch = np.full((20, 20, 3), SKIN, np.uint8)
    cv2.circle(patch, (10, 10), 6, (70, 45, 40), -1)
    clone = np.zeros((20, 20), np.uint8)
    cv2.circle(clone, (10, 10), 9, 1, -1)
    assert blend.paste(canvas, patch, clone, 40, 40) == "seamless_normal"
    assert canvas[50, 50].mean() < 120 and canvas[5, 5].tolist() == list(SKIN)
    corner = np.full((100, 100, 3), SKIN, np.uint8)
    assert blend.paste(corner, patch, np.ones((20, 20), np.uint8), 0, 0).startswith("seamless")
    assert corner[10, 10].mean() < 120
    tiny = np.full((100, 100, 3), SKIN, np.uint8)  # too small for Poisson blending
    assert blend.paste(tiny, patch[7:13, 7:13], np.ones((6, 6), np.uint8), 50, 50) == "alpha"
    assert tiny[53, 53].mean() < tiny[20, 20].mean()
    with pytest.raises(ValueError, match="leaves"):
        blend.paste(canvas, patch, clone, 90, 90)


def test_skin_mask_rejects_grey_wall_and_hair():
    wall = np.full((40, 40, 3), (229, 219, 216), np.uint8)
    skin = np.full((40, 40, 3), (239, 188, 155), np.uint8)
    assert not blend.skin_mask(wall).any()
    assert blend.skin_mask(skin).mean() > 0.9


# ---- composed scenes on the fixture data ------------------------------------------------------------
def _cfg(split: str, seed: int = 7) -> scenes.SceneConfig:
    return scenes.SceneConfig(split=split, seed=seed, long_side=LONG_SIDE)


def test_boxes_cover_pasted_lesions_and_sizes(fake_data, fake_pools):
    root, _ = fake_data
    n_checked = 0
    for i in range(6):
        sc = scenes.compose_scene(fake_pools["train"], root, _cfg("train"), i, keep_debug=True)
        H, W = sc.image.shape[:2]
        S = max(H, W)
        assert 0.8 * LONG_SIDE - 1 <= S <= 1.3 * LONG_SIDE + 1
        pasted = [les for les in sc.lesions if les.kind == "pasted"]
        assert 1 <= len(pasted) <= 8
        cover = np.zeros((H, W), bool)
        for les in pasted:
            x1, y1, x2, y2 = (int(round(v)) for v in les.box)
            assert 0 <= x1 < x2 <= W and 0 <= y1 < y2 <= H
            # the box is exactly the bounding box of the pasted lesion mask
            assert les.mask.shape == (y2 - y1, x2 - x1)
            assert les.mask[0].any() and les.mask[-1].any() and les.mask[:, 0].any() and les.mask[:, -1].any()
            assert 0.01 <= max(x2 - x1, y2 - y1) / S <= 0.10
            assert les.contrast is not None and les.contrast >= 6.0
            cover[max(0, y1 - 2):y2 + 2, max(0, x1 - 2):x2 + 2] = True
            n_checked += 1
        # pixels the pasting changed strongly (the lesions) all lie inside the boxes
        diff = np.abs(sc.clean.astype(int) - sc.backdrop.astype(int)).max(axis=2) > 50
        assert diff.any()
        assert (diff & ~cover).sum() <= 0.002 * diff.sum(), f"scene {i}: lesion pixels outside boxes"
        # background moles keep the source annotation, labelled benign-unknown
        for les in sc.lesions:
            if les.kind == "background_mole":
                assert les.diagnosis == "OTHER" and les.malignant is None and les.source == "moles_widefield_roujiaw"
    assert n_checked >= 6


def test_generation_is_deterministic_and_independent_of_workers(fake_data, tmp_path):
    root, df = fake_data
    a = scenes.generate_scenes(3, seed=5, split="val", out_dir=tmp_path / "a", manifest=df, data_root=root, long_side=LONG_SIDE, workers=1)
    b = scenes.generate_scenes(3, seed=5, split="val", out_dir=tmp_path / "b", manifest=df, data_root=root, long_side=LONG_SIDE, workers=2)
    c = scenes.generate_scenes(2, seed=6, split="val", out_dir=tmp_path / "c", manifest=df, data_root=root, long_side=LONG_SIDE)
    names = sorted(p.name for p in (tmp_path / "a").glob("scene_*.jpg"))
    assert names == [f"scene_val_5_{i:05d}.jpg" for i in range(3)]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "scenes.parquet").read_bytes() == (tmp_path / "b" / "scenes.parquet").read_bytes()
    pd.testing.assert_frame_equal(a.index, b.index)
    assert (tmp_path / "c" / "scene_val_6_00000.jpg").read_bytes() != (tmp_path / "a" / "scene_val_5_00000.jpg").read_bytes()
    assert len(c.index) == 2


def test_index_is_marked_synthetic_and_split_pure(fake_data, tmp_path):
    root, df = fake_data
    split_of = dict(zip(df["path"], df["split"]))
    for split in ("train", "test"):
        res = scenes.generate_scenes(4, seed=1, split=split, out_dir=tmp_path / split, manifest=df, data_root=root, long_side=LONG_SIDE)
        idx = scenes.load_scene_index(res.index_path)
        assert (idx["synthetic"] == True).all() and (idx["modality"] == "synthetic_widefield").all()  # noqa: E712
        assert (idx["split"] == split).all()
        assert "SYNTHETIC" in (tmp_path / split / "SYNTHETIC.txt").read_text()
        for _, r in idx.iterrows():
            assert Path(r["path"]).name.startswith(f"scene_{split}_") and Path(r["abs_path"]).is_file()
            n = len(r["boxes"])
            for col in ("box_kind", "box_diagnosis", "box_malignant", "box_source", "box_image_id", "box_path"):
                assert len(r[col]) == n
            assert split_of[r["background_path"]] == split
            assert all(split_of[p] == split for p in r["box_path"])  # no lesion from another split
            h, w = cv2.imread(r["abs_path"]).shape[:2]
            assert (w, h) == (r["width"], r["height"])
            for (x1, y1, x2, y2), kind, mal in zip(r["boxes"], r["box_kind"], r["box_malignant"]):
                assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
                assert kind in ("pasted", "background_mole")
                assert (mal is None) == (kind == "background_mole")


def test_bad_inputs_give_clear_errors(fake_data, tmp_path):
    root, df = fake_data
    pad_only = df[df["source"] == "pad_ufes20_subset"]
    with pytest.raises(DataError, match="background"):  # no wide-field photo, no boxed close-up
        scenes.build_pools(pad_only.assign(boxes=[[] for _ in range(len(pad_only))]), "val")
    with pytest.raises(DataError, match="split"):
        scenes.build_pools(df, "holdout")
    with pytest.raises(DataError, match="not found"):
        scenes.load_scene_index(tmp_path / "nowhere" / "scenes.parquet")
    # a missing image is skipped by the screening, not a crash
    broken = df.copy()
    broken.loc[(broken["split"] == "val") & (broken["source"] == "derm7pt"), "path"] = "derm7pt/images/missing.jpg"
    pools = scenes.screen_pools(scenes.build_pools(broken, "val"), root)
    assert all(r["path"] != "derm7pt/images/missing.jpg" for rows in pools.lesions.values() for r in rows)


def test_cli_scenes_rejects_unknown_split():
    from typer.testing import CliRunner

    from lesiontriage.cli import app

    res = CliRunner().invoke(app, ["data", "scenes", "--n", "1", "--split", "holdout"])
    assert res.exit_code == 1
    assert "holdout" in res.output and "Traceback" not in res.output


# ---- real data --------------------------------------------------------------------------------------
needs_data = pytest.mark.skipif(not (paths.data_available() and paths.DEFAULT_MANIFEST.is_file()),
                                reason="shared data or runs/data/manifest.parquet absent")


def _small_real_pools(split: str, per_key: int = 25) -> scenes.ScenePools:
    from lesiontriage.data.manifest import load_manifest

    pools = scenes.build_pools(load_manifest(), split)
    rng = np.random.default_rng(0)  # a subset keeps the screening fast
    sub = lambda rows: [rows[i] for i in sorted(rng.choice(len(rows), min(per_key, len(rows)), replace=False))]  # noqa: E731
    return scenes.screen_pools(scenes.ScenePools(split, {k: sub(v) for k, v in pools.backgrounds.items()},
                                                 {k: sub(v) for k, v in pools.lesions.items()}))


@needs_data
@pytest.mark.parametrize("split", ["train", "test"])
def test_real_scenes_are_split_pure_and_boxes_cover(split):
    from lesiontriage.data.manifest import load_manifest

    m = load_manifest()
    split_of = dict(zip(m["path"], m["split"]))
    pools = _small_real_pools(split)
    for i in range(2):
        sc = scenes.compose_scene(pools, paths.data_root(), scenes.SceneConfig(split=split, seed=11, long_side=1024), i, keep_debug=True)
        H, W = sc.image.shape[:2]
        assert split_of[sc.background["path"]] == split
        for les in sc.lesions:
            assert split_of[les.path] == split
            if les.kind == "pasted":
                x1, y1, x2, y2 = (int(round(v)) for v in les.box)
                assert les.mask.shape == (y2 - y1, x2 - x1) and les.mask[0].any() and les.mask[:, -1].any()
                assert 0.01 <= max(x2 - x1, y2 - y1) / max(H, W) <= 0.10
                assert les.malignant in (0, 1) and les.diagnosis != "OTHER"


@needs_data
def test_shipped_scene_index_if_built_is_consistent():
    """When runs/scenes/<split>/scenes.parquet exists, it is split-pure against the manifest."""
    from lesiontriage.data.manifest import load_manifest

    built = [s for s in ("val", "test") if (paths.RUNS_DIR / "scenes" / s / "scenes.parquet").is_file()]
    if not built:
        pytest.skip("no scene sets built yet")
    m = load_manifest()
    split_of = dict(zip(m["path"], m["split"]))
    for split in built:
        idx = scenes.load_scene_index(paths.RUNS_DIR / "scenes" / split)
        assert (idx["synthetic"] == True).all()  # noqa: E712
        bad = [p for ps in idx["box_path"] for p in ps if split_of.get(p) != split]
        bad += [p for p in idx["background_path"] if split_of.get(p) != split]
        assert not bad, f"{split}: {len(bad)} parts from other splits, e.g. {bad[:3]}"
        degr = json.loads(idx["degradation"].iloc[0])
        assert 70 <= degr["jpeg_quality"] <= 92
