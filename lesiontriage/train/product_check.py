"""Score a trained-but-not-exported lesion classifier on the *product's* validation score, never test.

Why: a classifier run stops early and keeps ``best.pt`` by the macro AUC of its validation crops, but
the product's image score on a close-up leans on the same classifier run on the whole photo (the
full-frame view, ``lesiontriage.hybrid``) and on the detected boxes. The two can disagree: the
``classifier_continue4`` run lowered the crop metric while raising HAM10000 and the frame view, and
lowered derm7pt clinical. ``lesiontriage train classifier --config FILE --check-product`` answers
the question that decides an export: would the product score be better on validation?

For each candidate checkpoint of the run (``best.pt``, ``checkpoint.pt``) it swaps the weights into
the shipped pipeline, refits the temperature on the validation crops (as the export does), classifies
the kept detections (the box-rule study's cached detector output) and the whole frame of every
validation photo of ``train hybrid``, and re-runs the shipped close-up grid (gate, ramp, no-lesion
views; every weight pair): macro ROC AUC over the source x modality strata, next to the shipped
classifier's. Writes ``runs/<name>/product_check.json``.

The close-up grid cannot see wide-field photos, where the lesion classifier alone makes the score, so each candidate
also gets the **per-lesion ROC AUC on the labelled validation scenes** (every ``scenes.parquet`` under
``runs/scenes/val*/``: pasted lesions with their labels, background moles as benign, crops of the given boxes with
the shipped margin): a candidate that raises the close-up score by reading box crops differently may lower it there
(session 15: a margin of 1.0 on every crop raised the close-up macro AUC +0.013 and cut this from 0.70 to 0.63).
``lesiontriage data scenes --n 160 --seed 11 --split val --out runs/scenes/val_11`` adds scenes to it.
"""
from __future__ import annotations

import json
import pickle
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from lesiontriage.box_selection import select_boxes
from lesiontriage.data.manifest import load_manifest
from lesiontriage.paths import MODELS_DIR, RUNS_DIR
from lesiontriage.train.box_rule import BoxRuleStudy, _load, stratum_aucs, validation_detections
from lesiontriage.train.hybrid import CloseUp, HybridStudy, _closeups, score_table, weight_pairs
from lesiontriage.train.tiers import validation_images

CANDIDATE_FILES = ("best.pt", "checkpoint.pt")


@dataclass
class ProductScore:
    """One classifier's validation numbers under the shipped close-up grid."""

    name: str
    epoch: int | None
    temperature: float
    crop_macro_auc: float | None  # the training run's own criterion (None for the shipped model: see metadata)
    frame_macro_auc: float  # the full-frame view alone
    product_macro_auc: float  # best weight pair of the grid
    whole_image_weight: float
    full_frame_weight: float
    by_stratum: dict[str, float]
    scene_lesion_auc: float | None = None  # validation scenes' lesions (None without scenes)
    scene_lesions: int = 0


def scene_lesion_auc(pipe, scene_dirs: list[Path]) -> tuple[float | None, int]:
    """(ROC AUC, lesions) of the pipeline's lesion probabilities on the given boxes of labelled validation scenes:
    pasted lesions with a label, background moles benign, unlabelled pasted lesions left out."""
    from sklearn.metrics import roc_auc_score

    from lesiontriage.data.scenes import load_scene_index

    ys, ps = [], []
    for d in scene_dirs:
        index = load_scene_index(d / "scenes.parquet")
        for _, r in tqdm(list(index.iterrows()), desc=f"scene lesions ({d.name})", leave=False):
            kinds = r.get("box_kind")
            kinds = ["pasted"] * len(r["boxes"]) if kinds is None else list(kinds)
            labels = [0 if k == "background_mole" else m for k, m in zip(kinds, r["box_malignant"])]
            keep = [i for i, m in enumerate(labels) if m is not None]
            if not keep:
                continue
            img = pipe.load(r["abs_path"])
            boxes = np.asarray([r["boxes"][i] for i in keep], dtype=np.float32) * img.scale
            ps.extend(pipe.lesion_probabilities(img.rgb, boxes)[0].tolist())
            ys.extend(int(labels[i]) for i in keep)
    if not ys or len(set(ys)) < 2:
        return None, len(ys)
    return float(roc_auc_score(ys, ps)), len(ys)


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def validation_scene_dirs(runs_dir: Path = RUNS_DIR) -> list[Path]:
    """Every folder of labelled validation scenes under ``runs/scenes/`` (``val``, ``val_11``, ...)."""
    return sorted(p.parent for p in (runs_dir / "scenes").glob("val*/scenes.parquet"))


def stratum_macro(photos: list[CloseUp], values: list[float]) -> float:
    """Macro ROC AUC over the photos' strata of one number per photo."""
    df = pd.DataFrame({"stratum": [p.stratum for p in photos], "y": [p.y for p in photos], "score": values})
    return float(np.mean(list(stratum_aucs(df).values())))


def product_score(name: str, photos: list[CloseUp], settings, epoch: int | None = None, temperature: float = 1.0,
                  crop_macro_auc: float | None = None) -> ProductScore:
    """The best weight pair of the shipped grid (gate, ramp and no-lesion views as shipped) for these photos."""
    pairs = weight_pairs(HybridStudy().weights, HybridStudy().min_lesion_weight)
    table = score_table(photos, pairs, settings.closeup_min_box_fraction, "mean", settings.closeup_ramp_from,
                        bool(settings.no_lesion_views), bool(settings.closeup_ramp_primary_lesion))
    best = table.loc[table["macro"].idxmax()]
    strata = {k: round(float(best[k]), 4) for k in sorted({p.stratum for p in photos}) if k in table.columns}
    return ProductScore(name, epoch, temperature, crop_macro_auc, stratum_macro(photos, [p.frame_p for p in photos]),
                        float(best["macro"]), float(best["whole_image_weight"]), float(best["full_frame_weight"]), strata)


def _candidate_photos(pipe, base: list[CloseUp], dets: list[dict[str, Any]], data_root: Path | None) -> list[CloseUp]:
    """The validation photos re-scored by the classifier now in ``pipe`` (detections and whole-image p reused)."""
    s = pipe.settings
    out = []
    for d, ph in tqdm(list(zip(dets, base)), desc="validation photos (candidate)"):
        rgb = _load(pipe, pd.Series({"path": d["path"]}), d["squash"], data_root).rgb
        keep = select_boxes(d["boxes"], d["scores"], s.detector_score_threshold, s.max_lesions, s.nested_containment, s.widefield)
        lesion_p = pipe.lesion_probabilities(rgb, d["boxes"][keep])[0] if len(keep) else np.zeros(0)
        frame_p = float(pipe.lesion_probabilities(rgb)[0][0])
        out.append(CloseUp(ph.stratum, ph.y, np.asarray(lesion_p, dtype=np.float64), ph.box_fraction, ph.whole_p, frame_p,
                           np.asarray(d["scores"])[keep]))
    return out


def check_run(config_path: str, models_dir: Path = MODELS_DIR, manifest_path: Path | None = None,
              data_root: Path | None = None) -> dict[str, Any]:
    """Shipped classifier vs every candidate checkpoint of the run named in ``config_path``."""
    from lesiontriage.evaluate.calibration import fit_temperature
    from lesiontriage.networks.whole_view import whole_view_spec
    from lesiontriage.pipeline import TriagePipeline
    from lesiontriage.train.classifier import ClassifierTrainConfig, ClassifierTrainer, predict_logits, strata_auc
    from lesiontriage.train.common import dataclass_from_dict, load_toml

    cfg = dataclass_from_dict(ClassifierTrainConfig, load_toml(config_path))
    run_dir = RUNS_DIR / cfg.name
    candidates = [run_dir / f for f in CANDIDATE_FILES if (run_dir / f).is_file()]
    if cfg.mode != "crop" or not candidates:
        raise FileNotFoundError(f"{run_dir}: no lesion-classifier checkpoint to check (train it first)")
    pipe = TriagePipeline.from_dir(models_dir, fast=False)
    rows = validation_images(load_manifest(manifest_path), BoxRuleStudy().targets)
    meta = pipe.metadata["models"]
    tag = f"{meta['detector']['sha256'][:12]}_{whole_view_spec(pipe.metadata).sha256[:12]}_{len(rows)}"
    base = _closeups(pipe, rows, data_root, RUNS_DIR / "hybrid" / f"whole_{tag}.pkl")
    dets = validation_detections(pipe, rows, data_root)
    scene_dirs = validation_scene_dirs()
    results = [product_score("shipped", base, pipe.settings, temperature=float(pipe.clf_meta.get("temperature", 1.0)))]
    results[0].scene_lesion_auc, results[0].scene_lesions = scene_lesion_auc(pipe, scene_dirs)
    trainer = ClassifierTrainer.__new__(ClassifierTrainer)  # its validation crops, without building a model
    ClassifierTrainer.__init__(trainer, cfg, manifest_path=manifest_path, data_root=data_root)
    y = trainer.val_rows["malignant"].astype(int).to_numpy()
    checked: list[dict[str, torch.Tensor]] = []
    for path in candidates:
        state = torch.load(path, map_location="cpu", weights_only=False)
        if any(_same_weights(state["model"], seen) for seen in checked):
            continue  # checkpoint.pt of a run whose last epoch was its best: the same weights as best.pt
        checked.append(state["model"])
        pipe.classifier.load_state_dict(state["model"])
        pipe.classifier.eval()
        logits, _ = predict_logits(pipe.classifier, trainer.val_ds, flip_tta=False, bf16=False)
        temperature = float(fit_temperature(logits, y))
        pipe.clf_meta = dict(pipe.clf_meta, temperature=temperature)
        photos = _candidate_photos(pipe, base, dets, data_root)
        results.append(product_score(path.name, photos, pipe.settings, state.get("epoch"), temperature,
                                     float(strata_auc(trainer.val_rows, logits)["macro"])))
        results[-1].scene_lesion_auc, results[-1].scene_lesions = scene_lesion_auc(pipe, scene_dirs)
    record = {"run": cfg.name, "config": str(config_path), "results": [asdict(r) for r in results],
              "scene_dirs": [str(d) for d in scene_dirs],
              "note": "validation only; export a candidate only if its product_macro_auc beats the shipped one and its "
                      "scene_lesion_auc does not fall"}
    (run_dir / "product_check.json").write_text(json.dumps(record, indent=2))
    return record
