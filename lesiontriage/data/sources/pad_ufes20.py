"""PAD-UFES-20 subset: smartphone photos, patient questionnaire, one (non-expert) box per image.

Patients have several lesions and lesions several photos: the patient is the grouping unit.
The two conflicting copies of one photo (labels.DROPS) are dropped here, with the reason.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from lesiontriage.data.labels import dropped_ids
from lesiontriage.data.sources import ReadResult, apply_labels, finalize, parse_boxes, read_metadata, require, to_bool, to_float

SOURCE = "pad_ufes20_subset"
COLUMNS = ("file", "image_id", "patient_id", "lesion_id", "diagnostic", "biopsed", "width", "height", "boxes")
BOOLS = {"itch": "itch", "grew": "grew", "hurt": "hurt", "changed": "changed", "bleed": "bleed",
         "elevation": "pad_elevation", "smoke": "smoke", "drink": "drink", "pesticide": "pesticide",
         "skin_cancer_history": "skin_cancer_history", "cancer_history": "cancer_history",
         "has_piped_water": "has_piped_water", "has_sewage_system": "has_sewage_system"}


def read(set_dir: Path) -> ReadResult:
    set_dir = Path(set_dir)
    m = read_metadata(set_dir)
    require(m, COLUMNS, set_dir)
    csv = set_dir / "metadata.csv"
    drops = dropped_ids(SOURCE)
    gone = m["image_id"].isin(list(drops))
    dropped = [{"source": SOURCE, "image_id": i, "path": f"{SOURCE}/{f}", "reason": drops[i]}
               for i, f in zip(m.loc[gone, "image_id"], m.loc[gone, "file"])]
    m = m.loc[~gone].reset_index(drop=True)
    diagnosis, malignant = apply_labels(SOURCE, m["diagnostic"], csv)
    biopsied = to_bool(m["biopsed"])
    col = lambda c: m[c] if c in m.columns else pd.Series("", index=m.index)  # noqa: E731
    rows = pd.DataFrame({
        "path": SOURCE + "/" + m["file"],
        "modality": "smartphone",
        "image_id": m["image_id"],
        "lesion_id": "PAD_" + m["lesion_id"],
        "patient_id": m["patient_id"],
        "diagnosis": diagnosis,
        "source_label": m["diagnostic"],
        "malignant": malignant,
        "boxes": [parse_boxes(b, f"{csv}: {i}") for b, i in zip(m["boxes"], m["image_id"])],
        "width": m["width"], "height": m["height"],
        "orig_width": col("orig_width"), "orig_height": col("orig_height"),
        "age": to_float(col("age")),
        "sex": col("gender").str.lower(),
        "site": col("region").str.lower(),
        "fitzpatrick": to_float(col("fitspatrick")),
        "biopsied": biopsied,
        "dx_type": biopsied.map({True: "histo", False: "clinical"}),
        "diameter_1": to_float(col("diameter_1")), "diameter_2": to_float(col("diameter_2")),
        "background_father": col("background_father"), "background_mother": col("background_mother"),
        "near_duplicate_of": col("near_duplicate_of"),
        **{dst: to_bool(col(src)) for src, dst in BOOLS.items()},
    })
    return ReadResult(SOURCE, finalize(rows, SOURCE), dropped)
