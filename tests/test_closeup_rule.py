"""train/closeup_rule.py: the vectorised grid scores photos exactly as the pipeline's rule does, the wide-field guard
holds, and a rule replaces the current one only when choosing it pays out of fold."""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from lesiontriage.hybrid import HybridRule
from lesiontriage.train.closeup_rule import (CloseupRuleStudy, blend_scores, choose_closeup_rule, grid_rules, grid_search,
                                             real_widefield_views, widefield_safe)


def _photos(n: int = 60, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frac = rng.choice([0.0, 0.005, 0.03, 0.08, 0.12, 0.2, 0.6], size=n)
    count = np.where(frac == 0.0, 0, rng.integers(1, 5, size=n))
    return pd.DataFrame({"stratum": rng.choice(["a/x", "b/y"], size=n), "y": rng.integers(0, 2, size=n),
                         "lesion": np.where(count > 0, rng.random(n), 0.0), "lesion_main": rng.random(n),
                         "n": count, "whole": rng.random(n), "frame": rng.random(n), "fraction": frac})


def _reference(photos: pd.DataFrame, rule: HybridRule) -> np.ndarray:
    """The pipeline's arithmetic, photo by photo (HybridRule.for_fraction + blend, main lesion in the ramp)."""
    out = []
    for r in photos.itertuples():
        lesion = r.lesion_main if r.n > 0 and rule.uses_main_lesion(r.fraction) else r.lesion
        photo_rule = rule.for_fraction(r.fraction, r.n > 0)
        out.append(photo_rule.blend(lesion, r.whole, r.frame) if photo_rule else lesion)
    return np.array(out)


@pytest.mark.parametrize("rule", [
    HybridRule(0.6, 0.15, 0.2, 0.02, True),
    HybridRule(0.6, 0.15, 0.2, 0.02, True, True),
    HybridRule(0.3, 0.1, 0.0, None, True),
    HybridRule(0.5, 0.2, 0.3, 0.0, False),
])
def test_vectorised_scores_match_the_pipeline_rule(rule):
    photos = _photos()
    np.testing.assert_allclose(blend_scores(photos, rule), _reference(photos, rule), atol=1e-12)


def test_grid_keeps_the_lesions_say_and_ranks_best_first():
    rules = grid_rules(0.2, (0.05, 0.15), (None, 0.0, 0.02))
    assert all(r.lesion_weight >= 0.2 - 1e-9 and r.active for r in rules)
    assert any(r.ramp_primary_lesion for r in rules) and not any(r.ramp_primary_lesion and r.ramp_from is None for r in rules)
    photos = _photos(80, seed=1)
    photos["whole"] = photos["y"] + 0.01 * np.arange(len(photos)) / len(photos)  # the whole-image view is the label
    table = grid_search(photos, rules[:: max(1, len(rules) // 200)])
    assert table["macro"].is_monotonic_decreasing
    assert table.iloc[0]["whole_image_weight"] >= 0.5


def _scenes(n: int = 40, seed: int = 2) -> pd.DataFrame:
    """Wide-field scenes: many small boxes; the lesion mean is informative, the whole-photo views are noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=n)
    return pd.DataFrame({"stratum": "synthetic_scenes", "y": y, "lesion": 0.3 * y + 0.2 * rng.random(n),
                         "lesion_main": rng.random(n), "n": rng.integers(5, 30, size=n), "whole": rng.random(n),
                         "frame": rng.random(n), "fraction": rng.choice([0.004, 0.03, 0.06, 0.12], size=n)})


def test_widefield_guard():
    scenes = _scenes()
    shipped = HybridRule(0.6, 0.15, 0.2, 0.02, True)
    ok, floor = widefield_safe(shipped, scenes, None, 0.01)
    assert ok and floor is not None
    # a rule that lets the noisy views score most scenes costs their AUC beyond the tolerance: refused
    low_gate = HybridRule(0.8, 0.02, 0.0, None, True)
    ok, auc = widefield_safe(low_gate, scenes, floor, 0.01)
    assert not ok and auc < floor - 0.01
    assert widefield_safe(low_gate, scenes, auc, 0.01) == (True, auc)
    # real mole photos: reported, not scored (no diagnosis)
    assert real_widefield_views(shipped, [0.0, 0.001, 0.085, 0.2]) == {"n": 4, "full_view_weight": 1, "mean_view_scale": 0.375}


def _closeups(n: int, seed: int, informative_small: bool) -> pd.DataFrame:
    """Close-ups, half of them of a small lesion (largest box 4-10% of the frame). The whole-image view knows the
    label on every photo when ``informative_small``; else only above 15%, and is noise below."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=n)
    frac = np.where(np.arange(n) % 2 == 0, rng.uniform(0.04, 0.1, size=n), rng.uniform(0.2, 0.6, size=n))
    whole = y + 0.6 * rng.standard_normal(n)
    if not informative_small:
        whole = np.where(frac < 0.15, rng.standard_normal(n), whole)
    return pd.DataFrame({"stratum": np.where(np.arange(n) % 4 < 2, "a/x", "b/y"), "y": y,
                         "lesion": 0.25 * y + 0.6 * rng.random(n), "lesion_main": 0.25 * y + 0.6 * rng.random(n),
                         "n": 2, "whole": whole, "frame": rng.random(n), "fraction": frac})


@pytest.mark.parametrize("informative_small, adopted", [(True, True), (False, False)])
def test_a_lower_gate_is_adopted_only_when_it_pays_out_of_fold(informative_small, adopted):
    study = CloseupRuleStudy(weights=(0.0, 0.4, 0.8), gates=(0.02, 0.15), ramps=(None, 0.02), repeats=2)
    photos = _closeups(400, 3, informative_small)
    scenes = _scenes().assign(fraction=0.004)  # moles far under every gate: the guard is neutral here
    # the current rule: the best hard gate at 15%, so only a lower gate can beat it
    hard = grid_rules(0.2, (0.15,), (None,), study.weights)
    current = hard[int(grid_search(photos, hard).iloc[0]["rule_index"])]
    choice = choose_closeup_rule(photos, scenes, [0.001], current, study)
    assert choice.adopted is adopted
    if adopted:
        assert choice.chosen.closeup_min_box_fraction == 0.02
        assert choice.best_macro - choice.current_macro >= study.min_gain and np.mean(choice.oof_gains) >= study.min_gain
    else:
        assert choice.chosen == current
    assert choice.n_guarded == choice.n_rules


def test_cli_closeup_rule_fails_in_one_line_without_a_manifest(tmp_path):
    from typer.testing import CliRunner

    from lesiontriage.cli import app

    res = CliRunner().invoke(app, ["train", "closeup-rule", "--manifest", str(tmp_path / "absent.parquet")])
    assert res.exit_code == 1
    assert "error" in res.output and "absent.parquet" in res.output and "Traceback" not in res.output


class _ViewsPipe:
    """Records the settings each photo is scored under; shaped like TriagePipeline.predict's result."""

    def __init__(self, settings) -> None:
        self.settings, self.seen = settings, []

    def predict(self, image, aggregate, name=None):
        from lesiontriage.results import Lesion, TriageResult, Tier

        s = self.settings
        self.seen.append(s)
        lesions = [Lesion(0, [0, 0, 50, 50], 0.9, 0.2), Lesion(1, [60, 60, 70, 70], 0.95, 0.6)]
        whole = 0.7 if s.whole_image_weight > 0 else None  # as the pipeline: a view with weight 0 is not computed
        frame = 0.8 if s.full_frame_weight > 0 else None
        return TriageResult(str(name or image), 100, 100, lesions, aggregate, 0.5, Tier("routine", "", None), None, {},
                            lesion_score=0.4, whole_image_score=whole, full_frame_score=frame)


def test_photo_views_computes_both_views_whatever_weights_ship(tmp_path):
    from PIL import Image

    from lesiontriage.errors import ModelError
    from lesiontriage.pipeline import PipelineSettings
    from lesiontriage.train.closeup_rule import photo_views

    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (40, 30), (200, 150, 120)).save(tmp_path / name)
    rows = pd.DataFrame({"path": [str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg")], "source": ["derm7pt", "ham10000"],
                         "modality": ["clinical", "dermoscopy"], "malignant": [1.0, 0.0]})
    shipped = PipelineSettings(whole_image_weight=0.8, full_frame_weight=0.0, closeup_min_box_fraction=0.05,
                               closeup_ramp_from=0.02, no_lesion_views=True, closeup_ramp_primary_lesion=True)
    pipe = _ViewsPipe(shipped)
    views = photo_views(pipe, rows, squashed=True)
    assert pipe.settings == shipped  # restored
    assert len(views) == 3 and list(views["stratum"]) == ["derm7pt/clinical", "ham10000/dermoscopy", "ham10000/dermoscopy_224sq"]
    assert views["whole"].notna().all() and views["frame"].notna().all()
    assert all(s.closeup_min_box_fraction == 0.0 and not s.closeup_ramp_primary_lesion for s in pipe.seen)
    # the main lesion is the most confident detection (index 1), the fraction the largest box's share of the photo
    assert views["lesion_main"].iloc[0] == pytest.approx(0.6) and views["fraction"].iloc[0] == pytest.approx(0.25)
    with pytest.raises(ModelError, match="crop margin"):
        photo_views(_ViewsPipe(PipelineSettings(closeup_crop_margin=0.75)), rows)


@pytest.mark.parametrize("main_informative", [True, False])
def test_the_main_lesion_must_earn_its_own_gain(main_informative):
    from lesiontriage.train.closeup_rule import best_rule

    rng = np.random.default_rng(5)
    n = 200
    y = rng.integers(0, 2, size=n)
    lesion = 0.2 * y + rng.random(n)
    photos = pd.DataFrame({"stratum": "a/x", "y": y, "lesion": lesion, "n": 3, "whole": 0.3 * y + rng.random(n),
                           "frame": rng.random(n), "fraction": rng.uniform(0.025, 0.045, size=n),
                           # a tie (the same p) or the label itself
                           "lesion_main": y.astype(float) if main_informative else lesion})
    plain = HybridRule(0.4, 0.05, 0.0, 0.02, True)
    main = HybridRule(0.4, 0.05, 0.0, 0.02, True, True)
    best, macro, table = best_rule(photos, [main, plain], 0.005)
    assert best == (main if main_informative else plain)
    assert table[main] >= table[plain] - 1e-12 and macro == table[best]


def _chain_metadata() -> dict:
    """A model card after hybrid -> closeup-rule: the pipeline holds the closeup-rule's choice for these models."""
    chosen = HybridRule(0.8, 0.05, 0.0, 0.02, True, False)
    return {"models": {"detector": {"sha256": "d1"}, "classifier": {"sha256": "c1"}, "image_classifier": {"sha256": "w1"},
                       "management": {"sha256": "m1"}},
            "pipeline": {"hybrid_choice": {"closeup_min_box_fraction": 0.15}, "whole_image_weight": 0.8,
                         "full_frame_weight": 0.0, "closeup_min_box_fraction": 0.05, "closeup_ramp_from": 0.02,
                         "no_lesion_views": True, "closeup_ramp_primary_lesion": False,
                         "closeup_rule_choice": {"chosen": dataclasses.asdict(chosen),
                                                 "model_sha256": {"detector": "d1", "classifier": "c1",
                                                                  "image_classifier": "w1", "management": "m1"}}}}


def test_a_broken_rule_chain_is_named():
    from lesiontriage.train.closeup_rule import stale_closeup_rule

    meta = _chain_metadata()
    assert stale_closeup_rule(meta) is None
    meta["models"]["management"]["sha256"] = "m2"  # a model the image score does not use
    assert stale_closeup_rule(meta) is None
    rerun_hybrid = _chain_metadata()
    rerun_hybrid["pipeline"].update(closeup_min_box_fraction=0.15, whole_image_weight=0.6)
    assert "closeup_min_box_fraction" in stale_closeup_rule(rerun_hybrid) and "whole_image_weight" in stale_closeup_rule(rerun_hybrid)
    new_member = _chain_metadata()
    new_member["models"]["image_classifier"]["sha256"] = "w2"
    new_member["models"]["image_classifier_2"] = {"sha256": "x"}
    assert "image_classifier, image_classifier_2" in stale_closeup_rule(new_member)
    never_run = _chain_metadata()
    del never_run["pipeline"]["closeup_rule_choice"]
    assert "no `train closeup-rule` record" in stale_closeup_rule(never_run)
    del never_run["pipeline"]["hybrid_choice"]
    assert stale_closeup_rule(never_run) is None  # nothing chosen on validation yet: nothing to be out of date


def test_cli_warns_in_one_line_when_the_rule_chain_is_broken(tmp_path, monkeypatch):
    import json

    from lesiontriage import cli

    meta = _chain_metadata()
    meta["pipeline"]["closeup_min_box_fraction"] = 0.15
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    lines = []
    monkeypatch.setattr(cli.err_console, "print", lambda text, **kw: lines.append(text))
    cli._warn_stale_closeup_rule(tmp_path)
    assert len(lines) == 1 and "close-up rule out of date" in lines[0] and "closeup_min_box_fraction" in lines[0]
    lines.clear()
    cli._warn_stale_closeup_rule(tmp_path / "absent")  # no model folder: the command itself reports it
    assert lines == []
