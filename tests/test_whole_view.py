"""The whole-image view as one model or the mean-logit ensemble of two (networks/whole_view.py), on random weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lesiontriage.errors import ModelError
from lesiontriage.networks.classifier import ClassifierConfig, LesionClassifier
from lesiontriage.networks.whole_view import MeanLogitEnsemble, whole_view_spec
from lesiontriage.weights import read_metadata, save_weights, write_metadata

CFG = ClassifierConfig(input_size=64)
TEMPS = {"classifier": 1.3, "image_classifier": 1.7, "image_classifier_2": 0.8}


def _models_dir(tmp_path, ensemble: bool, with_second: bool = True):
    torch.manual_seed(0)
    models = {}
    for key in ("classifier", "image_classifier", "image_classifier_2"):
        if key == "image_classifier_2" and not with_second:
            continue
        sha = save_weights(LesionClassifier(CFG, pretrained=False).state_dict(), tmp_path / f"{key}.safetensors")
        models[key] = {"file": f"{key}.safetensors", "sha256": sha, "config": CFG.to_dict(), "temperature": TEMPS[key]}
    write_metadata(tmp_path, {"models": models, "pipeline": {"torch_threads": 1, "whole_image_ensemble": ensemble}})
    return tmp_path


def _member_logit(models_dir, key: str, batch: torch.Tensor) -> float:
    from lesiontriage.weights import load_weights

    entry = read_metadata(models_dir)["models"][key]
    m = LesionClassifier(CFG, pretrained=False)
    m.load_state_dict(load_weights(models_dir / entry["file"], entry["sha256"]))
    with torch.inference_mode():
        return float(m.eval()(batch)[0][0])


def test_ensemble_averages_temperature_scaled_logits():
    torch.manual_seed(1)
    a, b = LesionClassifier(CFG, pretrained=False).eval(), LesionClassifier(CFG, pretrained=False).eval()
    ens = MeanLogitEnsemble([a, b], [2.0, 0.5]).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        (la, sa), (lb, sb), (le, se) = a(x), b(x), ens(x)
        lo, so, fo = ens.outputs(x)
    assert torch.allclose(le, (la / 2.0 + lb / 0.5) / 2, atol=1e-5)
    assert torch.allclose(se, (sa + sb) / 2, atol=1e-5)
    assert torch.allclose(lo, le, atol=1e-4) and so.shape == (3, len(CFG.subtypes)) and fo.shape[0] == 3
    with pytest.raises(ValueError):
        MeanLogitEnsemble([a, b], [1.0])


def test_spec_keys_the_ensemble_apart_from_either_member(tmp_path):
    single = whole_view_spec(read_metadata(_models_dir(tmp_path / "s", ensemble=False)))
    meta = read_metadata(_models_dir(tmp_path / "e", ensemble=True))
    ens = whole_view_spec(meta)
    assert single.members == ("image_classifier",) and single.temperature == TEMPS["image_classifier"]
    assert ens.members == ("image_classifier", "image_classifier_2") and ens.temperature == 1.0
    assert ens.sha256 not in {m["sha256"] for m in meta["models"].values()}  # its own cache key
    assert whole_view_spec({"models": {}}) is None


@pytest.mark.parametrize("fast", [False, True])
def test_pipeline_whole_image_score_is_the_mean_of_both_members(tmp_path, fast):
    from lesiontriage.pipeline import TriagePipeline, _to_tensor

    models_dir = _models_dir(tmp_path, ensemble=True)
    rgb = (np.random.default_rng(0).random((80, 100, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "photo.png")
    pipe = TriagePipeline.from_dir(models_dir, fast=fast)
    assert isinstance(pipe.image_classifier, MeanLogitEnsemble)
    if fast:  # the pipeline keeps the ensemble eager (load time); the other networks get frozen copies
        assert pipe.inference_engine["image_classifier"]["engine"].startswith("eager")
        assert pipe.inference_engine["classifier"]["reason"] == ""
    score = pipe.predict(tmp_path / "photo.png", whole_image=True).image_score
    batch = pipe._normalise([_to_tensor(pipe.load(tmp_path / "photo.png").rgb)], CFG)
    z = np.mean([_member_logit(models_dir, k, batch) / TEMPS[k] for k in ("image_classifier", "image_classifier_2")])
    assert score == pytest.approx(1 / (1 + np.exp(-z)), abs=1e-4)
    single = TriagePipeline.from_dir(_models_dir(tmp_path / "one", ensemble=False), fast=fast)
    z1 = _member_logit(models_dir, "image_classifier", batch) / TEMPS["image_classifier"]
    assert single.predict(tmp_path / "photo.png", whole_image=True).image_score == pytest.approx(1 / (1 + np.exp(-z1)), abs=1e-4)


def test_ensemble_setting_without_a_second_model_is_a_clear_error(tmp_path):
    from lesiontriage.pipeline import TriagePipeline

    with pytest.raises(ModelError, match="image_classifier_2"):
        TriagePipeline.from_dir(_models_dir(tmp_path, ensemble=True, with_second=False), fast=False)


def test_frozen_copies_of_the_ensemble_match_it():
    """`evaluate` freezes each member (networks/fast.py); the copy must give the ensemble's outputs."""
    from lesiontriage.networks.fast import fast_classifier

    torch.manual_seed(2)
    ens = MeanLogitEnsemble([LesionClassifier(CFG, pretrained=False), LesionClassifier(CFG, pretrained=False)], [1.5, 0.7]).eval()
    fast, info = fast_classifier(ens)
    assert isinstance(fast, MeanLogitEnsemble) and len(info["members"]) == 2 and info["reason"] == "", info
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        (le, se), (lf, sf) = ens(x), fast(x)
    assert torch.allclose(le, lf, atol=1e-4) and torch.allclose(se.softmax(-1), sf.softmax(-1), atol=1e-4)


def test_hybrid_study_refuses_the_ensemble_flag_without_a_second_model_and_leaves_metadata_alone(tmp_path):
    from lesiontriage.train.hybrid import choose_hybrid

    models_dir = _models_dir(tmp_path, ensemble=False, with_second=False)
    before = (models_dir / "metadata.json").read_text()
    with pytest.raises(ModelError, match="image_classifier_2"):
        choose_hybrid(models_dir, whole_image_ensemble=True)
    assert (models_dir / "metadata.json").read_text() == before


def test_subtype_malignant_logit_is_the_logit_of_the_malignant_mass():
    from lesiontriage.networks.whole_view import subtype_malignant_logit

    torch.manual_seed(3)
    z = torch.randn(5, len(CFG.subtypes)) * 3
    p = z.softmax(-1)
    mal = [i for i, s in enumerate(CFG.subtypes) if s in ("MEL", "BCC", "AKIEC")]
    mass = p[:, mal].sum(-1)
    assert torch.allclose(subtype_malignant_logit(z, CFG.subtypes), torch.log(mass / (1 - mass)), atol=1e-4)
    assert torch.allclose(subtype_malignant_logit(p.log(), CFG.subtypes), subtype_malignant_logit(z, CFG.subtypes), atol=1e-4)
    # a head sure of melanoma gives a large positive logit, one sure of a naevus a large negative one
    sure = torch.full((2, len(CFG.subtypes)), -10.0)
    sure[0, CFG.subtypes.index("MEL")] = sure[1, CFG.subtypes.index("NV")] = 10.0
    out = subtype_malignant_logit(sure, CFG.subtypes)
    assert out[0] > 15 and out[1] < -15
    with pytest.raises(ValueError):
        subtype_malignant_logit(z[:, :2], ("NV", "BKL"))


def test_subtype_share_mixes_each_members_logit_and_keys_its_own_cache(tmp_path):
    from lesiontriage.networks.whole_view import subtype_malignant_logit

    torch.manual_seed(4)
    a, b = LesionClassifier(CFG, pretrained=False).eval(), LesionClassifier(CFG, pretrained=False).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        (la, sa), (lb, sb) = a(x), b(x)
        mixed, _ = MeanLogitEnsemble([a, b], [2.0, 0.5], subtype_weight=0.5)(x)
        only_sub, _ = MeanLogitEnsemble([a, b], [2.0, 0.5], subtype_weight=1.0)(x)
        lo, _, _ = MeanLogitEnsemble([a, b], [2.0, 0.5], subtype_weight=0.5).outputs(x)
    ma, mb = subtype_malignant_logit(sa, CFG.subtypes), subtype_malignant_logit(sb, CFG.subtypes)
    assert torch.allclose(mixed, ((0.5 * la / 2.0 + 0.5 * ma) + (0.5 * lb / 0.5 + 0.5 * mb)) / 2, atol=1e-4)
    assert torch.allclose(only_sub, (ma + mb) / 2, atol=1e-4)
    assert torch.allclose(lo, mixed, atol=1e-4)  # outputs() (sub-type probabilities) agrees with the call
    with pytest.raises(ValueError):
        MeanLogitEnsemble([a], [1.0], subtype_weight=1.5)
    meta = read_metadata(_models_dir(tmp_path / "s", ensemble=False))
    plain = whole_view_spec(meta)
    meta["pipeline"].update({"whole_image_subtype_weight": 1.0, "whole_image_temperature": 1.4})
    sub = whole_view_spec(meta)
    assert not plain.wrapped and sub.wrapped and sub.members == ("image_classifier",)
    assert sub.temperature == 1.4 and sub.subtype_weight == 1.0 and sub.sha256 != plain.sha256
    meta["pipeline"]["whole_image_temperature"] = 1.5  # another calibration: another cache entry (the hybrid caches p)
    assert whole_view_spec(meta).sha256 != sub.sha256


@pytest.mark.parametrize("fast", [False, True])
def test_pipeline_scores_a_close_up_with_the_chosen_subtype_share(tmp_path, fast):
    from lesiontriage.networks.whole_view import subtype_malignant_logit
    from lesiontriage.pipeline import TriagePipeline, _to_tensor
    from lesiontriage.weights import load_weights

    models_dir = _models_dir(tmp_path, ensemble=False)
    meta = read_metadata(models_dir)
    meta["pipeline"].update({"whole_image_subtype_weight": 1.0, "whole_image_temperature": 2.0})
    write_metadata(models_dir, meta)
    rgb = (np.random.default_rng(1).random((70, 90, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "photo.png")
    pipe = TriagePipeline.from_dir(models_dir, fast=fast)
    assert isinstance(pipe.image_classifier, MeanLogitEnsemble) and pipe.image_clf_meta["temperature"] == 2.0
    score = pipe.predict(tmp_path / "photo.png", whole_image=True).image_score
    entry = meta["models"]["image_classifier"]
    m = LesionClassifier(CFG, pretrained=False)
    m.load_state_dict(load_weights(models_dir / entry["file"], entry["sha256"]))
    batch = pipe._normalise([_to_tensor(pipe.load(tmp_path / "photo.png").rgb)], CFG)
    with torch.inference_mode():
        z = float(subtype_malignant_logit(m.eval()(batch)[1], CFG.subtypes)[0]) / 2.0
    assert score == pytest.approx(1 / (1 + np.exp(-z)), abs=1e-4)


def test_whole_view_study_takes_the_subtype_head_only_when_it_ranks_validation_better():
    from lesiontriage.train.hybrid import MemberLogits, choose_whole_view, whole_score_table

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    strata = ["a"] * 200 + ["b"] * 200
    informative = y * 2.0 + rng.normal(0, 1, 400)
    noise = rng.normal(0, 1, 400)
    one = ("m",)
    table = whole_score_table([MemberLogits("m", noise + 0.3 * y, informative)], strata, y, (0.0, 0.5, 1.0))
    keys, alpha, t, tta = choose_whole_view(table, 0.005, (one, 0.0))
    assert (keys, alpha, tta) == (one, 1.0, None) and t == pytest.approx(float(table.loc[2, "temperature"])) and 0.2 < t < 5
    assert table.loc[0, "temperature"] == 1.0  # the binary head keeps the members' own temperatures
    binary_wins = whole_score_table([MemberLogits("m", informative, noise + 0.3 * y)], strata, y, (0.0, 0.5, 1.0))
    assert choose_whole_view(binary_wins, 0.005, (one, 0.0)) == (one, 0.0, 1.0, None)
    tie = whole_score_table([MemberLogits("m", informative, informative + rng.normal(0, 1e-3, 400))], strata, y, (0.0, 1.0))
    assert choose_whole_view(tie, 0.005, (one, 0.0))[:2] == (one, 0.0)  # no gain >= the bar: keep what ships
    with pytest.raises(ValueError):
        choose_whole_view(tie, 0.005, (("other",), 0.0))


def test_whole_view_study_adds_a_member_only_when_the_mean_ranks_validation_better():
    from lesiontriage.train.hybrid import MemberLogits, choose_whole_view, whole_member_sets, whole_score_table

    keys = ["image_classifier", "image_classifier_2", "image_classifier_3"]
    sets = whole_member_sets(keys, True, ("image_classifier",))
    assert sets == [("image_classifier",), ("image_classifier", "image_classifier_2"),
                    ("image_classifier", "image_classifier_3"), ("image_classifier", "image_classifier_2", "image_classifier_3")]
    assert whole_member_sets(keys, False, ("image_classifier", "image_classifier_2")) == [("image_classifier",)]
    assert whole_member_sets(keys, None, ("image_classifier", "image_classifier_2")) == [("image_classifier", "image_classifier_2")]
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 600)
    strata = ["a"] * 600
    signal = y * 1.0
    # three members with independent errors: their mean ranks better than any one; the third is pure noise
    m = [MemberLogits("image_classifier", signal + rng.normal(0, 1, 600), rng.normal(0, 1, 600)),
         MemberLogits("image_classifier_2", signal + rng.normal(0, 1, 600), rng.normal(0, 1, 600)),
         MemberLogits("image_classifier_3", rng.normal(0, 1, 600), rng.normal(0, 1, 600))]
    table = whole_score_table(m, strata, y, (0.0,), sets)
    chosen, alpha, _, _ = choose_whole_view(table, 0.005, (("image_classifier",), 0.0))
    assert chosen == ("image_classifier", "image_classifier_2") and alpha == 0.0
    # the shipped pair stays when nothing beats it by the bar
    assert choose_whole_view(table, 0.005, (("image_classifier", "image_classifier_2"), 0.0))[0] == ("image_classifier", "image_classifier_2")


def test_listed_members_make_the_view_and_a_missing_one_is_a_clear_error(tmp_path):
    from lesiontriage.networks.whole_view import whole_view_members
    from lesiontriage.pipeline import TriagePipeline

    models_dir = _models_dir(tmp_path, ensemble=False)
    meta = read_metadata(models_dir)
    assert whole_view_members(meta) == ("image_classifier",)
    meta["pipeline"]["whole_image_ensemble"] = True  # metadata written before members were listed
    legacy = whole_view_spec(meta)
    assert whole_view_members(meta) == ("image_classifier", "image_classifier_2")
    meta["pipeline"]["whole_image_members"] = ["image_classifier", "image_classifier_2"]
    assert whole_view_spec(meta) == legacy  # same view, same cache key
    meta["pipeline"]["whole_image_members"] = ["image_classifier_2", "image_classifier"]
    assert whole_view_spec(meta).sha256 != legacy.sha256  # the first member leads (features): another entry
    meta["pipeline"]["whole_image_members"] = ["image_classifier", "image_classifier_3"]
    write_metadata(models_dir, meta)
    with pytest.raises(ModelError, match="image_classifier_3"):
        TriagePipeline.from_dir(models_dir, fast=False)


def test_hybrid_study_without_a_whole_image_classifier_is_a_clear_error_before_any_work(tmp_path):
    from lesiontriage.train.hybrid import choose_hybrid

    models_dir = _models_dir(tmp_path, ensemble=False, with_second=False)
    meta = read_metadata(models_dir)
    del meta["models"]["image_classifier"]
    write_metadata(models_dir, meta)
    before = (models_dir / "metadata.json").read_text()
    with pytest.raises(ModelError, match="whole-image classifier"):
        choose_hybrid(models_dir)
    assert (models_dir / "metadata.json").read_text() == before


def test_whole_view_study_takes_an_augmentation_only_when_it_ranks_validation_better():
    from lesiontriage.train.hybrid import MemberLogits, choose_whole_view, whole_score_table

    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 600)
    strata = ["a"] * 300 + ["b"] * 300
    noise = {v: rng.normal(0, 1, 600) for v in range(4)}
    variants = [(224, False), (224, True), (256, False), (256, True)]
    # the photo's flips average away part of the noise: 256 px + flips ranks best, by far more than the bar
    spread = {(224, False): 1.5, (224, True): 1.4, (256, False): 1.45, (256, True): 0.6}
    members = [MemberLogits("m", y + spread[v] * noise[i], rng.normal(0, 1, 600), v) for i, v in enumerate(variants)]
    table = whole_score_table(members, strata, y, (0.0,))
    assert len(table) == 4 and set(zip(table["input_size"], table["flip_tta"])) == set(variants)
    assert choose_whole_view(table, 0.005, (("m",), 0.0, (224, False)))[3] == (256, True)
    # the shipped augmentation stays when no candidate beats it by the bar
    assert choose_whole_view(table, 0.5, (("m",), 0.0, (224, False)))[3] == (224, False)
    assert choose_whole_view(table, 0.5, (("m",), 0.0, (256, True)))[3] == (256, True)
    with pytest.raises(ValueError):  # an augmentation that was not measured cannot be the baseline
        choose_whole_view(table, 0.005, (("m",), 0.0, (288, False)))
    # a member set is a candidate only under the augmentations all its members were run with
    partial = whole_score_table(members + [MemberLogits("n", y + noise[0], y + noise[1], (224, False))], strata, y, (0.0,),
                                [("m", "n")])
    assert list(zip(partial["input_size"], partial["flip_tta"])) == [(224, False)]


def test_flip_tta_view_averages_each_members_logit_over_the_photo_and_its_flips():
    torch.manual_seed(3)
    a, b = LesionClassifier(CFG, pretrained=False).eval(), LesionClassifier(CFG, pretrained=False).eval()
    x = torch.randn(2, 3, 64, 64)
    plain = MeanLogitEnsemble([a, b], [2.0, 0.5], subtype_weight=0.5)
    flipped = MeanLogitEnsemble([a, b], [2.0, 0.5], subtype_weight=0.5, input_size=80, flip_tta=True)
    with torch.inference_mode():
        views = [plain(v) for v in (x, x.flip(-1), x.flip(-2))]
        logit, sub = flipped(x)
        lo, so, fo = flipped.outputs(x)
    assert torch.allclose(logit, torch.stack([v[0] for v in views]).mean(0), atol=1e-5)
    assert torch.allclose(sub, torch.stack([v[1] for v in views]).mean(0), atol=1e-5)
    assert not torch.allclose(logit, views[0][0], atol=1e-4)  # the flips do change a random network's answer
    assert lo.shape == (2,) and so.shape == (2, len(CFG.subtypes)) and fo.shape[0] == 2
    assert torch.allclose(lo, logit, atol=1e-3)
    # the size is the view's: callers resize the photo to config.input_size; the members keep their own config
    assert flipped.config.input_size == 80 and a.config.input_size == 64 and plain.config.input_size == 64
    assert flipped.tta == {"subtype_weight": 0.5, "input_size": 80, "flip_tta": True}


def test_spec_keys_each_augmentation_apart_and_the_trained_size_counts_as_unset(tmp_path):
    from lesiontriage.networks.whole_view import whole_view_tta

    meta = read_metadata(_models_dir(tmp_path, ensemble=False))
    plain = whole_view_spec(meta)
    meta["pipeline"]["whole_image_input_size"] = CFG.input_size  # the trained size: the same view, the same cache key
    assert whole_view_tta(meta) == (None, False) and whole_view_spec(meta) == plain and not plain.wrapped
    meta["pipeline"]["whole_image_input_size"] = 96
    bigger = whole_view_spec(meta)
    meta["pipeline"]["whole_image_flip_tta"] = True
    both = whole_view_spec(meta)
    assert (bigger.input_size, bigger.flip_tta, both.input_size, both.flip_tta) == (96, False, 96, True)
    assert bigger.wrapped and len({plain.sha256, bigger.sha256, both.sha256}) == 3
    assert both.temperature == 1.0  # wrapped: the member's own temperature is applied inside the ensemble


def test_pipeline_runs_the_view_at_its_chosen_size_with_flips(tmp_path):
    from lesiontriage.networks.fast import fast_classifier
    from lesiontriage.pipeline import TriagePipeline, _to_tensor

    models_dir = _models_dir(tmp_path, ensemble=True)
    meta = read_metadata(models_dir)
    meta["pipeline"].update({"whole_image_input_size": 96, "whole_image_flip_tta": True})
    write_metadata(models_dir, meta)
    Image.fromarray(np.random.default_rng(4).integers(0, 255, (120, 90, 3), dtype=np.uint8)).save(tmp_path / "photo.png")
    pipe = TriagePipeline.from_dir(models_dir)
    view = pipe.image_classifier
    assert isinstance(view, MeanLogitEnsemble) and view.config.input_size == 96 and view.flip_tta
    score = pipe.predict(tmp_path / "photo.png", whole_image=True).image_score
    batch = pipe._normalise([_to_tensor(pipe.load(tmp_path / "photo.png").rgb)], view.config)
    assert batch.shape[-1] == 96
    logits = []
    with torch.inference_mode():
        for key in ("image_classifier", "image_classifier_2"):
            flips = [_member_logit(models_dir, key, v) / TEMPS[key] for v in (batch, batch.flip(-1), batch.flip(-2))]
            logits.append(np.mean(flips))
    assert score == pytest.approx(1 / (1 + np.exp(-np.mean(logits))), abs=1e-4)
    fast, _ = fast_classifier(view)  # evaluation's frozen copy keeps the view's augmentation
    assert isinstance(fast, MeanLogitEnsemble) and fast.tta == view.tta
