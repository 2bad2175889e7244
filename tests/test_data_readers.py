"""Readers, label decisions, dedup and splits on tiny generated data sets (no shared data needed).

Each fake set mimics its source's metadata.csv columns and value spellings, with generated images.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lesiontriage.data import labels
from lesiontriage.data.dedup import UnionFind, close_pairs, find_duplicates
from lesiontriage.data.manifest import build_manifest, load_manifest, manifest_hash, resolve_path
from lesiontriage.data.schema import CORE_COLUMNS, DIAGNOSES, META_COLUMNS
from lesiontriage.data.sources import derm7pt, ham10000, isic2018, moles, pad_ufes20, read_all, sd198
from lesiontriage.data.splits import SplitPolicy, assign_groups, assign_splits, pick_groups
from lesiontriage.errors import DataError


# ---- fixture builders ---------------------------------------------------------------------------
def _img(path: Path, seed: int, size=(64, 48), array: np.ndarray | None = None) -> np.ndarray:
    """A distinct random-blob image (smoothed noise so hashes differ between seeds)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if array is None:
        rng = np.random.default_rng(seed)
        small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        array = np.asarray(Image.fromarray(small).resize(size, Image.BICUBIC))
    Image.fromarray(array).save(path, quality=92)
    return array


def _write(set_dir: Path, rows: list[dict]) -> None:
    pd.DataFrame(rows).to_csv(set_dir / "metadata.csv", index=False)


def make_ham(root: Path, seed0: int = 0) -> Path:
    d = root / "ham10000"
    spec = [("HAM_1", "mel", "histo"), ("HAM_1", "mel", "histo"), ("HAM_2", "nv", "follow_up"), ("HAM_3", "bkl", "consensus"),
            ("HAM_4", "akiec", "histo"), ("HAM_5", "df", "confocal"), ("HAM_6", "vasc", "histo"), ("HAM_7", "bcc", "histo")]
    spec += [(f"HAM_{10 + k}", "nv", "follow_up") for k in range(12)]
    rows = []
    for k, (lesion, dx, dxt) in enumerate(spec):
        iid = f"ISIC_{1000 + k:07d}"
        _img(d / "images" / f"{iid}.jpg", seed0 + k, (200, 150))
        rows.append({"file": f"images/{iid}.jpg", "image_id": iid, "lesion_id": lesion, "dx": dx, "dx_type": dxt,
                     "age": "" if k == 3 else "55.0", "sex": "unknown" if k == 2 else "male", "localization": "back",
                     "width": 200, "height": 150, "orig_width": 200, "orig_height": 150, "mask_width": 600,
                     "mask_height": 450, "boxes": json.dumps([[10, 20, 150 - k, 140]])})
    _write(d, rows)
    return d


def make_isic(root: Path, seed0: int = 100, with_diagnosis: bool = True) -> Path:
    d = root / "isic2018_task3_test"
    classes = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    rows = []
    for k, c in enumerate(classes):
        iid = f"ISIC_{34524 + k:07d}"
        _img(d / "images" / f"{iid}.jpg", seed0 + k, (224, 224))
        row = {"file": f"images/{iid}.jpg", "image_id": iid, "image": iid, **{x: float(x == c) for x in classes},
               "split": "test", "width": 224, "height": 224, "orig_width": 224, "orig_height": 224, "boxes": ""}
        if with_diagnosis:
            row["diagnosis"] = c
        rows.append(row)
    _write(d, rows)
    return d


DERM7PT_CASES = [  # (diagnosis, split, clinical image missing?)
    ("basal cell carcinoma", "train", False), ("melanosis", "valid", False), ("miscellaneous", "test", False),
    ("melanoma metastasis", "test", True), ("clark nevus", "train", False), ("reed or spitz nevus", "valid", False),
    ("melanoma (in situ)", "train", False), ("seborrheic keratosis", "test", False),
]


def make_derm7pt(root: Path, seed0: int = 200) -> Path:
    d = root / "derm7pt"
    rows = []
    for k, (dx, split, missing) in enumerate(DERM7PT_CASES):
        derm, clin = f"Dcase{k:03d}", f"Ccase{k:03d}"
        _img(d / "images" / f"{derm}.jpg", seed0 + 2 * k, (96, 64))
        if not missing:
            _img(d / "images" / f"{clin}.jpg", seed0 + 2 * k + 1, (96, 64))
        clinic_file = f"images/{derm}.jpg" if missing else f"images/{clin}.jpg"
        rows.append({"file": f"images/{derm}.jpg", "image_id": derm, "case_num": k + 1, "diagnosis": dx,
                     "seven_point_score": k % 4, "pigment_network": "typical", "streaks": "absent",
                     "pigmentation": "absent", "regression_structures": "absent", "dots_and_globules": "regular",
                     "blue_whitish_veil": "absent", "vascular_structures": "absent",
                     "level_of_diagnostic_difficulty": "low", "elevation": "flat", "location": "back", "sex": "female",
                     "management": "excision", "clinic": f"X/{clin}.jpg", "derm": f"X/{derm}.jpg", "case_id": "",
                     "notes": "Clinical missing and replaced with derm" if missing else "", "split": split,
                     "clinic_file": clinic_file, "derm_file": f"images/{derm}.jpg", "width": 96, "height": 64,
                     "orig_width": 768, "orig_height": 512, "clinic_width": 96, "clinic_height": 64,
                     "clinic_orig_width": 768, "clinic_orig_height": 512, "boxes": ""})
    _write(d, rows)
    return d


PAD_ROWS = [  # (image_id, patient, lesion, diagnostic, biopsed, fitspatrick, itch)
    ("PAT_1_1_1", "PAT_1", "1", "ACK", "False", "2.0", "True"),
    ("PAT_1_2_2", "PAT_1", "2", "SCC", "True", "2.0", "UNK"),
    ("PAT_2_3_3", "PAT_2", "3", "SEK", "False", "", "False"),
    ("PAT_3_4_4", "PAT_3", "4", "NEV", "True", "6.0", "False"),
    ("PAT_4_5_5", "PAT_4", "5", "MEL", "True", "1.0", "True"),
    ("PAT_5_6_6", "PAT_5", "6", "BCC", "True", "3.0", "True"),
    ("PAT_759_1433_914", "PAT_759", "1433", "NEV", "False", "", "False"),
    ("PAT_759_1538_566", "PAT_759", "1538", "BCC", "True", "", "False"),
]


def make_pad(root: Path, seed0: int = 300) -> Path:
    d = root / "pad_ufes20_subset"
    rows = []
    for k, (iid, pat, les, dx, bio, fitz, itch) in enumerate(PAD_ROWS):
        _img(d / "images" / f"{iid}.jpg", seed0 + k, (120, 120))
        rows.append({"file": f"images/{iid}.jpg", "image_id": iid, "patient_id": pat, "lesion_id": les, "smoke": "False",
                     "drink": "", "background_father": "POMERANIA", "background_mother": "", "age": "63",
                     "pesticide": "True", "gender": "FEMALE" if k % 2 else "", "skin_cancer_history": "True",
                     "cancer_history": "", "has_piped_water": "True", "has_sewage_system": "False",
                     "fitspatrick": fitz, "region": "FACE", "diameter_1": "7.0", "diameter_2": "", "diagnostic": dx,
                     "itch": itch, "grew": "UNK", "hurt": "False", "changed": "False", "bleed": "True",
                     "elevation": "True", "img_id": f"{iid}.png", "biopsed": bio, "width": 120, "height": 120,
                     "orig_width": 300, "orig_height": 300, "boxes": json.dumps([[10.0, 12.0, 80.0, 90.0]]),
                     "source_path": "x", "mask_source_path": "y", "mask_note": "", "n_versions_in_history": 1,
                     "version_sizes": "300x300", "near_duplicate_of": ""})
    _write(d, rows)
    return d


SD198_LABELS = ["Actinic_Keratosis", "Angioma", "Basal_Cell_Carcinoma", "Cutaneous_Horn", "Dermatofibroma", "Keloid",
                "Lentigo_Maligna_Melanoma", "Malignant_Melanoma", "Nevus_Spilus", "Pyogenic_Granuloma"]


def make_sd198(root: Path, seed0: int = 400) -> Path:
    d = root / "sd198_tumour_subset"
    rows = []
    for k, lab in enumerate(SD198_LABELS * 2):
        iid = f"{k:06d}HB"
        _img(d / "images" / f"{iid}.jpg", seed0 + k, (224, 224))
        rows.append({"file": f"images/{iid}.jpg", "image_id": iid, "label": lab, "malignancy_group": "x",
                     "source_path": "p", "width": 224, "height": 224, "orig_width": 224, "orig_height": 224,
                     "boxes": "", "box_labels": "", "split": "val" if k >= 10 else "train", "md5_original": "m",
                     "near_duplicate_of": ""})
    _write(d, rows)
    return d


def make_moles(root: Path, seed0: int = 500) -> Path:
    d = root / "moles_widefield_roujiaw"
    rows = []
    dup = None
    for k in range(6):
        iid = f"fig{k + 1}"
        arr = _img(d / "images" / f"{iid}.jpg", seed0 + k, (160, 128), array=dup if k == 5 else None)
        if k == 0:
            dup = arr  # fig6 is a copy of fig1: the dedup must put them in one group
        rows.append({"file": f"images/{iid}.jpg", "image_id": iid, "label": "mole", "source_path": "s", "n_boxes": 2,
                     "width": 160, "height": 128, "orig_width": 320, "orig_height": 256,
                     "boxes": json.dumps([[5.0, 6.0, 12.5, 14.0], [40.0, 41.0, 50.0, 52.0]]),
                     "box_labels": json.dumps(["mole", "mole"]), "split": "train", "md5_original": "m",
                     "near_duplicate_of": ""})
    _write(d, rows)
    return d


@pytest.fixture
def fake_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    make_ham(root), make_isic(root), make_derm7pt(root), make_pad(root), make_sd198(root), make_moles(root)
    return root


# ---- readers ---------------------------------------------------------------------------------------
def _check_schema(df: pd.DataFrame) -> None:
    for c in CORE_COLUMNS + META_COLUMNS:
        assert c in df.columns, c
    assert str(df["malignant"].dtype) == "Int8"
    assert df["diagnosis"].isin(DIAGNOSES).all()
    assert ((df["diagnosis"] == "OTHER") == df["malignant"].isna()).all()
    for bs in df["boxes"]:
        assert isinstance(bs, list) and all(len(b) == 4 and all(isinstance(v, float) for v in b) for b in bs)


def test_ham10000_reader(tmp_path):
    df = ham10000.read(make_ham(tmp_path)).rows
    _check_schema(df)
    assert (df["modality"] == "dermoscopy").all()
    assert df["path"].iloc[0] == "ham10000/images/ISIC_0001000.jpg"
    by = df.set_index("source_label")
    assert df.groupby("source_label")["diagnosis"].first().to_dict() == {
        "mel": "MEL", "nv": "NV", "bkl": "BKL", "akiec": "AKIEC", "df": "DF", "vasc": "VASC", "bcc": "BCC"}
    assert set(df.loc[df["malignant"] == 1, "diagnosis"]) == {"MEL", "AKIEC", "BCC"}
    assert by.loc["df", "malignant"] == 0
    assert df["biopsied"].tolist() == (df["dx_type"] == "histo").tolist()
    assert pd.isna(df.loc[2, "sex"]) and df.loc[0, "sex"] == "male"  # 'unknown' -> NA
    assert np.isnan(df.loc[3, "age"])
    assert df.loc[0, "boxes"] == [[10.0, 20.0, 150.0, 140.0]]
    assert df.loc[0, "lesion_id"] == df.loc[1, "lesion_id"] == "HAM_1"


@pytest.mark.parametrize("with_diagnosis", [True, False])
def test_isic_reader_from_diagnosis_or_onehot(tmp_path, with_diagnosis):
    df = isic2018.read(make_isic(tmp_path, with_diagnosis=with_diagnosis)).rows
    _check_schema(df)
    assert df["diagnosis"].tolist() == ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    assert df["malignant"].tolist() == [1, 0, 1, 1, 0, 0, 0]
    assert (df["source_split"] == "test").all() and (df["boxes"].map(len) == 0).all()


def test_isic_reader_rejects_ambiguous_onehot(tmp_path):
    d = make_isic(tmp_path, with_diagnosis=False)
    m = pd.read_csv(d / "metadata.csv")
    m.loc[0, "NV"] = 1.0  # two classes set
    m.to_csv(d / "metadata.csv", index=False)
    with pytest.raises(DataError, match="exactly one"):
        isic2018.read(d)


def test_derm7pt_pairs_and_labels(tmp_path):
    df = derm7pt.read(make_derm7pt(tmp_path)).rows
    _check_schema(df)
    n_cases = len(DERM7PT_CASES)
    n_missing = sum(m for *_, m in DERM7PT_CASES)
    assert len(df) == 2 * n_cases - n_missing
    per_case = df.groupby("pair_id")["modality"].apply(sorted)
    for k, (_, _, missing) in enumerate(DERM7PT_CASES):
        expect = ["dermoscopy"] if missing else ["clinical", "dermoscopy"]
        assert per_case[f"derm7pt_{k + 1}"] == expect
    assert (df["lesion_id"] == df["pair_id"]).all()
    dx = df.drop_duplicates("pair_id").set_index("source_label")
    assert dx.loc["melanosis", "diagnosis"] == "BKL" and dx.loc["melanosis", "malignant"] == 0
    assert dx.loc["miscellaneous", "diagnosis"] == "OTHER" and pd.isna(dx.loc["miscellaneous", "malignant"])
    assert dx.loc["melanoma metastasis", "diagnosis"] == "MEL" and dx.loc["melanoma metastasis", "malignant"] == 1
    assert dx.loc["reed or spitz nevus", "diagnosis"] == "NV"
    assert set(df["source_split"]) == {"train", "val", "test"}  # 'valid' -> 'val'
    clin = df[df["modality"] == "clinical"]
    assert clin["path"].str.contains("/Ccase").all()


def test_pad_reader_drops_and_maps(tmp_path):
    res = pad_ufes20.read(make_pad(tmp_path))
    df = res.rows
    _check_schema(df)
    assert {d["image_id"] for d in res.dropped} == {"PAT_759_1433_914", "PAT_759_1538_566"}
    assert all("conflicting" in d["reason"] for d in res.dropped)
    assert not df["image_id"].str.startswith("PAT_759").any()
    m = df.set_index("source_label")
    assert m.loc["ACK", "diagnosis"] == "AKIEC" and m.loc["ACK", "malignant"] == 1
    assert m.loc["SCC", "diagnosis"] == "AKIEC" and m.loc["SCC", "malignant"] == 1
    assert m.loc["SEK", "diagnosis"] == "BKL" and m.loc["SEK", "malignant"] == 0
    assert m.loc["NEV", "diagnosis"] == "NV" and m.loc["MEL", "malignant"] == 1
    assert (df["modality"] == "smartphone").all()
    assert str(df["fitzpatrick"].dtype) == "Int8"
    assert df["fitzpatrick"].fillna(0).tolist()[:4] == [2, 2, 0, 6]  # '' -> NA
    assert df["itch"].astype(object).where(df["itch"].notna(), None).tolist()[:3] == [True, None, False]  # UNK -> NA
    assert df["biopsied"].tolist()[:2] == [False, True]
    assert df["dx_type"].tolist()[:2] == ["clinical", "histo"]
    assert df["patient_id"].iloc[0] == "PAT_1" and df["lesion_id"].iloc[0] == "PAD_1"
    assert df.loc[0, "boxes"] == [[10.0, 12.0, 80.0, 90.0]]


def test_sd198_reader(tmp_path):
    df = sd198.read(make_sd198(tmp_path)).rows
    _check_schema(df)
    m = df.drop_duplicates("source_label").set_index("source_label")
    assert m.loc["Keloid", "diagnosis"] == "OB" and m.loc["Keloid", "malignant"] == 0
    assert m.loc["Cutaneous_Horn", "diagnosis"] == "OTHER" and pd.isna(m.loc["Cutaneous_Horn", "malignant"])
    assert m.loc["Lentigo_Maligna_Melanoma", "diagnosis"] == "MEL"
    assert m.loc["Pyogenic_Granuloma", "diagnosis"] == "VASC"
    assert m.loc["Actinic_Keratosis", "malignant"] == 1
    assert (df["modality"] == "clinical").all()


def test_moles_reader(tmp_path):
    df = moles.read(make_moles(tmp_path)).rows
    _check_schema(df)
    assert (df["modality"] == "widefield").all() and (df["diagnosis"] == "OTHER").all()
    assert df["malignant"].isna().all() and (df["source_label"] == "mole").all()
    assert df.loc[0, "boxes"] == [[5.0, 6.0, 12.5, 14.0], [40.0, 41.0, 50.0, 52.0]]


def test_unmapped_label_is_a_clear_error(tmp_path):
    d = make_ham(tmp_path)
    m = pd.read_csv(d / "metadata.csv")
    m.loc[0, "dx"] = "scc"
    m.to_csv(d / "metadata.csv", index=False)
    with pytest.raises(DataError, match=r"metadata.csv.*no label decision for 'scc'"):
        ham10000.read(d)


def test_missing_column_and_bad_boxes(tmp_path):
    d = make_ham(tmp_path)
    m = pd.read_csv(d / "metadata.csv")
    m.drop(columns=["lesion_id"]).to_csv(d / "metadata.csv", index=False)
    with pytest.raises(DataError, match="lesion_id"):
        ham10000.read(d)
    m.loc[0, "boxes"] = "[[1, 2, 3]]"
    m.to_csv(d / "metadata.csv", index=False)
    with pytest.raises(DataError, match="ISIC_0001000"):
        ham10000.read(d)


def test_missing_image_file_is_dropped_with_reason(fake_root):
    (fake_root / "ham10000" / "images" / "ISIC_0001003.jpg").unlink()
    res = {r.source: r for r in read_all(fake_root)}
    assert "ham10000/images/ISIC_0001003.jpg" not in set(res["ham10000"].rows["path"])
    assert any(d["path"].endswith("ISIC_0001003.jpg") and "missing" in d["reason"] for d in res["ham10000"].dropped)


def test_every_label_decision_has_a_reason():
    entries = labels.report_entries()
    for table in entries["label_maps"].values():
        for d in table:
            assert d["diagnosis"] in DIAGNOSES and len(d["reason"]) > 10
    assert {d["image_id"] for d in entries["drops"]} == {"PAT_759_1433_914", "PAT_759_1538_566"}


# ---- dedup and splits ------------------------------------------------------------------------------
def test_close_pairs_matches_brute_force():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, 50, dtype=np.uint64)
    a = np.concatenate([base, base ^ np.uint64(0b111)])  # 50 planted pairs at distance 3
    b = rng.integers(0, 2**63, len(a), dtype=np.uint64)
    got = close_pairs(a, b, 4, 64, block=16)
    brute = {(i, j) for i in range(len(a)) for j in range(i + 1, len(a)) if bin(int(a[i]) ^ int(a[j])).count("1") <= 4}
    assert {(int(i), int(j)) for i, j, *_ in got} == brute
    assert len(brute) >= 50
    strict = close_pairs(a, a, 4, 2, block=16)  # second hash identical here, distance 3 > 2 -> nothing
    assert len(strict) == 0


def test_union_find():
    uf = UnionFind()
    uf.union("a", "b"), uf.union("c", "d"), uf.union("b", "d")
    assert uf.find("a") == uf.find("c") and uf.find("e") != uf.find("a")


def test_find_duplicates_pairs_copies_only(fake_root, tmp_path):
    paths = ["moles_widefield_roujiaw/images/fig1.jpg", "moles_widefield_roujiaw/images/fig6.jpg",
             "moles_widefield_roujiaw/images/fig2.jpg", "ham10000/images/ISIC_0001000.jpg"]
    res = find_duplicates(paths, fake_root, cache_dir=tmp_path / "cache")
    assert res.clusters == [sorted(paths[:2])]
    assert (tmp_path / "cache" / "hash_cache.parquet").is_file()
    again = find_duplicates(paths, fake_root, cache_dir=tmp_path / "cache")  # from the cache
    assert again.clusters == res.clusters


def _toy(n_groups: int = 200) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    dx = rng.choice(["NV", "MEL", "BCC"], n_groups, p=[0.7, 0.2, 0.1])
    rows = [{"group_id": f"g{k}", "diagnosis": dx[k]} for k in range(n_groups) for _ in range(1 + k % 3)]
    return pd.DataFrame(rows)


def test_pick_groups_is_stratified_and_seeded():
    df = _toy()
    a = pick_groups(df, 0.25, np.random.default_rng(0))
    b = pick_groups(df, 0.25, np.random.default_rng(0))
    c = pick_groups(df, 0.25, np.random.default_rng(1))
    assert a == b and a != c
    per = df.drop_duplicates("group_id").set_index("group_id")["diagnosis"]
    for dx, n in per.value_counts().items():
        assert abs(sum(per[g] == dx for g in a) - round(0.25 * n)) <= 0  # exact per stratum


def test_groups_and_official_test_win(fake_root):
    rows = pd.concat([r.rows for r in read_all(fake_root)], ignore_index=True)
    # pretend a HAM lesion and a derm7pt test image are the same photo: the HAM lesion must go to test
    d7_test = rows[(rows["source"] == "derm7pt") & (rows["source_split"] == "test")]["path"].iloc[0]
    rows["group_id"] = assign_groups(rows, [("ham10000/images/ISIC_0001000.jpg", d7_test)])
    split, moves = assign_splits(rows, SplitPolicy(seed=0))
    ham1 = rows["lesion_id"] == "HAM_1"
    assert ham1.sum() == 2 and (split[ham1] == "test").all()  # both images of the lesion follow
    assert {m["path"] for m in moves} >= set(rows.loc[ham1, "path"])
    assert all(m["reason"] for m in moves)
    d7 = rows["source"] == "derm7pt"
    assert (split[d7] == rows.loc[d7, "source_split"]).all()
    assert (split[rows["source"] == "isic2018_task3_test"] == "test").all()
    sd = rows["source"] == "sd198_tumour_subset"
    assert (split[sd & (rows["source_split"] == "val")] == "test").all()
    assert not (split[sd & (rows["source_split"] == "train")] == "test").any()


# ---- whole build on the fake root ------------------------------------------------------------------
def test_build_manifest_end_to_end(fake_root, tmp_path):
    out = tmp_path / "out"
    copy = tmp_path / "reports" / "data_report.json"
    built = build_manifest(data_root=fake_root, out_dir=out, seed=0, report_copy=copy)
    df = built.manifest
    assert built.manifest_path.is_file() and built.report_path.is_file() and copy.is_file()
    assert len(df) == 20 + 7 + (2 * 8 - 1) + 6 + 20 + 6
    assert (df.groupby("group_id")["split"].nunique() == 1).all()
    assert df.loc[df["path"].str.endswith("fig1.jpg"), "group_id"].iloc[0] == df.loc[df["path"].str.endswith("fig6.jpg"), "group_id"].iloc[0]
    report = json.loads(built.report_path.read_text())
    assert report["manifest_hash"] == built.manifest_hash == manifest_hash(load_manifest(built.manifest_path))
    assert {d["image_id"] for d in report["dropped"]} == {"PAT_759_1433_914", "PAT_759_1538_566"}
    assert report["dedup"]["policy"]["justification"] and report["label_decisions"]["label_maps"]["derm7pt"]
    assert sum(c["images"] for c in report["counts"]) == len(df)
    loaded = load_manifest(built.manifest_path)
    assert loaded["boxes"].iloc[0] == df["boxes"].iloc[0] and str(loaded["malignant"].dtype) == "Int8"
    again = build_manifest(data_root=fake_root, out_dir=tmp_path / "out2", seed=0)
    assert again.manifest_hash == built.manifest_hash  # deterministic
    assert resolve_path(df["path"].iloc[0], fake_root).is_file()


def test_load_manifest_missing_gives_hint(tmp_path):
    with pytest.raises(DataError, match="lesiontriage data build"):
        load_manifest(tmp_path / "nope.parquet")


def test_build_without_data_root_is_clear(tmp_path):
    with pytest.raises(DataError, match="not found"):
        build_manifest(data_root=tmp_path / "absent", out_dir=tmp_path / "o")


def test_corrupt_image_is_dropped_with_reason(fake_root, tmp_path):
    bad = fake_root / "sd198_tumour_subset" / "images" / "000003HB.jpg"
    bad.write_bytes(b"not a jpeg at all")
    built = build_manifest(data_root=fake_root, out_dir=tmp_path / "out", seed=0)
    assert "sd198_tumour_subset/images/000003HB.jpg" not in set(built.manifest["path"])
    reasons = {d["path"]: d["reason"] for d in built.report["dropped"]}
    assert "unreadable image" in reasons["sd198_tumour_subset/images/000003HB.jpg"]


def test_empty_sets_are_a_clear_error(tmp_path):
    d = tmp_path / "data" / "ham10000"
    d.mkdir(parents=True)
    (d / "metadata.csv").write_text(",".join(ham10000.COLUMNS) + "\n")
    with pytest.raises(DataError, match="no readable images"):
        build_manifest(data_root=tmp_path / "data", out_dir=tmp_path / "o")
