"""Decoding, input guards, the image-quality gate, crops and metadata-free export.

Everything a photo goes through before a network sees it lives here, so the app, the CLI, the
evaluation and the training crops decode and crop images the same way.

* :func:`load_image` decodes a path, bytes, file-like object, PIL image or array into RGB uint8,
  applying EXIF orientation, with a JPEG draft-mode shortcut for big phone photos. Bad input
  never escapes as a PIL/OS exception: it raises :class:`~lesiontriage.errors.UnreadableImageError`
  (missing, empty, truncated, not an image) or :class:`~lesiontriage.errors.UnsupportedImageError`
  (too small, too large, decompression bomb, extreme aspect ratio) with a one-line message
  ``'<name>: <reason>'``.
* :func:`assess_quality` measures blur, exposure, resolution and how much skin is visible, and
  turns them into short warnings using :class:`QualityThresholds` (chosen on the training data
  with :func:`calibrate_quality_thresholds`).
* :func:`crop_with_margin` is the lesion crop used both by the pipeline and by classifier training.
* :func:`encode_png` / :func:`strip_exif_png` write pixels only (no EXIF, GPS, text or ICC chunks).
"""
from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Sequence

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lesiontriage.errors import ImageError, UnreadableImageError, UnsupportedImageError
from lesiontriage.results import QualityReport

log = logging.getLogger(__name__)

try:  # HEIC/HEIF (iPhone photos). Registration is idempotent.
    import pillow_heif

    pillow_heif.register_heif_opener()
    _HEIF = True
except Exception as _exc:  # pragma: no cover - pillow-heif is a declared dependency
    log.warning("pillow-heif unavailable, HEIC photos cannot be read: %s", _exc)
    _HEIF = False

# ---- input guards -------------------------------------------------------------------------------------

#: Largest accepted image, in pixels, checked from the header before any pixel is decoded.
#: 120 MP admits the full-resolution mode of 108 MP phone cameras (12000 x 9000) and refuses
#: anything bigger (200 MP sensor modes, crafted "decompression bombs"): a 120 MP PNG still
#: decodes in ~360 MB; a 20000 x 20000 bomb would need 1.2 GB.
MAX_PIXELS = 120_000_000
#: Largest accepted file. A 108 MP PNG is ~150-250 MB; nothing real is bigger.
MAX_FILE_BYTES = 256 * 1024 * 1024
#: Smallest accepted side in pixels. The classifier input is 224-260 px and the smallest stored
#: training images are 150 px (HAM10000 at 200 x 150); below 64 px a lesion crop would be
#: upscaled > 3.5x from a handful of pixels and no network here was trained on anything like it.
#: Images between 64 px and ``QualityThresholds.min_side`` are accepted with a warning.
MIN_SIDE = 64
#: Largest accepted long/short side ratio. Nearly all photos are <= 2:1 (dermoscopy 4:3, clinical
#: 3:2, phone 4:3 or 16:9), but the real wide-field set holds cropped strips of a back up to 6.2:1
#: (moles fig65, 1086 x 177, three boxed moles), so 8:1 keeps those. Beyond it (phone panoramas,
#: 10:1 and more) the detector's ~1024 px long side leaves the image ~100 px tall and lesions a few
#: pixels wide: results would be silently unreliable, so we refuse with "crop to the area of interest".
MAX_ASPECT = 8.0

#: Formats we decode. Restricting Pillow to these keeps exotic plugins (EPS, which would start
#: Ghostscript, PSD, ICNS, ...) out of the attack surface of an upload form. The JPEG opener also
#: returns "MPO" (multi-picture JPEG some phones write); AVIF where Pillow or pillow-heif has it.
SUPPORTED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "HEIF", "AVIF", "TIFF", "GIF", "BMP")
Image.init()
_OPEN_FORMATS: tuple[str, ...] = tuple(f for f in SUPPORTED_FORMATS if f in Image.OPEN)
_SUPPORTED_TEXT = "JPEG, PNG, WebP, HEIC, TIFF, GIF or BMP"

# Pillow raises DecompressionBombError in Image.open() above 2 x MAX_IMAGE_PIXELS and warns above
# it. Aligning it with our own limit means the two agree; we check the header ourselves first.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


@dataclass
class LoadedImage:
    """A decoded photo.

    ``rgb`` is H x W x 3 uint8, upright (EXIF orientation applied), possibly downscaled; ``scale``
    is decoded pixels per original pixel (multiply an original-pixel box by it to get ``rgb``
    pixels, divide to go back). ``orig_width`` / ``orig_height`` are the upright original size.
    """

    rgb: np.ndarray
    scale: float
    orig_width: int
    orig_height: int
    name: str
    format: str
    mode: str = ""  # Pillow mode before conversion (e.g. "CMYK", "I;16", "P"), for diagnostics

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])


def load_image(src: Any, *, name: str | None = None, max_side: int | None = None) -> LoadedImage:
    """Decode ``src`` (path, bytes, file-like, PIL image or RGB/grey array) into a :class:`LoadedImage`.

    ``max_side`` caps the decoded long side. JPEGs use draft mode, so a 12 MP photo decodes at
    1/2-1/8 scale directly; the long side may then be up to 5% under ``max_side`` (see
    ``DRAFT_UNDERSHOOT``); ``scale`` always says exactly what was decoded.

    Raises :class:`UnreadableImageError` / :class:`UnsupportedImageError` with a message
    ``'<name>: <reason>'``; no PIL or OS exception escapes. A wrong argument type raises
    :class:`TypeError` (a programming error, not bad input).
    """
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be positive, got {max_side}")
    if isinstance(src, np.ndarray):
        return _from_array(src, name or "<array>", max_side)
    if isinstance(src, Image.Image):
        return _from_pil(src, name or (getattr(src, "filename", "") or "<PIL image>"), max_side, owned=False)
    if isinstance(src, (str, os.PathLike)):
        label = name or os.fspath(src)
        data = _read_path(Path(src), label)
    elif isinstance(src, (bytes, bytearray, memoryview)):
        label = name or "<bytes>"
        data = bytes(src)
    elif hasattr(src, "read"):  # BytesIO, Streamlit UploadedFile, open file
        label = name or str(getattr(src, "name", "") or "<stream>")
        try:
            if hasattr(src, "seek"):
                src.seek(0)
            data = src.read()
        except Exception as exc:
            raise UnreadableImageError(label, f"cannot read stream ({_short(exc)})") from None
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError(f"{label}: stream returned {type(data).__name__}, expected bytes (open it in binary mode)")
        data = bytes(data)
    else:
        raise TypeError(f"load_image: unsupported input type {type(src).__name__} "
                        "(expected a path, bytes, a file-like object, a PIL image or a numpy array)")
    return _from_bytes(data, label, max_side)


def check_dimensions(name: str, width: int, height: int) -> None:
    """Refuse sizes we will not decode (called on header sizes, before any pixel is decoded)."""
    if width <= 0 or height <= 0:
        raise UnreadableImageError(name, f"invalid image size {width}x{height} in the header")
    if width * height > MAX_PIXELS:
        raise UnsupportedImageError(
            name, f"image too large ({width}x{height} = {width * height / 1e6:.0f} MP > {MAX_PIXELS / 1e6:.0f} MP "
                  "limit; possible decompression bomb): resize it before uploading")
    if min(width, height) < MIN_SIDE:
        raise UnsupportedImageError(
            name, f"image too small ({width}x{height} px; the shortest side must be at least {MIN_SIDE} px)")
    aspect = max(width, height) / min(width, height)
    if aspect > MAX_ASPECT:
        raise UnsupportedImageError(
            name, f"extreme aspect ratio {aspect:.1f}:1 ({width}x{height}; limit {MAX_ASPECT:.0f}:1): panoramas "
                  "make lesions too small to detect; crop to the area of interest")


# ---- decoding internals ------------------------------------------------------------------------------

def _short(exc: BaseException, limit: int = 120) -> str:
    """One-line, bounded description of an exception for a user-facing reason."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _too_big(n_bytes: int) -> str:
    return f"file too large ({n_bytes / 2**20:.0f} MB > {MAX_FILE_BYTES / 2**20:.0f} MB limit)"


def _read_path(path: Path, label: str) -> bytes:
    try:
        if not path.exists():
            raise UnreadableImageError(label, "file not found")
        if path.is_dir():
            raise UnreadableImageError(label, "is a directory, not an image file")
        if not path.is_file():
            raise UnreadableImageError(label, "not a regular file")
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise UnsupportedImageError(label, _too_big(size))
        return path.read_bytes()
    except ImageError:
        raise
    except PermissionError:
        raise UnreadableImageError(label, "permission denied") from None
    except OSError as exc:
        raise UnreadableImageError(label, f"cannot read file ({exc.strerror or _short(exc)})") from None


def describe_non_image(data: bytes) -> str:
    """A short guess at what a non-image file is, from its first bytes (for the error message)."""
    head = data[:1024]
    lower = head.lstrip().lower()
    if head.startswith(b"%PDF"):
        return "a PDF document"
    if lower.startswith((b"<!doctype html", b"<html")):
        return "an HTML page"
    if lower.startswith(b"<svg") or (lower.startswith(b"<?xml") and b"<svg" in lower):
        return "an SVG drawing (vector images are not supported)"
    if lower.startswith(b"<?xml"):
        return "an XML document"
    if head.startswith(b"PK\x03\x04"):
        return "a ZIP archive (or an Office document)"
    if head.startswith(b"\x1f\x8b"):
        return "a gzip archive"
    if head[4:8] == b"ftyp" and head[8:12] in (b"isom", b"mp41", b"mp42", b"qt  ", b"M4V ", b"avc1", b"3gp4", b"3gp5"):
        return "a video file"
    if head.startswith(b"RIFF") and head[8:12] in (b"WAVE", b"AVI "):
        return "an audio/video file"
    if head.startswith((b"ID3", b"OggS", b"fLaC")):
        return "an audio file"
    if head.startswith(b"\xff\xd8"):
        return "a damaged JPEG"
    if head.startswith(b"\x89PNG"):
        return "a damaged PNG"
    text = head.decode("utf-8", errors="replace")
    if text and sum((c.isprintable() and c != "\ufffd") or c in "\r\n\t" for c in text) >= 0.95 * len(text):
        return "a text file"
    return f"unknown data (first bytes {head[:8].hex(' ')})"


def _from_bytes(data: bytes, label: str, max_side: int | None) -> LoadedImage:
    if not data:
        raise UnreadableImageError(label, "empty file (0 bytes)")
    if len(data) > MAX_FILE_BYTES:
        raise UnsupportedImageError(label, _too_big(len(data)))
    try:
        im = Image.open(io.BytesIO(data), formats=_OPEN_FORMATS)
    except Image.DecompressionBombError as exc:
        raise UnsupportedImageError(
            label, f"image too large ({_bomb_size(data, exc)} > {MAX_PIXELS / 1e6:.0f} MP limit; possible "
                   "decompression bomb): resize it before uploading") from None
    except UnidentifiedImageError:
        other = _other_image_format(data)
        if other:
            raise UnsupportedImageError(label, f"unsupported image format {other}; expected {_SUPPORTED_TEXT}") \
                from None
        what = describe_non_image(data)
        if what.startswith("a damaged"):
            raise UnreadableImageError(label, f"corrupt image: {what[2:]} whose header cannot be parsed") from None
        raise UnreadableImageError(label, f"not an image: looks like {what}; expected {_SUPPORTED_TEXT}") from None
    except MemoryError:
        raise UnsupportedImageError(label, "not enough memory to open this image") from None
    except Exception as exc:  # Pillow plugins raise SyntaxError, struct.error, ValueError, OSError ...
        raise UnreadableImageError(label, f"corrupt or truncated image header ({_short(exc)})") from None
    with im:
        return _from_pil(im, label, max_side, owned=True)


def _bomb_size(data: bytes, exc: Exception) -> str:
    """'20000x20000 = 400 MP' from a PNG header, else the pixel count in Pillow's message."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
        w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        return f"{w}x{h} = {w * h / 1e6:.0f} MP"
    m = re.search(r"\((\d+) pixels\)", str(exc))
    return f"{int(m.group(1)) / 1e6:.0f} MP" if m else "header size"


def _other_image_format(data: bytes) -> str | None:
    """Name of an image format Pillow knows but we do not accept (ICO, PSD, JPEG 2000 ...).

    Only the header is parsed (nothing is decoded, no external program runs), to tell the user
    "convert it" rather than "not an image".
    """
    try:
        with Image.open(io.BytesIO(data)) as other:
            return other.format or "unknown"
    except Exception:
        return None


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(0x0112, 1) or 1)
    except Exception:  # corrupt EXIF must not make a good photo unusable
        return 1


def _from_pil(im: Image.Image, label: str, max_side: int | None, *, owned: bool) -> LoadedImage:
    """Guards, optional draft, decode, EXIF transpose, mode conversion, downscale."""
    fmt = im.format or ("PIL" if not owned else "")
    mode = im.mode
    try:
        # Size/aspect guards are orientation-independent, so they run on the header size.
        stored_w, stored_h = im.size
        check_dimensions(label, stored_w, stored_h)
        if owned and max_side and im.format in ("JPEG", "MPO"):
            k = _draft_factor(max(stored_w, stored_h), max_side)
            if k > 1:  # libjpeg decodes at 1/k directly: 4-16x less work for a big photo
                im.draft("RGB", (stored_w // k, stored_h // k))
        im.load()
        # Read orientation after load: some plugins (TIFF) rotate while loading and drop the tag.
        orientation = _orientation(im)
        upright_w, upright_h = stored_w, stored_h
        if orientation != 1:
            try:
                im = ImageOps.exif_transpose(im)
                if orientation in (5, 6, 7, 8):
                    upright_w, upright_h = stored_h, stored_w
            except Exception as exc:
                log.warning("%s: could not apply EXIF orientation %s (%s); using the stored orientation",
                            label, orientation, _short(exc))
        rgb = to_rgb_uint8(im)
    except ImageError:
        raise
    except Image.DecompressionBombError:
        raise UnsupportedImageError(label, f"image too large (> {MAX_PIXELS / 1e6:.0f} MP limit; possible "
                                           "decompression bomb)") from None
    except MemoryError:
        raise UnsupportedImageError(label, "not enough memory to decode this image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        what = f"{fmt} " if fmt and fmt != "PIL" else ""
        raise UnreadableImageError(label, f"truncated or corrupt {what}image data ({_short(exc)})") from None
    except Exception as exc:  # any other plugin failure
        raise UnreadableImageError(label, f"cannot decode image ({_short(exc)})") from None
    rgb = _downscale(rgb, max_side)
    scale = rgb.shape[1] / upright_w if upright_w >= upright_h else rgb.shape[0] / upright_h
    return LoadedImage(rgb=rgb, scale=float(scale), orig_width=int(upright_w), orig_height=int(upright_h),
                       name=label, format=fmt, mode=mode)


#: JPEG draft decoding may undershoot ``max_side`` by up to this fraction instead of decoding at
#: the next larger DCT scale and resizing: a 4032 x 3024 photo with ``max_side=2048`` decodes at
#: 1/2 scale (2016 px, one step) instead of at full size followed by a resize (~5x slower).
DRAFT_UNDERSHOOT = 0.05


def _draft_factor(long_side: int, max_side: int) -> int:
    """Largest JPEG DCT reduction (8, 4, 2) whose result still has >= (1 - DRAFT_UNDERSHOOT) *
    max_side on the long side; 1 when none does (then the area resize does all the work)."""
    for k in (8, 4, 2):
        if math.ceil(long_side / k) >= (1 - DRAFT_UNDERSHOOT) * max_side:
            return k
    return 1


def _from_array(arr: np.ndarray, label: str, max_side: int | None) -> LoadedImage:
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise UnreadableImageError(label, f"array of shape {arr.shape} is not an H x W (x 3|4) image")
    h, w = arr.shape[:2]
    check_dimensions(label, w, h)
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and np.nanmax(arr) <= 1.0:
            arr = np.nan_to_num(arr) * 255.0
        arr = np.clip(np.rint(np.nan_to_num(arr)), 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        rgb = np.repeat(arr[..., None], 3, axis=2)
    elif arr.shape[2] == 4:
        rgb = _composite_on_white(arr)
    else:
        rgb = np.array(arr, copy=True)  # never alias the caller's array
    rgb = _downscale(rgb, max_side)
    return LoadedImage(rgb=rgb, scale=rgb.shape[1] / w if w >= h else rgb.shape[0] / h, orig_width=w, orig_height=h,
                       name=label, format="array", mode=f"array[{arr.dtype}]")


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """RGBA uint8 -> RGB over a white background (transparent areas become white, not black)."""
    a = rgba[..., 3:4].astype(np.uint16)
    out = (rgba[..., :3].astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def to_rgb_uint8(im: Image.Image) -> np.ndarray:
    """Any Pillow mode -> H x W x 3 uint8, scaling high bit depths instead of clipping them.

    16-bit data ("I;16*", or "I" with values > 255) is divided by 257 so 65535 -> 255; float
    data ("F") in [0, 1] is scaled by 255. Alpha is composited on white.
    """
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im, dtype=np.uint8)  # may be read-only; callers copy or resize it
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(im).astype(np.float64)
        finite = arr[np.isfinite(arr)]
        hi = float(finite.max()) if finite.size else 0.0
        if mode == "F" and hi <= 1.0:
            arr = arr * 255.0
        elif mode.startswith("I;16") or hi > 255.0:
            arr = arr / 257.0
        grey = np.clip(np.rint(np.nan_to_num(arr)), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info) \
            or (mode in ("L", "RGB") and "transparency" in im.info):
        return _composite_on_white(np.asarray(im.convert("RGBA"), dtype=np.uint8))
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _downscale(rgb: np.ndarray, max_side: int | None) -> np.ndarray:
    """Area-average downscale so the long side is ``max_side`` (never upscales). Always returns a
    fresh, writable, contiguous array (never a view of Pillow's read-only buffer)."""
    h, w = rgb.shape[:2]
    if not max_side or max(h, w) <= max_side:
        return rgb.copy() if not rgb.flags.writeable or not rgb.flags.c_contiguous else rgb
    f = max_side / max(h, w)
    size = (max(1, round(w * f)), max(1, round(h * f)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


# ---- quality gate -------------------------------------------------------------------------------------

#: Images are measured at this long side (downscaled; smaller images at their own size) so the
#: blur measure does not depend on the camera's resolution. Upscaling small images would only add
#: interpolation blur; they are flagged by the resolution check instead.
QUALITY_SIDE = 512
DARK_LEVEL = 25  # grey level below which a pixel counts as "near black"
BRIGHT_LEVEL = 245  # grey level above which a pixel counts as "blown out"


@dataclass(frozen=True)
class QualityThresholds:
    """Warning thresholds of the quality gate, chosen on the training images (never val/test).

    Chosen with :func:`calibrate_quality_thresholds` (default decode, ``max_side=1024``) on every
    *train*-split image of the manifest in ham10000 (8,807, dermoscopy), pad_ufes20_subset (487,
    smartphone) and derm7pt (824, clinical + dermoscopy), 10,118 images, 2026-11-24. Rule: for each
    measure take the most lenient of the three sets' 1st (or 99th) percentiles, rounded outward,
    so that no set's ordinary images are flagged much more than 1% of the time (the pooled
    percentile would be HAM10000's, 87% of the images, and would flag ~5% of the phone photos).
    Per-set percentiles p1 / p99 (HAM, PAD, derm7pt):

    - sharpness (variance of the Laplacian, grey, <= 512 px): p1 10.1 / 6.2 / 43.2 -> 6.
      Check: the same train images Gaussian-blurred (sigma 2 px) fall below 6 in 99% (HAM),
      98% (PAD) and 21% (derm7pt, sharper originals) of cases; sigma 3 px: 100 / 100 / 91%.
    - mean brightness: p1 112.7 / 96.1 / 91.8 -> 90; p99 201.5 / 202.1 / 214.5 -> 215.
    - fraction of near-black pixels (< 25): p99 0.08 / 0.02 / 0.33 (dermoscopy vignettes, dark
      backgrounds) -> 0.35.
    - fraction of blown-out pixels (> 245): p99 0.00 / 0.01 / 0.33 (flash glare) -> 0.35.
    - skin-coloured fraction (see :func:`skin_fraction`): p1 0.008 / 0.041 / 0.129 -> 0.01
      (dermoscopy colours are often outside the skin-chroma box, so only near-absence is flagged:
      a wall, a screenshot, a uniform colour).
    - shortest side: every stored train image of the three sets is >= 150 px -> 150.

    With these defaults 1.2% (HAM), 2.2% (PAD) and 3.0% (derm7pt) of 400 random train images per
    set, and 1.0% / 4.2% / 3.5% of validation images (400 / all 72 / 400), get at least one
    warning: HAM "little skin" (blue-purple dermoscopy), derm7pt exposure (flash, dark backgrounds).
    """

    min_sharpness: float = 6.0
    """Variance of the Laplacian (<= 512 px grey) below which the photo looks out of focus."""
    min_brightness: float = 90.0
    """Mean grey level (0-255) below which the photo is too dark."""
    max_brightness: float = 215.0
    """Mean grey level above which the photo is overexposed."""
    max_dark_fraction: float = 0.35
    """Fraction of near-black pixels above which much of the photo is lost in shadow."""
    max_bright_fraction: float = 0.35
    """Fraction of blown-out pixels above which glare or overexposure hides detail."""
    min_skin_fraction: float = 0.01
    """Fraction of skin-coloured pixels below which the photo may not show skin at all."""
    min_side: int = 150
    """Shortest side (original pixels) below which the photo is smaller than any training image."""


def _quality_grey(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(grey, rgb) at <= QUALITY_SIDE long side, area-averaged."""
    small = _downscale(rgb, QUALITY_SIDE)
    grey = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
    return grey, small


def skin_fraction(rgb: np.ndarray) -> float:
    """Fraction of pixels whose chroma is skin-like (Cr 133-173, Cb 77-127; Chai & Ngan 1999).

    A chroma-only rule, so it is largely independent of skin tone; used only to warn that a
    photo may show no skin (a wall, a screenshot), never to refuse one.
    """
    ycrcb = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2YCrCb)
    cr, cb = ycrcb[..., 1], ycrcb[..., 2]
    mask = (cr >= 133) & (cr <= 173) & (cb >= 77) & (cb <= 127)
    return float(mask.mean()) if mask.size else 0.0


@dataclass
class QualityMeasures:
    """The raw measures behind a :class:`QualityReport` (also what calibration collects)."""

    sharpness: float
    brightness: float
    dark_fraction: float
    bright_fraction: float
    skin_fraction: float
    min_side: int


def measure_quality(rgb: np.ndarray, orig_size: tuple[int, int] | None = None) -> QualityMeasures:
    """Blur, exposure, skin and resolution measures of an RGB uint8 image."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected H x W x 3 uint8, got {rgb.shape} {rgb.dtype}")
    grey, small = _quality_grey(rgb)
    lap = cv2.Laplacian(grey, cv2.CV_64F)
    w, h = orig_size if orig_size else (rgb.shape[1], rgb.shape[0])
    return QualityMeasures(
        sharpness=float(lap.var()),
        brightness=float(grey.mean()),
        dark_fraction=float((grey < DARK_LEVEL).mean()),
        bright_fraction=float((grey > BRIGHT_LEVEL).mean()),
        skin_fraction=skin_fraction(small),
        min_side=int(min(w, h)),
    )


def assess_quality(rgb: Any, *, orig_size: tuple[int, int] | None = None,
                   thresholds: QualityThresholds | None = None) -> QualityReport:
    """The quality gate: measures plus short, actionable warnings (empty list = fine).

    ``rgb`` is the decoded image (or a :class:`LoadedImage`); ``orig_size`` = (width, height) of the
    original photo, so resolution is judged on what the camera delivered, not on the decode size.
    """
    if isinstance(rgb, LoadedImage):
        orig_size = orig_size or (rgb.orig_width, rgb.orig_height)
        rgb = rgb.rgb
    t = thresholds or QualityThresholds()
    m = measure_quality(rgb, orig_size)
    warnings: list[str] = []
    # Exposure first: in a photo that is too dark or washed out, low contrast reads as blur and
    # colours as "not skin", so those two checks are only made on a reasonably exposed photo.
    exposure_ok = True
    if m.brightness < t.min_brightness:
        exposure_ok = False
        warnings.append(f"Image is too dark (mean brightness {m.brightness:.0f} < {t.min_brightness:.0f}): "
                        "retake it in better light.")
    elif m.brightness > t.max_brightness:
        exposure_ok = False
        warnings.append(f"Image is overexposed (mean brightness {m.brightness:.0f} > {t.max_brightness:.0f}): "
                        "avoid flash and direct light.")
    if exposure_ok and m.dark_fraction > t.max_dark_fraction:
        warnings.append(f"Image is largely dark ({m.dark_fraction:.0%} of pixels near black > "
                        f"{t.max_dark_fraction:.0%}): retake it in better light.")
    if exposure_ok and m.bright_fraction > t.max_bright_fraction:
        warnings.append(f"Image has blown-out highlights ({m.bright_fraction:.0%} of pixels > "
                        f"{t.max_bright_fraction:.0%}): avoid flash glare and reflections.")
    if exposure_ok and m.sharpness < t.min_sharpness:
        warnings.append(f"Image looks blurred (sharpness {m.sharpness:.1f} < {t.min_sharpness:.0f}): "
                        "retake it in focus.")
    if exposure_ok and m.skin_fraction < t.min_skin_fraction:
        warnings.append(f"Little skin visible ({m.skin_fraction:.0%} skin-coloured pixels < "
                        f"{t.min_skin_fraction:.0%}): is this a photo of skin?")
    if m.min_side < t.min_side:
        warnings.append(f"Low resolution (shortest side {m.min_side} px < {t.min_side} px): "
                        "retake it closer or at full resolution.")
    return QualityReport(blur_laplacian_var=m.sharpness, mean_brightness=m.brightness, dark_fraction=m.dark_fraction,
                         bright_fraction=m.bright_fraction, min_side=m.min_side, warnings=warnings)


@dataclass
class QualityCalibration:
    """Distribution of each quality measure over a set of real images (for choosing thresholds)."""

    n: int
    n_failed: int
    percentiles: dict[str, dict[float, float]] = field(default_factory=dict)

    def suggest(self) -> QualityThresholds:
        """Thresholds at the 1st / 99th percentile of the real images (round before adopting them)."""
        p = self.percentiles
        return QualityThresholds(
            min_sharpness=p["sharpness"][1.0], min_brightness=p["brightness"][1.0],
            max_brightness=p["brightness"][99.0], max_dark_fraction=p["dark_fraction"][99.0],
            max_bright_fraction=p["bright_fraction"][99.0], min_skin_fraction=p["skin_fraction"][1.0],
            min_side=int(p["min_side"][1.0]))


def calibrate_quality_thresholds(paths: Iterable[str | os.PathLike],
                                 percentiles: Sequence[float] = (1.0, 5.0, 50.0, 95.0, 99.0),
                                 max_side: int = 1024) -> QualityCalibration:
    """Percentiles of every quality measure over ``paths`` (unreadable files are counted and skipped).

    Run it on training images only; :meth:`QualityCalibration.suggest` turns the result into
    thresholds. The numbers behind the shipped defaults are in :class:`QualityThresholds`.
    """
    pct = sorted({float(q) for q in (*percentiles, 1.0, 99.0)})
    rows: list[QualityMeasures] = []
    failed = 0
    for p in paths:
        try:
            img = load_image(p, max_side=max_side)
        except ImageError as exc:
            log.warning("calibration: skipping %s", exc)
            failed += 1
            continue
        rows.append(measure_quality(img.rgb, (img.orig_width, img.orig_height)))
    if not rows:
        raise ValueError("calibrate_quality_thresholds: no readable image among the given paths")
    out: dict[str, dict[float, float]] = {}
    for f in fields(QualityMeasures):
        values = np.array([getattr(r, f.name) for r in rows], dtype=np.float64)
        out[f.name] = {q: float(np.percentile(values, q)) for q in pct}
    return QualityCalibration(n=len(rows), n_failed=failed, percentiles=out)


# ---- crops --------------------------------------------------------------------------------------------

def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def crop_window(box: Sequence[float], margin: float = 0.25, square: bool = True) -> tuple[int, int, int, int]:
    """Integer window [X1, Y1, X2, Y2) of :func:`crop_with_margin` (may extend past the image).

    The box (xyxy, continuous pixel coordinates: pixel i spans [i, i+1)) keeps its centre; its
    width and height (the larger of the two for ``square``; at least 1 px) grow by ``margin`` of
    the side on *each* side, i.e. side * (1 + 2 * margin); the result is rounded to whole pixels
    (half up), so a square window is exactly square.
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise ValueError(f"box must be finite, got {list(box)}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    bw, bh = max(1.0, x2 - x1), max(1.0, y2 - y1)
    if square:
        bw = bh = max(bw, bh)
    out_w = max(1, _round_half_up(bw * (1 + 2 * margin)))
    out_h = max(1, _round_half_up(bh * (1 + 2 * margin)))
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    X1, Y1 = _round_half_up(cx - out_w / 2), _round_half_up(cy - out_h / 2)
    return X1, Y1, X1 + out_w, Y1 + out_h


def _reflect_index(idx: np.ndarray, n: int) -> np.ndarray:
    """Map any integer index into [0, n) by mirror reflection without repeating the edge
    (OpenCV BORDER_REFLECT_101 / numpy 'reflect'), repeated as often as needed."""
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    r = np.mod(idx, period)
    return np.where(r < n, r, period - r)


def apply_clahe(rgb: np.ndarray, clip_limit: float = 2.0, tiles: int = 8) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of the lightness channel (seed 004).

    Works in CIELAB so hue is untouched (equalising R, G and B separately shifts lesion colour,
    which is itself a malignancy cue). Returns a new RGB uint8 array of the same shape.
    """
    arr = np.ascontiguousarray(rgb)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"apply_clahe expects an H x W x 3 uint8 image, got {arr.shape} {arr.dtype}")
    lab = cv2.cvtColor(arr, cv2.COLOR_RGB2LAB)
    clahe = cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(tiles, tiles))
    lab[..., 0] = clahe.apply(lab[..., 0])
    return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)


def crop_with_margin(rgb: np.ndarray, box: Sequence[float], margin: float = 0.25, square: bool = True) -> np.ndarray:
    """Crop ``box`` (xyxy in ``rgb``'s pixels) plus context, as the classifier sees a lesion.

    The window is :func:`crop_window`; where it extends past the image it is filled by mirror
    reflection of the image (no black borders for the classifier to key on). Output shape is
    always the window's size; works for H x W and H x W x C arrays of any dtype.
    """
    if rgb.ndim < 2 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError(f"crop_with_margin: empty image of shape {rgb.shape}")
    h, w = rgb.shape[:2]
    X1, Y1, X2, Y2 = crop_window(box, margin, square)
    if X1 >= 0 and Y1 >= 0 and X2 <= w and Y2 <= h:
        return rgb[Y1:Y2, X1:X2].copy()
    rows = _reflect_index(np.arange(Y1, Y2), h)
    cols = _reflect_index(np.arange(X1, X2), w)
    return rgb[rows[:, None], cols[None, :]]


# ---- export without metadata ----------------------------------------------------------------------------

def encode_png(rgb: np.ndarray, compress_level: int = 6) -> bytes:
    """PNG bytes of an RGB(A)/grey uint8 array, pixels only: no EXIF, GPS, text or ICC chunk."""
    arr = np.asarray(rgb)
    if arr.dtype != np.uint8:
        raise ValueError(f"encode_png expects uint8 pixels, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    mode = {2: "L"}.get(arr.ndim) or {3: "RGB", 4: "RGBA"}.get(arr.shape[2] if arr.ndim == 3 else 0)
    if mode is None:
        raise ValueError(f"encode_png: cannot encode an array of shape {arr.shape}")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr), mode).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def strip_exif_png(image: np.ndarray | Image.Image, compress_level: int = 6) -> bytes:
    """Re-encode as a metadata-free PNG. A PIL image is turned upright first (its EXIF orientation
    would otherwise be lost with the EXIF) and converted to RGB like :func:`load_image` does."""
    if isinstance(image, Image.Image):
        if _orientation(image) != 1:
            image = ImageOps.exif_transpose(image)
        return encode_png(to_rgb_uint8(image), compress_level)
    return encode_png(np.asarray(image), compress_level)


def image_sha256(data: bytes | bytearray | memoryview) -> str:
    """Hex sha256 of the raw bytes (cache keys, provenance; never a filename on disk)."""
    return hashlib.sha256(data).hexdigest()
