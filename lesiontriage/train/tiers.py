"""Choose the triage tiers' thresholds on validation images (never test) and store them.

"refer" = the highest threshold whose image-level sensitivity is >= 95% (a primary-care triage
must rarely miss a cancer); "urgent" = the lowest threshold whose PPV reaches the target (the
patients to see first). Chosen separately for each aggregation and for the whole-image mode,
because their score distributions differ.
"""
from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from lesiontriage.aggregation import AGGREGATORS, aggregate
from lesiontriage.data.manifest import load_manifest, manifest_hash, resolve_path
from lesiontriage.evaluate.operating_points import confusion_at, threshold_at_ppv, threshold_at_sensitivity
from lesiontriage.paths import MODELS_DIR
from lesiontriage.results import SUBTYPES
from lesiontriage.weights import read_metadata, write_metadata

log = logging.getLogger(__name__)


@dataclass
class TierTargets:
    refer_sensitivity: float = 0.95
    urgent_ppv: float = 0.6
    max_per_source: int = 120
    seed: int = 0


def validation_images(manifest: pd.DataFrame, targets: TierTargets) -> pd.DataFrame:
    """Labelled validation photos across sources (capped per source so HAM does not dominate)."""
    v = manifest[(manifest["split"] == "val") & manifest["malignant"].notna() & manifest["diagnosis"].isin(SUBTYPES)]
    parts = [g.sample(min(len(g), targets.max_per_source), random_state=targets.seed)
             for _, g in v.groupby(["source", "modality"], sort=True)]
    return pd.concat(parts).reset_index(drop=True)


def score_validation(pipe, rows: pd.DataFrame, data_root: Path | None) -> pd.DataFrame:
    """Per-image scores for every aggregation (two-stage) and the whole-image mode."""
    recs = []
    for _, r in tqdm(rows.iterrows(), total=len(rows), desc="validation images"):
        path = resolve_path(r["path"], data_root)
        res = pipe.predict(path, "mean")
        rec = {"path": r["path"], "source": r["source"], "modality": r["modality"], "y": int(r["malignant"]),
               "n_lesions": res.n_lesions}
        for name in AGGREGATORS:
            # "two_stage" = the product's image score (close-up blend included); "lesions_only" = the
            # paper's aggregate over lesions, whose thresholds the evaluation uses for that strategy
            rec[f"two_stage.{name}"] = pipe.reaggregate(res, name).image_score
            rec[f"lesions_only.{name}"] = aggregate([l.p_malignant for l in res.lesions], name)
        if pipe.image_classifier is not None:
            rec["whole_image.whole"] = pipe.predict(path, whole_image=True).image_score
        recs.append(rec)
    return pd.DataFrame(recs)


def choose_thresholds(scores: pd.DataFrame, targets: TierTargets) -> dict[str, Any]:
    out: dict[str, Any] = {}
    y = scores["y"].to_numpy()
    for col in [c for c in scores.columns if "." in c]:
        mode, agg = col.split(".")
        p = scores[col].to_numpy(dtype=float)
        refer = float(threshold_at_sensitivity(y, p, targets.refer_sensitivity))
        urgent = float(max(threshold_at_ppv(y, p, targets.urgent_ppv), refer))
        out.setdefault(mode, {"thresholds": {}, "operating_points": {}})
        out[mode]["thresholds"][agg] = {"refer": refer, "urgent": urgent}
        out[mode]["operating_points"][agg] = {
            "refer": confusion_at(y, p, refer).to_dict(),
            "urgent": confusion_at(y, p, urgent).to_dict(),
        }
    return out


def calibrate_tiers(models_dir: Path = MODELS_DIR, manifest_path: Path | None = None, data_root: Path | None = None,
                    targets: TierTargets | None = None, command: str = "") -> dict[str, Any]:
    """Run the shipped pipeline on validation photos and write ``triage`` into metadata.json."""
    from lesiontriage.pipeline import TriagePipeline

    targets = targets or TierTargets()
    manifest = load_manifest(manifest_path)
    pipe = TriagePipeline.from_dir(models_dir)
    rows = validation_images(manifest, targets)
    scores = score_validation(pipe, rows, data_root)
    chosen = choose_thresholds(scores, targets)
    meta = read_metadata(models_dir)
    for mode, entry in chosen.items():
        entry["chosen_on"] = (f"validation split: {len(scores)} labelled photos ({int(scores['y'].sum())} malignant), "
                              f"<= {targets.max_per_source} per source x modality")
        entry["targets"] = {"refer_sensitivity": targets.refer_sensitivity, "urgent_ppv": targets.urgent_ppv}
        entry["manifest_hash"] = manifest_hash(manifest)
        entry["command"] = command
        entry["date"] = dt.date.today().isoformat()
    meta["triage"] = chosen
    agg_choice = choose_default_aggregate(scores)
    meta.setdefault("pipeline", {})["default_aggregate"] = agg_choice["default"]
    meta["pipeline"]["default_aggregate_choice"] = {**agg_choice, "command": command, "manifest_hash": manifest_hash(manifest),
                                                    "date": dt.date.today().isoformat()}
    write_metadata(models_dir, meta)
    return chosen


def choose_default_aggregate(scores: pd.DataFrame) -> dict[str, Any]:
    """The two-stage aggregation with the best validation image-level ROC AUC (ties -> 'mean').

    Chosen on the same validation photos as the tiers, never on test."""
    from lesiontriage.evaluate.metrics import auc_ci

    y = scores["y"].to_numpy()
    aucs = {name: float(auc_ci(y, scores[f"two_stage.{name}"].to_numpy(float), n_boot=0).value) for name in AGGREGATORS}
    best = max(aucs, key=lambda k: (round(aucs[k], 4), k == "mean"))
    return {"default": best, "validation_auc": aucs,
            "chosen_on": f"validation split: {len(scores)} labelled photos ({int(y.sum())} malignant)"}
