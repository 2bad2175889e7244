"""Validation study: would a learned combination (stacking) of the whole-frame networks beat the shipped view?

The shipped whole-image view is a fixed rule: the mean over its members of each one's sub-type malignant mass as a
logit (networks/whole_view.py). A logistic regression over richer per-photo outputs (each member's binary logit,
sub-type mass, all 8 sub-type log-probabilities; the unused third member; the lesion classifier on the whole frame)
could weigh sub-types or members better. Each candidate is scored by repeated stratified 5-fold cross-validation on
every labelled validation photo (out-of-fold decision values, macro ROC AUC over the source x modality strata, the
project's criterion), next to the shipped rule on the same photos.

What it found (2026-12-07, 1,710 photos, `python scripts/whole_view_stack_study.py`): shipped rule 0.8996; the best
stacker 0.8990 (the two members' sub-type masses, C 0.01); every stacker with sub-type log-probabilities 0.879-0.889,
with the frame view 0.880-0.894. A pooled fit learns the sets' base rates, not a better within-set ranking: the fixed
mean stays.

    python scripts/whole_view_stack_study.py [--reps 5] [--out models/reports/whole_view_stack_study.json]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from lesiontriage.data.manifest import load_manifest, manifest_hash
from lesiontriage.data.schema import MALIGNANT_CODES
from lesiontriage.data.torch_datasets import LesionImageDataset
from lesiontriage.networks.whole_view import MeanLogitEnsemble, whole_view_spec
from lesiontriage.paths import MODELS_DIR, RUNS_DIR
from lesiontriage.pipeline import TriagePipeline
from lesiontriage.results import SUBTYPES
from lesiontriage.train.box_rule import stratum_aucs
from lesiontriage.train.classifier import ClassifierTrainConfig, select_rows
from lesiontriage.weights import read_metadata

NETWORKS = ("image_classifier", "image_classifier_2", "image_classifier_3", "classifier")


def network_outputs(models: Path, key: str, rows: pd.DataFrame, size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(binary logit / temperature [N], sub-type probabilities [N, 8]) of one network on the whole photos, averaged
    over the photo and its h/v flips, at ``size`` (None: its trained size)."""
    entry = read_metadata(models)["models"][key]
    net = TriagePipeline._load_classifier(models, entry).eval()
    view = MeanLogitEnsemble([net], [float(entry.get("temperature", 1.0))], 0.0, size, True)
    cfg = view.config
    ds = LesionImageDataset(rows, train=False, input_size=cfg.input_size, mean=cfg.mean, std=cfg.std, mode="whole")
    zs, ps = [], []
    with torch.inference_mode():
        for x, _, _ in tqdm(DataLoader(ds, batch_size=32), desc=key, leave=False):
            z, p, _ = view.outputs(x)
            zs.append(z.float())
            ps.append(p.float())
    return torch.cat(zs).numpy(), torch.cat(ps).numpy()


def subtype_mass(p: np.ndarray) -> np.ndarray:
    """log P(malignant sub-types) - log P(the rest), as the view computes it."""
    mal = [i for i, s in enumerate(SUBTYPES) if s in MALIGNANT_CODES]
    ben = [i for i, s in enumerate(SUBTYPES) if s not in MALIGNANT_CODES]
    return np.log(p[:, mal].sum(1).clip(1e-30)) - np.log(p[:, ben].sum(1).clip(1e-30))


def features(out: dict[str, np.ndarray], names: tuple[str, ...], kinds: tuple[str, ...]) -> np.ndarray:
    """Columns per network: 'z' binary logit, 's' sub-type mass, 'lp' centred sub-type log-probabilities."""
    cols = []
    for n in names:
        if "z" in kinds:
            cols.append(out[f"{n}_z"][:, None])
        if "s" in kinds:
            cols.append(subtype_mass(out[f"{n}_p"])[:, None])
        if "lp" in kinds:
            lp = np.log(out[f"{n}_p"].clip(1e-6))
            cols.append(lp - lp.mean(1, keepdims=True))
    return np.hstack(cols)


def macro(strata: np.ndarray, y: np.ndarray, score: np.ndarray) -> float:
    return float(np.mean(list(stratum_aucs(pd.DataFrame({"stratum": strata, "y": y, "score": score})).values())))


def cross_validated(x: np.ndarray, strata: np.ndarray, y: np.ndarray, c: float, reps: int) -> tuple[float, float]:
    """Mean and sd over ``reps`` repeats of the out-of-fold macro AUC (folds stratified by stratum x label)."""
    key = np.array([f"{s}|{t}" for s, t in zip(strata, y)])
    scores = []
    for rep in range(reps):
        oof = np.zeros(len(y))
        for tr, te in StratifiedKFold(5, shuffle=True, random_state=rep).split(x, key):
            clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000)).fit(x[tr], y[tr])
            oof[te] = clf.decision_function(x[te])
        scores.append(macro(strata, y, oof))
    return float(np.mean(scores)), float(np.std(scores))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=Path, default=MODELS_DIR)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    meta = read_metadata(args.models)
    spec = whole_view_spec(meta)
    if spec is None or spec.subtype_weight != 1.0:
        raise SystemExit("error: the study compares against a sub-type-mass whole-image view (alpha 1)")
    manifest = load_manifest(None)
    rows = select_rows(manifest, "val", ClassifierTrainConfig().sources)
    cache = RUNS_DIR / "stack" / f"val_{manifest_hash(manifest)[:12]}_{spec.sha256[:12]}.npz"
    if cache.exists():
        out = dict(np.load(cache))
    else:
        out = {}
        for key in NETWORKS:
            size = spec.input_size if key.startswith("image_classifier") else None
            out[f"{key}_z"], out[f"{key}_p"] = network_outputs(args.models, key, rows, size)
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, **out)
    strata = (rows["source"] + "/" + rows["modality"]).astype(str).to_numpy()
    y = rows["malignant"].astype(int).to_numpy()
    shipped = np.mean([subtype_mass(out[f"{k}_p"]) for k in spec.members], axis=0)
    records = [{"candidate": "shipped rule (mean sub-type mass)", "C": None, "macro": macro(strata, y, shipped), "sd": 0.0}]
    members, frame = tuple(spec.members), ("classifier",)
    third = tuple(k for k in NETWORKS if k.startswith("image_classifier") and k not in members)
    for label, names, kinds in [("members: mass", members, ("s",)), ("members: binary + mass", members, ("z", "s")),
                                ("members: sub-type log-p", members, ("lp",)),
                                ("members: binary + sub-type log-p", members, ("z", "lp")),
                                ("all image classifiers: binary + mass", members + third, ("z", "s")),
                                ("members + frame: binary + mass", members + frame, ("z", "s")),
                                ("members + frame: sub-type log-p", members + frame, ("lp",))]:
        x = features(out, names, kinds)
        for c in (0.01, 0.1, 1.0):
            m, sd = cross_validated(x, strata, y, c, args.reps)
            records.append({"candidate": label, "C": c, "macro": m, "sd": sd})
            print(f"{label:40s} C={c:<5} macro {m:.4f} +- {sd:.4f}", flush=True)
    table = pd.DataFrame(records)
    print(table.round(4).to_string(index=False))
    if args.out:
        args.out.write_text(json.dumps({
            "command": "python scripts/whole_view_stack_study.py" + (f" --reps {args.reps}" if args.reps != 5 else ""),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "n_photos": len(rows),
            "members": list(members), "manifest_hash": manifest_hash(manifest),
            "criterion": "out-of-fold macro ROC AUC over source x modality strata (5-fold, repeated); bar +0.005",
            "table": table.round(4).to_dict(orient="records")}, indent=1) + "\n")


if __name__ == "__main__":
    main()
