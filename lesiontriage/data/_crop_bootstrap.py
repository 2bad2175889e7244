"""Temporary copy of imaging.crop_with_margin used only until imaging.py lands (removed after)."""
from __future__ import annotations

import cv2
import numpy as np


def crop_with_margin(rgb: np.ndarray, box, margin: float = 0.25, square: bool = True) -> np.ndarray:
    h, w = rgb.shape[:2]
    x1, y1, x2, y2 = [float(v) for v in box]
    bw, bh = max(1.0, x2 - x1), max(1.0, y2 - y1)
    if square:
        bw = bh = max(bw, bh)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    hw, hh = bw * (1 + 2 * margin) / 2, bh * (1 + 2 * margin) / 2
    X1, Y1, X2, Y2 = int(round(cx - hw)), int(round(cy - hh)), int(round(cx + hw)), int(round(cy + hh))
    X2, Y2 = max(X2, X1 + 1), max(Y2, Y1 + 1)
    pad_l, pad_t, pad_r, pad_b = max(0, -X1), max(0, -Y1), max(0, X2 - w), max(0, Y2 - h)
    crop = rgb[max(0, Y1):min(h, Y2), max(0, X1):min(w, X2)]
    if pad_l or pad_t or pad_r or pad_b:
        mode = cv2.BORDER_REFLECT_101 if min(crop.shape[:2]) > 1 else cv2.BORDER_REPLICATE
        crop = cv2.copyMakeBorder(np.ascontiguousarray(crop), pad_t, pad_b, pad_l, pad_r, mode)
    return crop
