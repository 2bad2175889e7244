"""Torch datasets over the manifest: lesion crops (box + context) or whole images, with augmentation.

Images are decoded once into RAM (the stored copies are small: ~1.5 GB for everything), so an
epoch costs only augmentation + the network. Crop jitter (margin, shift, aspect) imitates the
variation of detector boxes, because at test time the classifier sees detected, not given, boxes.
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2 as T

from lesiontriage.data.manifest import resolve_path
from lesiontriage.imaging import crop_with_margin
from lesiontriage.results import SUBTYPES

log = logging.getLogger(__name__)


def decode_all(paths: Sequence[Path], threads: int = 2) -> list[np.ndarray]:
    """Decode every image to an RGB uint8 array (threaded: PIL releases the GIL while decoding)."""

    def _one(p: Path) -> np.ndarray:
        with Image.open(p) as im:
            return np.asarray(im.convert("RGB"))

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(_one, paths))


def largest_box(boxes) -> list[float] | None:
    """The box of the labelled lesion (largest one; the sets with labels have one lesion per image)."""
    if boxes is None or len(boxes) == 0:
        return None
    arr = [list(map(float, b)) for b in boxes]
    return max(arr, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))


@dataclass
class CropAugment:
    """Random box jitter parameters (train only)."""

    margin_range: tuple[float, float] = (0.1, 0.6)
    shift: float = 0.12  # box centre shift, fraction of box side
    scale_range: tuple[float, float] = (0.85, 1.2)  # box side multiplier


class LesionImageDataset(Dataset):
    """Rows of the manifest -> (image tensor, malignant float, subtype index).

    ``mode='crop'`` crops the labelled box (+ margin) when the row has one, else uses the whole
    image (derm7pt, SD-198: the lesion is centred and fills much of the frame). ``mode='whole'``
    always uses the whole image (the direct whole-image baseline). ``whole_frame_prob`` (training,
    crop mode): that share of the boxed rows' samples show the whole photo instead of the crop; one number for
    every row or one per row (pseudo-boxed rows may show the whole photo more often than labelled boxes).
    """

    def __init__(self, rows: pd.DataFrame, *, input_size: int, mean, std, train: bool, mode: str = "crop",
                 margin: float = 0.25, data_root: Path | None = None, images: list[np.ndarray] | None = None,
                 seed: int = 0, whole_frame_prob: float | Sequence[float] = 0.0) -> None:
        self.rows = rows.reset_index(drop=True)
        self.whole_frame_prob = np.broadcast_to(np.asarray(whole_frame_prob, dtype=float), (len(self.rows),))
        self.train = train
        self.mode = mode
        self.margin = margin
        self.input_size = input_size
        self.rng = np.random.default_rng(seed)
        self.jitter = CropAugment()
        if images is None:
            paths = [resolve_path(p, data_root) for p in self.rows["path"]]
            images = decode_all(paths)
        self.images = images
        self.boxes = [largest_box(b) if mode == "crop" else None for b in self.rows["boxes"]]
        self.targets = self.rows["malignant"].astype("float32").to_numpy()
        sub_index = {c: i for i, c in enumerate(SUBTYPES)}
        self.subtypes = np.array([sub_index.get(d, -100) for d in self.rows["diagnosis"]], dtype=np.int64)
        norm = [T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)]
        if train:
            self.tf = T.Compose([
                T.RandomResizedCrop(input_size, scale=(0.6, 1.0), ratio=(0.7, 1.43), antialias=True),
                T.RandomHorizontalFlip(), T.RandomVerticalFlip(),
                T.RandomApply([T.RandomRotation(180)], p=0.5),
                T.ColorJitter(0.25, 0.25, 0.2, 0.03),
                T.RandomApply([T.GaussianBlur(5, sigma=(0.1, 1.5))], p=0.2),
                *norm,
            ])
        else:
            self.tf = T.Compose([T.Resize((input_size, input_size), antialias=True), *norm])

    def __len__(self) -> int:
        return len(self.rows)

    def region(self, i: int, rng: np.random.Generator | None = None) -> np.ndarray:
        """The pixels the classifier sees for row ``i`` (jittered when an rng is given)."""
        img = self.images[i]
        box = self.boxes[i]
        if box is None or (rng is not None and rng.uniform() < self.whole_frame_prob[i]):
            return img
        margin = self.margin
        if rng is not None:
            x1, y1, x2, y2 = box
            w, h = x2 - x1, y2 - y1
            s = rng.uniform(*self.jitter.scale_range)
            cx = (x1 + x2) / 2 + rng.uniform(-1, 1) * self.jitter.shift * w
            cy = (y1 + y2) / 2 + rng.uniform(-1, 1) * self.jitter.shift * h
            box = [cx - w * s / 2, cy - h * s / 2, cx + w * s / 2, cy + h * s / 2]
            margin = rng.uniform(*self.jitter.margin_range)
        return crop_with_margin(img, box, margin=margin, square=True)

    def __getitem__(self, i: int):
        rng = np.random.default_rng(self.rng.integers(1 << 31) + i) if self.train else None
        region = self.region(i, rng)
        x = torch.from_numpy(np.ascontiguousarray(region)).permute(2, 0, 1)
        if self.train:
            # Aspect jitter: the ISIC test copies are squashed 4:3 -> 1:1, phone crops are not.
            h, w = x.shape[1:]
            a = float(rng.uniform(0.75, 1.33))
            x = T.functional.resize(x, [max(8, int(h * min(1, 1 / a))), max(8, int(w * min(1, a)))], antialias=True)
        return self.tf(x), torch.tensor(self.targets[i]), torch.tensor(self.subtypes[i])


@dataclass
class DetectionSample:
    """One detector training image: pixels + lesion boxes (xyxy, stored pixels)."""

    rgb: np.ndarray
    boxes: np.ndarray  # [K, 4] float32
    source: str
    close_up: bool  # one large lesion per image (dermoscopy / clinical close-ups)
    labels: np.ndarray | None = None  # [K] int64 class per box for the C=2 detector (1 benign, 2 malignant)


class DetectionTileDataset(Dataset):
    """Random fixed-size tiles at the inference scale (image long side ~= ``long_side``).

    Why tiles: a Faster R-CNN step on whole 1024 px photos is too slow on 2 cores, and small
    moles need full resolution. Close-ups are scaled down more often so their single large
    lesion usually fits inside the tile instead of being cut.
    """

    def __init__(self, samples: list[DetectionSample], *, long_side: int, tile: int, seed: int = 0,
                 min_visible: float = 0.4, class_labels: bool = False) -> None:
        self.samples = samples
        self.class_labels = class_labels  # True: targets carry each box's class (C=2); False: all "lesion" (1)
        self.long_side = long_side
        self.tile = tile
        self.seed = seed
        self.min_visible = min_visible

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        i, draw = key if isinstance(key, tuple) else (key, key)
        rng = np.random.default_rng([self.seed, int(draw)])
        s = self.samples[i]
        h, w = s.rgb.shape[:2]
        jitter = rng.uniform(0.4, 1.0) if s.close_up else rng.uniform(0.75, 1.3)
        scale = self.long_side / max(h, w) * jitter
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        img = torch.from_numpy(np.ascontiguousarray(s.rgb)).permute(2, 0, 1)
        img = T.functional.resize(img, [nh, nw], antialias=True)
        boxes = s.boxes * scale
        t = self.tile
        # Window: centred near a random lesion (or anywhere), clipped to the image.
        if len(boxes) and rng.random() < 0.85:
            b = boxes[rng.integers(len(boxes))]
            cx, cy = (b[0] + b[2]) / 2 + rng.uniform(-0.35, 0.35) * t, (b[1] + b[3]) / 2 + rng.uniform(-0.35, 0.35) * t
        else:
            cx, cy = rng.uniform(0, nw), rng.uniform(0, nh)
        x0 = int(np.clip(cx - t / 2, 0, max(0, nw - t)))
        y0 = int(np.clip(cy - t / 2, 0, max(0, nh - t)))
        crop = img[:, y0:y0 + t, x0:x0 + t]
        canvas = torch.zeros((3, t, t), dtype=torch.uint8)
        canvas[:, :crop.shape[1], :crop.shape[2]] = crop
        if rng.random() < 0.5:
            canvas = canvas.flip(-1)
            flip = True
        else:
            flip = False
        kept, kept_labels = [], []
        labels = s.labels if self.class_labels and s.labels is not None else np.ones(len(boxes), np.int64)
        for b, lab in zip(boxes, labels):
            x1, y1, x2, y2 = b[0] - x0, b[1] - y0, b[2] - x0, b[3] - y0
            cx1, cy1 = max(0.0, x1), max(0.0, y1)
            cx2, cy2 = min(float(crop.shape[2]), x2), min(float(crop.shape[1]), y2)
            if cx2 - cx1 < 2 or cy2 - cy1 < 2:
                continue
            if (cx2 - cx1) * (cy2 - cy1) < self.min_visible * (x2 - x1) * (y2 - y1):
                continue
            if flip:
                cx1, cx2 = t - cx2, t - cx1
            kept.append([cx1, cy1, cx2, cy2])
            kept_labels.append(int(lab))
        canvas = T.ColorJitter(0.2, 0.2, 0.15, 0.02)(canvas)
        target = {
            "boxes": torch.tensor(kept, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(kept_labels, dtype=torch.int64),
        }
        return canvas.float() / 255.0, target
