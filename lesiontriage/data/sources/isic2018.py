"""ISIC 2018 Task 3 official test set: dermoscopy, one-hot ground truth, no boxes, all test."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from lesiontriage.data.sources import ReadResult, apply_labels, finalize, read_metadata, require
from lesiontriage.errors import DataError

SOURCE = "isic2018_task3_test"
CLASSES = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")


def read(set_dir: Path) -> ReadResult:
    set_dir = Path(set_dir)
    m = read_metadata(set_dir)
    require(m, ("file", "image_id", "width", "height"), set_dir)
    csv = set_dir / "metadata.csv"
    if "diagnosis" in m.columns and (m["diagnosis"] != "").all():
        label = m["diagnosis"]
    else:  # derive from the one-hot ground truth columns
        require(m, CLASSES, set_dir)
        onehot = m[list(CLASSES)].apply(pd.to_numeric, errors="coerce").fillna(0.0)
        bad = onehot.sum(axis=1) != 1
        if bad.any():
            raise DataError(f"{csv}: {int(bad.sum())} row(s) without exactly one ground-truth class, e.g. {m.loc[bad, 'image_id'].iloc[0]}")
        label = onehot.idxmax(axis=1)
    diagnosis, malignant = apply_labels(SOURCE, label, csv)
    rows = pd.DataFrame({
        "path": SOURCE + "/" + m["file"],
        "modality": "dermoscopy",
        "image_id": m["image_id"],
        "diagnosis": diagnosis,
        "source_label": label,
        "malignant": malignant,
        "boxes": [[] for _ in range(len(m))],
        "width": m["width"], "height": m["height"],
        "orig_width": m.get("orig_width"), "orig_height": m.get("orig_height"),
        "split": "test",
        "source_split": "test",
    })
    return ReadResult(SOURCE, finalize(rows, SOURCE))
