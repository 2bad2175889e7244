"""Leakage checks on the real manifest (runs only where ../shared/data is present).

Reuses runs/data/manifest.parquet when it is newer than the data and the data code, else builds a
fresh one into a temporary folder once per session (~20 s).
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from lesiontriage import paths
from lesiontriage.data.manifest import REPORT_NAME, build_manifest, counts, load_manifest, manifest_hash, resolve_path

pytestmark = [pytest.mark.data, pytest.mark.skipif(not paths.data_available(), reason="shared data not present")]

DATA_CODE = Path(__file__).resolve().parent.parent / "lesiontriage" / "data"


def _fresh(manifest: Path) -> bool:
    if not manifest.is_file() or not (manifest.parent / REPORT_NAME).is_file():
        return False
    t = manifest.stat().st_mtime
    inputs = list(paths.data_root().glob("*/metadata.csv")) + list(DATA_CODE.rglob("*.py"))
    return all(p.stat().st_mtime < t for p in inputs)


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> tuple[pd.DataFrame, dict]:
    if _fresh(paths.DEFAULT_MANIFEST):
        report = json.loads((paths.DEFAULT_MANIFEST.parent / REPORT_NAME).read_text())
        return load_manifest(paths.DEFAULT_MANIFEST), report
    res = build_manifest(out_dir=tmp_path_factory.mktemp("manifest"), seed=0)
    return load_manifest(res.manifest_path), res.report


@pytest.fixture(scope="session")
def df(built) -> pd.DataFrame:
    return built[0]


@pytest.fixture(scope="session")
def report(built) -> dict:
    return built[1]


def _src(df: pd.DataFrame, name: str) -> pd.DataFrame:
    return df[df["source"] == name]


@pytest.mark.parametrize("key", ["group_id", "lesion_id", "patient_id", "pair_id"])
def test_no_key_spans_two_splits(df, key):
    sub = df[df[key].notna()]
    span = sub.groupby([sub["source"], sub[key]])["split"].nunique()
    assert (span == 1).all(), f"{key} spans splits: {span[span > 1].index[:5].tolist()}"


def test_near_duplicate_clusters_stay_in_one_split(df, report):
    split = dict(zip(df["path"], df["split"]))
    clusters = report["dedup"]["clusters"]
    assert clusters, "dedup found no clusters at all: the known copies (moles fig51~fig186) were missed"
    for c in clusters:
        assert len({split[p] for p in c["paths"]}) == 1, c["paths"]


@pytest.mark.parametrize("a,b", [
    ("moles_widefield_roujiaw/images/fig51.jpg", "moles_widefield_roujiaw/images/fig186.jpg"),
    ("moles_widefield_roujiaw/images/fig148.jpg", "moles_widefield_roujiaw/images/fig185.jpg"),
    ("pad_ufes20_subset/images/PAT_701_1321_156.jpg", "pad_ufes20_subset/images/PAT_701_4056_457.jpg"),
    ("sd198_tumour_subset/images/041524HB.jpg", "sd198_tumour_subset/images/019738HB.jpg"),
])
def test_known_duplicates_share_a_group(df, a, b):
    g = dict(zip(df["path"], df["group_id"]))
    assert g[a] == g[b]


def test_official_test_sets_stay_test(df, report):
    assert (_src(df, "isic2018_task3_test")["split"] == "test").all()
    d7 = _src(df, "derm7pt")
    assert (d7.loc[d7["source_split"] == "test", "split"] == "test").all()
    moved = {m["path"] for m in report["moved"]}
    kept = d7[~d7["path"].isin(moved)]
    assert (kept["split"] == kept["source_split"]).all()
    sd = _src(df, "sd198_tumour_subset")
    assert (sd.loc[sd["source_split"] == "val", "split"] == "test").all()
    assert not (sd.loc[(sd["source_split"] == "train") & ~sd["path"].isin(moved), "split"] == "test").any()
    ham = _src(df, "ham10000")
    assert set(ham.loc[ham["split"] == "test", "path"]) <= moved  # HAM gets test only by a listed move


def test_every_move_has_a_reason_and_matches_the_manifest(df, report):
    split = dict(zip(df["path"], df["split"]))
    for m in report["moved"]:
        assert m["reason"] and split[m["path"]] == m["to"]


def test_both_classes_where_expected(df):
    expect = {"ham10000": ("train", "val"), "pad_ufes20_subset": ("train", "val", "test"),
              "derm7pt": ("train", "val", "test"), "sd198_tumour_subset": ("train", "val", "test"),
              "isic2018_task3_test": ("test",)}
    for src, splits in expect.items():
        s = _src(df, src)
        for sp in splits:
            vals = set(s.loc[s["split"] == sp, "malignant"].dropna().astype(int))
            assert vals == {0, 1}, (src, sp, vals)


def test_pad_patient_split_fractions_and_strata(df):
    pad = _src(df, "pad_ufes20_subset")
    pats = pad.groupby("patient_id")["split"].first()
    frac = pats.value_counts(normalize=True)
    assert 0.22 <= frac["test"] <= 0.28, frac.to_dict()
    assert 0.07 <= frac["val"] <= 0.14, frac.to_dict()
    for sp in ("train", "val", "test"):
        assert set(pad.loc[pad["split"] == sp, "diagnosis"]) == set(pad["diagnosis"]), sp
    assert not pad["image_id"].isin(["PAT_759_1433_914", "PAT_759_1538_566"]).any()


def test_ham_val_fraction_and_strata(df):
    ham = _src(df, "ham10000")
    frac = (ham["split"] == "val").mean()
    assert 0.10 <= frac <= 0.15, frac
    assert set(ham.loc[ham["split"] == "val", "diagnosis"]) == set(ham["diagnosis"])


def test_moles_split_sizes(df):
    moles = _src(df, "moles_widefield_roujiaw")
    n = moles["split"].value_counts()
    assert n["test"] == 18 and n["val"] == 17 and n["train"] == len(moles) - 35
    assert moles["malignant"].isna().all() and (moles["modality"] == "widefield").all()


def test_derm7pt_pairs(df):
    d7 = _src(df, "derm7pt")
    per_case = {k: sorted(v) for k, v in d7.groupby("pair_id")["modality"].agg(list).items()}
    assert len(per_case) == 1011
    assert all(m in (["clinical", "dermoscopy"], ["dermoscopy"]) for m in per_case.values())
    assert sum(m == ["dermoscopy"] for m in per_case.values()) == 9  # the 9 cases without a clinical image


def test_report_counts_and_hash(df, report):
    c = counts(df)
    assert sum(r["images"] for r in report["counts"]) == len(df) == c["images"].sum()
    assert report["manifest_hash"] == manifest_hash(df)
    assert report["dedup"]["policy"]["justification"]
    assert {d["image_id"] for d in report["dropped"]} >= {"PAT_759_1433_914", "PAT_759_1538_566"}


def test_every_path_exists(df):
    missing = [p for p in df["path"] if not resolve_path(p).is_file()]
    assert not missing, missing[:5]
