"""Audit: do the close-up rules `train hybrid` chose on its validation sample hold on every labelled validation photo?

Why: `train hybrid` decides on the box-rule study's sample (120 photos per source x modality). At stop 32 a rule that
touches few photos (the main lesion inside the soft gate's ramp) gained +0.0065 there and +0.0041 on all 802 photos,
so it stays off (train/main_lesion_check.py). This script asks the same of the rules that ship: the soft gate
(``closeup_ramp_from``) and the no-lesion views (``no_lesion_views``), each against the rule without it.

Every labelled validation photo (HAM10000: a seeded sample of ``--ham-cap``) runs once through the shipped pipeline
with the close-up gate at 0 and no ramp, so both whole-photo views are computed for every photo; each candidate rule
is then applied to those numbers (``HybridRule.for_fraction`` / ``blend``, the pipeline's arithmetic) and scored by
the studies' criterion (macro ROC AUC over source x modality strata).

Stop 32 (2026-12-07, 802 photos, ~7.5 min): shipped (ramp 0.02, no-lesion views) 0.9032; hard gate with no-lesion
views 0.8837; ramp without no-lesion views 0.8746; hard gate alone 0.8556; pure two-stage 0.8189. Both rules hold.

    python scripts/hybrid_rule_audit.py [--ham-cap 300] [--out models/reports/hybrid_rule_audit.json]
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table
from tqdm.auto import tqdm

from lesiontriage.data.manifest import load_manifest, manifest_hash, resolve_path
from lesiontriage.hybrid import HybridRule, largest_box_fraction
from lesiontriage.pipeline import TriagePipeline
from lesiontriage.train.box_rule import stratum_aucs
from lesiontriage.train.main_lesion_check import confirmation_rows


def photo_views(pipe: TriagePipeline, rows: pd.DataFrame) -> pd.DataFrame:
    """Per photo: the lesion aggregate (mean), kept lesions, largest-box fraction and both whole-photo views."""
    shipped = pipe.settings
    pipe.settings = dataclasses.replace(shipped, closeup_min_box_fraction=0.0, closeup_ramp_from=None, no_lesion_views=True,
                                        closeup_ramp_primary_lesion=False)
    recs = []
    try:
        for _, r in tqdm(list(rows.iterrows()), desc="validation photos"):
            res = pipe.predict(resolve_path(r["path"], None), "mean")
            boxes = np.array([l.box for l in res.lesions], dtype=float).reshape(-1, 4)
            recs.append({"stratum": f"{r['source']}/{r['modality']}", "y": int(r["malignant"]), "lesion": res.lesion_score,
                         "n": res.n_lesions, "whole": res.whole_image_score, "frame": res.full_frame_score,
                         "fraction": largest_box_fraction(boxes, res.width, res.height) if len(boxes) else 0.0})
    finally:
        pipe.settings = shipped
    return pd.DataFrame(recs)


def rule_macro(photos: pd.DataFrame, rule: HybridRule) -> tuple[float, dict[str, float]]:
    """Macro ROC AUC over the strata of the image scores ``rule`` gives these photos."""
    scores = []
    for r in photos.itertuples():
        photo_rule = rule.for_fraction(r.fraction, r.n > 0)
        scores.append(photo_rule.blend(r.lesion, r.whole, r.frame) if photo_rule else r.lesion)
    aucs = stratum_aucs(photos.assign(score=scores))
    return float(np.mean(list(aucs.values()))), aucs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ham-cap", type=int, default=300)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    pipe = TriagePipeline.from_dir()
    s = pipe.settings
    manifest = load_manifest(None)
    photos = photo_views(pipe, confirmation_rows(manifest, args.ham_cap))
    w, gate, f, ramp = s.whole_image_weight, s.closeup_min_box_fraction, s.full_frame_weight, s.closeup_ramp_from
    candidates = {
        "shipped": HybridRule(w, gate, f, ramp, s.no_lesion_views),
        "without the soft gate": HybridRule(w, gate, f, None, s.no_lesion_views),
        "without the no-lesion views": HybridRule(w, gate, f, ramp, False),
        "hard gate alone": HybridRule(w, gate, f),
        "pure two-stage": HybridRule(0.0, gate, 0.0),
    }
    table = Table(title=f"close-up rules on {len(photos)} labelled validation photos (macro ROC AUC)")
    table.add_column("rule")
    table.add_column("macro")
    rows = []
    for name, rule in candidates.items():
        macro, aucs = rule_macro(photos, rule)
        table.add_row(name, f"{macro:.4f}")
        rows.append({"rule": name, "macro": round(macro, 4), **{k: round(v, 4) for k, v in aucs.items()}, **dataclasses.asdict(rule)})
    Console().print(table)
    if args.out:
        args.out.write_text(json.dumps({"command": "python scripts/hybrid_rule_audit.py", "date": dt.date.today().isoformat(),
                                        "manifest_hash": manifest_hash(manifest), "n_photos": len(photos),
                                        "model_sha256": {k: v["sha256"] for k, v in pipe.metadata["models"].items()},
                                        "ham_cap": args.ham_cap, "table": rows}, indent=1))


if __name__ == "__main__":
    main()
