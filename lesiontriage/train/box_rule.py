"""Choose the box-selection rule (nested-part suppression) on validation photos, never test.

``lesiontriage train box-rule`` runs the shipped detector once per validation photo (every box
down to the detector's own floor), classifies every box that any candidate rule could keep, and
then scores each candidate rule offline: image score = aggregate over the kept boxes, ROC AUC per
source x modality stratum, macro mean. The ISIC 2018 test photos are stored 224x224, squashed
from 4:3, while HAM10000's stored copies are 200x150: so HAM10000 validation photos are also
scored squashed to 224x224 (stratum ``ham10000/dermoscopy_224sq``), the same look as the test
images, without touching them.

The winner is written to ``models/metadata.json`` (``pipeline.nested_containment`` plus the full
table under ``pipeline.box_rule_choice``); a rule replaces "off" only when it gains at least
``min_gain`` macro AUC, so noise cannot switch it on. Run ``train tiers`` afterwards: the tiers
are thresholds on the scores this rule produces.
"""
from __future__ import annotations

import datetime as dt
import logging
import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from sklearn.metrics import roc_auc_score
from tqdm.auto import tqdm

from lesiontriage.aggregation import AGGREGATORS, aggregate
from lesiontriage.box_selection import MAX_LESIONS, select_boxes
from lesiontriage.data.manifest import load_manifest, manifest_hash, resolve_path
from lesiontriage.paths import MODELS_DIR, RUNS_DIR
from lesiontriage.pipeline import PipelineSettings
from lesiontriage.train.tiers import TierTargets, validation_images
from lesiontriage.weights import read_metadata, write_metadata

log = logging.getLogger(__name__)

SQUASHED_STRATUM = "ham10000/dermoscopy_224sq"


@dataclass
class BoxRuleStudy:
    """The candidate rules and the decision criterion."""

    containments: tuple[float, ...] = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9)
    score_threshold: float = 0.5  # the shipped detector_score_threshold (not re-chosen here)
    widefield: tuple[float, int] = (0.0, 0)  # the shipped many-lesion cut (box_selection.effective_threshold)
    detection_floor: float | None = None  # keep detections down to this score (default: the lowest shipped cut)
    max_lesions: int = MAX_LESIONS
    aggregate: str = "mean"  # decide under the default aggregation
    min_gain: float = 0.005
    tta_min_gain: float = 0.002  # flip TTA costs ~2 classifier passes of latency, measured by `bench`
    targets: TierTargets = field(default_factory=TierTargets)


@dataclass
class PhotoDetections:
    """One validation photo: every detection above the score cut with its malignancy."""

    stratum: str
    y: int
    boxes: np.ndarray
    scores: np.ndarray
    p: np.ndarray
    p_tta: np.ndarray | None = None  # the same boxes with flip test-time augmentation


def detection_floor(pipe, study: BoxRuleStudy) -> float:
    """The lowest score any shipped rule can keep: the score cut, or the many-lesion photos' lower cut
    (``study.detection_floor`` when set: a study of lower cuts)."""
    if study.detection_floor is not None:
        return float(study.detection_floor)
    low = float(pipe.settings.widefield_score_threshold)
    return min(study.score_threshold, low) if low > 0 else study.score_threshold


def detection_tag(pipe, rows: pd.DataFrame, study: BoxRuleStudy) -> str:
    """Cache-name part for the validation detections: detector, photo count and (when lowered) the floor."""
    floor = detection_floor(pipe, study)
    suffix = "" if floor == study.score_threshold else f"_f{floor:g}"
    return f"{pipe.metadata['models']['detector']['sha256'][:12]}_{len(rows)}{suffix}"


def _raw_detections(pipe, rows: pd.DataFrame, study: BoxRuleStudy, data_root: Path | None, cache: Path) -> list[dict[str, Any]]:
    """Every detection above the floor (:func:`detection_floor`) per photo (+ HAM10000 squashed); cached per
    detector, because the detector is the slow part and does not change when the classifier does."""
    if cache.exists():
        return pickle.loads(cache.read_bytes())
    jobs = [(r, False) for _, r in rows.iterrows()]
    jobs += [(r, True) for _, r in rows[rows["source"] == "ham10000"].iterrows()]
    floor = detection_floor(pipe, study)
    out = []
    for r, squash in tqdm(jobs, desc="detect validation photos"):
        boxes, scores = pipe.detect_raw(_load(pipe, r, squash, data_root).rgb)
        keep = np.flatnonzero(scores >= floor)[: study.max_lesions * 3]
        out.append({"path": r["path"], "squash": squash, "y": int(r["malignant"]), "boxes": boxes[keep], "scores": scores[keep],
                    "stratum": SQUASHED_STRATUM if squash else f"{r['source']}/{r['modality']}"})
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_bytes(pickle.dumps(out))
    return out


def validation_detections(pipe, rows: pd.DataFrame, data_root: Path | None, study: BoxRuleStudy | None = None,
                          merged: bool = True) -> list[dict[str, Any]]:
    """The validation photos' detections above the score cut (cached per detector), with the
    pipeline's lobe merging applied (``merged``; the merge study itself needs them raw)."""
    study = study or BoxRuleStudy()
    dets = _raw_detections(pipe, rows, study, data_root, RUNS_DIR / "box_rule" / f"det_{detection_tag(pipe, rows, study)}.pkl")
    if not merged:
        return dets
    sizes = photo_sizes(pipe, dets, data_root, RUNS_DIR / "box_rule" / f"sizes_{len(rows)}.pkl")
    out = []
    for d, size in zip(dets, sizes):
        boxes, scores = pipe.box_selection.merge(d["boxes"], d["scores"], size)
        out.append({**d, "boxes": boxes, "scores": scores})
    return out


def photo_sizes(pipe, dets: list[dict[str, Any]], data_root: Path | None, cache: Path) -> list[tuple[int, int]]:
    """(width, height) of each validation photo as the detector saw it (the boxes' pixels); cached."""
    known: dict[tuple[str, bool], tuple[int, int]] = pickle.loads(cache.read_bytes()) if cache.exists() else {}
    missing = [d for d in dets if (d["path"], d["squash"]) not in known]
    for d in tqdm(missing, desc="validation photo sizes", disable=not missing):
        rgb = _load(pipe, pd.Series({"path": d["path"]}), d["squash"], data_root).rgb
        known[(d["path"], d["squash"])] = (int(rgb.shape[1]), int(rgb.shape[0]))
    if missing:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_bytes(pickle.dumps(known))
    return [known[(d["path"], d["squash"])] for d in dets]


def merge_tag(settings: PipelineSettings) -> str:
    """Cache-name suffix for results that depend on the lobe-merging rule ('' when off)."""
    if settings.merge_score <= 0:
        return ""
    return f"_m{settings.merge_score:g}-{settings.merge_iou:g}-{settings.merge_min_area:g}"


def _load(pipe, r: pd.Series, squash: bool, data_root: Path | None):
    path = resolve_path(r["path"], data_root)
    if not squash:
        return pipe.load(path)
    with Image.open(path) as im:
        return pipe.load(im.convert("RGB").resize((224, 224), Image.BILINEAR), name=str(path))


def collect(pipe, rows: pd.DataFrame, study: BoxRuleStudy, data_root: Path | None, cache_dir: Path,
            margin: float | None = None) -> list[PhotoDetections]:
    """Detections + per-box malignancy (the shipped classifier, temperature-scaled) for every photo, every crop with
    the classifier's trained context margin, or ``margin`` (the close-up margin study of ``train hybrid``)."""
    meta = pipe.metadata["models"]
    tag = detection_tag(pipe, rows, study)
    trained = float(pipe.classifier.config.crop_margin)
    margin = trained if margin is None else float(margin)
    margin_tag = "" if margin == trained else f"_c{margin:g}"
    classified = cache_dir / f"photos_{tag}_{meta['classifier']['sha256'][:12]}{merge_tag(pipe.settings)}{margin_tag}.pkl"
    if classified.exists():  # re-deciding with other candidates costs no network run
        return pickle.loads(classified.read_bytes())
    dets = validation_detections(pipe, rows, data_root, study)
    photos = []
    for d in tqdm(dets, desc="classify detections"):
        if len(d["boxes"]):
            rgb = _load(pipe, pd.Series({"path": d["path"]}), d["squash"], data_root).rgb
            batch = pipe._crop_batch(rgb, d["boxes"], pipe.classifier.config, margin=margin)
            p, p_tta = pipe.classify(batch)[0], pipe.classify(batch, tta=True)[0]
        else:
            p = p_tta = np.zeros(0)
        photos.append(PhotoDetections(d["stratum"], d["y"], d["boxes"], d["scores"], np.asarray(p, dtype=np.float64),
                                      np.asarray(p_tta, dtype=np.float64)))
    classified.write_bytes(pickle.dumps(photos))
    return photos


def stratum_aucs(df: pd.DataFrame) -> dict[str, float]:
    """ROC AUC per ``stratum`` of a frame with ``stratum``, ``y`` and ``score`` columns (strata with one class
    only are skipped): the one criterion of the validation studies (box rule, close-up blend, product check)."""
    return {str(s): float(roc_auc_score(g["y"], g["score"])) for s, g in df.groupby("stratum") if 0 < g["y"].sum() < len(g)}


def score_rule(photos: list[PhotoDetections], containment: float, agg: str, score_threshold: float,
               max_lesions: int, tta: bool = False, widefield: tuple[float, int] = (0.0, 0)) -> pd.DataFrame:
    """Image score per photo under one rule."""
    recs = []
    for ph in photos:
        keep = select_boxes(ph.boxes, ph.scores, score_threshold, max_lesions, containment, widefield)
        p = ph.p_tta if tta and len(keep) <= PipelineSettings.flip_tta_max_crops else ph.p  # the pipeline's rule
        recs.append({"stratum": ph.stratum, "y": ph.y, "score": aggregate(p[keep], agg), "n": len(keep)})
    return pd.DataFrame(recs)


def rule_table(photos: list[PhotoDetections], study: BoxRuleStudy) -> pd.DataFrame:
    """AUC per stratum, macro mean and mean lesion count for every containment x aggregation."""
    rows = []
    ttas = (False, True) if all(ph.p_tta is not None for ph in photos) else (False,)
    for c, tta, agg in ((c, t, a) for c in study.containments for t in ttas for a in AGGREGATORS):
        df = score_rule(photos, c, agg, study.score_threshold, study.max_lesions, tta, study.widefield)
        rec: dict[str, Any] = {"containment": c, "flip_tta": tta, "aggregate": agg, "mean_lesions": float(df["n"].mean())}
        aucs = stratum_aucs(df)
        rec.update(aucs)
        rec["macro"] = float(np.mean(list(aucs.values())))
        rows.append(rec)
    return pd.DataFrame(rows)


def choose(table: pd.DataFrame, study: BoxRuleStudy) -> tuple[float, bool]:
    """(containment, flip_tta): the containment with the best macro AUC under the default
    aggregation without TTA, if it beats "off" by min_gain; then TTA if it adds tta_min_gain there."""
    t = table[table["aggregate"] == study.aggregate]
    if "flip_tta" not in t:
        t = t.assign(flip_tta=False)
    plain = t[~t["flip_tta"].astype(bool)].set_index("containment")["macro"]
    best = float(plain.idxmax())
    chosen = best if plain[best] - plain.get(0.0, -1.0) >= study.min_gain else 0.0
    with_tta = t[t["flip_tta"].astype(bool) & (t["containment"] == chosen)]["macro"]
    tta = bool(len(with_tta) and float(with_tta.iloc[0]) - float(plain[chosen]) >= study.tta_min_gain)
    return chosen, tta


@dataclass
class StudyInputs:
    """What every validation study starts from: the manifest, the shipped pipeline and its metadata."""

    manifest: pd.DataFrame
    pipe: Any  # TriagePipeline (imported lazily: the pipeline imports this package's neighbours)
    meta: dict[str, Any]

    def sha(self, model: str) -> str:
        """The first 12 hex digits of a shipped model's sha256 (cache names)."""
        return str(self.meta["models"][model]["sha256"])[:12]


def study_inputs(models_dir: Path, manifest_path: Path | None) -> StudyInputs:
    """Load the manifest, the shipped pipeline (no whole-image classifier) and metadata.json."""
    from lesiontriage.pipeline import TriagePipeline

    return StudyInputs(load_manifest(manifest_path), TriagePipeline.from_dir(models_dir, load_image_classifier=False),
                       read_metadata(models_dir))


def decision_stamp(manifest: pd.DataFrame, meta: dict[str, Any], command: str) -> dict[str, Any]:
    """What a validation decision was made from: manifest, detector + classifier weights, command, date."""
    return {"manifest_hash": manifest_hash(manifest),
            "model_sha256": {k: meta["models"][k]["sha256"] for k in ("detector", "classifier")},
            "command": command, "date": dt.date.today().isoformat()}


def choose_box_rule(models_dir: Path = MODELS_DIR, manifest_path: Path | None = None, data_root: Path | None = None,
                    study: BoxRuleStudy | None = None, command: str = "") -> dict[str, Any]:
    """Run the study and store the chosen rule in metadata.json; returns the decision record."""
    from lesiontriage.pipeline import TriagePipeline

    manifest = load_manifest(manifest_path)
    pipe = TriagePipeline.from_dir(models_dir, load_image_classifier=False)
    study = study or BoxRuleStudy(widefield=pipe.settings.widefield)
    rows = validation_images(manifest, study.targets)
    meta = read_metadata(models_dir)
    photos = collect(pipe, rows, study, data_root, RUNS_DIR / "box_rule")
    table = rule_table(photos, study)
    chosen, tta = choose(table, study)
    record = {
        "nested_containment": chosen,
        "flip_tta": tta,
        "criterion": (f"macro ROC AUC over source x modality strata, {study.aggregate} aggregation; a rule replaces "
                      f"'off' only with a gain >= {study.min_gain}"),
        "chosen_on": (f"validation split: {len(rows)} labelled photos ({int(rows['malignant'].sum())} malignant) + "
                      f"the HAM10000 ones squashed to 224x224 ({SQUASHED_STRATUM}, the ISIC 2018 test look)"),
        "table": table.round(4).to_dict(orient="records"),
        "study": {k: v for k, v in asdict(study).items() if k != "targets"},
        **decision_stamp(manifest, meta, command),
    }
    meta.setdefault("pipeline", {})["nested_containment"] = chosen
    meta["pipeline"]["flip_tta"] = tta
    meta["pipeline"]["box_rule_choice"] = record
    write_metadata(models_dir, meta)
    return record
