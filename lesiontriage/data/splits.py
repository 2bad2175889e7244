"""Leakage-free train / val / test splits.

Two steps. :func:`assign_groups` ties rows that must share a split (same lesion, same patient,
derm7pt case, near-duplicate photos, duplicates flagged by the source) into one ``group_id`` with
union-find. :func:`assign_splits` then decides per group: official test data fixes the whole
group to test (so a near-duplicate of a test image can never train), official val / train fix it
otherwise, and the remaining groups are split per source, stratified by diagnosis and
deterministic by seed. Every row whose split differs from what its own source would have given it
is returned as a move, with the reason, for the report.
"""
from __future__ import annotations

import logging
import zlib
from dataclasses import asdict, dataclass
from typing import Iterable

import numpy as np
import pandas as pd

from lesiontriage.data.dedup import UnionFind

log = logging.getLogger(__name__)

SPLIT_RANK = {"test": 2, "val": 1, "train": 0}
# Sources split here (no usable official split); others keep theirs.
FREE_SOURCES = ("ham10000", "pad_ufes20_subset", "sd198_tumour_subset", "moles_widefield_roujiaw")
SOURCE_ORDER = ("isic2018_task3_test", "derm7pt", "sd198_tumour_subset", "pad_ufes20_subset", "ham10000",
                "moles_widefield_roujiaw")


@dataclass(frozen=True)
class SplitPolicy:
    """Fractions are of groups (lesions for HAM10000, patients for PAD-UFES-20) per diagnosis stratum."""

    seed: int = 0
    ham_val: float = 0.12
    pad_test: float = 0.25
    pad_val: float = 0.12  # of the patients left after test
    sd198_val: float = 0.15  # of the source's train part; the source's val is our SD-198 test
    moles_test: int = 18  # images; stands in for the 18 held-out source test photos not in this copy
    moles_val: int = 17

    def as_dict(self) -> dict:
        return asdict(self)


def fixed_split(df: pd.DataFrame) -> pd.Series:
    """The split a row's own source imposes, or <NA> when it is ours to choose."""
    src = df["source"].astype(str)
    ss = df["source_split"].astype("string") if "source_split" in df else pd.Series(pd.NA, index=df.index, dtype="string")
    out = pd.Series(pd.NA, index=df.index, dtype="string")
    out[src == "isic2018_task3_test"] = "test"
    d7 = src == "derm7pt"
    out[d7] = ss[d7].map({"train": "train", "val": "val", "valid": "val", "test": "test"})
    sd = src == "sd198_tumour_subset"
    out[sd & (ss == "val")] = "test"
    return out


def assign_groups(df: pd.DataFrame, duplicate_pairs: Iterable[tuple[str, str]] = ()) -> pd.Series:
    """group_id per row: union of lesion, patient, derm7pt pair, source-flagged and detected duplicates.

    The id is ``<source>:<image_id>`` of the group's first path in sorted order, so it is stable
    across runs and readable.
    """
    uf = UnionFind()
    paths = df["path"].astype(str).tolist()
    for p in paths:
        uf.find(p)
    src = df["source"].astype(str)
    for col in ("lesion_id", "patient_id", "pair_id"):
        if col not in df:
            continue
        key = src + "|" + df[col].astype("string")
        for _, members in pd.Series(paths, index=df.index)[key.notna()].groupby(key[key.notna()]):
            uf.union_all(members.tolist())
    # duplicates the sources themselves flag (near_duplicate_of = an image_id of the same set)
    if "near_duplicate_of" in df:
        by_id = dict(zip(src + "|" + df["image_id"].astype(str), paths))
        for p, s, other in zip(paths, src, df["near_duplicate_of"].astype("string")):
            if pd.notna(other) and f"{s}|{other}" in by_id:
                uf.union(p, by_id[f"{s}|{other}"])
    known = set(paths)
    for a, b in duplicate_pairs:
        if a in known and b in known:
            uf.union(a, b)
    root = [uf.find(p) for p in paths]
    first: dict = {}
    for p, r in sorted(zip(paths, root)):
        first.setdefault(r, p)
    label = {p: f"{s}:{i}" for p, s, i in zip(paths, src, df["image_id"].astype(str))}
    return pd.Series([label[first[r]] for r in root], index=df.index, dtype="string", name="group_id")


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _strata(rows: pd.DataFrame) -> pd.Series:
    """Per group: its rarest diagnosis within the source, so rare (often malignant) classes are spread."""
    freq = rows["diagnosis"].value_counts()
    rank = rows["diagnosis"].map(freq)
    idx = rank.groupby(rows["group_id"]).idxmin()
    return rows.loc[idx.values, "diagnosis"].set_axis(idx.index)


def pick_groups(rows: pd.DataFrame, frac: float, rng: np.random.Generator) -> set[str]:
    """About ``frac`` of the groups of every diagnosis stratum (rounded), chosen at random."""
    chosen: set[str] = set()
    strata = _strata(rows)
    for dx in sorted(strata.unique()):
        groups = np.array(sorted(strata.index[strata == dx]), dtype=object)
        n = int(round(frac * len(groups)))
        chosen.update(rng.permutation(groups)[:n].tolist())
    return chosen


def pick_images(rows: pd.DataFrame, n_images: int, rng: np.random.Generator) -> set[str]:
    """Whole groups, at random, until ``n_images`` images (skipping groups that would overshoot)."""
    sizes = rows.groupby("group_id").size()
    chosen, total = set(), 0
    for g in rng.permutation(np.array(sorted(sizes.index), dtype=object)):
        if total + sizes[g] <= n_images:
            chosen.add(g)
            total += sizes[g]
        if total >= n_images:
            break
    return chosen


def _split_free_source(source: str, rows: pd.DataFrame, policy: SplitPolicy) -> dict[str, str]:
    """group_id -> split for the unfixed groups whose primary source is ``source``."""
    rng = _rng(policy.seed, source)
    groups = sorted(rows["group_id"].unique())
    out = {g: "train" for g in groups}
    if source == "ham10000":
        val = pick_groups(rows, policy.ham_val, rng)
        out.update({g: "val" for g in val})
    elif source == "pad_ufes20_subset":
        test = pick_groups(rows, policy.pad_test, rng)
        rest = rows[~rows["group_id"].isin(test)]
        val = pick_groups(rest, policy.pad_val, rng)
        out.update({g: "test" for g in test})
        out.update({g: "val" for g in val})
    elif source == "sd198_tumour_subset":
        val = pick_groups(rows, policy.sd198_val, rng)
        out.update({g: "val" for g in val})
    elif source == "moles_widefield_roujiaw":
        test = pick_images(rows, policy.moles_test, rng)
        rest = rows[~rows["group_id"].isin(test)]
        val = pick_images(rest, policy.moles_val, rng)
        out.update({g: "test" for g in test})
        out.update({g: "val" for g in val})
    else:  # a new set without an official split: train only until someone decides
        log.warning("%s: no split policy, all train", source)
    return out


def assign_splits(df: pd.DataFrame, policy: SplitPolicy = SplitPolicy()) -> tuple[pd.Series, list[dict]]:
    """(split per row, moved rows with reasons). ``df`` needs group_id, source, diagnosis, source_split."""
    fixed = fixed_split(df)
    group = df["group_id"].astype(str)
    # 1. groups touching official splits: the most restrictive official split wins (test > val > train)
    rank = fixed.map(SPLIT_RANK).astype("float64")
    group_rank = rank.groupby(group).max()
    fixed_groups = group_rank.dropna()
    inv = {v: k for k, v in SPLIT_RANK.items()}
    decided = {g: inv[int(r)] for g, r in fixed_groups.items()}
    # 2. free groups: split within their primary source (most rows; ties by SOURCE_ORDER)
    free = df[~group.isin(decided)]
    order = {s: i for i, s in enumerate(SOURCE_ORDER)}
    prim = (free.assign(_o=free["source"].astype(str).map(lambda s: order.get(s, len(order))))
            .groupby(["group_id", "source", "_o"], observed=True).size().rename("n").reset_index()
            .sort_values(["group_id", "n", "_o"], ascending=[True, False, True])
            .drop_duplicates("group_id").set_index("group_id")["source"].astype(str))
    for source in sorted(prim.unique(), key=lambda s: order.get(s, len(order))):
        gids = prim.index[prim == source]
        rows = free[free["group_id"].isin(gids) & (free["source"].astype(str) == source)]
        decided.update(_split_free_source(source, rows, policy))
    split = group.map(decided).astype("string").rename("split")
    # 3. moves: rows whose final split is not what their own source gives them
    moves = []
    for i in np.flatnonzero((fixed.notna() & (fixed != split)).to_numpy()):
        r = df.iloc[i]
        moves.append({"path": r["path"], "source": r["source"], "group_id": r["group_id"],
                      "from": fixed.iloc[i], "to": split.iloc[i],
                      "reason": f"same group as an official {split.iloc[i]} image (lesion/patient/near-duplicate); "
                                f"the most restrictive official split wins"})
    for i in np.flatnonzero((fixed.isna() & group.isin(fixed_groups.index)).to_numpy()):
        r = df.iloc[i]
        moves.append({"path": r["path"], "source": r["source"], "group_id": r["group_id"],
                      "from": "(own source policy)", "to": split.iloc[i],
                      "reason": "near-duplicate / same group as an image with an official split; follows it"})
    mixed = free[free["source"].astype(str) != free["group_id"].map(prim)]
    for _, r in mixed.iterrows():
        moves.append({"path": r["path"], "source": r["source"], "group_id": r["group_id"],
                      "from": "(own source policy)", "to": decided[r["group_id"]],
                      "reason": f"near-duplicate of a {prim[r['group_id']]} image; follows that group's split"})
    return split, moves
