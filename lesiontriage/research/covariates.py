"""Clinical covariates: one harmonised vocabulary for the three sets with metadata and the app's form.

HAM10000 records age, sex and site; PAD-UFES-20 adds the patient questions (itch, grew, hurt,
changed, bleed, elevation), Fitzpatrick type, diameters and history; derm7pt records sex, site
and a three-level elevation. Each value is mapped once here (e.g. every site vocabulary to seven
body regions) so a model fitted on one set and the app's form speak the same language.

``CovariateEncoder`` standardises numbers (missing -> 0 plus a missing indicator) and one-hot
encodes categories seen when fitting (unseen -> all zeros); it serialises to plain JSON so the
shipped combined model can be rebuilt from ``models/metadata.json``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

BODY_REGIONS = ("head_neck", "trunk", "upper_limb", "lower_limb", "acral", "genital", "unknown")

_SITE_TO_REGION = {
    "face": "head_neck", "scalp": "head_neck", "ear": "head_neck", "neck": "head_neck", "nose": "head_neck",
    "lip": "head_neck", "head neck": "head_neck",
    "back": "trunk", "trunk": "trunk", "abdomen": "trunk", "chest": "trunk", "buttocks": "trunk",
    "upper extremity": "upper_limb", "arm": "upper_limb", "forearm": "upper_limb", "upper limbs": "upper_limb",
    "lower extremity": "lower_limb", "thigh": "lower_limb", "lower limbs": "lower_limb", "leg": "lower_limb",
    "hand": "acral", "foot": "acral", "acral": "acral",
    "genital": "genital", "genital areas": "genital",
}

YES_NO = ("yes", "no")
PAD_QUESTIONS = ("itch", "grew", "hurt", "changed", "bleed")

#: Covariates per set for the clinical-only model (only what that set records).
SET_COVARIATES: dict[str, tuple[str, ...]] = {
    "ham10000": ("age", "sex", "region"),
    "pad_ufes20_subset": ("age", "sex", "region", "fitzpatrick", "diameter_1", "diameter_2", *PAD_QUESTIONS, "elevated",
                          "skin_cancer_history", "cancer_history", "smoke", "drink"),
    "derm7pt": ("sex", "region", "elevation3"),
}
#: What the app's form asks (a subset every clinician can answer); the shipped combined model uses these.
APP_COVARIATES: tuple[str, ...] = ("age", "sex", "region", *PAD_QUESTIONS, "elevated")
NUMERIC = {"age", "fitzpatrick", "diameter_1", "diameter_2"}


def site_to_region(site: Any) -> str:
    if site is None or (isinstance(site, float) and math.isnan(site)) or site is pd.NA:
        return "unknown"
    return _SITE_TO_REGION.get(str(site).strip().lower(), "unknown")


def _yes_no(v: Any) -> str | None:
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return None
    s = str(v).strip().lower()
    if s in ("true", "yes", "1", "1.0"):
        return "yes"
    if s in ("false", "no", "0", "0.0"):
        return "no"
    return None


def _num(v: Any) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return float("nan")
    return x


def harmonise_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """Manifest row (or the app's form, already in harmonised names) -> harmonised covariates."""
    out: dict[str, Any] = {}
    out["age"] = _num(row.get("age"))
    sex = row.get("sex")
    out["sex"] = str(sex).lower() if isinstance(sex, str) and str(sex).lower() in ("male", "female") else None
    out["region"] = row["region"] if row.get("region") in BODY_REGIONS else site_to_region(row.get("site"))
    for q in PAD_QUESTIONS:
        out[q] = _yes_no(row.get(q))
    elev3 = row.get("elevation3") or row.get("elevation")
    elev3 = str(elev3).lower() if isinstance(elev3, str) and str(elev3).lower() in ("flat", "palpable", "nodular") else None
    out["elevation3"] = elev3
    elevated = _yes_no(row.get("elevated")) or _yes_no(row.get("pad_elevation"))
    if elevated is None and elev3 is not None:
        elevated = "no" if elev3 == "flat" else "yes"
    out["elevated"] = elevated
    out["fitzpatrick"] = _num(row.get("fitzpatrick"))
    out["diameter_1"] = _num(row.get("diameter_1"))
    out["diameter_2"] = _num(row.get("diameter_2"))
    for k in ("skin_cancer_history", "cancer_history", "smoke", "drink"):
        out[k] = _yes_no(row.get(k))
    return out


def harmonise(df: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame([harmonise_row(r) for r in df.to_dict("records")], index=df.index)


@dataclass
class CovariateEncoder:
    """Standardise numeric, one-hot categorical covariates; JSON round-trip via to_dict/from_dict."""

    columns: tuple[str, ...]
    numeric_stats: dict[str, tuple[float, float]] = field(default_factory=dict)  # name -> (mean, std)
    categories: dict[str, list[str]] = field(default_factory=dict)

    def fit(self, frame: pd.DataFrame) -> "CovariateEncoder":
        for c in self.columns:
            if c in NUMERIC:
                x = pd.to_numeric(frame[c], errors="coerce").to_numpy(float)
                x = x[np.isfinite(x)]
                mean = float(x.mean()) if len(x) else 0.0
                std = float(x.std()) if len(x) > 1 and x.std() > 0 else 1.0
                self.numeric_stats[c] = (mean, std)
            else:
                seen = sorted({str(v) for v in frame[c] if v is not None and v == v})
                self.categories[c] = seen
        return self

    @property
    def feature_names(self) -> list[str]:
        names: list[str] = []
        for c in self.columns:
            if c in NUMERIC:
                names += [c, f"{c}_missing"]
            else:
                names += [f"{c}={v}" for v in self.categories[c]]
        return names

    def transform(self, frame: pd.DataFrame) -> np.ndarray:
        cols: list[np.ndarray] = []
        for c in self.columns:
            if c in NUMERIC:
                mean, std = self.numeric_stats[c]
                x = pd.to_numeric(frame[c], errors="coerce").to_numpy(float)
                miss = ~np.isfinite(x)
                cols += [np.where(miss, 0.0, (x - mean) / std), miss.astype(float)]
            else:
                vals = np.array([str(v) if v is not None and v == v else "" for v in frame[c]])
                cols += [(vals == v).astype(float) for v in self.categories[c]]
        return np.stack(cols, axis=1) if cols else np.zeros((len(frame), 0))

    def to_dict(self) -> dict[str, Any]:
        return {"columns": list(self.columns), "numeric_stats": {k: list(v) for k, v in self.numeric_stats.items()},
                "categories": self.categories}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CovariateEncoder":
        return cls(tuple(d["columns"]), {k: (float(v[0]), float(v[1])) for k, v in d["numeric_stats"].items()},
                   {k: list(v) for k, v in d["categories"].items()})


def form_to_frame(answers: Mapping[str, Any], columns: Sequence[str] = APP_COVARIATES) -> pd.DataFrame:
    """The app's optional answers (harmonised names; None = not given) as a one-row frame."""
    return harmonise(pd.DataFrame([dict(answers)] if answers else [{}]))[list(columns)]


def any_answer(answers: Mapping[str, Any]) -> bool:
    """True when at least one covariate was actually given (the combined model is used only then)."""
    for k, v in answers.items():
        if v is None or v == "" or (isinstance(v, float) and math.isnan(v)):
            continue
        if k == "region" and v == "unknown":
            continue
        return True
    return False
