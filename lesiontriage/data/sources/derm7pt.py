"""derm7pt: one dermoscopic and one clinical image per case -> two rows linked by ``pair_id``.

In the 9 cases whose clinical image is missing (``clinic_file == derm_file``) only the
dermoscopy row is written (see labels.POLICIES). The official split is kept as ``source_split``.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from lesiontriage.data.sources import ReadResult, apply_labels, finalize, read_metadata, require

SOURCE = "derm7pt"
CRITERIA = ("pigment_network", "streaks", "pigmentation", "regression_structures", "dots_and_globules",
            "blue_whitish_veil", "vascular_structures")
COLUMNS = ("file", "image_id", "case_num", "diagnosis", "seven_point_score", *CRITERIA, "elevation", "location",
           "sex", "management", "split", "clinic_file", "derm_file", "width", "height", "clinic_width", "clinic_height")
SPLITS = {"train": "train", "valid": "val", "test": "test"}


def read(set_dir: Path) -> ReadResult:
    set_dir = Path(set_dir)
    m = read_metadata(set_dir)
    require(m, COLUMNS, set_dir)
    csv = set_dir / "metadata.csv"
    diagnosis, malignant = apply_labels(SOURCE, m["diagnosis"], csv)
    case = "derm7pt_" + m["case_num"].astype(str)
    common = {
        "lesion_id": case, "pair_id": case, "patient_id": "",
        "diagnosis": diagnosis, "source_label": m["diagnosis"], "malignant": malignant,
        "sex": m["sex"].str.lower(), "site": m["location"].str.lower(),
        "management": m["management"], "elevation": m["elevation"],
        "seven_point_score": m["seven_point_score"],
        "diagnostic_difficulty": m["level_of_diagnostic_difficulty"] if "level_of_diagnostic_difficulty" in m else "",
        "source_split": m["split"].map(SPLITS).fillna(""),
        **{c: m[c] for c in CRITERIA},
    }
    derm = pd.DataFrame({**common, "path": SOURCE + "/" + m["derm_file"], "modality": "dermoscopy",
                         "image_id": m["derm_file"].map(lambda f: Path(f).stem),
                         "width": m["width"], "height": m["height"]})
    has_clinic = (m["clinic_file"] != m["derm_file"]) & (m["clinic_file"] != "")
    clin = pd.DataFrame({**common, "path": SOURCE + "/" + m["clinic_file"], "modality": "clinical",
                         "image_id": m["clinic_file"].map(lambda f: Path(f).stem),
                         "width": m["clinic_width"], "height": m["clinic_height"]})[has_clinic]
    rows = pd.concat([derm, clin], ignore_index=True)
    rows["boxes"] = [[] for _ in range(len(rows))]
    rows = rows.sort_values(["lesion_id", "modality"], kind="stable", key=lambda s: s if s.name == "modality" else s.str[8:].astype(int))
    return ReadResult(SOURCE, finalize(rows, SOURCE))
