"""The whole-image view: one whole-image classifier, or the mean of two (``pipeline.whole_image_ensemble``).

Why an ensemble here and not for the lesion crops: the close-up blend gives the whole-image view most of the image
score, and two whole-image runs from the same start point (seeds 5 and 11) made different enough errors that the
mean of their temperature-scaled logits raised the product's validation macro AUC by 0.005 (the project's bar for a
change), where their weight average (``train soup``) did not. On a close-up the blend then drops the full-frame
view, so the second network replaces that pass rather than adding one.

Everything that caches or calibrates whole-image outputs (evaluation, the hybrid study) keys them on
:func:`whole_view_spec`, so a single model and the ensemble never share a cache entry.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

SECOND_KEY = "image_classifier_2"


@dataclass(frozen=True)
class WholeViewSpec:
    """Which shipped models make the whole-image view, the tag its outputs are cached under, and the temperature
    to apply to its logit (1.0 for the ensemble: each member's own temperature is applied inside it)."""

    members: tuple[str, ...]
    sha256: str
    temperature: float


def whole_view_spec(metadata: dict[str, Any]) -> WholeViewSpec | None:
    """The whole-image view described by metadata.json, or None without a whole-image classifier."""
    models = metadata.get("models") or {}
    first = models.get("image_classifier")
    if not first:
        return None
    if (metadata.get("pipeline") or {}).get("whole_image_ensemble") and SECOND_KEY in models:
        shas = [first["sha256"], models[SECOND_KEY]["sha256"]]
        combined = hashlib.sha256("+".join(shas).encode()).hexdigest()
        return WholeViewSpec(("image_classifier", SECOND_KEY), combined, 1.0)
    return WholeViewSpec(("image_classifier",), str(first.get("sha256", "")), float(first.get("temperature", 1.0)))


class MeanLogitEnsemble:
    """Members' malignant logits each divided by its own temperature, then averaged (a calibrated logit: use
    temperature 1.0 on it); sub-type probabilities averaged; pooled features from the first member.

    Called like a ``LesionClassifier`` (``model(x)``, ``model.outputs(x)``, ``model.config``). Not an ``nn.Module``:
    its members may be eager classifiers or their frozen CPU copies (networks/fast.py builds one per member)."""

    def __init__(self, members: list[Any], temperatures: list[float]) -> None:
        if len(members) != len(temperatures) or not members:
            raise ValueError("one temperature per member, at least one member")
        self.members = list(members)
        self.temperatures = [float(t) for t in temperatures]
        self.config = members[0].config

    def eval(self) -> "MeanLogitEnsemble":
        for m in self.members:
            if isinstance(m, nn.Module):
                m.eval()
        return self

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outs = [m(x) for m in self.members]
        logit = torch.stack([o[0].float() / t for o, t in zip(outs, self.temperatures)]).mean(0)
        return logit, torch.stack([o[1].float() for o in outs]).mean(0)

    def outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        outs = [m.outputs(x) for m in self.members]
        logit = torch.stack([o[0].float() / t for o, t in zip(outs, self.temperatures)]).mean(0)
        return logit, torch.stack([o[1].float() for o in outs]).mean(0), outs[0][2]
