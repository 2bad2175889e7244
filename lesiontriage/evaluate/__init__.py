"""Evaluation library and the `lesiontriage evaluate` reports.

Metric library: pure numpy / scipy / scikit-learn / pycocotools; no torch, no models, so reports
can be recomputed from stored prediction tables.

Modules:
    metrics           AUC / AP with stratified bootstrap CIs, paired tests, per-stratum tables
    calibration       ECE + reliability bins, temperature scaling
    operating_points  thresholds for a target sensitivity / PPV, confusion at a threshold, Wilson CIs
    detection         COCO mAP, recall at IoU, IoU statistics, greedy matching
    tables            report assembly: prediction tables -> report sections (pure pandas)
    embedding         2-D map (PCA -> t-SNE) of the classifier's pooled lesion features
    run               orchestration of `lesiontriage evaluate` (models, cache, inference, writing)
    fast              frozen oneDNN copies of the networks for the evaluation's CPU budget (torch)

Report files (``models/reports/``, written by ``lesiontriage evaluate``)
=========================================================================

Every JSON file starts with a ``provenance`` object: ``command``, ``manifest_hash``,
``model_sha256`` ({classifier, detector, image_classifier[, the other whole-image view members, detector_c2]: sha256}), ``model_status``
({key: "ok" | "not available: ..."}), ``seed``, ``created`` (UTC ISO time), ``package_version``,
``limit_per_split`` (null = full run), ``sampling`` (every cap: ``ham_detection_max``, ``scenes_max``,
``c2_max_per_split``, ``n_available`` / ``n_evaluated`` / ``n_c2`` per split, ``method``), ``n_boot``,
``models_dir``, ``data_root``, ``intended_use``.
JSON has no NaN: undefined numbers are ``null``. A part whose model is missing is
``{"status": "not available: <model> not trained ..."}``. Groups (strata) are named
``all_real_test`` (every real test photo, synthetic scenes excluded), ``modality=<m>``,
``source=<s>``, ``split=<split>`` and ``split=pad_ufes20_test/biopsied``. Splits:
``isic2018_test``, ``derm7pt_test_clinical``, ``derm7pt_test_dermoscopy``, ``pad_ufes20_test``,
``sd198_test`` (the source's val), ``scenes_test`` (SYNTHETIC), ``moles_test`` (real wide-field,
detection only), ``ham10000_val_boxes`` (HAM has no test split; detection only).

A "ranking row" is ``{group, score, n, n_pos, n_neg, n_missing_score, auc, auc_ci_low,
auc_ci_high, ap, ap_ci_low, ap_ci_high, prevalence, small, flag}`` (95% class-stratified bootstrap
CIs; ``small``: < 30 rows or < 10 of a class; ``flag``: why a value is null). A "paired row" is
``{group, a, b, metric, delta (= a - b), ci_low, ci_high, p_value, value_a, value_b, n, n_pos,
n_boot, small, flag}``. "Curves" are ``{group: {score: {roc: {fpr[], tpr[], auc}, pr: {recall[],
precision[], ap}}}}`` (<= 101 points each).

summary.json        headline numbers, each ``{value, ci_low, ci_high, n, split}`` (+ ``status`` when
                    not available, ``note`` / ``n_pos`` / ``threshold`` where useful): ``lesion_auc``,
                    ``lesion_ap`` (ISIC 2018 test, detected boxes), ``lesion_auc_gt_boxes``,
                    ``lesion_auc_clinical`` (derm7pt clinical test), ``lesion_auc_smartphone`` (PAD test),
                    ``lesion_auc_smartphone_biopsied``, ``detection_map50``, ``detection_map50_95``,
                    ``detection_recall_iou0`` (held-out dermoscopy boxes = HAM10000 val),
                    ``widefield_recall`` (real mole photos), ``widefield_recall_synthetic`` (scenes),
                    ``widefield_recall_in_spec`` (real mole photos, boxes >= 1.5% of the image side),
                    ``ece`` (all real test GT crops, after temperature), ``specificity_at_95_sensitivity``
                    (ISIC test, two-stage), ``image_auc.<strategy>.<aggregation>`` for
                    ``direct.whole``, ``direct.frame`` (the lesion classifier on the whole photo),
                    ``two_stage.{mean,max,noisy_or}``, ``hybrid.{...}`` (the product's score),
                    ``one_step_c2.{mean,max,noisy_or}``.
evaluation.json     index: ``splits`` {split: {description, n_images, n_labelled, n_malignant, n_errors,
                    n_gt_boxes, synthetic}}, ``models`` (status per model), ``sampling`` (as in the
                    provenance), ``notes`` [str], ``files``,
                    ``timings`` {seconds {select, inference, tables, metrics, embedding, total}, n_images,
                    n_computed (not from the cache), workers, cpu_count, per_stage_mean_seconds and
                    per_stage_mean_cpu_seconds {decode, detect, classify_detected, classify_gt, whole_image,
                    ita[, detect_c2]}, inference_engine {model: {engine, max_rel_diff, reason[, shared_prefix]}},
                    projection (``--limit`` runs only: per_split_mean_wall_seconds, per_split_mean_cpu_seconds,
                    per_split_stage_mean_cpu_seconds, full_counts, full_stage_counts {split: {stage: images}},
                    projected_inference_{wall,cpu}_seconds {split: s}, projected_inference_{wall,cpu}_total_seconds,
                    projected_full_run_wall_seconds {startup, inference, reports, reports_this_run, total,
                    minutes, cores_used})}.
lesion_level.json   item 1: ``metrics`` [ranking rows; score in gt_box | detected | detected_max_lesion],
                    ``paired_gt_vs_detected`` [paired rows], ``no_lesion_detected`` {split: {n_images,
                    n_no_lesion, share, n_malignant_with_no_lesion}}, ``curves``, ``definition``.
detection.json      item 2: ``one_class`` / ``c2`` = {split: {n_images, n_gt, map50, map75, map50_95
                    (each {value, n[, ci_low, ci_high, ci_method]}), recall_iou0, recall_iou50 ({value,
                    ci_low, ci_high, n, n_found}), iou {median, q1, q3, iqr, n_found, median_all, q1_all,
                    q3_all, n_gt}, score_threshold, max_kept_per_image, detections_per_image_kept {mean,
                    median, images_with_none}, map_all_detections_n, description, synthetic[, class_aware]
                    [, unmerged {map50, map50_95, merge, note}: the detector's boxes before lobe merging]}}
                    or a status object.
image_level.json    item 3: ``strategies`` {label: "ok" | status}, ``metrics`` [ranking rows; score =
                    strategy.aggregation], ``paired_tests`` [paired rows vs two_stage.mean, and
                    two_stage.max vs direct.whole], ``curves``.
calibration.json    item 4: ``temperature``, ``n_bins``, ``groups`` {group: {n, n_pos, ece_before,
                    ece_after ({value, ci_low, ci_high, n}), before, after ({ece, mce, n, bin_edges[],
                    mean_predicted[], observed_frequency[], counts[]})}}, ``direct_whole_image`` (same
                    shape, per split, for the whole-image classifier).
operating_points.json item 5: ``rows`` [{group, score, point (shipped_refer | shipped_urgent |
                    sensitivity_90 | sensitivity_95), threshold_chosen_on, threshold, sensitivity,
                    specificity, ppv, npv (+ _ci_low / _ci_high), tp, fp, tn, fn, n, ppv_at_1pct,
                    npv_at_1pct, ppv_at_2pct, npv_at_2pct, ppv_at_5pct, npv_at_5pct, small}],
                    ``primary_care_prevalence``, ``prevalence_grid``, ``prevalence_justification``,
                    ``shipped_thresholds`` {score: {refer, urgent}}, ``thresholds_chosen_on``.
skin_tone.json      item 6: ``distribution`` [{split, n_images, n_reliable, median_ita, n_very_light ...
                    n_dark, n_unreliable}], ``metrics_by_ita`` [ranking rows + ita_category, n_rows],
                    ``fitzpatrick_agreement`` {pad_ufes20_test | pad_ufes20_all: {all_estimates |
                    reliable_estimates_only: {n, n_missing, spearman_rho, spearman_p, exact_agreement,
                    within_one_agreement, weighted_kappa, crosstab, mapping}}}, ``fitzpatrick_note``.
embedding.json      item 7: method, n, n_pcs, perplexity, seed, ``file`` (embedding.parquet), ``map``
                    {x[], y[], malignant[], subtype[], top_subtype[], split[], modality[], image_id[]}.
error_analysis.json item 8: ``score``, ``groups`` {group: {false_negatives [...], false_positives [...]}}
                    with rows {split, image_id, path, lesion_index, source, modality, diagnosis, p_gt,
                    p_detected, top_subtype, detected, score}.

Parquet tables:

predictions_images.parquet   one row per evaluated image: split, path (data-root relative), image_id,
    source, modality, synthetic, diagnosis, malignant (Int8, NA = unlabelled), biopsied, fitzpatrick,
    pair_id, status ("ok" | "error: ..."), width, height (original px), n_gt, seconds (wall), cpu_seconds,
    from_cache,
    ita, ita_category, ita_ok, ita_reason, det_max_score, n_detected (kept), no_lesion_detected,
    score_two_stage_mean / _max / _noisy_or, p_detected_max, score_direct_whole, logit_direct_whole,
    score_direct_frame, hybrid_blended (a view entered the score: close-up, soft-gate ramp, or no lesion kept), hybrid_main_lesion (inside the ramp the main lesion's p was the lesion term), score_hybrid_mean / _max / _noisy_or, score_one_step_c2_* (when trained), p_gt, logit_gt (single-lesion photos).
predictions_lesions.parquet  one row per ground-truth lesion: split, path, image_id, source, modality,
    synthetic, lesion_index, diagnosis, malignant, biopsied, fitzpatrick, gt_is_whole_image,
    x1, y1, x2, y2 (original px; null for whole-image crops), logit_gt (raw), p_gt (temperature-scaled),
    sub_MEL ... sub_OB, top_subtype, ita_category, ita_ok, ita, p_detected, p_detected_max,
    detected, best_iou.
predictions_detections.parquet one row per kept detection: split, path, image_id, source, modality,
    synthetic, det_index, x1, y1, x2, y2 (original px), detector_score, p_malignant, top_subtype,
    best_iou_gt, matched_gt.
embedding.parquet            one row per labelled lesion with features: split, image_id, path,
    lesion_index, source, modality, synthetic, diagnosis, malignant, top_subtype, p_gt, ita_category,
    x, y, subtype.
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
