"""Seed-extra studies (issue 13): covariate encoding, CLAHE, management metrics, ablation helpers,
the clinical stacking recipe on synthetic data with a known signal, and the shipped context models."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lesiontriage.imaging import apply_clahe
from lesiontriage.research import ablations as A
from lesiontriage.research import clinical as C
from lesiontriage.research.covariates import (APP_COVARIATES, CovariateEncoder, any_answer, form_to_frame, harmonise,
                                              site_to_region)
from lesiontriage.research.features import FeatureSet
from lesiontriage.research.management import MANAGEMENT, ManagementConfig, management_metrics


def test_site_vocabularies_map_to_the_same_region():
    assert site_to_region("lower extremity") == site_to_region("thigh") == site_to_region("lower limbs") == "lower_limb"
    assert site_to_region("FACE") == site_to_region("head neck") == "head_neck"
    assert site_to_region(None) == site_to_region("nowhere") == "unknown"


def test_harmonise_reads_each_sets_spelling():
    rows = pd.DataFrame([
        {"age": 60, "sex": "male", "site": "back", "itch": True, "pad_elevation": False},
        {"age": None, "sex": "female", "site": "acral", "elevation": "nodular"},
        {"sex": "unknown", "site": "forearm", "bleed": "False"},
    ])
    h = harmonise(rows)
    assert h.loc[0, "region"] == "trunk" and h.loc[0, "itch"] == "yes" and h.loc[0, "elevated"] == "no"
    assert h.loc[1, "elevated"] == "yes" and h.loc[1, "elevation3"] == "nodular" and np.isnan(h.loc[1, "age"])
    assert pd.isna(h.loc[2, "sex"]) and h.loc[2, "bleed"] == "no" and h.loc[2, "region"] == "upper_limb"


def test_encoder_standardises_flags_missing_and_round_trips():
    frame = harmonise(pd.DataFrame([{"age": 20, "sex": "male"}, {"age": 40, "sex": "female"}, {"sex": "male"}]))
    enc = CovariateEncoder(("age", "sex")).fit(frame)
    X = enc.transform(frame)
    names = enc.feature_names
    assert names == ["age", "age_missing", "sex=female", "sex=male"]
    assert X[:2, 0] == pytest.approx([-1.0, 1.0])  # (20-30)/10, (40-30)/10
    assert X[2, :2].tolist() == [0.0, 1.0]
    again = CovariateEncoder.from_dict(enc.to_dict())
    assert np.array_equal(again.transform(frame), X)
    unseen = harmonise(pd.DataFrame([{"age": 30, "sex": None}]))
    assert again.transform(unseen)[0].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_any_answer_ignores_blanks():
    assert not any_answer({"age": None, "sex": "", "region": "unknown"})
    assert any_answer({"age": 50})
    assert list(form_to_frame({"age": 50, "itch": "yes"}).columns) == list(APP_COVARIATES)


def test_clahe_keeps_shape_and_raises_local_contrast():
    rng = np.random.default_rng(0)
    flat = (120 + rng.integers(-6, 7, size=(64, 64, 1))).astype(np.uint8).repeat(3, axis=2)
    flat[..., 0] += 20  # reddish skin
    out = apply_clahe(flat)
    assert out.shape == flat.shape and out.dtype == np.uint8
    assert out.astype(float).std() > flat.astype(float).std()
    assert out[..., 0].mean() > out[..., 2].mean()  # hue kept: still redder than blue
    with pytest.raises(ValueError):
        apply_clahe(np.zeros((8, 8), np.uint8))


def test_management_metrics_hand_computed():
    y = np.array([0, 0, 1, 1, 2, 2])
    prob = np.array([[.8, .1, .1], [.2, .7, .1], [.6, .3, .1], [.1, .8, .1], [.5, .2, .3], [.1, .1, .8]])
    m = management_metrics(y, prob, ManagementConfig(n_boot=50))
    assert m["accuracy"]["value"] == pytest.approx(3 / 6)
    assert m["confusion_matrix"]["rows_truth_cols_pred"] == [[1, 1, 0], [1, 1, 0], [1, 0, 1]]
    assert m["over_excision"] == 2  # predicted excision for one follow-up and one no-examination case
    assert m["under_excision"] == 1
    assert m["sensitivity"][MANAGEMENT[2]] == pytest.approx(0.5)


def test_binary_rates_and_youden():
    y = np.array([0, 0, 0, 1, 1])
    p = np.array([0.1, 0.4, 0.6, 0.55, 0.9])
    r = A.binary_rates(y, p, 0.5)
    assert (r["tp"], r["fn"], r["tn"], r["fp"]) == (2, 0, 2, 1)
    assert r["specificity"] == pytest.approx(2 / 3)
    assert A.youden_threshold(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.7, 0.8])) == pytest.approx(0.7)


def _synthetic_set(n: int, seed: int) -> FeatureSet:
    """Malignancy depends on the image logit and on age: both carry signal."""
    rng = np.random.default_rng(seed)
    age = rng.uniform(20, 90, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-(age - 55) / 8))).astype(int)
    logit = 1.2 * (2 * y - 1) + rng.normal(0, 1.5, n)
    rows = pd.DataFrame({"age": age, "sex": rng.choice(["male", "female"], n), "site": "back", "malignant": y,
                         "group_id": [f"g{seed}_{i}" for i in range(n)]})
    return FeatureSet(rows, logit.astype(np.float32), np.zeros((n, 8), np.float32), np.zeros((n, 4), np.float32),
                      np.ones(n, bool))


def test_clinical_stacking_uses_both_signals():
    cfg = C.ClinicalStudyConfig(n_boot=50)
    block = C.study_set("ham10000", _synthetic_set(600, 1), _synthetic_set(300, 2), _synthetic_set(400, 3), 1.0, cfg, "toy")
    img, clin, comb = (block[k]["auc"]["value"] for k in ("image_only", "clinical_only", "combined"))
    assert clin > 0.75 and img > 0.7
    assert comb > max(img, clin)
    assert block["paired"]["combined_vs_image_only"]["p_value"] < 0.05
    assert block["clinical_model"]["top_coefficients"][0]["feature"] == "age"


def test_probe_arms_differ_in_operating_point_not_ranking_much():
    rng = np.random.default_rng(0)
    n = 400
    y = (rng.random(n) < 0.15).astype(int)
    emb = rng.normal(0, 1, (n, 6)) + y[:, None] * 1.0
    rows = pd.DataFrame({"malignant": y})
    fs = FeatureSet(rows, np.zeros(n, np.float32), np.zeros((n, 8), np.float32), emb.astype(np.float32), np.ones(n, bool))
    out = A.imbalance_ablation(fs, {"toy": fs}, A.AblationConfig(n_boot=20))
    none, weighted = out["arms"]["none"]["toy"], out["arms"]["class_weight"]["toy"]
    assert weighted["at_0.5"]["sensitivity"] > none["at_0.5"]["sensitivity"]
    assert abs(weighted["auc"]["value"] - none["auc"]["value"]) < 0.05


# ---- shipped context models (fake weights in a temporary models folder) ---------------------------------

def _write_models(tmp_path, key: str, state: dict, entry: dict):
    import torch

    from lesiontriage.weights import save_weights, write_metadata

    sha = save_weights({k: torch.as_tensor(v, dtype=torch.float32) for k, v in state.items()}, tmp_path / f"{key}.safetensors")
    write_metadata(tmp_path, {"models": {key: {"file": f"{key}.safetensors", "sha256": sha, **entry}}})


def _result(ps):
    from lesiontriage.results import Lesion, Tier, TriageResult

    lesions = [Lesion(i, [0, 0, 10, 10], 0.9, p) for i, p in enumerate(ps)]
    return TriageResult("x", 100, 100, lesions, "max", max(ps), Tier("routine", "", 0), None, {})


class _TierStub:
    @staticmethod
    def make_tier(lesions, score, mode, aggregate):
        from lesiontriage.results import Tier

        return Tier("urgent" if score > 0.5 else "routine", f"score {score:.2f}", 0)


def test_combined_clinical_model_moves_probabilities_with_the_answers(tmp_path):
    from lesiontriage.context_models import CombinedClinicalModel

    frame = harmonise(pd.DataFrame([{"age": 30, "sex": "male"}, {"age": 70, "sex": "female"}]))
    enc = CovariateEncoder(APP_COVARIATES).fit(frame)
    coef = np.zeros(len(enc.feature_names))
    coef[enc.feature_names.index("age")] = 1.5
    _write_models(tmp_path, "clinical_combined",
                  {"clinical_coef": coef, "clinical_intercept": [0.0], "stack_coef": [1.0, 1.0], "stack_intercept": [0.0]},
                  {"encoder": enc.to_dict()})
    model = CombinedClinicalModel.from_dir(tmp_path)
    base = _result([0.2, 0.4])
    assert model.apply(base, {"age": None, "sex": None}, _TierStub) is base  # nothing given -> unchanged
    old = model.apply(base, {"age": 80}, _TierStub)
    young = model.apply(base, {"age": 20}, _TierStub)
    assert old.lesions[1].p_malignant > 0.4 > young.lesions[1].p_malignant
    assert old.image_score == pytest.approx(max(l.p_malignant for l in old.lesions))
    assert old.tier.name == "urgent" and "clinical covariates used" in old.notes[0]


def test_management_model_returns_a_distribution(tmp_path, monkeypatch):
    from lesiontriage.context_models import ManagementModel

    meta_enc = CovariateEncoder(("sex", "region", "elevation3")).fit(harmonise(pd.DataFrame([{"sex": "male", "site": "back"}])))
    d = 1 + 8 + 2 + len(meta_enc.feature_names)
    state = {"dermoscopy_only.pca_derm_mean": np.zeros(4), "dermoscopy_only.pca_derm_components": np.eye(2, 4),
             "dermoscopy_only.x_mean": np.zeros(d), "dermoscopy_only.x_std": np.ones(d),
             "dermoscopy_only.coef": np.vstack([np.eye(1, d, 0), -np.eye(1, d, 0), np.zeros((1, d))]),
             "dermoscopy_only.intercept": np.zeros(3)}
    _write_models(tmp_path, "management", state,
                  {"classes": list(MANAGEMENT), "variants": {"dermoscopy_only": {"meta_encoder": meta_enc.to_dict()}}})
    model = ManagementModel.from_dir(tmp_path)
    monkeypatch.setattr(ManagementModel, "_image_outputs",
                        staticmethod(lambda pipe, img: (3.0 if img == "bad" else -3.0, np.zeros(8), np.zeros(4))))
    worried = model.suggest(None, "bad")
    calm = model.suggest(None, "good", answers={"sex": "male"})
    assert sum(worried.probabilities.values()) == pytest.approx(1.0)
    assert worried.suggestion == "excision" and calm.suggestion == "clinical follow up"
    assert worried.variant == "dermoscopy_only" and "not a clinical decision" in worried.note


def test_report_tables_format_cis_and_tolerate_gaps():
    from lesiontriage.research import tables as T

    assert T.fmt_ci({"value": 0.8734, "ci_low": 0.84, "ci_high": 0.9}) == "0.873 (0.840-0.900)"
    assert T.fmt_ci(None) == "" and T.fmt_ci({"value": None}) == ""
    m = management_metrics(np.array([0, 1, 2, 0]), np.array([[.9, .05, .05], [.2, .7, .1], [.6, .2, .2], [.1, .8, .1]]),
                           ManagementConfig(n_boot=10))
    table = T.management_table({"dermoscopy_and_clinical": {"direct": m, "majority_baseline_accuracy": 0.5},
                                "dermoscopy_only": {}})
    assert list(table["strategy"]) == ["direct", "majority class (baseline)"]
    assert table.loc[0, "over-excision"] == 1 and table.loc[0, "under-excision"] == 1
    assert T.clinical_table({}).empty and T.ensemble_table({"splits": {}}).empty


def test_evaluate_keeps_the_research_headline_keys(tmp_path):
    import json

    from lesiontriage.evaluate.run import carry_research_keys
    from lesiontriage.research.run import merge_summary

    prov = {"command": "lesiontriage research clinical"}
    merge_summary(tmp_path, {"combined_auc": {"value": 0.97, "n": 184}}, prov)
    fresh = {"lesion_auc": {"value": 0.9}}
    out = carry_research_keys(tmp_path / "summary.json", fresh)
    assert out["combined_auc"]["value"] == 0.97 and out["lesion_auc"]["value"] == 0.9
    assert out["research_provenance"] == {"combined_auc": "lesiontriage research clinical"}
    assert carry_research_keys(tmp_path / "absent.json", fresh) is fresh
    assert json.loads((tmp_path / "summary.json").read_text())["combined_auc"]["n"] == 184
