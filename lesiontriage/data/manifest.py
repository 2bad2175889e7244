"""The unified data manifest: build it once (``lesiontriage data build``), load it everywhere.

``build_manifest`` runs every reader, finds near-duplicates, groups and splits the rows, checks
the result and writes ``manifest.parquet`` + ``data_report.json``. The manifest hash is the sha256
of a canonical CSV serialisation (rows sorted by path), so it depends on content only, never on
parquet encoding details, and models can record which data they were trained on.
"""
from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from lesiontriage import paths
from lesiontriage.data import labels
from lesiontriage.data.dedup import DedupPolicy, find_duplicates
from lesiontriage.data.schema import CORE_COLUMNS, DIAGNOSES, MODALITIES, SPLITS
from lesiontriage.data.sources import read_all
from lesiontriage.data.splits import SplitPolicy, assign_groups, assign_splits
from lesiontriage.errors import DataError

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.parquet"
REPORT_NAME = "data_report.json"
BOXES_TYPE = pa.list_(pa.list_(pa.float64()))


@dataclass
class ManifestBuild:
    """What ``build_manifest`` produced."""

    manifest: pd.DataFrame
    manifest_path: Path
    report_path: Path
    manifest_hash: str
    report: dict
    seconds: float


def resolve_path(rel: str | Path, data_root: str | Path | None = None) -> Path:
    """Absolute path of a manifest ``path`` (relative to the data root)."""
    return paths.data_root(data_root) / Path(rel)


def _canonical_csv(df: pd.DataFrame) -> bytes:
    out = df.copy()
    out["boxes"] = [json.dumps([[round(float(v), 4) for v in b] for b in bs]) for bs in out["boxes"]]
    out = out.sort_values("path", kind="stable").reset_index(drop=True)
    return out.to_csv(index=False, lineterminator="\n", na_rep="").encode()


def manifest_hash(df: pd.DataFrame) -> str:
    """sha256 of the manifest's content (rows sorted by path), stable across writes and machines."""
    return hashlib.sha256(_canonical_csv(df)).hexdigest()


def _boxes_to_lists(col) -> list[list[list[float]]]:
    return [[[float(v) for v in b] for b in bs] if bs is not None else [] for bs in col]


def write_manifest(df: pd.DataFrame, path: Path) -> None:
    """Parquet with ``boxes`` as list<list<double>> even where every box list is empty."""
    table = pa.Table.from_pandas(df.drop(columns=["boxes"]), preserve_index=False)
    boxes = pa.array(_boxes_to_lists(df["boxes"]), type=BOXES_TYPE)
    table = table.append_column("boxes", boxes).select(list(df.columns))
    # keep pandas' dtype metadata (nullable Int8 / boolean / string round-trip)
    meta = pa.Table.from_pandas(df.drop(columns=["boxes"]).head(0), preserve_index=False).schema.metadata
    table = table.replace_schema_metadata(meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)


def load_manifest(path: str | Path | None = None) -> pd.DataFrame:
    """Read a manifest written by ``build_manifest`` (default ``runs/data/manifest.parquet``)."""
    path = Path(path) if path else paths.DEFAULT_MANIFEST
    if not path.is_file():
        raise DataError(f"{path}: manifest not found; run `lesiontriage data build` first")
    try:
        df = pd.read_parquet(path)
    except Exception as exc:
        raise DataError(f"{path}: unreadable manifest ({exc.__class__.__name__}); rebuild it with `lesiontriage data build`") from exc
    missing = [c for c in CORE_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{path}: not a lesiontriage manifest (missing {', '.join(missing)}); run `lesiontriage data build`")
    df["boxes"] = _boxes_to_lists(df["boxes"])
    return df


def validate(df: pd.DataFrame) -> None:
    """Invariants every consumer relies on; DataError names the first broken one."""
    problems = []
    if df["path"].duplicated().any():
        problems.append(f"duplicate paths, e.g. {df.loc[df['path'].duplicated(), 'path'].iloc[0]}")
    for col, allowed in (("diagnosis", DIAGNOSES), ("modality", MODALITIES), ("split", SPLITS)):
        bad = ~df[col].isin(allowed)
        if bad.any():
            problems.append(f"{col} outside {allowed}: {df.loc[bad, col].astype(str).unique()[:3].tolist()}")
    span = df.groupby("group_id")["split"].nunique()
    if (span > 1).any():
        problems.append(f"group spans splits: {span.index[span > 1][0]}")
    other = df["diagnosis"] == "OTHER"
    if df.loc[other, "malignant"].notna().any() or df.loc[~other, "malignant"].isna().any():
        problems.append("malignant must be <NA> exactly for OTHER")
    if problems:
        raise DataError("manifest invalid: " + "; ".join(problems))


def counts(df: pd.DataFrame) -> pd.DataFrame:
    """Image counts by source x split x diagnosis x modality (long form)."""
    return (df.groupby(["source", "split", "diagnosis", "modality"], observed=True).size()
            .rename("images").reset_index().sort_values(["source", "split", "modality", "diagnosis"]))


def counts_table(df: pd.DataFrame):
    """rich Table: one line per source x split x modality, one column per diagnosis, plus totals."""
    from rich.table import Table

    wide = (df.groupby(["source", "split", "modality", "diagnosis"], observed=True).size()
            .unstack("diagnosis", fill_value=0))
    dx = [d for d in DIAGNOSES if d in wide.columns]
    table = Table(title=f"manifest: {len(df)} images (source x split x modality x diagnosis)")
    for name in ("source", "split", "modality"):
        table.add_column(name)
    for d in dx:
        table.add_column(d, justify="right")
    table.add_column("total", justify="right")
    table.add_column("malignant", justify="right")
    order = {s: i for i, s in enumerate(SPLITS)}
    mal = df.groupby(["source", "split", "modality"], observed=True)["malignant"].sum()
    keys = sorted(wide.index, key=lambda k: (k[0], order.get(k[1], 9), k[2]))
    for k in keys:
        row = wide.loc[k]
        table.add_row(*map(str, k), *[str(int(row[d])) if row[d] else "." for d in dx], str(int(row.sum())), str(int(mal.get(k, 0))))
    totals = df.groupby("split", observed=True).size()
    for s in SPLITS:
        if s in totals:
            sub = df[df["split"] == s]
            table.add_row("[b]all[/b]", s, "", *[str(int((sub["diagnosis"] == d).sum())) for d in dx], str(int(totals[s])),
                          str(int(sub["malignant"].sum())))
    return table


def _summaries(df: pd.DataFrame) -> dict:
    out = {}
    for src, g in df.groupby("source", observed=True):
        s = {"images": int(len(g)), "groups": int(g["group_id"].nunique()),
             "by_split": {k: int(v) for k, v in g["split"].value_counts().items()}}
        if g["patient_id"].notna().any():
            s["patients_by_split"] = {k: int(v) for k, v in g.groupby("split")["patient_id"].nunique().items()}
        if g["lesion_id"].notna().any():
            s["lesions_by_split"] = {k: int(v) for k, v in g.groupby("split")["lesion_id"].nunique().items()}
        s["malignant_by_split"] = {k: int(v) for k, v in g.groupby("split")["malignant"].sum().items()}
        s["boxes"] = int(sum(len(b) for b in g["boxes"]))
        out[str(src)] = s
    return out


def _describe_cluster(paths_: list[str], df: pd.DataFrame) -> dict:
    """A near-duplicate cluster for the report: its members, split, and whether ids already linked them."""
    rows = df[df["path"].isin(paths_)]
    lesions = rows["lesion_id"].dropna().unique()
    return {"paths": paths_, "sources": sorted(rows["source"].astype(str).unique()),
            "split": sorted(rows["split"].astype(str).unique()), "group_id": sorted(rows["group_id"].astype(str).unique()),
            "diagnoses": sorted(rows["diagnosis"].astype(str).unique()),
            "already_linked_by_ids": bool(len(lesions) == 1 and rows["lesion_id"].notna().all()),
            "distinct_lesion_ids": int(len(lesions))}


def build_manifest(data_root: str | Path | None = None, out_dir: str | Path = Path("runs/data"), seed: int = 0,
                   report_copy: str | Path | None = None, dedup_policy: DedupPolicy = DedupPolicy()) -> ManifestBuild:
    """Read every set under the data root, unify, dedup, split, validate, and write manifest + report."""
    t0 = time.perf_counter()
    root = paths.data_root(data_root)
    out_dir = Path(out_dir)
    results = read_all(root)
    df = pd.concat([r.rows for r in results], ignore_index=True)
    if df.empty:
        raise DataError(f"{root}: the data sets hold no readable images")
    dropped = [d for r in results for d in r.dropped]
    log.info("read %d images from %d sets (%d dropped)", len(df), len(results), len(dropped))

    dedup = find_duplicates(df["path"].tolist(), root, df["source"].astype(str).tolist(), cache_dir=out_dir,
                            policy=dedup_policy)
    if dedup.unreadable:
        bad = df["path"].isin(list(dedup.unreadable))
        dropped += [{"source": s, "image_id": i, "path": p, "reason": dedup.unreadable[p]}
                    for s, i, p in zip(df.loc[bad, "source"], df.loc[bad, "image_id"], df.loc[bad, "path"])]
        df = df.loc[~bad].reset_index(drop=True)
    df["group_id"] = assign_groups(df, zip(dedup.pairs["path_a"], dedup.pairs["path_b"]))
    policy = SplitPolicy(seed=seed)
    df["split"], moves = assign_splits(df, policy)
    df = df.sort_values(["source", "path"], kind="stable").reset_index(drop=True)
    validate(df)

    manifest_path = out_dir / MANIFEST_NAME
    write_manifest(df, manifest_path)
    digest = manifest_hash(df)
    report = {
        "what": "lesiontriage data manifest report (research use only; not a medical device)",
        "data_root": str(root),
        "seed": seed,
        "command": " ".join(["lesiontriage", *sys.argv[1:]]) if Path(sys.argv[0]).name == "lesiontriage" else
                   f"build_manifest(data_root={str(root)!r}, out_dir={str(out_dir)!r}, seed={seed})",
        "manifest_path": str(manifest_path),
        "manifest_hash": digest,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "images": int(len(df)),
        "columns": list(df.columns),
        "counts": counts(df).to_dict(orient="records"),
        "per_source": _summaries(df),
        "label_decisions": labels.report_entries(),
        "split_policy": policy.as_dict(),
        "dropped": dropped,
        "moved": moves,
        "moved_note": ("rows whose split differs from their own source's policy because their group holds an image "
                       "with a more restrictive official split (test > val > train) or of another set"
                       + ("" if moves else "; none this build: no group mixed official splits or sets")),
        "dedup": {
            "policy": dedup_policy.as_dict(),
            "stats": dedup.stats,
            "pairs": dedup.pairs.to_dict(orient="records"),
            "clusters": [_describe_cluster(c, df) for c in dedup.clusters],
        },
        "build_seconds": round(time.perf_counter() - t0, 1),
    }
    report_path = out_dir / REPORT_NAME
    text = json.dumps(report, indent=1, default=str)
    report_path.write_text(text)
    if report_copy:
        Path(report_copy).parent.mkdir(parents=True, exist_ok=True)
        Path(report_copy).write_text(text)
    log.info("manifest %s: %d rows, sha256 %s", manifest_path, len(df), digest[:12])
    return ManifestBuild(df, manifest_path, report_path, digest, report, time.perf_counter() - t0)
