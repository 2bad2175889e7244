"""The 7-point checklist's atypical findings as binary training targets (derm7pt only).

Why: derm7pt has 413 training cases, the smallest and hardest labelled set (clinical photos of thin melanomas
next to Clark and Reed/Spitz nevi), but each case carries seven dermoscopic criteria scored by experts. Asking a
network to predict them from either photo of the case (an auxiliary head during training only; see
``ClassifierTrainConfig.seven_point_weight``) is richer supervision than one malignant bit, the multi-task set-up of
the derm7pt paper (Kawahara et al. 2019). The clinical photo inherits its case's dermoscopic criteria: the head learns
what a clinical view can tell of them.

Each criterion is reduced to "atypical" (the checklist's point-scoring finding) vs the rest; rows of other sources,
or with a criterion unknown, get NaN and are left out of the loss.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch.nn import functional as F

# criterion column -> the values that score on the 7-point checklist (Argenziano 1998; derm7pt's own coding)
ATYPICAL: dict[str, frozenset[str]] = {
    "pigment_network": frozenset({"atypical"}),
    "blue_whitish_veil": frozenset({"present"}),
    "vascular_structures": frozenset({"dotted", "linear irregular"}),
    "pigmentation": frozenset({"diffuse irregular", "localized irregular"}),
    "streaks": frozenset({"irregular"}),
    "dots_and_globules": frozenset({"irregular"}),
    "regression_structures": frozenset({"blue areas", "white areas", "combinations"}),
}
CRITERIA: tuple[str, ...] = tuple(ATYPICAL)


def seven_point_targets(rows: pd.DataFrame) -> np.ndarray:
    """[N, 7] float32: 1 where the row's case shows the atypical finding, 0 where it does not, NaN where the
    criterion is unknown (every row outside derm7pt)."""
    out = np.full((len(rows), len(CRITERIA)), np.nan, dtype=np.float32)
    for j, name in enumerate(CRITERIA):
        if name not in rows:
            continue
        values = rows[name].astype("string").str.strip().str.lower()
        known = values.notna() & (values != "")
        out[known.to_numpy(), j] = values[known].isin(ATYPICAL[name]).to_numpy(np.float32)
    return out


def masked_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy over the known (non-NaN) targets; 0 (with a gradient path) when none is known,
    so a batch without derm7pt rows costs nothing."""
    known = ~torch.isnan(targets)
    if not bool(known.any()):
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits[known], targets[known])
