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

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ClassifierConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for k in ("mean", "std", "subtypes"):
            if k in known:
                known[k] = tuple(known[k])
        return cls(**known)


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

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.dropout(self.trunk(x))
        return self.malignant_head(f).squeeze(-1), self.subtype_head(f)

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
