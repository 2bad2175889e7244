"""HAM10000 (ISIC 2018 Task 3 training set): dermoscopy, one box per image from the lesion masks.

Several images show one lesion (``lesion_id``), so the lesion is the grouping unit.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from lesiontriage.data.sources import ReadResult, apply_labels, finalize, parse_boxes, read_metadata, require, to_float

SOURCE = "ham10000"
COLUMNS = ("file", "image_id", "lesion_id", "dx", "dx_type", "age", "sex", "localization", "width", "height", "boxes")


def read(set_dir: Path) -> ReadResult:
    set_dir = Path(set_dir)
    m = read_metadata(set_dir)
    require(m, COLUMNS, set_dir)
    csv = set_dir / "metadata.csv"
    diagnosis, malignant = apply_labels(SOURCE, m["dx"], csv)
    sex = m["sex"].str.lower().where(m["sex"].str.lower().isin(["male", "female"]), "")
    site = m["localization"].str.lower().where(m["localization"].str.lower() != "unknown", "")
    rows = pd.DataFrame({
        "path": SOURCE + "/" + m["file"],
        "modality": "dermoscopy",
        "image_id": m["image_id"],
        "lesion_id": m["lesion_id"],
        "diagnosis": diagnosis,
        "source_label": m["dx"],
        "malignant": malignant,
        "boxes": [parse_boxes(b, f"{csv}: {i}") for b, i in zip(m["boxes"], m["image_id"])],
        "width": m["width"], "height": m["height"],
        "orig_width": m.get("orig_width"), "orig_height": m.get("orig_height"),
        "age": to_float(m["age"]),
        "sex": sex,
        "site": site,
        "dx_type": m["dx_type"],
        "biopsied": (m["dx_type"] == "histo").astype("boolean"),
    })
    return ReadResult(SOURCE, finalize(rows, SOURCE))
