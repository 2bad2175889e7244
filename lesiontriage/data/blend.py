"""Image operations behind the synthetic wide-field scenes: find skin, segment a lesion, remove a
lesion from a photo, match colours, paste with Poisson blending, and make a clean composite look
like a phone photo.

Why a separate module: :mod:`lesiontriage.data.scenes` decides *what* goes where (data, splits,
labels, determinism); this module only does pixels, so each step can be tested on generated
arrays. Every function takes and returns RGB ``uint8`` arrays (H x W x 3) unless it says
otherwise, and every random choice comes from a ``numpy.random.Generator`` passed in.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import numpy as np

log = logging.getLogger(__name__)


# ---- skin ---------------------------------------------------------------------------------------
def skin_mask(rgb: np.ndarray, smooth_max: float | None = 12.0) -> np.ndarray:
    """Boolean mask of skin-coloured pixels (YCrCb box after Chai & Ngan, plus an HSV saturation floor).

    Good enough to keep pasted lesions off clothes, hair, rulers and studio backgrounds; it is
    not a body segmentation. Very dark and blown-out pixels are excluded.
    """
    ycc = cv2.cvtColor(rgb, cv2.COLOR_RGB2YCrCb)
    y, cr, cb = ycc[..., 0], ycc[..., 1], ycc[..., 2]
    sat = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1]
    # Cr >= 136 and a minimum saturation keep out pinkish-grey walls and sheets (Cr ~ 133, S ~ 15)
    m = (cr >= 136) & (cr <= 180) & (cb >= 75) & (cb <= 130) & (y >= 45) & (y <= 250) & (sat >= 30)
    if smooth_max is not None:  # hair, fabric and foliage can be skin-coloured but are textured
        yf = y.astype(np.float32)
        mu = cv2.blur(yf, (7, 7))
        sd = np.sqrt(np.maximum(cv2.blur(yf * yf, (7, 7)) - mu * mu, 0))
        m &= sd <= smooth_max
    m = cv2.morphologyEx(m.astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    return m.astype(bool)


# ---- lesion segmentation ------------------------------------------------------------------------
def _ellipse_mask(h: int, w: int, box: tuple[float, float, float, float]) -> np.ndarray:
    x1, y1, x2, y2 = box
    m = np.zeros((h, w), np.uint8)
    cx, cy = (x1 + x2) / 2.0, (y1 + y2) / 2.0
    ax, ay = max(1.0, (x2 - x1) / 2.0), max(1.0, (y2 - y1) / 2.0)
    cv2.ellipse(m, (int(round(cx)), int(round(cy))), (int(round(ax)), int(round(ay))), 0, 0, 360, 1, -1)
    return m


def lesion_score(rgb: np.ndarray) -> np.ndarray:
    """Per-pixel 'lesion-ness': darker and redder than the rest of the crop (z-scored LAB).

    Pigmented lesions are darker than skin (L), vascular / inflamed ones redder (a*); a sum of
    both z-scores separates most lesions of all our sets from their surrounding skin.
    """
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).astype(np.float32)
    L, a = lab[..., 0], lab[..., 1]
    zl = (L.mean() - L) / (L.std() + 1e-3)
    za = (a - a.mean()) / (a.std() + 1e-3)
    return zl + 0.6 * za


@dataclass
class Segmentation:
    """A lesion mask in crop pixels (uint8 0/1) and how it was obtained ('otsu' or 'ellipse')."""

    mask: np.ndarray
    method: str


def _fill_holes(blob: np.ndarray) -> np.ndarray:
    """Flood the background from the border; what is not reached lies inside the blob."""
    h, w = blob.shape
    flood = np.pad(blob, 1).copy()
    cv2.floodFill(flood, np.zeros((h + 4, w + 4), np.uint8), (0, 0), 1)
    return blob | (1 - flood[1:-1, 1:-1])


def _central_blob(binary: np.ndarray, cx: float, cy: float, diag: float) -> np.ndarray | None:
    """The connected component that is large and near (cx, cy), holes filled."""
    n, lab, stats, cents = cv2.connectedComponentsWithStats(binary, connectivity=8)
    if n <= 1:
        return None
    best, best_score = 0, -1.0
    for i in range(1, n):
        d = float(np.hypot(cents[i][0] - cx, cents[i][1] - cy)) / diag
        s = stats[i, cv2.CC_STAT_AREA] * max(0.05, 1.0 - 2.0 * d)
        if s > best_score:
            best, best_score = i, s
    return _fill_holes((lab == best).astype(np.uint8))


def segment_lesion(rgb: np.ndarray, box: tuple[float, float, float, float] | None = None,
                   work_side: int = 160) -> Segmentation:
    """Rough lesion mask from :func:`lesion_score`: the thresholded component nearest the centre,
    holes filled.

    With a ``box`` (an expert mask's bounding box): Otsu inside the box; the result is the union
    of that blob and the ellipse inscribed in the box (the ellipse alone when Otsu fails), clipped
    to the box, so the annotation stays the authority on the lesion's extent.

    Without a box (the lesion is roughly centred in these photos): thresholds from Otsu up to the
    95th percentile are tried until the central blob is plausible (1-60% of the photo) and does
    not touch the photo's border; otherwise ``method='ellipse'`` with a centred guess that callers
    should not trust as an extent.
    """
    h, w = rgb.shape[:2]
    f = min(1.0, work_side / max(h, w))
    small = cv2.resize(rgb, (max(8, int(round(w * f))), max(8, int(round(h * f)))), interpolation=cv2.INTER_AREA) if f < 1 else rgb
    sh, sw = small.shape[:2]
    score = cv2.GaussianBlur(lesion_score(small), (0, 0), max(0.8, 0.01 * max(sh, sw)))
    k = np.ones((3, 3), np.uint8)
    method = "ellipse"
    if box is not None:
        bx = [box[0] * f, box[1] * f, box[2] * f, box[3] * f]
        region = np.zeros((sh, sw), np.uint8)
        x1, y1 = max(0, int(bx[0])), max(0, int(bx[1]))
        x2, y2 = min(sw, max(x1 + 1, int(np.ceil(bx[2])))), min(sh, max(y1 + 1, int(np.ceil(bx[3]))))
        region[y1:y2, x1:x2] = 1
        ellipse_small = _ellipse_mask(sh, sw, tuple(bx))
        mask_small = ellipse_small
        vals = score[region > 0]
        if vals.size >= 64 and vals.std() > 1e-3:
            lo, hi = float(vals.min()), float(vals.max())
            u8 = np.clip((score - lo) / (hi - lo + 1e-6) * 255, 0, 255).astype(np.uint8)
            thr, _ = cv2.threshold(u8[region > 0].reshape(-1, 1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
            binary = cv2.morphologyEx(((u8 > thr) & (region > 0)).astype(np.uint8), cv2.MORPH_OPEN, k)
            binary = cv2.morphologyEx(binary, cv2.MORPH_CLOSE, k, iterations=2)
            blob = _central_blob(binary, (bx[0] + bx[2]) / 2, (bx[1] + bx[3]) / 2, float(np.hypot(bx[2] - bx[0], bx[3] - bx[1])) + 1e-6)
            if blob is not None and 0.04 <= blob.sum() / max(1.0, float(region.sum())) <= 0.95:
                mask_small = blob | ellipse_small
                method = "otsu"
    else:
        lum = cv2.cvtColor(small, cv2.COLOR_RGB2LAB)[..., 0]
        valid = lum > 25  # dermoscopy vignette / black frames are not lesion
        mask_small = _ellipse_mask(sh, sw, (0.25 * sw, 0.25 * sh, 0.75 * sw, 0.75 * sh))
        vals = score[valid]
        if vals.size >= 64 and vals.std() > 1e-3:
            lo, hi = float(vals.min()), float(vals.max())
            u8 = np.clip((score - lo) / (hi - lo + 1e-6) * 255, 0, 255).astype(np.uint8)
            otsu, _ = cv2.threshold(u8[valid].reshape(-1, 1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
            thresholds = [float(otsu)] + [float(np.percentile(u8[valid], q)) for q in (80, 88, 94)]
            diag = float(np.hypot(sw, sh))
            for thr in sorted(set(thresholds)):
                binary = cv2.morphologyEx(((u8 > thr) & valid).astype(np.uint8), cv2.MORPH_OPEN, k)
                binary = cv2.morphologyEx(binary, cv2.MORPH_CLOSE, k, iterations=2)
                blob = _central_blob(binary, sw / 2, sh / 2, diag)
                if blob is None:
                    continue
                bb = mask_bbox(blob)
                frac = blob.sum() / float(sh * sw)
                # the blob must be the whole lesion, not its dark core: the ring around it has
                # to look like skin (mostly below the Otsu level)
                rk = max(2, int(0.12 * max(bb[2] - bb[0], bb[3] - bb[1])))
                ring = (cv2.dilate(blob, np.ones((2 * rk + 1, 2 * rk + 1), np.uint8)) > 0) & (blob == 0) & valid
                if ring.sum() < 8 or (u8[ring] > 0.9 * otsu).mean() > 0.2:
                    continue
                # refine the edge: a third of the way from the ring's level to the core's (Otsu
                # on a small blob sits low and swallows darker skin next to it; a third keeps the
                # fuzzy rim of the lesion inside the mask)
                core, skin_level = float(np.median(u8[blob > 0])), float(np.median(u8[ring]))
                level = skin_level + (core - skin_level) / 3.0
                grown = cv2.dilate(blob, np.ones((3, 3), np.uint8))
                refined = _central_blob(((u8 > level) & (grown > 0)).astype(np.uint8), sw / 2, sh / 2, diag)
                if refined is not None and refined.sum() >= 0.3 * blob.sum():
                    blob = refined
                    bb = mask_bbox(blob)
                    frac = blob.sum() / float(sh * sw)
                centre_in = bb[0] < sw / 2 + 0.25 * sw and bb[2] > sw / 2 - 0.25 * sw and bb[1] < sh / 2 + 0.25 * sh and bb[3] > sh / 2 - 0.25 * sh
                if bb[0] >= 2 and bb[1] >= 2 and bb[2] <= sw - 2 and bb[3] <= sh - 2 and 0.01 <= frac <= 0.6 and centre_in:
                    mask_small, method = blob, "otsu"
                    break
    mask = cv2.resize(mask_small.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR) >= 0.5 if f < 1 else mask_small > 0
    if box is not None:  # never outside the annotated box
        bm = np.zeros((h, w), bool)
        bm[max(0, int(np.floor(box[1]))):int(np.ceil(box[3])), max(0, int(np.floor(box[0]))):int(np.ceil(box[2]))] = True
        mask &= bm
    if not mask.any():
        mask = _ellipse_mask(h, w, box if box is not None else (0.25 * w, 0.25 * h, 0.75 * w, 0.75 * h)) > 0
        method = "ellipse"
    return Segmentation(mask.astype(np.uint8), method)


def mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """[x1, y1, x2, y2) of the non-zero pixels (exclusive right/bottom), None when empty."""
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


# ---- removing a lesion from a background --------------------------------------------------------
def remove_hair(rgb: np.ndarray) -> np.ndarray:
    """DullRazor-style: thin dark structures (black-hat response) are inpainted. Upscaled close-up
    photos otherwise show hairs as thick dark ropes that no wide-field photo has."""
    h, w = rgb.shape[:2]
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    k = max(5, int(0.03 * max(h, w)) | 1)
    hat = cv2.morphologyEx(grey, cv2.MORPH_BLACKHAT, cv2.getStructuringElement(cv2.MORPH_RECT, (k, k)))
    _, hair = cv2.threshold(hat, 12, 255, cv2.THRESH_BINARY)
    if hair.mean() < 0.5:  # almost nothing found
        return rgb.copy()
    hair = cv2.dilate(hair, np.ones((3, 3), np.uint8))
    return cv2.inpaint(rgb, hair, 3, cv2.INPAINT_TELEA)


def clear_windows(mask: np.ndarray, bw: int, bh: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Top-left corners (ys, xs) of every bw x bh window that contains no masked pixel, or None."""
    h, w = mask.shape
    if bw >= w or bh >= h:
        return None
    ii = cv2.integral((mask > 0).astype(np.uint8))
    sums = ii[bh:, bw:] - ii[:-bh, bw:] - ii[bh:, :-bw] + ii[:-bh, :-bw]
    ys, xs = np.nonzero(sums == 0)
    return (ys, xs) if ys.size else None


def fill_from_skin(rgb: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    """Cover the masked region (a removed lesion) with real skin from elsewhere in the photo,
    Poisson-blended. None when no lesion-free source window exists (the hole is too large)."""
    bb = mask_bbox(mask)
    if bb is None:
        return rgb.copy()
    h, w = mask.shape
    bx0, by0, bx1, by1 = bb
    bw, bh = bx1 - bx0, by1 - by0
    free = clear_windows(mask, bw, bh)
    if free is None:
        return None
    fy, fx = free
    pick = rng.choice(fy.size, size=min(3, fy.size), replace=False)
    cands = [(int(fx[i]), int(fy[i])) for i in pick]
    # the candidate whose colour is closest to the hole's surroundings
    ring = cv2.dilate(mask, np.ones((9, 9), np.uint8)) & (1 - mask)
    target = rgb[ring > 0].reshape(-1, 3).mean(axis=0) if ring.any() else rgb.reshape(-1, 3).mean(axis=0)
    sx, sy = min(cands, key=lambda c: float(np.abs(rgb[c[1]:c[1] + bh, c[0]:c[0] + bw].reshape(-1, 3).mean(axis=0) - target).sum()))
    out = rgb.copy()
    pad = 2
    x0, y0 = max(0, bx0 - pad), max(0, by0 - pad)
    x1, y1 = min(w, bx1 + pad), min(h, by1 + pad)
    src = rgb[sy - (by0 - y0):sy - (by0 - y0) + (y1 - y0), sx - (bx0 - x0):sx - (bx0 - x0) + (x1 - x0)] \
        if sy - (by0 - y0) >= 0 and sx - (bx0 - x0) >= 0 and sy - (by0 - y0) + (y1 - y0) <= h and sx - (bx0 - x0) + (x1 - x0) <= w \
        else None
    if src is None or src.shape[:2] != (y1 - y0, x1 - x0):
        src = cv2.resize(rgb[sy:sy + bh, sx:sx + bw], (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
    clone = cv2.dilate(mask[y0:y1, x0:x1], np.ones((3, 3), np.uint8))
    paste(out, np.ascontiguousarray(src), clone, x0, y0, "normal", feather_frac=0.0)
    return out


# ---- colour -------------------------------------------------------------------------------------
def lab_stats(rgb: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """Robust LAB mean (median) and spread (IQR / 1.35) of the masked pixels; None if too few."""
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).reshape(-1, 3).astype(np.float32)
    if mask is not None:
        lab = lab[mask.reshape(-1) > 0]
    if lab.shape[0] < 20:
        return None
    q25, q50, q75 = np.percentile(lab, [25, 50, 75], axis=0)
    return q50, np.maximum((q75 - q25) / 1.35, 1.0)


def match_colour(rgb: np.ndarray, src_stats: tuple[np.ndarray, np.ndarray], tgt_stats: tuple[np.ndarray, np.ndarray],
                 lesion: np.ndarray | None = None, lesion_strength: float = 0.6,
                 contrast_limits: tuple[float, float] = (0.7, 1.4)) -> np.ndarray:
    """Reinhard-style transfer in LAB: map the crop's peri-lesional skin statistics onto the
    background's local skin, so the lesion sits on skin of the scene's tone and white balance.

    The spread ratio is clipped so a flat background cannot erase the lesion's contrast, and the
    lesion itself (``lesion`` mask, 0/1) gets only ``lesion_strength`` of the shift: its pigment
    is its own, only the light and the camera change between photos.
    """
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).astype(np.float32)
    s_mu, s_sd = src_stats
    t_mu, t_sd = tgt_stats
    ratio = np.clip(t_sd / s_sd, *contrast_limits)
    ratio[0] = max(ratio[0], 0.9)  # keep the lesion's lightness contrast
    shift = np.clip(t_mu - s_mu, [-40, -20, -20], [40, 20, 20])
    moved = (lab - s_mu) * ratio + s_mu + shift
    if lesion is not None and lesion.any():
        k = max(1.0, 0.05 * max(lesion.shape))
        w = cv2.GaussianBlur(lesion.astype(np.float32), (0, 0), k)[..., None] * (1.0 - lesion_strength)
        moved = moved * (1.0 - w) + lab * w
    return cv2.cvtColor(np.clip(moved, 0, 255).astype(np.uint8), cv2.COLOR_LAB2RGB)


# ---- pasting ------------------------------------------------------------------------------------
def paste(canvas: np.ndarray, patch: np.ndarray, clone_mask: np.ndarray, x0: int, y0: int,
          mode: str = "normal", feather_frac: float = 0.04) -> str:
    """Blend ``patch`` into ``canvas`` (in place) with its top-left at (x0, y0).

    ``clone_mask`` (uint8 0/1, patch-sized) is the region that is transferred (lesion plus a rim
    of skin). Poisson blending (``cv2.seamlessClone``) is used first; then the seam is feathered.
    OpenCV erodes the mask by 3 px inside seamlessClone (a lesion reaching within 3 px of the mask
    edge comes out washed away), so the mask is dilated by 3 px first; leave the patch that much
    margin. When seamlessClone cannot run (a tiny mask, an OpenCV error) it falls back to alpha
    blending. Returns the method used.
    """
    ph, pw = patch.shape[:2]
    H, W = canvas.shape[:2]
    if x0 < 0 or y0 < 0 or x0 + pw > W or y0 + ph > H:
        raise ValueError(f"patch {pw}x{ph} at ({x0},{y0}) leaves the {W}x{H} canvas")
    m = (clone_mask > 0).astype(np.uint8)
    feather = max(1.0, feather_frac * max(ph, pw))
    alpha = cv2.GaussianBlur(cv2.erode(m, np.ones((3, 3), np.uint8)).astype(np.float32), (0, 0), feather)[..., None]
    roi = canvas[y0:y0 + ph, x0:x0 + pw]
    method = "alpha"
    blended = patch.astype(np.float32)
    inner = cv2.dilate(m, np.ones((3, 3), np.uint8), iterations=3)
    inner[0, :] = inner[-1, :] = 0
    inner[:, 0] = inner[:, -1] = 0
    if mode in ("normal", "mixed") and inner.sum() >= 16 and min(ph, pw) >= 8:
        bx, by, bw, bh = cv2.boundingRect(inner)
        # seamlessClone puts the mask's bounding rect at p - size // 2 (OpenCV 4/5 semantics)
        p = (x0 + bx + bw // 2, y0 + by + bh // 2)
        if bx > 0 and by > 0 and bx + bw < pw and by + bh < ph and x0 + bx > 0 and y0 + by > 0 \
                and x0 + bx + bw < W and y0 + by + bh < H:
            flag = cv2.MIXED_CLONE if mode == "mixed" else cv2.NORMAL_CLONE
            try:
                # a 1-px margin around the ROI is enough context; cloning the full canvas is slow
                pad = 2
                cx0, cy0 = max(0, x0 - pad), max(0, y0 - pad)
                cx1, cy1 = min(W, x0 + pw + pad), min(H, y0 + ph + pad)
                sub = np.ascontiguousarray(canvas[cy0:cy1, cx0:cx1])
                cloned = cv2.seamlessClone(np.ascontiguousarray(patch), sub, inner * 255, (p[0] - cx0, p[1] - cy0), flag)
                blended = cloned[y0 - cy0:y0 - cy0 + ph, x0 - cx0:x0 - cx0 + pw].astype(np.float32)
                method = "seamless_" + mode
            except cv2.error as exc:  # rare: degenerate masks; the alpha blend is still correct
                log.debug("seamlessClone failed (%s); alpha blending", exc)
    out = blended * alpha + roi.astype(np.float32) * (1 - alpha)
    canvas[y0:y0 + ph, x0:x0 + pw] = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return method


def lesion_contrast(rgb: np.ndarray, lesion: np.ndarray) -> float:
    """Colour difference (CIE76 delta E, LAB units) between a lesion and the skin ring around it:
    a pasted lesion below ~6 is hard to see, and a box on an invisible lesion is label noise."""
    m = (lesion > 0).astype(np.uint8)
    side = max(m.shape)
    k1, k2 = max(1, int(0.1 * side)), max(2, int(0.3 * side))
    near = cv2.dilate(m, np.ones((2 * k1 + 1, 2 * k1 + 1), np.uint8))
    far = cv2.dilate(m, np.ones((2 * k2 + 1, 2 * k2 + 1), np.uint8))
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).astype(np.float32)
    lab[..., 0] *= 100.0 / 255.0  # OpenCV's 8-bit L is 0-255; a*, b* are offset by 128 only
    inside, ring = lab[m > 0], lab[(far > 0) & (near == 0)]
    if inside.size == 0 or ring.size == 0:
        return 0.0
    return float(np.linalg.norm(np.median(inside, axis=0) - np.median(ring, axis=0)))


# ---- phone-like degradation ---------------------------------------------------------------------
@dataclass
class Degradation:
    """The parameters one scene was degraded with (recorded in the scene index)."""

    gain_gradient: float
    vignette: float
    white_balance: tuple[float, float, float]
    blur_sigma: float
    noise_sigma: float
    sharpen: float
    jpeg_quality: int


def sample_degradation(rng: np.random.Generator, long_side: int) -> Degradation:
    s = long_side / 2048.0
    return Degradation(
        gain_gradient=float(rng.uniform(0.04, 0.28)),
        vignette=float(rng.uniform(0.0, 0.25)),
        white_balance=tuple(float(v) for v in 1.0 + rng.normal(0, 0.025, 3)),
        blur_sigma=float(rng.uniform(0.3, 1.5) * s),
        noise_sigma=float(rng.uniform(1.0, 4.5)),
        sharpen=float(rng.choice([0.0, 0.0, rng.uniform(0.2, 0.6)])),
        jpeg_quality=int(rng.integers(70, 93)),
    )


def degrade(rgb: np.ndarray, d: Degradation, rng: np.random.Generator) -> np.ndarray:
    """Lighting gradient + vignette, white balance, defocus blur, phone sharpening, sensor noise.
    (JPEG is applied by :func:`encode_jpeg` at write time.)"""
    h, w = rgb.shape[:2]
    img = rgb.astype(np.float32)
    # lighting: computed on a small grid and resized (smooth, cheap)
    gh, gw = 48, max(8, int(48 * w / h))
    yy, xx = np.mgrid[0:gh, 0:gw].astype(np.float32)
    xx, yy = xx / (gw - 1) * 2 - 1, yy / (gh - 1) * 2 - 1
    theta = rng.uniform(0, 2 * np.pi)
    cxv, cyv = rng.uniform(-0.4, 0.4, 2)
    gain = 1.0 + d.gain_gradient * (np.cos(theta) * xx + np.sin(theta) * yy) / 1.4
    gain -= d.vignette * ((xx - cxv) ** 2 + (yy - cyv) ** 2) / 2.0
    gain = cv2.resize(gain, (w, h), interpolation=cv2.INTER_LINEAR)
    img *= gain[..., None] * np.asarray(d.white_balance, np.float32)[None, None, :]
    if d.blur_sigma > 0.05:
        img = cv2.GaussianBlur(img, (0, 0), d.blur_sigma)
    if d.sharpen > 0:
        img = img + d.sharpen * (img - cv2.GaussianBlur(img, (0, 0), 1.5))
    noise = rng.standard_normal((h, w), dtype=np.float32) * d.noise_sigma
    chroma = rng.standard_normal((h // 2 + 1, w // 2 + 1, 3), dtype=np.float32) * (d.noise_sigma * 0.5)
    chroma = cv2.resize(chroma, (w, h), interpolation=cv2.INTER_LINEAR)
    img += noise[..., None] + chroma
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    """Baseline JPEG bytes (4:2:0 like phones); deterministic for the same input and quality."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()


def add_skin_grain(rgb: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Fine multiplicative texture (pores, micro-relief). Upscaled low-resolution backgrounds are
    too smooth next to a pasted lesion; a shared grain gives the whole scene one texture."""
    if strength <= 0:
        return rgb
    h, w = rgb.shape[:2]
    g = rng.standard_normal((h, w), dtype=np.float32)
    g = cv2.GaussianBlur(g, (0, 0), 0.9)
    g *= strength / (g.std() + 1e-6)
    out = rgb.astype(np.float32) * (1.0 + g[..., None])
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
