"""Would a finished whole-image run improve the shipped whole-image view? Step 0 of `train hybrid`, for one run.

Why: `train hybrid --whole-image-ensemble` decides on members by scoring every set of the *installed* models at every
candidate size (~25 minutes, and it rewrites the pipeline's rule, so `train closeup-rule` and `train tiers` must
follow). Before exporting a run into models/, this answers the only question that matters for it in ~5 minutes:
exported into a temporary copy of models/, does the run, in place of a member or added to the view, raise the view's
macro ROC AUC over the validation strata by the project's 0.005 bar? Same photos (every labelled validation photo,
whole), same logits (binary / temperature and the sub-type head's malignant mass, the shipped input size and flips,
cached in runs/hybrid/ per model sha256) and same table as step 0 (train/hybrid.py ``whole_score_table``).

    python scripts/whole_member_view_check.py RUN [--out FILE.json]

RUN is a finished run folder name under runs/ (its result.json and best.pt). Measured 2026-12-07:
image_classifier_lite2_rank (a continuation of image_classifier with the ranking loss): shipped view 0.8998, run in
place of image_classifier 0.8992, added as a third member 0.9005 (+0.0007): not exported.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import pandas as pd
from rich.console import Console

from lesiontriage.data.manifest import load_manifest
from lesiontriage.networks.whole_view import whole_view_spec, whole_view_tta
from lesiontriage.paths import MODELS_DIR, RUNS_DIR
from lesiontriage.train.classifier import ClassifierTrainConfig, select_rows
from lesiontriage.train.export import export_classifier
from lesiontriage.train.hybrid import HybridStudy, _member_logits, choose_whole_view, whole_score_table
from lesiontriage.weights import read_metadata

CANDIDATE = "image_classifier_candidate"


def candidate_sets(shipped: tuple[str, ...]) -> list[tuple[str, ...]]:
    """The shipped set, the candidate in place of each member, the candidate added, and the candidate alone."""
    swaps = [tuple(CANDIDATE if k == member else k for k in shipped) for member in shipped]
    return [shipped, *swaps, (*shipped, CANDIDATE), (CANDIDATE,)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run folder under runs/ (result.json + best.pt)")
    parser.add_argument("--out", type=Path, help="write the table and the decision as JSON")
    args = parser.parse_args()
    console = Console()
    result = json.loads((RUNS_DIR / args.run / "result.json").read_text())
    meta = read_metadata(MODELS_DIR)
    spec = whole_view_spec(meta)
    shipped = tuple(spec.members)
    size, flips = whole_view_tta(meta)  # the view's augmentation, as step 0 names it
    tta = (int(size or meta["models"]["image_classifier"]["config"]["input_size"]), flips)
    study = HybridStudy()
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        shutil.copytree(MODELS_DIR, models, ignore=shutil.ignore_patterns("reports"))
        export_classifier(CANDIDATE, result, models, None, None)
        meta = read_metadata(models)
        rows = select_rows(load_manifest(), "val", ClassifierTrainConfig().sources)
        members = _member_logits(models, meta, [*shipped, CANDIDATE], rows, None, (tta[0],))
    members = [m for m in members if m.tta == tta]
    strata = (rows["source"] + "/" + rows["modality"]).astype(str).tolist()
    table = whole_score_table(members, strata, rows["malignant"].astype(int).to_numpy(), study.subtype_weights,
                              candidate_sets(shipped))
    # step 0's own decision: the best row replaces the shipped view only with a gain >= the bar
    chosen, _, _, _ = choose_whole_view(table, study.min_gain, (shipped, float(spec.subtype_weight), tta))
    worth = CANDIDATE in chosen
    base = table[(table["members"] == "+".join(shipped)) & (table["subtype_weight"] == float(spec.subtype_weight))]
    best = table.loc[table["macro"].idxmax()]
    gain = float(best["macro"]) - float(base["macro"].iloc[0])
    pd.set_option("display.width", 250)
    print(table.drop(columns=["input_size", "flip_tta"]).round(4).to_string(index=False))  # plain: no wrapping
    verdict = "worth exporting" if worth else "below the bar: not worth exporting"
    console.print(f"{args.run}: shipped view {float(base['macro'].iloc[0]):.4f}; best {best['members']} (sub-type share "
                  f"{best['subtype_weight']}) {float(best['macro']):.4f}, {gain:+.4f}: {verdict} (bar {study.min_gain}; "
                  f"{tta[0]} px, flips {tta[1]})")
    if args.out:
        args.out.write_text(json.dumps({"run": args.run, "shipped": list(shipped), "gain": round(gain, 4),
                                        "worth_exporting": worth,
                                        "table": table.round(4).to_dict(orient="records")}, indent=1))


if __name__ == "__main__":
    main()
