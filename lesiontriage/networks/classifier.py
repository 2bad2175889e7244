"""Lesion malignancy classifier: EfficientNet-Lite trunk, a binary malignant head and an 8-way sub-type head.

The same module serves the direct whole-image baseline (issue 10 item 4): only the training data
differ (whole images instead of lesion crops), which keeps the comparison fair.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from lesiontriage.networks.backbones import LITE_MEAN, LITE_STD, create_lite
from lesiontriage.results import SUBTYPES


@dataclass
class ClassifierConfig:
    """Everything needed to rebuild the network (stored in metadata.json)."""

    variant: str = "lite0"
    input_size: int = 224
    mean: tuple[float, float, float] = LITE_MEAN
    std: tuple[float, float, float] = LITE_STD
    subtypes: tuple[str, ...] = SUBTYPES
    dropout: float = 0.2
    crop_margin: float = 0.25  # context around the box, as a fraction of the box side
    # Shades-of-grey colour constancy (Finlayson & Trezzi 2004) applied inside the network, power p; 0 = off.
    # Why: the ISIC 2018/2019 winners normalised each photo's illuminant this way; the photos here come from many
    # cameras and dermatoscopes. Inside the module (not the data pipeline) so every caller gets it: the shared
    # whole-image input of an ensemble, Grad-CAM, the trainer.
    color_constancy: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ClassifierConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for k in ("mean", "std", "subtypes"):
            if k in known:
                known[k] = tuple(known[k])
        return cls(**known)


def shades_of_grey(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], power: float) -> torch.Tensor:
    """Shades-of-grey colour constancy on a normalised batch [N, 3, H, W]: each channel scaled so the photo's
    Minkowski p-norm illuminant estimate becomes grey (its mean over channels kept), clipped to the valid range,
    then normalised again. p = 1 is grey-world, p -> inf max-RGB; p = 6 is the usual choice."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    rgb = (x * s + m).clamp(0.0, 1.0)
    illuminant = rgb.float().pow(power).mean(dim=(2, 3), keepdim=True).pow(1.0 / power).clamp_min(1e-6)
    gain = (illuminant.mean(dim=1, keepdim=True) / illuminant).to(x.dtype)
    return ((rgb * gain).clamp(0.0, 1.0) - m) / s


class LesionClassifier(nn.Module):
    """Returns ``(malignant_logit [N], subtype_logits [N, 8])``; also exposes pooled features."""

    def __init__(self, config: ClassifierConfig, pretrained: bool = True) -> None:
        super().__init__()
        self.config = config
        self.trunk = create_lite(config.variant, pretrained=pretrained, num_classes=0)
        width = self.trunk.num_features
        self.dropout = nn.Dropout(config.dropout)
        self.malignant_head = nn.Linear(width, 1)
        self.subtype_head = nn.Linear(width, len(config.subtypes))

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised input, illuminant-corrected when ``config.color_constancy`` > 0."""
        if self.config.color_constancy <= 0:
            return x
        return shades_of_grey(x, self.config.mean, self.config.std, self.config.color_constancy)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(self.preprocess(x))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mal, sub, _ = self.forward_with_features(x)
        return mal, sub

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The training forward pass that also returns the (dropped-out) pooled features, for training-only
        auxiliary heads (train/classifier.py)."""
        f = self.dropout(self.features(x))
        return self.malignant_head(f).squeeze(-1), self.subtype_head(f), f

    @torch.inference_mode()
    def outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inference split at the pooled features: raw malignant logit [N], sub-type probabilities
        [N, C] and the pooled features [N, F] (float32), for studies and context models that need
        all three from one forward pass."""
        f = self.features(x)
        logit = self.malignant_head(f).squeeze(-1).float()
        sub = torch.softmax(self.subtype_head(f).float(), dim=-1)
        return logit, sub, f.float()

    def heads(self) -> list[nn.Module]:
        return [self.malignant_head, self.subtype_head]

    # Grad-CAM needs a single-output model and a target conv layer.
    def gradcam_target_layer(self) -> nn.Module:
        return self.trunk.conv_head


class MalignantLogitOnly(nn.Module):
    """Wrapper for Grad-CAM: one output column = the malignant logit."""

    def __init__(self, model: LesionClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[0].unsqueeze(-1)
