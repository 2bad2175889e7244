"""A procedurally drawn wide-field skin photo with mole-like spots: SYNTHETIC, needs no data set.

Why: the app needs an example that is always available (no data root, no patient image), the
benchmark needs phone-sized photos of realistic content, and tests need images with known lesion
boxes. Nothing here is a real person or a real lesion; the image carries a small "SYNTHETIC" tag
(``stamp=True``) so a screenshot cannot be mistaken for a patient photo.
"""
from __future__ import annotations

import cv2
import numpy as np

SYNTHETIC = True  # everything this module returns is generated

# Skin base colours (RGB), light to dark; roughly Fitzpatrick I-VI under daylight.
SKIN_TONES: tuple[tuple[int, int, int], ...] = (
    (236, 200, 178), (226, 184, 156), (212, 166, 134), (190, 140, 105), (150, 102, 72), (105, 70, 50),
)
# Lesion palettes (centre colour, rim colour): tan / brown / dark / blue-black naevi, red
# (vascular), pink pearly (BCC-like), irregular brown-black (melanoma-like).
LESION_PALETTES: tuple[tuple[tuple[int, int, int], tuple[int, int, int]], ...] = (
    ((150, 100, 70), (175, 125, 95)),
    ((105, 65, 45), (140, 95, 70)),
    ((60, 40, 34), (100, 65, 48)),
    ((55, 55, 75), (95, 80, 90)),
    ((165, 55, 60), (190, 95, 95)),
    ((205, 135, 130), (215, 160, 150)),
    ((45, 30, 28), (135, 85, 60)),
)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """Zero-mean, unit-std noise with features about ``cell`` pixels wide (low-res, resized)."""
    gh, gw = max(2, h // cell + 2), max(2, w // cell + 2)
    g = rng.standard_normal((gh, gw), dtype=np.float32)
    g = cv2.resize(g, (w, h), interpolation=cv2.INTER_CUBIC)
    return (g - g.mean()) / (g.std() + 1e-6)


def _skin(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    base = np.asarray(SKIN_TONES[int(rng.integers(len(SKIN_TONES)))], np.float32)
    base *= 1.0 + rng.normal(0, 0.03, 3).astype(np.float32)
    s = max(w, h)
    img = np.empty((h, w, 3), np.float32)
    img[:] = base
    light = 0.035 * _smooth_noise(rng, h, w, max(8, s // 4))         # broad shading
    blotch = 0.008 * _smooth_noise(rng, h, w, max(4, s // 60))        # faint mottling
    red = np.clip(_smooth_noise(rng, h, w, max(4, s // 20)), 0, None) * 0.02  # redness patches
    img *= (1.0 + light + blotch)[..., None]
    img[..., 1] *= 1.0 - red
    img[..., 2] *= 1.0 - 0.6 * red
    # body curvature: one side falls off into shadow like the flank of a back or an arm
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ang = rng.uniform(0, 2 * np.pi)
    t = (np.cos(ang) * (xx / w - 0.5) + np.sin(ang) * (yy / h - 0.5))
    img *= (1.0 - rng.uniform(0.15, 0.35) * np.clip(t + 0.2, 0, None) ** 2)[..., None]
    # pores / fine relief
    fine = rng.standard_normal((h, w), dtype=np.float32)
    fine = cv2.GaussianBlur(fine, (0, 0), max(0.7, s / 2500))
    img *= (1.0 + 0.018 * fine / (fine.std() + 1e-6))[..., None]
    # a few fine hairs
    n_hair = int(rng.integers(0, 25))
    hair = np.zeros((h, w), np.float32)
    for _ in range(n_hair):
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        a = rng.uniform(0, np.pi)
        length = rng.uniform(0.02, 0.06) * s
        pts = []
        for k in range(8):
            a += rng.normal(0, 0.12)
            pts.append((int(x), int(y)))
            x += np.cos(a) * length / 8
            y += np.sin(a) * length / 8
        cv2.polylines(hair, [np.asarray(pts, np.int32)], False, float(rng.uniform(0.15, 0.4)), max(1, s // 1400), cv2.LINE_AA)
    img *= (1.0 - hair)[..., None]
    return img


def _blob(rng: np.random.Generator, r: float) -> tuple[np.ndarray, int]:
    """An irregular soft blob (alpha 0..1) on a square patch; returns (alpha, patch half-size)."""
    half = int(np.ceil(r * 1.9)) + 3
    n = 2 * half + 1
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) - half
    ang = np.arctan2(yy, xx)
    rad = np.hypot(xx, yy)
    irregular = rng.uniform(0.0, 0.25)
    edge = np.ones_like(ang)
    for k in range(2, 7):
        edge += irregular / k * rng.uniform(0.3, 1.0) * np.cos(k * ang + rng.uniform(0, 2 * np.pi))
    aspect = rng.uniform(0.7, 1.0)
    rot = rng.uniform(0, np.pi)
    xr = xx * np.cos(rot) + yy * np.sin(rot)
    yr = (-xx * np.sin(rot) + yy * np.cos(rot)) / aspect
    rad = np.hypot(xr, yr)
    softness = r * rng.uniform(0.04, 0.3)
    alpha = np.clip((r * edge - rad) / max(softness, 0.6) + 0.5, 0, 1)
    return alpha.astype(np.float32), half


def make_demo_scene(seed: int = 0, size: tuple[int, int] = (1600, 1200), n_lesions: int | None = None,
                    stamp: bool = True, return_masks: bool = False, radius: tuple[float, float] = (0.005, 0.04)):
    """A SYNTHETIC wide-field skin photo and its lesion boxes.

    Returns ``(rgb, boxes)``: ``rgb`` is H x W x 3 uint8 with ``size = (width, height)``;
    ``boxes`` is a list of ``[x1, y1, x2, y2]`` (pixels, float) around every drawn spot, tight
    around the part of the spot whose opacity is at least 0.25. Deterministic in ``seed``.
    Spots are about 1-8 % of the long side, non-overlapping, in varied colours and border
    sharpness; ``radius``: the range of a spot's radius as a fraction of the long side (log-uniform; a close-up of
    one lesion: ``n_lesions=1, radius=(0.12, 0.14)``). With ``return_masks=True`` a third item lists each spot's opacity (float32, 0-1)
    as ``(x0, y0, alpha)`` so tests can check the boxes against what was drawn.
    """
    w, h = int(size[0]), int(size[1])
    if w < 32 or h < 32:
        raise ValueError(f"make_demo_scene: size {w}x{h} is too small (minimum 32x32)")
    rng = np.random.default_rng(seed)
    img = _skin(rng, w, h)
    s = max(w, h)
    n = int(n_lesions) if n_lesions is not None else int(rng.integers(3, 9))
    taken: list[tuple[float, float, float, float]] = []
    tag_h = max(12, s // 45)
    boxes: list[list[float]] = []
    masks: list[tuple[int, int, np.ndarray]] = []
    for _ in range(n):
        for _attempt in range(30):
            r = float(np.exp(rng.uniform(np.log(radius[0]), np.log(radius[1]))) * s)
            alpha, half = _blob(rng, r)
            cx = int(rng.integers(half + 2, max(half + 3, w - half - 2)))
            cy = int(rng.integers(half + 2, max(half + 3, h - half - 2 - 2 * tag_h)))
            ys, xs = np.nonzero(alpha >= 0.25)
            if xs.size == 0:
                continue
            box = (cx - half + xs.min(), cy - half + ys.min(), cx - half + xs.max() + 1, cy - half + ys.max() + 1)
            gap = 0.5 * r
            if box[0] < 0 or box[1] < 0 or box[2] > w or box[3] > h:
                continue
            if any(box[0] - gap < t[2] and t[0] < box[2] + gap and box[1] - gap < t[3] and t[1] < box[3] + gap for t in taken):
                continue
            x0, y0 = cx - half, cy - half
            x1, y1 = max(0, x0), max(0, y0)
            x2, y2 = min(w, x0 + alpha.shape[1]), min(h, y0 + alpha.shape[0])
            a = alpha[y1 - y0:y2 - y0, x1 - x0:x2 - x0]
            centre, rim = LESION_PALETTES[int(rng.integers(len(LESION_PALETTES)))]
            tint = _smooth_noise(rng, a.shape[0], a.shape[1], max(3, int(r / 1.5)))
            rr = np.hypot(*np.mgrid[-1:1:complex(0, a.shape[0]), -1:1:complex(0, a.shape[1])])
            mix = np.clip(0.15 + 0.6 * rr + 0.2 * tint, 0, 1)[..., None]  # darker centre, lighter rim
            colour = np.asarray(centre, np.float32) * (1 - mix) + np.asarray(rim, np.float32) * mix
            colour *= (img[y1:y2, x1:x2].mean(axis=(0, 1)) / np.asarray(SKIN_TONES[1], np.float32)) ** 0.35
            a3 = (a * rng.uniform(0.85, 1.0))[..., None]
            img[y1:y2, x1:x2] = img[y1:y2, x1:x2] * (1 - a3) + colour * a3
            taken.append(box)
            boxes.append([float(v) for v in box])
            masks.append((x1, y1, a3[..., 0].copy()))
            break
    # mild camera: blur + noise
    img = cv2.GaussianBlur(img, (0, 0), 0.6)
    img += rng.standard_normal((h, w, 1), dtype=np.float32) * 1.8
    out = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    if stamp:
        _stamp(out, "SYNTHETIC", tag_h)
    return (out, boxes, masks) if return_masks else (out, boxes)


def _stamp(img: np.ndarray, text: str, height: int) -> None:
    """Small light label in the bottom-left corner (in place), away from every lesion box."""
    scale = height / 30.0
    thick = max(1, int(round(height / 14)))
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    x, y = max(2, height // 2), img.shape[0] - max(2, height // 2)
    overlay = img.copy()
    cv2.putText(overlay, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thick, cv2.LINE_AA)
    cv2.addWeighted(overlay, 0.7, img, 0.3, 0, dst=img)
