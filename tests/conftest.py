"""Shared test fixtures: small images generated on the fly (no image files are stored in the repo).

Fixtures return factories so each test states the size / format it needs:

* ``skin_photo(width, height, seed)`` -> H x W x 3 uint8: textured light skin with one brown
  lesion; sharp, well exposed and skin-coloured, so it passes the default quality gate.
* ``encode(image, fmt, **save_kwargs)`` -> bytes of a numpy array or PIL image in a Pillow format.
* ``write_file(name, data)`` -> Path of bytes written under the test's tmp_path.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import pytest
from PIL import Image

SKIN_RGB = (224, 172, 140)
LESION_RGB = (110, 70, 50)


def make_skin_photo(width: int = 320, height: int = 240, seed: int = 0) -> np.ndarray:
    """Light skin with fine texture (pores, hair-like noise) and an elliptical brown lesion."""
    rng = np.random.default_rng(seed)
    img = np.empty((height, width, 3), np.float32)
    img[:] = SKIN_RGB
    # slow shading plus fine texture, both present in real skin photos
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img *= (0.92 + 0.08 * np.cos(xx / width * np.pi))[..., None]
    img += rng.normal(0, 7, (height, width, 1)).astype(np.float32)
    lesion = np.zeros((height, width), np.uint8)
    cv2.ellipse(lesion, (width // 2, height // 2), (max(3, width // 8), max(3, height // 7)), 20, 0, 360, 255, -1)
    lesion = cv2.GaussianBlur(lesion, (0, 0), 1.5).astype(np.float32)[..., None] / 255.0
    img = img * (1 - lesion) + np.array(LESION_RGB, np.float32) * lesion
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def encode_image(image: np.ndarray | Image.Image, fmt: str, **save_kwargs) -> bytes:
    im = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    buf = io.BytesIO()
    im.save(buf, format=fmt, **save_kwargs)
    return buf.getvalue()


@pytest.fixture
def skin_photo() -> Callable[..., np.ndarray]:
    return make_skin_photo


@pytest.fixture
def encode() -> Callable[..., bytes]:
    return encode_image


@pytest.fixture
def write_file(tmp_path: Path) -> Callable[[str, bytes], Path]:
    def _write(name: str, data: bytes) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    return _write
