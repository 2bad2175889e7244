"""Confirm the close-up blend's main-lesion rule on every labelled validation photo before it ships.

Why: ``train hybrid`` chooses its rules on the box-rule study's validation sample (120 photos per source x modality,
the cached detections). The main-lesion rule (hybrid.py, ``ramp_primary_lesion``) changes the score of only the
photos inside the soft gate's ramp (~150 of that sample), so a gain there is a few dozen photos deep: at stop 32 it
passed the sample (+0.0065 macro AUC) and fell short on all 802 photos below (+0.0041). A rule that touches so few
photos must show its gain on every labelled validation photo (HAM10000 capped: it is ~1,200 photos, nearly all
frame-filling, where the rule does nothing) before it ships.

Both variants come from one pipeline run per photo (``TriagePipeline.predict`` with the rule on): a photo scored on
its main lesion is re-scored with the aggregate over its lesions and the same views' weights; every other photo has
one score for both.
"""
from __future__ import annotations

import hashlib
import pickle
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from lesiontriage.aggregation import aggregate
from lesiontriage.data.manifest import resolve_path
from lesiontriage.results import SUBTYPES, TriageResult
from lesiontriage.train.box_rule import stratum_aucs


@dataclass(frozen=True)
class MainLesionCheck:
    """What the confirmation measured and decided."""

    macro_without: float
    macro_with: float
    strata_without: dict[str, float]
    strata_with: dict[str, float]
    n_photos: int
    n_main_lesion: int  # photos scored on their main lesion
    min_gain: float
    ham_cap: int

    @property
    def confirmed(self) -> bool:
        return self.macro_with - self.macro_without >= self.min_gain

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "confirmed": self.confirmed,
                "photos": "every labelled validation photo (HAM10000: a seeded sample of ham_cap), whole, as shipped"}


def confirmation_rows(manifest: pd.DataFrame, ham_cap: int, seed: int = 0) -> pd.DataFrame:
    """Every labelled validation photo, HAM10000 sampled down to ``ham_cap``."""
    v = manifest[(manifest["split"] == "val") & manifest["malignant"].notna() & manifest["diagnosis"].isin(SUBTYPES)]
    ham = v[v["source"] == "ham10000"]
    return pd.concat([v[v["source"] != "ham10000"], ham.sample(min(len(ham), ham_cap), random_state=seed)]).reset_index(drop=True)


def score_without_main_lesion(result: TriageResult) -> float:
    """The image score the same photo gets with the aggregate (the result's) over its lesions as the lesion term."""
    if result.main_lesion is None:
        return float(result.image_score)
    lesion = aggregate([l.p_malignant for l in result.lesions], result.aggregate)
    w, f = float(result.whole_image_weight), float(result.full_frame_weight)
    views = w * float(result.whole_image_score or 0.0) + f * float(result.full_frame_score or 0.0)
    return (1.0 - w - f) * lesion + views


def _scores(pipe, rows: pd.DataFrame, data_root: Path | None, cache: Path) -> pd.DataFrame:
    if cache.exists():
        return pickle.loads(cache.read_bytes())
    recs = []
    for _, r in tqdm(list(rows.iterrows()), desc="main-lesion check (validation photos)"):
        res = pipe.predict(resolve_path(r["path"], data_root), "mean")
        recs.append({"stratum": f"{r['source']}/{r['modality']}", "y": int(r["malignant"]), "with": float(res.image_score),
                     "without": score_without_main_lesion(res), "main": res.main_lesion is not None})
    out = pd.DataFrame(recs)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_bytes(pickle.dumps(out))
    return out


def confirm_main_lesion(pipe, manifest: pd.DataFrame, data_root: Path | None, cache_dir: Path, min_gain: float,
                        ham_cap: int = 300) -> MainLesionCheck:
    """Score every labelled validation photo with ``pipe`` (its settings must switch the rule on) and compare the
    macro ROC AUC over source x modality strata with and without the main lesion. Cached per models + settings."""
    if not pipe.settings.closeup_ramp_primary_lesion:
        raise ValueError("confirm_main_lesion needs a pipeline whose settings switch the main-lesion rule on")
    rows = confirmation_rows(manifest, ham_cap)
    key = repr((sorted(pipe.metadata.get("models", {}).get(k, {}).get("sha256", "") for k in pipe.metadata.get("models", {})),
                asdict(pipe.settings), sorted(rows["path"])))
    cache = cache_dir / f"main_lesion_check_{hashlib.sha256(key.encode()).hexdigest()[:16]}.pkl"
    df = _scores(pipe, rows, data_root, cache)
    without = stratum_aucs(df.assign(score=df["without"]))
    with_main = stratum_aucs(df.assign(score=df["with"]))
    return MainLesionCheck(round(float(np.mean(list(without.values()))), 4), round(float(np.mean(list(with_main.values()))), 4),
                           {k: round(v, 4) for k, v in without.items()}, {k: round(v, 4) for k, v in with_main.items()},
                           len(df), int(df["main"].sum()), min_gain, ham_cap)
