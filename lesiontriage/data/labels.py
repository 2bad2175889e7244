"""Every label decision of the manifest, written once, with its reason.

The readers look labels up here instead of hard-coding them, and ``data_report.json`` lists these
tables verbatim, so the report and the code can never disagree. ``malignant`` always follows from
the unified code (:func:`lesiontriage.data.schema.is_malignant`): MEL/BCC/AKIEC -> 1, other
tumours -> 0, OTHER -> <NA>.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from lesiontriage.data.schema import DIAGNOSES, is_malignant


@dataclass(frozen=True)
class LabelDecision:
    """One source label -> one unified code, and why."""

    source: str
    source_label: str
    diagnosis: str
    reason: str

    @property
    def malignant(self) -> int | None:
        return is_malignant(self.diagnosis)

    def as_dict(self) -> dict:
        return {**asdict(self), "malignant": self.malignant}


@dataclass(frozen=True)
class DropDecision:
    """An image left out of the manifest on purpose."""

    source: str
    image_id: str
    reason: str


@dataclass(frozen=True)
class PolicyNote:
    """A decision that is not a label mapping (modality, pairing, split policy ...)."""

    source: str
    topic: str
    decision: str
    reason: str


def _table(source: str, rows: list[tuple[str, str, str]]) -> dict[str, LabelDecision]:
    out = {}
    for label, code, reason in rows:
        assert code in DIAGNOSES, code
        out[label] = LabelDecision(source, label, code, reason)
    return out


_DIRECT = "same code in the unified vocabulary (DESIGN.md section 6)"

HAM10000 = _table("ham10000", [
    ("mel", "MEL", _DIRECT), ("nv", "NV", _DIRECT), ("bcc", "BCC", _DIRECT),
    ("akiec", "AKIEC", _DIRECT + "; actinic keratosis / Bowen's disease, counted malignant as in the seeds"),
    ("bkl", "BKL", _DIRECT), ("df", "DF", _DIRECT), ("vasc", "VASC", _DIRECT),
])

ISIC2018_TEST = _table("isic2018_task3_test", [(c, c, _DIRECT) for c in ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")])

_NEVUS = "a melanocytic naevus subtype: benign naevus"
_MEL = "every melanoma variant (in situ, any thickness, metastasis) is melanoma"
DERM7PT = _table("derm7pt", [
    ("melanoma", "MEL", _MEL),
    ("melanoma (in situ)", "MEL", _MEL),
    ("melanoma (less than 0.76 mm)", "MEL", _MEL),
    ("melanoma (0.76 to 1.5 mm)", "MEL", _MEL),
    ("melanoma (more than 1.5 mm)", "MEL", _MEL),
    ("melanoma metastasis", "MEL", _MEL + "; a cutaneous metastasis is still a melanoma to refer"),
    ("basal cell carcinoma", "BCC", _DIRECT),
    ("seborrheic keratosis", "BKL", "benign keratosis group (ISIC BKL includes seborrhoeic keratosis)"),
    ("lentigo", "BKL", "ISIC BKL includes solar lentigo / lentigo simplex"),
    ("melanosis", "BKL",
     "melanosis (a flat benign pigmented macule, e.g. mucosal/labial melanosis) is not melanocytic proliferation; "
     "its clinical and dermoscopic look and benign course match the lentigo-like members of ISIC BKL, "
     "so BKL (benign, malignant=0) rather than OTHER, which would discard 16 useful benign pigmented cases"),
    ("miscellaneous", "OTHER",
     "the release does not say what the 8 'miscellaneous' cases are; their malignancy is unknown, "
     "so OTHER with malignant=<NA> (kept for detection/modality, never for malignancy metrics)"),
    ("dermatofibroma", "DF", _DIRECT),
    ("vascular lesion", "VASC", _DIRECT),
    ("clark nevus", "NV", _NEVUS), ("reed or spitz nevus", "NV", _NEVUS + " (Reed/Spitz, benign by definition here)"),
    ("dermal nevus", "NV", _NEVUS), ("blue nevus", "NV", _NEVUS), ("congenital nevus", "NV", _NEVUS),
    ("combined nevus", "NV", _NEVUS), ("recurrent nevus", "NV", _NEVUS),
])

PAD_UFES20 = _table("pad_ufes20_subset", [
    ("BCC", "BCC", _DIRECT),
    ("MEL", "MEL", _DIRECT),
    ("NEV", "NV", "naevus (melanocytic, benign)"),
    ("SEK", "BKL", "seborrhoeic keratosis belongs to the benign keratosis group"),
    ("ACK", "AKIEC", "actinic keratosis: the seeds' malignant group includes actinic keratosis / Bowen / SCC (data README)"),
    ("SCC", "AKIEC", "squamous cell carcinoma: AKIEC includes SCC and Bowen's disease (DESIGN.md section 6)"),
])

SD198 = _table("sd198_tumour_subset", [
    ("Malignant_Melanoma", "MEL", _MEL),
    ("Lentigo_Maligna_Melanoma", "MEL", _MEL),
    ("Basal_Cell_Carcinoma", "BCC", _DIRECT),
    ("Actinic_Keratosis", "AKIEC", "actinic keratosis is part of AKIEC"),
    ("Angioma", "VASC", "vascular tumour"),
    ("Pyogenic_Granuloma", "VASC", "vascular tumour (lobular capillary haemangioma), benign"),
    ("Dermatofibroma", "DF", _DIRECT),
    ("Nevus_Spilus", "NV", "speckled lentiginous naevus: a melanocytic naevus"),
    ("Keloid", "OB",
     "a benign fibrous overgrowth of scar: a benign tumour-like lesion outside the 7 ISIC classes -> OB, malignant=0"),
    ("Cutaneous_Horn", "OTHER",
     "a clinical morphology, not a diagnosis: the base can be seborrhoeic keratosis, wart, actinic keratosis or SCC "
     "(the set's own grouping calls it indeterminate), so malignancy is unknown -> OTHER, malignant=<NA>"),
])

MOLES = _table("moles_widefield_roujiaw", [
    ("mole", "OTHER",
     "boxed 'mole' with no diagnosis or biopsy: presumed-benign but unverified, so it must not count as a benign "
     "label in malignancy metrics -> OTHER with malignant=<NA>; source_label keeps 'mole' and the boxes train the detector"),
])

LABEL_MAPS: dict[str, dict[str, LabelDecision]] = {
    "ham10000": HAM10000,
    "isic2018_task3_test": ISIC2018_TEST,
    "derm7pt": DERM7PT,
    "pad_ufes20_subset": PAD_UFES20,
    "sd198_tumour_subset": SD198,
    "moles_widefield_roujiaw": MOLES,
}

DROPS: tuple[DropDecision, ...] = (
    DropDecision("pad_ufes20_subset", "PAT_759_1433_914",
                 "same photo as PAT_759_1538_566 but filed as NEV (BACK) vs BCC (NOSE): conflicting label, drop both"),
    DropDecision("pad_ufes20_subset", "PAT_759_1538_566",
                 "same photo as PAT_759_1433_914 but filed as BCC (NOSE) vs NEV (BACK): conflicting label, drop both"),
)

POLICIES: tuple[PolicyNote, ...] = (
    PolicyNote("derm7pt", "pairing",
               "two rows per case: the dermoscopic image (modality dermoscopy) and the clinical image (modality clinical), "
               "linked by pair_id = derm7pt case_num; both rows share one group_id",
               "they show the same lesion and must stay in one split; the pairing lets a model use both views"),
    PolicyNote("derm7pt", "missing clinical image",
               "in the 9 cases where clinic_file == derm_file only the dermoscopy row is written",
               "the 'clinical' file is the dermoscopic image (release notes say clinical missing), so a clinical row would mislabel its modality"),
    PolicyNote("ham10000", "biopsied", "biopsied = (dx_type == 'histo')",
               "only histopathology is a biopsy; follow_up / consensus / confocal are not"),
    PolicyNote("pad_ufes20_subset", "biopsied", "biopsied = biopsed column; dx_type = 'histo' if biopsed else 'clinical'",
               "non-biopsied PAD labels are clinical diagnoses; metrics are also reported on the biopsied subset"),
    PolicyNote("pad_ufes20_subset", "fitzpatrick", "fitspatrick 1.0..6.0 -> fitzpatrick Int8 1..6; blank -> <NA>",
               "the only skin-type labels in the data"),
    PolicyNote("moles_widefield_roujiaw", "modality", "modality widefield, diagnosis OTHER, malignant <NA>, source_label 'mole'",
               "wide-field photos of several unbiopsied moles: a detector set, not a malignancy set"),
    PolicyNote("sd198_tumour_subset", "split", "source 'val' -> test (our SD-198 evaluation split, 'SD-198 val' in issue 12); "
               "source 'train' -> train / val (~15% val, stratified)", "the only clinical-photo set with malignant classes needs a held-out test"),
)


def decide(source: str, label: str) -> LabelDecision:
    """The decision for one source label; KeyError names the unmapped label (a new label needs a decision)."""
    try:
        return LABEL_MAPS[source][label]
    except KeyError:
        raise KeyError(f"{source}: no label decision for {label!r}; add one to lesiontriage/data/labels.py") from None


def dropped_ids(source: str) -> dict[str, str]:
    """image_id -> reason for the images of ``source`` dropped on purpose."""
    return {d.image_id: d.reason for d in DROPS if d.source == source}


def report_entries() -> dict:
    """All decisions as plain data for data_report.json."""
    return {
        "label_maps": {src: [d.as_dict() for d in table.values()] for src, table in LABEL_MAPS.items()},
        "drops": [asdict(d) for d in DROPS],
        "policies": [asdict(p) for p in POLICIES],
    }
