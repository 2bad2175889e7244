"""Batch prediction over files and folders, shared by the CLI: one row per image, errors in place.

A bad file never stops the batch: its row gets ``status = 'error: <reason>'`` and the caller
reports it on stderr.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from lesiontriage.errors import ImageError
from lesiontriage.results import TriageResult

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".heic", ".heif", ".tif", ".tiff", ".bmp", ".gif"}
CSV_COLUMNS = ["image", "status", "image_score", "tier", "n_lesions", "lesions"]


def expand_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Files as given; folders expanded (sorted, recursive) to the image files they contain."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES))
        else:
            out.append(p)  # missing or odd files are reported by the loader, row by row
    return out


@dataclass
class BatchRow:
    image: str
    status: str
    result: TriageResult | None

    def csv_row(self) -> dict[str, object]:
        r = self.result
        lesions = [] if r is None else [
            {"box": l.box, "detector_score": round(l.detector_score, 4),
             "box_confidence": None if l.box_confidence is None else round(l.box_confidence, 4),
             "p_malignant": round(l.p_malignant, 4),
             "top_subtype": l.top_subtype, "subtypes": {k: round(v, 4) for k, v in l.subtypes.items()}}
            for l in r.lesions]
        return {
            "image": self.image,
            "status": self.status,
            "image_score": "" if r is None else round(r.image_score, 4),
            "tier": "" if r is None else r.tier.name,
            "n_lesions": "" if r is None else r.n_lesions,
            "lesions": json.dumps(lesions),
        }


def run_batch(pipeline, paths: list[Path], aggregate: str, whole_image: bool = False) -> Iterator[BatchRow]:
    """Yield one row per path, in order, catching bad images."""
    for p in paths:
        try:
            res = pipeline.predict(p, aggregate, whole_image=whole_image, name=str(p))
            yield BatchRow(str(p), "ok", res)
        except ImageError as exc:
            yield BatchRow(str(p), f"error: {exc.reason}", None)
