"""Clinical covariates (seed 000 section 3.4.1): image-only vs clinical-only vs combined, per set.

Why this design: the classifier was trained on each set's *train* images, so its logits on those
images are over-confident; a logistic layer fitted on them would learn to over-trust the image.
So the clinical-only logistic regression is fitted on the train split (covariates carry no such
bias), and the combined logistic layer, which takes the frozen image logit and the clinical
logit, is fitted on the validation split (never trained on by the classifier) and evaluated on
the held-out test split. HAM10000 has no test images with metadata (the ISIC 2018 test set ships
none), so its combined layer is cross-fitted on validation folds grouped by lesion.

The same recipe on the pooled sets with the app's questions gives the shipped combined model
(``models/clinical_combined.safetensors``) used by the triage page when a user answers them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold

from lesiontriage.evaluate.metrics import ap_ci, auc_ci, paired_bootstrap_test
from lesiontriage.research.covariates import APP_COVARIATES, SET_COVARIATES, CovariateEncoder, harmonise
from lesiontriage.research.features import FeatureSet

log = logging.getLogger(__name__)


@dataclass
class ClinicalStudyConfig:
    c_grid: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
    folds: int = 5
    n_boot: int = 1000
    seed: int = 0


@dataclass
class LogisticModel:
    """Encoder + logistic regression on the covariates: the clinical-only model."""

    encoder: CovariateEncoder
    coef: np.ndarray
    intercept: float
    c: float

    def logit(self, frame: pd.DataFrame) -> np.ndarray:
        return self.encoder.transform(frame) @ self.coef + self.intercept

    def top_coefficients(self, k: int = 8) -> list[dict[str, Any]]:
        names = self.encoder.feature_names
        order = np.argsort(-np.abs(self.coef))[:k]
        return [{"feature": names[i], "coef": float(self.coef[i])} for i in order]


def _groups(rows: pd.DataFrame) -> np.ndarray:
    return rows["group_id"].astype(str).to_numpy()


def choose_c(X: np.ndarray, y: np.ndarray, groups: np.ndarray, cfg: ClinicalStudyConfig) -> float:
    """C with the best grouped-CV AUC (ties -> stronger regularisation)."""
    from sklearn.metrics import roc_auc_score

    folds = min(cfg.folds, len(np.unique(groups)))
    best, best_c = -1.0, cfg.c_grid[0]
    for c in cfg.c_grid:
        oof = np.zeros(len(y))
        for tr, te in GroupKFold(n_splits=folds).split(X, y, groups):
            if len(np.unique(y[tr])) < 2:
                continue
            oof[te] = LogisticRegression(C=c, max_iter=3000).fit(X[tr], y[tr]).decision_function(X[te])
        auc = roc_auc_score(y, oof) if len(np.unique(y)) == 2 else 0.5
        if auc > best + 1e-4:
            best, best_c = auc, c
    return best_c


def fit_clinical(rows: pd.DataFrame, columns: tuple[str, ...], cfg: ClinicalStudyConfig) -> LogisticModel:
    frame = harmonise(rows)
    enc = CovariateEncoder(columns).fit(frame)
    X, y = enc.transform(frame), rows["malignant"].astype(int).to_numpy()
    c = choose_c(X, y, _groups(rows), cfg)
    lr = LogisticRegression(C=c, max_iter=3000).fit(X, y)
    return LogisticModel(enc, lr.coef_[0].astype(float), float(lr.intercept_[0]), c)


def stack_inputs(image_logit: np.ndarray, temperature: float, clinical_logit: np.ndarray) -> np.ndarray:
    return np.stack([image_logit / temperature, clinical_logit], axis=1)


def _scores_block(y: np.ndarray, scores: dict[str, np.ndarray], cfg: ClinicalStudyConfig, split: str) -> dict[str, Any]:
    out: dict[str, Any] = {"split": split, "n": int(len(y)), "n_malignant": int(y.sum())}
    for name, p in scores.items():
        out[name] = {"auc": {**auc_ci(y, p, n_boot=cfg.n_boot, seed=cfg.seed).to_dict(), "split": split},
                     "ap": {**ap_ci(y, p, n_boot=cfg.n_boot, seed=cfg.seed).to_dict(), "split": split}}
    out["paired"] = {
        "combined_vs_image_only": paired_bootstrap_test(y, scores["combined"], scores["image_only"], n_boot=2 * cfg.n_boot,
                                                        seed=cfg.seed).to_dict(),
        "clinical_only_vs_image_only": paired_bootstrap_test(y, scores["clinical_only"], scores["image_only"],
                                                             n_boot=2 * cfg.n_boot, seed=cfg.seed).to_dict(),
    }
    return out


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def study_set(source: str, train: FeatureSet, val: FeatureSet, test: FeatureSet | None, temperature: float,
              cfg: ClinicalStudyConfig, test_name: str) -> dict[str, Any]:
    """One set: clinical-only on train, stacking on val, all three scored on the held-out split."""
    clin = fit_clinical(train.rows, SET_COVARIATES[source], cfg)
    y_val = val.rows["malignant"].astype(int).to_numpy()
    z_val = stack_inputs(val.logit, temperature, clin.logit(harmonise(val.rows)))
    if test is None:  # cross-fit the stacking layer on validation folds (HAM10000)
        held, z_held, y_held = val, z_val, y_val
        comb = np.zeros(len(y_val))
        for tr, te in GroupKFold(n_splits=cfg.folds).split(z_val, y_val, _groups(val.rows)):
            comb[te] = LogisticRegression(C=1.0, max_iter=2000).fit(z_val[tr], y_val[tr]).decision_function(z_val[te])
        stack_desc = f"cross-fitted on {cfg.folds} lesion-grouped folds of validation"
    else:
        stack = LogisticRegression(C=1.0, max_iter=2000).fit(z_val, y_val)
        held = test
        y_held = test.rows["malignant"].astype(int).to_numpy()
        z_held = stack_inputs(test.logit, temperature, clin.logit(harmonise(test.rows)))
        comb = stack.decision_function(z_held)
        stack_desc = "fitted on validation"
    scores = {"image_only": _sigmoid(z_held[:, 0]), "clinical_only": _sigmoid(z_held[:, 1]), "combined": _sigmoid(comb)}
    block = _scores_block(y_held, scores, cfg, test_name)
    block.update({
        "covariates": list(SET_COVARIATES[source]),
        "clinical_model": {"fitted_on": f"{source} train (n={len(train.rows)})", "C": clin.c,
                           "top_coefficients": clin.top_coefficients()},
        "combined_model": {"inputs": ["image logit / T", "clinical logit"], "stacking": stack_desc},
    })
    return block


@dataclass
class PooledCombined:
    """The shipped combined model: app covariates -> clinical logit; [image logit/T, clinical logit] -> logit."""

    clinical: LogisticModel
    stack_coef: np.ndarray
    stack_intercept: float
    metrics: dict[str, Any] = field(default_factory=dict)

    def predict(self, p_image: np.ndarray, frame: pd.DataFrame) -> np.ndarray:
        p = np.clip(np.asarray(p_image, float), 1e-6, 1 - 1e-6)
        z = np.stack([np.log(p / (1 - p)), np.broadcast_to(self.clinical.logit(frame), p.shape)], axis=1)
        return _sigmoid(z @ self.stack_coef + self.stack_intercept)


def fit_pooled(train: FeatureSet, val: FeatureSet, test: FeatureSet, temperature: float,
               cfg: ClinicalStudyConfig) -> PooledCombined:
    clin = fit_clinical(train.rows, APP_COVARIATES, cfg)
    y_val = val.rows["malignant"].astype(int).to_numpy()
    z_val = stack_inputs(val.logit, temperature, clin.logit(harmonise(val.rows)))
    stack = LogisticRegression(C=1.0, max_iter=2000).fit(z_val, y_val)
    model = PooledCombined(clin, stack.coef_[0].astype(float), float(stack.intercept_[0]))
    y_test = test.rows["malignant"].astype(int).to_numpy()
    p_img = _sigmoid(test.logit / temperature)
    p_comb = model.predict(p_img, harmonise(test.rows))
    p_clin = _sigmoid(clin.logit(harmonise(test.rows)))
    model.metrics = _scores_block(y_test, {"image_only": p_img, "clinical_only": p_clin, "combined": p_comb}, cfg,
                                  "PAD-UFES-20 test + derm7pt test (both modalities)")
    model.metrics["clinical_model"] = {"C": clin.c, "top_coefficients": clin.top_coefficients(),
                                       "fitted_on": f"pooled train of HAM10000, PAD-UFES-20, derm7pt (n={len(train.rows)})"}
    model.metrics["stack"] = {"coef": model.stack_coef.tolist(), "intercept": model.stack_intercept,
                              "fitted_on": f"pooled validation (n={len(val.rows)})"}
    return model
