"""Wide-field mole photos (RoujiaW): many small boxed moles per photo, no diagnosis.

Every row is diagnosis OTHER, malignant <NA>, source_label 'mole' (labels.MOLES says why).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from lesiontriage.data.sources import ReadResult, apply_labels, finalize, parse_boxes, read_metadata, require

SOURCE = "moles_widefield_roujiaw"


def read(set_dir: Path) -> ReadResult:
    set_dir = Path(set_dir)
    m = read_metadata(set_dir)
    require(m, ("file", "image_id", "width", "height", "boxes"), set_dir)
    csv = set_dir / "metadata.csv"
    label = pd.Series("mole", index=m.index)
    diagnosis, malignant = apply_labels(SOURCE, label, csv)
    rows = pd.DataFrame({
        "path": SOURCE + "/" + m["file"],
        "modality": "widefield",
        "image_id": m["image_id"],
        "diagnosis": diagnosis,
        "source_label": label,
        "malignant": malignant,
        "boxes": [parse_boxes(b, f"{csv}: {i}") for b, i in zip(m["boxes"], m["image_id"])],
        "width": m["width"], "height": m["height"],
        "orig_width": m.get("orig_width"), "orig_height": m.get("orig_height"),
        "source_split": m["split"] if "split" in m else "",
        "near_duplicate_of": m["near_duplicate_of"] if "near_duplicate_of" in m else "",
    })
    return ReadResult(SOURCE, finalize(rows, SOURCE))
