"""Grad-CAM explanations (pytorch-grad-cam) of the classifier's malignant logit on one lesion crop.

Why Grad-CAM on the crop: it shows which pixels of *that lesion* pushed its probability up, and
whether the model looks at rulers, pen marks or watermarks instead (a known shortcut risk).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from lesiontriage.networks.classifier import LesionClassifier, MalignantLogitOnly


def gradcam_heatmap(model: LesionClassifier, crop_rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cam in [0, 1] at input size, the resized crop as float RGB in [0, 1])."""
    cfg = model.config
    size = cfg.input_size
    x = torch.from_numpy(np.ascontiguousarray(crop_rgb)).permute(2, 0, 1).float()[None] / 255.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    shown = x[0].permute(1, 2, 0).clamp(0, 1).numpy()
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1)
    wrapped = MalignantLogitOnly(model).eval()
    with GradCAM(model=wrapped, target_layers=[model.gradcam_target_layer()]) as cam:
        heat = cam(input_tensor=(x - mean) / std, targets=[ClassifierOutputTarget(0)])[0]
    return heat, shown


def gradcam_overlay(model: LesionClassifier, crop_rgb: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The crop with its Grad-CAM heat map blended on top (RGB uint8)."""
    heat, shown = gradcam_heatmap(model, crop_rgb)
    return show_cam_on_image(shown.astype(np.float32), heat, use_rgb=True, image_weight=1 - alpha)
