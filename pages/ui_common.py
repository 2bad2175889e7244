"""Streamlit-side helpers shared by the pages: caching, the no-model state, report rendering.

Not a page (st.navigation in app.py lists the pages explicitly). Caches:
- the pipeline once per process (``st.cache_resource``);
- results, display images (already encoded), crops and Grad-CAM by the photo's sha256 + settings +
  model key (``st.cache_data``), so a re-run on the same photo and an aggregation switch run no
  network and re-encode no image.
Uploads stay in memory: nothing here writes an image to disk.
"""
from __future__ import annotations

import gc
import logging
import runpy
import threading
from collections import OrderedDict
from typing import Any

from pathlib import Path

import numpy as np
import streamlit as st
from PIL import Image

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

def freeze_long_lived_objects() -> None:
    """Move everything alive now (imported modules, loaded networks) out of the garbage collector's reach.

    Streamlit runs a full ``gc.collect(2)`` after every script run, fragment runs included; with the
    networks loaded that walks ~500k objects, ~0.25 s holding the GIL, during which the server
    cannot send the finished page to the browser. The models stay loaded for the life of the process,
    so they need no scanning: after ``gc.freeze()`` that collection takes a millisecond.
    """
    gc.collect()
    gc.freeze()


@st.cache_resource(show_spinner="Loading the models (once per server process)...")
def _cached_pipeline(models_path: str) -> Any:
    pipe = sup.load_pipeline(Path(models_path))
    freeze_long_lived_objects()
    return pipe


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
# Keyed on ``image_key`` (the sha256 of the photo's bytes, computed once per run by the page) rather
# than on the bytes themselves: the bytes are passed unhashed (``_data``), so a re-run does not hash a
# multi-megabyte photo once per cached call.

@st.cache_data(max_entries=64, show_spinner=False)
def predict_cached(image_key: str, name: str, whole_image: bool, model_key: str, _data: bytes) -> Any:
    """The model run for one photo (aggregation 'mean'; other aggregations come from reaggregate)."""
    pipe, failure = pipeline_or_failure()
    if pipe is None:
        raise RuntimeError(failure.message if failure else "no pipeline")
    return pipe.predict(_data, aggregate="mean", whole_image=whole_image, name=name)


@st.cache_resource(show_spinner=False)
def _analysed_runs() -> "OrderedDict[tuple, None]":
    return OrderedDict()


_ANALYSED_LOCK = threading.Lock()


def analysed_before(run_key: tuple) -> bool:
    """Whether this process has already analysed this photo with these settings (so the result is
    in predict_cached's cache and the page can skip the progress box: a re-run shows the result at once)."""
    runs = _analysed_runs()
    with _ANALYSED_LOCK:
        if run_key in runs:
            runs.move_to_end(run_key)
            return True
    return False


def remember_analysed(run_key: tuple, max_entries: int = 64) -> None:
    """Record a successful analysis (LRU bounded like predict_cached's cache)."""
    runs = _analysed_runs()
    with _ANALYSED_LOCK:
        runs[run_key] = None
        runs.move_to_end(run_key)
        while len(runs) > max_entries:
            runs.popitem(last=False)


def display_canvas(data: bytes, width: int, height: int, max_side: int = 1600) -> tuple[np.ndarray, str]:
    """The photo for display; if this decoder cannot show a file the pipeline accepted, a grey canvas
    of the same shape (the boxes and numbers stay right) and a warning, never a crash. No Streamlit
    call: the PNG download's deferred callable uses it too."""
    try:
        return sup.decode_for_display(data, max_side), ""
    except Exception as exc:
        log.warning("display decode failed: %s", exc)
        scale = min(1.0, max_side / max(width, height, 1))
        canvas = np.full((max(1, round(height * scale)), max(1, round(width * scale)), 3), 200, np.uint8)
        return canvas, f"The photo itself cannot be shown here ({type(exc).__name__}); boxes are drawn on a grey canvas."


@st.cache_data(max_entries=8, show_spinner=False)
def display_image(image_key: str, width: int, height: int, _data: bytes) -> tuple[np.ndarray, str]:
    """display_canvas, cached per photo (another highlighted lesion re-draws the boxes without decoding)."""
    return display_canvas(_data, width, height)


def export_image(data: bytes, result: Any, synthetic: bool) -> Image.Image:
    """The annotated photo for the PNG download (no highlight): decoded when the user asks for it."""
    display, _ = display_canvas(data, result.width, result.height)
    if synthetic:
        display = sup.stamp_synthetic(display)  # the label is shown, never analysed
    return sup.annotate(display, result, highlight=None)


@st.cache_data(max_entries=32, show_spinner=False)
def annotated_jpeg(image_key: str, width: int, height: int, synthetic: bool, highlight: int | None,
                   drawing: tuple, _data: bytes, _result: Any) -> tuple[bytes, str]:
    """(JPEG bytes of the boxed photo with its legend, display problem or ""), cached on the photo, the
    boxes and their colours (``drawing``) and the highlighted lesion. Already at most
    sup.DISPLAY_MAX_WIDTH wide, so st.image sends these bytes as they are."""
    display, problem = display_image(image_key, width, height, _data)
    if synthetic:
        display = sup.stamp_synthetic(display)  # the label is shown, never analysed
    return sup.display_jpeg(sup.annotate(display, _result, highlight=highlight)), problem


@st.cache_data(max_entries=16, show_spinner=False)
def lesion_crops(image_key: str, name: str, whole_image: bool, model_key: str, _data: bytes,
                 _result: Any) -> list[np.ndarray]:
    """pipe.crop for every lesion (decoding the photo once when the pipeline allows it)."""
    pipe, _ = pipeline_or_failure()
    if pipe is None or not _result.lesions:
        return []
    source: Any = _data
    if hasattr(pipe, "load"):
        try:
            source = pipe.load(_data, name=name)
        except Exception:  # fall back to the documented call
            source = _data
    return [sup.shrink(np.asarray(pipe.crop(source, lesion), dtype=np.uint8), 256) for lesion in _result.lesions]


@st.cache_data(max_entries=32, show_spinner=False)
def thumbnails(image_key: str, name: str, whole_image: bool, model_key: str, _data: bytes,
               _result: Any) -> list[str]:
    return [sup.thumbnail_data_url(c) for c in lesion_crops(image_key, name, whole_image, model_key, _data, _result)]


@st.cache_data(max_entries=32, show_spinner=False)
def crop_jpegs(image_key: str, name: str, whole_image: bool, model_key: str, _data: bytes, _result: Any,
               width: int = 224) -> list[bytes]:
    """The lesion crops as JPEG bytes at most ``width`` wide (st.image passes them through)."""
    return [sup.display_jpeg(c, max_width=width) for c in lesion_crops(image_key, name, whole_image, model_key,
                                                                        _data, _result)]


@st.cache_data(max_entries=64, show_spinner=False)
def gradcam_cached(image_key: str, name: str, lesion_index: int, model_key: str, _data: bytes,
                   _result: Any) -> np.ndarray:
    pipe, _ = pipeline_or_failure()
    return np.asarray(pipe.gradcam(_data, lesion_index, result=_result), dtype=np.uint8)


@st.cache_resource(show_spinner=False)
def _context_models(models_path: str, model_key: str) -> tuple[Any, Any, str]:
    """(combined clinical model | None, management model | None, problem) from the models folder."""
    from lesiontriage.context_models import CombinedClinicalModel, ManagementModel

    try:
        models = CombinedClinicalModel.from_dir(Path(models_path)), ManagementModel.from_dir(Path(models_path)), ""
    except Exception as exc:  # a bad optional model must not stop the triage page
        log.warning("context models not loaded: %s", exc)
        models = None, None, f"Optional clinical/management models could not be loaded ({exc})."
    freeze_long_lived_objects()  # once per process, like the pipeline (the import above may bring in torch)
    return models


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
