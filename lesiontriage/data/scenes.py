"""SYNTHETIC wide-field phone photos with several labelled lesions, composed from real parts.

Why: the product's main use case (one phone photo of a back with several lesions of known
malignancy) has no annotated real data. We compose it: a real skin background (the wide-field
mole photos, whose annotated moles stay as benign-unknown lesions, or a clinical photo whose own
lesion is inpainted away), real labelled lesions (clinical, smartphone and dermoscopic crops from
the manifest) pasted onto skin with Poisson blending after a LAB colour match, and phone-like
degradation (lighting, white balance, defocus, noise, JPEG).

Guarantees (tested in tests/test_scenes.py):

* split purity: a ``train`` scene uses only manifest ``train`` rows (background and lesions),
  ``val`` only ``val``, ``test`` only ``test``;
* determinism: scene ``i`` of ``(split, seed, long_side)`` depends on nothing else (not on the
  number of workers or ``n``): same arguments, same JPEG bytes and the same index;
* every box is the bounding box of the pasted lesion's mask, in scene pixels; a pasted lesion's
  long side is 1-10% of the photo's long side (background moles keep their annotated size);
* everything is marked synthetic: file names start with ``scene_``, the index has
  ``synthetic=True`` and ``modality='synthetic_widefield'``, the folder holds ``SYNTHETIC.txt``.

Output (``lesiontriage data scenes``; default folder ``runs/scenes/<split>/``):
``scene_<split>_<seed>_<i:05d>.jpg`` and ``scenes.parquet`` with one row per scene. ``path`` is
the file name *relative to the folder holding scenes.parquet* (use :func:`load_scene_index`, which
adds ``abs_path``). Per-box lists (same order as ``boxes``): ``box_kind`` (``pasted`` or
``background_mole``), ``box_diagnosis``, ``box_malignant`` (1 / 0 / null), ``box_source``,
``box_image_id``, ``box_path`` (manifest path), ``box_blend``.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import multiprocessing as mp
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from lesiontriage import paths
from lesiontriage.data import blend
from lesiontriage.data.schema import SPLITS
from lesiontriage.errors import DataError

log = logging.getLogger(__name__)

GENERATOR_VERSION = "scenes-1"
INDEX_NAME = "scenes.parquet"
README_NAME = "SYNTHETIC.txt"
MODALITY = "synthetic_widefield"
LESION_MODALITIES: tuple[str, ...] = ("clinical", "smartphone", "dermoscopy")
# Background sources and their share of scenes. derm7pt: clinical photos only. The wide-field photos
# dominate: close-ups upscaled to phone size are skin seen at 5-7x the magnification of a wide-field
# photo, plausible only as 'close-up with a few small spots'.
BACKGROUND_WEIGHTS: dict[str, float] = {"moles_widefield_roujiaw": 0.80, "derm7pt": 0.07, "pad_ufes20_subset": 0.13}
# Lesion modality shares (dermoscopic crops look least like a phone photo, so they are not the majority).
LESION_MODALITY_WEIGHTS: dict[str, float] = {"clinical": 0.35, "smartphone": 0.30, "dermoscopy": 0.35}
_SPLIT_CODE = {s: i for i, s in enumerate(SPLITS)}


# ---- configuration and results ------------------------------------------------------------------
@dataclass(frozen=True)
class SceneConfig:
    """Everything that decides a scene besides the data. Recorded in SYNTHETIC.txt."""

    split: str = "train"
    seed: int = 0
    long_side: int = 2048                              # nominal long side (px) of a scene
    long_side_jitter: tuple[float, float] = (0.8, 1.3)  # per-scene factor: scale diversity
    max_aspect: float = 1.8
    lesions: tuple[int, int] = (1, 8)                  # pasted lesions per scene (inclusive)
    lesion_frac: tuple[float, float] = (0.012, 0.085)  # pasted lesion long side / scene long side (log-uniform)
    malignant_share: float = 0.4
    mixed_clone_share: float = 0.0    # MIXED_CLONE often leaves a faint ghost of the lesion
    min_contrast: float = 6.0         # delta E below which a pasted lesion is removed again

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if self.long_side < 256:
            raise ValueError(f"long_side {self.long_side} is too small (minimum 256)")
        lo, hi = self.lesion_frac
        if not (0.01 <= lo <= hi and hi * 1.1 <= 0.1 + 1e-9):  # 1.1: the aspect jitter
            raise ValueError(f"lesion_frac {self.lesion_frac} must keep lesions within 1-10% of the side")


@dataclass
class SceneLesion:
    """One labelled box of a scene. ``mask`` (bool, box-sized) only when asked for (tests)."""

    box: list[float]
    kind: str                 # 'pasted' | 'background_mole'
    diagnosis: str
    malignant: int | None
    source: str
    image_id: str
    path: str
    blend: str = ""
    contrast: float | None = None  # delta E lesion vs ring after blending (pasted only)
    mask: np.ndarray | None = None


@dataclass
class Scene:
    index: int
    name: str
    image: np.ndarray         # final RGB uint8 (before JPEG)
    lesions: list[SceneLesion]
    background: dict
    degradation: blend.Degradation
    clean: np.ndarray | None = None       # composite before degradation (keep_debug)
    backdrop: np.ndarray | None = None    # prepared background before pasting (keep_debug)


@dataclass
class ScenesResult:
    out_dir: Path
    index_path: Path
    index: pd.DataFrame
    seconds: float
    workers: int
    config: SceneConfig = field(default_factory=SceneConfig)


# ---- pools --------------------------------------------------------------------------------------
@dataclass
class ScenePools:
    """Manifest rows one split may draw from, as plain dicts (cheap to send to worker processes)."""

    split: str
    backgrounds: dict[str, list[dict]]                # source -> rows
    lesions: dict[tuple[int, str], list[dict]]        # (malignant, modality) -> rows

    def describe(self) -> dict:
        return {"backgrounds": {k: len(v) for k, v in self.backgrounds.items()},
                "lesions": {f"{'malignant' if m else 'benign'}/{mod}": len(v) for (m, mod), v in self.lesions.items()}}


def _row_dict(r: pd.Series) -> dict:
    boxes = r["boxes"] if r["boxes"] is not None else []
    mal = r["malignant"]
    return {"path": str(r["path"]), "source": str(r["source"]), "modality": str(r["modality"]),
            "image_id": str(r["image_id"]), "diagnosis": str(r["diagnosis"]),
            "malignant": None if pd.isna(mal) else int(mal),
            "boxes": [[float(v) for v in b] for b in boxes], "width": int(r["width"]), "height": int(r["height"])}


def _box_ok(b: list[float], w: int, h: int) -> bool:
    """A boxed lesion we can crop with a skin rim: margin >= 12% of its side, area < half the photo."""
    side = max(b[2] - b[0], b[3] - b[1])
    margin = min(b[0], b[1], w - b[2], h - b[3])
    return side >= 6 and margin >= 0.12 * side and (b[2] - b[0]) * (b[3] - b[1]) < 0.5 * w * h


def build_pools(manifest: pd.DataFrame, split: str) -> ScenePools:
    """Backgrounds and lesions of ``split`` only (the leakage guarantee starts here)."""
    if split not in SPLITS:
        raise DataError(f"split {split!r}: choose one of {', '.join(SPLITS)}")
    df = manifest[manifest["split"] == split].sort_values("path", kind="stable")
    backgrounds: dict[str, list[dict]] = {}
    for src in BACKGROUND_WEIGHTS:
        sel = df[df["source"] == src]
        if src == "derm7pt":
            sel = sel[sel["modality"] == "clinical"]
        if src == "pad_ufes20_subset":  # the photo's own lesion must leave room for skin
            sel = sel[[bool(bs) and (bs[0][2] - bs[0][0]) * (bs[0][3] - bs[0][1]) < 0.1 * w * h
                       for bs, w, h in zip(sel["boxes"], sel["width"], sel["height"])]]
        rows = [_row_dict(r) for _, r in sel.iterrows()]
        if rows:
            backgrounds[src] = rows
    lesions: dict[tuple[int, str], list[dict]] = {}
    cand = df[df["modality"].isin(LESION_MODALITIES) & df["malignant"].notna() & (df["diagnosis"] != "OTHER")]
    for _, r in cand.iterrows():
        d = _row_dict(r)
        if d["boxes"] and not _box_ok(d["boxes"][0], d["width"], d["height"]):
            continue
        lesions.setdefault((d["malignant"], d["modality"]), []).append(d)
    if not backgrounds:
        raise DataError(f"manifest has no {split} background photos ({', '.join(BACKGROUND_WEIGHTS)})")
    if not lesions:
        raise DataError(f"manifest has no {split} lesion photos with a diagnosis")
    return ScenePools(split, backgrounds, lesions)


def _mp_context():
    """fork where available: no re-import of the caller's __main__ (scripts without a main guard
    work) and fast start; the workers only run numpy / OpenCV code."""
    methods = mp.get_all_start_methods()
    return mp.get_context("fork" if "fork" in methods else "spawn")


# ---- reading ------------------------------------------------------------------------------------
def _read_rgb(rel: str, data_root: Path) -> np.ndarray:
    p = data_root / rel
    img = cv2.imread(str(p), cv2.IMREAD_COLOR)
    if img is None:
        raise DataError(f"{p}: cannot read image (missing or not an image)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _lesion_source_image(row: dict, data_root: Path) -> np.ndarray:
    img = _read_rgb(row["path"], data_root)
    if row["source"] == "sd198_tumour_subset":  # drop the DermQuest banner at the bottom
        img = img[: int(img.shape[0] * 0.86)]
    return img


def _lesion_hole(img: np.ndarray, box: tuple | None) -> np.ndarray | None:
    """The region to remove from a close-up: its lesion, generously dilated (the redness and
    shadow around a lesion reach beyond the annotated box). None when the lesion is not delimited
    or too large (> 15% of the photo), or when no lesion-free window of the hole's size exists
    to cover it with."""
    h, w = img.shape[:2]
    seg = blend.segment_lesion(img, box)
    if box is None and seg.method != "otsu":
        return None
    bb = blend.mask_bbox(seg.mask)
    if bb is None or (bb[2] - bb[0]) * (bb[3] - bb[1]) > 0.15 * w * h:
        return None
    k = max(3, int(0.3 * max(bb[2] - bb[0], bb[3] - bb[1])))
    hole = cv2.dilate(seg.mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * k + 1, 2 * k + 1)))
    hb = blend.mask_bbox(hole)
    if blend.clear_windows(hole, hb[2] - hb[0], hb[3] - hb[1]) is None:
        return None
    return hole


def _clinical_background_ok(img: np.ndarray, box: tuple | None) -> bool:
    """A close-up can serve as background when its own lesion can be removed (see
    :func:`_lesion_hole`) and the rest is skin without rulers, black frames or white cards."""
    if _lesion_hole(img, box) is None:
        return False
    L = cv2.cvtColor(img, cv2.COLOR_RGB2LAB)[..., 0]
    return blend.skin_mask(img).mean() >= 0.6 and ((L > 235) | (L < 40)).mean() <= 0.03


def _screen_one(task: tuple[str, dict, str]) -> bool:
    """Can this row be used (deterministic, image-based)? Unreadable files are skipped, logged."""
    kind, row, root = task
    if kind == "lesion" and row["boxes"]:
        return True  # annotated: usable when _box_ok (checked without reading)
    if kind == "background" and row["source"] == "moles_widefield_roujiaw":
        return True
    try:
        img = _lesion_source_image(row, Path(root)) if kind == "lesion" else _read_rgb(row["path"], Path(root))
    except DataError as exc:
        log.warning("skipping %s", exc)
        return False
    if kind == "lesion":
        return blend.segment_lesion(img).method == "otsu"
    return _clinical_background_ok(img, tuple(row["boxes"][0]) if row["boxes"] else None)


def screen_pools(pools: ScenePools, data_root: str | Path | None = None, workers: int = 1) -> ScenePools:
    """Keep the rows a scene can really use: unannotated lesions only when a clear blob is found
    (a box must cover the whole lesion), clinical backgrounds only when clean. Deterministic."""
    root = str(paths.data_root(data_root))
    tasks = [("background", r, root) for rows in pools.backgrounds.values() for r in rows]
    tasks += [("lesion", r, root) for rows in pools.lesions.values() for r in rows]
    if workers > 1:
        with cf.ProcessPoolExecutor(workers, mp_context=_mp_context(), initializer=cv2.setNumThreads, initargs=(1,)) as ex:
            ok = list(ex.map(_screen_one, tasks, chunksize=64))
    else:
        ok = [_screen_one(t) for t in tasks]
    keep = {id(t[1]) for t, o in zip(tasks, ok) if o}
    backgrounds = {k: [r for r in v if id(r) in keep] for k, v in pools.backgrounds.items()}
    lesions = {k: [r for r in v if id(r) in keep] for k, v in pools.lesions.items()}
    backgrounds = {k: v for k, v in backgrounds.items() if v}
    lesions = {k: v for k, v in lesions.items() if v}
    if not backgrounds or not lesions:
        raise DataError(f"no usable {pools.split} {'backgrounds' if not backgrounds else 'lesions'} after screening the images under {root}")
    return ScenePools(pools.split, backgrounds, lesions)


def _weighted_choice(rng: np.random.Generator, weights: dict) -> object:
    keys = list(weights)
    w = np.asarray([weights[k] for k in keys], float)
    return keys[int(rng.choice(len(keys), p=w / w.sum()))]


# ---- backgrounds --------------------------------------------------------------------------------
@dataclass
class _Background:
    image: np.ndarray             # scene-sized RGB
    skin_small: np.ndarray        # bool skin mask at 1/_SKIN_DS scale
    moles: list[list[float]]      # background-mole boxes in scene pixels
    row: dict
    upscale: float


_SKIN_DS = 8


def _prepare_background(row: dict, data_root: Path, long_side: int, max_aspect: float,
                        rng: np.random.Generator) -> _Background | None:
    """Load, clean (inpaint a clinical photo's own lesion), flip, crop to a phone aspect, upscale.
    Returns None when the photo has too little skin to carry lesions."""
    img = _read_rgb(row["path"], data_root)
    h, w = img.shape[:2]
    moles = [list(b) for b in row["boxes"]] if row["source"] == "moles_widefield_roujiaw" else []
    clinical = row["source"] != "moles_widefield_roujiaw"
    if clinical:  # a close-up: remove its own lesion (covered with its own skin) and its hairs
        box = tuple(row["boxes"][0]) if row["boxes"] else None
        hole = _lesion_hole(img, box)
        if hole is None:
            return None
        img = blend.remove_hair(img)
        filled = blend.fill_from_skin(img, hole, rng)
        if filled is None:
            return None
        img = cv2.bilateralFilter(filled, 5, 20, 5)
    if rng.random() < 0.5:
        img = img[:, ::-1].copy()
        moles = [[w - b[2], b[1], w - b[0], b[3]] for b in moles]
    # crop an extreme aspect to at most max_aspect; moles whose centre leaves the crop are dropped
    if max(w, h) / min(w, h) > max_aspect:
        if w > h:
            cw, ch = int(h * max_aspect), h
        else:
            cw, ch = w, int(w * max_aspect)
        ox, oy = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        img = img[oy:oy + ch, ox:ox + cw].copy()
        kept = []
        for b in moles:
            cx, cy = (b[0] + b[2]) / 2 - ox, (b[1] + b[3]) / 2 - oy
            if 0 <= cx < cw and 0 <= cy < ch:
                kept.append([max(0.0, b[0] - ox), max(0.0, b[1] - oy), min(float(cw), b[2] - ox), min(float(ch), b[3] - oy)])
        moles, w, h = kept, cw, ch
    skin = blend.skin_mask(img)
    if skin.mean() < (0.6 if clinical else 0.3):
        return None
    f = long_side / max(w, h)
    W, H = int(round(w * f)), int(round(h * f))
    big = cv2.resize(img, (W, H), interpolation=cv2.INTER_CUBIC)
    if not clinical:  # a light unsharp mask: cubic upscaling alone looks smeared
        big = np.clip(big.astype(np.float32) * 1.3 - cv2.GaussianBlur(big, (0, 0), 0.6 * f).astype(np.float32) * 0.3, 0, 255).astype(np.uint8)
    skin_small = cv2.resize(skin.astype(np.uint8), (max(1, W // _SKIN_DS), max(1, H // _SKIN_DS)), interpolation=cv2.INTER_NEAREST) > 0
    moles = [[b[0] * f, b[1] * f, b[2] * f, b[3] * f] for b in moles]
    return _Background(big, skin_small, moles, row, f)


# ---- lesion patches -----------------------------------------------------------------------------
@dataclass
class _Patch:
    rgb: np.ndarray           # patch pixels (lesion + skin rim)
    lesion: np.ndarray        # uint8 0/1: the lesion (its bbox is the scene box)
    ring_stats: tuple | None  # LAB stats of the peri-lesional skin
    row: dict


def _lesion_patch(row: dict, data_root: Path, rng: np.random.Generator) -> _Patch | None:
    """Crop a labelled lesion with a skin rim, flipped and rotated at random, at source resolution.
    None when the lesion cannot be delimited (unboxed photo whose lesion fills the frame)."""
    img = _lesion_source_image(row, data_root)
    h, w = img.shape[:2]
    box = tuple(row["boxes"][0]) if row["boxes"] else None
    seg = blend.segment_lesion(img, box)
    if box is None and seg.method != "otsu":
        return None  # no annotation and no clear blob: the extent would be a guess
    bb = blend.mask_bbox(seg.mask)
    if bb is None:
        return None
    side = max(bb[2] - bb[0], bb[3] - bb[1])
    if side < 6:
        return None
    m = int(0.6 * side) + 2
    x1, y1, x2, y2 = max(0, bb[0] - m), max(0, bb[1] - m), min(w, bb[2] + m), min(h, bb[3] + m)
    patch, mask = img[y1:y2, x1:x2], seg.mask[y1:y2, x1:x2]
    if rng.random() < 0.5:
        patch, mask = patch[:, ::-1], mask[:, ::-1]
    # rotate about the lesion centre; the reflected border only ever lands in the skin rim
    ph, pw = patch.shape[:2]
    ang = float(rng.uniform(0, 360))
    rot = cv2.getRotationMatrix2D((pw / 2, ph / 2), ang, 1.0)
    cos, sin = abs(rot[0, 0]), abs(rot[0, 1])
    nw, nh = int(pw * cos + ph * sin) + 1, int(pw * sin + ph * cos) + 1
    rot[0, 2] += nw / 2 - pw / 2
    rot[1, 2] += nh / 2 - ph / 2
    patch = cv2.warpAffine(np.ascontiguousarray(patch), rot, (nw, nh), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    mask = (cv2.warpAffine(np.ascontiguousarray(mask).astype(np.float32), rot, (nw, nh), flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=0) >= 0.5).astype(np.uint8)
    bb = blend.mask_bbox(mask)
    if bb is None:
        return None
    side = max(bb[2] - bb[0], bb[3] - bb[1])
    rim = int(0.3 * side) + 2
    x1, y1 = max(0, bb[0] - rim), max(0, bb[1] - rim)
    x2, y2 = min(nw, bb[2] + rim), min(nh, bb[3] + rim)
    patch, mask = patch[y1:y2, x1:x2], mask[y1:y2, x1:x2]
    # peri-lesional skin: a ring around the lesion, without dark vignette / black-frame pixels
    k1, k2 = max(1, int(0.08 * side)), max(2, int(0.28 * side))
    near = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * k1 + 1, 2 * k1 + 1)))
    far = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * k2 + 1, 2 * k2 + 1)))
    ring = (far > 0) & (near == 0)
    L = cv2.cvtColor(np.ascontiguousarray(patch), cv2.COLOR_RGB2LAB)[..., 0]
    rim_px = L[(near > 0) & (mask == 0)]
    if rim_px.size and ((rim_px > 235) | (rim_px < 35)).mean() > 0.02:
        return None  # ruler ticks, frame edges or glare next to the lesion would be pasted too
    ring &= (L > 60) & (L < 250)
    return _Patch(np.ascontiguousarray(patch), np.ascontiguousarray(mask), blend.lab_stats(np.ascontiguousarray(patch), ring.astype(np.uint8)), row)


def _pick_lesion_row(pools: ScenePools, cfg: SceneConfig, rng: np.random.Generator) -> dict:
    mal = 1 if rng.random() < cfg.malignant_share else 0
    mods = {mod: wt for mod, wt in LESION_MODALITY_WEIGHTS.items() if pools.lesions.get((mal, mod))}
    if not mods:  # this split lacks that class: take the other
        mal = 1 - mal
        mods = {mod: wt for mod, wt in LESION_MODALITY_WEIGHTS.items() if pools.lesions.get((mal, mod))}
    mod = _weighted_choice(rng, mods)
    rows = pools.lesions[(mal, mod)]
    return rows[int(rng.integers(len(rows)))]


# ---- composition --------------------------------------------------------------------------------
def _overlaps(b: list[float], taken: Iterable[list[float]], gap: float) -> bool:
    return any(b[0] - gap < t[2] and t[0] < b[2] + gap and b[1] - gap < t[3] and t[1] < b[3] + gap for t in taken)


def scene_name(split: str, seed: int, index: int) -> str:
    return f"scene_{split}_{seed}_{index:05d}.jpg"


def _scene_rng(cfg: SceneConfig, index: int) -> np.random.Generator:
    """Scene ``index`` has its own stream: independent of n, of workers, of other scenes."""
    return np.random.default_rng(np.random.SeedSequence([int(cfg.seed), _SPLIT_CODE[cfg.split], int(index), 20261124]))


def compose_scene(pools: ScenePools, data_root: Path, cfg: SceneConfig, index: int,
                  keep_debug: bool = False) -> Scene:
    """Build scene ``index`` of ``cfg`` (deterministic). ``keep_debug`` keeps masks and the
    undegraded composite for tests."""
    rng = _scene_rng(cfg, index)
    long_side = int(round(cfg.long_side * rng.uniform(*cfg.long_side_jitter)))
    bg = None
    for _ in range(30):
        # a source's share shrinks when few of its photos are usable (no photo repeated 50 times)
        src = _weighted_choice(rng, {s: BACKGROUND_WEIGHTS[s] * min(1.0, len(v) / 15) for s, v in pools.backgrounds.items()})
        rows = pools.backgrounds[src]
        bg = _prepare_background(rows[int(rng.integers(len(rows)))], data_root, long_side, cfg.max_aspect, rng)
        if bg is not None:
            break
    if bg is None:
        raise DataError(f"scene {index}: no usable {cfg.split} background (too little skin in 30 tries)")
    canvas = bg.image.copy()
    H, W = canvas.shape[:2]
    S = max(H, W)
    backdrop = canvas.copy() if keep_debug else None
    lesions: list[SceneLesion] = [
        SceneLesion(box=[round(v, 2) for v in b], kind="background_mole", diagnosis="OTHER", malignant=None,
                    source=bg.row["source"], image_id=bg.row["image_id"], path=bg.row["path"], blend="original")
        for b in bg.moles]
    taken = [list(b) for b in bg.moles]
    ys, xs = np.nonzero(bg.skin_small)
    skin_int = cv2.integral(bg.skin_small.astype(np.uint8))
    n_target = int(rng.integers(cfg.lesions[0], cfg.lesions[1] + 1))
    attempts = 0
    while sum(les.kind == "pasted" for les in lesions) < n_target and attempts < 5 * n_target + 10:
        attempts += 1
        row = _pick_lesion_row(pools, cfg, rng)
        p = _lesion_patch(row, data_root, rng)
        if p is None:
            continue
        bb = blend.mask_bbox(p.lesion)
        frac = float(np.exp(rng.uniform(np.log(cfg.lesion_frac[0]), np.log(cfg.lesion_frac[1]))))
        f = frac * S / max(bb[2] - bb[0], bb[3] - bb[1])
        fx, fy = f * rng.uniform(0.92, 1.08), f * rng.uniform(0.92, 1.08)
        ph, pw = p.rgb.shape[:2]
        nw, nh = max(4, int(round(pw * fx))), max(4, int(round(ph * fy)))
        if nw + 4 >= W or nh + 4 >= H:
            continue
        interp = cv2.INTER_AREA if fx < 1 else cv2.INTER_CUBIC
        mask = (cv2.resize(p.lesion.astype(np.float32), (nw, nh), interpolation=cv2.INTER_LINEAR) >= 0.5).astype(np.uint8)
        lb = blend.mask_bbox(mask)
        if lb is None:
            continue
        lside = max(lb[2] - lb[0], lb[3] - lb[1])
        # room around the lesion for the clone rim plus OpenCV's 3 px erosion and the border
        rim = max(5, int(0.1 * lside))
        need = rim + 6
        pads = (max(0, need - lb[1]), max(0, need - (nh - lb[3])), max(0, need - lb[0]), max(0, need - (nw - lb[2])))
        if not 0.01 * S <= lside <= 0.1 * S:
            continue
        rw, rh = nw, nh  # the crop's resized size; the patch is extended outwards by `pads`
        if any(pads):
            mask = cv2.copyMakeBorder(mask, *pads, cv2.BORDER_CONSTANT, value=0)
            lb = (lb[0] + pads[2], lb[1] + pads[0], lb[2] + pads[2], lb[3] + pads[0])
            nh, nw = mask.shape
        if nw + 4 >= W or nh + 4 >= H:
            continue
        # placement: on skin (>= 92% of the patch), not near any other box
        placed = None
        gap = max(0.3 * lside, 0.008 * S)
        for _ in range(40):
            if xs.size == 0:
                break
            j = int(rng.integers(xs.size))
            cx = (xs[j] + rng.random()) * _SKIN_DS
            cy = (ys[j] + rng.random()) * _SKIN_DS
            x0, y0 = int(cx - nw / 2), int(cy - nh / 2)
            if x0 < 2 or y0 < 2 or x0 + nw > W - 2 or y0 + nh > H - 2:
                continue
            box = [x0 + lb[0], y0 + lb[1], x0 + lb[2], y0 + lb[3]]
            if _overlaps(box, taken, gap):
                continue
            sx0, sy0 = x0 // _SKIN_DS, y0 // _SKIN_DS
            sx1, sy1 = max(sx0 + 1, (x0 + nw) // _SKIN_DS), max(sy0 + 1, (y0 + nh) // _SKIN_DS)
            area = (sx1 - sx0) * (sy1 - sy0)
            on_skin = skin_int[sy1, sx1] - skin_int[sy0, sx1] - skin_int[sy1, sx0] + skin_int[sy0, sx0]
            if on_skin < 0.92 * area:
                continue
            placed = (x0, y0, box)
            break
        if placed is None:
            continue
        x0, y0, box = placed
        # colour: the crop's peri-lesional skin -> this spot's skin (statistics of the clean backdrop)
        pad = max(nw, nh) // 2
        rx0, ry0, rx1, ry1 = max(0, x0 - pad), max(0, y0 - pad), min(W, x0 + nw + pad), min(H, y0 + nh + pad)
        local = bg.image[ry0:ry1, rx0:rx1]
        small = bg.skin_small[ry0 // _SKIN_DS:max(ry0 // _SKIN_DS + 1, ry1 // _SKIN_DS),
                              rx0 // _SKIN_DS:max(rx0 // _SKIN_DS + 1, rx1 // _SKIN_DS)].astype(np.uint8)
        local_skin = cv2.resize(small, (rx1 - rx0, ry1 - ry0), interpolation=cv2.INTER_NEAREST)
        tgt = blend.lab_stats(local, local_skin)
        src_rgb = p.rgb
        if p.ring_stats is not None and tgt is not None:
            src_rgb = blend.match_colour(src_rgb, p.ring_stats, tgt, lesion=p.lesion)
        patch = cv2.resize(src_rgb, (rw, rh), interpolation=interp)
        if any(pads):  # extend the skin rim outwards (replicate: a mirror would copy the lesion)
            patch = cv2.copyMakeBorder(patch, *pads, cv2.BORDER_REPLICATE)
        # sharpness: about as soft as the upscaled background
        want = 0.35 * bg.upscale * rng.uniform(0.4, 0.9)
        have = 0.35 * max(1.0, fx)
        extra = float(np.sqrt(max(0.0, want ** 2 - have ** 2)))
        if extra > 0.3:
            patch = cv2.GaussianBlur(patch, (0, 0), min(extra, 3.0))
        clone = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * rim + 1, 2 * rim + 1)))
        mode = "mixed" if rng.random() < cfg.mixed_clone_share else "normal"
        before = canvas[y0:y0 + nh, x0:x0 + nw].copy()
        method = blend.paste(canvas, patch, clone, x0, y0, mode)
        # contrast measured in a window around the lesion (the ring may reach past the patch)
        cx0, cy0 = max(0, x0 - nw // 2), max(0, y0 - nh // 2)
        cx1, cy1 = min(W, x0 + nw + nw // 2), min(H, y0 + nh + nh // 2)
        win_mask = np.zeros((cy1 - cy0, cx1 - cx0), np.uint8)
        win_mask[y0 - cy0:y0 - cy0 + nh, x0 - cx0:x0 - cx0 + nw] = mask
        contrast = blend.lesion_contrast(canvas[cy0:cy1, cx0:cx1], win_mask)
        if contrast < cfg.min_contrast:  # invisible after blending: undo, try another lesion
            canvas[y0:y0 + nh, x0:x0 + nw] = before
            continue
        r = p.row
        lesions.append(SceneLesion(
            box=[float(v) for v in box], kind="pasted", diagnosis=r["diagnosis"], malignant=r["malignant"],
            source=r["source"], image_id=r["image_id"], path=r["path"], blend=method, contrast=round(contrast, 2),
            mask=mask[lb[1]:lb[3], lb[0]:lb[2]].astype(bool) if keep_debug else None))
        taken.append(box)
    if not any(les.kind == "pasted" for les in lesions):
        raise DataError(f"scene {index}: could not place any lesion on the {bg.row['path']} background")
    canvas = blend.add_skin_grain(canvas, rng, float(rng.uniform(0.004, 0.012)))
    clean = canvas.copy() if keep_debug else None
    deg = blend.sample_degradation(rng, S)
    final = blend.degrade(canvas, deg, rng)
    return Scene(index=index, name=scene_name(cfg.split, cfg.seed, index), image=final, lesions=lesions,
                 background={"source": bg.row["source"], "image_id": bg.row["image_id"], "path": bg.row["path"]},
                 degradation=deg, clean=clean, backdrop=backdrop)


# ---- index --------------------------------------------------------------------------------------
INDEX_SCHEMA = pa.schema([
    ("path", pa.string()), ("scene_id", pa.string()), ("split", pa.string()), ("seed", pa.int64()),
    ("index", pa.int64()), ("width", pa.int64()), ("height", pa.int64()),
    ("boxes", pa.list_(pa.list_(pa.float64()))), ("box_kind", pa.list_(pa.string())),
    ("box_diagnosis", pa.list_(pa.string())), ("box_malignant", pa.list_(pa.int8())),
    ("box_source", pa.list_(pa.string())), ("box_image_id", pa.list_(pa.string())),
    ("box_path", pa.list_(pa.string())), ("box_blend", pa.list_(pa.string())), ("box_contrast", pa.list_(pa.float64())),
    ("n_pasted", pa.int64()), ("n_background_moles", pa.int64()), ("any_malignant", pa.int8()),
    ("background_source", pa.string()), ("background_image_id", pa.string()), ("background_path", pa.string()),
    ("jpeg_quality", pa.int64()), ("degradation", pa.string()),
    ("synthetic", pa.bool_()), ("modality", pa.string()), ("generator", pa.string()),
])


def scene_row(scene: Scene, cfg: SceneConfig) -> dict:
    les = scene.lesions
    h, w = scene.image.shape[:2]
    pasted = [x for x in les if x.kind == "pasted"]
    return {
        "path": scene.name, "scene_id": Path(scene.name).stem, "split": cfg.split, "seed": int(cfg.seed),
        "index": int(scene.index), "width": int(w), "height": int(h),
        "boxes": [[float(v) for v in x.box] for x in les], "box_kind": [x.kind for x in les],
        "box_diagnosis": [x.diagnosis for x in les], "box_malignant": [x.malignant for x in les],
        "box_source": [x.source for x in les], "box_image_id": [x.image_id for x in les],
        "box_path": [x.path for x in les], "box_blend": [x.blend for x in les], "box_contrast": [x.contrast for x in les],
        "n_pasted": len(pasted), "n_background_moles": len(les) - len(pasted),
        "any_malignant": int(any(x.malignant == 1 for x in pasted)),
        "background_source": scene.background["source"], "background_image_id": scene.background["image_id"],
        "background_path": scene.background["path"], "jpeg_quality": int(scene.degradation.jpeg_quality),
        "degradation": json.dumps(asdict(scene.degradation), sort_keys=True),
        "synthetic": True, "modality": MODALITY, "generator": GENERATOR_VERSION,
    }


def write_index(rows: list[dict], path: Path) -> None:
    table = pa.Table.from_pylist(rows, schema=INDEX_SCHEMA)
    tmp = path.with_suffix(".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)


def load_scene_index(path: str | Path) -> pd.DataFrame:
    """Read ``scenes.parquet``; adds ``abs_path`` (the JPEG's absolute path). DataError if unusable."""
    path = Path(path)
    if path.is_dir():
        path = path / INDEX_NAME
    if not path.is_file():
        raise DataError(f"{path}: scene index not found; run `lesiontriage data scenes`")
    try:
        df = pd.read_parquet(path)
    except Exception as exc:
        raise DataError(f"{path}: unreadable scene index ({exc.__class__.__name__})") from exc
    missing = [c for c in ("path", "boxes", "box_malignant", "synthetic") if c not in df.columns]
    if missing:
        raise DataError(f"{path}: not a scene index (missing {', '.join(missing)})")
    df["boxes"] = [[list(map(float, b)) for b in bs] for bs in df["boxes"]]
    df["box_malignant"] = [[None if x is None or pd.isna(x) else int(x) for x in v] for v in df["box_malignant"]]
    df["abs_path"] = [str((path.parent / p).resolve()) for p in df["path"]]
    return df


# ---- generation ---------------------------------------------------------------------------------
_WORKER: dict = {}


def _init_worker(pools: ScenePools, data_root: str, cfg: SceneConfig, out_dir: str) -> None:
    cv2.setNumThreads(1)
    _WORKER.update(pools=pools, data_root=Path(data_root), cfg=cfg, out_dir=Path(out_dir))


def _make_one(index: int) -> dict:
    w = _WORKER
    scene = compose_scene(w["pools"], w["data_root"], w["cfg"], index)
    (w["out_dir"] / scene.name).write_bytes(blend.encode_jpeg(scene.image, scene.degradation.jpeg_quality))
    return scene_row(scene, w["cfg"])


def _readme(cfg: SceneConfig, n: int, pools: ScenePools, manifest_info: str, command: str) -> str:
    return f"""SYNTHETIC DATA - NOT REAL PATIENT PHOTOGRAPHS

Every image in this folder (scene_*.jpg) is a SYNTHETIC wide-field "phone photo" composed by
lesiontriage ({GENERATOR_VERSION}): a real skin background (wide-field mole photos, or clinical /
smartphone photos whose own lesion was inpainted away) with real labelled lesion crops (clinical,
smartphone, dermoscopic) pasted onto skin (LAB colour match + cv2.seamlessClone), then phone-like
degradation (lighting gradient, white balance, defocus blur, sensor noise, JPEG).
They are not photographs of any person as shown. Use them for research and development only,
never as clinical evidence; report results on them separately and label them synthetic.

Derived from: moles_widefield_roujiaw (licence unknown, internal research only), derm7pt (academic
research only, no redistribution), PAD-UFES-20 (CC BY 4.0), HAM10000 / ISIC 2018 (CC BY-NC 4.0),
SD-198 (research only). Do not redistribute these images.

split={cfg.split} (backgrounds and lesions from manifest split '{cfg.split}' only)  seed={cfg.seed}  n={n}
config: {json.dumps(asdict(cfg))}
pools: {json.dumps(pools.describe())}
manifest: {manifest_info}
command: {command}

Index: scenes.parquet, one row per scene; `path` is relative to this folder; `boxes` are
[x1, y1, x2, y2] scene pixels; per-box lists box_kind (pasted | background_mole), box_diagnosis,
box_malignant (1 / 0 / null), box_source, box_image_id, box_path; synthetic=True;
modality=synthetic_widefield. Background moles keep their original (not exhaustive) annotation
as diagnosis OTHER, malignant unknown.
"""


def generate_scenes(n: int, seed: int = 0, split: str = "train", out_dir: str | Path | None = None,
                    manifest: str | Path | pd.DataFrame | None = None, data_root: str | Path | None = None,
                    long_side: int = 2048, workers: int = 1, command: str = "",
                    progress: Callable[[int, int], None] | None = None, **config) -> ScenesResult:
    """Generate ``n`` scenes of ``split`` into ``out_dir`` (default ``runs/scenes/<split>/``) and
    write ``scenes.parquet`` + ``SYNTHETIC.txt``. ``progress(done, total)`` is called per scene."""
    t0 = time.perf_counter()
    if n < 1:
        raise DataError(f"--n {n}: need at least one scene")
    cfg = SceneConfig(split=split, seed=seed, long_side=long_side, **config)
    root = paths.data_root(data_root)
    if isinstance(manifest, pd.DataFrame):
        mf, manifest_info = manifest, "in-memory manifest"
    else:
        from lesiontriage.data.manifest import load_manifest, manifest_hash

        mpath = Path(manifest) if manifest else paths.DEFAULT_MANIFEST
        mf = load_manifest(mpath)
        manifest_info = f"{mpath} sha256={manifest_hash(mf)}"
    pools = screen_pools(build_pools(mf, split), root, workers=workers)
    out = Path(out_dir) if out_dir else paths.RUNS_DIR / "scenes" / split
    out.mkdir(parents=True, exist_ok=True)
    stale = [p for p in out.glob("scene_*.jpg") if not p.name.startswith(f"scene_{split}_{seed}_")]
    if stale:
        log.warning("%s holds %d scene files of another split/seed; they are not in the new index", out, len(stale))
    rows: list[dict] = [None] * n  # type: ignore[list-item]
    workers = max(1, min(int(workers), n))
    if workers == 1:
        _init_worker(pools, str(root), cfg, str(out))
        for i in range(n):
            rows[i] = _make_one(i)
            if progress:
                progress(i + 1, n)
    else:
        ctx = _mp_context()
        with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                    initargs=(pools, str(root), cfg, str(out))) as ex:
            futs = {ex.submit(_make_one, i): i for i in range(n)}
            for done, fut in enumerate(cf.as_completed(futs), 1):
                rows[futs[fut]] = fut.result()
                if progress:
                    progress(done, n)
    index_path = out / INDEX_NAME
    write_index(rows, index_path)
    (out / README_NAME).write_text(_readme(cfg, n, pools, manifest_info, command))
    seconds = time.perf_counter() - t0
    log.info("%d %s scenes in %.1f s -> %s", n, split, seconds, out)
    return ScenesResult(out, index_path, pd.read_parquet(index_path), seconds, workers, cfg)


def draw_boxes(rgb: np.ndarray, boxes: list[list[float]], kinds: list[str] | None = None,
               malignant: list[int | None] | None = None) -> np.ndarray:
    """A copy with boxes drawn (red: malignant, green: benign, yellow: unknown / background mole)
    and a 'SYNTHETIC' tag: for previews and reports."""
    out = rgb.copy()
    t = max(2, max(rgb.shape[:2]) // 600)
    for i, b in enumerate(boxes):
        m = malignant[i] if malignant is not None else None
        colour = (230, 30, 30) if m == 1 else (30, 200, 30) if m == 0 else (240, 220, 0)
        cv2.rectangle(out, (int(b[0]) - t, int(b[1]) - t), (int(np.ceil(b[2])) + t, int(np.ceil(b[3])) + t), colour, t)
    s = max(rgb.shape[:2]) / 1500
    cv2.putText(out, "SYNTHETIC", (int(20 * s), int(60 * s)), cv2.FONT_HERSHEY_SIMPLEX, 1.6 * s, (255, 255, 255), max(2, int(3 * s)), cv2.LINE_AA)
    return out
