"""The 7-point checklist auxiliary targets and the trainer's training-only head."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from lesiontriage.data.seven_point import ATYPICAL, CRITERIA, masked_bce, seven_point_targets


def _case(**criteria: str) -> dict:
    base = {c: "absent" for c in CRITERIA}
    base.update({"pigment_network": "typical", "dots_and_globules": "regular"})
    base.update(criteria)
    return base


def test_only_the_checklists_scoring_findings_count_as_atypical():
    rows = pd.DataFrame([
        _case(),
        _case(pigment_network="atypical", streaks="irregular", pigmentation="localized irregular",
              regression_structures="white areas", dots_and_globules="irregular", blue_whitish_veil="present",
              vascular_structures="dotted"),
        _case(streaks="regular", pigmentation="diffuse regular", vascular_structures="arborizing"),
    ])
    t = seven_point_targets(rows)
    assert t.shape == (3, 7)
    assert t[0].tolist() == [0.0] * 7
    assert t[1].tolist() == [1.0] * 7
    assert t[2].tolist() == [0.0] * 7  # regular streaks / pigmentation and arborizing vessels score nothing


def test_rows_without_criteria_are_unknown_not_negative():
    rows = pd.DataFrame([_case(pigment_network="atypical"), {c: None for c in CRITERIA}, {c: "" for c in CRITERIA}])
    t = seven_point_targets(rows)
    assert t[0, CRITERIA.index("pigment_network")] == 1.0
    assert np.isnan(t[1:]).all()
    assert np.isnan(seven_point_targets(pd.DataFrame({"source": ["ham10000"]}))).all()  # columns absent


def test_masked_loss_ignores_unknown_targets_and_is_zero_without_any():
    logits = torch.tensor([[3.0, -3.0], [0.0, 0.0]], requires_grad=True)
    targets = torch.tensor([[1.0, 0.0], [float("nan"), float("nan")]])
    loss = masked_bce(logits, targets)
    assert loss.item() == pytest.approx(float(torch.nn.functional.softplus(torch.tensor(-3.0))), rel=1e-5)
    loss.backward()
    assert logits.grad[1].abs().sum() == 0  # the unknown row gets no gradient
    none = masked_bce(logits, torch.full((2, 2), float("nan")))
    assert none.item() == 0.0 and none.requires_grad


def test_trainer_learns_the_auxiliary_head_without_exporting_it(tmp_path, monkeypatch):
    from tests.test_training import _tiny_root

    import lesiontriage.train.classifier as clf

    monkeypatch.setattr(clf, "RUNS_DIR", tmp_path / "runs")
    torch.set_num_threads(1)
    root, manifest_path = _tiny_root(tmp_path)
    manifest = pd.read_parquet(manifest_path)
    for c in CRITERIA:  # pretend these rows are derm7pt cases: malignant ones show the atypical findings
        manifest[c] = np.where(manifest["malignant"].astype(int) == 1, sorted(ATYPICAL[c])[0], "absent")
    manifest.to_parquet(manifest_path)
    cfg = clf.ClassifierTrainConfig(name="tiny_aux", network={"input_size": 64}, sources=["ham10000"],
                                    source_shares={"ham10000": 1.0}, epoch_samples=16, batch_size=8, warmup_epochs=0,
                                    epochs=1, num_workers=0, bf16=False, ckpt_every_steps=1, seven_point_weight=1.0)
    trainer = clf.ClassifierTrainer(cfg, manifest_path=manifest_path, data_root=root)
    assert not torch.isnan(trainer.aux_targets).any()
    before = trainer.aux_head.weight.detach().clone()
    trainer.fit()
    assert not torch.equal(before, trainer.aux_head.weight)  # the head was trained
    best = torch.load(tmp_path / "runs" / "tiny_aux" / "best.pt", weights_only=False)
    assert set(best["model"]) == set(trainer.model.state_dict())  # the exported weights hold no auxiliary head
    ckpt = torch.load(tmp_path / "runs" / "tiny_aux" / "checkpoint.pt", weights_only=False)
    assert set(ckpt["aux_head"]) == {"weight", "bias"}  # but a resume keeps it
