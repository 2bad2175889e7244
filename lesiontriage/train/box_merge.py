"""Choose the lobe-merging rule (``pipeline.merge_score`` / ``merge_iou``) on validation photos, never test.

Why: on dermoscopy close-ups the detector often boxes a large lesion as two or three overlapping
lobes; none of them has IoU >= 0.5 with the lesion, which costs mAP@0.5, and each lobe is classified
from a crop that shows only part of the lesion. :func:`lesiontriage.box_selection.merge_overlapping`
replaces overlapping confident detections by their union. Merging must not fuse neighbouring moles
on a back photo, nor make the malignancy scores worse, so ``lesiontriage train box-merge`` scores
every candidate (merge score x link IoU x smallest union, as a fraction of the photo) on three
validation sets:

1. detection: HAM10000 validation photos, one per lesion, *excluding* the lesions whose photos the
   evaluation reports as the held-out dermoscopy boxes (``evaluate.run.ham_detection_rows``):
   COCO mAP@0.5 and mAP@[.5:.95] of the merged detections;
2. guarded sets (``GUARDED_SETS``): the real validation mole photos, the synthetic validation scenes
   and the PAD-UFES-20 validation smartphone photos: recall at IoU > 0, one-to-one recall at
   IoU >= 0.5, mAP@0.5 and the number of kept boxes;
3. malignancy: the ``train box-rule`` validation photos (labelled, every source; HAM10000 also
   squashed to the ISIC 2018 test look): macro ROC AUC over source x modality strata of the mean
   lesion probability over the kept boxes (union boxes are classified here).

A candidate replaces "off" only if it gains >= ``min_map_gain`` mAP@0.5 while losing at most
``recall_tolerance`` recall and ``widefield_map_tolerance`` mAP@0.5 on any guarded set and
``auc_tolerance`` macro AUC; the best mAP@0.5 among those wins, and at equal mAP the most conservative
rule (largest area floor, then highest score). The area floor and the mAP guards were added after
the first merge rule, without a floor, cost the real mole *test* photos 0.04 mAP@0.5 (neighbouring
moles whose boxes touch were fused; the validation mole photos had not shown it) and PAD-UFES-20's
test photos 0.035.
The choice and the full table go to ``models/metadata.json``
(``pipeline.box_merge_choice``). Run ``train box-rule``, ``train hybrid`` and ``train tiers`` afterwards:
they score the lesions this rule produces.
"""
from __future__ import annotations

import logging
import pickle
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from lesiontriage.aggregation import aggregate
from lesiontriage.box_selection import MAX_LESIONS, merge_overlapping, select_boxes
from lesiontriage.data.manifest import resolve_path
from lesiontriage.evaluate.detection import coco_map, recall_at_iou
from lesiontriage.paths import MODELS_DIR, RUNS_DIR
from lesiontriage.train.box_rule import (BoxRuleStudy, _load, decision_stamp, photo_sizes, stratum_aucs, study_inputs,
                                         validation_detections)
from lesiontriage.train.tiers import validation_images
from lesiontriage.weights import write_metadata

log = logging.getLogger(__name__)


# Validation sets whose detection quality merging must not lower: the real and synthetic wide-field
# photos (neighbouring moles) and the smartphone close-ups of PAD-UFES-20 (its boxes come from masks;
# the first merge rule cost its test photos 0.035 mAP@0.5).
GUARDED_SETS = ("moles", "scenes", "pad_ufes20")


@dataclass
class BoxMergeStudy:
    """Candidates and the decision criterion."""

    merge_scores: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)
    merge_ious: tuple[float, ...] = (0.0, 0.1, 0.2)
    merge_min_areas: tuple[float, ...] = (0.0, 0.01, 0.05)  # smallest union, as a fraction of the photo
    ham_photos: int = 300  # HAM10000 validation photos (one per lesion, disjoint from the evaluation's sample)
    eval_ham_cap: int = 150  # the held-out-box sample the evaluation reported until stop 21 ...
    eval_seed: int = 0  # ... and its seed: these lesions are excluded here
    seed: int = 0
    score_threshold: float = 0.5  # the shipped detector_score_threshold
    max_lesions: int = MAX_LESIONS
    min_map_gain: float = 0.01
    recall_tolerance: float = 0.005
    widefield_map_tolerance: float = 0.005
    auc_tolerance: float = 0.005


@dataclass
class DetectedPhoto:
    """One validation photo's raw detections (original-image pixels) and ground-truth boxes."""

    kind: str  # "ham10000" or one of GUARDED_SETS
    gt: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    size: tuple[int, int]  # (width, height), original pixels


def ham_rows(manifest: pd.DataFrame, study: BoxMergeStudy) -> pd.DataFrame:
    """HAM10000 validation photos, one per lesion, none of the evaluation's held-out-box lesions."""
    from lesiontriage.evaluate.run import ham_detection_rows

    held_out = set(ham_detection_rows(manifest, study.eval_ham_cap, study.eval_seed)["lesion_id"])
    ham = manifest[(manifest["source"] == "ham10000") & (manifest["split"] == "val") & ~manifest["lesion_id"].isin(held_out)]
    ham = ham.sample(frac=1.0, random_state=study.seed).drop_duplicates("lesion_id")
    return ham.head(study.ham_photos).sort_index()


def _boxes(value: Any) -> np.ndarray:
    return np.asarray([list(b) for b in value] if value is not None else [], dtype=np.float64).reshape(-1, 4)


def detection_photos(pipe, manifest: pd.DataFrame, study: BoxMergeStudy, data_root: Path | None, cache: Path
                     ) -> list[DetectedPhoto]:
    """Raw detections of HAM10000 and the guarded sets (original pixels); cached per detector (the slow part)."""
    if cache.exists():
        return pickle.loads(cache.read_bytes())
    jobs: list[tuple[str, Path, np.ndarray]] = []
    for _, r in ham_rows(manifest, study).iterrows():
        jobs.append(("ham10000", resolve_path(r["path"], data_root), _boxes(r["boxes"])))
    moles = manifest[(manifest["modality"] == "widefield") & (manifest["split"] == "val")]
    for _, r in moles.iterrows():
        jobs.append(("moles", resolve_path(r["path"], data_root), _boxes(r["boxes"])))
    pad = manifest[(manifest["source"] == "pad_ufes20_subset") & (manifest["split"] == "val")]
    for _, r in pad.iterrows():
        if len(_boxes(r["boxes"])):
            jobs.append(("pad_ufes20", resolve_path(r["path"], data_root), _boxes(r["boxes"])))
    scene_dir = RUNS_DIR / "scenes" / "val"
    if (scene_dir / "scenes.parquet").is_file():
        for _, r in pd.read_parquet(scene_dir / "scenes.parquet").iterrows():
            jobs.append(("scenes", scene_dir / str(r["path"]), _boxes(r["boxes"])))
    else:
        log.warning("no validation scenes in %s (run `lesiontriage train hybrid` first): wide-field check on real photos only",
                    scene_dir)
    out = []
    for kind, path, gt in tqdm(jobs, desc="detect validation photos"):
        img = pipe.load(path)
        boxes, scores = pipe.detect_raw(img.rgb)
        out.append(DetectedPhoto(kind, gt, boxes / float(img.scale), scores, (int(img.orig_width), int(img.orig_height))))
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_bytes(pickle.dumps(out))
    return out


def validation_photos(pipe, manifest: pd.DataFrame, data_root: Path | None, study: BoxMergeStudy | None = None
                      ) -> list[DetectedPhoto]:
    """:func:`detection_photos` under the shipped detector's cache name (shared by the merge, box-rescorer
    and many-lesion studies, so the detector runs once per weights)."""
    study = study or BoxMergeStudy()
    det_sha = pipe.metadata["models"]["detector"]["sha256"][:12]
    cache = RUNS_DIR / "box_merge" / f"det_{det_sha}_{study.ham_photos}_{study.seed}_v3.pkl"
    return detection_photos(pipe, manifest, study, data_root, cache)


def detection_scores(photos: list[DetectedPhoto], merge_score: float, merge_iou: float, study: BoxMergeStudy,
                     min_area: float = 0.0) -> dict[str, float]:
    """mAP on the HAM10000 photos and recall / mAP / box counts on each guarded set under one rule."""
    rec: dict[str, float] = {}
    merged = [merge_overlapping(p.boxes, p.scores, merge_score, merge_iou, p.size, min_area) for p in photos]
    ham = [i for i, p in enumerate(photos) if p.kind == "ham10000"]
    if ham:
        m = coco_map([photos[i].gt for i in ham], [merged[i][0] for i in ham], [merged[i][1] for i in ham])
        rec.update(ham_map50=m["map50"], ham_map50_95=m["map50_95"])
    for kind in GUARDED_SETS:
        idx = [i for i, p in enumerate(photos) if p.kind == kind]
        if not idx:
            continue
        kept = []
        for i in idx:
            b, s = merged[i]
            keep = select_boxes(b, s, study.score_threshold, study.max_lesions)
            kept.append((b[keep], s[keep]))
        gt = [photos[i].gt for i in idx]
        rec[f"{kind}_map50"] = coco_map(gt, [merged[i][0] for i in idx], [merged[i][1] for i in idx])["map50"]
        rec[f"{kind}_recall_iou0"] = recall_at_iou(gt, [k[0] for k in kept], [k[1] for k in kept], 0.0).recall
        rec[f"{kind}_recall_iou50"] = recall_at_iou(gt, [k[0] for k in kept], [k[1] for k in kept], 0.5, one_to_one=True).recall
        rec[f"{kind}_kept_per_photo"] = float(np.mean([len(k[1]) for k in kept]))
    return rec


class UnionClassifier:
    """Malignancy of the box-rule validation photos' boxes, classifying union boxes on demand (cached)."""

    def __init__(self, pipe, data_root: Path | None, cache: Path) -> None:
        self.pipe, self.data_root, self.cache = pipe, data_root, cache
        self.known: dict[tuple, float] = pickle.loads(cache.read_bytes()) if cache.exists() else {}

    def p(self, det: dict[str, Any], boxes: np.ndarray) -> np.ndarray:
        keys = [(det["path"], det["squash"], *np.round(b, 2).tolist()) for b in boxes]
        todo = [i for i, k in enumerate(keys) if k not in self.known]
        if todo:
            rgb = _load(self.pipe, pd.Series({"path": det["path"]}), det["squash"], self.data_root).rgb
            batch = self.pipe._crop_batch(rgb, np.asarray(boxes)[todo], self.pipe.classifier.config)
            p = self.pipe.classify(batch, tta=self.pipe.settings.tta_for(len(boxes)))[0]
            self.known.update({keys[i]: float(v) for i, v in zip(todo, p)})
        return np.asarray([self.known[k] for k in keys], dtype=np.float64)

    def save(self) -> None:
        self.cache.parent.mkdir(parents=True, exist_ok=True)
        self.cache.write_bytes(pickle.dumps(self.known))


def malignancy_macro(dets: list[dict[str, Any]], sizes: list[tuple[int, int]], clf: UnionClassifier, merge_score: float,
                     merge_iou: float, min_area: float, study: BoxMergeStudy, nested_containment: float) -> float:
    """Macro AUC over strata of the mean malignancy of the kept (merged) boxes: the two-stage score alone."""
    recs = []
    for d, size in zip(dets, sizes):
        b, s = merge_overlapping(d["boxes"], d["scores"], merge_score, merge_iou, size, min_area)
        keep = select_boxes(b, s, study.score_threshold, study.max_lesions, nested_containment)
        p = clf.p(d, b[keep]) if len(keep) else np.zeros(0)
        recs.append({"stratum": d["stratum"], "y": d["y"], "score": aggregate(p, "mean")})
    return float(np.mean(list(stratum_aucs(pd.DataFrame(recs)).values())))


def choose(table: pd.DataFrame, study: BoxMergeStudy) -> tuple[float, float, float]:
    """(merge_score, merge_iou, merge_min_area): the best mAP@0.5 among candidates that keep wide-field
    recall, wide-field mAP@0.5 and malignancy AUC within tolerance, if it gains ``min_map_gain`` over
    off; else (0, 0, 0)."""
    off = table[table["merge_score"] == 0.0].iloc[0]
    ok = table["ham_map50"] - off["ham_map50"] >= study.min_map_gain
    for kind in GUARDED_SETS:
        col = f"{kind}_recall_iou0"
        if col in table:
            ok &= table[col] >= off[col] - study.recall_tolerance
        col = f"{kind}_map50"
        if col in table:
            ok &= table[col] >= off[col] - study.widefield_map_tolerance
    ok &= table["macro_auc"] >= off["macro_auc"] - study.auc_tolerance
    cand = table[ok & (table["merge_score"] > 0)]
    if cand.empty:
        return 0.0, 0.0, 0.0
    # ties (the same mAP) go to the most conservative rule: the largest area floor, then the highest score
    if "merge_min_area" not in cand:
        cand = cand.assign(merge_min_area=0.0)
    best = cand.sort_values(["ham_map50", "merge_min_area", "merge_score"], ascending=[False, False, False]).iloc[0]
    return float(best["merge_score"]), float(best["merge_iou"]), float(best.get("merge_min_area", 0.0))


def choose_box_merge(models_dir: Path = MODELS_DIR, manifest_path: Path | None = None, data_root: Path | None = None,
                     study: BoxMergeStudy | None = None, command: str = "") -> dict[str, Any]:
    """Run the study and store the chosen rule in metadata.json; returns the decision record."""
    study = study or BoxMergeStudy()
    inputs = study_inputs(models_dir, manifest_path)
    manifest, pipe, meta = inputs.manifest, inputs.pipe, inputs.meta
    det_sha, clf_sha = inputs.sha("detector"), inputs.sha("classifier")
    out_dir = RUNS_DIR / "box_merge"
    photos = validation_photos(pipe, manifest, data_root, study)
    rows = validation_images(manifest, BoxRuleStudy().targets)
    rule_study = BoxRuleStudy(score_threshold=study.score_threshold, max_lesions=study.max_lesions)
    dets = validation_detections(pipe, rows, data_root, rule_study, merged=False)
    sizes = photo_sizes(pipe, dets, data_root, RUNS_DIR / "box_rule" / f"sizes_{len(rows)}.pkl")
    clf = UnionClassifier(pipe, data_root, out_dir / f"p_{det_sha}_{clf_sha}_tta{int(pipe.settings.flip_tta)}.pkl")
    nested = float(pipe.settings.nested_containment)
    table = []
    grid = [(0.0, 0.0, 0.0)] + [(s, i, a) for s in study.merge_scores for i in study.merge_ious for a in study.merge_min_areas]
    for merge_score, merge_iou, min_area in tqdm(grid, desc="merge candidates"):
        rec: dict[str, Any] = {"merge_score": merge_score, "merge_iou": merge_iou, "merge_min_area": min_area}
        rec.update(detection_scores(photos, merge_score, merge_iou, study, min_area))
        rec["macro_auc"] = malignancy_macro(dets, sizes, clf, merge_score, merge_iou, min_area, study, nested)
        table.append(rec)
    clf.save()
    table_df = pd.DataFrame(table)
    merge_score, merge_iou, min_area = choose(table_df, study)
    counts = {k: sum(1 for p in photos if p.kind == k) for k in ("ham10000", *GUARDED_SETS)}
    record = {
        "merge_score": merge_score,
        "merge_iou": merge_iou,
        "merge_min_area": min_area,
        "criterion": (f"best HAM10000 validation mAP@0.5 with a gain >= {study.min_map_gain} over off, wide-field recall "
                      f"(IoU > 0) within {study.recall_tolerance}, wide-field mAP@0.5 within {study.widefield_map_tolerance} "
                      f"and malignancy macro AUC within {study.auc_tolerance}"),
        "chosen_on": (f"validation: {counts['ham10000']} HAM10000 photos (one per lesion, none of the evaluation's held-out-box "
                      f"lesions), {counts['moles']} real mole photos, {counts['scenes']} synthetic scenes, {counts['pad_ufes20']} "
                      f"PAD-UFES-20 smartphone photos; malignancy on "
                      f"{len(rows)} labelled photos + the HAM10000 ones squashed to 224x224"),
        "table": table_df.round(4).to_dict(orient="records"),
        "study": asdict(study),
        **decision_stamp(manifest, meta, command),
    }
    meta.setdefault("pipeline", {})["merge_score"] = merge_score
    meta["pipeline"]["merge_iou"] = merge_iou
    meta["pipeline"]["merge_min_area"] = min_area
    meta["pipeline"]["box_merge_choice"] = record
    write_metadata(models_dir, meta)
    return record
