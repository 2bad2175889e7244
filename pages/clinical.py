"""Clinical & management page: clinical covariates vs image-only vs combined, management
recommendation (derm7pt), ensemble and ablations (CLAHE, threshold tuning, class weighting), read
from models/reports/. Says plainly which report is missing."""
from __future__ import annotations

import streamlit as st

from lesiontriage import app_support as sup
from pages import ui_common as ui

ui.ensure_navigation()
ui.intended_use_banner()
st.title("Clinical covariates & management")
st.caption("Research outputs measured on held-out data; a management suggestion is never a clinical decision.")

SECTIONS = [
    ("Clinical covariates: image-only vs clinical-only vs combined", ("clinical",),
     ("image_only_auc", "clinical_only_auc", "combined_auc")),
    ("Management recommendation (derm7pt)", ("management",),
     ("management_accuracy", "management_auroc", "management_accuracy_inferred")),
    ("Ensemble", ("ensemble",), ("ensemble_auc",)),
    ("Ablations: CLAHE, threshold tuning, class weighting", ("ablation", "clahe", "threshold"), ("clahe_auc",)),
]

reports = sup.list_reports()
summary = next((r for r in reports if r.name == "summary"), None)
for title, prefixes, summary_keys in SECTIONS:
    st.header(title)
    found = [r for r in reports if r.name != "summary" and any(r.name.startswith(p) for p in prefixes)]
    keys = [k for k in summary_keys if summary is not None and k in summary.data]
    if keys:
        rows = sup.metric_rows({k: summary.data[k] for k in keys})
        if rows.empty:  # plain numbers rather than metric objects
            rows = sup.scalar_items({k: summary.data[k] for k in keys})
        st.dataframe(rows, hide_index=True, width="stretch")
        ui.provenance_caption(summary, "Headline numbers")
    if not found:
        ui.no_report(f"No report for this section yet (expected `models/reports/{prefixes[0]}*.json`).",
                     "lesiontriage evaluate")
        continue
    for report in found:
        st.subheader(report.name.replace("_", " "))
        ui.provenance_caption(report)
        ui.render_report(report, key="clin-")
