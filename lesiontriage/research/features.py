"""Frozen lesion-classifier outputs for manifest images: the shared input of the seed-extra studies.

Every study in this package (clinical covariates, management, ensemble, ablations) works on the
same per-image quantities: the classifier's raw malignant logit, its sub-type probabilities and
its pooled features, computed once on the ground-truth crop (largest box, or the whole image for
sets without boxes, exactly as ``lesiontriage evaluate`` does) and cached under
``runs/features/`` keyed by the weights' sha256 and the preprocessing, so a study re-runs in
seconds and a changed model can never be mixed with stale numbers.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from lesiontriage.data.manifest import resolve_path
from lesiontriage.imaging import apply_clahe, crop_with_margin, load_image
from lesiontriage.networks.classifier import ClassifierConfig, LesionClassifier
from lesiontriage.paths import RUNS_DIR
from lesiontriage.weights import load_weights, read_metadata

log = logging.getLogger(__name__)

FEATURE_DIR = RUNS_DIR / "features"


@dataclass
class FrozenClassifier:
    """A classifier plus what is needed to score with it and to name its cache."""

    name: str
    model: LesionClassifier
    temperature: float
    tag: str  # sha256 of the weights (or of the checkpoint) -> cache key

    @classmethod
    def shipped(cls, models_dir: Path, key: str = "classifier") -> "FrozenClassifier":
        entry = read_metadata(models_dir)["models"][key]
        model = LesionClassifier(ClassifierConfig.from_dict(entry["config"]), pretrained=False)
        model.load_state_dict(load_weights(models_dir / entry["file"], entry["sha256"]))
        return cls(key, model.float().eval(), float(entry.get("temperature", 1.0)), entry["sha256"][:16])

    @classmethod
    def from_run(cls, run_dir: Path, name: str | None = None) -> "FrozenClassifier":
        """The best checkpoint of a training run in ``runs/<name>/`` (not yet exported)."""
        import hashlib
        import json

        result = json.loads((run_dir / "result.json").read_text())
        cfg = ClassifierConfig.from_dict(result["config"]["network"])
        model = LesionClassifier(cfg, pretrained=False)
        state = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        digest = hashlib.sha256((run_dir / "best.pt").read_bytes()).hexdigest()[:16]
        return cls(name or run_dir.name, model.float().eval(), float(result.get("temperature", 1.0)), digest)


@dataclass
class FeatureSet:
    """Per-image outputs aligned with ``rows`` (the manifest rows asked for, same order)."""

    rows: pd.DataFrame
    logit: np.ndarray  # raw malignant logit [N]
    sub: np.ndarray  # sub-type probabilities [N, 8]
    emb: np.ndarray  # pooled features [N, F]
    ok: np.ndarray  # False where the image could not be read (values are NaN there)

    def p(self, temperature: float = 1.0) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.logit / temperature))

    def subset(self, mask: np.ndarray) -> "FeatureSet":
        mask = np.asarray(mask, dtype=bool)
        return FeatureSet(self.rows[mask].reset_index(drop=True), self.logit[mask], self.sub[mask], self.emb[mask], self.ok[mask])


def crop_for_row(row: pd.Series, data_root: Path | None, margin: float) -> np.ndarray:
    """Ground-truth crop of one manifest row: the largest box with context, or the whole image."""
    img = load_image(resolve_path(row["path"], data_root), max_side=2048)
    boxes = [list(b) for b in (row["boxes"] if row["boxes"] is not None else [])]
    if not boxes:
        return img.rgb
    box = max(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))
    return crop_with_margin(img.rgb, [v * img.scale for v in box], margin=margin, square=True)


def _to_batch(crops: list[np.ndarray], cfg: ClassifierConfig) -> torch.Tensor:
    from lesiontriage.pipeline import TriagePipeline, _to_tensor

    return TriagePipeline._normalise([_to_tensor(c) for c in crops], cfg)


def _cache_path(clf: FrozenClassifier, clahe: bool) -> Path:
    return FEATURE_DIR / f"{clf.name}-{clf.tag}{'-clahe' if clahe else ''}.npz"


def _load_cache(path: Path) -> dict[str, tuple[float, np.ndarray, np.ndarray]]:
    if not path.exists():
        return {}
    z = np.load(path, allow_pickle=False)
    return {k: (float(l), s, e) for k, l, s, e in zip(z["keys"], z["logit"], z["sub"], z["emb"])}


def _save_cache(path: Path, cache: dict[str, tuple[float, np.ndarray, np.ndarray]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = sorted(cache)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, keys=np.array(keys), logit=np.array([cache[k][0] for k in keys], np.float32),
             sub=np.stack([cache[k][1] for k in keys]).astype(np.float32),
             emb=np.stack([cache[k][2] for k in keys]).astype(np.float16))
    tmp.replace(path)


def extract_features(rows: pd.DataFrame, clf: FrozenClassifier, *, clahe: bool = False, data_root: Path | None = None,
                     batch_size: int = 32, desc: str | None = None) -> FeatureSet:
    """Classifier outputs for every row (cached). Unreadable images are logged and marked not ok."""
    rows = rows.reset_index(drop=True)
    path = _cache_path(clf, clahe)
    cache = _load_cache(path)
    todo = [i for i, p in enumerate(rows["path"]) if p not in cache]
    cfg = clf.model.config
    failed: set[str] = set()
    if todo:
        bar = tqdm(total=len(todo), desc=desc or f"features {clf.name}{' +CLAHE' if clahe else ''}")
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            crops, keys = [], []
            for i in chunk:
                r = rows.iloc[i]
                try:
                    crop = crop_for_row(r, data_root, cfg.crop_margin)
                except Exception as exc:  # noqa: BLE001 - one bad file must not stop a study
                    log.warning("%s: skipped (%s)", r["path"], exc)
                    failed.add(r["path"])
                    continue
                crops.append(apply_clahe(crop) if clahe else crop)
                keys.append(r["path"])
            if crops:
                logit, sub, f = (t.numpy() for t in clf.model.outputs(_to_batch(crops, cfg)))
                for k, lo, su, fe in zip(keys, logit, sub, f):
                    cache[k] = (float(lo), su, fe)
            bar.update(len(chunk))
        bar.close()
        _save_cache(path, cache)
    n = len(rows)
    n_sub = len(cfg.subtypes)
    width = next(iter(cache.values()))[2].shape[0] if cache else 0
    logit = np.full(n, np.nan, np.float32)
    sub = np.full((n, n_sub), np.nan, np.float32)
    emb = np.full((n, width), np.nan, np.float32)
    ok = np.zeros(n, bool)
    for i, p in enumerate(rows["path"]):
        if p in cache:
            logit[i], sub[i], emb[i] = cache[p][0], cache[p][1], cache[p][2]
            ok[i] = True
    return FeatureSet(rows, logit, sub, emb, ok)


def manifest_rows(manifest: pd.DataFrame, sources: list[str], splits: list[str], modality: str | None = None) -> pd.DataFrame:
    m = manifest[manifest["source"].isin(sources) & manifest["split"].isin(splits) & manifest["malignant"].notna()]
    if modality is not None:
        m = m[m["modality"] == modality]
    return m.reset_index(drop=True)


def describe(fs: FeatureSet) -> dict[str, Any]:
    return {"n": int(len(fs.rows)), "n_unreadable": int((~fs.ok).sum())}
