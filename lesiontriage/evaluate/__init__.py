"""Evaluation library: ranking metrics with bootstrap CIs, calibration, operating points and
detection metrics. Pure numpy / scipy / scikit-learn / pycocotools; no torch, no models, so reports
can be recomputed from stored prediction tables.

Modules:
    metrics           AUC / AP with stratified bootstrap CIs, paired tests, per-stratum tables
    calibration       ECE + reliability bins, temperature scaling
    operating_points  thresholds for a target sensitivity / PPV, confusion at a threshold, Wilson CIs
    detection         COCO mAP, recall at IoU, IoU statistics, greedy matching
"""
from __future__ import annotations

from lesiontriage.evaluate.calibration import (
    ReliabilityBins,
    apply_temperature,
    expected_calibration_error,
    fit_temperature,
    fit_temperature_multiclass,
    top_label_ece,
)
from lesiontriage.evaluate.detection import (
    box_iou,
    coco_map,
    coco_map_classes,
    iou_summary,
    match_boxes,
    recall_at_iou,
)
from lesiontriage.evaluate.metrics import (
    MetricCI,
    PairedTest,
    ap_ci,
    auc_ci,
    metric_ci,
    metrics_by_stratum,
    paired_bootstrap_test,
)
from lesiontriage.evaluate.operating_points import (
    OperatingPoint,
    ThresholdChoice,
    choose_threshold_at_ppv,
    confusion_at,
    ppv_npv_at_prevalence,
    threshold_at_ppv,
    threshold_at_sensitivity,
    wilson_ci,
)

__all__ = [
    "MetricCI", "PairedTest", "auc_ci", "ap_ci", "metric_ci", "paired_bootstrap_test", "metrics_by_stratum",
    "ReliabilityBins", "expected_calibration_error", "top_label_ece", "fit_temperature",
    "fit_temperature_multiclass", "apply_temperature",
    "OperatingPoint", "ThresholdChoice", "choose_threshold_at_ppv", "confusion_at", "threshold_at_sensitivity", "threshold_at_ppv",
    "ppv_npv_at_prevalence", "wilson_ci",
    "coco_map", "coco_map_classes", "recall_at_iou", "match_boxes", "box_iou", "iou_summary",
]
