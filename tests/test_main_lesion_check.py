"""train/main_lesion_check.py: the main-lesion rule ships only if every labelled validation photo confirms it."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lesiontriage.pipeline import PipelineSettings
from lesiontriage.results import Lesion, TriageResult, Tier
from lesiontriage.train.main_lesion_check import confirm_main_lesion, confirmation_rows, score_without_main_lesion


def _result(ps: list[float], main: int | None, w: float = 0.2, f: float = 0.4, whole: float = 0.7, frame: float = 0.9,
            aggregate: str = "mean") -> TriageResult:
    lesions = [Lesion(i, [0, 0, 1, 1], 0.9 - 0.1 * i, p) for i, p in enumerate(ps)]
    lesion = ps[main] if main is not None else float(np.mean(ps))
    score = (1 - w - f) * lesion + w * whole + f * frame
    return TriageResult("x.jpg", 10, 10, lesions, aggregate, score, Tier("routine", "", None), None, {},
                        lesion_score=lesion, whole_image_score=whole, whole_image_weight=w, full_frame_score=frame,
                        full_frame_weight=f, main_lesion=main)


def test_score_without_main_lesion_puts_the_aggregate_back_and_keeps_the_views():
    res = _result([0.9, 0.1, 0.2], main=1)
    assert res.image_score == pytest.approx(0.4 * 0.1 + 0.2 * 0.7 + 0.4 * 0.9)
    assert score_without_main_lesion(res) == pytest.approx(0.4 * 0.4 + 0.2 * 0.7 + 0.4 * 0.9)
    assert score_without_main_lesion(dataclasses.replace(res, aggregate="max")) == pytest.approx(0.4 * 0.9 + 0.2 * 0.7 + 0.4 * 0.9)
    plain = _result([0.9, 0.1, 0.2], main=None)
    assert score_without_main_lesion(plain) == plain.image_score


def _manifest(n_ham: int = 40) -> pd.DataFrame:
    rows = []
    for i in range(60):
        rows.append({"path": f"d/{i}.jpg", "split": "val", "source": "derm7pt", "modality": "clinical",
                     "malignant": float(i % 2), "diagnosis": "MEL" if i % 2 else "NV"})
    for i in range(n_ham):
        rows.append({"path": f"h/{i}.jpg", "split": "val", "source": "ham10000", "modality": "dermoscopy",
                     "malignant": float(i % 2), "diagnosis": "BCC" if i % 2 else "NV"})
    rows.append({"path": "t/0.jpg", "split": "test", "source": "derm7pt", "modality": "clinical", "malignant": 1.0, "diagnosis": "MEL"})
    rows.append({"path": "u/0.jpg", "split": "val", "source": "derm7pt", "modality": "clinical", "malignant": None, "diagnosis": "MISC"})
    return pd.DataFrame(rows)


class _FakePipe:
    """Clinical close-ups whose main lesion carries the label (``helps``) or is noise beside informative spots;
    HAM photos untouched."""

    def __init__(self, helps: bool, on: bool = True) -> None:
        self.settings = PipelineSettings(closeup_ramp_primary_lesion=on)
        self.metadata = {"models": {"classifier": {"sha256": "abc" if helps else "def"}}}
        self.helps, self.calls = helps, 0
        self.rng = np.random.default_rng(0)

    def predict(self, path: Path, aggregate: str) -> TriageResult:
        self.calls += 1
        i = int(Path(path).stem)
        y = i % 2
        if "/d/" in str(path):
            signal = lambda: float(np.clip(0.3 + 0.4 * y + self.rng.normal(0, 0.1), 0, 1))
            main = signal() if self.helps else float(self.rng.uniform())
            spots = self.rng.uniform(0, 1, 2).tolist() if self.helps else [signal(), signal()]
            return _result([spots[0], main, spots[1]], main=1, aggregate=aggregate)
        return _result([0.2 + 0.5 * y], main=None, aggregate=aggregate)


def test_rows_are_every_labelled_validation_photo_with_ham_capped():
    rows = confirmation_rows(_manifest(40), ham_cap=10)
    assert (rows["split"] == "val").all() and rows["malignant"].notna().all()
    assert (rows["source"] == "derm7pt").sum() == 60 and (rows["source"] == "ham10000").sum() == 10


def test_confirmation_passes_only_a_real_gain_and_is_cached(tmp_path):
    good = confirm_main_lesion(_FakePipe(helps=True), _manifest(), tmp_path, tmp_path, min_gain=0.005, ham_cap=20)
    assert good.confirmed and good.n_photos == 80 and good.n_main_lesion == 60
    assert good.strata_with["derm7pt/clinical"] > good.strata_without["derm7pt/clinical"] + 0.05
    assert good.strata_with["ham10000/dermoscopy"] == good.strata_without["ham10000/dermoscopy"]
    assert good.to_dict()["confirmed"] is True
    noise = confirm_main_lesion(_FakePipe(helps=False), _manifest(), tmp_path, tmp_path, min_gain=0.005, ham_cap=20)
    assert not noise.confirmed and noise.macro_with < noise.macro_without
    again = _FakePipe(helps=True)
    assert confirm_main_lesion(again, _manifest(), tmp_path, tmp_path, 0.005, 20) == good and again.calls == 0  # cached
    with pytest.raises(ValueError, match="switch the main-lesion rule on"):
        confirm_main_lesion(_FakePipe(helps=True, on=False), _manifest(), tmp_path, tmp_path, 0.005, 20)
