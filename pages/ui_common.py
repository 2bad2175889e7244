"""Streamlit-side helpers shared by the pages: caching, the no-model state, report rendering.

Not a page (st.navigation in app.py lists the pages explicitly). Caches:
- the pipeline once per process (``st.cache_resource``);
- results, display images, crops and Grad-CAM by image bytes + settings + model key
  (``st.cache_data``), so a re-run on the same photo and an aggregation switch run no network.
Uploads stay in memory: nothing here writes an image to disk.
"""
from __future__ import annotations

import logging
import runpy
import threading
from typing import Any

from pathlib import Path

import numpy as np
import streamlit as st

from lesiontriage import app_support as sup
from lesiontriage.results import INTENDED_USE

log = logging.getLogger("lesiontriage.app")


BODY_REGION_LABELS = {"head_neck": "Head / neck", "trunk": "Trunk (back, chest, abdomen, buttocks)",
                      "upper_limb": "Arm / forearm", "lower_limb": "Leg / thigh", "acral": "Hand / foot",
                      "genital": "Genital area"}
PAD_QUESTION_LABELS = {"itch": "Itches?", "grew": "Has it grown?", "hurt": "Does it hurt?",
                       "changed": "Has it changed?", "bleed": "Has it bled?"}


# ---- navigation guard --------------------------------------------------------------------------------

_NAV = threading.local()
APP_SCRIPT = Path(__file__).resolve().parent.parent / "app.py"


def run_page(page: Any) -> None:
    """Run the page st.navigation chose (called by app.py), marking this script run as navigated."""
    _NAV.active = True
    try:
        page.run()
    finally:
        _NAV.active = False


def ensure_navigation() -> None:
    """Route a page through app.py when Streamlit runs it on its own.

    Streamlit quirk: until app.py has run once in a server process, a direct link such as
    /evaluation runs pages/evaluation.py by itself (the old pages/-folder mode): no page config, a
    sidebar listing every file. Running app.py here installs st.navigation, which then runs the
    requested page normally; this outer run stops.
    """
    if getattr(_NAV, "active", False):
        return
    runpy.run_path(str(APP_SCRIPT), run_name="__main__")
    st.stop()


def intended_use_banner() -> None:
    """The intended-use statement, first thing on every page (visible without scrolling)."""
    st.warning(f"**Intended use:** {INTENDED_USE}", icon=":material/info:")


# ---- pipeline ---------------------------------------------------------------------------------------

@st.cache_resource(show_spinner="Loading the models (once per server process)...")
def _cached_pipeline(models_path: str) -> Any:
    return sup.load_pipeline(Path(models_path))


def pipeline_or_failure() -> tuple[Any, sup.LoadFailure | None]:
    """(pipeline, None) or (None, why). Failures are not cached: installing models then reloading works."""
    models = sup.models_dir()
    if not sup.model_installed(models):
        return None, sup.LoadFailure("no_model", f"no model installed yet: {models / 'metadata.json'} lists no classifier")
    try:
        return _cached_pipeline(str(models)), None
    except Exception as exc:  # shown as one line, never a traceback
        log.warning("pipeline load failed: %s", exc)
        return None, sup.classify_load_error(exc, models)


def show_load_failure(failure: sup.LoadFailure) -> None:
    if failure.kind == "no_model":
        st.header("No model installed yet")
        st.info(f"The triage models are not installed ({failure.message}).")
    elif failure.kind == "bad_model":
        st.header("The installed model could not be loaded")
        st.error(failure.message)
    else:
        st.header("The pipeline could not be started")
        st.error(failure.message)
    st.markdown(sup.NO_MODEL_HELP)
    st.code(sup.NO_MODEL_COMMANDS, language="bash")
    st.markdown(sup.NO_MODEL_AFTER)
    st.caption("The Evaluation and Model card pages still work and say what is missing.")


# ---- cached computations ---------------------------------------------------------------------------

@st.cache_data(max_entries=64, show_spinner=False)
def predict_cached(data: bytes, name: str, whole_image: bool, model_key: str) -> Any:
    """The model run for one photo (aggregation 'mean'; other aggregations come from reaggregate)."""
    pipe, failure = pipeline_or_failure()
    if pipe is None:
        raise RuntimeError(failure.message if failure else "no pipeline")
    return pipe.predict(data, aggregate="mean", whole_image=whole_image, name=name)


@st.cache_data(max_entries=16, show_spinner=False)
def display_image(data: bytes, width: int, height: int, max_side: int = 1600) -> tuple[np.ndarray, str]:
    """The photo for display; if this decoder cannot show a file the pipeline accepted, a grey canvas
    of the same shape (the boxes and numbers stay right) and a warning, never a crash."""
    try:
        return sup.decode_for_display(data, max_side), ""
    except Exception as exc:
        log.warning("display decode failed: %s", exc)
        scale = min(1.0, max_side / max(width, height, 1))
        canvas = np.full((max(1, round(height * scale)), max(1, round(width * scale)), 3), 200, np.uint8)
        return canvas, f"The photo itself cannot be shown here ({type(exc).__name__}); boxes are drawn on a grey canvas."


@st.cache_data(max_entries=16, show_spinner=False)
def lesion_crops(data: bytes, name: str, whole_image: bool, model_key: str, _result: Any) -> list[np.ndarray]:
    """pipe.crop for every lesion (decoding the photo once when the pipeline allows it)."""
    pipe, _ = pipeline_or_failure()
    if pipe is None or not _result.lesions:
        return []
    source: Any = data
    if hasattr(pipe, "load"):
        try:
            source = pipe.load(data, name=name)
        except Exception:  # fall back to the documented call
            source = data
    return [sup.shrink(np.asarray(pipe.crop(source, lesion), dtype=np.uint8), 256) for lesion in _result.lesions]


@st.cache_data(max_entries=32, show_spinner=False)
def thumbnails(data: bytes, name: str, whole_image: bool, model_key: str, _result: Any) -> list[str]:
    return [sup.thumbnail_data_url(c) for c in lesion_crops(data, name, whole_image, model_key, _result)]


@st.cache_data(max_entries=64, show_spinner=False)
def gradcam_cached(data: bytes, name: str, lesion_index: int, model_key: str, _result: Any) -> np.ndarray:
    pipe, _ = pipeline_or_failure()
    return np.asarray(pipe.gradcam(data, lesion_index, result=_result), dtype=np.uint8)


@st.cache_resource(show_spinner=False)
def _context_models(models_path: str, model_key: str) -> tuple[Any, Any, str]:
    """(combined clinical model | None, management model | None, problem) from the models folder."""
    from lesiontriage.context_models import CombinedClinicalModel, ManagementModel

    try:
        return CombinedClinicalModel.from_dir(Path(models_path)), ManagementModel.from_dir(Path(models_path)), ""
    except Exception as exc:  # a bad optional model must not stop the triage page
        log.warning("context models not loaded: %s", exc)
        return None, None, f"Optional clinical/management models could not be loaded ({exc})."


def context_models(model_key: str) -> tuple[Any, Any, str]:
    return _context_models(str(sup.models_dir()), model_key)


@st.cache_data(max_entries=32, show_spinner=False)
def management_cached(derm: bytes, derm_name: str, clinical: bytes | None, answers: tuple, model_key: str) -> Any:
    """Management suggestion for a dermoscopy image (+ optional clinical photo); raises ImageError for bad files."""
    pipe, _ = pipeline_or_failure()
    _, management, _ = context_models(model_key)
    return management.suggest(pipe, derm, clinical, dict(answers))


@st.cache_data(show_spinner=False)
def examples() -> list[sup.Example]:
    return sup.list_examples()


@st.cache_data(max_entries=16, show_spinner=False)
def example_bytes(key: str) -> tuple[bytes, str]:
    ex = next(e for e in examples() if e.key == key)
    return sup.load_example(ex)


# ---- reports ---------------------------------------------------------------------------------------

def provenance_caption(report: sup.Report, what: str = "") -> None:
    st.caption((f"{what}: " if what else "") + report.provenance.text() + f" · file `models/reports/{report.path.name}`")


def no_report(message: str, command: str) -> None:
    st.info(f"{message}\n\nNo report yet: it appears here once `{command}` has been run and its output "
            "committed under `models/reports/`.")


def render_report(report: sup.Report, *, show_tables: bool = True, key: str = "") -> None:
    """Everything recognisable in one report JSON: headline metrics, curves, matrices, maps, tables.

    Every figure carries the report's provenance (command, data manifest, model sha256).
    """
    if report.error:
        st.error(report.error)
        return
    metrics = sup.metric_rows(report.data)
    if not metrics.empty:
        st.dataframe(metrics, hide_index=True, width="stretch",
                     column_config={"value": st.column_config.NumberColumn(format="%.3f")})
        provenance_caption(report, "Table")
    curves = sup.find_curves(report.data)
    titles = {"roc": "ROC curves", "pr": "Precision-recall curves", "reliability": "Reliability diagram (calibration)"}
    for kind, title in titles.items():
        group = [c for c in curves if c.kind == kind]
        for start in range(0, len(group), 10):  # at most 10 curves per figure, so each stays readable
            st.plotly_chart(sup.curve_figure(group[start:start + 10], kind, title), width="stretch",
                            key=f"{key}{report.name}-{kind}-{start}")
            provenance_caption(report, "Figure")
    for path, matrix, labels in sup.find_confusions(report.data):
        st.plotly_chart(sup.confusion_figure(matrix, labels, f"Confusion matrix: {path}"), width="stretch",
                        key=f"{key}{report.name}-cm-{path}")
        provenance_caption(report, "Figure")
    for path, df in sup.find_embeddings(report.data):
        st.plotly_chart(sup.embedding_figure(df, f"Embedding map: {path}"), width="stretch",
                        key=f"{key}{report.name}-emb-{path}")
        provenance_caption(report, "Figure")
    if show_tables:
        tables = sup.find_tables(report.data)
        for path, df in tables:
            with st.expander(f"Table: {path or report.name} ({len(df)} rows)"):
                st.dataframe(df, hide_index=True, width="stretch")
                provenance_caption(report, "Table")
    scalars = sup.scalar_items(report.data)
    if not scalars.empty:
        with st.expander(f"Report fields ({report.path.name})"):
            st.dataframe(scalars.astype(str), hide_index=True, width="stretch")


if __name__ == "__main__":  # opened directly as a page (see ensure_navigation): show the app instead
    ensure_navigation()
