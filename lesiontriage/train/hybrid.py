"""Choose the close-up blend (lesiontriage.hybrid) on validation photos, never test.

``lesiontriage train hybrid``:

1. **Gate.** Runs the shipped detector + box selection on the wide-field validation photos (the
   real mole photos of the val split and synthetic val scenes, generated here when absent) and sets
   ``closeup_min_box_fraction`` to the smallest candidate above the largest-box fraction of every
   one of them: the whole-image classifier was trained on close-ups only and must not score scenes.
2. **Weight.** On the labelled validation photos of ``train box-rule`` (the same cached detections
   and flip-TTA lesion probabilities) plus the whole-image classifier's p per photo, scores every
   candidate weight with that gate: image score per photo, ROC AUC per source x modality stratum,
   macro mean under the default aggregation. A weight replaces 0 (the pure two-stage score) only
   with a gain >= ``min_gain``.

Writes ``pipeline.whole_image_weight``, ``pipeline.closeup_min_box_fraction`` and the table under
``pipeline.hybrid_choice`` in ``models/metadata.json``. Run ``train tiers`` afterwards: the tiers
are thresholds on the scores this rule produces.
"""
from __future__ import annotations

import datetime as dt
import pickle
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score
from tqdm.auto import tqdm

from lesiontriage.aggregation import aggregate
from lesiontriage.box_selection import select_boxes
from lesiontriage.data.manifest import load_manifest, manifest_hash, resolve_path
from lesiontriage.errors import ModelError
from lesiontriage.hybrid import HybridRule, largest_box_fraction
from lesiontriage.paths import MODELS_DIR, RUNS_DIR
from lesiontriage.pipeline import _to_tensor
from lesiontriage.train.box_rule import BoxRuleStudy, _load, collect
from lesiontriage.train.tiers import validation_images
from lesiontriage.weights import read_metadata, write_metadata


@dataclass
class HybridStudy:
    """Candidates and decision criterion."""

    weights: tuple[float, ...] = (0.0, 0.25, 0.4, 0.5, 0.6, 0.75)
    gates: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5)
    aggregate: str = "mean"
    min_gain: float = 0.005
    val_scenes: int = 40  # synthetic validation scenes for the gate (seed 3)
    scene_seed: int = 3


@dataclass
class CloseUp:
    """One labelled validation photo: kept lesions' p (flip TTA as shipped), sizes, whole-image p."""

    stratum: str
    y: int
    lesion_p: np.ndarray
    box_fraction: float
    whole_p: float


def choose_gate(widefield_fractions: list[float], gates: tuple[float, ...]) -> float:
    """The smallest candidate gate above every wide-field photo's largest-box fraction."""
    top = max(widefield_fractions, default=0.0)
    above = [g for g in sorted(gates) if g > top]
    return above[0] if above else float("inf")


def score_table(photos: list[CloseUp], weights: tuple[float, ...], gate: float, agg: str) -> pd.DataFrame:
    """Macro / per-stratum AUC and the share of photos blended, for every weight at this gate."""
    rows = []
    for w in weights:
        rule = HybridRule(w, gate)
        recs = []
        for ph in photos:
            s = aggregate(ph.lesion_p, agg) if len(ph.lesion_p) else 0.0
            blended = w > 0 and len(ph.lesion_p) > 0 and ph.box_fraction >= gate
            recs.append({"stratum": ph.stratum, "y": ph.y, "score": rule.blend(s, ph.whole_p) if blended else s,
                         "blended": blended})
        df = pd.DataFrame(recs)
        aucs = {str(k): float(roc_auc_score(g["y"], g["score"])) for k, g in df.groupby("stratum") if 0 < g["y"].sum() < len(g)}
        rows.append({"whole_image_weight": w, "closeup_min_box_fraction": gate, "blended_share": float(df["blended"].mean()),
                     **aucs, "macro": float(np.mean(list(aucs.values())))})
    return pd.DataFrame(rows)


def choose_weight(table: pd.DataFrame, min_gain: float) -> float:
    best = table.loc[table["macro"].idxmax()]
    off = float(table.loc[table["whole_image_weight"] == 0.0, "macro"].iloc[0])
    return float(best["whole_image_weight"]) if float(best["macro"]) - off >= min_gain else 0.0


def _widefield_fractions(pipe, manifest: pd.DataFrame, study: HybridStudy, data_root: Path | None) -> list[dict[str, Any]]:
    from lesiontriage.data.scenes import generate_scenes

    scene_dir = RUNS_DIR / "scenes" / "val"
    scenes = sorted(scene_dir.glob(f"scene_val_{study.scene_seed}_*.jpg"))
    if len(scenes) < study.val_scenes:
        generate_scenes(study.val_scenes, seed=study.scene_seed, split="val", out_dir=scene_dir, manifest=manifest,
                        data_root=data_root, workers=2)
        scenes = sorted(scene_dir.glob(f"scene_val_{study.scene_seed}_*.jpg"))
    moles = manifest[(manifest["modality"] == "widefield") & (manifest["split"] == "val")]
    paths = [(str(resolve_path(p, data_root)), "real") for p in moles["path"]] + [(str(p), "synthetic") for p in scenes]
    out = []
    for path, kind in tqdm(paths, desc="wide-field validation photos"):
        img = pipe.load(path)
        boxes, _ = pipe.detect(img.rgb)
        h, w = img.rgb.shape[:2]
        out.append({"path": path, "kind": kind, "n_lesions": int(len(boxes)), "largest_box_fraction": largest_box_fraction(boxes, w, h)})
    return out


def _closeups(pipe, rows: pd.DataFrame, data_root: Path | None, cache: Path) -> list[CloseUp]:
    """The box-rule study's cached detections + the whole-image p and image size per photo."""
    study = BoxRuleStudy()
    photos = collect(pipe, rows, study, data_root, RUNS_DIR / "box_rule")
    dets = pickle.loads(next((RUNS_DIR / "box_rule").glob(f"det_{pipe.metadata['models']['detector']['sha256'][:12]}_{len(rows)}.pkl")).read_bytes())
    if cache.exists():
        extra = pickle.loads(cache.read_bytes())
    else:
        extra = []
        for d in tqdm(dets, desc="whole-image classifier"):
            img = _load(pipe, pd.Series({"path": d["path"]}), d["squash"], data_root)
            batch = pipe._normalise([_to_tensor(img.rgb)], pipe.image_classifier.config)
            p = float(pipe.classify(batch, pipe.image_classifier, pipe.image_clf_meta)[0][0])
            extra.append({"whole_p": p, "width": img.rgb.shape[1], "height": img.rgb.shape[0]})
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_bytes(pickle.dumps(extra))
    s = pipe.settings
    out = []
    for ph, e in zip(photos, extra):
        keep = select_boxes(ph.boxes, ph.scores, s.detector_score_threshold, s.max_lesions, s.nested_containment)
        p = ph.p_tta if s.flip_tta and ph.p_tta is not None else ph.p
        out.append(CloseUp(ph.stratum, ph.y, np.asarray(p)[keep], largest_box_fraction(ph.boxes[keep], e["width"], e["height"]),
                           e["whole_p"]))
    return out


def choose_hybrid(models_dir: Path = MODELS_DIR, manifest_path: Path | None = None, data_root: Path | None = None,
                  study: HybridStudy | None = None, command: str = "") -> dict[str, Any]:
    """Run the study and store the chosen blend in metadata.json; returns the decision record."""
    from lesiontriage.pipeline import TriagePipeline

    study = study or HybridStudy()
    pipe = TriagePipeline.from_dir(models_dir)
    if pipe.image_classifier is None:
        raise ModelError(f"the close-up blend needs a whole-image classifier: {models_dir / 'metadata.json'} lists none "
                         "(run `lesiontriage train image-classifier` first)")
    manifest = load_manifest(manifest_path)
    meta = read_metadata(models_dir)
    wide = _widefield_fractions(pipe, manifest, study, data_root)
    gate = choose_gate([w["largest_box_fraction"] for w in wide], study.gates)
    rows = validation_images(manifest, BoxRuleStudy().targets)
    sha = meta["models"]
    tag = f"{sha['detector']['sha256'][:12]}_{sha['image_classifier']['sha256'][:12]}_{len(rows)}"
    photos = _closeups(pipe, rows, data_root, RUNS_DIR / "hybrid" / f"whole_{tag}.pkl")
    table = score_table(photos, study.weights, gate, study.aggregate)
    weight = choose_weight(table, study.min_gain) if np.isfinite(gate) else 0.0
    record = {
        "whole_image_weight": weight,
        "closeup_min_box_fraction": gate if np.isfinite(gate) else None,
        "criterion": (f"gate: smallest candidate above the largest kept box / image area of every wide-field validation "
                      f"photo; weight: macro ROC AUC over source x modality strata, {study.aggregate} aggregation, a "
                      f"weight replaces 0 only with a gain >= {study.min_gain}"),
        "chosen_on": (f"validation split: {len(rows)} labelled photos + the HAM10000 ones squashed to 224x224; "
                      f"wide-field: {sum(w['kind'] == 'real' for w in wide)} real mole photos + "
                      f"{sum(w['kind'] == 'synthetic' for w in wide)} synthetic scenes (seed {study.scene_seed})"),
        "widefield_largest_box_fraction": {"max": max((w["largest_box_fraction"] for w in wide), default=0.0),
                                           "median": float(np.median([w["largest_box_fraction"] for w in wide])) if wide else 0.0,
                                           "n": len(wide)},
        "table": table.round(4).to_dict(orient="records"),
        "study": asdict(study),
        "manifest_hash": manifest_hash(manifest),
        "model_sha256": {k: meta["models"][k]["sha256"] for k in ("detector", "classifier", "image_classifier")},
        "command": command,
        "date": dt.date.today().isoformat(),
    }
    meta.setdefault("pipeline", {})["whole_image_weight"] = weight
    meta["pipeline"]["closeup_min_box_fraction"] = gate if np.isfinite(gate) else 1.0
    meta["pipeline"]["hybrid_choice"] = record
    write_metadata(models_dir, meta)
    return record
