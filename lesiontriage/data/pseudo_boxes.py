"""Detector pseudo-boxes for the labelled sets that come without boxes (derm7pt, SD-198).

Why: the lesion classifier learnt those sets as whole photos (no box to crop), yet in the product it scores them
through the *detected* box's crop, a view it never trained on: the two-stage path reads derm7pt clinical at ~0.72
validation AUC against ~0.80 for the same network on the whole frame. Giving each such photo the box the shipped
detector keeps for it (its largest kept box: these sets show one lesion per photo) lets a classifier run train on the
crop the product will show it. The boxes come from the shipped pipeline's own detection rule
(:meth:`TriagePipeline.detect`: lobe merging, score cut, nested parts), are cached per detector under
``runs/data/`` and are never written into the manifest (they are predictions, not labels).

``lesiontriage data pseudo-boxes`` builds the cache; ``train classifier`` with ``pseudo_box_sources`` in its config
reads it (and builds what is missing).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from lesiontriage.data.manifest import resolve_path
from lesiontriage.errors import ImageError
from lesiontriage.paths import RUNS_DIR

DEFAULT_SOURCES = ("derm7pt", "sd198_tumour_subset")
COLUMNS = ["path", "box", "detector_score", "n_kept", "box_fraction"]


@dataclass(frozen=True)
class PseudoBox:
    """The box the shipped pipeline keeps for one photo (stored-image pixels), or none."""

    path: str
    box: list[float] | None
    detector_score: float
    n_kept: int
    box_fraction: float  # box area / photo area (0 when no box was kept)


def cache_path(detector_sha256: str, rule_tag: str = "", runs_dir: Path | None = None) -> Path:
    """One cache per detector and box-selection rule: either one changes which box is kept."""
    suffix = f"_{rule_tag}" if rule_tag else ""
    return (runs_dir or RUNS_DIR) / "data" / f"pseudo_boxes_{detector_sha256[:12]}{suffix}.parquet"


def pipeline_cache_path(pipe: Any) -> Path:
    """The cache of ``pipe``'s detector under its box-selection rule (lobe merging, score cuts, nested parts)."""
    rule = hashlib.sha256(repr(pipe.box_selection).encode()).hexdigest()[:8]
    return cache_path(pipe.metadata["models"]["detector"]["sha256"], rule)


def pseudo_box(pipe: Any, path: str, stored_size: tuple[int, int], data_root: Path | None = None) -> PseudoBox:
    """Detect on one photo with the pipeline's rule; the largest kept box, scaled to the stored image's pixels."""
    img = pipe.load(resolve_path(path, data_root))
    boxes, scores = pipe.detect(img.rgb)
    if not len(boxes):
        return PseudoBox(path, None, 0.0, 0, 0.0)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    i = int(np.argmax(areas))
    h, w = img.rgb.shape[:2]
    sx, sy = stored_size[0] / w, stored_size[1] / h  # the loader may downscale a huge photo; training decodes stored
    box = [float(boxes[i, 0] * sx), float(boxes[i, 1] * sy), float(boxes[i, 2] * sx), float(boxes[i, 3] * sy)]
    return PseudoBox(path, box, float(scores[i]), int(len(boxes)), float(areas[i] / (w * h)))


def build_pseudo_boxes(pipe: Any, rows: pd.DataFrame, cache: Path, data_root: Path | None = None) -> pd.DataFrame:
    """Pseudo-boxes for ``rows`` (manifest rows), reusing and extending ``cache``. A photo that cannot be read
    gets no box (it keeps the whole-photo view) rather than stopping the run."""
    known = pd.read_parquet(cache) if cache.exists() else pd.DataFrame(columns=COLUMNS)
    done = set(known["path"])
    todo = rows[~rows["path"].isin(done)]
    found: list[dict[str, Any]] = []
    for r in tqdm(list(todo.itertuples(index=False)), desc="pseudo-boxes", disable=todo.empty):
        try:
            pb = pseudo_box(pipe, r.path, (int(r.width), int(r.height)), data_root)
        except (ImageError, OSError) as exc:
            print(f"warning: {r.path}: {exc}; no pseudo-box")
            pb = PseudoBox(r.path, None, 0.0, 0, 0.0)
        found.append(pb.__dict__)
    if found:
        known = pd.concat([known, pd.DataFrame(found, columns=COLUMNS)], ignore_index=True)
        cache.parent.mkdir(parents=True, exist_ok=True)
        known.to_parquet(cache, index=False)
    return known[known["path"].isin(set(rows["path"]))].reset_index(drop=True)


def apply_pseudo_boxes(rows: pd.DataFrame, table: pd.DataFrame, sources: Sequence[str]) -> pd.DataFrame:
    """``rows`` with each box-less row of ``sources`` given its pseudo-box (when one was kept) and a boolean
    ``pseudo_box`` column; rows with given boxes, and every other source, are unchanged."""
    by_path = {p: b for p, b in zip(table["path"], table["box"]) if b is not None and len(b) == 4}
    out = rows.copy()
    flags, boxes = [], []
    for src, path, given in zip(out["source"], out["path"], out["boxes"]):
        missing = given is None or len(given) == 0
        if missing and src in sources and path in by_path:
            boxes.append([list(map(float, by_path[path]))])
            flags.append(True)
        else:
            boxes.append(given)
            flags.append(False)
    out["boxes"] = boxes
    out["pseudo_box"] = flags
    return out
