"""The whole-image view: one whole-image classifier, or the mean of several (``pipeline.whole_image_members``).

Why an ensemble here and not for the lesion crops: the close-up blend gives the whole-image view most of the image
score, and two whole-image runs from the same start point (seeds 5 and 11) made different enough errors that the
mean of their temperature-scaled logits raised the product's validation macro AUC by 0.005 (the project's bar for a
change), where their weight average (``train soup``) did not. On a close-up the blend then drops the full-frame
view, so the second network replaces that pass rather than adding one.

**Which head scores malignancy** (``pipeline.whole_image_subtype_weight``, alpha): each member's malignant logit is
``(1 - alpha) * binary_logit / T_member + alpha * subtype_logit``, where ``subtype_logit`` is the 8-way sub-type
head's malignant mass as a logit, ``log P(MEL, BCC, AKIEC) - log P(the rest)``. The sub-type head is trained on
the same photos with finer labels, so it is a second malignancy estimate for free; ``train hybrid`` chooses alpha
from {0, 0.5, 1} on every labelled validation photo (0.005 bar) and fits the view's temperature
(``pipeline.whole_image_temperature``) for it. Measured 2026-12-07 with the shipped pair: view macro AUC 0.887 (binary)
vs 0.890 (sub-type mass) on all 1,710 validation photos, so the binary head stayed (alpha 0). On the blend study's
585-photo sample the gap looked like 0.007, and the test splits then fell (ISIC 0.914 -> 0.910, derm7pt clinical
0.806 -> 0.788): the reason the choice uses the whole validation split. With a third member
(``image_classifier_3``, configs/image_classifier_lite2_c.toml) the same step on the same 1,710 photos chose the three
members' sub-type mass: 0.8937 against the pair's binary 0.8874 (+0.0063; the three binary heads alone: 0.8848).

**Input size and flips** (``pipeline.whole_image_input_size``, ``pipeline.whole_image_flip_tta``): the view may run
its members at another side than they were trained at and average them over the photo and its horizontal and
vertical flips; both belong to the view (:class:`MeanLogitEnsemble`), so the pipeline, evaluation and the blend study
all run the same thing. First measured with ``scripts/whole_view_tta_study.py`` (2026-12-07): for the binary pair no
candidate cleared the 0.005 bar; for the three-member sub-type view 256 px + h/v flips gave +0.0054. Since then
``train hybrid`` chooses size and flips with the members and the head (step 0, all 1,710 validation photos): on
2026-12-07 it chose image_classifier + image_classifier_3, sub-type mass, 256 px + flips, macro AUC 0.8998 against
0.8937 for the shipped three members at 224 px without flips (+0.0061; the three members at 256 px + flips: 0.8991).
Cost: two members x three views at 1.3x the pixels, 124 ms per close-up (``lesiontriage bench``, closeup_4032x3024:
0.60 s end to end) against ~70 ms for the three-member view run once at 224 px (eager, 2-core CPU); a photo whose
largest kept box is under the soft gate's start (a wide-field photo of moles) never runs the view.

**Why a fixed mean and not a learned combination:** ``scripts/whole_view_stack_study.py`` (2026-12-07, 1,710
validation photos, 5-fold cross-validation) fitted logistic regressions over the members' binary logits, sub-type
masses and all 8 sub-type log-probabilities (also with the third member and the lesion classifier's frame view): the
best, 0.8990, did not beat this mean's 0.8996, and every stacker on sub-type log-probabilities fell to 0.879-0.894.
Nor did a nearest-neighbour vote (2026-12-07, session study, not shipped): the malignant share among the k most
similar training photos (cosine on image_classifier's pooled 256 px features, k 10-100, all sources or the photo's
own) scored 0.851-0.886 alone and raised image_classifier's own sub-type-mass view from 0.8847 to at most 0.8869 when
blended in: the network's head already says what its features' neighbours do.

Everything that caches or calibrates whole-image outputs (evaluation, the hybrid study) keys them on
:func:`whole_view_spec`, so a single model, the ensemble and each score definition never share a cache entry.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from lesiontriage.data.schema import MALIGNANT_CODES

SECOND_KEY = "image_classifier_2"


def subtype_malignant_logit(subtype_logits: torch.Tensor, subtypes: tuple[str, ...]) -> torch.Tensor:
    """``log P(malignant sub-types) - log P(benign sub-types)`` under the softmax of ``subtype_logits`` [N, C]:
    the logit of the sub-type head's malignant mass, computed with logsumexp (no clipping of tiny masses).
    Log-probabilities work as input too (the softmax of log p is p)."""
    malignant = [i for i, s in enumerate(subtypes) if s in MALIGNANT_CODES]
    benign = [i for i, s in enumerate(subtypes) if s not in MALIGNANT_CODES]
    if not malignant or not benign:
        raise ValueError(f"sub-types {subtypes} need both malignant ({sorted(MALIGNANT_CODES)}) and benign classes")
    z = subtype_logits.float()
    return torch.logsumexp(z[:, malignant], dim=-1) - torch.logsumexp(z[:, benign], dim=-1)


@dataclass(frozen=True)
class WholeViewSpec:
    """Which shipped models make the whole-image view, the tag its outputs are cached under, and the temperature
    to apply to its logit (1.0 for the ensemble: each member's own temperature is applied inside it)."""

    members: tuple[str, ...]
    sha256: str
    temperature: float
    subtype_weight: float = 0.0  # alpha: the sub-type head's share of each member's malignant logit
    input_size: int | None = None  # the photo's side when the view runs it (None: the members' trained size)
    flip_tta: bool = False  # average the view over the photo and its horizontal and vertical flips

    @property
    def wrapped(self) -> bool:
        """Whether the view is a :class:`MeanLogitEnsemble` (two members, a sub-type share, another input size or
        flips) rather than one plain classifier."""
        return len(self.members) > 1 or self.subtype_weight > 0 or self.input_size is not None or self.flip_tta


def whole_view_members(metadata: dict[str, Any]) -> tuple[str, ...]:
    """The whole-image models metadata.json asks for: ``pipeline.whole_image_members`` (chosen by ``train hybrid``),
    else the two-model ensemble of ``pipeline.whole_image_ensemble`` (metadata written before members were listed),
    else ``image_classifier`` alone. Not checked against ``models``: the pipeline refuses missing ones."""
    pipeline = metadata.get("pipeline") or {}
    listed = pipeline.get("whole_image_members")
    if listed:
        return tuple(str(k) for k in listed)
    if pipeline.get("whole_image_ensemble"):
        return ("image_classifier", SECOND_KEY)
    return ("image_classifier",)


def whole_view_spec(metadata: dict[str, Any]) -> WholeViewSpec | None:
    """The whole-image view described by metadata.json (its requested members that are installed), or None without
    a whole-image classifier."""
    models = metadata.get("models") or {}
    pipeline = metadata.get("pipeline") or {}
    first = models.get("image_classifier")
    if not first:
        return None
    members = tuple(k for k in whole_view_members(metadata) if k in models) or ("image_classifier",)
    alpha = float(pipeline.get("whole_image_subtype_weight") or 0.0)
    size, flips = whole_view_tta(metadata)
    if members == ("image_classifier",) and alpha == 0 and size is None and not flips:
        return WholeViewSpec(members, str(first.get("sha256", "")), float(first.get("temperature", 1.0)))
    parts = [models[k]["sha256"] for k in members]
    temperature = 1.0  # the members' own temperatures are applied inside the ensemble
    if alpha > 0:
        temperature = float(pipeline.get("whole_image_temperature") or 1.0)
        parts.append(f"subtype={alpha:g}|T={temperature:.6g}")  # p depends on both: never share a cache entry
    if size is not None or flips:  # only when set: views shipped before the option keep their cache entries
        parts.append(f"size={size}|flips={int(flips)}")
    combined = hashlib.sha256("+".join(parts).encode()).hexdigest()
    return WholeViewSpec(members, combined, temperature, alpha, size, flips)


def whole_view_tta(metadata: dict[str, Any]) -> tuple[int | None, bool]:
    """(input size, flip TTA) of the view from ``pipeline.whole_image_input_size`` / ``whole_image_flip_tta``
    (chosen by ``train hybrid``); a size equal to the first member's trained size counts as unset."""
    pipeline = metadata.get("pipeline") or {}
    size = pipeline.get("whole_image_input_size")
    trained = ((metadata.get("models") or {}).get("image_classifier") or {}).get("config", {}).get("input_size")
    size = int(size) if size and int(size) != (int(trained) if trained else None) else None
    return size, bool(pipeline.get("whole_image_flip_tta"))


class MeanLogitEnsemble:
    """Members' malignant logits each divided by its own temperature, then averaged (a calibrated logit: use
    temperature 1.0 on it); sub-type probabilities averaged; pooled features from the first member. With
    ``subtype_weight`` alpha > 0 each member's logit is ``(1 - alpha) * binary / T + alpha * sub-type malignant
    logit`` (the view's temperature, fitted for that mix, is applied by the caller).

    **Test-time augmentation** belongs to the view, so every caller (pipeline, evaluation, the blend study) runs
    the same thing: ``input_size`` replaces the members' trained size in ``config`` (callers resize the photo to
    ``config.input_size``), and ``flip_tta`` averages each member's logit and sub-type probabilities over the batch
    and its horizontal and vertical flips (one forward of 3N photos per member; features from the unflipped photo).

    Called like a ``LesionClassifier`` (``model(x)``, ``model.outputs(x)``, ``model.config``). Not an ``nn.Module``:
    its members may be eager classifiers or their frozen CPU copies (networks/fast.py builds one per member)."""

    def __init__(self, members: list[Any], temperatures: list[float], subtype_weight: float = 0.0,
                 input_size: int | None = None, flip_tta: bool = False) -> None:
        if len(members) != len(temperatures) or not members:
            raise ValueError("one temperature per member, at least one member")
        if not 0.0 <= subtype_weight <= 1.0:
            raise ValueError(f"subtype_weight must lie in [0, 1], got {subtype_weight}")
        if input_size is not None and input_size < 32:
            raise ValueError(f"input_size must be at least 32 px, got {input_size}")
        self.members = list(members)
        self.temperatures = [float(t) for t in temperatures]
        self.subtype_weight = float(subtype_weight)
        self.input_size = input_size
        self.flip_tta = bool(flip_tta)
        first = members[0].config
        self.config = replace(first, input_size=int(input_size)) if input_size else first

    @property
    def tta(self) -> dict[str, Any]:
        """The keyword arguments that rebuild this view's augmentation around other members (networks/fast.py)."""
        return {"subtype_weight": self.subtype_weight, "input_size": self.input_size, "flip_tta": self.flip_tta}

    def _views(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x.flip(-1), x.flip(-2)]) if self.flip_tta else x

    def _mean_views(self, t: torch.Tensor, n: int) -> torch.Tensor:
        return t.reshape(3, n, *t.shape[1:]).mean(0) if self.flip_tta else t

    def _member_logit(self, member: Any, binary_logit: torch.Tensor, subtype_scores: torch.Tensor,
                      temperature: float) -> torch.Tensor:
        z = binary_logit.float() / temperature
        if self.subtype_weight == 0:
            return z
        mass = subtype_malignant_logit(subtype_scores, tuple(member.config.subtypes))
        return (1.0 - self.subtype_weight) * z + self.subtype_weight * mass

    def eval(self) -> "MeanLogitEnsemble":
        for m in self.members:
            if isinstance(m, nn.Module):
                m.eval()
        return self

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, views = len(x), self._views(x)
        outs = [m(views) for m in self.members]
        logit = torch.stack([self._member_logit(m, o[0], o[1], t)
                             for m, o, t in zip(self.members, outs, self.temperatures)]).mean(0)
        return self._mean_views(logit, n), self._mean_views(torch.stack([o[1].float() for o in outs]).mean(0), n)

    def outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, views = len(x), self._views(x)
        outs = [m.outputs(views) for m in self.members]  # sub-type *probabilities* here: their log works as logits
        logit = torch.stack([self._member_logit(m, o[0], torch.log(o[1].float().clamp_min(1e-30)), t)
                             for m, o, t in zip(self.members, outs, self.temperatures)]).mean(0)
        return self._mean_views(logit, n), self._mean_views(torch.stack([o[1].float() for o in outs]).mean(0), n), outs[0][2][:n]
