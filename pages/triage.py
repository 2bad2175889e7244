"""Triage page: upload or pick a photo -> boxed lesions, triage score and tier, lesion table,
Grad-CAM on request, downloads. Layout only; the pipeline does the work (cached in ui_common)."""
from __future__ import annotations

import hashlib
import logging
import time

import pandas as pd
import streamlit as st

from lesiontriage import app_support as sup
from lesiontriage.errors import ImageError, ModelError
from lesiontriage.research.covariates import any_answer
from pages import ui_common as ui

log = logging.getLogger("lesiontriage.app")

TABLE_HEADER_PX = 35  # the lesion table's header row (Streamlit's data grid)
TABLE_MAX_ROWS = 8  # rows shown before the table scrolls

ui.ensure_navigation()
ui.intended_use_banner()
st.title("Skin-lesion triage")

pipe, failure = ui.pipeline_or_failure()
if pipe is None:
    ui.show_load_failure(failure)
    st.stop()

# ---- input -----------------------------------------------------------------------------------------
examples = ui.examples()
by_key = {e.key: e for e in examples}
col_upload, col_example = st.columns([3, 2])
with col_upload:
    uploaded = st.file_uploader(
        "Upload a skin photo", type=list(sup.UPLOAD_TYPES), key="upload",
        help="JPEG, PNG, WebP, HEIC/HEIF (iPhone) or TIFF. Processed in memory, never stored; "
             "exports carry no EXIF (no GPS, no device).")
with col_example:
    example_key = st.selectbox(
        "... or pick an example", options=list(by_key), index=None, key="example",
        format_func=lambda k: by_key[k].label, placeholder="Choose an example photo",
        help="Synthetic scenes are generated here and are not real patients. Real examples come from the "
             "shared data sets when they are present (see the model card for their licences).")

data: bytes | None = None
name = ""
if uploaded is not None:
    data, name = uploaded.getvalue(), uploaded.name
    if example_key:
        st.caption("Using the uploaded file; remove it to analyse the chosen example.")
elif example_key:
    example = by_key[example_key]
    try:
        data, name = ui.example_bytes(example_key)
    except Exception as exc:
        st.error(f"{example.label}: the example could not be loaded ({exc}).")
        st.stop()
    if example.synthetic:
        st.info(f"**SYNTHETIC image.** {example.note}", icon=":material/science:")
    else:
        st.caption(example.note)

if data is None:
    st.info("Upload a photo or choose an example to start. A photo of one lesion or of a whole skin area "
            "both work: every lesion found is boxed and scored.", icon=":material/upload:")
    st.stop()

meta_models = (pipe.metadata or {}).get("models", {})
with st.expander("Advanced options"):
    whole_image = st.toggle(
        "Whole-image mode (baseline: one score for the whole photo, no lesion boxes)", value=False,
        disabled="image_classifier" not in meta_models, key="whole_image",
        help="The direct whole-image classifier of the seed paper. Needs models/image_classifier.safetensors.")

image_sha = hashlib.sha256(data).hexdigest()  # the cache key of this photo (see ui_common)
image_hash = image_sha[:16]  # widget keys
key_model = sup.model_key(pipe)
combined_model, management_model, context_problem = ui.context_models(key_model)
if context_problem:
    st.caption(context_problem)

# ---- optional clinical context (switches to the combined image + clinical model) ---------------------
answers: dict = {}
with st.expander("Clinical information (optional: switches to the combined image + clinical model)"):
    if combined_model is None:
        st.caption("The combined model is not installed (models/clinical_combined.safetensors); "
                   "run `lesiontriage research clinical` to fit it.")
    else:
        st.caption("Leave anything you do not know as *not given*. Answers are used in memory only.")
        c1, c2, c3 = st.columns(3)
        answers["age"] = c1.number_input("Age (years)", min_value=0, max_value=120, value=None, step=1, key="cov_age")
        answers["sex"] = c2.selectbox("Sex", ["female", "male"], index=None, placeholder="not given", key="cov_sex")
        answers["region"] = c3.selectbox("Body site", list(ui.BODY_REGION_LABELS), index=None, placeholder="not given",
                                         format_func=ui.BODY_REGION_LABELS.get, key="cov_region")
        q_cols = st.columns(3)
        for i, (q, label) in enumerate(ui.PAD_QUESTION_LABELS.items()):
            answers[q] = q_cols[i % 3].segmented_control(label, ["yes", "no"], key=f"cov_{q}")
        elevation = q_cols[2].segmented_control("Elevation", ["flat", "palpable", "nodular"], key="cov_elevation")
        answers["elevation3"] = elevation
        answers["elevated"] = None if elevation is None else ("no" if elevation == "flat" else "yes")

with st.expander("Management suggestion (research output, dermoscopy images)"):
    if management_model is None:
        st.caption("The management model is not installed (models/management.safetensors); "
                   "run `lesiontriage research management` to fit it.")
        want_management, clinical_upload = False, None
    else:
        want_management = st.toggle("This photo is a dermoscopy image: suggest management", key="want_management")
        clinical_upload = st.file_uploader("Optional: the clinical (non-dermoscopic) photo of the same lesion",
                                           type=list(sup.UPLOAD_TYPES), key="clinical_upload") if want_management else None

# ---- run (cached on bytes + settings + model) -----------------------------------------------------
def analyse() -> tuple[object | None, str | None]:
    """(result, None) or (None, the reason in one line): the app keeps working whatever the file."""
    try:
        return ui.predict_cached(image_sha, name, whole_image, key_model, data), None
    except (ImageError, ModelError) as exc:
        return None, str(exc)
    except Exception as exc:
        log.exception("prediction failed for %s", name)
        return None, f"{name}: could not be analysed ({type(exc).__name__}: {exc})."


def analysed_label(elapsed: float, stages: str) -> str:
    return f"Analysed in {elapsed:.2f} s" + (" (cached result)" if elapsed < 0.05 else "") + f" - {stages}"


run_key = (image_sha, name, whole_image, key_model)
t0 = time.perf_counter()
if ui.analysed_before(run_key):
    # Cached result: no progress box (st.status pauses every run to animate it); the same collapsed
    # line with the stage timings, at once.
    base, problem = analyse()
    if problem is None:
        elapsed = time.perf_counter() - t0
        stages = " · ".join(f"{k} {v:.0f} ms" for k, v in base.timings_ms.items() if k != "total")
        with st.expander(analysed_label(elapsed, stages), icon=":material/check:"):
            st.write(f"Model stages: {stages}")
else:
    with st.status("Analysing the photo: decoding, checking quality, detecting lesions, classifying each lesion...",
                   expanded=False) as status:
        base, problem = analyse()
        if problem is None:
            elapsed = time.perf_counter() - t0
            stages = " · ".join(f"{k} {v:.0f} ms" for k, v in base.timings_ms.items() if k != "total")
            st.write(f"Model stages: {stages}")
            status.update(label=analysed_label(elapsed, stages), state="complete")
        else:
            status.update(label="This file could not be analysed", state="error")
    if problem is None:
        ui.remember_analysed(run_key)
if problem is not None:  # outside the collapsed status box, so it cannot be missed
    st.error(problem, icon=":material/broken_image:")
    st.caption("Try another photo: JPEG, PNG, WebP, HEIC or TIFF of skin, at least a few hundred pixels wide.")
    st.stop()

# ---- aggregation (no model re-run) ----------------------------------------------------------------
two_stage = base.mode == "two_stage"
default_agg = getattr(getattr(pipe, "settings", None), "default_aggregate", "mean")
covariates_used = combined_model is not None and two_stage and any_answer(answers)
synthetic = uploaded is None and bool(example_key) and by_key[example_key].synthetic


def scored(agg: str):
    """The cached model run under aggregation ``agg`` (+ the clinical answers): no network runs."""
    out = pipe.reaggregate(base, agg) if two_stage and agg != base.aggregate else base
    return combined_model.apply(out, answers, pipe) if covariates_used else out


def current_aggregation() -> str:
    return st.session_state.get("aggregation") or default_agg


result = scored(current_aggregation())
n = result.n_lesions


# ---- headline ---------------------------------------------------------------------------------------
@st.fragment
def headline() -> None:
    """Score, tier, aggregation selector and downloads. A fragment: switching the aggregation re-runs
    only this part (everything else on the page does not depend on the aggregation)."""
    res = scored(current_aggregation())
    m1, m2 = st.columns(2)
    m1.metric("Triage score", f"{res.image_score:.2f}",
              help="Image-level malignancy score in [0, 1] from the chosen aggregation of lesion probabilities "
                   "(on a close-up, or with no lesion found, blended with two views of the whole photo).")
    m2.metric("Lesions found", n if two_stage else "-")
    if covariates_used:
        st.info("**Combined image + clinical model used**: lesion probabilities, score and tier include your "
                "answers under *Clinical information*.", icon=":material/person:")
    colour = sup.TIER_COLOURS.get(res.tier.name, "gray")
    st.markdown(f"#### Tier: :{colour}-background[:{colour}[{res.tier.name.upper()}]]")
    st.markdown(res.tier.reason)
    if two_stage:
        st.segmented_control(
            "Aggregation", options=list(sup.AGGREGATIONS), format_func=sup.AGGREGATIONS.get,
            default=default_agg, key="aggregation", required=True, help=sup.AGGREGATION_HELP)
        st.caption(sup.aggregation_sentence(res.aggregate, n, res.image_score, res.lesion_score, res.whole_image_score,
                                            res.whole_image_weight, res.full_frame_score, res.full_frame_weight,
                                            res.main_lesion) + threshold_sentence(res))
    else:
        st.caption("Whole-image mode: one score for the whole photo; aggregation does not apply."
                   + threshold_sentence(res))
        st.warning("The whole-image classifier was trained on close-ups (one lesion filling much of the photo). "
                   "On a wide-field photo with several lesions its score is not meaningful: use the two-stage mode, "
                   "which scores every lesion.", icon=":material/info:")
    if res.quality and res.quality.warnings:
        for w in res.quality.warnings:
            st.warning(f"Image quality: {w}", icon=":material/warning:")
    elif res.quality:
        st.caption("Image quality checks passed (sharpness, exposure, resolution).")
    stem = sup.export_stem(name)
    st.caption("Download this result (nothing is stored on the server; the PNG carries no EXIF):")
    d1, d2, d3 = st.columns(3)
    d1.download_button("JSON", sup.result_json(res), file_name=f"{stem}_triage.json", mime="application/json",
                       icon=":material/download:", on_click="ignore", help="Full result, current aggregation")
    d2.download_button("CSV", sup.result_csv(res), file_name=f"{stem}_triage.csv", mime="text/csv",
                       icon=":material/download:", on_click="ignore", help="Table: one row per lesion")
    # The PNG (a large image) is encoded only when clicked (a deferred callable: no Streamlit call in it).
    d3.download_button("PNG", lambda: sup.png_bytes(ui.export_image(data, res, synthetic)),
                       file_name=f"{stem}_annotated.png", mime="image/png", icon=":material/download:",
                       on_click="ignore", help="Annotated image with the colour legend, no EXIF")
    if two_stage and n == 0:
        st.warning(
            "**No lesion found.** " + res.tier.reason + "\n\n"
            "- If you can see a lesion, take the photo closer (the lesion filling at least a tenth of the frame), "
            "in focus and in even light.\n- Or try *Whole-image mode* under Advanced options.\n"
            "- A clinician should still examine any lesion that worries you.", icon=":material/search_off:")


def threshold_sentence(res) -> str:
    """' Tier thresholds ...' for the result's mode and aggregation ('' when the pipeline has none)."""
    if not hasattr(pipe, "thresholds"):
        return ""
    try:
        thr, src = pipe.thresholds(res.mode, res.aggregate if res.mode == "two_stage" else "whole")
        return f" Tier thresholds: refer {thr['refer']:.2f} / urgent {thr['urgent']:.2f}, chosen on {src}."
    except Exception:
        return ""


col_image, col_side = st.columns([3, 2], gap="medium")
with col_side:
    headline()

# ---- lesion selection -------------------------------------------------------------------------------
order = sup.lesions_by_probability(result)
pick_key = f"pick_{image_hash}_{int(whole_image)}"
if n and pick_key not in st.session_state:
    st.session_state[pick_key] = result.tier.driving_lesion if result.tier.driving_lesion is not None else order[0]
selected = st.session_state.get(pick_key) if n else None

with col_image:
    shown, display_problem = ui.annotated_jpeg(image_sha, result.width, result.height, synthetic, selected,
                                               sup.drawing_key(result), data, result)
    if display_problem:
        st.warning(display_problem)
    cap = f"{name} ({result.width} x {result.height} px)"
    if n:
        cap += f". {n} lesion{'s' if n != 1 else ''} found, box colour = p(malignant); lesion #{selected + 1} highlighted."
    st.image(shown, caption=cap, width="stretch", output_format="JPEG")

# ---- lesion table -------------------------------------------------------------------------------------
if n:
    st.subheader(f"{n} lesion{'s' if n != 1 else ''} found")
    st.caption("Sorted by probability of malignancy. Click a row to highlight that lesion and show its details.")
    thumbs = ui.thumbnails(image_sha, name, whole_image, key_model, data, base)
    table = sup.lesion_table(result, thumbs)

    table_key = f"lesion_table_{image_hash}_{int(whole_image)}"

    def _on_table_select() -> None:
        rows = st.session_state.get(table_key, {}).get("selection", {}).get("rows", [])
        if rows:
            st.session_state[pick_key] = order[rows[0]]

    st.dataframe(
        table, hide_index=True, width="stretch", row_height=64, key=table_key,
        height=TABLE_HEADER_PX + 64 * min(n, TABLE_MAX_ROWS) + 2,  # every row visible up to TABLE_MAX_ROWS
        on_select=_on_table_select, selection_mode="single-row",
        column_config={
            "lesion": st.column_config.TextColumn("Lesion", width="small"),
            "crop": st.column_config.ImageColumn("Crop", width="small"),
            "p_malignant": st.column_config.ProgressColumn("p(malignant)", min_value=0.0, max_value=1.0, format="%.2f"),
            "most_like": st.column_config.TextColumn("Most like", width="medium",
                                                     help="Most likely sub-type; full names under Lesion details"),
            "subtypes": st.column_config.TextColumn("Sub-type probabilities (top 3)"),
            "detector_confidence": st.column_config.NumberColumn("Detector confidence", format="%.2f",
                                                                 help="How lesion-like the detector finds the box"),
            "box_confidence": st.column_config.NumberColumn(
                "Box confidence", format="%.2f",
                help="How likely the box fits one real lesion, judged from its place among the photo's detections "
                     "(a learned re-ranking; it does not change which lesions are scored)"),
            "size_px": st.column_config.TextColumn("Box (px)", width="small"),
        })
    if n > TABLE_MAX_ROWS:
        st.caption(f"Showing {TABLE_MAX_ROWS} rows at a time: scroll the table for all {n} lesions.")

    st.selectbox("Lesion details", options=order, key=pick_key,
                 format_func=lambda i: f"#{i + 1}: p(malignant) {result.lesions[i].p_malignant:.2f}, "
                                       f"most like {result.lesions[i].top_subtype}")
    lesion = result.lesions[selected]
    crops = ui.crop_jpegs(image_sha, name, whole_image, key_model, data, base)
    c_crop, c_cam, c_sub = st.columns([1, 1, 2])
    with c_crop:
        if selected < len(crops):
            st.image(crops[selected], caption=f"Lesion #{selected + 1} with context", width=224, output_format="JPEG")
        st.caption(f"Detector confidence {lesion.detector_score:.2f} · box "
                   + ", ".join(f"{v:.0f}" for v in lesion.box))
    with c_cam:
        cam_flag = f"cam_{image_hash}_{selected}"
        if st.session_state.get(cam_flag):
            with st.spinner("Computing Grad-CAM..."):
                try:
                    heat = ui.gradcam_cached(image_sha, name, selected, key_model, data, base)
                    st.image(heat, caption=f"Grad-CAM, lesion #{selected + 1}: where the malignancy score looks",
                             width=224)
                except Exception as exc:
                    st.error(f"Grad-CAM failed for lesion #{selected + 1}: {type(exc).__name__}: {exc}")
        elif st.button("Show Grad-CAM", key=f"btn_{cam_flag}", icon=":material/visibility:",
                       help="Highlights the pixels that raised this lesion's malignancy score."):
            st.session_state[cam_flag] = True
            st.rerun()
    with c_sub:
        if lesion.subtypes:
            st.caption("Sub-type probabilities")
            st.markdown(sup.subtype_bars_html(lesion.subtypes), unsafe_allow_html=True)

# ---- management suggestion (research output) -----------------------------------------------------------
if management_model is not None and want_management:
    st.subheader("Suggested management (research output)")
    try:
        clin_bytes = clinical_upload.getvalue() if clinical_upload is not None else None
        frozen = tuple(sorted((k, v) for k, v in answers.items() if v is not None))
        suggestion = ui.management_cached(data, name, clin_bytes, frozen, key_model)
    except (ImageError, ModelError) as exc:
        st.error(str(exc), icon=":material/broken_image:")
    except Exception as exc:  # the page keeps working
        log.exception("management failed for %s", name)
        st.error(f"{name}: management suggestion failed ({type(exc).__name__}: {exc}).")
    else:
        st.markdown(f"**{suggestion.suggestion.upper()}** "
                    f"({'dermoscopy + clinical photo' if suggestion.variant == 'pair' else 'dermoscopy image only'})")
        st.dataframe([{"management": k, "probability": round(v, 3)} for k, v in suggestion.probabilities.items()],
                     hide_index=True)
        st.caption(suggestion.note + " Accuracy on the derm7pt test set is on the *Clinical & management* page.")

# ---- timings ------------------------------------------------------------------------------------------
with st.expander("Per-stage timings and model"):
    timing_rows = [{"stage": k, "ms": f"{v:.1f}"} for k, v in base.timings_ms.items()]
    timing_rows.append({"stage": "app total (this run, incl. cache lookup)", "ms": f"{elapsed * 1000:.1f}"})
    st.table(pd.DataFrame(timing_rows).set_index("stage"))  # a plain table: no data grid to start up
    st.caption(f"Model version {result.model_version or 'unknown'} · mode {result.mode}. The aggregation and its "
               "tier thresholds are shown under the aggregation selector.")
