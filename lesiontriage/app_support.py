"""Helpers the browser app needs that do not depend on Streamlit.

Why a separate module: the pages stay thin (layout only) and everything here is unit-testable
without a browser: drawing boxes on a continuous malignancy colour scale with its legend, turning a
:class:`~lesiontriage.results.TriageResult` into CSV / JSON / an EXIF-free PNG, the example images
(data-root photos when present, always a generated synthetic scene), and reading the evaluation
reports in ``models/reports/`` with an explicit "no report yet" state.

Nothing here runs a network or re-implements a pipeline stage; display decoding happens only after
the pipeline has accepted the same bytes.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont, ImageOps

from lesiontriage.hybrid import HybridRule
from lesiontriage.paths import MODELS_DIR, data_root
from lesiontriage.results import SUBTYPES, TriageResult

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# constants shown in the app
# --------------------------------------------------------------------------------------------------

UPLOAD_TYPES: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "heic", "heif", "tif", "tiff")
AGGREGATIONS: dict[str, str] = {"mean": "Mean", "max": "Max", "noisy_or": "Noisy-OR"}
AGGREGATION_HELP = (
    "How per-lesion probabilities become one image score. Mean: average lesion. Max: the most "
    "suspicious lesion. Noisy-OR: 1 - prod(1 - p), the chance that at least one lesion is malignant."
)
def aggregation_sentence(aggregate: str, n_lesions: int, score: float, lesion_score: float | None = None,
                         whole_image_score: float | None = None, whole_image_weight: float = 0.0,
                         full_frame_score: float | None = None, full_frame_weight: float = 0.0,
                         main_lesion: int | None = None) -> str:
    """One line under the score saying how it was made (it also tells a browser test the switch landed);
    on a close-up it also gives the whole-frame views' shares (lesiontriage.hybrid), and on a photo scored on its
    main lesion (``main_lesion``, 0-based) says that the aggregate did not enter the score."""
    how = {"mean": "mean", "max": "maximum", "noisy_or": "noisy-OR, 1 - prod(1 - p),"}.get(aggregate, aggregate)
    rule = HybridRule(whole_image_weight, full_frame_weight=full_frame_weight)
    views = rule.view_terms(whole_image_score, full_frame_score)
    if n_lesions == 0:
        if views:
            return (f"No lesion found, so the score comes from the whole-photo views: " + " + ".join(views)
                    + f" = {score:.2f} (chosen on validation photos; a missed lesion must not read as routine).")
        return f"Score by {AGGREGATIONS.get(aggregate, aggregate)}: no lesion found, so the score is {score:.2f} by definition."
    plural = "s" if n_lesions != 1 else ""
    text = f"Score by {AGGREGATIONS.get(aggregate, aggregate)}: the {how} of {n_lesions} lesion probabilit{'ies' if plural else 'y'}."
    if main_lesion is not None and lesion_score is not None:
        others = n_lesions - 1
        text = (f"Scored on the main lesion (#{main_lesion + 1}, the most confident detection): the photo looks like a "
                f"clinical close-up of one lesion (too large for a wide-field photo, too small to fill the frame), so "
                + (f"the other {others} box{'es' if others != 1 else ''} (nearby spots) are shown but " if others else "")
                + f"the {AGGREGATIONS.get(aggregate, aggregate).lower()} aggregate does not enter the score "
                "(chosen on validation photos).")
    if views and lesion_score is not None:
        text += (f" The largest lesion fills enough of the photo to blend in whole-photo views: "
                 f"{rule.lesion_weight:.2g} x {lesion_score:.2f} + " + " + ".join(views)
                 + f" = {score:.2f} (the blend was chosen on validation photos).")
    return text


SUBTYPE_NAMES: dict[str, str] = {
    "MEL": "melanoma", "NV": "naevus", "BCC": "basal cell carcinoma",
    "AKIEC": "actinic keratosis / Bowen / SCC", "BKL": "benign keratosis", "DF": "dermatofibroma",
    "VASC": "vascular lesion", "OB": "other benign tumour",
}
# Short names for the lesion table's "Most like" column (the full names would be cut at its width).
SUBTYPE_SHORT: dict[str, str] = {
    "MEL": "melanoma", "NV": "naevus", "BCC": "basal cell ca.", "AKIEC": "actinic ker. / SCC",
    "BKL": "benign keratosis", "DF": "dermatofibroma", "VASC": "vascular", "OB": "other benign",
}
TIER_COLOURS: dict[str, str] = {"urgent": "red", "refer": "orange", "routine": "green"}
# Licences of the training data (model card); metadata.json's own list wins when present.
DATA_LICENCES: dict[str, str] = {
    "ham10000": "CC BY-NC 4.0 (non-commercial)",
    "isic2018_task3_test": "CC BY-NC 4.0 (non-commercial; evaluation only)",
    "pad_ufes20_subset": "CC BY 4.0",
    "derm7pt": "academic research only, no redistribution",
    "sd198_tumour_subset": "research use only (DermQuest images)",
    "moles_widefield_roujiaw": "licence unknown: internal research use only",
    "synthetic_scenes": "generated here from the sets above; synthetic",
}
NO_MODEL_HELP = (
    "The app needs trained weights in `models/` (`*.safetensors` + `metadata.json`). Either get a "
    "copy of the repository that ships them (`git pull`), or train and export them yourself "
    "(each run writes its best weights to `models/`):"
)
NO_MODEL_COMMANDS = (
    "lesiontriage data build\n"
    "lesiontriage train detector\n"
    "lesiontriage train classifier\n"
    "lesiontriage train tiers        # triage thresholds, chosen on validation images"
)
NO_MODEL_AFTER = "Then reload this page. Set `LESIONTRIAGE_MODELS=/path/to/models` to use another folder."

# Continuous malignancy colour scale (green -> amber -> red). Chosen over RdYlGn because its pale
# yellow middle vanishes on light skin; every box also gets a dark halo so it shows on any skin.
MALIGNANCY_COLORSCALE: list[list[Any]] = [[0.0, "#1a9641"], [0.5, "#f4a600"], [1.0, "#d7191c"]]


def models_dir() -> Path:
    """The models folder the app reads: $LESIONTRIAGE_MODELS, else the shipped ``models/``."""
    env = os.environ.get("LESIONTRIAGE_MODELS")
    return Path(env).expanduser().resolve() if env else MODELS_DIR


def reports_dir(models: Path | None = None) -> Path:
    return (models or models_dir()) / "reports"


# --------------------------------------------------------------------------------------------------
# colours, boxes, legend
# --------------------------------------------------------------------------------------------------

def _hex_to_rgb(h: str) -> tuple[int, int, int]:
    h = h.lstrip("#")
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)


_SCALE_POS = np.array([p for p, _ in MALIGNANCY_COLORSCALE], dtype=float)
_SCALE_RGB = np.array([_hex_to_rgb(c) for _, c in MALIGNANCY_COLORSCALE], dtype=float)


def malignancy_rgb(p: float) -> tuple[int, int, int]:
    """Colour of probability ``p`` on the continuous scale (clipped to [0, 1]; NaN -> grey)."""
    if p is None or not math.isfinite(float(p)):
        return (128, 128, 128)
    p = min(1.0, max(0.0, float(p)))
    return tuple(int(round(np.interp(p, _SCALE_POS, _SCALE_RGB[:, c]))) for c in range(3))  # type: ignore[return-value]


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=max(8, int(size)))
    except TypeError:  # Pillow without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def _text_colour(rgb: Sequence[int]) -> tuple[int, int, int]:
    lum = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return (0, 0, 0) if lum > 140 else (255, 255, 255)


def display_boxes(result: TriageResult, width: int, height: int, min_side: float = 10.0) -> list[list[float]]:
    """Lesion boxes scaled from original pixels to a ``width`` x ``height`` display image.

    Tiny lesions (moles of a few pixels) are grown around their centre to ``min_side`` so a user can
    see where they are; the exported numbers keep the true box.
    """
    sx = width / max(1, result.width)
    sy = height / max(1, result.height)
    out = []
    for lesion in result.lesions:
        x1, y1, x2, y2 = (float(v) for v in lesion.box)
        x1, x2 = x1 * sx, x2 * sx
        y1, y2 = y1 * sy, y2 * sy
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        half_w, half_h = max((x2 - x1) / 2, min_side / 2), max((y2 - y1) / 2, min_side / 2)
        out.append([max(0.0, cx - half_w), max(0.0, cy - half_h), min(width - 1.0, cx + half_w),
                    min(height - 1.0, cy + half_h)])
    return out


def draw_lesions(image: np.ndarray | Image.Image, result: TriageResult, highlight: int | None = None) -> Image.Image:
    """The photo with every lesion boxed in its malignancy colour and numbered ``#index+1``.

    ``highlight`` (a lesion index) gets a thicker box with a white halo; the other boxes stay
    visible but thinner, so the selected lesion stands out without hiding the rest.
    """
    img = (image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))).convert("RGB")
    img = img.copy()
    w, h = img.size
    draw = ImageDraw.Draw(img)
    base = max(2, round(min(w, h) / 220))
    font = _font(max(12, round(min(w, h) / 28)))
    boxes = display_boxes(result, w, h)
    order = sorted(range(len(boxes)), key=lambda i: (i == highlight, result.lesions[i].p_malignant))
    for i in order:  # highlighted and most suspicious drawn last (on top)
        lesion = result.lesions[i]
        x1, y1, x2, y2 = boxes[i]
        colour = malignancy_rgb(lesion.p_malignant)
        lw = base * 2 if i == highlight else base
        halo = (255, 255, 255) if i == highlight else (20, 20, 20)
        draw.rectangle([x1 - lw, y1 - lw, x2 + lw, y2 + lw], outline=halo, width=max(1, lw // 2 + 1))
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=lw)
        label = f"#{lesion.index + 1}"
        tb = draw.textbbox((0, 0), label, font=font)
        tw, th = tb[2] - tb[0], tb[3] - tb[1]
        ty = y1 - th - 2 * lw - 4 if y1 - th - 2 * lw - 4 >= 0 else min(h - th - 4, y2 + lw + 2)
        tx = min(max(0, x1 - lw), max(0, w - tw - 6))
        draw.rectangle([tx, ty, tx + tw + 6, ty + th + 4], fill=colour, outline=halo)
        draw.text((tx + 3 - tb[0], ty + 2 - tb[1]), label, fill=_text_colour(colour), font=font)
    return img


def legend_strip(width: int, title: str = "Box colour = lesion p(malignant)") -> Image.Image:
    """A continuous colour bar with ticks 0 .. 1, as wide as the photo it sits under.

    Title left of the bar on wide photos, above it on narrow ones; sizes scale with the width so the
    text stays readable once the photo is shrunk into a page column.
    """
    width = max(240, int(width))
    fsize = max(12, min(48, round(width / 42)))
    font = _font(fsize)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    margin = max(8, width // 40)
    title_w = probe.textbbox((0, 0), title, font=font)[2]
    bar_h = max(10, round(fsize * 1.1))
    side_by_side = width - (2 * margin + title_w + margin) >= width * 0.5
    top = max(4, fsize // 3) if side_by_side else fsize + 8
    height = top + bar_h + 6 + fsize + 6
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    if side_by_side:
        bar_x0 = 2 * margin + title_w
        draw.text((margin, top + bar_h // 2), title, fill=(30, 30, 30), font=font, anchor="lm")
    else:
        bar_x0 = margin
        draw.text((margin, 3), title, fill=(30, 30, 30), font=font)
    bar_x1 = width - margin
    xs = np.linspace(0.0, 1.0, max(2, bar_x1 - bar_x0))
    cols = np.stack([np.interp(xs, _SCALE_POS, _SCALE_RGB[:, c]) for c in range(3)], axis=-1).astype(np.uint8)
    img.paste(Image.fromarray(np.repeat(cols[None], bar_h, axis=0)), (bar_x0, top))
    draw.rectangle([bar_x0, top, bar_x0 + len(xs) - 1, top + bar_h - 1], outline=(60, 60, 60))
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = bar_x0 + t * (len(xs) - 1)
        draw.line([x, top + bar_h, x, top + bar_h + 4], fill=(60, 60, 60), width=1)
        lab = f"{t:g}"
        lab_w = probe.textbbox((0, 0), lab, font=font)[2]
        draw.text((min(max(0, x - lab_w / 2), width - lab_w - 1), top + bar_h + 5), lab, fill=(30, 30, 30), font=font)
    return img


def annotate(image: np.ndarray | Image.Image, result: TriageResult, highlight: int | None = None) -> Image.Image:
    """Boxed photo with the colour legend underneath: what the app shows and the PNG export holds."""
    boxed = draw_lesions(image, result, highlight)
    legend = legend_strip(boxed.width)
    out = Image.new("RGB", (boxed.width, boxed.height + legend.height), (255, 255, 255))
    out.paste(boxed, (0, 0))
    out.paste(legend.resize((boxed.width, legend.height)) if legend.width != boxed.width else legend, (0, boxed.height))
    return out


# --------------------------------------------------------------------------------------------------
# decoding for display, thumbnails, exports
# --------------------------------------------------------------------------------------------------

def _register_heif() -> None:
    try:
        import pillow_heif

        pillow_heif.register_heif_opener()
    except Exception as exc:  # pragma: no cover - pillow-heif is a dependency
        log.debug("pillow-heif unavailable: %s", exc)


def decode_for_display(data: bytes, max_side: int = 1600) -> np.ndarray:
    """RGB uint8 of an image the pipeline already accepted, EXIF-rotated, long side <= ``max_side``.

    Only for showing the photo: the model's own decode lives in the pipeline. Large JPEGs use draft
    mode so a 12-megapixel photo decodes in tens of milliseconds.
    """
    _register_heif()
    with Image.open(io.BytesIO(data)) as im:
        try:
            im.seek(0)
        except EOFError:
            pass
        if im.format == "JPEG":
            im.draft("RGB", (max_side, max_side))
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
            arr = np.asarray(im, dtype=np.float64)
            hi = float(arr.max()) or 1.0
            im = Image.fromarray((arr / hi * 255.0).clip(0, 255).astype(np.uint8)).convert("RGB")
        elif im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            im = Image.alpha_composite(bg, rgba).convert("RGB")
        else:
            im = im.convert("RGB")
        im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        return np.asarray(im, dtype=np.uint8).copy()


# Streamlit shrinks a wider image to this width and re-encodes it on every script run; an image
# handed over already this small, as JPEG bytes, is passed through untouched (see display_jpeg).
DISPLAY_MAX_WIDTH = 1460


def display_jpeg(image: np.ndarray | Image.Image, max_width: int = DISPLAY_MAX_WIDTH, quality: int = 90) -> bytes:
    """JPEG bytes for showing in the page, at most ``max_width`` wide (the app caches them per result,
    so a re-run sends the same bytes instead of re-drawing, resizing and re-encoding the photo)."""
    im = (image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))).convert("RGB")
    if im.width > max_width:
        im = im.resize((max_width, max(1, round(im.height * max_width / im.width))), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def drawing_key(result: TriageResult) -> tuple:
    """What the boxed photo depends on (boxes and their colours): a small, hashable cache key."""
    return tuple((lesion.index, tuple(round(float(v), 2) for v in lesion.box), round(float(lesion.p_malignant), 4))
                 for lesion in result.lesions)


def png_bytes(image: np.ndarray | Image.Image) -> bytes:
    """PNG with pixels only: a fresh image from the pixel array, so no EXIF, GPS, text or ICC chunk."""
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.uint8)
    clean = Image.fromarray(np.ascontiguousarray(arr[..., :3]), "RGB")
    buf = io.BytesIO()
    clean.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def shrink(rgb: np.ndarray, max_side: int) -> np.ndarray:
    """Downscale so the long side is <= ``max_side`` (cached crops stay small); never upscales."""
    h, w = rgb.shape[:2]
    if max(h, w) <= max_side:
        return rgb
    im = Image.fromarray(np.asarray(rgb, dtype=np.uint8))
    im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return np.asarray(im)


def thumbnail_data_url(rgb: np.ndarray, size: int = 96) -> str:
    """A small PNG data URL for a table cell (st.column_config.ImageColumn renders it)."""
    im = Image.fromarray(np.asarray(rgb, dtype=np.uint8)).convert("RGB")
    im.thumbnail((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def lesions_by_probability(result: TriageResult) -> list[int]:
    """Lesion indices, most suspicious first (ties: higher detector score first)."""
    return sorted(range(len(result.lesions)), key=lambda i: (-result.lesions[i].p_malignant,
                                                             -result.lesions[i].detector_score, i))


def top_subtypes(subtypes: dict[str, float], k: int = 3) -> str:
    ranked = sorted(subtypes.items(), key=lambda kv: -kv[1])[:k]
    return ", ".join(f"{name} {p:.0%}" for name, p in ranked)


def lesion_table(result: TriageResult, thumbnails: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per lesion, sorted by p_malignant: what the app's table shows."""
    rows = []
    for i in lesions_by_probability(result):
        lesion = result.lesions[i]
        row: dict[str, Any] = {
            "lesion": f"#{lesion.index + 1}",
            "crop": thumbnails[i] if thumbnails is not None and i < len(thumbnails) else None,
            "p_malignant": float(lesion.p_malignant),
            "most_like": f"{lesion.top_subtype} ({SUBTYPE_SHORT.get(lesion.top_subtype, '')})" if lesion.subtypes else "",
            "subtypes": top_subtypes(lesion.subtypes),
            "detector_confidence": float(lesion.detector_score),
            # how likely the box fits a real lesion (box_rescoring.py); NaN when no box rescorer is shipped
            "box_confidence": float("nan") if lesion.box_confidence is None else float(lesion.box_confidence),
            "size_px": f"{lesion.box[2] - lesion.box[0]:.0f} x {lesion.box[3] - lesion.box[1]:.0f}",
        }
        rows.append(row)
    cols = ["lesion", "crop", "p_malignant", "most_like", "subtypes", "detector_confidence", "box_confidence", "size_px"]
    return pd.DataFrame(rows, columns=cols)


def result_rows(result: TriageResult) -> list[dict[str, Any]]:
    """CSV rows: one per lesion (image-level fields repeated); one row with blank lesion fields when
    nothing was found, so "no lesion" is still a recorded outcome."""
    warnings = "; ".join(result.quality.warnings) if result.quality else ""
    base = {
        "image": result.source, "width": result.width, "height": result.height, "mode": result.mode,
        "aggregate": result.aggregate, "image_score": round(float(result.image_score), 6),
        "tier": result.tier.name, "tier_reason": result.tier.reason, "n_lesions": result.n_lesions,
        "quality_warnings": warnings, "model_version": result.model_version,
    }
    lesion_keys = ["lesion", "x1", "y1", "x2", "y2", "detector_score", "box_confidence", "p_malignant", "top_subtype"] + \
        [f"p_{s}" for s in SUBTYPES]
    if not result.lesions:
        return [{**base, **{k: "" for k in lesion_keys}}]
    rows = []
    for i in lesions_by_probability(result):
        lesion = result.lesions[i]
        row = {**base, "lesion": lesion.index + 1, "x1": lesion.box[0], "y1": lesion.box[1], "x2": lesion.box[2],
               "y2": lesion.box[3], "detector_score": round(float(lesion.detector_score), 6),
               "box_confidence": "" if lesion.box_confidence is None else round(float(lesion.box_confidence), 6),
               "p_malignant": round(float(lesion.p_malignant), 6), "top_subtype": lesion.top_subtype}
        for s in SUBTYPES:
            row[f"p_{s}"] = round(float(lesion.subtypes.get(s, float("nan"))), 6) if s in lesion.subtypes else ""
        rows.append(row)
    return rows


def result_csv(result: TriageResult) -> str:
    return pd.DataFrame(result_rows(result)).to_csv(index=False)


def result_json(result: TriageResult) -> str:
    return json.dumps(result.to_dict(), indent=2, default=_json_default)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def export_stem(name: str | None) -> str:
    """A safe file stem for downloads from an uploaded file name."""
    stem = Path(name or "image").stem or "image"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)[:60]
    return safe or "image"


# --------------------------------------------------------------------------------------------------
# examples: data-root photos and generated synthetic scenes
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Example:
    """One selectable example. ``path`` for a data-root photo, ``seed`` for a synthetic scene."""

    key: str
    label: str
    source: str
    note: str
    synthetic: bool = False
    path: Path | None = None
    seed: int | None = None


SYNTHETIC_SEEDS: tuple[int, ...] = (1, 2)


def synthetic_examples() -> list[Example]:
    return [Example(key=f"synthetic:{s}", label=f"Synthetic wide-field scene (seed {s}) - SYNTHETIC, generated",
                    source="synthetic", synthetic=True, seed=s,
                    note="Generated demo scene: synthetic, not a real patient.")
            for s in SYNTHETIC_SEEDS]


def _read_csv(path: Path) -> pd.DataFrame | None:
    try:
        return pd.read_csv(path, low_memory=False)
    except Exception as exc:
        log.warning("cannot read %s: %s", path, exc)
        return None


def data_examples(root: Path | None = None, per_set: int = 3) -> list[Example]:
    """A few photos from the shared data root (smartphone, clinical, wide-field), deterministic.

    Returns [] when the data root is absent: the app then offers only synthetic scenes.
    """
    root = Path(root) if root else data_root()
    out: list[Example] = []
    pad = root / "pad_ufes20_subset" / "metadata.csv"
    if pad.is_file() and (df := _read_csv(pad)) is not None and {"file", "diagnostic"} <= set(df.columns):
        if "biopsed" in df.columns:
            df = df[df["biopsed"].astype(str).str.lower() == "true"]
        for dx in ("MEL", "BCC", "NEV")[:per_set]:
            rows = df[df["diagnostic"] == dx].sort_values("file").head(1)
            for _, r in rows.iterrows():
                out.append(Example(key=f"pad_ufes20_subset:{r['file']}", source="pad_ufes20_subset",
                                   label=f"PAD-UFES-20 smartphone photo, {Path(r['file']).stem} (label: {dx}, biopsied)",
                                   note=f"PAD-UFES-20 (CC BY 4.0). Ground-truth label: {dx}. May be in the training data, "
                                        "so a good result here is not evidence of accuracy.",
                                   path=root / "pad_ufes20_subset" / r["file"]))
    d7 = root / "derm7pt" / "metadata.csv"
    if d7.is_file() and (df := _read_csv(d7)) is not None and {"clinic_file", "diagnosis"} <= set(df.columns):
        if "derm_file" in df.columns:
            df = df[df["clinic_file"] != df["derm_file"]]
        if "split" in df.columns:
            df = df[df["split"] == "test"]
        for pattern in ("melanoma", "basal cell carcinoma", "nevus")[:per_set]:
            rows = df[df["diagnosis"].astype(str).str.contains(pattern)].sort_values("clinic_file").head(1)
            for _, r in rows.iterrows():
                out.append(Example(key=f"derm7pt:{r['clinic_file']}", source="derm7pt",
                                   label=f"derm7pt clinical photo, {Path(r['clinic_file']).stem} (label: {r['diagnosis']})",
                                   note=f"derm7pt (academic research only), official test split. Ground-truth label: "
                                        f"{r['diagnosis']}.",
                                   path=root / "derm7pt" / r["clinic_file"]))
    moles = root / "moles_widefield_roujiaw" / "metadata.csv"
    if moles.is_file() and (df := _read_csv(moles)) is not None and "file" in df.columns:
        if "n_boxes" in df.columns:
            df = df[(df["n_boxes"] >= 5) & (df["n_boxes"] <= 40)]
        for _, r in df.sort_values("file").head(min(per_set, 2)).iterrows():
            n = int(r["n_boxes"]) if "n_boxes" in df.columns else None
            out.append(Example(key=f"moles_widefield_roujiaw:{r['file']}", source="moles_widefield_roujiaw",
                               label=f"Wide-field mole photo, {Path(r['file']).stem}" + (f" ({n} annotated moles)" if n else ""),
                               note="Wide-field mole photos (licence unknown: internal research use). No diagnosis labels; "
                                    "may be in the detector's training data.",
                               path=root / "moles_widefield_roujiaw" / r["file"]))
    return [e for e in out if e.path is not None and e.path.is_file()]


def list_examples(root: Path | None = None) -> list[Example]:
    """Synthetic scenes first (always there), then data-root photos when the data root exists."""
    try:
        real = data_examples(root)
    except Exception as exc:  # a malformed data root must not break the triage page
        log.warning("examples from the data root unavailable: %s", exc)
        real = []
    return synthetic_examples() + real


def _as_pil(obj: Any) -> Image.Image:
    """Accept what a scene generator may return: PIL, ndarray, (image, boxes...), dict or object."""
    if isinstance(obj, (tuple, list)) and obj:
        obj = obj[0]
    if isinstance(obj, dict):
        obj = obj.get("image", obj.get("rgb"))
    elif not isinstance(obj, (Image.Image, np.ndarray)) and hasattr(obj, "image"):
        obj = obj.image
    if isinstance(obj, Image.Image):
        return obj.convert("RGB")
    arr = np.asarray(obj)
    if arr.dtype != np.uint8:
        arr = (arr * 255 if arr.max() <= 1.0 else arr).clip(0, 255).astype(np.uint8)
    return Image.fromarray(arr).convert("RGB")


def fallback_scene(seed: int, size: tuple[int, int] = (1280, 960)) -> Image.Image:
    """A simple generated skin photo with a few pigmented spots (used until ``make_demo_scene`` exists)."""
    import cv2

    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.array(rng.choice([[224, 182, 152], [198, 150, 118], [150, 105, 75]]), dtype=np.float32)
    shade = 1.0 - 0.12 * ((xx / w - 0.3) ** 2 + (yy / h - 0.4) ** 2)
    img = base[None, None, :] * shade[..., None]
    img += cv2.GaussianBlur(rng.normal(0, 6, (h, w)).astype(np.float32), (0, 0), 3)[..., None]
    canvas = img.clip(0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(4, 9))):
        cx, cy = int(rng.uniform(0.1, 0.9) * w), int(rng.uniform(0.1, 0.9) * h)
        ax, ay = int(rng.uniform(8, 45)), int(rng.uniform(8, 45))
        colour = np.array(rng.choice([[92, 58, 40], [60, 38, 28], [120, 80, 60], [40, 28, 30]]), dtype=np.float32)
        mask = np.zeros((h, w), np.float32)
        cv2.ellipse(mask, (cx, cy), (ax, ay), float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
        mask = cv2.GaussianBlur(mask, (0, 0), max(1.5, min(ax, ay) / 4))[..., None]
        canvas = (canvas * (1 - mask) + colour * mask).clip(0, 255).astype(np.uint8)
    return Image.fromarray(canvas)


def synthetic_scene(seed: int) -> Image.Image:
    """The project's demo scene generator when installed, else :func:`fallback_scene`."""
    try:
        from lesiontriage.data.demo_scene import make_demo_scene  # added by the data engineer
    except Exception as exc:
        log.debug("make_demo_scene unavailable (%s): using the fallback scene", exc)
        return fallback_scene(seed)
    try:
        # Unstamped pixels are analysed (the detector boxed the "SYNTHETIC" text as a lesion); the page
        # stamps the label on what it displays and exports (``stamp_synthetic``) and says so in a banner.
        return _as_pil(make_demo_scene(seed, stamp=False))
    except Exception as exc:
        log.warning("make_demo_scene(%s) failed: %s; using the fallback scene", seed, exc)
        return fallback_scene(seed)


def stamp_synthetic(rgb: np.ndarray) -> np.ndarray:
    """A copy of ``rgb`` with the "SYNTHETIC" label in the bottom-left corner (display and export only)."""
    from lesiontriage.data.demo_scene import _stamp

    out = np.array(rgb, dtype=np.uint8, copy=True)
    _stamp(out, "SYNTHETIC", max(12, max(out.shape[:2]) // 45))
    return out


def jpeg_bytes(image: Image.Image, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def load_example(example: Example) -> tuple[bytes, str]:
    """(image bytes, display name) for an example; synthetic scenes are generated in memory."""
    if example.synthetic:
        return jpeg_bytes(synthetic_scene(int(example.seed or 0))), f"synthetic_scene_seed{example.seed}.jpg"
    assert example.path is not None
    return example.path.read_bytes(), example.path.name


# --------------------------------------------------------------------------------------------------
# reports and metadata
# --------------------------------------------------------------------------------------------------

@dataclass
class Provenance:
    """Which command, data and model produced a report (shown under every figure)."""

    command: str = ""
    manifest_hash: str = ""
    model_sha256: str = ""
    seed: str = ""
    created: str = ""

    @property
    def known(self) -> bool:
        return bool(self.command or self.manifest_hash or self.model_sha256)

    def text(self) -> str:
        if not self.known:
            return "Provenance not recorded in this report (no command, manifest hash or model sha256)."
        parts = [f"Made by `{self.command}`" if self.command else "Command not recorded"]
        parts.append(f"data manifest `{self.manifest_hash[:12]}`" if self.manifest_hash else "data manifest not recorded")
        parts.append(f"model sha256 `{self.model_sha256}`" if self.model_sha256 else "model sha256 not recorded")
        if self.seed:
            parts.append(f"seed {self.seed}")
        if self.created:
            parts.append(self.created)
        return " · ".join(parts)


def _short_sha(v: Any) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k} {str(s)[:12]}" for k, s in v.items() if s)
    return str(v)[:12] if v else ""


def provenance(report: dict[str, Any] | None, parent: Provenance | None = None) -> Provenance:
    """Provenance fields of a report (top level or a ``provenance`` / ``meta`` block), else the parent's."""
    parent = parent or Provenance()
    if not isinstance(report, dict):
        return parent
    src: dict[str, Any] = {}
    for block in ("provenance", "meta", "_meta"):
        if isinstance(report.get(block), dict):
            src.update(report[block])
    src.update({k: v for k, v in report.items() if not isinstance(v, (dict, list)) or k == "model_sha256"})
    return Provenance(
        command=str(src.get("command") or parent.command),
        manifest_hash=str(src.get("manifest_hash") or parent.manifest_hash),
        model_sha256=_short_sha(src.get("model_sha256")) or parent.model_sha256,
        seed=str(src.get("seed", "")) if src.get("seed", "") != "" else parent.seed,
        created=str(src.get("created") or src.get("date") or parent.created),
    )


@dataclass
class Report:
    name: str
    path: Path
    data: dict[str, Any]
    provenance: Provenance
    error: str = ""


def load_report(name: str, directory: Path | None = None) -> Report | None:
    """``models/reports/<name>.json`` or None when it does not exist yet (a malformed file -> error set)."""
    directory = directory or reports_dir()
    path = directory / (name if name.endswith(".json") else f"{name}.json")
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return Report(path.stem, path, {}, Provenance(), error=f"{path.name}: cannot be read ({exc})")
    if not isinstance(data, dict):
        data = {"items": data}
    return Report(path.stem, path, data, provenance(data))


def list_reports(directory: Path | None = None) -> list[Report]:
    """Every JSON report in ``models/reports/`` (sorted by name); [] when there is none yet."""
    directory = directory or reports_dir()
    if not directory.is_dir():
        return []
    reports = [load_report(p.name, directory) for p in sorted(directory.glob("*.json"))]
    return [r for r in reports if r is not None]


def load_metadata(models: Path | None = None) -> dict[str, Any] | None:
    """``models/metadata.json`` or None (no model yet, or unreadable)."""
    path = (models or models_dir()) / "metadata.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("%s unreadable: %s", path, exc)
        return None
    return data if isinstance(data, dict) else None


def model_installed(models: Path | None = None) -> bool:
    meta = load_metadata(models)
    return bool(meta and isinstance(meta.get("models"), dict) and "classifier" in meta["models"])


DATA_SET_DESCRIPTIONS: dict[str, str] = {
    "ham10000": "HAM10000: dermoscopy (stored 200x150)",
    "isic2018_task3_test": "ISIC 2018 Task 3 test: dermoscopy (224x224, squashed); test only",
    "pad_ufes20_subset": "PAD-UFES-20 subset: smartphone photos (Brazil), Fitzpatrick recorded",
    "derm7pt": "derm7pt: clinical + dermoscopy pairs, official split",
    "sd198_tumour_subset": "SD-198 tumour subset (DermQuest): clinical photos",
    "moles_widefield_roujiaw": "Wide-field mole photos: boxes only, no diagnosis",
    "synthetic_scenes": "Synthetic wide-field scenes generated from the sets above (synthetic)",
}


def _split_counts(d: Any) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items()) if isinstance(d, dict) else ""


def training_data_table(data_report: dict[str, Any] | None, licences: dict[str, str]) -> pd.DataFrame:
    """One row per data set: description, licence and, when ``data_report.json`` exists, its counts."""
    per_source = (data_report or {}).get("per_source") or {}
    names = list(dict.fromkeys([*per_source, *licences]))
    rows = []
    for name in names:
        info = per_source.get(name, {}) if isinstance(per_source.get(name), dict) else {}
        rows.append({
            "data set": DATA_SET_DESCRIPTIONS.get(name, name), "licence": licences.get(name, "see SOURCE.md"),
            "images": info.get("images", ""), "lesions / groups": info.get("groups", ""),
            "images by split": _split_counts(info.get("by_split")),
            "malignant by split": _split_counts(info.get("malignant_by_split")), "boxes": info.get("boxes", ""),
        })
    return pd.DataFrame(rows)


# ---- walking report JSON for tables and figures --------------------------------------------------

def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _num_list(v: Any, min_len: int = 2) -> bool:
    return isinstance(v, list) and len(v) >= min_len and all(_is_num(x) or x is None for x in v)


def walk(obj: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Depth-first (path, node) over nested dicts / lists; paths use dots (``a.b.0.c``)."""
    yield path, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from walk(v, f"{path}.{k}" if path else str(k))
    elif isinstance(obj, list) and obj and isinstance(obj[0], (dict, list)):
        for i, v in enumerate(obj):
            yield from walk(v, f"{path}.{i}" if path else str(i))


def metric_rows(obj: Any) -> pd.DataFrame:
    """Every ``{value, ci_low, ci_high, n, split}`` object as one row (summary.json's form)."""
    rows = []
    for path, node in walk(obj):
        if isinstance(node, dict) and "value" in node and ("ci_low" in node or "ci_high" in node or "n" in node):
            lo, hi = node.get("ci_low"), node.get("ci_high")
            rows.append({
                "metric": path or "value", "value": node.get("value"),
                "95% CI": f"{lo:.3f} - {hi:.3f}" if _is_num(lo) and _is_num(hi) else "",
                "n": node.get("n"), "split": node.get("split", ""),
                "note": node.get("flag") or node.get("note") or "",
            })
    return pd.DataFrame(rows, columns=["metric", "value", "95% CI", "n", "split", "note"])


@dataclass
class Curve:
    kind: str  # roc | pr | reliability
    path: str
    x: list[float]
    y: list[float]
    extra: dict[str, Any] = field(default_factory=dict)


_CURVE_KEYS = {"roc": ("fpr", "tpr"), "pr": ("recall", "precision"), "reliability": ("mean_predicted", "observed_frequency")}


def find_curves(obj: Any) -> list[Curve]:
    """ROC (fpr/tpr), PR (recall/precision) and reliability (mean_predicted/observed_frequency) lists."""
    out = []
    for path, node in walk(obj):
        if not isinstance(node, dict):
            continue
        for kind, (kx, ky) in _CURVE_KEYS.items():
            if _num_list(node.get(kx)) and _num_list(node.get(ky)) and len(node[kx]) == len(node[ky]):
                extra = {k: v for k, v in node.items() if k not in (kx, ky) and not isinstance(v, (dict,))}
                out.append(Curve(kind, path, node[kx], node[ky], extra))
    return out


def find_confusions(obj: Any) -> list[tuple[str, list[list[float]], list[str]]]:
    """``{matrix: [[..]], labels: [..]}`` confusion matrices."""
    out = []
    for path, node in walk(obj):
        if isinstance(node, dict) and isinstance(node.get("matrix"), list) and node["matrix"] \
                and all(_num_list(r, 1) for r in node["matrix"]):
            labels = [str(x) for x in node.get("labels", range(len(node["matrix"])))]
            out.append((path, node["matrix"], labels))
    return out


def find_embeddings(obj: Any) -> list[tuple[str, pd.DataFrame]]:
    """2-D maps: ``{x: [...], y: [...], (label|malignant|subtype|...): [...]}`` of equal length."""
    out = []
    for path, node in walk(obj):
        if isinstance(node, dict) and _num_list(node.get("x"), 3) and _num_list(node.get("y"), 3) \
                and len(node["x"]) == len(node["y"]):
            n = len(node["x"])
            df = pd.DataFrame({k: v for k, v in node.items() if isinstance(v, list) and len(v) == n})
            out.append((path, df))
    return out


def find_tables(obj: Any, max_rows: int = 500) -> list[tuple[str, pd.DataFrame]]:
    """Lists of flat records (dicts of scalars) anywhere in a report, as tables."""
    out = []
    for path, node in walk(obj):
        if isinstance(node, list) and node and all(isinstance(r, dict) for r in node):
            flat = [{k: (v if not isinstance(v, (dict, list)) else json.dumps(v)) for k, v in r.items()} for r in node[:max_rows]]
            if any(not any(isinstance(v, (dict, list)) for v in r.values()) for r in node):
                out.append((path, pd.DataFrame(flat)))
    return out


def scalar_items(obj: dict[str, Any], skip: Sequence[str] = ("command", "manifest_hash", "model_sha256", "seed")) -> pd.DataFrame:
    """Top-level scalar fields of a report (counts, settings) as a two-column table."""
    rows = [{"field": k, "value": v} for k, v in obj.items() if k not in skip and not isinstance(v, (dict, list))]
    return pd.DataFrame(rows, columns=["field", "value"])


def curve_figure(curves: Sequence[Curve], kind: str, title: str = ""):
    """A plotly figure of curves of one kind (diagonal reference for ROC / reliability)."""
    import plotly.graph_objects as go

    axis = {"roc": ("False-positive rate", "True-positive rate"), "pr": ("Recall", "Precision"),
            "reliability": ("Mean predicted probability", "Observed frequency")}[kind]
    fig = go.Figure()
    if kind in ("roc", "reliability"):
        fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dot", color="grey"),
                                 name="chance" if kind == "roc" else "perfect calibration", hoverinfo="skip"))
    for c in curves:
        label = c.path or kind
        for key in ("auc", "ap", "ece", "value"):
            if _is_num(c.extra.get(key)):
                label += f" ({key.upper()} {c.extra[key]:.3f})"
                break
        mode = "lines+markers" if kind == "reliability" else "lines"
        fig.add_trace(go.Scatter(x=c.x, y=c.y, mode=mode, name=label))
    fig.update_layout(title=title or None, xaxis_title=axis[0], yaxis_title=axis[1], height=420,
                      xaxis=dict(range=[0, 1]), yaxis=dict(range=[0, 1.02]), legend=dict(font=dict(size=10)),
                      margin=dict(l=10, r=10, t=40 if title else 10, b=10))
    return fig


def confusion_figure(matrix: list[list[float]], labels: list[str], title: str = ""):
    import plotly.graph_objects as go

    fig = go.Figure(go.Heatmap(z=matrix, x=labels, y=labels, colorscale="Blues", text=matrix, texttemplate="%{text}",
                               hovertemplate="true %{y} / predicted %{x}: %{z}<extra></extra>"))
    fig.update_layout(title=title or None, xaxis_title="Predicted", yaxis_title="True", height=420,
                      yaxis=dict(autorange="reversed"), margin=dict(l=10, r=10, t=40 if title else 10, b=10))
    return fig


def embedding_figure(df: pd.DataFrame, title: str = ""):
    import plotly.express as px

    colour = next((c for c in ("subtype", "diagnosis", "label", "malignant", "source") if c in df.columns), None)
    fig = px.scatter(df, x="x", y="y", color=colour, opacity=0.7, title=title or None, height=480,
                     hover_data=[c for c in df.columns if c not in ("x", "y")][:5])
    fig.update_traces(marker=dict(size=5))
    return fig


MALIGNANT_SUBTYPES = ("MEL", "BCC", "AKIEC")  # drawn red (as in lesiontriage.data.schema.MALIGNANT_CODES)


def subtype_bars_html(subtypes: dict[str, float]) -> str:
    """One lesion's sub-type probabilities as plain HTML bars, most likely first (red: malignant types).

    What the triage page shows: the same chart as :func:`subtype_figure` without plotly, whose
    4.7 MB script a browser would otherwise load and run for this one small chart on every page load.
    Only fixed sub-type names and numbers go in (nothing from the user), escaped anyway.
    """
    import html

    rows = []
    for code, p in sorted(subtypes.items(), key=lambda kv: -kv[1]):
        p = min(1.0, max(0.0, float(p))) if math.isfinite(float(p)) else 0.0
        label = html.escape(f"{code} - {SUBTYPE_NAMES.get(code, code)}")
        colour = "#d7191c" if code in MALIGNANT_SUBTYPES else "#2b83ba"
        rows.append(
            '<div style="display:flex;align-items:center;gap:0.5rem;margin:0.15rem 0;font-size:0.8rem;line-height:1.1">'
            f'<span style="flex:0 0 46%;text-align:right;white-space:nowrap;overflow:hidden;text-overflow:ellipsis" '
            f'title="{label}">{label}</span>'
            '<span style="flex:1 1 auto;height:0.95rem;background:rgba(128,128,128,0.15)">'
            f'<span style="display:block;height:100%;width:{p * 100:.1f}%;background:{colour}"></span></span>'
            f'<span style="flex:0 0 2.6rem;text-align:right">{p:.0%}</span></div>')
    return ('<div role="figure" aria-label="Sub-type probabilities of this lesion">' + "".join(rows)
            + '<div style="font-size:0.75rem;opacity:0.7;text-align:right">probability (red: malignant types)</div></div>')


def subtype_figure(subtypes: dict[str, float]):
    """Horizontal bar chart of one lesion's sub-type probabilities (plotly; the page uses subtype_bars_html)."""
    import plotly.graph_objects as go

    items = sorted(subtypes.items(), key=lambda kv: kv[1])
    fig = go.Figure(go.Bar(x=[v for _, v in items], y=[f"{k} - {SUBTYPE_NAMES.get(k, k)}" for k, _ in items],
                           orientation="h", marker_color=["#d7191c" if k in MALIGNANT_SUBTYPES else "#2b83ba" for k, _ in items],
                           text=[f"{v:.0%}" for _, v in items], textposition="auto"))
    fig.update_layout(xaxis=dict(range=[0, 1], tickformat=".0%"), height=300, margin=dict(l=10, r=10, t=10, b=10),
                      xaxis_title="probability (red: malignant types)")
    return fig


# --------------------------------------------------------------------------------------------------
# pipeline loading (lazy: importing this module never imports torch)
# --------------------------------------------------------------------------------------------------

@dataclass
class LoadFailure:
    """Why the app has no pipeline: ``kind`` is 'no_model', 'bad_model' or 'error'."""

    kind: str
    message: str


def load_pipeline(models: Path | None = None):
    """``TriagePipeline.from_dir(models)``; the app caches the result once per process."""
    from lesiontriage import TriagePipeline

    return TriagePipeline.from_dir(models or models_dir())


def classify_load_error(exc: BaseException, models: Path | None = None) -> LoadFailure:
    """Turn a loading exception into a one-line, user-facing reason (never a traceback)."""
    from lesiontriage.errors import ModelError

    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, ModelError):
        return LoadFailure("no_model" if "no model installed" in msg.lower() else "bad_model", msg)
    return LoadFailure("error", f"{type(exc).__name__}: {msg}")


def model_key(pipe: Any) -> str:
    """A short key that changes when the installed weights change (part of the result cache key)."""
    meta = getattr(pipe, "metadata", {}) or {}
    shas = sorted(f"{k}:{v.get('sha256', '')}" for k, v in (meta.get("models") or {}).items() if isinstance(v, dict))
    blob = "|".join(shas) + "|" + json.dumps(meta.get("triage", {}), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
