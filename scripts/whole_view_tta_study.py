"""Validation study: does test-time augmentation or a larger input size help the shipped whole-image view?

What it found, and what became of it: measured 2026-12-07 on the binary pair, no candidate cleared the project's
0.005 bar on the view's macro ROC AUC over the validation strata (best: 256 px with identity + h/v flips, +0.0047,
one of ~15 candidates). Re-run on the three-member sub-type view, all 1,710 photos, `--sizes 256` (~32 min): 224 px
identity 0.8937 (= step 0 of `train hybrid`), h/v flips 0.8937, 180 + transposes 0.8946, all 8 0.8958; 256 px identity
0.8954, 256 px + h/v flips 0.8991 (+0.0054). Input size and h/v flips then became options of the view itself
(``pipeline.whole_image_input_size`` / ``whole_image_flip_tta``, networks/whole_view.py), chosen by ``train hybrid``'s
step 0 with the members and the head; this script stays for the wider grid (transposes, all 8 views, more sizes)
and measures each member bare (its trained size, no flips), whatever the shipped view's augmentation.

Every labelled validation photo (the whole-image trainer's validation rows), whole, through each member listed in
``pipeline.whole_image_members``: the 8 dihedral views (flips and transposes; a lesion photo has no up or left) at
the trained input size, and identity + h/v flips at each ``--sizes`` entry. Each member's logit is the one the view
uses (binary logit / its temperature, or the sub-type head's malignant mass: ``pipeline.whole_image_subtype_weight``),
averaged over views, then over members, as the view does (the view's own temperature does not change a ROC AUC).

    python scripts/whole_view_tta_study.py [--sizes 256,288] [--limit N] [--out models/reports/whole_view_tta_study.json]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from lesiontriage.data.manifest import load_manifest, manifest_hash
from lesiontriage.data.torch_datasets import LesionImageDataset
from lesiontriage.networks.whole_view import MeanLogitEnsemble, whole_view_spec
from lesiontriage.paths import MODELS_DIR
from lesiontriage.pipeline import TriagePipeline
from lesiontriage.train.box_rule import stratum_aucs
from lesiontriage.train.classifier import ClassifierTrainConfig, select_rows
from lesiontriage.weights import read_metadata

VIEW_SETS = {"identity": [0], "h/v flips": [0, 1, 2], "180 + transposes": [0, 3, 4, 7], "all 8": list(range(8))}


def dihedral(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 flips / transposes of a square batch [N, C, H, W], identity first, then h, v, h+v flips."""
    t = x.transpose(-1, -2)
    return [x, x.flip(-1), x.flip(-2), x.flip(-1).flip(-2), t, t.flip(-1), t.flip(-2), t.flip(-1).flip(-2)]


def member_view_logits(model: MeanLogitEnsemble, rows: pd.DataFrame, size: int, n_views: int,
                       data_root: Path | None) -> np.ndarray:
    """One member's scoring logits [N, n_views] (``model``: that member alone, wrapped as the view wraps it) on the
    whole photos resized to ``size``."""
    cfg = model.config
    ds = LesionImageDataset(rows, train=False, input_size=size, mean=cfg.mean, std=cfg.std, mode="whole",
                            margin=cfg.crop_margin, data_root=data_root)
    out = []
    with torch.inference_mode():
        for x, _, _ in tqdm(DataLoader(ds, batch_size=32), desc=f"{cfg.variant} @ {size} px", leave=False):
            out.append(torch.stack([model(v)[0].float() for v in dihedral(x)[:n_views]], 1))
    return torch.cat(out).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="256,288", help="extra input sizes (identity + h/v flips at each)")
    parser.add_argument("--models", type=Path, default=MODELS_DIR)
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="JSON with the table and its provenance")
    parser.add_argument("--limit", type=int, default=None, help="a seeded sample of N photos: a quick check of the script")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    meta = read_metadata(args.models)
    spec = whole_view_spec(meta)
    if spec is None:
        raise SystemExit(f"error: {args.models / 'metadata.json'} lists no whole-image classifier")
    manifest = load_manifest(None)
    rows = select_rows(manifest, "val", ClassifierTrainConfig().sources)
    if args.limit:
        rows = rows.sample(min(args.limit, len(rows)), random_state=0).reset_index(drop=True)
    strata = (rows["source"] + "/" + rows["modality"]).astype(str).tolist()
    y = rows["malignant"].astype(int).to_numpy()
    logits: dict[tuple[str, int], np.ndarray] = {}
    trained = {}
    for key in spec.members:
        entry = meta["models"][key]
        classifier = TriagePipeline._load_classifier(args.models, entry).eval()
        model = MeanLogitEnsemble([classifier], [float(entry.get("temperature", 1.0))], spec.subtype_weight)
        trained[key] = int(classifier.config.input_size)
        logits[key, trained[key]] = member_view_logits(model, rows, trained[key], 8, args.data_root)
        for size in (int(s) for s in args.sizes.split(",") if s):
            logits[key, size] = member_view_logits(model, rows, size, 3, args.data_root)
    records = []
    for size in sorted({s for _, s in logits}):
        for name, views in VIEW_SETS.items():
            if any(logits[k, size].shape[1] <= max(views) for k in spec.members):
                continue
            z = np.mean([logits[k, size][:, views].mean(1) for k in spec.members], axis=0)
            aucs = stratum_aucs(pd.DataFrame({"stratum": strata, "y": y, "score": z}))
            records.append({"input_size": size, "views": name, "macro": float(np.mean(list(aucs.values()))), **aucs})
    table = pd.DataFrame(records)
    base = table[(table["input_size"] == trained[spec.members[0]]) & (table["views"] == "identity")]["macro"].iloc[0]
    table["gain"] = table["macro"] - base
    shown = Table(title=f"whole-image view ({' + '.join(spec.members)}) on {len(rows)} validation photos")
    for col in table.columns:
        shown.add_column(col)
    for _, r in table.iterrows():
        shown.add_row(*[f"{v:.4f}" if isinstance(v, float) else str(v) for v in r.tolist()])
    Console().print(shown)
    if args.out:
        args.out.write_text(json.dumps({
            "command": "python scripts/whole_view_tta_study.py --sizes " + args.sizes + (f" --limit {args.limit}" if args.limit else ""),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "members": list(spec.members), "subtype_weight": spec.subtype_weight, "model_sha256": {k: meta["models"][k]["sha256"] for k in spec.members},
            "manifest_hash": manifest_hash(manifest), "n_photos": len(rows),
            "criterion": "view macro ROC AUC over source x modality strata; the project's bar for a change is +0.005",
            "table": table.round(4).to_dict(orient="records")}, indent=1) + "\n")


if __name__ == "__main__":
    main()
