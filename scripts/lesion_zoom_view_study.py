"""Study: the whole-image view run on a zoom around the photo's main lesion, as a further close-up view.

Why: on clinical close-ups (derm7pt clinical: the largest kept box median 13% of the frame) the whole-image view
sees the lesion small, at 256 px for the whole photo, and the lesion classifier's crop (box + 0.25 margin) sees it
without the skin around it; the whole-image networks were trained on photos framed like dermoscopy, the lesion in
the middle with skin around. A square window of ``context`` x the main lesion's box side, centred on it and shifted
inside the photo, shows the whole-image view that framing. Earlier studies that do not answer this: the centred
zoom TTA of the whole view (no lesion), and wider crop margins for the lesion classifier (<= +0.0025).

Every photo of scripts/hybrid_rule_audit.py (all labelled validation photos, HAM10000 capped at 300 and also scored
squashed to 224x224) runs the shipped detector and the shipped whole-image view on each candidate window; the
scores are joined to the audit's cached views, and a candidate rule adds the zoom view to the shipped close-up blend
(a share of the views' weight moved to it), chosen on the photos and checked out of fold like the audit's grid.

Stop 33 (2026-12-07, 1,102 photos, ~15 min, with the first rule ``train closeup-rule`` chose: 5% gate, whole view 0.8,
main lesion in the ramp):
shipped 0.9171. The zoom view alone: derm7pt clinical 0.752 / 0.804 / 0.811 at context 1.5 / 2.5 / 4 (the whole view:
0.798), HAM10000 squashed 0.857-0.908 (whole 0.915). Added to the blend: best context 4, share 0.25, 0.9190 (+0.0019);
out of fold +0.0007 (min -0.0067). No gain: not built into the pipeline.

    python scripts/lesion_zoom_view_study.py [--contexts 1.5,2.5,4] [--out models/reports/lesion_zoom_view_study.json]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from rich.console import Console
from tqdm.auto import tqdm

from lesiontriage.data.manifest import load_manifest, resolve_path
from lesiontriage.hybrid import HybridRule, main_lesion_index
from lesiontriage.paths import RUNS_DIR
from lesiontriage.pipeline import TriagePipeline, _to_tensor
from lesiontriage.train.box_rule import stratum_aucs
from lesiontriage.train.closeup_rule import blend_scores, cached_photo_views, macro_of
from lesiontriage.train.main_lesion_check import confirmation_rows


def zoom_window(box: np.ndarray, context: float, width: int, height: int) -> tuple[int, int, int, int]:
    """Square window of ``context`` x the box's longer side around its centre, shifted to lie inside the photo
    (and no larger than its shorter side): (x1, y1, x2, y2) in pixels."""
    x1, y1, x2, y2 = (float(v) for v in box)
    side = min(max(x2 - x1, y2 - y1) * context, float(min(width, height)))
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    left = float(np.clip(cx - side / 2, 0, width - side))
    top = float(np.clip(cy - side / 2, 0, height - side))
    return int(round(left)), int(round(top)), int(round(left + side)), int(round(top + side))


def zoom_scores(pipe: TriagePipeline, rows: pd.DataFrame, contexts: list[float]) -> pd.DataFrame:
    """Per photo (the audit's order: photos, then HAM10000 squashed): the whole-image view on each zoom window."""
    jobs = [(r, False) for _, r in rows.iterrows()] + [(r, True) for _, r in rows[rows["source"] == "ham10000"].iterrows()]
    recs = []
    for r, squash in tqdm(jobs, desc="zoom views"):
        path = resolve_path(r["path"], None)
        if squash:
            with Image.open(path) as im:
                img = pipe.load(im.convert("RGB").resize((224, 224), Image.BILINEAR), name=str(path))
        else:
            img = pipe.load(path)
        boxes, det_scores, _ = pipe.detect_scored(img.rgb)
        rec = {"path": r["path"], "squash": squash}
        if len(boxes):
            h, w = img.rgb.shape[:2]
            box = boxes[main_lesion_index(det_scores)]
            crops = []
            for c in contexts:
                x1, y1, x2, y2 = zoom_window(box, c, w, h)
                crops.append(_to_tensor(np.ascontiguousarray(img.rgb[y1:y2, x1:x2])))
            batch = pipe._normalise(crops, pipe.image_classifier.config)
            p = pipe.classify(batch, pipe.image_classifier, pipe.image_clf_meta)[0]
            rec.update({f"zoom_{c:g}": float(v) for c, v in zip(contexts, p)})
        recs.append(rec)
    return pd.DataFrame(recs)


def with_zoom(photos: pd.DataFrame, col: str, share: float, rule) -> np.ndarray:
    """The rule's scores with ``share`` of the views' weight on each blended photo moved from the whole-image view
    to the zoom view (photos without a kept lesion keep their no-lesion score)."""
    moved = photos.assign(whole=(1 - share) * photos["whole"] + share * photos[col].fillna(photos["whole"]))
    return blend_scores(moved, rule)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", default="1.5,2.5,4")
    ap.add_argument("--ham-cap", type=int, default=300)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    contexts = [float(c) for c in args.contexts.split(",")]
    pipe = TriagePipeline.from_dir()
    rows = confirmation_rows(load_manifest(None), args.ham_cap)
    photos = cached_photo_views(pipe, rows, True)
    cache = RUNS_DIR / "hybrid_audit" / f"zoom_{'_'.join(f'{c:g}' for c in contexts)}_{len(photos)}.parquet"
    if cache.exists():
        zoom = pd.read_parquet(cache)
    else:
        torch.set_num_threads(2)
        zoom = zoom_scores(pipe, rows, contexts)
        zoom.to_parquet(cache)
    photos = pd.concat([photos.reset_index(drop=True), zoom.drop(columns=["path", "squash"]).reset_index(drop=True)], axis=1)
    s = pipe.settings
    shipped = HybridRule(s.whole_image_weight, s.closeup_min_box_fraction, s.full_frame_weight, s.closeup_ramp_from,
                         s.no_lesion_views, s.closeup_ramp_primary_lesion)
    base = macro_of(photos, blend_scores(photos, shipped))
    console = Console()
    table = []
    for c in contexts:
        col = f"zoom_{c:g}"
        alone = stratum_aucs(photos.assign(score=photos[col].fillna(photos["whole"])))
        for share in (0.25, 0.5, 0.75, 1.0):
            scores = with_zoom(photos, col, share, shipped)
            aucs = stratum_aucs(photos.assign(score=scores))
            table.append({"context": c, "share": share, "macro": round(float(np.mean(list(aucs.values()))), 4),
                          **{k: round(v, 4) for k, v in aucs.items()}})
        console.print(f"context {c:g}: zoom view alone per stratum {({k: round(v, 3) for k, v in alone.items()})}")
    table = pd.DataFrame(table).sort_values("macro", ascending=False, ignore_index=True)
    console.print(f"shipped {base:.4f}")
    console.print(table.to_string())
    # Out of fold: choose (context, share) on half the photos, score it against the shipped rule on the other half.
    rng = np.random.default_rng(0)
    gains = []
    for _ in range(5):
        fold = np.zeros(len(photos), dtype=int)
        for _, idx in photos.groupby(["stratum", "y"]).indices.items():
            fold[idx] = rng.permutation(len(idx)) % 2
        for k in range(2):
            train, test = photos[fold != k], photos[fold == k]
            best = max(((c, sh) for c in contexts for sh in (0.25, 0.5, 0.75, 1.0)),
                       key=lambda cs: macro_of(train, with_zoom(train, f"zoom_{cs[0]:g}", cs[1], shipped)))
            gains.append(macro_of(test, with_zoom(test, f"zoom_{best[0]:g}", best[1], shipped))
                         - macro_of(test, blend_scores(test, shipped)))
    console.print(f"out-of-fold gain of choosing here: mean {np.mean(gains):+.4f} (min {np.min(gains):+.4f}, max {np.max(gains):+.4f})")
    if args.out:
        args.out.write_text(json.dumps({"command": "python scripts/lesion_zoom_view_study.py", "date": dt.date.today().isoformat(),
                                        "n_photos": len(photos), "shipped_macro": round(base, 4),
                                        "table": table.to_dict(orient="records"),
                                        "out_of_fold_gain": {"mean": round(float(np.mean(gains)), 4),
                                                             "min": round(float(np.min(gains)), 4),
                                                             "max": round(float(np.max(gains)), 4)}}, indent=1))


if __name__ == "__main__":
    main()
