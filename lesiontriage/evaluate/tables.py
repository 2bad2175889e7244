"""Report assembly: turn the per-image / per-lesion prediction tables into the report sections.

Pure pandas / numpy on top of the metric library (``metrics``, ``calibration``,
``operating_points``, ``detection``): no torch, no models, no file reading. ``run.py`` produces
the tables; everything here can be recomputed from the committed parquet files, and the tests
feed it small hand-made tables.

Conventions:

- ``malignant`` is the label (1 / 0 / NA). Rows with NA labels (out-of-scope diagnoses, unlabelled
  mole photos) never enter a ranking metric; missing scores (an image that failed to decode, a
  model that is not installed) are dropped per metric and counted in ``n_missing_score``.
- A *group* is a named boolean mask over a table (``all_real_test``, ``modality=clinical``,
  ``source=derm7pt``, ``split=isic2018_test``, ...). Synthetic scenes never enter the pooled
  real-data groups; they are always reported under their own ``split=`` group and flagged.
- JSON has no NaN: :func:`jsonable` turns NaN / NA into ``null`` and numpy types into Python ones.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from lesiontriage.evaluate.calibration import expected_calibration_error, prob_to_logit
from lesiontriage.evaluate.detection import best_iou_per_gt, coco_map, iou_summary, recall_at_iou
from lesiontriage.evaluate.metrics import is_small, metric_ci, paired_bootstrap_test
from lesiontriage.evaluate.operating_points import (
    confusion_at,
    ppv_npv_at_prevalence,
    threshold_at_sensitivity,
    wilson_ci,
)

log = logging.getLogger(__name__)

Group = tuple[str, pd.Series]

# ---- score columns of the per-image table ---------------------------------------------------------
AGGREGATIONS: tuple[str, ...] = ("mean", "max", "noisy_or")
# "<strategy>.<aggregation>" -> column in predictions_images.parquet
IMAGE_SCORE_COLUMNS: dict[str, str] = {
    "direct.whole": "score_direct_whole",
    **{f"two_stage.{a}": f"score_two_stage_{a}" for a in AGGREGATIONS},
    **{f"one_step_c2.{a}": f"score_one_step_c2_{a}" for a in AGGREGATIONS},
}
# metadata.json 'triage' modes for each strategy (thresholds chosen on validation)
TRIAGE_MODE: dict[str, tuple[str, str]] = {
    "direct.whole": ("whole_image", "whole"),
    **{f"two_stage.{a}": ("two_stage", a) for a in AGGREGATIONS},
}
# lesion-level score columns of predictions_lesions.parquet
LESION_SCORE_COLUMNS: dict[str, str] = {
    "gt_box": "p_gt",
    "detected": "p_detected",
    "detected_max_lesion": "p_detected_max",
}

# ---- primary-care prevalence (item 5) ---------------------------------------------------------------
PRIMARY_CARE_PREVALENCE = 0.02
PREVALENCE_GRID: tuple[float, ...] = (0.01, 0.02, 0.05)
PREVALENCE_JUSTIFICATION = (
    "PPV and NPV are re-computed by Bayes' rule at the share of malignant lesions among skin lesions shown "
    "to a general practitioner, because the test sets are enriched for cancer (ISIC 2018 test: 20% "
    "MEL+BCC+AKIEC; PAD-UFES-20: >50%) and their own PPVs would mislead a primary-care reader. In UK primary "
    "care the MoleMate trial (Walter et al., BMJ 2012) found melanoma in only a few percent of the pigmented "
    "lesions patients consulted about, and only a small fraction of all GP skin consultations turn out to be "
    "melanoma; our malignant class also includes BCC and AKIEC (actinic keratosis / Bowen / SCC), which are "
    "more common than melanoma but mostly non-pigmented and often recognised without triage software. We "
    "therefore take 2% as the headline primary-care prevalence and show 1% and 5% as a sensitivity range; "
    "the values are an assumption stated for transparency, not a measured property of our data."
)


# =====================================================================================================
# small utilities
# =====================================================================================================

def jsonable(obj: Any) -> Any:
    """Recursively convert to JSON-safe Python: NaN / NA / inf -> None, numpy -> Python, tuples -> lists."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [jsonable(v) for v in obj.tolist()]
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return None if not math.isfinite(v) else v
    if obj is None or obj is pd.NA or obj is pd.NaT:
        return None
    try:
        if pd.isna(obj):
            return None
    except (TypeError, ValueError):
        pass
    return obj


def not_available(what: str) -> dict[str, str]:
    """The uniform marker for a part that needs a model or data that does not exist."""
    return {"status": f"not available: {what}"}


def _labels(df: pd.DataFrame, col: str = "malignant") -> pd.Series:
    return pd.to_numeric(df[col], errors="coerce") if col in df.columns else pd.Series(np.nan, index=df.index)


def _flag_bool(s: pd.Series) -> pd.Series:
    """A nullable boolean column as plain bool (NA -> False)."""
    return s.astype("boolean").fillna(False).astype(bool)


def has_scores(df: pd.DataFrame, col: str) -> bool:
    return col in df.columns and pd.to_numeric(df[col], errors="coerce").notna().any()


# =====================================================================================================
# groups (strata)
# =====================================================================================================

def evaluation_groups(df: pd.DataFrame, split_order: Sequence[str] | None = None,
                      include_modality: bool = True, include_source: bool = True) -> list[Group]:
    """Named masks over a prediction table: pooled real test data, by modality, by source, by split
    (incl. the PAD-UFES-20 biopsied subset). Synthetic rows are only in their own split group."""
    synthetic = _flag_bool(df["synthetic"]) if "synthetic" in df.columns else pd.Series(False, index=df.index)
    real = ~synthetic
    groups: list[Group] = [("all_real_test", real)]
    if include_modality and "modality" in df.columns:
        for m in sorted(df.loc[real, "modality"].dropna().astype(str).unique()):
            groups.append((f"modality={m}", real & (df["modality"].astype(str) == m)))
    if include_source and "source" in df.columns:
        for s in sorted(df.loc[real, "source"].dropna().astype(str).unique()):
            groups.append((f"source={s}", real & (df["source"].astype(str) == s)))
    if "split" in df.columns:
        present = list(dict.fromkeys(df["split"].astype(str)))
        order = [s for s in (split_order or []) if s in present] + sorted(s for s in present if s not in (split_order or []))
        for s in order:
            mask = df["split"].astype(str) == s
            groups.append((f"split={s}", mask))
            if "biopsied" in df.columns and s.startswith("pad_ufes20"):
                groups.append((f"split={s}/biopsied", mask & _flag_bool(df["biopsied"])))
    return groups


# =====================================================================================================
# item 1 / 3: ranking metrics with CIs and paired tests
# =====================================================================================================

def _yp(df: pd.DataFrame, mask: pd.Series, col: str) -> tuple[np.ndarray, np.ndarray, int]:
    y = _labels(df)
    p = pd.to_numeric(df[col], errors="coerce") if col in df.columns else pd.Series(np.nan, index=df.index)
    labelled = mask & y.notna()
    ok = labelled & p.notna()
    return y[ok].to_numpy(dtype=int), p[ok].to_numpy(dtype=float), int((labelled & p.isna()).sum())


def ranking_rows(df: pd.DataFrame, groups: Sequence[Group], scores: Mapping[str, str], n_boot: int = 1000,
                 seed: int = 0) -> list[dict[str, Any]]:
    """AUC and AP with stratified-bootstrap 95% CIs, one row per group x score.

    Scores whose column is entirely missing (model not installed) are skipped; the caller reports
    them as not available.
    """
    rows: list[dict[str, Any]] = []
    for label, col in scores.items():
        if not has_scores(df, col):
            continue
        for name, mask in groups:
            y, p, n_missing = _yp(df, mask, col)
            n, n_pos = len(y), int(y.sum())
            row: dict[str, Any] = {"group": name, "score": label, "n": n, "n_pos": n_pos, "n_neg": n - n_pos,
                                   "n_missing_score": n_missing}
            flag = ""
            for metric in ("auc", "ap"):
                if n == 0:
                    res_v, lo, hi, f = float("nan"), float("nan"), float("nan"), "empty group"
                else:
                    res = metric_ci(y, p, metric, n_boot=n_boot, seed=seed)
                    res_v, lo, hi, f = res.value, res.ci_low, res.ci_high, res.flag
                row[metric], row[f"{metric}_ci_low"], row[f"{metric}_ci_high"] = res_v, lo, hi
                flag = flag or f
            row["prevalence"] = n_pos / n if n else float("nan")
            row["small"] = bool(is_small(n, n_pos))
            row["flag"] = flag
            rows.append(row)
    return rows


def paired_rows(df: pd.DataFrame, groups: Sequence[Group], comparisons: Sequence[tuple[str, str, str, str]],
                n_boot: int = 2000, seed: int = 0, metrics: Sequence[str] = ("auc", "ap")) -> list[dict[str, Any]]:
    """Paired bootstrap tests ``a - b`` on the rows both scores cover (same resampled indices)."""
    rows: list[dict[str, Any]] = []
    y_all = _labels(df)
    for label_a, col_a, label_b, col_b in comparisons:
        if not (has_scores(df, col_a) and has_scores(df, col_b)):
            continue
        pa_all = pd.to_numeric(df[col_a], errors="coerce")
        pb_all = pd.to_numeric(df[col_b], errors="coerce")
        for name, mask in groups:
            ok = mask & y_all.notna() & pa_all.notna() & pb_all.notna()
            y = y_all[ok].to_numpy(dtype=int)
            for metric in metrics:
                base = {"group": name, "a": label_a, "b": label_b, "metric": metric}
                if len(y) == 0:
                    rows.append({**base, "n": 0, "n_pos": 0, "flag": "empty group"})
                    continue
                t = paired_bootstrap_test(y, pa_all[ok].to_numpy(float), pb_all[ok].to_numpy(float), metric,
                                          n_boot=n_boot, seed=seed)
                d = t.to_dict()
                d.pop("metric", None)
                rows.append({**base, **d, "small": bool(is_small(t.n, t.n_pos))})
    return rows


def _downsample(x: np.ndarray, y: np.ndarray, max_points: int) -> tuple[list[float], list[float]]:
    if len(x) > max_points:
        idx = np.unique(np.linspace(0, len(x) - 1, max_points).round().astype(int))
        x, y = x[idx], y[idx]
    return [round(float(v), 5) for v in x], [round(float(v), 5) for v in y]


def curve_points(y: np.ndarray, p: np.ndarray, max_points: int = 101) -> dict[str, Any] | None:
    """ROC (fpr, tpr) and PR (recall, precision) points, downsampled for plotting; None if undefined."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    y = np.asarray(y, dtype=int)
    if len(y) == 0 or y.min() == y.max():
        return None
    fpr, tpr, _ = roc_curve(y, p)
    prec, rec, _ = precision_recall_curve(y, p)
    fx, fy = _downsample(fpr, tpr, max_points)
    rx, ry = _downsample(rec[::-1], prec[::-1], max_points)
    return {"roc": {"fpr": fx, "tpr": fy}, "pr": {"recall": rx, "precision": ry}}


def curves_for(df: pd.DataFrame, groups: Sequence[Group], scores: Mapping[str, str],
               metric_rows: Sequence[dict[str, Any]], max_points: int = 101) -> dict[str, Any]:
    """{group: {score: {roc: {fpr, tpr, auc}, pr: {recall, precision, ap}}}} for plotting."""
    lookup = {(r["group"], r["score"]): r for r in metric_rows}
    out: dict[str, Any] = {}
    for name, mask in groups:
        for label, col in scores.items():
            if not has_scores(df, col):
                continue
            y, p, _ = _yp(df, mask, col)
            pts = curve_points(y, p, max_points)
            if pts is None:
                continue
            r = lookup.get((name, label), {})
            pts["roc"]["auc"] = r.get("auc")
            pts["pr"]["ap"] = r.get("ap")
            out.setdefault(name, {})[label] = pts
    return out


# =====================================================================================================
# item 4: calibration
# =====================================================================================================

def ece_bootstrap_ci(y: np.ndarray, p: np.ndarray, n_bins: int = 15, n_boot: int = 300,
                     seed: int = 0) -> tuple[float, float]:
    """Percentile 95% CI of the binary ECE by resampling lesions (plain bootstrap)."""
    if len(y) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n_boot):
        i = rng.integers(0, len(y), len(y))
        vals.append(expected_calibration_error(y[i], p[i], n_bins).ece)
    lo, hi = np.percentile(vals, [2.5, 97.5])
    return float(lo), float(hi)


def calibration_section(df: pd.DataFrame, groups: Sequence[Group], temperature: float, logit_col: str = "logit_gt",
                        p_col: str = "p_gt", n_bins: int = 15, n_boot: int = 300, seed: int = 0) -> dict[str, Any]:
    """Reliability bins and ECE before (sigmoid of the raw logit) and after (sigmoid(logit / T))
    temperature scaling, per group. T is the shipped one, fitted on validation; never refitted here.

    When the table has no raw logit column, the logit is recovered from the calibrated p as
    ``T * logit(p)`` (exact up to float rounding)."""
    out: dict[str, Any] = {"temperature": temperature, "n_bins": n_bins, "score": p_col,
                           "definition": "binary ECE, equal-width bins over p(malignant); 'before' = sigmoid(raw logit), "
                                         "'after' = sigmoid(raw logit / T) with the shipped validation-fitted T",
                           "groups": {}}
    if not has_scores(df, p_col):
        return {**out, **not_available("no lesion scores")}
    y_all = _labels(df)
    p_all = pd.to_numeric(df[p_col], errors="coerce")
    z_all = pd.to_numeric(df[logit_col], errors="coerce") if logit_col in df.columns else \
        pd.Series(prob_to_logit(p_all.fillna(0.5)) * temperature, index=df.index).where(p_all.notna())
    for name, mask in groups:
        ok = mask & y_all.notna() & p_all.notna() & z_all.notna()
        if not ok.any():
            continue
        y = y_all[ok].to_numpy(int)
        z = z_all[ok].to_numpy(float)
        before = 1.0 / (1.0 + np.exp(-z))
        after = 1.0 / (1.0 + np.exp(-z / temperature))
        b, a = expected_calibration_error(y, before, n_bins), expected_calibration_error(y, after, n_bins)
        lo_b, hi_b = ece_bootstrap_ci(y, before, n_bins, n_boot, seed)
        lo_a, hi_a = ece_bootstrap_ci(y, after, n_bins, n_boot, seed)
        out["groups"][name] = {
            "n": int(len(y)), "n_pos": int(y.sum()),
            "ece_before": {"value": b.ece, "ci_low": lo_b, "ci_high": hi_b, "n": int(len(y))},
            "ece_after": {"value": a.ece, "ci_low": lo_a, "ci_high": hi_a, "n": int(len(y))},
            "before": b.to_dict(), "after": a.to_dict(),
        }
    return out


# =====================================================================================================
# item 5: operating points
# =====================================================================================================

def _op_row(y: np.ndarray, p: np.ndarray, thr: float, prevalences: Sequence[float]) -> dict[str, Any]:
    op = confusion_at(y, p, thr).to_dict()
    row = {k: v for k, v in op.items() if not k.endswith("_ci")}
    for k in ("sensitivity", "specificity", "ppv", "npv"):
        lo, hi = op[f"{k}_ci"]
        row[f"{k}_ci_low"], row[f"{k}_ci_high"] = lo, hi
    sens, spec = op["sensitivity"], op["specificity"]
    for prev in prevalences:
        tag = f"{prev * 100:g}pct"
        if sens is None or spec is None:
            row[f"ppv_at_{tag}"], row[f"npv_at_{tag}"] = None, None
        else:
            row[f"ppv_at_{tag}"], row[f"npv_at_{tag}"] = ppv_npv_at_prevalence(sens, spec, prev)
    return row


def operating_point_rows(df: pd.DataFrame, groups: Sequence[Group], thresholds: Mapping[str, Mapping[str, float]],
                         prevalences: Sequence[float] = PREVALENCE_GRID,
                         target_sensitivities: Sequence[float] = (0.90, 0.95),
                         scores: Mapping[str, str] = IMAGE_SCORE_COLUMNS) -> list[dict[str, Any]]:
    """Confusion, sensitivity / specificity / PPV / NPV (Wilson CIs) and PPV / NPV at the stated
    prevalences, at (a) the shipped thresholds (``thresholds[score_label] = {'refer': t, 'urgent': t}``,
    chosen on validation) and (b) the thresholds giving 90% / 95% sensitivity *on this group*
    (read off the test ROC: descriptive, not deployable)."""
    rows: list[dict[str, Any]] = []
    for label, col in scores.items():
        if not has_scores(df, col):
            continue
        for name, mask in groups:
            y, p, _ = _yp(df, mask, col)
            if len(y) == 0:
                continue
            points: list[tuple[str, float, str]] = []
            for tier, thr in (thresholds.get(label) or {}).items():
                if thr is not None and math.isfinite(float(thr)):
                    points.append((f"shipped_{tier}", float(thr), "validation"))
            if y.sum() > 0:
                for s in target_sensitivities:
                    points.append((f"sensitivity_{int(round(s * 100))}", threshold_at_sensitivity(y, p, s), "this test group (descriptive)"))
            for point, thr, chosen in points:
                rows.append({"group": name, "score": label, "point": point, "threshold_chosen_on": chosen,
                             **_op_row(y, p, thr, prevalences), "small": bool(is_small(len(y), int(y.sum())))})
    return rows


def shipped_thresholds(metadata: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """{score_label: {'refer': t, 'urgent': t}} from metadata.json's ``triage`` section."""
    triage = metadata.get("triage") or {}
    out: dict[str, dict[str, float]] = {}
    for label, (mode, agg) in TRIAGE_MODE.items():
        thr = ((triage.get(mode) or {}).get("thresholds") or {}).get(agg)
        if isinstance(thr, Mapping):
            out[label] = {k: float(v) for k, v in thr.items() if isinstance(v, (int, float))}
    return out


# =====================================================================================================
# item 6: skin tone
# =====================================================================================================

def skin_tone_rows(df: pd.DataFrame, groups: Sequence[Group], scores: Mapping[str, str], n_boot: int = 1000,
                   seed: int = 0) -> list[dict[str, Any]]:
    """Metrics per ITA category inside each group; estimates flagged unreliable form their own
    category 'unreliable' (not dropped silently). Small categories are flagged (``small``)."""
    if "ita_category" not in df.columns:
        return []
    cat = df["ita_category"].astype("object").where(df["ita_category"].notna(), "unreliable")
    if "ita_ok" in df.columns:
        cat = cat.where(_flag_bool(df["ita_ok"]), "unreliable")
    rows: list[dict[str, Any]] = []
    from lesiontriage.skintone import CATEGORY_NAMES

    for name, mask in groups:
        for c in list(CATEGORY_NAMES) + ["unreliable"]:
            sub = mask & (cat == c)
            n_images = int(sub.sum())
            if n_images == 0:
                continue
            for r in ranking_rows(df, [(name, sub)], scores, n_boot=n_boot, seed=seed):
                rows.append({"group": name, "ita_category": c, "n_rows": n_images, **{k: v for k, v in r.items() if k != "group"}})
            if not any(has_scores(df, col) for col in scores.values()):
                rows.append({"group": name, "ita_category": c, "n_rows": n_images})
    return rows


def ita_distribution(df: pd.DataFrame, group_col: str = "split") -> list[dict[str, Any]]:
    """Counts of images per ITA category (and unreliable) per split, with the median ITA."""
    if "ita_category" not in df.columns:
        return []
    cat = df["ita_category"].astype("object").where(df["ita_category"].notna(), "unreliable")
    if "ita_ok" in df.columns:
        cat = cat.where(_flag_bool(df["ita_ok"]), "unreliable")
    rows = []
    for g, sub in df.groupby(group_col, sort=False):
        counts = cat[sub.index].value_counts()
        ok = sub["ita_ok"].astype("boolean").fillna(False) if "ita_ok" in sub.columns else pd.Series(True, index=sub.index)
        ita = pd.to_numeric(sub["ita"], errors="coerce")[ok.astype(bool)]
        rows.append({group_col: g, "n_images": int(len(sub)), "n_reliable": int(ok.sum()),
                     "median_ita": float(ita.median()) if len(ita) else float("nan"),
                     **{f"n_{c}": int(counts.get(c, 0)) for c in
                        ("very_light", "light", "intermediate", "tan", "brown", "dark", "unreliable")}})
    return rows


# =====================================================================================================
# item 8: error analysis
# =====================================================================================================

ID_COLUMNS: tuple[str, ...] = ("split", "image_id", "path", "lesion_index", "source", "modality", "diagnosis")


def error_rows(df: pd.DataFrame, groups: Sequence[Group], score: str, col: str, k: int = 10,
               extra: Sequence[str] = ()) -> dict[str, Any]:
    """The k malignant lesions with the lowest score (false negatives at any threshold first) and the
    k benign ones with the highest score, per group; ids and scores only."""
    out: dict[str, Any] = {}
    if not has_scores(df, col):
        return out
    y = _labels(df)
    p = pd.to_numeric(df[col], errors="coerce")
    keep = [c for c in ID_COLUMNS + tuple(extra) if c in df.columns]
    for name, mask in groups:
        ok = mask & y.notna() & p.notna()
        if not ok.any():
            continue
        sub = df.loc[ok, keep].copy()
        sub["score"] = p[ok]
        yy = y[ok]
        fn = sub[yy == 1].sort_values("score", kind="stable").head(k)
        fp = sub[yy == 0].sort_values("score", ascending=False, kind="stable").head(k)
        out[name] = {"score": score, "false_negatives": fn.to_dict(orient="records"),
                     "false_positives": fp.to_dict(orient="records")}
    return out


# =====================================================================================================
# item 2: detection
# =====================================================================================================

def detection_metrics(gt: Sequence[np.ndarray], raw_boxes: Sequence[np.ndarray], raw_scores: Sequence[np.ndarray],
                      score_threshold: float, n_boot: int = 0, seed: int = 0, max_dets: int = 100) -> dict[str, Any]:
    """COCO mAP (all raw detections), recall at IoU > 0 and >= 0.5 and IoU median / IQR (detections
    kept at the pipeline's score threshold) over one split's images.

    ``n_boot`` > 0 adds a percentile CI for mAP@0.5 and mAP@[.5:.95] by resampling images (each
    replicate is a pycocotools run, so keep it small)."""
    gt = [np.asarray(g, dtype=float).reshape(-1, 4) for g in gt]
    raw_boxes = [np.asarray(b, dtype=float).reshape(-1, 4) for b in raw_boxes]
    raw_scores = [np.asarray(s, dtype=float).reshape(-1) for s in raw_scores]
    m = coco_map(gt, raw_boxes, raw_scores, max_dets=max_dets)
    r0 = recall_at_iou(gt, raw_boxes, raw_scores, iou_thr=0.0, score_thr=score_threshold)
    r50 = recall_at_iou(gt, raw_boxes, raw_scores, iou_thr=0.5, score_thr=score_threshold, one_to_one=True)
    ious = iou_summary(best_iou_per_gt(gt, raw_boxes, raw_scores, score_thr=score_threshold))
    kept = [int((s >= score_threshold).sum()) for s in raw_scores]
    out: dict[str, Any] = {
        "n_images": len(gt), "n_gt": int(sum(len(g) for g in gt)),
        "map50": {"value": m["map50"], "n": m["n_gt"]},
        "map75": {"value": m["map75"], "n": m["n_gt"]},
        "map50_95": {"value": m["map50_95"], "n": m["n_gt"]},
        "recall_iou0": {"value": r0.recall, "ci_low": r0.ci_low, "ci_high": r0.ci_high, "n": r0.n_gt,
                        "n_found": r0.n_found},
        "recall_iou50": {"value": r50.recall, "ci_low": r50.ci_low, "ci_high": r50.ci_high, "n": r50.n_gt,
                         "n_found": r50.n_found, "one_to_one": True},
        "iou": ious,
        "score_threshold": score_threshold,
        "detections_per_image_kept": {"mean": float(np.mean(kept)) if kept else float("nan"),
                                      "median": float(np.median(kept)) if kept else float("nan"),
                                      "images_with_none": int(sum(1 for k in kept if k == 0))},
        "map_all_detections_n": m["n_pred"],
    }
    if n_boot > 0 and len(gt) > 1 and out["n_gt"] > 0:
        rng = np.random.default_rng(seed)
        reps50, reps = [], []
        for _ in range(n_boot):
            idx = rng.integers(0, len(gt), len(gt))
            mm = coco_map([gt[i] for i in idx], [raw_boxes[i] for i in idx], [raw_scores[i] for i in idx], max_dets=max_dets)
            reps50.append(mm["map50"])
            reps.append(mm["map50_95"])
        for key, vals in (("map50", reps50), ("map50_95", reps)):
            v = np.asarray(vals, dtype=float)
            v = v[np.isfinite(v)]
            if v.size:
                out[key]["ci_low"], out[key]["ci_high"] = (float(x) for x in np.percentile(v, [2.5, 97.5]))
                out[key]["ci_method"] = f"percentile bootstrap over images ({n_boot} replicates)"
    return out


# =====================================================================================================
# headline summary (item 10)
# =====================================================================================================

def metric_object(value: Any, ci_low: Any = None, ci_high: Any = None, n: Any = None, split: str = "",
                  **extra: Any) -> dict[str, Any]:
    """The summary.json shape: {value, ci_low, ci_high, n, split} (+ optional note / status)."""
    return jsonable({"value": value, "ci_low": ci_low, "ci_high": ci_high, "n": n, "split": split, **extra})


def _pick(rows: Iterable[Mapping[str, Any]], **where: Any) -> Mapping[str, Any] | None:
    for r in rows:
        if all(r.get(k) == v for k, v in where.items()):
            return r
    return None


def from_ranking(rows: Sequence[Mapping[str, Any]], group: str, score: str, metric: str, split: str,
                 missing: str = "not available") -> dict[str, Any]:
    r = _pick(rows, group=group, score=score)
    if r is None:
        return metric_object(None, split=split, status=missing)
    extra = {"note": r["flag"]} if r.get("flag") else {}
    return metric_object(r.get(metric), r.get(f"{metric}_ci_low"), r.get(f"{metric}_ci_high"), r.get("n"), split,
                         n_pos=r.get("n_pos"), **extra)


def specificity_at_sensitivity(df: pd.DataFrame, mask: pd.Series, col: str, target: float, split: str) -> dict[str, Any]:
    """Specificity (Wilson CI) at the threshold reaching ``target`` sensitivity on this split."""
    if not has_scores(df, col):
        return metric_object(None, split=split, status="not available")
    y, p, _ = _yp(df, mask, col)
    if len(y) == 0 or y.sum() == 0 or y.sum() == len(y):
        return metric_object(None, split=split, n=len(y), status="undefined: one class only")
    thr = threshold_at_sensitivity(y, p, target)
    op = confusion_at(y, p, thr)
    lo, hi = wilson_ci(op.tn, op.tn + op.fp)
    return metric_object(op.specificity, lo, hi, int(len(y)), split, threshold=thr,
                         achieved_sensitivity=op.sensitivity,
                         note="threshold read off this test split's ROC (descriptive); CI conditional on it")
