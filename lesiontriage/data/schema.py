"""The unified manifest schema and label vocabulary (DESIGN.md section 6).

A manifest row is one stored image. ``path`` is relative to the data root (e.g.
``ham10000/images/ISIC_0027419.jpg``) so the manifest is portable between machines; resolve it
with :func:`lesiontriage.data.manifest.resolve_path`. ``boxes`` is a list of [x1, y1, x2, y2] in
stored-image pixels (empty list when the source has none). ``malignant`` is a nullable integer:
1, 0 or <NA> for OTHER / unknown. ``group_id`` ties together everything that must stay in one
split (same lesion, same patient, derm7pt case, near-duplicate photos).
"""
from __future__ import annotations

DIAGNOSES: tuple[str, ...] = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC", "OB", "OTHER")
SUBTYPES: tuple[str, ...] = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC", "OB")
MALIGNANT_CODES: frozenset[str] = frozenset({"MEL", "BCC", "AKIEC"})
MODALITIES: tuple[str, ...] = ("dermoscopy", "clinical", "smartphone", "widefield", "synthetic_widefield")
SPLITS: tuple[str, ...] = ("train", "val", "test")

# Columns every reader must produce (metadata columns may be added freely; missing -> NA).
CORE_COLUMNS: tuple[str, ...] = (
    "path", "source", "modality", "image_id", "lesion_id", "patient_id", "group_id",
    "diagnosis", "source_label", "malignant", "boxes", "width", "height", "split",
)
# Shared metadata columns (normalised names across sets; NA where the set lacks them).
META_COLUMNS: tuple[str, ...] = (
    "age", "sex", "site", "fitzpatrick", "biopsied", "dx_type", "management", "elevation",
    "pair_id", "seven_point_score", "pigment_network", "streaks", "pigmentation",
    "regression_structures", "dots_and_globules", "blue_whitish_veil", "vascular_structures",
    "itch", "grew", "hurt", "changed", "bleed", "pad_elevation", "diameter_1", "diameter_2",
    "smoke", "drink", "pesticide", "skin_cancer_history", "cancer_history",
    "background_father", "background_mother", "has_piped_water", "has_sewage_system",
)


def is_malignant(code: str) -> int | None:
    """1 for MEL/BCC/AKIEC, 0 for other tumours, None for OTHER (out of scope)."""
    if code == "OTHER":
        return None
    return 1 if code in MALIGNANT_CODES else 0
