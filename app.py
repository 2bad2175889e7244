"""lesiontriage browser app: ``streamlit run app.py``.

The entry script only sets up the page and hands over to ``st.navigation``; each page in ``pages/``
only renders and opens with the intended-use statement (above the fold). All computation
goes through ``lesiontriage.TriagePipeline`` (see pages/ui_common.py for the caching).
"""
from __future__ import annotations

import streamlit as st

from lesiontriage import __version__
from lesiontriage.results import INTENDED_USE
from pages import ui_common

# page_icon: an emoji (rendered locally); a ":material/...:" icon would make the browser fetch the favicon
# from fonts.gstatic.com, an outbound request the privacy test forbids.
st.set_page_config(page_title="lesiontriage", page_icon="🩺", layout="wide",
                   menu_items={"About": f"lesiontriage {__version__}. {INTENDED_USE}"})

PAGES = {
    "Triage": [
        st.Page("pages/triage.py", title="Triage a photo", icon=":material/center_focus_strong:", default=True),
    ],
    "Evidence": [
        st.Page("pages/evaluation.py", title="Evaluation", icon=":material/monitoring:"),
        st.Page("pages/clinical.py", title="Clinical & management", icon=":material/stethoscope:"),
        st.Page("pages/speed.py", title="Speed & reliability", icon=":material/speed:"),
        st.Page("pages/model_card.py", title="Model card", icon=":material/description:"),
    ],
}

page = st.navigation(PAGES)
ui_common.run_page(page)  # each page opens with the intended-use statement (ui_common.intended_use_banner)
