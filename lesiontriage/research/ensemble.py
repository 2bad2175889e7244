"""Ensemble of differently-initialised / different-backbone classifiers (seed 002), measured.

Each member's probability is temperature-scaled on validation first (members differ in
confidence), then the probabilities are averaged. Reported per split: each member, the ensemble,
a paired bootstrap test ensemble vs the shipped single model, and the latency each member adds
per lesion crop on this CPU.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lesiontriage.evaluate.calibration import fit_temperature
from lesiontriage.evaluate.metrics import auc_ci, paired_bootstrap_test
from lesiontriage.research.features import FeatureSet, FrozenClassifier


@dataclass
class EnsembleConfig:
    n_boot: int = 1000
    seed: int = 0
    latency_repeats: int = 20


def crop_latency_ms(clf: FrozenClassifier, batch: int, repeats: int) -> dict[str, float]:
    """Median / p95 milliseconds of one forward pass on ``batch`` crops (after 3 warm-up passes)."""
    size = clf.model.config.input_size
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    model = clf.model.to(memory_format=torch.channels_last)
    times = []
    with torch.inference_mode():
        for k in range(repeats + 3):
            t = time.perf_counter()
            model(x)
            if k >= 3:
                times.append((time.perf_counter() - t) * 1000)
    return {"median_ms": float(np.median(times)), "p95_ms": float(np.percentile(times, 95)), "batch": batch}


def run_ensemble_study(members: list[FrozenClassifier], val: dict[str, FeatureSet], tests: dict[str, FeatureSet],
                       cfg: EnsembleConfig) -> dict[str, Any]:
    """``val`` / ``tests``: member name -> features on the same rows (pooled validation / each test split)."""
    names = [m.name for m in members]
    yv = val[names[0]].rows["malignant"].astype(int).to_numpy()
    temps = {}
    for m in members:
        temps[m.name] = m.temperature if m.temperature != 1.0 else float(fit_temperature(val[m.name].logit, yv))
    out: dict[str, Any] = {"members": names, "temperatures": temps, "rule": "mean of temperature-scaled probabilities",
                           "splits": {}}

    def block(y: np.ndarray, feats: dict[str, FeatureSet], split: str) -> dict[str, Any]:
        ps = {n: feats[n].p(temps[n]) for n in names}
        ens = np.mean([ps[n] for n in names], axis=0)
        res = {n: {**auc_ci(y, ps[n], n_boot=cfg.n_boot, seed=cfg.seed).to_dict(), "split": split} for n in names}
        res["ensemble"] = {**auc_ci(y, ens, n_boot=cfg.n_boot, seed=cfg.seed).to_dict(), "split": split}
        res["ensemble_vs_" + names[0]] = paired_bootstrap_test(y, ens, ps[names[0]], n_boot=2 * cfg.n_boot,
                                                               seed=cfg.seed).to_dict()
        return res

    out["splits"]["validation"] = block(yv, val, "pooled validation")
    for split, feats in tests.items():
        y = feats[names[0]].rows["malignant"].astype(int).to_numpy()
        out["splits"][split] = block(y, {n: feats[n] for n in names} if isinstance(feats, dict) else feats, split)
    out["latency_per_member"] = {m.name: [crop_latency_ms(m, b, cfg.latency_repeats) for b in (1, 4)] for m in members}
    v = out["splits"]["validation"]
    out["helps_on_validation"] = bool(v["ensemble"]["value"] > max(v[n]["value"] for n in names))
    return out
