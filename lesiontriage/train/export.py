"""Export a finished run to ``models/``: safetensors weights + its entry in metadata.json.

The classifier export also fits the temperature on validation logits and checks that fp16
storage costs no accuracy (validation AUC of fp16 vs fp32 weights), recording both.
"""
from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lesiontriage import __version__
from lesiontriage.errors import ModelError
from lesiontriage.paths import MODELS_DIR
from lesiontriage.results import INTENDED_USE
from lesiontriage.weights import read_metadata, save_weights, write_metadata

log = logging.getLogger(__name__)

DATA_LICENCES = {
    "ham10000": "CC BY-NC 4.0 (non-commercial)",
    "isic2018_task3_test": "CC BY-NC 4.0 (evaluation only)",
    "pad_ufes20_subset": "CC BY 4.0",
    "derm7pt": "academic research only, no redistribution",
    "sd198_tumour_subset": "research use only (DermQuest images)",
    "moles_widefield_roujiaw": "licence unknown: internal research use only",
    "synthetic_scenes": "derived from the sets above; synthetic",
}
WEIGHTS_LICENCE = ("Weights trained on CC BY-NC and research-only data: non-commercial research and "
                   "education use only.")


def _base_metadata(models_dir: Path) -> dict[str, Any]:
    try:
        meta = read_metadata(models_dir)
    except ModelError:
        meta = {}
    meta.setdefault("format_version", 1)
    meta.setdefault("name", "lesiontriage")
    meta.setdefault("models", {})
    meta.setdefault("changelog", [])
    meta["package_version"] = __version__
    meta["intended_use"] = INTENDED_USE
    meta["training_data_licences"] = DATA_LICENCES
    meta["weights_licence"] = WEIGHTS_LICENCE
    return meta


def _fp16_check(model_factory, state: dict[str, torch.Tensor], evaluate) -> dict[str, float]:
    """Validation metric with fp32 weights vs the same weights rounded through fp16."""
    m32 = model_factory()
    m32.load_state_dict(state)
    half = {k: (v.half().float() if v.is_floating_point() else v) for k, v in state.items()}
    m16 = model_factory()
    m16.load_state_dict(half)
    return {"fp32": evaluate(m32), "fp16": evaluate(m16)}


def export_classifier(key: str, out: dict[str, Any], models_dir: Path, data_root: Path | None, manifest_path: Path | None,
                      weights_file: str = "best.pt") -> Path:
    from lesiontriage.evaluate.calibration import fit_temperature
    from lesiontriage.networks.classifier import ClassifierConfig, LesionClassifier
    from lesiontriage.train.classifier import ClassifierTrainer, ClassifierTrainConfig, predict_logits, strata_auc

    cfg = ClassifierTrainConfig(**out["config"])
    trainer_cls = ClassifierTrainer.__new__(ClassifierTrainer)  # reuse dataset building without a new model
    ClassifierTrainer.__init__(trainer_cls, cfg, manifest_path=manifest_path, data_root=data_root)
    best = torch.load(Path(out["run_dir"]) / weights_file, map_location="cpu", weights_only=False)
    net_cfg = ClassifierConfig.from_dict(cfg.network)

    def factory():
        return LesionClassifier(net_cfg, pretrained=False)

    def evaluate(model) -> float:
        logits, _ = predict_logits(model, trainer_cls.val_ds, flip_tta=False, bf16=False)
        return strata_auc(trainer_cls.val_rows, logits)["macro"]

    check = _fp16_check(factory, best["model"], evaluate)
    fp16 = abs(check["fp16"] - check["fp32"]) < 1e-3
    model = factory()
    model.load_state_dict(best["model"])
    logits, sub_logits = predict_logits(model, trainer_cls.val_ds, flip_tta=False, bf16=False)
    y = trainer_cls.val_rows["malignant"].astype(int).to_numpy()
    temperature = float(fit_temperature(logits, y))
    aucs = strata_auc(trainer_cls.val_rows, logits)
    fname = f"{key}.safetensors"
    sha = save_weights(best["model"], models_dir / fname, fp16=fp16)
    meta = _base_metadata(models_dir)
    meta["models"][key] = {
        "file": fname,
        "sha256": sha,
        "architecture": f"EfficientNet-{net_cfg.variant.capitalize()} (timm efficientnet_{net_cfg.variant}) + malignant head + 8-way sub-type head",
        "kind": "lesion_crop_classifier" if cfg.mode == "crop" else "whole_image_classifier",
        "config": net_cfg.to_dict(),
        "input_size": net_cfg.input_size,
        "mean": list(net_cfg.mean),
        "std": list(net_cfg.std),
        "classes": list(net_cfg.subtypes),
        "malignant_classes": ["MEL", "BCC", "AKIEC"],
        "temperature": temperature,
        "dtype": "float16" if fp16 else "float32",
        "fp16_check_val_macro_auc": check,
        "validation": {"auc_by_stratum": aucs, "n": int(len(y)), "n_malignant": int(y.sum()), "exported_from": weights_file,
                       # best.pt stores its epoch; checkpoint.pt stores the next epoch to run (the last one done + 1)
                       **({"best_epoch": best["epoch"]} if weights_file == "best.pt" else {"last_epoch": best["epoch"] - 1})},
        "training": {"command": out["command"], "manifest_hash": out["manifest_hash"], "config": out["config"],
                     "history": out["history"], "sources": cfg.sources,
                     **({"soup": out["soup"]} if "soup" in out else {})},  # a weight soup's recipe (train/soup.py)
        "exported": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    meta["changelog"].append({"date": dt.date.today().isoformat(), "model": key, "change": f"trained ({out['command']})"})
    write_metadata(models_dir, meta)
    return models_dir / fname


def export_detector(out: dict[str, Any], models_dir: Path) -> Path:
    from lesiontriage.networks.detector import DetectorConfig

    best = torch.load(Path(out["run_dir"]) / "best.pt", map_location="cpu", weights_only=False)
    net_cfg = DetectorConfig.from_dict(out["config"]["network"])
    # Detector regression is sensitive; fp16 storage is checked in the evaluation, default fp32.
    key = "detector" if net_cfg.num_classes == 1 else "detector_c2"  # C=2: the seed's benign/malignant detector
    sha = save_weights(best["model"], models_dir / f"{key}.safetensors", fp16=False)
    meta = _base_metadata(models_dir)
    meta["models"][key] = {
        "file": f"{key}.safetensors",
        "sha256": sha,
        "architecture": f"torchvision FasterRCNN + FPN over EfficientNet-{net_cfg.variant.capitalize()} features (strides 4-64)",
        "kind": "lesion_detector",
        "config": net_cfg.to_dict(),
        "classes": ["lesion"] if net_cfg.num_classes == 1 else ["benign", "malignant"],
        "mean": list(net_cfg.mean),
        "std": list(net_cfg.std),
        "input_size": {"long_side": net_cfg.long_side},
        "dtype": "float32",
        "validation": {"best_epoch": best["epoch"], **best.get("val", {})},
        "training": {"command": out["command"], "manifest_hash": out["manifest_hash"], "config": out["config"],
                     "history": out["history"]},
        "exported": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    meta["changelog"].append({"date": dt.date.today().isoformat(), "model": key, "change": f"trained ({out['command']})"})
    write_metadata(models_dir, meta)
    return models_dir / f"{key}.safetensors"


def start_point_unbeaten(out: dict[str, Any], weights_file: str = "best.pt") -> bool:
    """True when a continuation run's ``best.pt`` is still its start point (no epoch beat the ``init_from`` weights):
    exporting it would only copy those weights, under a new key for a new member. ``checkpoint.pt`` (the last epoch,
    asked for by name) is never refused."""
    return (weights_file == "best.pt" and bool(out.get("config", {}).get("init_from"))
            and out.get("best", {}).get("epoch") == -1)


def export_run(model: str, out: dict[str, Any], *, data_root: Path | None = None, manifest_path: Path | None = None,
               models_dir: Path = MODELS_DIR, weights_file: str = "best.pt") -> Path:
    """Write a finished run's weights + metadata to ``models_dir``. ``weights_file`` picks the run's file:
    ``best.pt`` (its own validation criterion) by default; a view judged on the product's blended score
    (the whole-image classifier: ``train hybrid`` decides its weight) may ship ``checkpoint.pt``, the last epoch."""
    models_dir.mkdir(parents=True, exist_ok=True)
    if model == "detector":
        if weights_file != "best.pt":
            raise ValueError("the detector exports best.pt only")
        return export_detector(out, models_dir)
    key = out["config"].get("export_key") or ("classifier" if model == "classifier" else "image_classifier")
    return export_classifier(key, out, models_dir, data_root, manifest_path, weights_file=weights_file)
