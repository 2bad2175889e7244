"""Speed & reliability page: `lesiontriage bench` (models/reports/bench.json) and the app load
test (models/reports/load_test.json), read as committed."""
from __future__ import annotations

import streamlit as st

from lesiontriage import app_support as sup
from pages import ui_common as ui

ui.ensure_navigation()
ui.intended_use_banner()
st.title("Speed & reliability")

for name, title, command in (
    ("bench", "Per-stage latency and throughput (`lesiontriage bench`)", "lesiontriage bench"),
    ("load_test", "Concurrent browser sessions against the app", "python scripts/load_test.py --out models/reports/load_test.json"),
):
    st.header(title)
    report = sup.load_report(name)
    if report is None:
        ui.no_report(f"`models/reports/{name}.json` does not exist yet.", command)
        continue
    ui.provenance_caption(report)
    ui.render_report(report, key="speed-")
