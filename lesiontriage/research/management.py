"""Management recommendation on derm7pt (seed 001): EXCISION / CLINICAL FOLLOW-UP / NO FURTHER EXAMINATION.

Three ways, all on the official derm7pt split (fit on train, choose on valid, report on test), from
the frozen classifier's outputs on the case's dermoscopy and clinical images plus metadata:

* ``direct``: multinomial logistic regression straight to the management decision;
* ``inferred``: predict the diagnosis (same inputs), then p(m | x) = sum_d p(d | x) p(m | d) with
  the training-set priors p(m | d);
* ``multitask``: a small MLP with three heads (management, diagnosis, the seven 7-point criteria)
  trained jointly, which is seed 001's multi-task idea on frozen features.

Why frozen features: 413 training cases are too few to fine-tune a CNN per head on 2 CPU cores;
the frozen classifier already encodes the lesion, and every variant sees the same inputs, so the
comparison between the three strategies is fair.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import confusion_matrix, roc_auc_score
from torch import nn

from lesiontriage.research.covariates import CovariateEncoder, harmonise
from lesiontriage.research.features import FeatureSet

log = logging.getLogger(__name__)

MANAGEMENT = ("excision", "clinical follow up", "no further examination")
CRITERIA = ("pigment_network", "streaks", "pigmentation", "regression_structures", "dots_and_globules",
            "blue_whitish_veil", "vascular_structures")


@dataclass
class ManagementConfig:
    pca_components: int = 32
    c_grid: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0)
    mlp_hidden: int = 128
    mlp_epochs: int = 300
    mlp_lr: float = 1e-3
    mlp_weight_decay: float = 1e-3
    n_boot: int = 1000
    seed: int = 0
    use_clinical: bool = True  # False: the dermoscopy image (+ metadata) only, for users without a clinical photo


@dataclass
class CaseTable:
    """One row per derm7pt case with both images' features side by side."""

    cases: pd.DataFrame  # pair_id, split, management, diagnosis, criteria, metadata
    derm: FeatureSet
    clin: FeatureSet


def build_cases(derm: FeatureSet, clin: FeatureSet) -> CaseTable:
    """Align dermoscopy and clinical rows on ``pair_id`` (cases missing either image are dropped)."""
    d = derm.rows.assign(_i=np.arange(len(derm.rows)))
    c = clin.rows.assign(_j=np.arange(len(clin.rows)))[["pair_id", "_j"]]
    both = d.merge(c, on="pair_id", how="inner")
    both = both[derm.ok[both["_i"]] & clin.ok[both["_j"]]].reset_index(drop=True)
    i, j = both["_i"].to_numpy(), both["_j"].to_numpy()
    return CaseTable(both, FeatureSet(both, derm.logit[i], derm.sub[i], derm.emb[i], derm.ok[i]),
                     FeatureSet(both, clin.logit[j], clin.sub[j], clin.emb[j], clin.ok[j]))


class CaseEncoder:
    """Frozen image outputs of both images (logit, sub-type probabilities, PCA of features) + metadata."""

    def __init__(self, cfg: ManagementConfig) -> None:
        self.cfg = cfg
        self.pca_derm = PCA(cfg.pca_components, random_state=cfg.seed)
        self.pca_clin = PCA(cfg.pca_components, random_state=cfg.seed)
        self.meta = CovariateEncoder(("sex", "region", "elevation3"))
        self.mean: np.ndarray | None = None
        self.std: np.ndarray | None = None

    def _raw(self, t: CaseTable, idx: np.ndarray, fit: bool) -> np.ndarray:
        clinical = self.cfg.use_clinical
        if fit:
            self.pca_derm.fit(t.derm.emb[idx])
            if clinical:
                self.pca_clin.fit(t.clin.emb[idx])
            self.meta.fit(harmonise(t.cases.iloc[idx]))
        parts = [t.derm.logit[idx, None], t.derm.sub[idx], self.pca_derm.transform(t.derm.emb[idx])]
        if clinical:
            parts += [t.clin.logit[idx, None], t.clin.sub[idx], self.pca_clin.transform(t.clin.emb[idx])]
        parts.append(self.meta.transform(harmonise(t.cases.iloc[idx])))
        return np.concatenate(parts, axis=1).astype(np.float64)

    def fit_transform(self, t: CaseTable, idx: np.ndarray) -> np.ndarray:
        x = self._raw(t, idx, fit=True)
        self.mean, self.std = x.mean(0), x.std(0) + 1e-6
        return (x - self.mean) / self.std

    def transform(self, t: CaseTable, idx: np.ndarray) -> np.ndarray:
        return (self._raw(t, idx, fit=False) - self.mean) / self.std


def _labels(values: pd.Series, classes: tuple[str, ...]) -> np.ndarray:
    lookup = {c: i for i, c in enumerate(classes)}
    return np.array([lookup.get(str(v), -1) for v in values])


def management_metrics(y: np.ndarray, prob: np.ndarray, cfg: ManagementConfig) -> dict[str, Any]:
    """Accuracy, per-class sensitivity, macro one-vs-rest AUROC (with case-bootstrap CIs), confusion
    matrix (rows = truth, columns = prediction) and the over-/under-excision counts."""
    pred = prob.argmax(1)
    k = len(MANAGEMENT)
    cm = confusion_matrix(y, pred, labels=list(range(k)))
    acc = float((pred == y).mean())
    auroc = float(roc_auc_score(y, prob, multi_class="ovr", average="macro", labels=list(range(k))))
    rng = np.random.default_rng(cfg.seed)
    accs, aucs = [], []
    for _ in range(cfg.n_boot):
        i = rng.integers(0, len(y), len(y))
        if len(np.unique(y[i])) < k:
            continue
        accs.append((pred[i] == y[i]).mean())
        aucs.append(roc_auc_score(y[i], prob[i], multi_class="ovr", average="macro", labels=list(range(k))))
    lo = lambda v: float(np.percentile(v, 2.5)) if v else float("nan")
    hi = lambda v: float(np.percentile(v, 97.5)) if v else float("nan")
    sens = {MANAGEMENT[c]: float(cm[c, c] / cm[c].sum()) if cm[c].sum() else None for c in range(k)}
    exc = MANAGEMENT.index("excision")
    return {
        "n": int(len(y)),
        "accuracy": {"value": acc, "ci_low": lo(accs), "ci_high": hi(accs), "n": int(len(y))},
        "auroc_macro_ovr": {"value": auroc, "ci_low": lo(aucs), "ci_high": hi(aucs), "n": int(len(y))},
        "sensitivity": sens,
        "confusion_matrix": {"labels": list(MANAGEMENT), "rows_truth_cols_pred": cm.tolist()},
        "over_excision": int(((pred == exc) & (y != exc)).sum()),
        "under_excision": int(((pred != exc) & (y == exc)).sum()),
    }


def _choose_c(x_tr, y_tr, x_va, y_va, cfg: ManagementConfig) -> tuple[float, LogisticRegression]:
    best = (-1.0, None, None)
    for c in cfg.c_grid:
        lr = LogisticRegression(C=c, max_iter=4000).fit(x_tr, y_tr)
        score = roc_auc_score(y_va, lr.predict_proba(x_va), multi_class="ovr", labels=list(lr.classes_)) \
            if len(np.unique(y_va)) == len(lr.classes_) else (lr.predict(x_va) == y_va).mean()
        if score > best[0] + 1e-4:
            best = (score, c, lr)
    return best[1], best[2]


def _full_proba(lr: LogisticRegression, x: np.ndarray, k: int) -> np.ndarray:
    """predict_proba with a column for every class index 0..k-1 (absent classes get 0)."""
    out = np.zeros((len(x), k))
    out[:, lr.classes_] = lr.predict_proba(x)
    return out


class MultiTaskHead(nn.Module):
    def __init__(self, d_in: int, hidden: int, n_mgmt: int, n_diag: int, n_criteria: list[int]) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Dropout(0.3))
        self.mgmt = nn.Linear(hidden, n_mgmt)
        self.diag = nn.Linear(hidden, n_diag)
        self.criteria = nn.ModuleList([nn.Linear(hidden, n) for n in n_criteria])

    def forward(self, x):
        h = self.trunk(x)
        return self.mgmt(h), self.diag(h), [c(h) for c in self.criteria]


def train_multitask(x_tr, targets_tr, x_va, y_va_mgmt, sizes, cfg: ManagementConfig) -> tuple[MultiTaskHead, int]:
    """Full-batch Adam; keeps the epoch with the best validation management log-loss."""
    torch.manual_seed(cfg.seed)
    model = MultiTaskHead(x_tr.shape[1], cfg.mlp_hidden, sizes["mgmt"], sizes["diag"], sizes["criteria"])
    opt = torch.optim.Adam(model.parameters(), lr=cfg.mlp_lr, weight_decay=cfg.mlp_weight_decay)
    xt, xv = torch.tensor(x_tr, dtype=torch.float32), torch.tensor(x_va, dtype=torch.float32)
    ym, yd = torch.tensor(targets_tr["mgmt"]), torch.tensor(targets_tr["diag"])
    ycs = [torch.tensor(c) for c in targets_tr["criteria"]]
    yv = torch.tensor(y_va_mgmt)
    ce = nn.CrossEntropyLoss(ignore_index=-1)
    best, best_state, best_epoch = float("inf"), None, 0
    for epoch in range(cfg.mlp_epochs):
        model.train()
        m, d, cs = model(xt)
        loss = ce(m, ym) + 0.5 * ce(d, yd) + 0.2 * sum(ce(c, y) for c, y in zip(cs, ycs))
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.eval()
        with torch.no_grad():
            val_loss = float(ce(model(xv)[0], yv))
        if val_loss < best:
            best, best_epoch = val_loss, epoch
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return model.eval(), best_epoch


def run_management_study(table: CaseTable, cfg: ManagementConfig) -> dict[str, Any]:
    cases = table.cases
    split = cases["split"].to_numpy()
    tr, va, te = (np.flatnonzero(split == s) for s in ("train", "val", "test"))
    enc = CaseEncoder(cfg)
    x_tr, x_va, x_te = enc.fit_transform(table, tr), enc.transform(table, va), enc.transform(table, te)
    y = _labels(cases["management"], MANAGEMENT)
    diag_classes = tuple(sorted(cases.iloc[tr]["diagnosis"].astype(str).unique()))
    yd = _labels(cases["diagnosis"].astype(str), diag_classes)
    k = len(MANAGEMENT)
    out: dict[str, Any] = {"n_cases": {"train": int(len(tr)), "val": int(len(va)), "test": int(len(te))},
                           "classes": list(MANAGEMENT), "split": "derm7pt official test",
                           "inputs": "frozen classifier logit + sub-type probabilities + PCA-"
                                     f"{cfg.pca_components} features of the dermoscopy"
                                     f"{' and clinical images' if cfg.use_clinical else ' image'}, sex, body region, elevation"}

    # 1. direct
    c_direct, lr_direct = _choose_c(x_tr, y[tr], x_va, y[va], cfg)
    p_direct = _full_proba(lr_direct, x_te, k)
    out["direct"] = {"C": c_direct, **management_metrics(y[te], p_direct, cfg)}

    # 2. inferred through the diagnosis and training-set priors p(m | d)
    c_diag, lr_diag = _choose_c(x_tr, yd[tr], x_va, yd[va], cfg)
    prior = np.ones((len(diag_classes), k))  # Laplace smoothing
    for d_i, m_i in zip(yd[tr], y[tr]):
        prior[d_i, m_i] += 1
    prior /= prior.sum(1, keepdims=True)
    p_diag = _full_proba(lr_diag, x_te, len(diag_classes))
    p_inf = p_diag @ prior
    out["inferred"] = {"C_diagnosis": c_diag, "diagnosis_accuracy": float((p_diag.argmax(1) == yd[te]).mean()),
                       "priors_p_mgmt_given_diag": {d: dict(zip(MANAGEMENT, map(float, prior[i])))
                                                    for i, d in enumerate(diag_classes)},
                       **management_metrics(y[te], p_inf, cfg)}

    # 3. multi-task: management + diagnosis + 7-point criteria
    crit_classes = [tuple(sorted(cases.iloc[tr][c].astype(str).unique())) for c in CRITERIA]
    crit_y = [_labels(cases[c].astype(str), cl) for c, cl in zip(CRITERIA, crit_classes)]
    sizes = {"mgmt": k, "diag": len(diag_classes), "criteria": [len(c) for c in crit_classes]}
    model, best_epoch = train_multitask(x_tr, {"mgmt": y[tr], "diag": yd[tr], "criteria": [c[tr] for c in crit_y]},
                                        x_va, y[va], sizes, cfg)
    with torch.no_grad():
        m, d, cs = model(torch.tensor(x_te, dtype=torch.float32))
    p_mt = torch.softmax(m, 1).numpy()
    crit_acc = {name: float((c.argmax(1).numpy() == yc[te]).mean()) for name, c, yc in zip(CRITERIA, cs, crit_y)}
    out["multitask"] = {"best_epoch": best_epoch, "diagnosis_accuracy": float((d.argmax(1).numpy() == yd[te]).mean()),
                        "criteria_accuracy": crit_acc, **management_metrics(y[te], p_mt, cfg)}
    out["majority_baseline_accuracy"] = float((y[te] == np.bincount(y[tr]).argmax()).mean())
    out["seed_001_reference"] = {"multitask_accuracy": 0.737, "direct_auroc": 0.844,
                                 "note": "published on derm7pt with end-to-end CNNs; quoted for comparison, not reproduced"}
    out["_models"] = {"encoder": enc, "direct": lr_direct}
    return out
