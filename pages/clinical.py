"""Clinical & management page: clinical covariates vs image-only vs combined, management
recommendation (derm7pt), ensemble and ablations (threshold tuning, CLAHE, class weighting), read
from models/reports/ (written by `lesiontriage research`). Says plainly which report is missing."""
from __future__ import annotations

import streamlit as st

from lesiontriage import app_support as sup
from lesiontriage.research import tables as T
from pages import ui_common as ui

ui.ensure_navigation()
ui.intended_use_banner()
st.title("Clinical covariates, management, ensemble & ablations")
st.caption("Seed-paper extras, measured on held-out data here, including where they do not help. "
           "A management suggestion is a research output, never a clinical decision.")

reports = {r.name: r for r in sup.list_reports()}
summary = reports.get("summary")


def headline(keys: tuple[str, ...]) -> None:
    if summary is None:
        return
    present = {k: summary.data[k] for k in keys if k in summary.data}
    if present:
        st.dataframe(sup.metric_rows(present), hide_index=True, width="stretch")
        ui.provenance_caption(summary, "Headline numbers (summary.json)")


def section(name: str, title: str, command: str) -> sup.Report | None:
    st.header(title)
    report = reports.get(name)
    if report is None:
        ui.no_report(f"No `models/reports/{name}.json` yet.", command)
        return None
    if report.error:
        st.error(report.error)
        return None
    ui.provenance_caption(report)
    if report.data.get("design"):
        with st.expander("How this was measured"):
            st.markdown(report.data["design"])
    return report


# 1. Clinical covariates ------------------------------------------------------------------------------
rep = section("clinical", "1. Image-only vs clinical-only vs combined", "lesiontriage research clinical")
if rep is not None:
    headline(("image_only_auc", "clinical_only_auc", "combined_auc"))
    st.dataframe(T.clinical_table(rep.data), hide_index=True, width="stretch")
    st.caption("AUC with 95% bootstrap CI; the last column is the paired bootstrap difference combined - image-only "
               "on the same images. The *shipped* row is the model the triage page uses when you answer its questions.")
    sets = rep.data.get("sets", {})
    with st.expander("Strongest clinical covariates per set (logistic coefficients on standardised inputs)"):
        for name, b in sets.items():
            coefs = (b.get("clinical_model") or {}).get("top_coefficients") or []
            if coefs:
                st.markdown(f"**{name}**: " + ", ".join(f"{c['feature']} {c['coef']:+.2f}" for c in coefs))

# 2. Management ------------------------------------------------------------------------------------------
rep = section("management", "2. Management recommendation (derm7pt)", "lesiontriage research management")
if rep is not None:
    headline(("management_accuracy", "management_auroc", "management_accuracy_inferred"))
    st.dataframe(T.management_table(rep.data), hide_index=True, width="stretch")
    ref = (rep.data.get("dermoscopy_and_clinical") or {}).get("seed_001_reference") or {}
    if ref:
        st.caption(f"Seed 001 reported {ref.get('multitask_accuracy')} accuracy (multi-task) and "
                   f"{ref.get('direct_auroc')} AUROC (direct) with end-to-end CNNs; quoted for comparison only.")
    pair = rep.data.get("dermoscopy_and_clinical") or {}
    cols = st.columns(3)
    for col, (key, label) in zip(cols, T.STRATEGIES.items()):
        if isinstance(pair.get(key), dict) and "confusion_matrix" in pair[key]:
            col.plotly_chart(T.confusion_figure(pair[key], label), width="stretch", key=f"cm_{key}")

# 3. Ensemble ---------------------------------------------------------------------------------------------
rep = section("ensemble", "3. Ensemble (average of differently-initialised backbones)", "lesiontriage research ensemble")
if rep is not None:
    headline(("ensemble_auc",))
    st.dataframe(T.ensemble_table(rep.data), hide_index=True, width="stretch")
    st.markdown("**Latency per lesion crop on this CPU** (each member adds its own):")
    st.dataframe(T.latency_table(rep.data), hide_index=True)
    helps = rep.data.get("helps_on_validation")
    st.caption(f"Helps on validation: {'yes' if helps else 'no'}; shipped as an option only if it does.")

# 4. Ablations --------------------------------------------------------------------------------------------
st.header("4. Ablations")
for name, title, builder in (("ablation_threshold", "Threshold tuning on validation (seed 003)", T.threshold_table),
                             ("ablation_clahe", "CLAHE preprocessing (seed 004)", T.clahe_table),
                             ("ablation_imbalance", "Class weighting vs balanced sampling (seeds 002, 004)",
                              T.imbalance_table)):
    st.subheader(title)
    rep = reports.get(name)
    if rep is None:
        ui.no_report(f"No `models/reports/{name}.json` yet.", "lesiontriage research ablations")
        continue
    ui.provenance_caption(rep)
    if name == "ablation_clahe":
        headline(("clahe_auc",))
    st.dataframe(builder(rep.data), hide_index=True, width="stretch")
    if "kept_in_default_path" in rep.data:
        st.caption(f"Kept in the default path (decided on validation): {'yes' if rep.data['kept_in_default_path'] else 'no'}.")
