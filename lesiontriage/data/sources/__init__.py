"""One reader per shared data set; each turns its ``metadata.csv`` into unified manifest rows.

A reader gets the set folder and returns a :class:`ReadResult`: rows with the manifest columns of
:mod:`lesiontriage.data.schema` (``split`` holds the *source's* split or NA; the final split is
decided later by :mod:`lesiontriage.data.splits`) and the images it dropped, each with a reason.
Label mapping lives in :mod:`lesiontriage.data.labels`, never in a reader.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from lesiontriage.data.labels import decide
from lesiontriage.data.schema import CORE_COLUMNS, META_COLUMNS
from lesiontriage.errors import DataError

log = logging.getLogger(__name__)

# Column dtypes after normalisation (anything not listed is a nullable string).
INT8_COLUMNS = ("malignant", "fitzpatrick", "seven_point_score")
INT_COLUMNS = ("width", "height")
FLOAT_COLUMNS = ("age", "diameter_1", "diameter_2")
BOOL_COLUMNS = ("biopsied", "itch", "grew", "hurt", "changed", "bleed", "pad_elevation", "smoke", "drink",
                "pesticide", "skin_cancer_history", "cancer_history", "has_piped_water", "has_sewage_system")
OBJECT_COLUMNS = ("boxes",)
# Extra columns some readers add (kept in the manifest, NA elsewhere).
EXTRA_COLUMNS = ("source_split", "near_duplicate_of", "diagnostic_difficulty", "orig_width", "orig_height")


@dataclass
class ReadResult:
    """Rows of one set plus the images left out, each with its reason."""

    source: str
    rows: pd.DataFrame
    dropped: list[dict] = field(default_factory=list)


def read_metadata(set_dir: Path) -> pd.DataFrame:
    """metadata.csv as strings (blank -> ''), so no value is silently re-typed; DataError when missing/broken."""
    csv = Path(set_dir) / "metadata.csv"
    if not csv.is_file():
        raise DataError(f"{csv}: missing (expected one metadata.csv per data set)")
    try:
        df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    except Exception as exc:  # pandas raises several types for malformed CSV
        raise DataError(f"{csv}: unreadable CSV ({exc.__class__.__name__}: {exc})") from exc
    if "file" not in df.columns or "image_id" not in df.columns:
        raise DataError(f"{csv}: needs columns 'file' and 'image_id'")
    return df


def require(df: pd.DataFrame, columns: tuple[str, ...] | list[str], where: Path) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(f"{where / 'metadata.csv'}: missing column(s) {', '.join(missing)}")


def parse_boxes(text: str, where: str = "") -> list[list[float]]:
    """JSON ``[[x1,y1,x2,y2], ...]`` -> list of float lists; '' -> []. Bad text -> DataError naming the row."""
    text = (text or "").strip()
    if not text:
        return []
    try:
        boxes = json.loads(text)
        out = [[float(v) for v in b] for b in boxes]
    except (ValueError, TypeError) as exc:
        raise DataError(f"{where}: unparsable boxes {text[:60]!r}") from exc
    if any(len(b) != 4 for b in out):
        raise DataError(f"{where}: every box needs 4 numbers [x1, y1, x2, y2]")
    return out


def to_bool(series: pd.Series) -> pd.Series:
    """'True'/'False' (any case) -> nullable boolean; '', 'UNK', anything else -> <NA>."""
    s = series.astype(str).str.strip().str.lower()
    return s.map({"true": True, "false": False}).astype("boolean")


def to_float(series: pd.Series) -> pd.Series:
    return pd.to_numeric(series.replace("", np.nan), errors="coerce").astype("float64")


def blank_to_na(series: pd.Series) -> pd.Series:
    s = series.astype("string").str.strip()
    return s.mask(s == "", pd.NA)


def apply_labels(source: str, labels: pd.Series, csv: Path) -> tuple[pd.Series, pd.Series]:
    """(diagnosis, malignant) for each source label through labels.decide; unknown label -> DataError."""
    table = {}
    for lab in labels.unique():
        try:
            table[lab] = decide(source, lab)
        except KeyError as exc:
            raise DataError(f"{csv}: {exc.args[0]}") from None
    diagnosis = labels.map(lambda v: table[v].diagnosis)
    malignant = labels.map(lambda v: table[v].malignant).astype("Int8")
    return diagnosis, malignant


def finalize(df: pd.DataFrame, source: str) -> pd.DataFrame:
    """Add every schema column (NA where absent) with one dtype per column, core columns first."""
    cols = list(CORE_COLUMNS) + [c for c in META_COLUMNS if c not in CORE_COLUMNS] + list(EXTRA_COLUMNS)
    out = pd.DataFrame(index=df.index)
    for c in cols:
        v = df[c] if c in df.columns else pd.Series(pd.NA, index=df.index)
        if c in INT8_COLUMNS:
            out[c] = pd.to_numeric(v, errors="coerce").astype("Int8")
        elif c in INT_COLUMNS + ("orig_width", "orig_height"):
            out[c] = pd.to_numeric(v, errors="coerce").astype("Int64")
        elif c in FLOAT_COLUMNS:
            out[c] = pd.to_numeric(v, errors="coerce").astype("float64")
        elif c in BOOL_COLUMNS:
            out[c] = v.astype("boolean") if v.dtype == "boolean" else pd.Series(v, dtype="object").astype("boolean")
        elif c in OBJECT_COLUMNS:
            out[c] = v if v.dtype == object else pd.Series([[] for _ in range(len(df))], index=df.index, dtype=object)
        else:
            out[c] = blank_to_na(v.astype("object").where(pd.notna(v), ""))
    out["source"] = source
    out["source"] = out["source"].astype("string")
    return out.reset_index(drop=True)


def check_files(rows: pd.DataFrame, data_root: Path, source: str) -> tuple[pd.DataFrame, list[dict]]:
    """Drop rows whose image file is absent (listed with a reason) rather than crash later in training."""
    exists = np.array([(data_root / p).is_file() for p in rows["path"]], dtype=bool)
    dropped = [{"source": source, "image_id": i, "path": p, "reason": "image file missing on disk"}
               for i, p in zip(rows.loc[~exists, "image_id"], rows.loc[~exists, "path"])]
    for d in dropped:
        log.warning("%s: %s", d["path"], d["reason"])
    return rows.loc[exists].reset_index(drop=True), dropped


def _readers() -> dict[str, Callable[[Path], ReadResult]]:
    from lesiontriage.data.sources import derm7pt, ham10000, isic2018, moles, pad_ufes20, sd198

    return {
        "ham10000": ham10000.read,
        "isic2018_task3_test": isic2018.read,
        "derm7pt": derm7pt.read,
        "pad_ufes20_subset": pad_ufes20.read,
        "sd198_tumour_subset": sd198.read,
        "moles_widefield_roujiaw": moles.read,
    }


def reader_names() -> tuple[str, ...]:
    return tuple(_readers())


def read_all(data_root: Path, require_all: bool = False) -> list[ReadResult]:
    """Run every reader whose set folder exists under ``data_root`` (all six when ``require_all``)."""
    data_root = Path(data_root)
    if not data_root.is_dir():
        raise DataError(f"{data_root}: data root not found (pass --data-root or set LESIONTRIAGE_DATA)")
    results = []
    for name, reader in _readers().items():
        set_dir = data_root / name
        if not (set_dir / "metadata.csv").is_file():
            if require_all:
                raise DataError(f"{set_dir}: data set missing")
            log.warning("%s: data set absent, skipped", set_dir)
            continue
        res = reader(set_dir)
        rows, missing = check_files(res.rows, data_root, name)
        res.rows = rows
        res.dropped.extend(missing)
        results.append(res)
    if not results:
        raise DataError(f"{data_root}: no data set found (expected folders like ham10000/ with metadata.csv)")
    return results
