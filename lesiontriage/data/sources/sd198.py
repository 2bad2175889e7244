"""SD-198 tumour subset: clinical atlas photos (224x224, stretched), no boxes, redistributor's split."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from lesiontriage.data.sources import ReadResult, apply_labels, finalize, read_metadata, require

SOURCE = "sd198_tumour_subset"


def read(set_dir: Path) -> ReadResult:
    set_dir = Path(set_dir)
    m = read_metadata(set_dir)
    require(m, ("file", "image_id", "label", "split", "width", "height"), set_dir)
    csv = set_dir / "metadata.csv"
    diagnosis, malignant = apply_labels(SOURCE, m["label"], csv)
    rows = pd.DataFrame({
        "path": SOURCE + "/" + m["file"],
        "modality": "clinical",
        "image_id": m["image_id"],
        "diagnosis": diagnosis,
        "source_label": m["label"],
        "malignant": malignant,
        "boxes": [[] for _ in range(len(m))],
        "width": m["width"], "height": m["height"],
        "orig_width": m.get("orig_width"), "orig_height": m.get("orig_height"),
        "source_split": m["split"],
        "near_duplicate_of": m["near_duplicate_of"] if "near_duplicate_of" in m else "",
    })
    return ReadResult(SOURCE, finalize(rows, SOURCE))
