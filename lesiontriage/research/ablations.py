"""Measured ablations of seed claims: threshold tuning (seed 003), CLAHE (seed 004), and class
weighting vs balanced sampling (seeds 002, 004).

All three run on the shipped classifier's frozen outputs, so each isolates one choice:

* threshold tuning: the default 0.5 cut on the calibrated probability vs a cut chosen on validation
  (Youden's J), scored on every test split;
* CLAHE: (a) the shipped classifier on CLAHE-equalised crops at inference, (b) a logistic probe on
  the frozen features of CLAHE crops vs of plain crops;
* class imbalance: the same logistic probe with no correction, inverse-frequency class weights, or
  balanced resampling.

Probes are fitted on the validation split (the classifier never trained on it, so its features
there are not over-fitted) and scored on the test splits. What this does not measure: the effect
of CLAHE or of the imbalance strategy when fine-tuning the whole network; at ~55 minutes per
training run on 2 cores that is a separate run per arm (see the closing note).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression

from lesiontriage.evaluate.metrics import auc_ci, paired_bootstrap_test
from lesiontriage.research.features import FeatureSet


@dataclass
class AblationConfig:
    probe_c: float = 0.1
    n_boot: int = 1000
    seed: int = 0


def _sig(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _y(fs: FeatureSet) -> np.ndarray:
    return fs.rows["malignant"].astype(int).to_numpy()


def binary_rates(y: np.ndarray, p: np.ndarray, thr: float) -> dict[str, float]:
    pred = p >= thr
    tp, fn = int((pred & (y == 1)).sum()), int((~pred & (y == 1)).sum())
    tn, fp = int((~pred & (y == 0)).sum()), int((pred & (y == 0)).sum())
    sens = tp / (tp + fn) if tp + fn else float("nan")
    spec = tn / (tn + fp) if tn + fp else float("nan")
    return {"threshold": float(thr), "sensitivity": sens, "specificity": spec, "balanced_accuracy": (sens + spec) / 2,
            "tp": tp, "fn": fn, "tn": tn, "fp": fp}


def youden_threshold(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import roc_curve

    fpr, tpr, thr = roc_curve(y, p)
    i = int(np.argmax(tpr - fpr))
    return float(min(1.0, thr[i]))


def threshold_tuning(val: FeatureSet, tests: dict[str, FeatureSet], temperature: float) -> dict[str, Any]:
    yv, pv = _y(val), val.p(temperature)
    tuned = youden_threshold(yv, pv)
    out: dict[str, Any] = {"chosen_on": "pooled validation (Youden's J)", "tuned_threshold": tuned, "default_threshold": 0.5,
                           "validation": {"default": binary_rates(yv, pv, 0.5), "tuned": binary_rates(yv, pv, tuned)},
                           "test": {}}
    for name, fs in tests.items():
        y, p = _y(fs), fs.p(temperature)
        out["test"][name] = {"default": binary_rates(y, p, 0.5), "tuned": binary_rates(y, p, tuned)}
    bv = out["validation"]
    out["kept_in_default_path"] = bool(bv["tuned"]["balanced_accuracy"] > bv["default"]["balanced_accuracy"])
    return out


def _auc_pair(y, p_with, p_without, cfg: AblationConfig, split: str) -> dict[str, Any]:
    return {"with": {**auc_ci(y, p_with, n_boot=cfg.n_boot, seed=cfg.seed).to_dict(), "split": split},
            "without": {**auc_ci(y, p_without, n_boot=cfg.n_boot, seed=cfg.seed).to_dict(), "split": split},
            "paired": paired_bootstrap_test(y, p_with, p_without, n_boot=2 * cfg.n_boot, seed=cfg.seed).to_dict()}


def _probe(x: np.ndarray, y: np.ndarray, c: float, mode: str, seed: int) -> LogisticRegression:
    """Logistic probe with one imbalance strategy: none | class_weight | balanced_sampling."""
    if mode == "balanced_sampling":
        rng = np.random.default_rng(seed)
        pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
        n = max(len(pos), len(neg))
        idx = np.concatenate([rng.choice(pos, n, replace=True), rng.choice(neg, n, replace=True)])
        return LogisticRegression(C=c, max_iter=4000).fit(x[idx], y[idx])
    weight = "balanced" if mode == "class_weight" else None
    return LogisticRegression(C=c, max_iter=4000, class_weight=weight).fit(x, y)


def _standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    mu, sd = train.mean(0), train.std(0) + 1e-6
    return [(train - mu) / sd] + [(o - mu) / sd for o in others]


def clahe_ablation(val: FeatureSet, val_clahe: FeatureSet, tests: dict[str, FeatureSet],
                   tests_clahe: dict[str, FeatureSet], temperature: float, cfg: AblationConfig) -> dict[str, Any]:
    yv = _y(val)
    out: dict[str, Any] = {"inference_only": {"validation": _auc_pair(yv, val_clahe.p(temperature), val.p(temperature), cfg,
                                                                      "pooled validation")},
                           "probe": {}}
    for name, fs in tests.items():
        y = _y(fs)
        out["inference_only"][name] = _auc_pair(y, tests_clahe[name].p(temperature), fs.p(temperature), cfg, name)
    xr, *tr = _standardise(val.emb, *[tests[n].emb for n in tests])
    xc, *tc = _standardise(val_clahe.emb, *[tests_clahe[n].emb for n in tests])
    probe_raw = _probe(xr, yv, cfg.probe_c, "class_weight", cfg.seed)
    probe_clahe = _probe(xc, yv, cfg.probe_c, "class_weight", cfg.seed)
    for (name, fs), a, b in zip(tests.items(), tr, tc):
        y = _y(fs)
        out["probe"][name] = _auc_pair(y, probe_clahe.decision_function(b), probe_raw.decision_function(a), cfg, name)
    v = out["inference_only"]["validation"]
    out["kept_in_default_path"] = bool(v["with"]["value"] > v["without"]["value"])
    out["probe_fitted_on"] = f"pooled validation (n={len(yv)}), logistic C={cfg.probe_c}, class-weighted"
    return out


def imbalance_ablation(val: FeatureSet, tests: dict[str, FeatureSet], cfg: AblationConfig) -> dict[str, Any]:
    yv = _y(val)
    xv, *xt = _standardise(val.emb, *[tests[n].emb for n in tests])
    out: dict[str, Any] = {"probe_fitted_on": f"pooled validation (n={len(yv)}, {int(yv.sum())} malignant), C={cfg.probe_c}",
                           "arms": {}}
    for mode in ("none", "class_weight", "balanced_sampling"):
        probe = _probe(xv, yv, cfg.probe_c, mode, cfg.seed)
        arm: dict[str, Any] = {}
        for (name, fs), x in zip(tests.items(), xt):
            y = _y(fs)
            p = probe.predict_proba(x)[:, 1]
            arm[name] = {"auc": {**auc_ci(y, p, n_boot=cfg.n_boot, seed=cfg.seed).to_dict(), "split": name},
                         "at_0.5": binary_rates(y, p, 0.5)}
        out["arms"][mode] = arm
    return out
