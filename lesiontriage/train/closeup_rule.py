"""Re-choose the close-up rule on every labelled validation photo: ``lesiontriage train closeup-rule``.

Why a second step after ``train hybrid``: that study chooses the close-up blend (weights of the two whole-photo views,
gate, soft-gate start, main lesion) on the box-rule study's sample (120 photos per source x modality), and its gate
is the smallest candidate above the largest kept box of *every* wide-field validation photo, real or synthetic. Two
things came out of scoring all 802 labelled validation photos (+ the 300 HAM10000 ones squashed to 224x224, the
ISIC 2018 test look) with the shipped pipeline (stop 33, ``scripts/hybrid_rule_audit.py --grid``):

- inside ``train hybrid``'s own space (gate fixed by the wide-field rule) the shipped rule holds: the best of 220
  rules gains +0.0028 in sample and loses out of fold (-0.0019);
- the gate is what costs: one synthetic validation scene has a 14% box, which pushes the gate to 15%, while clinical
  close-ups of a small lesion (derm7pt clinical: largest kept box median 4% among those under the gate) then get
  the views only partly. With a lower gate the macro AUC rose by ~0.01, mostly derm7pt clinical (0.81 -> 0.84).

So this step searches the same rule family over every study gate, with the wide-field photos as a *measured* guard
instead of a geometric one: the labelled validation scenes' image AUC may not fall more than ``scene_tolerance``
below the current rule's (``train hybrid``'s own guard for its soft gate). The real wide-field validation photos
(mole photos without a diagnosis, so without an AUC) cannot guard: their largest kept box already reaches 14% of the
frame, and the shipped soft gate already gives 6 of 17 some view weight; the record reports how many reach full view
weight under each rule. The views never change a lesion's box or probability, only the image score. A candidate
replaces the current rule only when (1) it gains >= ``min_gain`` macro AUC on the photos, and (2) *choosing* it is
worth >= ``min_gain`` out of fold: stratified 2-fold splits, repeated, the grid's best on one half scored against the
current rule on the other, so the selection's own optimism (best of ~1,300 rules) cannot pass the bar. As in
``train hybrid``, scoring the ramp's photos on their main lesion must earn its own ``min_gain`` over the same rule
without it (stop 33's first run chose it on a +0.0001 tie; the rule then shipped without it).
Writes ``pipeline.closeup_min_box_fraction``, ``closeup_ramp_from``,
``whole_image_weight``, ``full_frame_weight``, ``closeup_ramp_primary_lesion`` and the record
``pipeline.closeup_rule_choice``; run ``train tiers`` and ``evaluate`` afterwards.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from sklearn.metrics import roc_auc_score
from tqdm.auto import tqdm

from lesiontriage.aggregation import aggregate
from lesiontriage.data.manifest import load_manifest, manifest_hash, resolve_path
from lesiontriage.errors import ModelError
from lesiontriage.hybrid import HybridRule, largest_box_fraction, main_lesion_index
from lesiontriage.paths import MODELS_DIR, RUNS_DIR
from lesiontriage.train.box_rule import SQUASHED_STRATUM, stratum_aucs
from lesiontriage.train.hybrid import HybridStudy, _scene_views, _widefield_fractions
from lesiontriage.train.main_lesion_check import confirmation_rows
from lesiontriage.weights import read_metadata, write_metadata


@dataclass
class CloseupRuleStudy:
    """Candidates and decision criterion (the weights, gates, ramps, bars and guards of ``train hybrid``)."""

    weights: tuple[float, ...] = HybridStudy.weights
    min_lesion_weight: float = HybridStudy.min_lesion_weight
    gates: tuple[float, ...] = HybridStudy.gates
    ramps: tuple[float | None, ...] = (None, *HybridStudy.ramps)
    min_gain: float = HybridStudy.min_gain
    scene_tolerance: float = HybridStudy.scene_tolerance
    ham_cap: int = 300  # HAM10000 validation photos scored (of ~1,200), each also squashed to 224x224
    folds: int = 2
    repeats: int = 5
    seed: int = 0


# ---- per-photo views (the slow part, cached) ---------------------------------------------------------------------

def photo_views(pipe, rows: pd.DataFrame, squashed: bool = True, data_root: Path | None = None) -> pd.DataFrame:
    """Per photo: the lesion terms (mean / max / noisy-OR / main lesion), kept lesions, largest-box fraction and both
    whole-photo views, from the pipeline run with the close-up gate at 0 and both views weighted (so both exist for
    every photo, whatever weights ship: a view with weight 0 is not computed). With ``squashed`` the HAM10000 photos
    are scored a second time squashed to 224x224 (``SQUASHED_STRATUM``). A close-up crop margin would, with the gate
    at 0, widen every photo's crops, so the study refuses one (it ships unset: the trained margin)."""
    shipped = pipe.settings
    if shipped.closeup_crop_margin is not None:
        raise ModelError("the close-up rule study assumes the classifier's trained crop margin; "
                         f"pipeline.closeup_crop_margin is {shipped.closeup_crop_margin}")
    pipe.settings = dataclasses.replace(shipped, closeup_min_box_fraction=0.0, closeup_ramp_from=None, no_lesion_views=True,
                                        closeup_ramp_primary_lesion=False, whole_image_weight=0.5, full_frame_weight=0.3)
    jobs = [(r, False) for _, r in rows.iterrows()]
    if squashed:
        jobs += [(r, True) for _, r in rows[rows["source"] == "ham10000"].iterrows()]
    recs = []
    try:
        for r, squash in tqdm(jobs, desc="validation photos"):
            path = resolve_path(r["path"], data_root)
            if squash:
                with Image.open(path) as im:
                    res = pipe.predict(im.convert("RGB").resize((224, 224), Image.BILINEAR), "mean", name=str(path))
            else:
                res = pipe.predict(path, "mean")
            boxes = np.array([l.box for l in res.lesions], dtype=float).reshape(-1, 4)
            p = [l.p_malignant for l in res.lesions]
            main = p[main_lesion_index([l.detector_score for l in res.lesions])] if p else 0.0
            recs.append({"stratum": SQUASHED_STRATUM if squash else f"{r['source']}/{r['modality']}", "y": int(r["malignant"]),
                         "lesion": res.lesion_score, "lesion_max": aggregate(p, "max"), "lesion_noisy_or": aggregate(p, "noisy_or"),
                         "lesion_main": float(main), "n": res.n_lesions, "whole": res.whole_image_score,
                         "frame": res.full_frame_score,
                         "fraction": largest_box_fraction(boxes, res.width, res.height) if len(boxes) else 0.0})
    finally:
        pipe.settings = shipped
    return pd.DataFrame(recs)


def cached_photo_views(pipe, rows: pd.DataFrame, squashed: bool = True, data_root: Path | None = None) -> pd.DataFrame:
    """:func:`photo_views`, cached under ``runs/hybrid_audit/`` per models + settings + photos. The close-up rule's
    own settings are left out of the key: the views are computed with the gate at 0, whatever the rule."""
    rule_keys = {"closeup_min_box_fraction", "closeup_ramp_from", "whole_image_weight", "full_frame_weight",
                 "no_lesion_views", "closeup_ramp_primary_lesion"}
    settings = {k: v for k, v in dataclasses.asdict(pipe.settings).items() if k not in rule_keys}
    key = json.dumps([sorted((k, v["sha256"]) for k, v in pipe.metadata["models"].items()), settings,
                      sorted(rows["path"]), squashed], default=str)
    cache = RUNS_DIR / "hybrid_audit" / f"views_{hashlib.sha256(key.encode()).hexdigest()[:16]}.parquet"
    if cache.exists():
        return pd.read_parquet(cache)
    photos = photo_views(pipe, rows, squashed, data_root)
    cache.parent.mkdir(parents=True, exist_ok=True)
    photos.to_parquet(cache)
    return photos


# ---- scoring rules on the cached views ---------------------------------------------------------------------------

def blend_scores(photos: pd.DataFrame, rule: HybridRule) -> np.ndarray:
    """Every photo's image score under ``rule``: ``HybridRule.for_fraction`` + ``blend`` (the pipeline's arithmetic,
    main lesion in the ramp included), vectorised for grids; ``photos`` has the columns of :func:`photo_views`."""
    frac, has = photos["fraction"].to_numpy(), photos["n"].to_numpy() > 0
    gate, ramp = rule.closeup_min_box_fraction, rule.ramp_from
    k = np.where(frac >= gate, 1.0, 0.0)
    if ramp is not None:
        k = np.where((frac > ramp) & (frac < gate), (frac - ramp) / (gate - ramp), k)
    w, f = rule.whole_image_weight, rule.full_frame_weight
    lesion = photos["lesion"].to_numpy()
    if rule.ramp_primary_lesion and ramp is not None:
        lesion = np.where((k > 0) & (k < 1), photos["lesion_main"].to_numpy(), lesion)
    whole, frame = photos["whole"].fillna(0).to_numpy(), photos["frame"].fillna(0).to_numpy()
    score = (1 - k * (w + f)) * lesion + k * w * whole + k * f * frame
    if rule.no_lesion_views and w + f > 0:
        score = np.where(has, score, (w * whole + f * frame) / (w + f))
    return score


def macro_of(photos: pd.DataFrame, scores: np.ndarray) -> float:
    """The studies' criterion: mean ROC AUC over the source x modality strata."""
    return float(np.mean(list(stratum_aucs(photos.assign(score=scores)).values())))


def grid_rules(min_lesion_weight: float, gates: tuple[float, ...], ramps: tuple[float | None, ...],
               weights: tuple[float, ...] = HybridStudy.weights) -> list[HybridRule]:
    """Every close-up rule of the grid (per-view ``weights``, ``gates``, soft-gate starts ``ramps`` with None = hard
    gate, main lesion in the ramp or not; no-lesion views on) whose lesion term keeps >= ``min_lesion_weight``."""
    rules = []
    for w in weights:
        for f in weights:
            if w + f > 1 - min_lesion_weight + 1e-9 or w + f == 0:
                continue
            for gate in gates:
                for ramp in ramps:
                    if ramp is not None and ramp >= gate:
                        continue
                    for main in ((False, True) if ramp is not None else (False,)):
                        rules.append(HybridRule(float(w), gate, float(f), ramp, True, main))
    return rules


def grid_search(photos: pd.DataFrame, rules: list[HybridRule]) -> pd.DataFrame:
    """Macro ROC AUC of every rule on these photos, best first."""
    rows = [{**dataclasses.asdict(r), "rule_index": i, "macro": macro_of(photos, blend_scores(photos, r))}
            for i, r in enumerate(tqdm(rules, desc="grid"))]
    return pd.DataFrame(rows).sort_values("macro", ascending=False, ignore_index=True)


def best_rule(photos: pd.DataFrame, rules: list[HybridRule], main_lesion_gain: float) -> tuple[HybridRule, float, dict]:
    """(best rule, its macro AUC, every rule's macro). A rule scoring the ramp's photos on their main lesion counts only
    when it beats the same rule without by ``main_lesion_gain``: the project's bar for that switch (``train hybrid``
    step 6), so a tie never turns it on."""
    macro = {r: macro_of(photos, blend_scores(photos, r)) for r in rules}

    def eligible(r: HybridRule) -> bool:
        plain = dataclasses.replace(r, ramp_primary_lesion=False)
        return not r.ramp_primary_lesion or plain not in macro or macro[r] - macro[plain] >= main_lesion_gain

    best = max((r for r in rules if eligible(r)), key=macro.__getitem__)
    return best, macro[best], macro


def out_of_fold_gain(photos: pd.DataFrame, rules: list[HybridRule], current: HybridRule, folds: int = 2,
                     repeats: int = 5, seed: int = 0, main_lesion_gain: float = 0.0) -> list[float]:
    """Is choosing the rule on these photos better than ``current`` on photos it was not chosen on? Stratified
    (stratum x label) ``folds``-fold splits, ``repeats`` times: per split :func:`best_rule` on the other folds minus
    ``current``, both scored on the held-out fold."""
    rng = np.random.default_rng(seed)
    gains = []
    for _ in range(repeats):
        fold = np.zeros(len(photos), dtype=int)
        for idx in photos.groupby(["stratum", "y"]).indices.values():
            fold[idx] = rng.permutation(len(idx)) % folds
        for k in range(folds):
            train, test = photos[fold != k], photos[fold == k]
            best = best_rule(train, rules, main_lesion_gain)[0]
            gains.append(macro_of(test, blend_scores(test, best)) - macro_of(test, blend_scores(test, current)))
    return gains


# ---- the wide-field guard ----------------------------------------------------------------------------------------

def scene_frame(scenes: list) -> pd.DataFrame:
    """``train hybrid``'s labelled validation scenes (``CloseUp``) as a :func:`photo_views` frame."""
    recs = []
    for s in scenes:
        p = np.asarray(s.lesion_p, dtype=float)
        recs.append({"stratum": "synthetic_scenes", "y": int(s.y), "lesion": aggregate(p, "mean"),
                     "lesion_main": float(p[main_lesion_index(s.detection_scores())]) if len(p) else 0.0,
                     "n": len(p), "whole": s.whole_p, "frame": s.frame_p, "fraction": s.box_fraction})
    return pd.DataFrame(recs)


def validation_scene_frame(pipe) -> pd.DataFrame:
    """``train hybrid``'s labelled synthetic validation scenes (seed and count of its study) with both views computed
    for every scene whatever the rule, cached under ``runs/hybrid_audit/`` per detector, classifier and view."""
    sha = pipe.metadata["models"]
    cache = RUNS_DIR / "hybrid_audit" / (f"scenes_{sha['detector']['sha256'][:12]}_{sha['classifier']['sha256'][:12]}_"
                                         f"{pipe.image_clf_meta['sha256'][:12]}.pkl")
    return scene_frame(_scene_views(pipe, HybridStudy(), cache))


def widefield_safe(rule: HybridRule, scenes: pd.DataFrame, floor: float | None, tolerance: float) -> tuple[bool, float | None]:
    """(passes, scenes' AUC): the labelled validation scenes' image AUC stays within ``tolerance`` of ``floor`` (the
    current rule's; None: no floor), ``train hybrid``'s own guard for its soft gate."""
    if scenes.empty or not 0 < scenes["y"].sum() < len(scenes):
        return True, None
    auc = float(roc_auc_score(scenes["y"], blend_scores(scenes, rule)))
    return (floor is None or auc >= floor - tolerance), auc


def real_widefield_views(rule: HybridRule, fractions: list[float]) -> dict[str, float]:
    """How much of the views' weight the real wide-field validation photos (mole photos, no diagnosis, so no AUC)
    get under ``rule``: the share reaching full view weight and the mean share (:meth:`HybridRule.view_scale`)."""
    scale = np.array([rule.view_scale(f) if f > 0 else 0.0 for f in fractions])
    return {"n": len(fractions), "full_view_weight": int((scale >= 1).sum()), "mean_view_scale": round(float(scale.mean()), 4)
            if len(scale) else 0.0}


# ---- the decision ------------------------------------------------------------------------------------------------

@dataclass
class CloseupRuleChoice:
    current: HybridRule
    chosen: HybridRule
    current_macro: float
    best_macro: float
    oof_gains: list[float]
    adopted: bool
    scene_auc: dict[str, float | None]
    per_stratum: dict[str, dict[str, float]]
    real_widefield: dict[str, dict[str, float]]  # real mole photos' view weight under the current and the best rule
    n_rules: int
    n_guarded: int
    top: list[dict[str, Any]]


def choose_closeup_rule(photos: pd.DataFrame, scenes: pd.DataFrame, real_fractions: list[float], current: HybridRule,
                        study: CloseupRuleStudy) -> CloseupRuleChoice:
    """Steps of the module docstring on precomputed views: guard, grid, in-sample and out-of-fold bars."""
    current_scene = widefield_safe(current, scenes, None, study.scene_tolerance)[1]
    rules = grid_rules(study.min_lesion_weight, study.gates, study.ramps, study.weights)
    guarded = [r for r in rules if widefield_safe(r, scenes, current_scene, study.scene_tolerance)[0]]
    best, best_macro, macro = best_rule(photos, guarded, study.min_gain)
    table = pd.DataFrame([{**dataclasses.asdict(r), "macro": m} for r, m in macro.items()]).sort_values(
        "macro", ascending=False, ignore_index=True)
    current_macro = macro_of(photos, blend_scores(photos, current))
    gains = out_of_fold_gain(photos, guarded, current, study.folds, study.repeats, study.seed, study.min_gain)
    adopted = best_macro - current_macro >= study.min_gain and float(np.mean(gains)) >= study.min_gain
    chosen = best if adopted else current
    per_stratum = {name: {k: round(v, 4) for k, v in stratum_aucs(photos.assign(score=blend_scores(photos, r))).items()}
                   for name, r in (("current", current), ("best", best))}
    scene_best = widefield_safe(best, scenes, None, study.scene_tolerance)[1]
    return CloseupRuleChoice(current, chosen, current_macro, best_macro, gains, adopted,
                             {"current": current_scene, "best": scene_best}, per_stratum,
                             {"current": real_widefield_views(current, real_fractions), "best": real_widefield_views(best, real_fractions)},
                             len(rules), len(guarded),
                             table.head(10).round(4).to_dict(orient="records"))


# Pipeline setting -> field of HybridRule: what this step writes.
RULE_SETTINGS = {"whole_image_weight": "whole_image_weight", "full_frame_weight": "full_frame_weight",
                 "closeup_min_box_fraction": "closeup_min_box_fraction", "closeup_ramp_from": "ramp_from",
                 "no_lesion_views": "no_lesion_views", "closeup_ramp_primary_lesion": "ramp_primary_lesion"}


def _scores_image(model_key: str) -> bool:
    """Whether a shipped model feeds the product's image score (the management and clinical models do not, nor does
    the one-step baseline detector)."""
    return model_key in ("detector", "box_rescorer") or model_key.startswith(("classifier", "image_classifier"))


def stale_closeup_rule(meta: dict[str, Any]) -> str | None:
    """Why the shipped close-up rule is not the one this step chose for the shipped models; None when it is.

    Why: ``train hybrid`` writes its own close-up rule, so re-running it (or exporting a new network) after this
    step silently undoes or outdates the choice. ``train tiers`` and ``evaluate`` print this as a warning."""
    pipeline = meta.get("pipeline", {})
    record = pipeline.get("closeup_rule_choice")
    if not record:
        return ("no `train closeup-rule` record: the close-up rule is `train hybrid`'s (run `lesiontriage train "
                "closeup-rule`, then `train tiers`)") if pipeline.get("hybrid_choice") else None
    differ = [k for k, f in RULE_SETTINGS.items() if pipeline.get(k) != record["chosen"].get(f)]
    if differ:
        return (f"pipeline {', '.join(differ)} differ from `train closeup-rule`'s choice (was `train hybrid` re-run "
                "after it? run `lesiontriage train closeup-rule`, then `train tiers`)")
    models = meta.get("models", {})
    changed = sorted(k for k, sha in record.get("model_sha256", {}).items()
                     if _scores_image(k) and models.get(k, {}).get("sha256") != sha)
    added = sorted(k for k in models if _scores_image(k) and k not in record.get("model_sha256", {}))
    if changed or added:
        return (f"models changed since `train closeup-rule` chose the rule: {', '.join(changed + added)} (run `lesiontriage "
                "train hybrid`, `train closeup-rule`, then `train tiers`)")
    return None


def run_closeup_rule(models_dir: Path = MODELS_DIR, manifest_path: Path | None = None, data_root: Path | None = None,
                     study: CloseupRuleStudy | None = None, command: str = "") -> CloseupRuleChoice:
    """Score the validation photos and scenes with the shipped models, choose, and write the choice to metadata.json."""
    from lesiontriage.pipeline import TriagePipeline

    study = study or CloseupRuleStudy()
    pipe = TriagePipeline.from_dir(models_dir)
    manifest = load_manifest(manifest_path)
    rows = confirmation_rows(manifest, study.ham_cap)
    photos = cached_photo_views(pipe, rows, True, data_root)
    hstudy = HybridStudy()
    wide = _widefield_fractions(pipe, manifest, hstudy, data_root)
    real = [w["largest_box_fraction"] for w in wide if w["kind"] == "real"]
    sha = pipe.metadata["models"]
    scenes = validation_scene_frame(pipe)
    s = pipe.settings
    current = HybridRule(s.whole_image_weight, s.closeup_min_box_fraction, s.full_frame_weight, s.closeup_ramp_from,
                         s.no_lesion_views, s.closeup_ramp_primary_lesion)
    choice = choose_closeup_rule(photos, scenes, real, current, study)
    meta = read_metadata(models_dir)
    c = choice.chosen
    meta["pipeline"].update({"whole_image_weight": c.whole_image_weight, "full_frame_weight": c.full_frame_weight,
                             "closeup_min_box_fraction": c.closeup_min_box_fraction, "closeup_ramp_from": c.ramp_from,
                             "no_lesion_views": c.no_lesion_views, "closeup_ramp_primary_lesion": c.ramp_primary_lesion})
    meta["pipeline"]["closeup_rule_choice"] = {
        "adopted": choice.adopted,
        "current": dataclasses.asdict(choice.current), "chosen": dataclasses.asdict(c),
        "current_macro": round(choice.current_macro, 4), "best_macro": round(choice.best_macro, 4),
        "out_of_fold_gain": {"mean": round(float(np.mean(choice.oof_gains)), 4), "min": round(float(np.min(choice.oof_gains)), 4),
                             "max": round(float(np.max(choice.oof_gains)), 4), "splits": len(choice.oof_gains)},
        "per_stratum": choice.per_stratum, "scene_auc": choice.scene_auc, "real_widefield_views": choice.real_widefield,
        "n_rules": choice.n_rules, "n_rules_widefield_safe": choice.n_guarded, "top": choice.top,
        "criterion": (f"macro ROC AUC over source x modality strata; a rule replaces the current one only with a gain >= "
                      f"{study.min_gain} on the photos and a mean out-of-fold gain of choosing it >= {study.min_gain} "
                      f"({study.folds}-fold x {study.repeats}); candidates must keep the labelled validation scenes' image AUC within "
                      f"{study.scene_tolerance} of the current rule's"),
        "chosen_on": (f"validation split: {len(rows)} labelled photos (HAM10000 sampled to {study.ham_cap}) + those HAM10000 "
                      f"photos squashed to 224x224; wide-field: {len(real)} real mole photos + {len(scenes)} synthetic scenes"),
        "study": dataclasses.asdict(study), "manifest_hash": manifest_hash(manifest),
        "model_sha256": {k: v["sha256"] for k, v in sha.items()}, "command": command, "date": dt.date.today().isoformat(),
    }
    write_metadata(models_dir, meta)
    return choice
