"""Choose the many-lesion photos' score cut (``pipeline.widefield_score_threshold`` / ``widefield_min_lesions``)
on validation photos, never test.

Why: one detector score cut (0.5) serves two kinds of photo. On a close-up, a box scored 0.3-0.5 is
mostly a fragment of the one lesion or skin texture; on a back with a dozen moles it is mostly a
small, faint mole (the validation mole photos lost 3% recall to it, the test ones 12%, mostly moles
under 1.5% of the photo side). :func:`lesiontriage.box_selection.effective_threshold` lowers the cut
on photos with at least ``min_lesions`` detections at the normal cut. ``lesiontriage train
widefield-rule`` scores each candidate (cut x minimum count) on:

1. detection: the validation photos of ``train box-merge`` and ``train box-rescorer`` (real mole
   photos, synthetic scenes, PAD-UFES-20, HAM10000), lobes merged as shipped: recall at IoU > 0,
   precision (kept boxes overlapping a lesion) and kept boxes per photo;
2. malignancy: the ``train box-rule`` validation photos (every labelled source, HAM10000 also
   squashed): macro ROC AUC of the mean over the kept boxes, and the synthetic validation scenes'
   ROC AUC (any malignant lesion), since the rule acts mostly on many-lesion photos.

A candidate replaces "off" only if it gains at least ``min_recall_gain`` recall on the real mole
photos, loses no recall on any other set, keeps wide-field precision within ``precision_tolerance``
and both AUCs within their tolerances; the best mole recall wins, ties going to the most
conservative rule (more lesions required, then the higher cut). Run ``train hybrid`` and ``train
tiers`` afterwards (they score the lesions this rule keeps), then ``lesiontriage evaluate``.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score
from tqdm.auto import tqdm

from lesiontriage.aggregation import aggregate
from lesiontriage.box_selection import MAX_LESIONS, merge_overlapping, select_boxes
from lesiontriage.evaluate.detection import box_iou, recall_at_iou
from lesiontriage.paths import MODELS_DIR, RUNS_DIR
from lesiontriage.train.box_merge import DetectedPhoto, UnionClassifier, validation_photos
from lesiontriage.train.box_rescorer import BoxRescorerConfig, extra_scene_photos
from lesiontriage.train.box_rule import BoxRuleStudy, decision_stamp, stratum_aucs, study_inputs, validation_detections
from lesiontriage.train.tiers import validation_images
from lesiontriage.weights import write_metadata

log = logging.getLogger(__name__)

DETECTION_SETS = ("moles", "scenes", "pad_ufes20", "ham10000")
WIDEFIELD_SETS = ("moles", "scenes")


@dataclass
class WidefieldStudy:
    """Candidates and the decision criterion."""

    thresholds: tuple[float, ...] = (0.4, 0.3, 0.2)
    min_lesions: tuple[int, ...] = (3, 5, 8)
    min_recall_gain: float = 0.01  # on the real validation mole photos
    recall_tolerance: float = 0.0  # every other set
    precision_tolerance: float = 0.05  # kept boxes on mole photos + scenes that overlap a lesion
    auc_tolerance: float = 0.005  # box-rule photos' macro AUC
    scene_auc_tolerance: float = 0.01
    score_threshold: float = 0.5
    max_lesions: int = MAX_LESIONS


@dataclass
class ScenePhoto:
    """A synthetic validation scene: merged detections, label and the path to classify its boxes."""

    path: str
    y: int
    boxes: np.ndarray
    scores: np.ndarray


def _merge(pipe, boxes: np.ndarray, scores: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    s = pipe.settings
    return merge_overlapping(boxes, scores, s.merge_score, s.merge_iou, size, s.merge_min_area)


def detection_scores(photos: list[tuple[DetectedPhoto, np.ndarray, np.ndarray]], rule: tuple[float, int],
                     study: WidefieldStudy) -> dict[str, float]:
    """Recall (IoU > 0), precision and kept boxes per photo of each set under one rule."""
    out: dict[str, float] = {}
    for kind in DETECTION_SETS:
        group = [(p, b, s) for p, b, s in photos if p.kind == kind]
        if not group:
            continue
        kept_b, kept_s, hits, n = [], [], 0, 0
        for p, b, s in group:
            keep = select_boxes(b, s, study.score_threshold, study.max_lesions, 0.0, rule)
            kept_b.append(b[keep])
            kept_s.append(s[keep])
            if len(keep) and len(p.gt):
                hits += int((box_iou(b[keep], p.gt).max(axis=1) > 0).sum())
            n += len(keep)
        out[f"{kind}_recall"] = recall_at_iou([p.gt for p, _, _ in group], kept_b, kept_s, 0.0).recall
        out[f"{kind}_precision"] = hits / max(n, 1)
        out[f"{kind}_kept_per_photo"] = n / len(group)
    return out


def scene_photos(pipe, base: list[DetectedPhoto], extra: list[DetectedPhoto]) -> list[ScenePhoto]:
    """Box-merge's validation scenes (``base``) and the rescorer's extra ones (``extra``), whose raw detections
    are already cached in their index order, with labels and paths and lobes merged as shipped."""
    out = []
    for folder, dets in (("val", base), ("val_rescorer", extra)):
        index_path = RUNS_DIR / "scenes" / folder / "scenes.parquet"
        if not dets or not index_path.is_file():
            continue
        index = pd.read_parquet(index_path).head(len(dets))
        for det, (_, r) in zip(dets, index.iterrows()):
            b, s = _merge(pipe, det.boxes, det.scores, det.size)
            out.append(ScenePhoto(str(RUNS_DIR / "scenes" / folder / str(r["path"])), int(bool(r["any_malignant"])), b, s))
    return out


def scene_auc(scenes: list[ScenePhoto], clf: UnionClassifier, rule: tuple[float, int], study: WidefieldStudy) -> float:
    """ROC AUC (any malignant lesion) of the mean malignancy over each scene's kept boxes."""
    ys, scores = [], []
    for sc in scenes:
        keep = select_boxes(sc.boxes, sc.scores, study.score_threshold, study.max_lesions, 0.0, rule)
        p = clf.p({"path": sc.path, "squash": False}, sc.boxes[keep]) if len(keep) else np.zeros(0)
        ys.append(sc.y)
        scores.append(aggregate(p, "mean"))
    return float(roc_auc_score(ys, scores)) if 0 < sum(ys) < len(ys) else float("nan")


def malignancy_macro(dets: list[dict[str, Any]], clf: UnionClassifier, rule: tuple[float, int], study: WidefieldStudy,
                     nested: float) -> float:
    """Macro AUC over the box-rule strata of the mean malignancy of the kept boxes."""
    recs = []
    for d in dets:
        keep = select_boxes(d["boxes"], d["scores"], study.score_threshold, study.max_lesions, nested, rule)
        p = clf.p(d, d["boxes"][keep]) if len(keep) else np.zeros(0)
        recs.append({"stratum": d["stratum"], "y": d["y"], "score": aggregate(p, "mean")})
    return float(np.mean(list(stratum_aucs(pd.DataFrame(recs)).values())))


def choose(table: pd.DataFrame, study: WidefieldStudy) -> tuple[float, int]:
    """(cut, minimum count) by the criterion of the module docstring; (0, 0) = off."""
    off = table[table["threshold"] == 0.0].iloc[0]
    ok = table["moles_recall"] - off["moles_recall"] >= study.min_recall_gain
    for kind in DETECTION_SETS:
        col = f"{kind}_recall"
        if col in table and kind != "moles":
            ok &= table[col] >= off[col] - study.recall_tolerance
    ok &= table["widefield_precision"] >= off["widefield_precision"] - study.precision_tolerance
    ok &= table["macro_auc"] >= off["macro_auc"] - study.auc_tolerance
    if "scene_auc" in table:
        ok &= table["scene_auc"] >= off["scene_auc"] - study.scene_auc_tolerance
    cand = table[ok & (table["threshold"] > 0)]
    if cand.empty:
        return 0.0, 0
    best = cand.sort_values(["moles_recall", "min_lesions", "threshold"], ascending=[False, False, False]).iloc[0]
    return float(best["threshold"]), int(best["min_lesions"])


def choose_widefield_rule(models_dir: Path = MODELS_DIR, manifest_path: Path | None = None, data_root: Path | None = None,
                          study: WidefieldStudy | None = None, command: str = "") -> dict[str, Any]:
    """Run the study and store the chosen rule in metadata.json; returns the decision record."""
    study = study or WidefieldStudy()
    inputs = study_inputs(models_dir, manifest_path)
    manifest, pipe, meta = inputs.manifest, inputs.pipe, inputs.meta
    det_sha, clf_sha = inputs.sha("detector"), inputs.sha("classifier")
    rescorer_cfg = BoxRescorerConfig()
    photos = validation_photos(pipe, manifest, data_root)
    extra = extra_scene_photos(pipe, manifest, rescorer_cfg, data_root, det_sha)
    merged = [(p, *_merge(pipe, p.boxes, p.scores, p.size)) for p in photos + extra]
    # the box-rule photos' detections down to the lowest candidate cut, lobes merged as shipped
    rows = validation_images(manifest, BoxRuleStudy().targets)
    dets = validation_detections(pipe, rows, data_root, BoxRuleStudy(detection_floor=min(study.thresholds)))
    clf = UnionClassifier(pipe, data_root, RUNS_DIR / "box_merge" / f"p_{det_sha}_{clf_sha}_tta{int(pipe.settings.flip_tta)}.pkl")
    scenes = scene_photos(pipe, [p for p in photos if p.kind == "scenes"], extra)
    nested = float(pipe.settings.nested_containment)
    table = []
    grid = [(0.0, 0)] + [(t, m) for t in study.thresholds for m in study.min_lesions]
    for rule in tqdm(grid, desc="many-lesion rules"):
        rec: dict[str, Any] = {"threshold": rule[0], "min_lesions": rule[1]}
        rec.update(detection_scores(merged, rule, study))
        wide = [(p, b, s) for p, b, s in merged if p.kind in WIDEFIELD_SETS]
        w = detection_scores(wide, rule, study)
        kept = sum(w[f"{k}_kept_per_photo"] * sum(1 for p, _, _ in wide if p.kind == k) for k in WIDEFIELD_SETS)
        rec["widefield_precision"] = float(sum(w[f"{k}_precision"] * w[f"{k}_kept_per_photo"] *
                                               sum(1 for p, _, _ in wide if p.kind == k) for k in WIDEFIELD_SETS) / max(kept, 1))
        rec["macro_auc"] = malignancy_macro(dets, clf, rule, study, nested)
        rec["scene_auc"] = scene_auc(scenes, clf, rule, study)
        table.append(rec)
        clf.save()
    table_df = pd.DataFrame(table)
    threshold, min_lesions = choose(table_df, study)
    counts = {k: sum(1 for p, _, _ in merged if p.kind == k) for k in DETECTION_SETS}
    record = {
        "widefield_score_threshold": threshold,
        "widefield_min_lesions": min_lesions,
        "criterion": (f"best real-mole recall (IoU > 0) with a gain >= {study.min_recall_gain} over off; no other set's "
                      f"recall lower; wide-field precision within {study.precision_tolerance}; box-rule macro AUC within "
                      f"{study.auc_tolerance}; validation-scene AUC within {study.scene_auc_tolerance}"),
        "chosen_on": (f"validation: {counts['moles']} real mole photos, {counts['scenes']} synthetic scenes, "
                      f"{counts['pad_ufes20']} PAD-UFES-20 and {counts['ham10000']} HAM10000 photos (detection); "
                      f"{len(rows)} labelled photos + the HAM10000 ones squashed (malignancy)"),
        "table": table_df.round(4).to_dict(orient="records"),
        "study": asdict(study),
        **decision_stamp(manifest, meta, command),
    }
    meta.setdefault("pipeline", {})["widefield_score_threshold"] = threshold
    meta["pipeline"]["widefield_min_lesions"] = min_lesions
    meta["pipeline"]["widefield_rule_choice"] = record
    write_metadata(models_dir, meta)
    return record
