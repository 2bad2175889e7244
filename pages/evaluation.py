"""Evaluation page: the committed reports in models/reports/ (ROC / PR by stratum with CIs,
detection, strategy x aggregation, calibration, operating points, confusion matrices, embedding map,
skin tone). Every table and figure says which command, data manifest and model made it."""
from __future__ import annotations

import streamlit as st

from lesiontriage import app_support as sup
from pages import ui_common as ui

ui.ensure_navigation()
ui.intended_use_banner()
st.title("Evaluation")
st.caption(f"Reads the evaluation reports in `{sup.reports_dir()}`; nothing is recomputed here.")

OTHER_PAGES = ("clinical", "management", "ensemble", "ablation", "clahe", "threshold", "bench", "load_test",
               "reliability", "data_report")
reports = sup.list_reports()
summary = next((r for r in reports if r.name == "summary"), None)
evaluation = [r for r in reports if r.name != "summary" and not any(k in r.name for k in OTHER_PAGES)]

if summary is None and not evaluation:
    ui.no_report("No evaluation report exists yet: `models/reports/` holds no summary.json or evaluation JSON.",
                 "lesiontriage evaluate")
    st.stop()

if summary is not None:
    st.header("Headline numbers")
    headline = sup.metric_rows(summary.data)
    if summary.error:
        st.error(summary.error)
    elif headline.empty:
        st.info("summary.json holds no metric objects (value / ci_low / ci_high / n / split) yet.")
    else:
        st.dataframe(headline, hide_index=True, width="stretch",
                     column_config={"value": st.column_config.NumberColumn(format="%.3f")})
        ui.provenance_caption(summary, "Table")
else:
    st.info("No `summary.json` yet: the headline table appears once `lesiontriage evaluate` has written it.")

if not evaluation:
    st.info("No detailed evaluation report yet (ROC / PR curves, detection, calibration ...).")
    st.stop()

tabs = st.tabs([r.name.replace("_", " ") for r in evaluation])
for tab, report in zip(tabs, evaluation):
    with tab:
        ui.provenance_caption(report)
        ui.render_report(report, key="eval-")
