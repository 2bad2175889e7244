"""`lesiontriage evaluate`: run the shipped models over every test split and write the reports.

Flow (one job per step):

1. ``select_items``: the evaluation images from the manifest (and the synthetic test scenes), one
   :class:`EvalItem` per image with its split name, labels and ground-truth boxes.
2. ``run_inference``: per image, the expensive stages, each cached on disk under
   ``runs/eval_cache/`` keyed by the model's sha256 + the image path (+ size / content digest), so a re-run
   only computes what changed:
     ``det``     raw detector output (every box >= the detector's own score floor, original pixels)
     ``cls_det`` classifier on the crops of the detections the pipeline keeps
     ``cls_gt``  classifier (+ pooled features) on the ground-truth crops (box + margin, or the
                 whole image where a set has no box: the lesion is centred, as in training)
     ``whole``   direct whole-image classifier
     ``c2``      C=2 malignant / benign detector (only when models/detector_c2.safetensors exists;
                 on a seeded, label-stratified sample of <= ``c2_max_per_split`` images per split)
     ``ita``     Individual Typology Angle of the peri-lesional skin
   The image is decoded once per image and only when a stage is missing from the cache. Every
   aggregation (mean / max / noisy-OR) is computed from the cached per-lesion probabilities. The
   networks run as frozen oneDNN copies checked against the eager models (``fast.py``), and the
   C=2 detector reuses the one-class detector's identical frozen early layers for the same image.
3. ``build_tables``: per-image, per-lesion and per-detection tables (parquet).
4. ``write_reports``: the JSON sections (``tables.py``) and ``summary.json``.

All stages go through :class:`lesiontriage.pipeline.TriagePipeline` (``load``, ``detect``,
``_crop_batch`` / ``_normalise``, the classifier's ``features`` + heads): nothing re-implements
the product. A stage whose model is missing yields ``{"status": "not available: <model> not
trained"}`` in the reports instead of failing.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import math
import os
import pickle
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd

from lesiontriage import paths
from lesiontriage.box_selection import MAX_LESIONS
from lesiontriage.evaluate import tables as T
from lesiontriage.hybrid import HybridRule, largest_box_fraction
from lesiontriage.networks.whole_view import whole_view_members, whole_view_spec
from lesiontriage.results import INTENDED_USE, SUBTYPES

log = logging.getLogger(__name__)

ITA_VERSION = "ita-v1"
TTA_VERSION = "v2"  # v2: sub-type probabilities = softmax(mean logits) over the flips, as the pipeline
SPLIT_ORDER = T.SPLIT_ORDER


# =====================================================================================================
# settings and items
# =====================================================================================================

@dataclass
class EvalSettings:
    """Everything that decides what ``evaluate`` computes (recorded in every report)."""

    models_dir: Path = paths.MODELS_DIR
    out_dir: Path = paths.REPORTS_DIR
    data_root: Path | None = None
    manifest: Path | None = None
    scenes_index: Path | None = None  # default runs/scenes/test/scenes.parquet
    cache_dir: Path | None = paths.RUNS_DIR / "eval_cache"
    limit: int | None = None  # images per split (seeded, class-balanced sample) for quick runs
    seed: int = 0
    n_boot: int = 1000
    n_boot_paired: int = 2000
    n_boot_map: int = 50
    # Caps that keep a full run under 30 min on the 2-core CPU (see ``sampling_report``; each is a seeded
    # sample, stated per split in evaluation.json ``sampling`` and the provenance):
    # HAM10000 val images (one per lesion) for the dermoscopy box metrics: every lesion that did not help choose
    # the lobe-merging rule (596; 150 until stop 21, whose sample scored 0.854 mAP@0.5 vs 0.806 on the other 446)
    ham_detection_max: int = 600
    scenes_max: int = 30  # synthetic test scenes (each holds ~14 lesions; ~4.7 CPU-s each with flip TTA)
    c2_max_per_split: int | None = 150  # images per split that get the C=2 detector (label-stratified sample)
    pad_ita_all: bool = True  # ITA vs Fitzpatrick on every PAD-UFES-20 row with a type (model-free)
    embedding: bool = True
    workers: int = 2  # single-thread processes: measured 4-5x faster than one 2-thread process under CPU contention
    fast_models: bool = True  # frozen oneDNN copies of the detectors + classifiers (evaluate/fast.py), checked vs eager
    progress: bool = True
    command: str = ""

    def scenes_path(self) -> Path:
        return Path(self.scenes_index) if self.scenes_index else paths.RUNS_DIR / "scenes" / "test" / "scenes.parquet"


@dataclass
class EvalItem:
    """One evaluation image. ``gt_boxes`` are xyxy in original-image pixels."""

    split: str
    path: str  # as recorded in the tables (manifest-relative, or the scene file path)
    abs_path: str
    image_id: str
    source: str
    modality: str
    diagnosis: str | None
    malignant: int | None
    gt_boxes: list[list[float]] = field(default_factory=list)
    box_malignant: list[int | None] = field(default_factory=list)
    box_diagnosis: list[str | None] = field(default_factory=list)
    single_lesion: bool = True  # one labelled lesion per photo (GT crop = largest box or whole image)
    classify: bool = True  # run the lesion classifier (GT crops and detected crops)
    whole: bool = True  # run the direct whole-image classifier
    detect_eval: bool = False  # the split has boxes to evaluate the detector against
    synthetic: bool = False
    biopsied: bool | None = None
    fitzpatrick: int | None = None
    pair_id: str | None = None
    c2: bool = True  # in this split's C=2 sample (``mark_c2_sample``)

    def gt_crop_boxes(self) -> list[list[float]] | None:
        """Boxes whose crops are classified: the largest box for a single-lesion photo, every box
        of a scene, None = whole image (sets without boxes)."""
        if not self.gt_boxes:
            return None
        if self.single_lesion:
            return [max(self.gt_boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))]
        return self.gt_boxes


@dataclass(frozen=True)
class SplitSpec:
    name: str
    description: str


SPLITS: dict[str, SplitSpec] = {s.name: s for s in (
    SplitSpec("isic2018_test", "ISIC 2018 Task 3 official test (dermoscopy, 1512 images, stored 224x224 squashed); "
                               "no boxes: the whole image is the ground-truth crop"),
    SplitSpec("derm7pt_test_clinical", "derm7pt official test, clinical images; no boxes (whole image)"),
    SplitSpec("derm7pt_test_dermoscopy", "derm7pt official test, dermoscopy images; no boxes (whole image)"),
    SplitSpec("pad_ufes20_test", "PAD-UFES-20 subset, manifest test split (smartphone, split by patient); boxes "
                                 "from course-made masks; 'biopsied' subset reported separately"),
    SplitSpec("sd198_test", "SD-198 tumour subset: the source's val split (manifest 'test'); clinical; no boxes"),
    SplitSpec("scenes_test", "SYNTHETIC wide-field test scenes (lesions composited onto skin); per-box labels"),
    SplitSpec("moles_test", "held-out real wide-field mole photos (18, no diagnosis): detection only"),
    SplitSpec("ham10000_val_boxes", "HAM10000 has no test split: its validation split (grouped by lesion, held out "
                                    "from training but used for the detector's early stopping) provides the held-out "
                                    "dermoscopy boxes: one image per lesion, every lesion not used to choose the "
                                    "lobe-merging rule; detection only"),
)}


def _opt(v: Any) -> Any:
    try:
        return None if pd.isna(v) else v
    except (TypeError, ValueError):
        return v


def _sample(rows: pd.DataFrame, limit: int | None, seed: int) -> pd.DataFrame:
    """``limit`` rows, seeded; half malignant where possible so a quick run's AUC is defined."""
    if not limit or len(rows) <= limit:
        return rows
    y = pd.to_numeric(rows["malignant"], errors="coerce")
    pos, neg = rows[y == 1], rows[y != 1]
    if len(pos) and len(neg):
        n_pos = min(len(pos), max(1, limit // 2))
        n_neg = min(len(neg), limit - n_pos)
        n_pos = min(len(pos), limit - n_neg)
        out = pd.concat([pos.sample(n_pos, random_state=seed), neg.sample(n_neg, random_state=seed)])
        return out.sort_index()
    return rows.sample(limit, random_state=seed).sort_index()


def _manifest_item(r: pd.Series, split: str, data_root: Path | None, *, classify: bool = True, whole: bool = True,
                   detect_eval: bool = False) -> EvalItem:
    from lesiontriage.data.manifest import resolve_path

    mal = _opt(r.get("malignant"))
    boxes = [list(map(float, b)) for b in (r.get("boxes") or [])]
    fitz = _opt(r.get("fitzpatrick"))
    bio = _opt(r.get("biopsied"))
    return EvalItem(
        split=split, path=str(r["path"]), abs_path=str(resolve_path(r["path"], data_root)), image_id=str(r["image_id"]),
        source=str(r["source"]), modality=str(r["modality"]), diagnosis=_opt(r.get("diagnosis")),
        malignant=None if mal is None else int(mal), gt_boxes=boxes,
        box_malignant=[None if mal is None else int(mal)] * len(boxes), box_diagnosis=[_opt(r.get("diagnosis"))] * len(boxes),
        single_lesion=True, classify=classify and mal is not None, whole=whole and mal is not None,
        detect_eval=detect_eval, synthetic=False, biopsied=None if bio is None else bool(bio),
        fitzpatrick=None if fitz is None else int(fitz), pair_id=_opt(r.get("pair_id")),
    )


def manifest_items(manifest: pd.DataFrame, settings: EvalSettings) -> list[EvalItem]:
    """The real-photo evaluation images, per split (``limit`` images per split when set)."""
    m = manifest
    lim, seed, root = settings.limit, settings.seed, settings.data_root
    items: list[EvalItem] = []

    def add(name: str, rows: pd.DataFrame, **kw: Any) -> None:
        for _, r in _sample(rows, lim, seed).iterrows():
            items.append(_manifest_item(r, name, root, **kw))

    test = m[m["split"] == "test"]
    add("isic2018_test", test[test["source"] == "isic2018_task3_test"])
    d7 = test[test["source"] == "derm7pt"]
    add("derm7pt_test_clinical", d7[d7["modality"] == "clinical"])
    add("derm7pt_test_dermoscopy", d7[d7["modality"] == "dermoscopy"])
    add("pad_ufes20_test", test[test["source"] == "pad_ufes20_subset"], detect_eval=True)
    add("sd198_test", test[test["source"] == "sd198_tumour_subset"])
    moles = test[test["source"] == "moles_widefield_roujiaw"]
    add("moles_test", moles, classify=False, whole=False, detect_eval=True)
    cap = min(settings.ham_detection_max, lim) if lim else settings.ham_detection_max
    for _, r in ham_report_rows(m, cap, seed).iterrows():
        items.append(_manifest_item(r, "ham10000_val_boxes", root, classify=False, whole=False, detect_eval=True))
    return items


def ham_detection_rows(manifest: pd.DataFrame, cap: int | None, seed: int) -> pd.DataFrame:
    """A seeded sample of ``cap`` HAM10000 validation photos, one per lesion. With cap 150, seed 0 it is
    the held-out-box sample reported until stop 21, which ``train box-merge`` keeps out of its own set."""
    ham = manifest[(manifest["source"] == "ham10000") & (manifest["split"] == "val")]
    ham = ham.sample(frac=1.0, random_state=seed).drop_duplicates("lesion_id").sort_index()
    if cap and len(ham) > cap:
        ham = ham.sample(cap, random_state=seed).sort_index()
    return ham


def ham_report_rows(manifest: pd.DataFrame, cap: int | None, seed: int) -> pd.DataFrame:
    """The HAM10000 validation photos whose boxes are reported as held-out dermoscopy boxes: one per
    lesion, every lesion except the ones ``train box-merge`` chose its rule on (a seeded sample of ``cap``)."""
    from lesiontriage.train.box_merge import BoxMergeStudy, ham_rows

    chosen_on = set(ham_rows(manifest, BoxMergeStudy())["lesion_id"])
    ham = manifest[(manifest["source"] == "ham10000") & (manifest["split"] == "val") & ~manifest["lesion_id"].isin(chosen_on)]
    ham = ham.sample(frac=1.0, random_state=seed).drop_duplicates("lesion_id").sort_index()
    if cap and len(ham) > cap:
        ham = ham.sample(cap, random_state=seed).sort_index()
    return ham


def _scene_label_lists(r: pd.Series, n: int) -> tuple[list[int | None], list[str | None]]:
    """Per-box malignant flags and diagnoses from whichever columns the scene index has."""
    mal: list[int | None] = [None] * n
    dx: list[str | None] = [None] * n
    for col in ("box_malignant", "malignant", "labels_malignant"):
        v = r.get(col)
        if v is not None and not isinstance(v, (str, int, float, bool)) and len(v) == n:
            mal = [None if _opt(x) is None else int(x) for x in v]
            break
    for col in ("box_diagnosis", "diagnoses", "diagnosis", "labels_diagnosis"):
        v = r.get(col)
        if v is not None and not isinstance(v, str) and len(v) == n:
            dx = [None if _opt(x) is None else str(x) for x in v]
            break
    labels = r.get("labels")
    if labels is not None and not isinstance(labels, str) and len(labels) == n and all(isinstance(x, dict) for x in labels):
        mal = [None if _opt(x.get("malignant")) is None else int(x["malignant"]) for x in labels]
        dx = [x.get("diagnosis") for x in labels]
    return mal, dx


def scene_items(settings: EvalSettings) -> tuple[list[EvalItem], str]:
    """The synthetic wide-field test scenes, or ([], reason) when the index does not exist yet."""
    index = settings.scenes_path()
    if not index.is_file():
        return [], f"synthetic test scenes not built ({index} missing; run `lesiontriage data scenes`)"
    try:
        try:
            from lesiontriage.data import scenes as scenes_mod  # the owner's loader when it exists

            loader = getattr(scenes_mod, "load_scene_index", None) or getattr(scenes_mod, "load_scenes", None)
            df = loader(index) if callable(loader) else pd.read_parquet(index)
        except ImportError:
            df = pd.read_parquet(index)
    except Exception as exc:  # malformed index: report, do not crash the whole evaluation
        return [], f"{index}: unreadable scene index ({exc.__class__.__name__}: {exc})"
    cap = min(settings.scenes_max, settings.limit) if settings.limit else settings.scenes_max
    if cap and len(df) > cap:
        df = df.sample(cap, random_state=settings.seed).sort_index()
    items: list[EvalItem] = []
    for i, r in df.iterrows():
        p = Path(str(r["path"]))
        if r.get("abs_path"):  # lesiontriage.data.scenes.load_scene_index resolves it
            abs_p = Path(str(r["abs_path"]))
        else:  # 'path' is relative to the folder holding scenes.parquet
            abs_p = p if p.is_absolute() else index.parent / p
        boxes = [list(map(float, b)) for b in (r.get("boxes") if r.get("boxes") is not None else [])]
        mal, dx = _scene_label_lists(r, len(boxes))
        known = [m for m in mal if m is not None]
        image_mal = (1 if any(known) else 0) if known else None
        items.append(EvalItem(
            split="scenes_test", path=str(r["path"]), abs_path=str(abs_p), image_id=str(r.get("scene_id", r.get("image_id", p.stem))),
            source="synthetic_scenes", modality="synthetic_widefield", diagnosis=None, malignant=image_mal,
            gt_boxes=boxes, box_malignant=mal, box_diagnosis=dx, single_lesion=False,
            classify=image_mal is not None, whole=image_mal is not None, detect_eval=True, synthetic=True,
        ))
    return items, ""


def _stratified_pick(labels: Sequence[Any], n: int, seed: int) -> np.ndarray:
    """Indices of a seeded sample of ``n`` of ``labels`` that keeps each label's share (largest
    remainders get the rounding), so AP and prevalence on the sample match the split's."""
    labels = ["none" if v is None else str(v) for v in labels]
    if n >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    groups = {g: np.flatnonzero(np.asarray(labels) == g) for g in sorted(set(labels))}
    exact = {g: n * len(ix) / len(labels) for g, ix in groups.items()}
    quota = {g: int(math.floor(v)) for g, v in exact.items()}
    for g in sorted(exact, key=lambda g: quota[g] - exact[g])[: n - sum(quota.values())]:
        quota[g] += 1
    picked = [rng.permutation(ix)[: quota[g]] for g, ix in groups.items()]
    return np.sort(np.concatenate(picked))


def mark_c2_sample(items: Sequence[EvalItem], cap: int | None, seed: int) -> dict[str, dict[str, int]]:
    """Set ``item.c2`` so at most ``cap`` images per split get the C=2 detector pass.

    Why: the C=2 detector costs almost as much as the one-class detector (~0.45 vs ~0.55 CPU-s per
    image, sharing its frozen early layers) and only feeds one strategy row (one_step_c2) and the
    C=2 detection table; on every labelled image it would add ~10 min to a full run on 2 cores.
    Every other score stays on the complete split. Returns
    {split: {n_images, n_c2}} for the report."""
    by_split: dict[str, list[EvalItem]] = {}
    for it in items:
        by_split.setdefault(it.split, []).append(it)
    out: dict[str, dict[str, int]] = {}
    for split, group in by_split.items():
        keep = set(_stratified_pick([it.malignant for it in group], cap, seed).tolist()) if cap else set(range(len(group)))
        for i, it in enumerate(group):
            it.c2 = i in keep
        out[split] = {"n_images": len(group), "n_c2": len(keep)}
    return out


def pad_ita_items(manifest: pd.DataFrame, settings: EvalSettings, exclude: set[str]) -> list[EvalItem]:
    """PAD-UFES-20 rows outside the test items that have a recorded Fitzpatrick type: ITA only
    (no model), to check the estimator against the recorded types on more than the test split."""
    pad = manifest[(manifest["source"] == "pad_ufes20_subset") & manifest["fitzpatrick"].notna()
                   & ~manifest["path"].isin(exclude)]
    if settings.limit:
        pad = pad.sample(min(len(pad), settings.limit), random_state=settings.seed)
    return [_manifest_item(r, "pad_ufes20_ita_only", settings.data_root, classify=False, whole=False) for _, r in pad.iterrows()]


# =====================================================================================================
# models
# =====================================================================================================

@dataclass
class ModelInfo:
    """What is installed: sha256 per model file and why a missing part is missing."""

    metadata: dict[str, Any]
    sha256: dict[str, str]
    status: dict[str, str]  # model key -> "ok" | "not available: ... not trained"

    def ok(self, key: str) -> bool:
        return self.status.get(key) == "ok"

    def missing(self, key: str) -> dict[str, str]:
        return {"status": self.status.get(key, f"not available: {key} not trained")}


MODEL_KEYS: tuple[str, ...] = ("classifier", "detector", "image_classifier", "detector_c2")


def model_info(models_dir: Path) -> ModelInfo:
    """Read metadata.json (no weights loaded) and decide which parts can be evaluated."""
    meta_path = Path(models_dir) / "metadata.json"
    meta: dict[str, Any] = {}
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError as exc:
            log.warning("%s unreadable: %s", meta_path, exc)
    models = meta.get("models") or {}
    sha, status = {}, {}
    for key in MODEL_KEYS:
        entry = models.get(key) or {}
        f = Path(models_dir) / str(entry.get("file", f"{key}.safetensors"))
        if entry and f.is_file():
            sha[key] = str(entry.get("sha256", ""))
            status[key] = "ok"
        else:
            status[key] = f"not available: {key} not trained ({f.name} not in {models_dir})"
    for key in whole_view_members(meta):  # every member of the whole-image view (networks/whole_view.py)
        if key in models:
            sha[key] = str(models[key].get("sha256", ""))
    if status["classifier"] != "ok":
        for key in ("detector", "image_classifier", "detector_c2"):
            if status[key] == "ok":
                status[key] = "not available: needs the classifier, which is not trained"
    return ModelInfo(meta, sha, status)


def pipeline_settings(info: ModelInfo):
    """The pipeline's inference settings exactly as ``TriagePipeline.from_dir`` builds them."""
    from lesiontriage.pipeline import PipelineSettings

    return PipelineSettings(**{k: v for k, v in (info.metadata.get("pipeline") or {}).items()
                               if k in PipelineSettings.__dataclass_fields__})


def merged_detections(det: dict[str, Any], merge: tuple[float, float, float], image_size: tuple[int, int] | None
                      ) -> dict[str, Any]:
    """The detector's raw output as the product sees it: overlapping confident lobes merged into their
    union (``box_selection.merge_overlapping``; the same dict when merging is off). The cache keeps
    the raw output, so a new merge rule costs no detector run. ``merge`` = (merge_score, merge_iou,
    merge_min_area); ``image_size`` = (width, height) in the boxes' (original) pixels."""
    if merge[0] <= 0:
        return det
    from lesiontriage.box_selection import merge_overlapping

    boxes, scores = merge_overlapping(det["boxes"], det["scores"], *merge[:2], image_size, merge[2])
    return {**det, "boxes": boxes, "scores": scores}


def shipped_box_rescorer(info: ModelInfo, models_dir: Path, ps):
    """The product's box-confidence model (None when not shipped or not for this detector / merge rule):
    mAP ranks the boxes by the confidence the product reports."""
    from lesiontriage.pipeline import TriagePipeline

    models = info.metadata.get("models") or {}
    if not info.ok("detector"):
        return None
    return TriagePipeline.load_box_rescorer(Path(models_dir), models, ps)


def merge_rule(ps) -> tuple[float, float, float]:
    """(merge_score, merge_iou, merge_min_area) of pipeline settings ``ps``."""
    return float(ps.merge_score), float(ps.merge_iou), float(ps.merge_min_area)


def kept_index(scores: np.ndarray, threshold: float, max_lesions: int, boxes: np.ndarray | None = None,
               nested_containment: float = 0.0, widefield: tuple[float, int] = (0.0, 0)) -> np.ndarray:
    """Indices of the detections the pipeline keeps (scores sorted best first, as detect() returns)."""
    from lesiontriage.box_selection import effective_threshold, select_boxes

    if boxes is not None and nested_containment > 0:  # the product's box_selection, exactly
        return select_boxes(boxes, scores, threshold, max_lesions, nested_containment, widefield)
    return np.flatnonzero(np.asarray(scores) >= effective_threshold(scores, threshold, widefield))[:max_lesions]


class Engine:
    """The shipped pipeline plus the few extra views the evaluation needs (raw detections, raw
    logits, pooled features). Built once per process.

    ``fast``: run both detectors and both classifiers through frozen oneDNN copies
    (:mod:`lesiontriage.networks.fast`, each checked against the eager model when built; the
    detectors are ~75% of the evaluation's CPU time). ``inference_engine`` records what each model
    actually runs on. Crops, resizing, box logic and temperatures stay the pipeline's own code."""

    def __init__(self, models_dir: Path, info: ModelInfo, threads: int | None = None, fast: bool = False) -> None:
        import torch

        from lesiontriage.pipeline import TriagePipeline

        self.info = info
        self.pipe = TriagePipeline.from_dir(models_dir, fast=False) if info.ok("classifier") else None
        if threads:
            torch.set_num_threads(threads)
        self.raw_pipe = None
        if self.pipe is not None and self.pipe.detector is not None:
            # Same detect(), no score cut: mAP needs every box the detector emits.
            self.raw_pipe = copy.copy(self.pipe)
            self.raw_pipe.settings = dataclasses.replace(self.pipe.settings, detector_score_threshold=0.0, max_lesions=10_000)
        self.c2 = None
        if info.ok("detector_c2"):
            self.c2 = self._load_c2(models_dir, info.metadata["models"]["detector_c2"])
        self.classifier = self.pipe.classifier if self.pipe is not None else None
        self.image_classifier = self.pipe.image_classifier if self.pipe is not None else None
        self.inference_engine: dict[str, dict[str, Any]] = {}
        if fast:
            self._use_fast_models()

    def _use_fast_models(self) -> None:
        """Swap the evaluation's own model references for fast copies; ``self.pipe`` (the product
        path used for crops and normalisation) keeps its eager models untouched."""
        from lesiontriage.networks.fast import fast_classifier, fast_detectors

        if self.classifier is not None:
            self.classifier, self.inference_engine["classifier"] = fast_classifier(self.classifier)
        if self.image_classifier is not None:
            self.image_classifier, self.inference_engine["image_classifier"] = fast_classifier(self.image_classifier)
        dets = {k: d for k, d in (("detector", self.raw_pipe.detector if self.raw_pipe else None),
                                  ("detector_c2", self.c2)) if d is not None}
        if dets:
            fast, engines = fast_detectors(dets)
            self.inference_engine.update(engines)
            if "detector" in fast:
                self.raw_pipe.detector = fast["detector"]
            self.c2 = fast.get("detector_c2", self.c2)

    @staticmethod
    def _load_c2(models_dir: Path, entry: dict[str, Any]):
        from lesiontriage.networks.detector import DetectorConfig, build_detector
        from lesiontriage.weights import load_weights

        det = build_detector(DetectorConfig.from_dict(entry["config"]), pretrained=False)
        det.load_state_dict(load_weights(Path(models_dir) / entry["file"], entry["sha256"]))
        return det.eval()

    @property
    def kept_threshold(self) -> float:
        return float(self.pipe.settings.detector_score_threshold) if self.pipe else 0.5

    @property
    def max_lesions(self) -> int:
        return int(self.pipe.settings.max_lesions) if self.pipe else MAX_LESIONS

    @property
    def nested_containment(self) -> float:
        return float(self.pipe.settings.nested_containment) if self.pipe else 0.0

    @property
    def widefield(self) -> tuple[float, int]:
        return self.pipe.settings.widefield if self.pipe else (0.0, 0)

    @property
    def merge(self) -> tuple[float, float, float]:
        """(merge_score, merge_iou, merge_min_area) of the pipeline's lobe merging (0 = off)."""
        return merge_rule(self.pipe.settings) if self.pipe else (0.0, 0.0, 0.0)

    @property
    def flip_tta(self) -> bool:
        return bool(self.pipe.settings.flip_tta) if self.pipe else False

    def load(self, path: str):
        if self.pipe is not None:
            return self.pipe.load(path)
        from lesiontriage.imaging import load_image

        return load_image(path, max_side=EVAL_DECODE_MAX_SIDE)

    def run_heads(self, model, batch, tta: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Raw malignant logit [N], sub-type probabilities [N, C], pooled features [N, F]: the
        classifier's forward split at the pooled features (dropout is the identity in eval).
        ``tta``: logits and sub-type probabilities averaged over the crop and its h/v flips, as
        the pipeline does when ``flip_tta`` is set; features from the unflipped crop."""
        if len(batch) == 0:
            c = len(model.config.subtypes)
            return np.zeros(0, np.float32), np.zeros((0, c), np.float32), np.zeros((0, 0), np.float32)
        n = len(batch)
        views = torch_cat_flips(batch) if tta else batch
        logit, sub, f = model.outputs(views)
        logit, sub, f = logit.numpy(), sub.numpy(), f.numpy()
        if tta:
            logit, sub = average_views(logit, sub, 3)
            f = f[:n]
        return logit, sub, f

    def detect_raw(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        boxes, scores = self.raw_pipe.detect_raw(rgb)  # every box: no score cut, no box selection
        order = np.argsort(-scores, kind="stable")
        return boxes[order], scores[order]

    def detect_c2(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        import torch

        from lesiontriage.pipeline import _to_tensor

        with torch.inference_mode():
            out = self.c2([_to_tensor(rgb)])[0]
        return out["boxes"].numpy(), out["scores"].numpy(), out["labels"].numpy()

    # ---- one image ----------------------------------------------------------------------------------
    def compute(self, item: EvalItem, stages: Sequence[str], cached_det: dict | None = None) -> dict[str, Any]:
        """Run the missing ``stages`` for one image; values are plain numpy (picklable)."""
        from lesiontriage.pipeline import _to_tensor
        from lesiontriage.skintone import estimate_ita

        out: dict[str, Any] = {}
        clock = StageClock()
        with clock("decode"):
            img = self.load(item.abs_path)
        rgb, scale = img.rgb, float(img.scale)
        out["_size"] = (int(img.orig_width), int(img.orig_height))
        crop_boxes = item.gt_crop_boxes()
        if "ita" in stages:
            with clock("ita"):
                box = None if not item.gt_boxes or not item.single_lesion else [v * scale for v in crop_boxes[0]]
                out["ita"] = estimate_ita(rgb, box).to_dict()
        det = cached_det
        if "det" in stages:
            with clock("detect"):
                boxes, scores = self.detect_raw(rgb)
                det = {"boxes": (boxes / scale).astype(np.float32), "scores": scores.astype(np.float32)}
                out["det"] = det
        if "cls_det" in stages:
            with clock("classify_detected"):
                mdet = merged_detections(det, self.merge, (img.orig_width, img.orig_height))
                keep = kept_index(mdet["scores"], self.kept_threshold, self.max_lesions, mdet["boxes"], self.nested_containment,
                                  self.widefield)
                kb = mdet["boxes"][keep] * scale
                cfg = self.pipe.classifier.config
                tta = self.pipe.settings.tta_for(len(kb))  # the pipeline's rule: no flips on a many-lesion photo
                logit, sub, _ = self.run_heads(self.classifier, self.pipe._crop_batch(rgb, kb, cfg), tta) if len(kb) \
                    else self.run_heads(self.classifier, [])
                out["cls_det"] = {"index": keep.astype(np.int32), "logit": logit, "sub": sub}
        if "cls_gt" in stages:
            with clock("classify_gt"):
                cfg = self.pipe.classifier.config
                if crop_boxes is None:
                    batch = self.pipe._normalise([_to_tensor(rgb)], cfg)
                else:
                    batch = self.pipe._crop_batch(rgb, np.asarray(crop_boxes, dtype=np.float32) * scale, cfg)
                logit, sub, feat = self.run_heads(self.classifier, batch, self.pipe.settings.tta_for(len(batch)))
                out["cls_gt"] = {"logit": logit, "sub": sub, "feat": feat.astype(np.float16)}
        if "frame" in stages:  # the close-up blend's full-frame view: the lesion classifier on the whole photo
            with clock("classify_frame"):
                logit, _, _ = self.run_heads(self.classifier, self.pipe._normalise([_to_tensor(rgb)], self.pipe.classifier.config),
                                             self.flip_tta)
                out["frame"] = {"logit": logit}
        if "whole" in stages:
            with clock("whole_image"):
                model = self.image_classifier
                logit, sub, _ = self.run_heads(model, self.pipe._normalise([_to_tensor(rgb)], model.config))
                out["whole"] = {"logit": logit, "sub": sub}
        if "c2" in stages:
            with clock("detect_c2"):
                b, s, lab = self.detect_c2(rgb)
                out["c2"] = {"boxes": (b / scale).astype(np.float32), "scores": s.astype(np.float32),
                             "labels": lab.astype(np.int16)}
        out["_timings"], out["_cpu_stages"] = clock.wall, clock.cpu
        out["_cpu"] = float(sum(clock.cpu.values()))  # all threads of this process: robust to CPU contention
        return out


class StageClock:
    """Wall and CPU seconds per named stage of one image.

    Why both: wall time on a shared machine measures the other jobs as much as this one; CPU time
    (``time.process_time``: every thread of this process) does not, so the full-run projection is
    made from CPU seconds."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t, c = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - t
            self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c


# =====================================================================================================
# cache
# =====================================================================================================

class PredictionCache:
    """Per-stage, per-model pickle shards in ``runs/eval_cache/`` (git-ignored).

    A key is sha256(stage | model tag | image path | file size | content digest), so a changed model
    file (new sha256) or a changed image never reuses a stale prediction. The digest is of the bytes,
    not the mtime: the read-only data mount gets a new mtime on every remount, which silently threw
    the whole cache away (a 25-minute re-run). ``directory=None`` disables the cache (memory only)."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = Path(directory) if directory else None
        self._shards: dict[str, dict[str, Any]] = {}
        self._dirty: set[str] = set()
        self._last_flush = time.monotonic()

    @staticmethod
    def stamp(path: str) -> str:
        try:
            with open(path, "rb") as fh:
                digest = hashlib.file_digest(fh, "blake2b").hexdigest()[:24]
            return f"{path}|{os.path.getsize(path)}|{digest}"
        except OSError:
            return f"{path}|missing"

    def _shard(self, stage: str, tag: str) -> dict[str, Any]:
        name = f"{stage}-{hashlib.sha256(tag.encode()).hexdigest()[:16]}"
        if name not in self._shards:
            data: dict[str, Any] = {}
            if self.directory and (self.directory / f"{name}.pkl").is_file():
                try:
                    with open(self.directory / f"{name}.pkl", "rb") as fh:
                        data = pickle.load(fh)
                except Exception as exc:  # a truncated shard (killed run) is recomputed, not fatal
                    log.warning("eval cache shard %s unreadable (%s): recomputing", name, exc)
            self._shards[name] = data
        return self._shards[name]

    def _name(self, stage: str, tag: str) -> str:
        return f"{stage}-{hashlib.sha256(tag.encode()).hexdigest()[:16]}"

    def get(self, stage: str, tag: str, key: str) -> Any:
        return self._shard(stage, tag).get(key)

    def put(self, stage: str, tag: str, key: str, value: Any) -> None:
        self._shard(stage, tag)[key] = value
        self._dirty.add(self._name(stage, tag))
        if time.monotonic() - self._last_flush > 60:
            self.flush()

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        if not self.directory:
            self._dirty.clear()
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        for name in sorted(self._dirty):
            tmp = self.directory / f"{name}.pkl.tmp"
            with open(tmp, "wb") as fh:
                pickle.dump(self._shards[name], fh, protocol=pickle.HIGHEST_PROTOCOL)
            tmp.replace(self.directory / f"{name}.pkl")
        self._dirty.clear()


# =====================================================================================================
# inference over all items
# =====================================================================================================

@dataclass
class ImageRecord:
    """Everything computed for one image (from the cache or fresh)."""

    item: EvalItem
    size: tuple[int, int] | None = None
    stages: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    seconds: dict[str, float] = field(default_factory=dict)
    cpu_seconds: float = float("nan")
    cpu_stages: dict[str, float] = field(default_factory=dict)  # CPU seconds per stage (fresh images only)
    cached: bool = False


def engine_settings(ps) -> dict[str, Any]:
    """The pipeline settings that change a cached stage's value (part of its cache tag)."""
    return {"thr": ps.detector_score_threshold, "max": ps.max_lesions, "nest": ps.nested_containment, "tta": ps.flip_tta,
            "tta_max": ps.flip_tta_max_crops, "merge": merge_rule(ps),
            **({"margin": [float(ps.closeup_crop_margin), float(ps.closeup_min_box_fraction)]}
               if ps.closeup_crop_margin is not None else {}),
            **({"wide": list(ps.widefield)} if ps.widefield_score_threshold > 0 else {})}


def stage_tags(info: ModelInfo, engine_settings: dict[str, Any], item: EvalItem) -> dict[str, tuple[str, str]]:
    """(model tag, key suffix) per stage that applies to this item given the installed models."""
    tags: dict[str, tuple[str, str]] = {"ita": (ITA_VERSION, json.dumps(item.gt_crop_boxes() if item.single_lesion else None))}
    det_ok = info.ok("detector")
    cls_ok = info.ok("classifier")
    need_two_stage = item.classify or item.whole  # labelled images get the product's two-stage score
    if det_ok and (item.detect_eval or need_two_stage):
        tags["det"] = (info.sha256["detector"], "")
    tta = f"|tta={TTA_VERSION}" if engine_settings.get("tta", False) else ""  # flip-averaged values changed with v2
    if engine_settings.get("tta", False) and engine_settings.get("tta_max") is not None:
        tta += f"|tta_max={engine_settings['tta_max']}"  # no flips above this many crops (PipelineSettings.tta_for)
    merge = f"|merge={engine_settings['merge']}" if engine_settings.get("merge", (0.0,))[0] > 0 else ""
    if engine_settings.get("wide"):  # the many-lesion photos' lower score cut keeps more boxes
        merge += f"|wide={engine_settings['wide']}"
    # a close-up's crop context (its margin and the close-up gate) changes the classified stages
    margin = "|margin={:g}@{:g}".format(*engine_settings["margin"]) if "margin" in engine_settings else ""
    if cls_ok and det_ok and need_two_stage:
        tags["cls_det"] = (f"{info.sha256['classifier']}|{info.sha256['detector']}|{engine_settings['thr']}|{engine_settings['max']}"
                           f"|{engine_settings.get('nest', 0.0)}|{engine_settings.get('tta', False)}{tta}{merge}{margin}", "")
    if cls_ok and item.classify:
        tags["cls_gt"] = (f"{info.sha256['classifier']}|tta={engine_settings.get('tta', False)}{tta}{margin}",
                          json.dumps(item.gt_crop_boxes()))
    if info.ok("image_classifier") and item.whole:
        spec = whole_view_spec(info.metadata)  # one model or the ensemble: never the same cache entry
        tags["whole"] = (spec.sha256 if spec else info.sha256["image_classifier"], "")
    if cls_ok and item.whole and (item.gt_crop_boxes() is not None or not item.classify):  # else cls_gt is this view
        tags["frame"] = (f"{info.sha256['classifier']}|tta={engine_settings.get('tta', False)}{tta}", "")
    if info.ok("detector_c2") and item.c2 and (item.detect_eval or need_two_stage):
        tags["c2"] = (info.sha256["detector_c2"], "")
    return tags


_WORKER: dict[str, Any] = {}


def _worker_init(models_dir: str, info: ModelInfo, fast: bool = False) -> None:
    import cv2

    cv2.setNumThreads(1)
    _WORKER["engine"] = Engine(Path(models_dir), info, threads=1, fast=fast)
    _WORKER["startup_cpu"] = time.process_time()  # imports + model loading + fast copies, this worker


def _worker_engine_info() -> tuple[dict[str, dict[str, Any]], float]:
    """(which engine runs each model, this worker's start-up CPU seconds)."""
    return _WORKER["engine"].inference_engine, _WORKER["startup_cpu"]


def _worker_compute(item: EvalItem, stages: list[str], cached_det: dict | None) -> tuple[dict[str, Any] | None, str]:
    return _compute_safely(_WORKER["engine"], item, stages, cached_det)


def _compute_safely(engine: Engine, item: EvalItem, stages: Sequence[str], cached_det: dict | None) -> tuple[dict[str, Any] | None, str]:
    from lesiontriage.errors import LesionTriageError

    try:
        return engine.compute(item, stages, cached_det), ""
    except LesionTriageError as exc:
        return None, str(exc)
    except (OSError, ValueError) as exc:
        return None, f"{item.path}: {exc.__class__.__name__}: {exc}"


def run_inference(items: Sequence[EvalItem], info: ModelInfo, settings: EvalSettings,
                  engine: Engine | None = None, report: dict[str, Any] | None = None) -> list[ImageRecord]:
    """Every stage for every item, from the cache where possible; a progress bar over images.

    ``report`` (optional) receives ``inference_engine``: which engine ran each detector (fast copy or
    eager, with the probe difference), so the evaluation report can say so."""
    from tqdm.auto import tqdm

    cache = PredictionCache(settings.cache_dir)
    ps = pipeline_settings(info)
    eng_settings = engine_settings(ps)
    records: list[ImageRecord] = []
    todo: list[tuple[ImageRecord, list[str], dict[str, tuple[str, str]]]] = []
    for item in items:
        rec = ImageRecord(item)
        tags = stage_tags(info, eng_settings, item)
        stamp = PredictionCache.stamp(item.abs_path)
        missing = []
        for stage, (tag, suffix) in tags.items():
            v = cache.get(stage, tag, f"{stamp}|{suffix}")
            if v is None:
                missing.append(stage)
            else:
                rec.stages[stage] = v
        size = cache.get("size", "v1", stamp)
        if size is not None:
            rec.size = tuple(size)
        if missing or rec.size is None:
            todo.append((rec, missing, tags))
        else:
            rec.cached = True
        records.append(rec)
    log.info("evaluate: %d images, %d need computing, %d fully cached", len(records), len(todo), len(records) - len(todo))

    def store(rec: ImageRecord, tags: dict[str, tuple[str, str]], res: dict[str, Any] | None, err: str) -> None:
        if res is None:
            rec.error = err
            return
        stamp = PredictionCache.stamp(rec.item.abs_path)
        rec.size = res.pop("_size")
        rec.seconds = res.pop("_timings")
        rec.cpu_seconds = float(res.pop("_cpu", float("nan")))
        rec.cpu_stages = res.pop("_cpu_stages", {})
        cache.put("size", "v1", stamp, list(rec.size))
        for stage, value in res.items():
            rec.stages[stage] = value
            tag, suffix = tags[stage]
            cache.put(stage, tag, f"{stamp}|{suffix}", value)

    bar = tqdm(total=len(todo), desc="evaluate (images)", unit="img", disable=not settings.progress or not todo,
               file=sys.stderr, dynamic_ncols=True)
    try:
        if settings.workers > 1 and len(todo) > 4 and info.ok("classifier"):
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            ctx = mp.get_context("spawn")
            with ProcessPoolExecutor(settings.workers, mp_context=ctx, initializer=_worker_init,
                                     initargs=(str(settings.models_dir), info, settings.fast_models)) as pool:
                engine_info = pool.submit(_worker_engine_info)
                futures = [(pool.submit(_worker_compute, rec.item, missing, rec.stages.get("det")), rec, tags)
                           for rec, missing, tags in todo]
                engines, startup_cpu = engine_info.result()  # the first worker has built its engine
                for fut, rec, tags in futures:
                    res, err = fut.result()
                    store(rec, tags, res, err)
                    bar.update(1)
                if report is not None:
                    report.update(inference_engine=engines, startup_cpu_seconds=startup_cpu)
        elif todo:
            c_start = time.process_time()
            engine = engine or Engine(settings.models_dir, info, fast=settings.fast_models)
            if report is not None:
                report.update(inference_engine=engine.inference_engine, startup_cpu_seconds=time.process_time() - c_start)
            for rec, missing, tags in todo:
                bar.set_postfix_str(rec.item.split, refresh=False)
                res, err = _compute_safely(engine, rec.item, missing, rec.stages.get("det"))
                store(rec, tags, res, err)
                bar.update(1)
    finally:
        bar.close()
        cache.flush()
    rescorer = shipped_box_rescorer(info, settings.models_dir, ps)
    for rec in records:  # tables and detection metrics see the product's detections; the raw ones stay beside them
        if "det" in rec.stages and ps.merge_score > 0:
            rec.stages["det_raw"] = rec.stages["det"]
            rec.stages["det"] = merged_detections(rec.stages["det"], merge_rule(ps), rec.size)
        if "det" in rec.stages and rescorer is not None and rec.size:
            det = rec.stages["det"]
            rec.stages["det"] = {**det, "confidence": rescorer.score(det["boxes"], det["scores"], rec.size)}
    n_err = sum(1 for r in records if r.error)
    if n_err:
        log.warning("evaluate: %d images could not be read (listed with status 'error: ...')", n_err)
    return records


# =====================================================================================================
# tables
# =====================================================================================================

def average_views(logit: np.ndarray, sub: np.ndarray, views: int) -> tuple[np.ndarray, np.ndarray]:
    """Per crop, the mean raw malignant logit and softmax(mean sub-type logits) over ``views``
    stacked views ([views * n] rows), as ``TriagePipeline.heads`` + ``classify`` compute them.

    ``outputs`` gives sub-type probabilities, and log-probabilities are the logits minus one
    per-row constant, so softmax(mean log p) = softmax(mean logits) (averaging the probabilities
    instead would not match the product)."""
    n = len(logit) // views
    log_p = np.log(np.clip(sub.astype(np.float64), 1e-38, None)).reshape(views, n, -1).mean(0)
    p = np.exp(log_p - log_p.max(axis=-1, keepdims=True))
    return logit.reshape(views, n).mean(0), (p / p.sum(axis=-1, keepdims=True)).astype(np.float32)


def torch_cat_flips(batch):
    """The batch, its horizontal flips and its vertical flips, concatenated (the pipeline's TTA views)."""
    import torch

    return torch.cat([batch, batch.flip(-1), batch.flip(-2)]).contiguous(memory_format=torch.channels_last)


def _sigmoid(z: np.ndarray | float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=float)))


def _aggregate(ps: Sequence[float], name: str) -> float:
    from lesiontriage.aggregation import aggregate

    return float(aggregate(list(map(float, ps)), name))


def _iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from lesiontriage.evaluate.detection import box_iou

    return box_iou(a, b) if len(a) and len(b) else np.zeros((len(a), len(b)))


@dataclass
class Tables:
    images: pd.DataFrame
    lesions: pd.DataFrame
    detections: pd.DataFrame
    features: np.ndarray  # pooled features of the lesions table's rows (NaN rows where not computed)


@dataclass
class _Kept:
    """The detections the pipeline keeps for one image and their classification."""

    boxes: np.ndarray
    scores: np.ndarray
    p: np.ndarray
    sub: np.ndarray


def _kept(st: dict[str, Any], t_cls: float, kept_threshold: float, max_lesions: int,
          nested_containment: float = 0.0, widefield: tuple[float, int] = (0.0, 0)) -> _Kept | None:
    det = st.get("det")
    if det is None:
        return None
    keep = kept_index(det["scores"], kept_threshold, max_lesions, det["boxes"], nested_containment, widefield)
    cls_det = st.get("cls_det")
    p = _sigmoid(np.asarray(cls_det["logit"], float) / t_cls) if cls_det is not None else np.zeros(0)
    sub = np.asarray(cls_det["sub"], float) if cls_det is not None else np.zeros((0, len(SUBTYPES)))
    return _Kept(det["boxes"][keep], det["scores"][keep], p, sub)


def _image_row(rec: ImageRecord, kept: _Kept | None, t_img: float, kept_threshold: float,
               hybrid: HybridRule | None = None, t_cls: float = 1.0) -> dict[str, Any]:
    """One row of predictions_images.parquet (without the ground-truth-crop columns). ``hybrid``: the
    product's close-up blend of the two-stage score with the whole-image classifier and the lesion
    classifier on the whole frame (lesiontriage.hybrid), as shipped."""
    it, st = rec.item, rec.stages
    ita = st.get("ita") or {}
    row: dict[str, Any] = {
        "split": it.split, "path": it.path, "image_id": it.image_id, "source": it.source, "modality": it.modality,
        "synthetic": it.synthetic, "diagnosis": it.diagnosis, "malignant": it.malignant, "biopsied": it.biopsied,
        "fitzpatrick": it.fitzpatrick, "pair_id": it.pair_id, "status": f"error: {rec.error}" if rec.error else "ok",
        "width": rec.size[0] if rec.size else None, "height": rec.size[1] if rec.size else None, "n_gt": len(it.gt_boxes),
        "seconds": float(sum(rec.seconds.values())) if rec.seconds else float("nan"), "cpu_seconds": rec.cpu_seconds,
        "from_cache": rec.cached,
        "ita": ita.get("ita"), "ita_category": ita.get("category"), "ita_ok": ita.get("ok"), "ita_reason": ita.get("reason"),
    }
    if kept is not None:
        scores = st["det"]["scores"]
        row["det_max_score"] = float(scores.max()) if len(scores) else 0.0
        row["n_detected"] = int(len(kept.boxes))
        row["no_lesion_detected"] = bool(len(kept.boxes) == 0)
        if "cls_det" in st:
            for agg in T.AGGREGATIONS:
                row[T.IMAGE_SCORE_COLUMNS[f"two_stage.{agg}"]] = _aggregate(kept.p, agg)
            row["p_detected_max"] = float(kept.p.max()) if len(kept.p) else 0.0
    whole = st.get("whole")
    if whole is not None:
        z = float(np.asarray(whole["logit"]).reshape(-1)[0])
        row[T.IMAGE_SCORE_COLUMNS["direct.whole"]] = float(_sigmoid(z / t_img))
        row["logit_direct_whole"] = z
    frame = st.get("frame")
    if frame is None and it.whole and it.classify and it.gt_crop_boxes() is None:
        frame = st.get("cls_gt")  # no GT box: the GT-crop stage classified exactly the whole frame (same TTA)
    if frame is not None:
        row[T.IMAGE_SCORE_COLUMNS["direct.frame"]] = float(_sigmoid(float(np.asarray(frame["logit"]).reshape(-1)[0]) / t_cls))
    c2 = st.get("c2")
    if c2 is not None:
        # One-step C=2: image score from the malignant-class boxes (label 2) down to the detector's own
        # score floor (0.05), not the 0.5 display threshold: a triage score must rank images, and with
        # the 0.5 cut almost every image scored 0 (ISIC AUC 0.49 on the --limit 200 run).
        mal = (c2["labels"] == 2) & (c2["scores"] >= C2_SCORE_FLOOR)
        for agg in T.AGGREGATIONS:
            row[T.IMAGE_SCORE_COLUMNS[f"one_step_c2.{agg}"]] = _aggregate(c2["scores"][mal], agg)
    direct = row.get(T.IMAGE_SCORE_COLUMNS["direct.whole"])
    frame_p = row.get(T.IMAGE_SCORE_COLUMNS["direct.frame"])
    views_ready = (direct is not None or hybrid is None or hybrid.whole_image_weight == 0) and \
        (frame_p is not None or hybrid is None or hybrid.full_frame_weight == 0)
    if hybrid is not None and kept is not None and "cls_det" in st and views_ready and rec.size:
        w, h = rec.size
        scale = min(1.0, EVAL_DECODE_MAX_SIDE / max(w, h))  # kept boxes are in the decoded image's pixels
        photo_rule = hybrid.for_photo(kept.boxes, w * scale, h * scale)  # soft gate scales it; None: pure two-stage
        row["hybrid_blended"] = photo_rule is not None
        fraction = largest_box_fraction(kept.boxes, w * scale, h * scale) if len(kept.boxes) else 0.0
        row["hybrid_main_lesion"] = hybrid.uses_main_lesion(fraction) and bool(len(kept.boxes))
        for agg in T.AGGREGATIONS:
            # the lesion term as the pipeline makes it: the aggregate, or the main lesion's p inside the ramp
            two = hybrid.lesion_term(kept.p, kept.scores, agg, fraction)[0]
            row[T.IMAGE_SCORE_COLUMNS[f"hybrid.{agg}"]] = photo_rule.blend(two, direct, frame_p) if photo_rule else two
    return row


EVAL_DECODE_MAX_SIDE = 2048  # Engine.load: the pipeline's decode_max_side


C2_SCORE_FLOOR = 0.05  # = DetectorConfig.box_score_thresh: every malignant box the detector reports


def _detection_rows(rec: ImageRecord, kept: _Kept) -> list[dict[str, Any]]:
    """predictions_detections.parquet rows: every kept detection with its p and best IoU with a GT box."""
    it = rec.item
    iou = _iou_matrix(kept.boxes, np.asarray(it.gt_boxes, float).reshape(-1, 4))
    rows = []
    for j, b in enumerate(kept.boxes):
        rows.append({"split": it.split, "path": it.path, "image_id": it.image_id, "source": it.source,
                     "modality": it.modality, "synthetic": it.synthetic, "det_index": j,
                     "x1": float(b[0]), "y1": float(b[1]), "x2": float(b[2]), "y2": float(b[3]),
                     "detector_score": float(kept.scores[j]),
                     "p_malignant": float(kept.p[j]) if j < len(kept.p) else None,
                     "top_subtype": SUBTYPES[int(np.argmax(kept.sub[j]))] if j < len(kept.sub) else None,
                     "best_iou_gt": float(iou[j].max()) if iou.shape[1] else None,
                     "matched_gt": int(iou[j].argmax()) if iou.shape[1] and iou[j].max() > 0 else None})
    return rows


def _detected_score(it: EvalItem, k: int, crop_boxes: list | None, kept: _Kept, image_score: float) -> dict[str, Any]:
    """The detected-path score of ground-truth lesion k: for a single-lesion photo the product's
    image score (and its best lesion); for a scene lesion the best-overlapping kept detection
    (IoU > 0); 0 when nothing was detected."""
    if crop_boxes is None:  # no GT box (lesion centred): found if anything was kept
        return {"p_detected": image_score, "p_detected_max": float(kept.p.max()) if len(kept.p) else 0.0,
                "detected": bool(len(kept.boxes) > 0), "best_iou": None}
    iou = _iou_matrix(np.asarray(crop_boxes, float).reshape(-1, 4)[k:k + 1], kept.boxes)[0]
    hit = np.flatnonzero(iou > 0)
    best_iou = float(iou.max()) if len(iou) else 0.0
    if it.single_lesion:
        return {"p_detected": image_score, "p_detected_max": float(kept.p.max()) if len(kept.p) else 0.0,
                "detected": bool(len(hit)), "best_iou": best_iou}
    best = int(hit[np.argmax(iou[hit])]) if len(hit) else None
    return {"p_detected": float(kept.p[best]) if best is not None else 0.0,
            "p_detected_max": float(kept.p[hit].max()) if len(hit) else 0.0,
            "detected": best is not None, "best_iou": best_iou}


def _lesion_rows(rec: ImageRecord, row: dict[str, Any], kept: _Kept | None, t_cls: float,
                 default_aggregate: str) -> tuple[list[dict[str, Any]], list[np.ndarray | None]]:
    """predictions_lesions.parquet rows (one per ground-truth crop) and their pooled features."""
    it, gt_cls = rec.item, rec.stages.get("cls_gt")
    if gt_cls is None:
        return [], []
    logits = np.asarray(gt_cls["logit"], float)
    subs = np.asarray(gt_cls["sub"], float)
    feat = np.asarray(gt_cls["feat"], dtype=np.float32)
    crop_boxes = it.gt_crop_boxes()
    image_score = row.get(T.IMAGE_SCORE_COLUMNS[f"two_stage.{default_aggregate}"])
    rows, feats = [], []
    for k in range(len(logits)):
        mal, dx = (it.malignant, it.diagnosis) if it.single_lesion else (it.box_malignant[k], it.box_diagnosis[k])
        box = crop_boxes[k] if crop_boxes else [None] * 4
        lr = {"split": it.split, "path": it.path, "image_id": it.image_id, "source": it.source, "modality": it.modality,
              "synthetic": it.synthetic, "lesion_index": k, "diagnosis": dx, "malignant": mal, "biopsied": it.biopsied,
              "fitzpatrick": it.fitzpatrick, "gt_is_whole_image": crop_boxes is None,
              "x1": box[0], "y1": box[1], "x2": box[2], "y2": box[3],
              "logit_gt": float(logits[k]), "p_gt": float(_sigmoid(logits[k] / t_cls)),
              **{f"sub_{n}": float(subs[k, i]) for i, n in enumerate(SUBTYPES[: subs.shape[1]])},
              "top_subtype": SUBTYPES[int(np.argmax(subs[k]))],
              "ita_category": row["ita_category"], "ita_ok": row["ita_ok"], "ita": row["ita"]}
        if kept is not None and image_score is not None:
            lr.update(_detected_score(it, k, crop_boxes, kept, image_score))
        rows.append(lr)
        feats.append(feat[k] if feat.ndim == 2 and len(feat) > k else None)
    if it.single_lesion and len(logits):
        row["p_gt"], row["logit_gt"] = rows[0]["p_gt"], rows[0]["logit_gt"]
    return rows, feats


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    """Nullable dtypes for labels and flags, so parquet readers see Int8 / boolean, not objects."""
    if "malignant" in df.columns:
        df["malignant"] = pd.array([None if _opt(v) is None else int(v) for v in df["malignant"]], dtype="Int8")
    for col in ("biopsied", "synthetic", "ita_ok", "no_lesion_detected", "detected", "gt_is_whole_image", "from_cache"):
        if col in df.columns:
            df[col] = pd.array([None if _opt(v) is None else bool(v) for v in df[col]], dtype="boolean")
    if "fitzpatrick" in df.columns:
        df["fitzpatrick"] = pd.array([None if _opt(v) is None else int(v) for v in df["fitzpatrick"]], dtype="Int8")
    return df


def build_tables(records: Sequence[ImageRecord], info: ModelInfo, default_aggregate: str = "mean",
                 kept_threshold: float = 0.5, max_lesions: int = MAX_LESIONS, nested_containment: float = 0.0,
                 hybrid: HybridRule | None = None, widefield: tuple[float, int] = (0.0, 0)) -> Tables:
    """Per-image, per-lesion and per-(kept-)detection tables from the inference records; every
    aggregation is computed here from the cached per-lesion probabilities."""
    models = info.metadata.get("models") or {}
    t_cls = float((models.get("classifier") or {}).get("temperature", 1.0))
    spec = whole_view_spec(info.metadata)
    t_img = spec.temperature if spec else 1.0
    img_rows, les_rows, det_rows, feats = [], [], [], []
    for rec in records:
        kept = _kept(rec.stages, t_cls, kept_threshold, max_lesions, nested_containment, widefield)
        row = _image_row(rec, kept, t_img, kept_threshold, hybrid, t_cls)
        if kept is not None:
            det_rows.extend(_detection_rows(rec, kept))
        lr, lf = _lesion_rows(rec, row, kept, t_cls, default_aggregate)
        les_rows.extend(lr)
        feats.extend(lf)
        img_rows.append(row)
    dim = next((len(f) for f in feats if f is not None), 0)
    feat_arr = np.full((len(feats), dim), np.nan, dtype=np.float32)
    for i, f in enumerate(feats):
        if f is not None and dim:
            feat_arr[i] = f
    return Tables(_typed(pd.DataFrame(img_rows)), _typed(pd.DataFrame(les_rows)), pd.DataFrame(det_rows), feat_arr)


# =====================================================================================================
# report sections
# =====================================================================================================

def carry_research_keys(path: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """Keep the headline keys ``lesiontriage research`` merged into an existing summary.json
    (listed under ``research_provenance``), so re-running the evaluation does not erase them."""
    if not path.exists():
        return summary
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return summary
    owned = old.get("research_provenance") or {}
    out = dict(summary)
    for key in owned:
        if key in old and key not in out:
            out[key] = old[key]
    if owned:
        out["research_provenance"] = owned
    return out


def provenance(settings: EvalSettings, info: ModelInfo, manifest_digest: str,
               sampling: dict[str, Any] | None = None) -> dict[str, Any]:
    """What produced a report (every JSON file carries it); ``sampling`` states every cap (n per split)."""
    from lesiontriage import __version__

    return {
        "command": settings.command or "lesiontriage evaluate",
        "manifest_hash": manifest_digest,
        "model_sha256": {k: v for k, v in info.sha256.items()},
        "model_status": info.status,
        # the weights alone do not make the numbers: box rule, lobe merging, close-up blend and TTA do too
        "pipeline": {k: v for k, v in (info.metadata.get("pipeline") or {}).items() if not isinstance(v, (dict, list))},
        "seed": settings.seed,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "package_version": __version__,
        "limit_per_split": settings.limit,
        "sampling": sampling or {},
        "n_boot": settings.n_boot,
        "models_dir": str(settings.models_dir),
        "data_root": str(paths.data_root(settings.data_root)),
        "intended_use": INTENDED_USE,
    }


def report_context(info: ModelInfo, settings: EvalSettings) -> T.ReportContext:
    ps = pipeline_settings(info)
    return T.ReportContext(status=info.status, metadata=info.metadata, default_aggregate=str(ps.default_aggregate),
                           n_boot=settings.n_boot, n_boot_paired=settings.n_boot_paired, n_boot_map=settings.n_boot_map,
                           seed=settings.seed, kept_threshold=float(ps.detector_score_threshold), max_kept=int(ps.max_lesions),
                           nested_containment=float(ps.nested_containment), widefield=ps.widefield,
                           merge=merge_rule(ps))


def detection_sets(records: Sequence[ImageRecord]) -> tuple[dict[str, T.DetectionSet], dict[str, T.DetectionSet]]:
    """Per split with boxes to evaluate: the one-class and the C=2 detector outputs vs ground truth."""
    one: dict[str, T.DetectionSet] = {}
    c2: dict[str, T.DetectionSet] = {}
    for r in records:
        it = r.item
        if not it.detect_eval or r.error:
            continue
        gt = np.asarray(it.gt_boxes, float).reshape(-1, 4)
        for stage, target in (("det", one), ("c2", c2)):
            out = r.stages.get(stage)
            if out is None:
                continue
            d = target.setdefault(it.split, T.DetectionSet([], [], [], [] if stage == "c2" else None, [],
                                                           SPLITS[it.split].description if it.split in SPLITS else "",
                                                           it.synthetic, []))
            d.gt.append(gt)
            d.boxes.append(np.asarray(out["boxes"], float).reshape(-1, 4))
            d.scores.append(np.asarray(out["scores"], float).reshape(-1))
            if stage == "det" and "confidence" in out:
                if d.confidences is None:
                    d.confidences = []
                d.confidences.append(np.asarray(out["confidence"], float).reshape(-1))
            raw = r.stages.get("det_raw") if stage == "det" else None
            if raw is not None:
                if d.unmerged_boxes is None:
                    d.unmerged_boxes, d.unmerged_scores = [], []
                d.unmerged_boxes.append(np.asarray(raw["boxes"], float).reshape(-1, 4))
                d.unmerged_scores.append(np.asarray(raw["scores"], float).reshape(-1))
            if stage == "c2":
                d.labels.append(np.asarray(out["labels"]).reshape(-1))
            d.gt_malignant.append(list(it.box_malignant))
            if d.image_sides is not None:  # None once any image lacks its size (the in-spec recall is skipped)
                if r.size:
                    d.image_sides.append(float(max(r.size)))
                else:
                    d.image_sides = None
    return one, c2


# =====================================================================================================
# report sections (in parallel)
# =====================================================================================================

def _embedding_section(lesions: pd.DataFrame, features: np.ndarray, seed: int) -> tuple[dict[str, Any], pd.DataFrame]:
    """embedding.json's section and embedding.parquet's table."""
    from lesiontriage.evaluate.embedding import embedding_json, embedding_table

    table, info = embedding_table(lesions, features, seed=seed)
    return {**info, "file": TABLE_FILES["embedding"], "map": embedding_json(table)}, table


def section_jobs(tables: Tables, ita_extra: pd.DataFrame, det_sets: tuple[dict, dict], ctx: T.ReportContext,
                 embedding: bool, seed: int) -> dict[str, tuple[Any, tuple]]:
    """{section: (module-level function, its arguments)}, the slowest first (so two workers end
    together): each is independent and seeded by itself, so any process can build it."""
    les, img = tables.lesions, tables.images
    jobs: dict[str, tuple[Any, tuple]] = {
        "detection": (T.detection_section, (*det_sets, ctx)),
        "image_level": (T.image_level_section, (img, ctx)),
        "lesion_level": (T.lesion_level_section, (les, img, ctx)),
        "skin_tone": (T.skin_tone_report, (les, img, ita_extra, ctx)),
        "calibration": (T.calibration_report, (les, img, ctx)),
        "operating_points": (T.operating_points_report, (img, ctx)),
        "error_analysis": (T.error_report, (les, ctx)),
    }
    if embedding and not les.empty and np.isfinite(tables.features).all(axis=1).any():
        jobs = {"embedding": (_embedding_section, (les, tables.features, seed)), **jobs}
    return jobs


def _timed_section(fn: Any, args: tuple) -> tuple[Any, float, float]:
    """(fn(*args), CPU seconds, wall seconds) with single-threaded numpy / scipy / sklearn: the
    sections run side by side (or next to torch), so more threads would only fight for the cores."""
    from threadpoolctl import threadpool_limits

    t, c = time.perf_counter(), time.process_time()
    with threadpool_limits(limits=1):
        out = fn(*args)
    return out, time.process_time() - c, time.perf_counter() - t


def report_sections(jobs: dict[str, tuple[Any, tuple]], workers: int, min_rows: int = 200
                    ) -> tuple[dict[str, Any], dict[str, float], dict[str, float]]:
    """Run the section ``jobs``: in ``min(workers, cores)`` processes when there are at least
    ``min_rows`` image rows (below that, starting the processes costs more than it saves).

    Why: the sections (bootstraps, COCO mAP, t-SNE) are ~2.5 CPU-minutes single-threaded on a
    full run, after the inference has finished with both cores; two processes halve that.
    Returns ({section: result}, {section: CPU s}, {section: wall s})."""
    n_rows = max((len(a) for _, args in jobs.values() for a in args if isinstance(a, pd.DataFrame)), default=0)
    n_proc = max(1, min(int(workers), os.cpu_count() or 1, len(jobs)))
    results: dict[str, tuple[Any, float, float]] = {}
    if n_proc > 1 and n_rows >= min_rows:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(n_proc, mp_context=mp.get_context("spawn")) as pool:
            futures = {name: pool.submit(_timed_section, fn, args) for name, (fn, args) in jobs.items()}
            results = {name: fut.result() for name, fut in futures.items()}
    else:
        results = {name: _timed_section(fn, args) for name, (fn, args) in jobs.items()}
    return ({k: v[0] for k, v in results.items()}, {k: v[1] for k, v in results.items()},
            {k: v[2] for k, v in results.items()})


# =====================================================================================================
# writing
# =====================================================================================================

REPORT_FILES: dict[str, str] = {
    "evaluation": "evaluation.json",
    "lesion_level": "lesion_level.json",
    "detection": "detection.json",
    "image_level": "image_level.json",
    "calibration": "calibration.json",
    "operating_points": "operating_points.json",
    "skin_tone": "skin_tone.json",
    "embedding": "embedding.json",
    "error_analysis": "error_analysis.json",
    "summary": "summary.json",
}
TABLE_FILES: dict[str, str] = {
    "images": "predictions_images.parquet",
    "lesions": "predictions_lesions.parquet",
    "detections": "predictions_detections.parquet",
    "embedding": "embedding.parquet",
}


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(T.jsonable(obj), indent=1, allow_nan=False))
    tmp.replace(path)


def _write_parquet(path: Path, df: pd.DataFrame) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".parquet.tmp")
    df.to_parquet(tmp, index=False)
    tmp.replace(path)


@dataclass
class EvalResult:
    out_dir: Path
    files: dict[str, Path]
    summary: dict[str, Any]
    seconds: dict[str, float]
    n_images: int
    n_computed: int
    tables: Tables


def _stage_means(records: Sequence[ImageRecord], attr: str) -> dict[str, float]:
    """Mean seconds per stage over the freshly computed images that ran it (``attr``: 'seconds' wall
    or 'cpu_stages'); images from the cache were not timed."""
    per: dict[str, list[float]] = {}
    for r in records:
        if r.cached:
            continue
        for k, v in (getattr(r, attr) or {}).items():
            per.setdefault(k, []).append(v)
    return {k: float(np.mean(v)) for k, v in per.items()}


# stage_tags key -> the name its time is recorded under (StageClock); "decode" runs for every image
STAGE_CLOCK: dict[str, str] = {"ita": "ita", "det": "detect", "cls_det": "classify_detected", "cls_gt": "classify_gt",
                               "whole": "whole_image", "frame": "classify_frame", "c2": "detect_c2"}


def full_run_items(manifest: pd.DataFrame, settings: EvalSettings) -> list[EvalItem]:
    """The images a full run (no ``--limit``) evaluates, with the same caps and C=2 sample."""
    full = dataclasses.replace(settings, limit=None)
    items = manifest_items(manifest, full) + scene_items(full)[0]
    mark_c2_sample(items, full.c2_max_per_split, full.seed)
    if full.pad_ita_all and "fitzpatrick" in manifest.columns:
        items += pad_ita_items(manifest, full, {it.path for it in items})
    return items


def stage_counts(items: Sequence[EvalItem], info: ModelInfo) -> dict[str, dict[str, int]]:
    """{split: {clock stage: images that run it}} for these items and the installed models."""
    ps = pipeline_settings(info)
    eng = engine_settings(ps)
    out: dict[str, dict[str, int]] = {}
    for it in items:
        c = out.setdefault(it.split, {"decode": 0})
        c["decode"] += 1
        for stage in stage_tags(info, eng, it):
            c[STAGE_CLOCK[stage]] = c.get(STAGE_CLOCK[stage], 0) + 1
    return out


def _per_split_stage_means(records: Sequence[ImageRecord], attr: str) -> dict[str, dict[str, float]]:
    """{split: {stage: mean seconds}} over freshly computed images (``attr``: 'seconds' or 'cpu_stages')."""
    per: dict[str, dict[str, list[float]]] = {}
    for r in records:
        if r.cached:
            continue
        for stage, v in (getattr(r, attr) or {}).items():
            per.setdefault(r.item.split, {}).setdefault(stage, []).append(v)
    return {sp: {st: float(np.mean(v)) for st, v in d.items()} for sp, d in per.items()}


def _per_image_means(records: Sequence[ImageRecord], attr: str) -> dict[str, float]:
    """{split: mean seconds per freshly computed image, all its stages together}."""
    per: dict[str, list[float]] = {}
    for r in records:
        if not r.cached and getattr(r, attr):
            per.setdefault(r.item.split, []).append(float(sum(getattr(r, attr).values())))
    return {k: float(np.mean(v)) for k, v in per.items()}


def _project(means: dict[str, dict[str, float]], pooled: dict[str, float],
             counts: dict[str, dict[str, int]]) -> dict[str, float]:
    """Seconds per split = sum over stages of (mean seconds of that stage on that split, else over all
    splits) x images of the split that run it in the full run."""
    out: dict[str, float] = {}
    for split, c in counts.items():
        own = means.get(split, {})
        out[split] = float(sum(own.get(st, pooled.get(st, 0.0)) * n for st, n in c.items()))
    return out


# Share of ``cores`` x wall that the single-thread workers turn into image CPU seconds on an idle
# machine (measured 0.95 on the 2-core box: the main process handling results, the queue's tail).
POOL_EFFICIENCY = 0.95


def projected_full_seconds(records: Sequence[ImageRecord], counts: dict[str, dict[str, int]], workers: int,
                           report_cpu: float = 0.0, startup_cpu: float = 0.0) -> dict[str, Any]:
    """Full-run time estimate from a ``--limit`` run: per split and stage, the mean fresh per-image
    CPU seconds x the number of images that run that stage in the full run (so the caps and the C=2
    sample are counted as the full run will apply them).

    Why CPU seconds: wall time on a shared machine measures the other jobs too; CPU time (all
    threads of the worker) much less so. Single-thread workers on ``min(workers, cores)`` cores
    finish the inference in about CPU total / (that many cores x ``POOL_EFFICIENCY``). ``report_cpu``
    (this run's tables + metrics + embedding, all processes) is scaled linearly by the number of
    images and shared by as many section processes: measured ~linear from 1.2k to 2.4k images, but an upper bound for small
    runs, whose fixed per-group bootstrap costs are scaled too. ``startup_cpu``: one worker's imports
    + model loading + fast copies (the workers start together)."""
    wall_m, cpu_m = _per_split_stage_means(records, "seconds"), _per_split_stage_means(records, "cpu_stages")
    wall_pooled, cpu_pooled = _stage_means(records, "seconds"), _stage_means(records, "cpu_stages")
    wall_proj, cpu_proj = _project(wall_m, wall_pooled, counts), _project(cpu_m, cpu_pooled, counts)
    cpu_total = float(sum(cpu_proj.values()))
    cores = max(1, min(int(workers), os.cpu_count() or 1))
    n_run = len(records) or 1
    n_full = sum(c.get("decode", 0) for c in counts.values())
    inference = cpu_total / (cores * POOL_EFFICIENCY) if cores > 1 else cpu_total
    reports = report_cpu * max(1.0, n_full / n_run) / cores  # the sections run in ``cores`` processes
    total = startup_cpu + inference + reports
    return {
        "per_split_mean_wall_seconds": _per_image_means(records, "seconds"),
        "per_split_mean_cpu_seconds": _per_image_means(records, "cpu_stages"),
        "per_split_stage_mean_cpu_seconds": cpu_m,
        "full_counts": {k: int(v.get("decode", 0)) for k, v in counts.items()},
        "full_stage_counts": counts,
        "projected_inference_wall_seconds": wall_proj, "projected_inference_wall_total_seconds": float(sum(wall_proj.values())),
        "projected_inference_cpu_seconds": cpu_proj, "projected_inference_cpu_total_seconds": cpu_total,
        "projected_full_run_wall_seconds": {"startup": startup_cpu, "inference": inference, "reports": reports,
                                            "reports_this_run": report_cpu / cores, "total": total, "minutes": total / 60.0,
                                            "cores_used": cores},
        "note": ("full-run estimate for an otherwise idle machine: inference = projected CPU seconds / (cores used x "
                 f"{POOL_EFFICIENCY}) (one single-thread worker per core); reports = this run's tables + metrics + "
                 "embedding CPU seconds x (full images / run images) / cores used, an upper bound for runs of < ~500 "
                 "images (reports_this_run is the lower bound); startup = one worker's start-up CPU. CPU seconds rise "
                 "~25% when other jobs share the CPU (caches), wall seconds far more, so the projected wall figures "
                 "only describe this run's conditions."),
    }


def sampling_report(settings: EvalSettings, c2_counts: dict[str, dict[str, int]], info: ModelInfo,
                    n_available: dict[str, int]) -> dict[str, Any]:
    """What is evaluated on a sample, and how many images per split (the report states every cap)."""
    c2_ok = info.ok("detector_c2")
    return {
        "limit_per_split": settings.limit,
        "ham_detection_max": settings.ham_detection_max,
        "scenes_max": settings.scenes_max,
        "c2_max_per_split": settings.c2_max_per_split,
        "n_available": n_available,
        "n_evaluated": {k: v["n_images"] for k, v in c2_counts.items()},
        "n_c2": {k: (v["n_c2"] if c2_ok else 0) for k, v in c2_counts.items()},
        "method": ("HAM10000 val: one image per lesion, the lesions train box-merge chose on left out, then a seeded "
                   "sample of ham_detection_max; synthetic scenes: "
                   "a seeded sample of scenes_max; C=2 detector: a seeded, malignant-label-stratified sample of at most "
                   "c2_max_per_split images per split (one_step_c2 scores and the C=2 detection table use only these; "
                   "every other score uses every evaluated image). Seed = provenance.seed. Why: CPU time budget "
                   "(full run < 30 min on 2 cores)."),
    }


def _available_counts(manifest: pd.DataFrame | None, settings: EvalSettings, n_scenes_index: int | None) -> dict[str, int]:
    """Images each split could contribute before any cap (HAM: one per lesion)."""
    if manifest is None or "split" not in manifest.columns:
        return {}
    nocap = dataclasses.replace(settings, limit=None, ham_detection_max=10**9)
    out: dict[str, int] = {}
    for it in manifest_items(manifest, nocap):
        out[it.split] = out.get(it.split, 0) + 1
    if n_scenes_index is not None:
        out["scenes_test"] = n_scenes_index
    return out


def _c2_notes(sampling: dict[str, Any]) -> list[str]:
    """One line per split whose C=2 pass ran on a sample."""
    return [f"C=2 detector ({split}): a seeded, label-stratified sample of {n} of {sampling['n_evaluated'][split]} "
            "images (one_step_c2 scores and the C=2 detection table; CPU time budget)."
            for split, n in sampling["n_c2"].items() if n and n < sampling["n_evaluated"][split]]


def _note_c2_sample(summary: dict[str, Any], sampling: dict[str, Any]) -> None:
    """State the C=2 sample inside the one_step_c2 headline objects (keys unchanged)."""
    n_c2, n_all = sampling["n_c2"].get("isic2018_test"), sampling["n_evaluated"].get("isic2018_test")
    if not n_c2 or n_c2 == n_all:
        return
    for key, obj in summary.items():
        if key.startswith("image_auc.one_step_c2.") and isinstance(obj, dict) and obj.get("value") is not None:
            obj["note"] = (f"C=2 detector run on a seeded, label-stratified sample of {n_c2} of the {n_all} "
                           "isic2018_test images (CPU budget); the other strategies use all of them")


def evaluate(settings: EvalSettings, manifest: pd.DataFrame | None = None,
             items: Sequence[EvalItem] | None = None, engine: Engine | None = None) -> EvalResult:
    """Run everything and write ``settings.out_dir``. ``items`` / ``manifest`` may be given (tests)."""
    from lesiontriage.data.manifest import load_manifest, manifest_hash

    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    info = model_info(settings.models_dir)
    notes: list[str] = []
    if manifest is None:
        manifest = load_manifest(settings.manifest)
    digest = manifest_hash(manifest) if manifest is not None and len(manifest) else ""
    n_scenes_index = None
    if items is None:
        items = manifest_items(manifest, settings)
        scenes, why = scene_items(settings)
        if why:
            notes.append(why)
        else:
            n_scenes_index = len(pd.read_parquet(settings.scenes_path(), columns=["path"]))
        items = list(items) + scenes
    c2_counts = mark_c2_sample(items, settings.c2_max_per_split, settings.seed)
    sampling = sampling_report(settings, c2_counts, info, _available_counts(manifest, settings, n_scenes_index))
    extra_ita_items = pad_ita_items(manifest, settings, {it.path for it in items}) if (settings.pad_ita_all and manifest is not None
                                                                                       and "fitzpatrick" in manifest.columns) else []
    seconds["select"] = time.perf_counter() - t0
    for key in MODEL_KEYS:
        if not info.ok(key):
            notes.append(f"{key}: {info.status[key]}")

    t = time.perf_counter()
    inference_report: dict[str, Any] = {}
    records = run_inference(list(items) + extra_ita_items, info, settings, engine=engine, report=inference_report)
    seconds["inference"] = time.perf_counter() - t
    main_records = [r for r in records if r.item.split != "pad_ufes20_ita_only"]
    extra_records = [r for r in records if r.item.split == "pad_ufes20_ita_only"]

    t, report_cpu0 = time.perf_counter(), time.process_time()
    ps = pipeline_settings(info)
    agg, kept_thr, max_les = str(ps.default_aggregate), float(ps.detector_score_threshold), int(ps.max_lesions)
    nest = float(ps.nested_containment)
    hybrid = HybridRule(float(ps.whole_image_weight), float(ps.closeup_min_box_fraction), float(ps.full_frame_weight),
                        None if ps.closeup_ramp_from is None else float(ps.closeup_ramp_from), bool(ps.no_lesion_views),
                        bool(ps.closeup_ramp_primary_lesion))
    tables = build_tables(main_records, info, agg, kept_thr, max_les, nest, hybrid, ps.widefield)
    ita_extra = build_tables(extra_records, info, agg, kept_thr, max_les, nest, hybrid, ps.widefield).images
    seconds["tables"] = time.perf_counter() - t
    tables_cpu = time.process_time() - report_cpu0

    t = time.perf_counter()
    prov = provenance(settings, info, digest, sampling)
    ctx = report_context(info, settings)
    jobs = section_jobs(tables, ita_extra, detection_sets(main_records), ctx, settings.embedding, settings.seed)
    sections, section_cpu, section_wall = report_sections(jobs, settings.workers)
    emb_table = pd.DataFrame()
    if "embedding" in sections:
        sections["embedding"], emb_table = sections["embedding"]
    else:
        sections["embedding"] = info.missing("classifier") if not info.ok("classifier") else \
            {"status": "not available: no lesion features"}
    seconds["metrics"] = time.perf_counter() - t  # every section, the embedding included, in parallel
    seconds["embedding"] = section_wall.get("embedding", 0.0)  # its own time inside the metrics step
    report_cpu = tables_cpu + sum(section_cpu.values())  # whichever process ran each section

    out_dir = Path(settings.out_dir)
    files: dict[str, Path] = {}
    for key, df in (("images", tables.images), ("lesions", tables.lesions), ("detections", tables.detections),
                    ("embedding", emb_table)):
        if not df.empty:
            files[key] = out_dir / TABLE_FILES[key]
            _write_parquet(files[key], df)
    seconds["total"] = time.perf_counter() - t0
    n_computed = sum(1 for r in records if not r.cached)
    timing = {"seconds": seconds, "report_cpu_seconds": report_cpu, "n_images": len(records), "n_computed": n_computed,
              "workers": settings.workers, "cpu_count": os.cpu_count(),
              "per_stage_mean_seconds": _stage_means(records, "seconds"),
              "per_stage_mean_cpu_seconds": _stage_means(records, "cpu_stages"),
              "inference_engine": inference_report.get("inference_engine") or {},
              "note": "per-image stage times are wall-clock (and CPU) inside one worker; with --workers N, N images run "
                      "at once"}
    if settings.limit and manifest is not None and "split" in manifest.columns:
        timing["projection"] = projected_full_seconds(records, stage_counts(full_run_items(manifest, settings), info),
                                                      settings.workers, report_cpu,
                                                      inference_report.get("startup_cpu_seconds", 0.0))
    summary = T.headline(sections, tables.images, ctx, prov)
    _note_c2_sample(summary, sampling)
    index = {
        "provenance": prov, "intended_use": INTENDED_USE,
        "splits": T.split_summary(tables.images, {k: v.description for k, v in SPLITS.items()}),
        "models": info.status,
        "sampling": sampling,
        "notes": notes + ["Synthetic wide-field scenes are synthetic: reported only under split=scenes_test, never pooled "
                          "with real photos.",
                          "HAM10000 has no test split; the dermoscopy box metrics use its validation split "
                          f"(one image per lesion, <= {settings.ham_detection_max}, none of the lesions the "
                          "lobe-merging rule was chosen on).",
                          f"Synthetic test scenes: a seeded sample of <= {settings.scenes_max} scenes (CPU time budget).",
                          *_c2_notes(sampling)],
        "files": {**{k: v for k, v in REPORT_FILES.items()}, **{k: v for k, v in TABLE_FILES.items()}},
        "timings": timing,
    }
    for key, obj in sections.items():
        obj = obj if isinstance(obj, dict) else {"value": obj}
        _write_json(out_dir / REPORT_FILES[key], {"provenance": prov, **obj})
        files[key] = out_dir / REPORT_FILES[key]
    _write_json(out_dir / REPORT_FILES["evaluation"], index)
    _write_json(out_dir / REPORT_FILES["summary"], carry_research_keys(out_dir / REPORT_FILES["summary"], summary))
    files["evaluation"] = out_dir / REPORT_FILES["evaluation"]
    files["summary"] = out_dir / REPORT_FILES["summary"]
    return EvalResult(out_dir, files, T.jsonable(summary), seconds, len(records), n_computed, tables)
