"""Choose the close-up blend (lesiontriage.hybrid) on validation photos, never test.

``lesiontriage train hybrid``:

1. **Gate.** Runs the shipped detector + box selection on the wide-field validation photos (the
   real mole photos of the val split and synthetic val scenes, generated here when absent) and sets
   ``closeup_min_box_fraction`` to the smallest candidate above the largest-box fraction of every
   one of them: the whole-image classifier was trained on close-ups only and must not score scenes.
2. **Weights.** On the labelled validation photos of ``train box-rule`` (the same cached detections
   and flip-TTA lesion probabilities) plus two whole-frame views per photo (the whole-image
   classifier's p and the lesion classifier's p on the whole frame, flip TTA as shipped), scores
   every candidate pair (whole-image weight, full-frame weight) with that gate: image score per
   photo, ROC AUC per source x modality stratum, macro mean under the default aggregation. A pair
   replaces (0, 0) (the pure two-stage score) only with a gain >= ``min_gain``.
3. **Soft gate.** The same grid again for each candidate ``ramp_from`` (views' weights shrinking
   linearly below the gate instead of dropping to 0). A ramp replaces the hard gate only with a
   further gain >= ``min_gain`` *and* if the labelled synthetic validation scenes' image AUC (the
   wide-field photos a ramp could touch) does not fall by more than ``scene_tolerance``.
4. **No lesion kept.** The grid once more with photos without a kept lesion scored by the views
   alone (``no_lesion_views``) instead of 0; switched on only with a further gain >= ``min_gain``.
5. **Close-up crop context.** Steps 2-4 once per lesion-crop margin (``crop_margins`` and the classifier's trained
   one) for the lesions of close-ups (largest kept box at or above the gate; every other photo keeps the trained
   margin: on 200 validation scenes a margin of 1.0 for every crop cut the wide-field lesions' AUC from 0.70 to
   0.63). A margin replaces the trained one only with a macro gain >= ``min_gain`` of its final rule and the
   validation scenes' image AUC within ``scene_tolerance``; it ships as ``pipeline.closeup_crop_margin``.
6. **Main lesion in the ramp** (inside step 5, per margin, only when a soft gate was chosen): photos inside the ramp
   scored on their main lesion (most confident detection) instead of the aggregate over every kept box
   (``ramp_primary_lesion``, hybrid.py); switched on only with a further gain >= ``min_gain`` and the validation
   scenes' image AUC within ``scene_tolerance``, and then only if the gain >= ``min_gain`` holds on every labelled
   validation photo too (train/main_lesion_check.py: the rule touches few photos, so the sample can mislead).
   Ships as ``pipeline.closeup_ramp_primary_lesion``.

Before all of this, **the whole-image view** (networks/whole_view.py), on every labelled validation photo (whole,
as the whole-image trainer validates): each candidate member set (``--whole-image-ensemble``: every set of the
installed ``image_classifier*`` models containing ``image_classifier``) x sub-type share alpha (``subtype_weights``:
0 = the binary head alone, 1 = the 8-way head's malignant mass alone) x test-time augmentation (the trained input size
and each of ``whole_view_sizes``, each without and with averaging over the photo's h/v flips) gets the view's macro
AUC over the strata and, for alpha > 0, a temperature fitted on those photos (NLL); a candidate replaces the shipped
view only with a gain >= ``min_gain``. The blend is then chosen for the view that ships.

Writes ``pipeline.whole_image_weight``, ``pipeline.full_frame_weight``,
``pipeline.closeup_min_box_fraction``, ``pipeline.closeup_ramp_from``, ``pipeline.closeup_crop_margin``,
``pipeline.closeup_ramp_primary_lesion``,
``pipeline.whole_image_members``,
``pipeline.whole_image_subtype_weight``, ``pipeline.whole_image_temperature``, ``pipeline.whole_image_input_size``,
``pipeline.whole_image_flip_tta`` and the tables under
``pipeline.hybrid_choice`` in ``models/metadata.json``. Run ``train closeup-rule`` afterwards (train/closeup_rule.py:
the same rule family re-chosen on every labelled validation photo, where the gate is guarded by the validation scenes'
AUC rather than set above every wide-field photo's largest box; since stop 33 it moved the gate from 15% to 5%), then
``train tiers``: the tiers are thresholds on the scores this rule produces.
"""
from __future__ import annotations

import datetime as dt
import pickle
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score
from tqdm.auto import tqdm

from lesiontriage.box_selection import select_boxes
from lesiontriage.data.manifest import load_manifest, manifest_hash, resolve_path
from lesiontriage.errors import ModelError
from lesiontriage.hybrid import HybridRule, largest_box_fraction
from lesiontriage.networks.whole_view import subtype_malignant_logit, whole_view_spec
from lesiontriage.paths import MODELS_DIR, RUNS_DIR
from lesiontriage.pipeline import _to_tensor
from lesiontriage.train.box_rule import BoxRuleStudy, _load, collect, merge_tag, stratum_aucs, validation_detections
from lesiontriage.train.main_lesion_check import confirm_main_lesion
from lesiontriage.train.tiers import validation_images
from lesiontriage.weights import read_metadata, write_metadata


@dataclass
class HybridStudy:
    """Candidates and decision criterion."""

    weights: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)  # per view
    min_lesion_weight: float = 0.2  # the lesions keep a say: the tier names the lesion that drives it
    gates: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5)
    aggregate: str = "mean"
    min_gain: float = 0.005
    val_scenes: int = 40  # synthetic validation scenes for the gate (seed 3)
    scene_seed: int = 3
    # Soft-gate starts: below 2% of the frame a box is a mole on a wide-field photo (their median is 0.75%).
    ramps: tuple[float, ...] = (0.02, 0.05)
    scene_tolerance: float = 0.01  # the most a ramp may cost the validation scenes' image AUC
    # The whole-image view's sub-type share alpha (networks/whole_view.py): 0 = binary head, 1 = sub-type mass.
    subtype_weights: tuple[float, ...] = (0.0, 0.5, 1.0)
    # Extra input sides for the whole-image view (besides the trained one), each without and with h/v flips:
    # scripts/whole_view_tta_study.py measured 256 px + flips at +0.0054 for the three-member view; 288 px did not help.
    whole_view_sizes: tuple[int, ...] = (256,)
    # Close-up lesion-crop context margins besides the classifier's trained one (crop side = box side x (1 + 2 margin));
    # the sets without given boxes (derm7pt, SD-198) were trained on whole photos, so a close-up's crop may need more.
    crop_margins: tuple[float, ...] = (0.5, 0.75, 1.0)
    # Step 6's confirmation: HAM10000 validation photos scored (of ~1,200; nearly all frame-filling, untouched by it)
    main_lesion_ham_cap: int = 300


@dataclass
class CloseUp:
    """One labelled validation photo: kept lesions' p (flip TTA as shipped), sizes, whole-frame views."""

    stratum: str
    y: int
    lesion_p: np.ndarray
    box_fraction: float
    whole_p: float  # direct whole-image classifier
    frame_p: float = float("nan")  # lesion classifier on the whole frame
    det_scores: np.ndarray | None = None  # kept lesions' detection scores (None: lesion_p is in the detector's order)

    def detection_scores(self) -> np.ndarray:
        """The kept lesions' detection scores; without them a descending stand-in for the detector's best-first order."""
        if self.det_scores is not None:
            return np.asarray(self.det_scores, dtype=np.float64)
        return -np.arange(len(self.lesion_p), dtype=np.float64)


def weight_pairs(weights: tuple[float, ...], min_lesion_weight: float) -> list[tuple[float, float]]:
    """Every (whole-image, full-frame) candidate leaving the lesion aggregate >= ``min_lesion_weight``."""
    return [(w, f) for w in weights for f in weights if w + f <= 1.0 - min_lesion_weight + 1e-9]


def choose_gate(widefield_fractions: list[float], gates: tuple[float, ...]) -> float:
    """The smallest candidate gate above every wide-field photo's largest-box fraction."""
    top = max(widefield_fractions, default=0.0)
    above = [g for g in sorted(gates) if g > top]
    return above[0] if above else float("inf")


def photo_score(rule: HybridRule, ph: CloseUp, agg: str) -> tuple[float, bool]:
    """(image score, blended) of one photo under ``rule``: what ``TriagePipeline.predict`` computes."""
    s = rule.lesion_term(ph.lesion_p, ph.detection_scores(), agg, ph.box_fraction)[0]
    photo_rule = rule.for_fraction(ph.box_fraction, bool(len(ph.lesion_p)))
    if photo_rule is None:
        return s, False
    return photo_rule.blend(s, ph.whole_p, ph.frame_p), True


def score_table(photos: list[CloseUp], pairs: list[tuple[float, float]], gate: float, agg: str,
                ramp_from: float | None = None, no_lesion_views: bool = False,
                main_lesion: bool = False) -> pd.DataFrame:
    """Macro / per-stratum AUC and the share of photos blended, for every (whole-image, full-frame)
    weight pair at this gate (a bare float w stands for the pair (w, 0)); ``ramp_from``: soft gate;
    ``no_lesion_views``: photos without a kept lesion scored by the views; ``main_lesion``: photos inside the ramp
    scored on their main lesion (``HybridRule.ramp_primary_lesion``)."""
    rows = []
    for pair in pairs:
        w, f = (float(pair), 0.0) if np.isscalar(pair) else (float(pair[0]), float(pair[1]))
        rule = HybridRule(w, gate, f, ramp_from, no_lesion_views, main_lesion and ramp_from is not None)
        recs = []
        for ph in photos:
            score, blended = photo_score(rule, ph, agg)
            recs.append({"stratum": ph.stratum, "y": ph.y, "score": score, "blended": blended})
        df = pd.DataFrame(recs)
        aucs = stratum_aucs(df)
        rows.append({"whole_image_weight": w, "full_frame_weight": f, "closeup_min_box_fraction": gate,
                     "ramp_from": ramp_from, "no_lesion_views": no_lesion_views, "main_lesion": main_lesion,
                     "blended_share": float(df["blended"].mean()), **aucs,
                     "macro": float(np.mean(list(aucs.values())))})
    return pd.DataFrame(rows)


def scene_auc(rule: HybridRule, scenes: list[CloseUp], agg: str) -> float | None:
    """Image ROC AUC on the labelled synthetic validation scenes under ``rule`` (None without both classes)."""
    y = [ph.y for ph in scenes]
    if not 0 < sum(y) < len(y):
        return None
    return float(roc_auc_score(y, [photo_score(rule, ph, agg)[0] for ph in scenes]))


def choose_ramp(tables: dict[float, pd.DataFrame], hard_macro: float, scene_aucs: dict[float, float | None],
                hard_scene_auc: float | None, study: HybridStudy) -> float | None:
    """The soft-gate start whose best pair beats the hard gate's choice by >= ``min_gain`` macro AUC and
    keeps the validation scenes' AUC within ``scene_tolerance``; the best such, else None (hard gate)."""
    ok = []
    for ramp, table in tables.items():
        macro = float(table["macro"].max())
        scenes_fine = hard_scene_auc is None or scene_aucs.get(ramp) is None or \
            scene_aucs[ramp] >= hard_scene_auc - study.scene_tolerance
        if macro - hard_macro >= study.min_gain and scenes_fine:
            ok.append((macro, ramp))
    return max(ok)[1] if ok else None


def choose_weights(table: pd.DataFrame, min_gain: float) -> tuple[float, float]:
    """The best (whole-image, full-frame) pair by macro AUC, or (0, 0) unless it gains >= ``min_gain``."""
    best = table.loc[table["macro"].idxmax()]
    off = table[(table["whole_image_weight"] == 0.0) & (table["full_frame_weight"] == 0.0)]
    gain = float(best["macro"]) - float(off["macro"].iloc[0])
    return (float(best["whole_image_weight"]), float(best["full_frame_weight"])) if gain >= min_gain else (0.0, 0.0)


def choose_weight(table: pd.DataFrame, min_gain: float) -> float:
    """The whole-image weight of :func:`choose_weights` (tables of whole-image weights alone)."""
    return choose_weights(table, min_gain)[0]


@dataclass
class MemberLogits:
    """One whole-image member's raw outputs on the validation photos under one test-time augmentation: binary logit /
    its temperature [N] and the sub-type head's malignant-mass logit [N] (networks/whole_view.py), each averaged over
    the views. ``tta``: (input side in px, flips); None = the member's trained size, no flips."""

    key: str
    binary: np.ndarray
    subtype: np.ndarray
    tta: tuple[int, bool] | None = None


def whole_score_table(members: list[MemberLogits], strata: list[str], y: np.ndarray, subtype_weights: tuple[float, ...],
                      member_sets: list[tuple[str, ...]] | None = None) -> pd.DataFrame:
    """Per candidate (augmentation, member set, alpha): the view's temperature (fitted by NLL for alpha > 0; 1 = the
    members' own) and its macro / per-stratum ROC AUC on the validation photos. ``member_sets`` default: all
    ``members`` together. An augmentation is a candidate when every member of the set was run under it."""
    from lesiontriage.evaluate.calibration import fit_temperature

    by_key = {(m.key, m.tta): m for m in members}
    variants = list(dict.fromkeys(m.tta for m in members))
    rows = []
    for tta in variants:
        for keys in member_sets or [tuple(dict.fromkeys(m.key for m in members))]:
            if any((k, tta) not in by_key for k in keys):
                continue
            for alpha in subtype_weights:
                z = np.mean([(1.0 - alpha) * by_key[k, tta].binary + alpha * by_key[k, tta].subtype for k in keys], axis=0)
                temperature = fit_temperature(z, y) if alpha > 0 else 1.0
                aucs = stratum_aucs(pd.DataFrame({"stratum": strata, "y": y, "score": z}))
                rows.append({"members": "+".join(keys), "subtype_weight": float(alpha),
                             "input_size": None if tta is None else int(tta[0]),
                             "flip_tta": None if tta is None else bool(tta[1]), "temperature": float(temperature),
                             **aucs, "macro": float(np.mean(list(aucs.values())))})
    return pd.DataFrame(rows)


def _tta_of(row: pd.Series) -> tuple[int, bool] | None:
    size = row.get("input_size")
    return None if size is None or pd.isna(size) else (int(size), bool(row["flip_tta"]))


def choose_whole_view(table: pd.DataFrame, min_gain: float, baseline: tuple
                      ) -> tuple[tuple[str, ...], float, float, tuple[int, bool] | None]:
    """(members, alpha, temperature, augmentation) of the best row by macro AUC, or the ``baseline`` row
    ((members, alpha) or (members, alpha, augmentation)) unless the best gains >= ``min_gain`` over it."""
    keys, alpha = baseline[0], baseline[1]
    tta = baseline[2] if len(baseline) > 2 else None
    base = table[(table["members"] == "+".join(keys)) & (table["subtype_weight"] == float(alpha))]
    if tta is not None and "input_size" in table:
        base = base[(base["input_size"] == tta[0]) & (base["flip_tta"] == tta[1])]
    if base.empty:
        raise ValueError(f"the candidates must include the baseline {baseline}")
    best = table.loc[table["macro"].idxmax()]
    row = best if float(best["macro"]) - float(base["macro"].iloc[0]) >= min_gain else base.iloc[0]
    return tuple(str(row["members"]).split("+")), float(row["subtype_weight"]), float(row["temperature"]), _tta_of(row)


def whole_member_sets(available: list[str], ensemble: bool | None, current: tuple[str, ...]) -> list[tuple[str, ...]]:
    """Candidate member sets: every set of the ``available`` whole-image models that contains ``image_classifier``
    (``ensemble`` True), that model alone (False), or the ``current`` set (None: keep the view's members)."""
    from itertools import combinations

    if ensemble is None:
        return [current]
    if not ensemble:
        return [("image_classifier",)]
    others = [k for k in available if k != "image_classifier"]
    return [("image_classifier", *c) for n in range(len(others) + 1) for c in combinations(others, n)]


def _member_logits(models_dir: Path, meta: dict[str, Any], keys: list[str], rows: pd.DataFrame,
                   data_root: Path | None, sizes: tuple[int | None, ...] = (None,)) -> list[MemberLogits]:
    """Each whole-image model's binary and sub-type-mass logits on the whole validation split, each photo whole as
    the whole-image trainer validates it, at each input size (None: the trained one) without and with h/v flips
    (one :class:`MemberLogits` per model x size x flips; the photo and its two flips cached per model and size)."""
    import torch
    from torch.utils.data import DataLoader

    from lesiontriage.data.torch_datasets import LesionImageDataset
    from lesiontriage.pipeline import TriagePipeline

    out = []
    for key in keys:
        entry = meta["models"][key]
        model = None
        for side in dict.fromkeys(int(size or entry["config"]["input_size"]) for size in sizes):  # each side once
            cache = RUNS_DIR / "hybrid" / f"member_{entry['sha256'][:12]}_{side}px_flips_{len(rows)}.pkl"
            if cache.exists():
                binary, subtype = pickle.loads(cache.read_bytes())
            else:
                model = model or TriagePipeline._load_classifier(models_dir, entry)
                cfg = model.config
                ds = LesionImageDataset(rows, train=False, input_size=side, mean=cfg.mean, std=cfg.std, mode="whole",
                                        margin=cfg.crop_margin, data_root=data_root)
                binary, subtype = [], []
                with torch.inference_mode():
                    for x, _, _ in tqdm(DataLoader(ds, batch_size=16, num_workers=1), desc=f"{key} @ {side} px + flips",
                                        leave=False):
                        n = len(x)
                        views = torch.cat([x, x.flip(-1), x.flip(-2)]).contiguous(memory_format=torch.channels_last)
                        logit, sub = model(views)
                        binary.append(logit.float().reshape(3, n).T.numpy())
                        subtype.append(subtype_malignant_logit(sub, tuple(cfg.subtypes)).reshape(3, n).T.numpy())
                binary, subtype = np.concatenate(binary) / float(entry.get("temperature", 1.0)), np.concatenate(subtype)
                cache.parent.mkdir(parents=True, exist_ok=True)
                cache.write_bytes(pickle.dumps((binary, subtype)))
            for flips in (False, True):
                views = slice(None) if flips else slice(0, 1)
                out.append(MemberLogits(key, binary[:, views].mean(1), subtype[:, views].mean(1), (side, flips)))
    return out


def choose_whole_score(models_dir: Path, manifest: pd.DataFrame, data_root: Path | None, study: HybridStudy,
                       ensemble: bool | None = None) -> dict[str, Any]:
    """Step 0: choose the whole-image view (which members, binary head or sub-type mass, input size and flips) on
    the whole validation split and write it, with its temperature, to metadata.json; returns the decision record.
    Every labelled val photo, not the blend study's per-stratum sample: on that 585-photo sample the sub-type head
    gained 0.007 macro AUC, on all 1,710 only 0.002, and the test splits fell when it shipped on the sample's word."""
    from lesiontriage.train.classifier import ClassifierTrainConfig, select_rows

    meta = read_metadata(models_dir)
    pipeline = meta.setdefault("pipeline", {})
    rows = select_rows(manifest, "val", ClassifierTrainConfig().sources)
    current = whole_view_spec(meta)
    available = sorted(k for k in meta["models"] if k.startswith("image_classifier"))
    sets = whole_member_sets(available, ensemble, current.members)
    keys = sorted({k for ks in sets for k in ks})
    trained = int(meta["models"]["image_classifier"]["config"]["input_size"])
    members = _member_logits(models_dir, meta, keys, rows, data_root, (None, *study.whole_view_sizes))
    strata = (rows["source"] + "/" + rows["modality"]).astype(str).tolist()
    table = whole_score_table(members, strata, rows["malignant"].astype(int).to_numpy(), study.subtype_weights, sets)
    current_tta = (int(current.input_size or trained), current.flip_tta)
    baseline = (current.members, current.subtype_weight) if current.members in sets else (sets[0], 0.0)
    if baseline[1] not in study.subtype_weights:
        baseline = (baseline[0], 0.0)
    baseline = (*baseline, current_tta)
    chosen, alpha, temperature, tta = choose_whole_view(table, study.min_gain, baseline)
    size, flips = tta if tta is not None else (trained, False)
    pipeline["whole_image_members"] = list(chosen)
    pipeline["whole_image_ensemble"] = len(chosen) > 1  # what metadata said before members were listed
    pipeline["whole_image_subtype_weight"] = alpha
    pipeline["whole_image_temperature"] = temperature
    pipeline["whole_image_input_size"] = None if size == trained else int(size)
    pipeline["whole_image_flip_tta"] = bool(flips)
    write_metadata(models_dir, meta)
    return {"members": list(chosen), "subtype_weight": alpha, "temperature": temperature,
            "input_size": int(size), "flip_tta": bool(flips),
            "baseline": {"members": list(baseline[0]), "subtype_weight": baseline[1], "input_size": baseline[2][0],
                         "flip_tta": baseline[2][1]},
            "chosen_on": f"validation split: all {len(rows)} labelled photos, whole",
            "criterion": (f"whole-image view alone: macro ROC AUC over source x modality strata of the mean member "
                          f"logit (1 - alpha) * binary / T + alpha * sub-type malignant mass, at input sizes "
                          f"{sorted({trained, *study.whole_view_sizes})} px, without / with h+v flip averaging; a "
                          f"candidate replaces the shipped view only with a gain >= {study.min_gain}; temperature "
                          f"fitted on the same photos (NLL)"),
            "table": table.round(4).to_dict(orient="records")}


def _widefield_fractions(pipe, manifest: pd.DataFrame, study: HybridStudy, data_root: Path | None) -> list[dict[str, Any]]:
    from lesiontriage.data.scenes import generate_scenes

    scene_dir = RUNS_DIR / "scenes" / "val"
    scenes = sorted(scene_dir.glob(f"scene_val_{study.scene_seed}_*.jpg"))
    if len(scenes) < study.val_scenes:
        generate_scenes(study.val_scenes, seed=study.scene_seed, split="val", out_dir=scene_dir, manifest=manifest,
                        data_root=data_root, workers=2)
        scenes = sorted(scene_dir.glob(f"scene_val_{study.scene_seed}_*.jpg"))
    moles = manifest[(manifest["modality"] == "widefield") & (manifest["split"] == "val")]
    paths = [(str(resolve_path(p, data_root)), "real") for p in moles["path"]] + [(str(p), "synthetic") for p in scenes]
    out = []
    for path, kind in tqdm(paths, desc="wide-field validation photos"):
        img = pipe.load(path)
        boxes, _ = pipe.detect(img.rgb)
        h, w = img.rgb.shape[:2]
        out.append({"path": path, "kind": kind, "n_lesions": int(len(boxes)), "largest_box_fraction": largest_box_fraction(boxes, w, h)})
    return out


def _scene_views(pipe, study: HybridStudy, cache: Path) -> list[CloseUp]:
    """The labelled synthetic validation scenes as the study sees a photo (kept lesions' p, largest-box
    fraction, both whole-frame views), for the soft gate's wide-field check; cached per model set."""
    if cache.exists():
        return pickle.loads(cache.read_bytes())
    scene_dir = RUNS_DIR / "scenes" / "val"
    index = pd.read_parquet(scene_dir / "scenes.parquet")
    index = index[index["seed"] == study.scene_seed]
    out = []
    for _, r in tqdm(list(index.iterrows()), desc="validation scenes (soft-gate check)"):
        img = pipe.load(scene_dir / str(r["path"]))
        boxes, _ = pipe.detect(img.rgb)
        h, w = img.rgb.shape[:2]
        batch = pipe._normalise([_to_tensor(img.rgb)], pipe.image_classifier.config)
        out.append(CloseUp("synthetic_scenes", int(r["any_malignant"]),
                           np.asarray(pipe.lesion_probabilities(img.rgb, boxes)[0] if len(boxes) else np.zeros(0), dtype=np.float64),
                           largest_box_fraction(boxes, w, h),
                           float(pipe.classify(batch, pipe.image_classifier, pipe.image_clf_meta)[0][0]),
                           float(pipe.lesion_probabilities(img.rgb)[0][0])))
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_bytes(pickle.dumps(out))
    return out


def _frame_views(pipe, dets: list[dict[str, Any]], data_root: Path | None, cache: Path) -> list[float]:
    """The lesion classifier's p on each validation photo's whole frame (cached per classifier + TTA)."""
    if cache.exists():
        return pickle.loads(cache.read_bytes())
    out = []
    for d in tqdm(dets, desc="lesion classifier on the whole frame"):
        img = _load(pipe, pd.Series({"path": d["path"]}), d["squash"], data_root)
        out.append(float(pipe.lesion_probabilities(img.rgb)[0][0]))
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_bytes(pickle.dumps(out))
    return out


def _closeups(pipe, rows: pd.DataFrame, data_root: Path | None, cache: Path, closeup_margin: float | None = None,
              gate: float = float("inf")) -> list[CloseUp]:
    """The box-rule study's cached detections + the two whole-frame views and image size per photo; the lesions of a
    photo at or above ``gate`` classified with ``closeup_margin`` context (None: the trained one), as the pipeline does."""
    study = BoxRuleStudy()
    photos = collect(pipe, rows, study, data_root, RUNS_DIR / "box_rule")
    wider = collect(pipe, rows, study, data_root, RUNS_DIR / "box_rule", margin=closeup_margin) \
        if closeup_margin is not None else photos
    dets = validation_detections(pipe, rows, data_root, study)
    if cache.exists():
        extra = pickle.loads(cache.read_bytes())
    else:
        extra = []
        for d in tqdm(dets, desc="whole-image classifier"):
            img = _load(pipe, pd.Series({"path": d["path"]}), d["squash"], data_root)
            batch = pipe._normalise([_to_tensor(img.rgb)], pipe.image_classifier.config)
            p = float(pipe.classify(batch, pipe.image_classifier, pipe.image_clf_meta)[0][0])
            extra.append({"whole_p": p, "width": img.rgb.shape[1], "height": img.rgb.shape[0]})
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_bytes(pickle.dumps(extra))
    s = pipe.settings
    clf_tag = f"{pipe.clf_meta['sha256'][:12]}_tta{int(s.flip_tta)}_ens{int(pipe.second_classifier is not None)}"
    frames = _frame_views(pipe, dets, data_root, cache.parent / f"frame_{clf_tag}_{len(rows)}.pkl")
    out = []
    for ph, ph_wide, e, fp in zip(photos, wider, extra, frames):
        keep = select_boxes(ph.boxes, ph.scores, s.detector_score_threshold, s.max_lesions, s.nested_containment, s.widefield)
        fraction = largest_box_fraction(ph.boxes[keep], e["width"], e["height"])
        src = ph_wide if fraction >= gate else ph
        p = src.p_tta if s.tta_for(len(keep)) and src.p_tta is not None else src.p
        out.append(CloseUp(ph.stratum, ph.y, np.asarray(p)[keep], fraction, e["whole_p"], fp, np.asarray(ph.scores)[keep]))
    return out


@dataclass
class BlendChoice:
    """The close-up blend chosen for one lesion-crop margin, with what decides between margins."""

    weight: float
    frame_weight: float
    ramp: float | None
    no_lesion_views: bool
    soft: dict[str, Any]
    table: pd.DataFrame
    macro: float  # validation macro AUC of the chosen rule
    scene_auc: float | None  # labelled validation scenes' image AUC under the chosen rule
    main_lesion: bool = False  # photos inside the ramp scored on their main lesion (HybridRule.ramp_primary_lesion)


def choose_blend(pipe, photos: list[CloseUp], gate: float, study: HybridStudy, sha: dict[str, Any], tag: str) -> BlendChoice:
    """Steps 2-4 of the module docstring (weights, soft gate, no-lesion views) for the pipeline's current settings."""
    pairs = weight_pairs(study.weights, study.min_lesion_weight)
    table = score_table(photos, pairs, gate, study.aggregate)
    weight, frame_weight = choose_weights(table, study.min_gain) if np.isfinite(gate) else (0.0, 0.0)
    ramp, soft, no_lesion_views, main_lesion = None, {}, False, False
    clf_tag = f"{sha['classifier']['sha256'][:12]}_tta{int(pipe.settings.flip_tta)}_{pipe.settings.flip_tta_max_crops}"
    margin = pipe.settings.closeup_crop_margin  # changes a scene's lesions only if it is a close-up (none at this gate)
    margin_tag = "" if margin is None else f"_c{margin:g}@{gate:g}"
    scenes = _scene_views(pipe, study, RUNS_DIR / "hybrid" / f"scenes_{tag}_{clf_tag}{merge_tag(pipe.settings)}{margin_tag}.pkl")
    if np.isfinite(gate) and (weight or frame_weight):
        hard_macro = float(table[(table["whole_image_weight"] == weight) & (table["full_frame_weight"] == frame_weight)]["macro"].iloc[0])
        ramp_tables = {r: score_table(photos, pairs, gate, study.aggregate, r) for r in study.ramps}
        best = {r: t.loc[t["macro"].idxmax()] for r, t in ramp_tables.items()}
        scene_aucs = {r: scene_auc(HybridRule(float(b["whole_image_weight"]), gate, float(b["full_frame_weight"]), r), scenes,
                                   study.aggregate) for r, b in best.items()}
        hard_scene = scene_auc(HybridRule(weight, gate, frame_weight), scenes, study.aggregate)
        ramp = choose_ramp(ramp_tables, hard_macro, scene_aucs, hard_scene, study)
        if ramp is not None:
            weight, frame_weight = float(best[ramp]["whole_image_weight"]), float(best[ramp]["full_frame_weight"])
        chosen_macro = float(best[ramp]["macro"]) if ramp is not None else hard_macro
        fb_table = score_table(photos, pairs, gate, study.aggregate, ramp, no_lesion_views=True)
        fb_best = fb_table.loc[fb_table["macro"].idxmax()]
        no_lesion_views = float(fb_best["macro"]) - chosen_macro >= study.min_gain
        if no_lesion_views:
            weight, frame_weight = float(fb_best["whole_image_weight"]), float(fb_best["full_frame_weight"])
        if ramp is not None:  # step 6: the main lesion inside the ramp, the rest of the rule as chosen
            without = float(score_table(photos, [(weight, frame_weight)], gate, study.aggregate, ramp,
                                        no_lesion_views)["macro"].iloc[0])
            main_table = score_table(photos, [(weight, frame_weight)], gate, study.aggregate, ramp, no_lesion_views, True)
            with_main = float(main_table["macro"].iloc[0])
            scene_without = scene_auc(HybridRule(weight, gate, frame_weight, ramp, no_lesion_views), scenes, study.aggregate)
            scene_with = scene_auc(HybridRule(weight, gate, frame_weight, ramp, no_lesion_views, True), scenes, study.aggregate)
            scenes_fine = scene_without is None or scene_with is None or scene_with >= scene_without - study.scene_tolerance
            main_lesion = with_main - without >= study.min_gain and scenes_fine
            soft["main_lesion"] = {"macro_without": round(without, 4), "macro_with": round(with_main, 4),
                                   "scene_auc_without": scene_without, "scene_auc_with": scene_with,
                                   "strata_with": {k: round(float(main_table[k].iloc[0]), 4) for k in main_table.columns
                                                   if "/" in k},
                                   "n_photos_in_ramp": int(sum(len(p.lesion_p) > 0 and ramp < p.box_fraction < gate
                                                               for p in photos))}
        soft = {**soft, "hard_gate_macro": round(hard_macro, 4), "hard_gate_scene_auc": hard_scene,
                "no_lesion_views": {"macro_without": round(chosen_macro, 4), "macro_with": round(float(fb_best["macro"]), 4),
                                    "whole_image_weight": float(fb_best["whole_image_weight"]),
                                    "full_frame_weight": float(fb_best["full_frame_weight"]),
                                    "n_photos_without_lesion": int(sum(not len(p.lesion_p) for p in photos))},
                "n_scenes": len(scenes), "n_scenes_malignant": int(sum(s.y for s in scenes)),
                "candidates": [{"ramp_from": r, "whole_image_weight": float(best[r]["whole_image_weight"]),
                                "full_frame_weight": float(best[r]["full_frame_weight"]), "macro": round(float(best[r]["macro"]), 4),
                                "blended_share": round(float(best[r]["blended_share"]), 4), "scene_auc": scene_aucs[r]}
                               for r in study.ramps]}
    final = HybridRule(weight, gate, frame_weight, ramp, no_lesion_views, main_lesion) if np.isfinite(gate) else HybridRule()
    final_macro = float(score_table(photos, [(weight, frame_weight)], gate if np.isfinite(gate) else 1.0, study.aggregate,
                                    ramp, no_lesion_views, main_lesion)["macro"].iloc[0])
    return BlendChoice(weight, frame_weight, ramp, no_lesion_views, soft, table, final_macro,
                       scene_auc(final, scenes, study.aggregate), main_lesion)


def choose_margin(blends: dict[float, BlendChoice], trained_margin: float, study: HybridStudy) -> float:
    """The lesion-crop margin whose chosen blend beats the trained margin's by >= ``min_gain`` macro AUC without
    costing the validation scenes more than ``scene_tolerance`` image AUC; the best such, else the trained one."""
    base = blends[trained_margin]
    ok = [(b.macro, m) for m, b in blends.items() if m != trained_margin and b.macro - base.macro >= study.min_gain
          and (base.scene_auc is None or b.scene_auc is None or b.scene_auc >= base.scene_auc - study.scene_tolerance)]
    return max(ok)[1] if ok else trained_margin


def choose_hybrid(models_dir: Path = MODELS_DIR, manifest_path: Path | None = None, data_root: Path | None = None,
                  study: HybridStudy | None = None, command: str = "",
                  whole_image_ensemble: bool | None = None, keep_whole_view: bool = False) -> dict[str, Any]:
    """Run the study and store the chosen blend in metadata.json; returns the decision record.
    ``whole_image_ensemble``: True lets step 0 choose among every set of the installed whole-image models that
    contains ``image_classifier``, False makes the view that model alone, None keeps the view's members; the blend is
    then chosen for the whole-image view that will ship. ``keep_whole_view``: skip step 0 and keep the shipped view
    and its decision record (its members' validation logits at every candidate size cost ~25 minutes when the
    whole-image models have not changed)."""
    from lesiontriage.pipeline import TriagePipeline

    study = study or HybridStudy()
    if whole_image_ensemble and "image_classifier_2" not in read_metadata(models_dir).get("models", {}):
        # refuse before writing: a failed study must not leave metadata.json naming a model that is not there
        raise ModelError(f"--whole-image-ensemble needs image_classifier_2, which {models_dir / 'metadata.json'} "
                         "does not list (train it with `--config image_classifier_lite2_b`)")
    if whole_view_spec(read_metadata(models_dir)) is None:  # checked on metadata: the pipeline loads once, below
        raise ModelError(f"the close-up blend needs a whole-image classifier: {models_dir / 'metadata.json'} lists none "
                         "(run `lesiontriage train image-classifier` first)")
    manifest = load_manifest(manifest_path)
    if keep_whole_view:
        previous = read_metadata(models_dir).get("pipeline", {}).get("hybrid_choice", {})
        kept = previous.get("whole_image_score", {})  # a kept record keeps naming the run that chose it
        whole_score = {**kept, "kept_from": kept.get("kept_from") or f"{previous.get('command', '?')} ({previous.get('date', '?')})"}
    else:
        whole_score = choose_whole_score(models_dir, manifest, data_root, study, whole_image_ensemble)
    pipe = TriagePipeline.from_dir(models_dir)  # the whole-image view as chosen
    meta = read_metadata(models_dir)
    rows = validation_images(manifest, BoxRuleStudy().targets)
    wide = _widefield_fractions(pipe, manifest, study, data_root)
    gate = choose_gate([w["largest_box_fraction"] for w in wide], study.gates)
    sha = meta["models"]
    tag = f"{sha['detector']['sha256'][:12]}_{whole_view_spec(meta).sha256[:12]}_{len(rows)}"
    trained_margin = float(pipe.classifier.config.crop_margin)
    blends: dict[float, BlendChoice] = {}
    for margin in sorted({trained_margin, *study.crop_margins}):
        # the trained margin runs as None (no setting written): its caches are those of every earlier study
        closeup_margin = None if margin == trained_margin else margin
        pipe.settings = replace(pipe.settings, closeup_crop_margin=closeup_margin, closeup_min_box_fraction=gate)
        photos = _closeups(pipe, rows, data_root, RUNS_DIR / "hybrid" / f"whole_{tag}.pkl", closeup_margin, gate)
        blends[margin] = choose_blend(pipe, photos, gate, study, sha, tag)
    margin = choose_margin(blends, trained_margin, study)
    chosen = blends[margin]
    weight, frame_weight, ramp, no_lesion_views = chosen.weight, chosen.frame_weight, chosen.ramp, chosen.no_lesion_views
    main_lesion, main_check = chosen.main_lesion, None
    if main_lesion:  # step 6's confirmation on every labelled validation photo (train/main_lesion_check.py)
        pipe.settings = replace(pipe.settings, whole_image_weight=weight, full_frame_weight=frame_weight,
                                closeup_min_box_fraction=gate, closeup_ramp_from=ramp, no_lesion_views=no_lesion_views,
                                closeup_ramp_primary_lesion=True,
                                closeup_crop_margin=None if margin == trained_margin else margin)
        main_check = confirm_main_lesion(pipe, manifest, data_root, RUNS_DIR / "hybrid", study.min_gain, study.main_lesion_ham_cap)
        main_lesion = main_check.confirmed
    soft, table = chosen.soft, chosen.table
    record = {
        "whole_image_weight": weight,
        "full_frame_weight": frame_weight,
        "closeup_min_box_fraction": gate if np.isfinite(gate) else None,
        "closeup_ramp_from": ramp,
        "no_lesion_views": no_lesion_views,
        "closeup_ramp_primary_lesion": main_lesion,
        "main_lesion_confirmation": None if main_check is None else main_check.to_dict(),
        "closeup_crop_margin": margin,
        "crop_margins": [{"margin": m, "trained": m == trained_margin, "macro": round(b.macro, 4), "scene_auc": b.scene_auc,
                          "whole_image_weight": b.weight, "full_frame_weight": b.frame_weight, "ramp_from": b.ramp,
                          "no_lesion_views": b.no_lesion_views, "main_lesion": b.main_lesion} for m, b in blends.items()],
        "soft_gate": soft,
        "criterion": (f"gate: smallest candidate above the largest kept box / image area of every wide-field validation "
                      f"photo; weights (whole-image classifier, lesion classifier on the whole frame; the lesion "
                      f"aggregate keeps >= {study.min_lesion_weight}): macro ROC AUC over source x modality strata, "
                      f"{study.aggregate} aggregation; a pair replaces (0, 0) only with a gain >= {study.min_gain}; a soft "
                      f"gate (ramp_from) replaces the hard one only with a further gain >= {study.min_gain} and validation "
                      f"scenes' image AUC within {study.scene_tolerance} of the hard gate's; photos without a kept "
                      f"lesion scored by the views only with a further gain >= {study.min_gain}; photos inside the ramp scored "
                      f"on their main lesion only with a further gain >= {study.min_gain}, validation scenes' image AUC "
                      f"within {study.scene_tolerance} and a gain >= {study.min_gain} on every labelled validation photo "
                      f"(HAM10000: {study.main_lesion_ham_cap}); all of this per crop "
                      f"margin of the close-ups' lesions (photos under the gate keep the trained one), a margin replacing the classifier's trained {trained_margin:g} only with a gain >= "
                      f"{study.min_gain} and validation scenes' image AUC within {study.scene_tolerance} of its"),
        "chosen_on": (f"validation split: {len(rows)} labelled photos + the HAM10000 ones squashed to 224x224; "
                      f"wide-field: {sum(w['kind'] == 'real' for w in wide)} real mole photos + "
                      f"{sum(w['kind'] == 'synthetic' for w in wide)} synthetic scenes (seed {study.scene_seed})"),
        "widefield_largest_box_fraction": {"max": max((w["largest_box_fraction"] for w in wide), default=0.0),
                                           "median": float(np.median([w["largest_box_fraction"] for w in wide])) if wide else 0.0,
                                           "n": len(wide)},
        "table": table.round(4).to_dict(orient="records"),
        "study": asdict(study),
        "manifest_hash": manifest_hash(manifest),
        "model_sha256": {k: meta["models"][k]["sha256"] for k in ("detector", "classifier", *whole_view_spec(meta).members)},
        "whole_image_view": list(whole_view_spec(meta).members),
        "whole_image_score": whole_score,
        "command": command,
        "date": dt.date.today().isoformat(),
    }
    meta.setdefault("pipeline", {})["whole_image_weight"] = weight
    meta["pipeline"]["full_frame_weight"] = frame_weight
    meta["pipeline"]["closeup_min_box_fraction"] = gate if np.isfinite(gate) else 1.0
    meta["pipeline"]["closeup_ramp_from"] = ramp
    meta["pipeline"]["no_lesion_views"] = no_lesion_views
    meta["pipeline"]["closeup_ramp_primary_lesion"] = main_lesion
    meta["pipeline"].pop("lesion_crop_margin", None)  # stop 29's first form: every crop, wide-field too
    meta["pipeline"]["closeup_crop_margin"] = None if margin == trained_margin else margin
    meta["pipeline"]["hybrid_choice"] = record
    write_metadata(models_dir, meta)
    return record
