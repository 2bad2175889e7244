"""The bad / odd input corpus of issue 14 item 1, generated in tmp_path.

Each case is a file written by the test and the outcome we promise for it: either a specific
error class whose one-line message starts with the file's path and names the reason, or a
correct decode plus the expected quality warnings. A fuzz test then checks that damaged files of
every format raise only :class:`ImageError` (never a PIL / OS exception).
"""
from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import pytest
from PIL import Image

from lesiontriage.errors import ImageError, UnreadableImageError, UnsupportedImageError
from lesiontriage.imaging import assess_quality, load_image

from conftest import encode_image, make_skin_photo

SKIN = make_skin_photo(320, 240, seed=1)
RED_PATCH = SKIN.copy()
RED_PATCH[:30, :30] = (255, 0, 0)
GRADIENT = np.linspace(0, 65535, 320)

# ---- builders ------------------------------------------------------------------------------------------


def _jpeg(rgb: np.ndarray, **kw) -> bytes:
    return encode_image(rgb, "JPEG", quality=kw.pop("quality", 90), **kw)


def _forge_png_size(png: bytes, width: int, height: int) -> bytes:
    """Rewrite a PNG's IHDR width/height (and its CRC): a header that claims a huge image in a
    file of a few hundred bytes, the classic decompression-bomb shape, without allocating it."""
    assert png[12:16] == b"IHDR"
    new = struct.pack(">II", width, height) + png[24:29]
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + new) & 0xFFFFFFFF)
    return png[:16] + new + crc + png[33:]


def _forge_jpeg_size(jpg: bytes, width: int, height: int) -> bytes:
    """Rewrite the baseline SOF0 frame size of a JPEG."""
    i = jpg.index(b"\xff\xc0")
    return jpg[: i + 5] + struct.pack(">HH", height, width) + jpg[i + 9:]


def _png16_rgb() -> bytes:
    """SKIN as 16-bit RGB (v * 257) with a full-range gradient in the first 10 rows."""
    rgb16 = SKIN.astype(np.uint16) * 257
    rgb16[:10] = np.stack([GRADIENT, GRADIENT / 2, GRADIENT / 4], axis=-1).astype(np.uint16)
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb16[..., ::-1]))  # OpenCV writes BGR
    assert ok
    return buf.tobytes()


def _grey16_png() -> bytes:
    grey = np.asarray(Image.fromarray(SKIN).convert("L"))
    g16 = grey.astype(np.uint16) * 257
    g16[:10] = GRADIENT.astype(np.uint16)
    return encode_image(Image.fromarray(g16), "PNG")


def _animated_gif() -> bytes:
    frames = [Image.fromarray(SKIN)] + [Image.new("RGB", (320, 240), c) for c in ((40, 200, 40), (40, 40, 200))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def _rgba_png() -> bytes:
    a = np.dstack([SKIN, np.full(SKIN.shape[:2], 255, np.uint8)])
    a[:, 280:] = (255, 0, 0, 0)  # fully transparent strip: its hidden red must not show
    a[:10, :10] = (128, 0, 0, 128)  # half-transparent dark red over white -> (191, 127, 127)
    return encode_image(Image.fromarray(a, "RGBA"), "PNG")


def _palette() -> Image.Image:
    return Image.fromarray(SKIN).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)


def _exif_rotated_phone_photo() -> bytes:
    """Stored landscape 400 x 300 with a red block in the stored top-left corner, EXIF orientation
    6 (the camera was held upright): viewers show it portrait, the red block at the top-right."""
    rgb = make_skin_photo(400, 300, seed=3)
    rgb[:40, :40] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "PhoneMaker"  # camera make: must not matter
    return _jpeg(rgb, exif=exif.tobytes())


def _heic(rgb: np.ndarray) -> bytes:
    try:
        import pillow_heif

        pillow_heif.register_heif_opener()
        if not pillow_heif.libheif_info().get("HEIF"):
            pytest.skip("pillow-heif has no HEIF encoder here")
    except ImportError:
        pytest.skip("pillow-heif not installed")
    return encode_image(rgb, "HEIF", quality=90)


def _textured(colour: tuple[int, int, int], w: int = 320, h: int = 240, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.array(colour, float) + rng.normal(0, 8, (h, w, 1)), 0, 255).astype(np.uint8)


# ---- expectations ---------------------------------------------------------------------------------------

@dataclass
class Case:
    name: str  # file (or folder) name in tmp_path; also what the error message must mention
    build: Callable[[Path], Path]
    error: type[ImageError] | None = None
    reason: str = ""  # substring of the error reason (case-insensitive)
    check: Callable[[np.ndarray], None] | None = None  # checks on the decoded RGB
    warnings: frozenset[str] = frozenset()  # the exact set of expected quality warnings (keys below)


def _file(name: str, data: bytes | Callable[[], bytes]) -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        p = tmp / name
        p.write_bytes(data() if callable(data) else data)
        return p

    return build


def _near(rgb: np.ndarray, yx: tuple[int, int], colour: tuple[int, int, int], tol: int = 12) -> None:
    got = rgb[yx].astype(int)
    assert np.abs(got - np.array(colour)).max() <= tol, f"pixel {yx} = {got.tolist()}, expected ~{colour}"


def _close_to(ref: np.ndarray, tol: float) -> Callable[[np.ndarray], None]:
    def check(rgb):
        assert rgb.shape == ref.shape
        diff = np.abs(rgb.astype(float) - ref).mean()
        assert diff < tol, f"mean abs difference {diff:.2f} >= {tol}"

    return check


def _grey_of_skin() -> np.ndarray:
    return np.asarray(Image.fromarray(SKIN).convert("L"))


def _check_grey(rgb):
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    _close_to(np.repeat(_grey_of_skin()[..., None], 3, 2), 3)(rgb)


def _check_cmyk(rgb):
    _near(rgb, (15, 15), (255, 0, 0))  # the red patch survives CMYK (Adobe-inverted in JPEG)
    _close_to(RED_PATCH, 4)(rgb)


def _check_grey16(rgb):
    # 16-bit values are scaled (v / 257), not clipped at 255: mid-grey stays mid-grey
    assert np.abs(rgb[5, :, 0].astype(int) - np.rint(GRADIENT / 257)).max() <= 1
    np.testing.assert_array_equal(rgb[10:, :, 1], _grey_of_skin()[10:])


def _check_rgb16(rgb):
    expected = GRADIENT / 257
    assert np.abs(rgb[5, :, 0] - expected).max() <= 1.01
    assert np.abs(rgb[5, :, 1] - expected / 2).max() <= 1.01
    assert np.abs(rgb[5, :, 2] - expected / 4).max() <= 1.01
    np.testing.assert_array_equal(rgb[10:], SKIN[10:])


def _check_rgba(rgb):
    np.testing.assert_array_equal(rgb[20:, :280], SKIN[20:, :280])
    assert (rgb[:, 280:] == 255).all(), "transparent pixels must become white, not black or red"
    _near(rgb, (5, 5), (191, 127, 127), 1)


def _check_palette(rgb):
    np.testing.assert_array_equal(rgb, np.asarray(_palette().convert("RGB")))
    _close_to(SKIN, 6)(rgb)


def _check_rotated(rgb):
    assert rgb.shape == (400, 300, 3), "EXIF orientation 6 must give a portrait image"
    _near(rgb, (10, 290), (255, 0, 0), 40)  # stored top-left -> displayed top-right
    assert np.abs(rgb[10, 10].astype(int) - (255, 0, 0)).max() > 60


def _same_as_skin(rgb):
    np.testing.assert_array_equal(rgb, SKIN)


CASES: list[Case] = [
    # -- unreadable -------------------------------------------------------------------------
    Case("zero_bytes.jpg", _file("zero_bytes.jpg", b""), UnreadableImageError, "empty file"),
    Case("truncated.jpg", _file("truncated.jpg", lambda: _jpeg(SKIN)[: len(_jpeg(SKIN)) // 3]),
         UnreadableImageError, "truncated"),
    Case("truncated.png", _file("truncated.png", lambda: encode_image(SKIN, "PNG")[:2000]),
         UnreadableImageError, "truncated or corrupt"),
    Case("notes.jpg", _file("notes.jpg", b"Patient notes\nlesion on left arm, 4 mm\n" * 20),
         UnreadableImageError, "looks like a text file"),
    Case("report.jpg", _file("report.jpg", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n"),
         UnreadableImageError, "looks like a PDF document"),
    Case("page.jpg", _file("page.jpg", b"<!DOCTYPE html><html><body>404 Not Found</body></html>"),
         UnreadableImageError, "looks like an HTML page"),
    Case("noise.jpg", _file("noise.jpg", bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8))),
         UnreadableImageError, "not an image"),
    Case("missing.jpg", lambda tmp: tmp / "missing.jpg", UnreadableImageError, "file not found"),
    Case("a_folder.jpg", lambda tmp: (tmp / "a_folder.jpg").mkdir() or tmp / "a_folder.jpg",
         UnreadableImageError, "is a directory"),
    # -- unsupported ------------------------------------------------------------------------
    Case("1x1.png", _file("1x1.png", lambda: encode_image(np.zeros((1, 1, 3), np.uint8), "PNG")),
         UnsupportedImageError, "too small (1x1"),
    Case("30x30.jpg", _file("30x30.jpg", lambda: _jpeg(SKIN[:30, :30])), UnsupportedImageError, "too small (30x30"),
    Case("bomb_20000.png", _file("bomb_20000.png", lambda: _forge_png_size(encode_image(SKIN[:8, :8], "PNG"), 20000, 20000)),
         UnsupportedImageError, "decompression bomb"),
    Case("bomb_20000.jpg", _file("bomb_20000.jpg", lambda: _forge_jpeg_size(_jpeg(SKIN[:64, :64]), 20000, 20000)),
         UnsupportedImageError, "(400 MP > 120 MP limit; possible decompression bomb)"),
    Case("bomb_132mp.png", _file("bomb_132mp.png", lambda: _forge_png_size(encode_image(SKIN[:8, :8], "PNG"), 12000, 11000)),
         UnsupportedImageError, "12000x11000 = 132 MP"),
    Case("panorama_10to1.jpg", _file("panorama_10to1.jpg", lambda: _jpeg(make_skin_photo(2000, 200, seed=4))),
         UnsupportedImageError, "aspect ratio 10.0:1"),
    # -- decoded correctly --------------------------------------------------------------------
    # a grey photo has no skin chroma: decoded, with the "little skin" warning
    Case("grayscale.jpg", _file("grayscale.jpg", lambda: encode_image(Image.fromarray(SKIN).convert("L"), "JPEG", quality=95)),
         check=_check_grey, warnings=frozenset({"skin"})),
    Case("cmyk.jpg", _file("cmyk.jpg", lambda: encode_image(Image.fromarray(RED_PATCH).convert("CMYK"), "JPEG", quality=95)),
         check=_check_cmyk),
    Case("grey_16bit.png", _file("grey_16bit.png", _grey16_png), check=_check_grey16, warnings=frozenset({"skin"})),
    Case("rgb_16bit.png", _file("rgb_16bit.png", _png16_rgb), check=_check_rgb16),
    Case("rgba.png", _file("rgba.png", _rgba_png), check=_check_rgba),
    Case("palette.png", _file("palette.png", lambda: encode_image(_palette(), "PNG")), check=_check_palette),
    Case("animated.gif", _file("animated.gif", _animated_gif), check=_close_to(SKIN, 8)),  # the first frame
    Case("iphone.heic", _file("iphone.heic", lambda: _heic(SKIN)), check=_close_to(SKIN, 6)),
    Case("phone_rotated.jpg", _file("phone_rotated.jpg", _exif_rotated_phone_photo), check=_check_rotated),
    Case("photo.webp", _file("photo.webp", lambda: encode_image(SKIN, "WEBP", quality=95)), check=_close_to(SKIN, 5)),
    Case("photo.tif", _file("photo.tif", lambda: encode_image(SKIN, "TIFF")), check=_same_as_skin),
    Case("photo.bmp", _file("photo.bmp", lambda: encode_image(SKIN, "BMP")), check=_same_as_skin),
    Case("good_skin.png", _file("good_skin.png", lambda: encode_image(SKIN, "PNG")), check=_same_as_skin),
    # -- decoded, with quality warnings --------------------------------------------------------
    Case("very_dark.jpg", _file("very_dark.jpg", lambda: _jpeg((SKIN * 0.15).astype(np.uint8))),
         warnings=frozenset({"too dark"})),
    Case("overexposed.jpg", _file("overexposed.jpg", lambda: _jpeg((SKIN * 0.25 + 0.75 * 255).astype(np.uint8))),
         warnings=frozenset({"overexposed"})),
    Case("blurred.jpg", _file("blurred.jpg", lambda: _jpeg(cv2.GaussianBlur(SKIN, (0, 0), 6))),
         warnings=frozenset({"blurred"})),
    Case("blue_wall.jpg", _file("blue_wall.jpg", lambda: _jpeg(_textured((90, 140, 225)))),
         warnings=frozenset({"skin"})),
    Case("small_120.png", _file("small_120.png", lambda: encode_image(make_skin_photo(120, 100, seed=5), "PNG")),
         warnings=frozenset({"resolution"})),
]

WARNING_KEYS = {
    "blurred": "looks blurred", "too dark": "too dark", "overexposed": "overexposed", "skin": "little skin",
    "resolution": "low resolution", "dark areas": "largely dark", "highlights": "blown-out",
}


def test_corpus_is_big_enough():
    assert len(CASES) >= 20
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_corpus(case: Case, tmp_path: Path):
    path = case.build(tmp_path)
    if case.error is not None:
        with pytest.raises(case.error) as info:
            load_image(path)
        msg = str(info.value)
        assert msg.startswith(f"{path}: "), msg
        assert case.name in msg
        assert case.reason.lower() in msg.lower(), msg
        assert "\n" not in msg and len(msg) < 400
        assert info.value.source == str(path)
        return
    img = load_image(path)
    assert img.rgb.dtype == np.uint8 and img.rgb.ndim == 3 and img.rgb.shape[2] == 3
    assert img.name == str(path)
    assert (img.orig_height, img.orig_width) == img.rgb.shape[:2]
    assert img.scale == 1.0
    if case.check:
        case.check(img.rgb)
    report = assess_quality(img)
    got = {k for k, text in WARNING_KEYS.items() if any(text in w.lower() for w in report.warnings)}
    assert len(got) == len(report.warnings), f"unrecognised warning in {report.warnings}"
    assert got == set(case.warnings), f"{case.name}: warnings {report.warnings}"
    for w in report.warnings:
        assert w[0].isupper() and w.endswith((".", "?")) and "\n" not in w and len(w) < 160


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_same_errors_for_bytes_and_stream_inputs(tmp_path: Path):
    """The app passes uploaded bytes, not paths: same error classes, its own name in the message."""
    for case in CASES:
        if case.error is None or case.name in ("missing.jpg", "a_folder.jpg"):
            continue
        data = case.build(tmp_path).read_bytes()
        with pytest.raises(case.error) as info:
            load_image(data, name=f"upload:{case.name}")
        assert str(info.value).startswith(f"upload:{case.name}: ")
        with pytest.raises(case.error):
            load_image(io.BytesIO(data), name=case.name)


def test_bomb_is_refused_before_allocating(tmp_path: Path):
    """The forged 20000 x 20000 header is refused from the header: it would need 1.2 GB decoded."""
    import tracemalloc

    data = _forge_png_size(encode_image(SKIN[:8, :8], "PNG"), 20000, 20000)
    assert len(data) < 1000
    tracemalloc.start()
    try:
        with pytest.raises(UnsupportedImageError, match="20000x20000 = 400 MP"):
            load_image(data, name="bomb.png")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20


def test_permission_denied(tmp_path: Path):
    import os

    p = tmp_path / "locked.jpg"
    p.write_bytes(_jpeg(SKIN))
    p.chmod(0)
    try:
        if os.access(p, os.R_OK):
            pytest.skip("running as root: file permissions are not enforced")
        with pytest.raises(UnreadableImageError, match="locked.jpg: permission denied"):
            load_image(p)
    finally:
        p.chmod(0o600)


FUZZ_FORMATS = {
    "JPEG": dict(quality=85), "PNG": {}, "WEBP": dict(quality=80), "TIFF": {}, "GIF": {}, "BMP": {},
}


def _fuzz_variants(data: bytes, rng: np.random.Generator, n_cut: int = 8, n_flip: int = 10):
    cuts = sorted(set(np.linspace(1, len(data) - 1, n_cut).astype(int).tolist()) | {8, 16, 40})
    for c in cuts:
        yield f"cut{c}", data[:c]
    for i in range(n_flip):
        b = bytearray(data)
        for pos in rng.integers(0, min(len(b), 600 if i % 2 else len(b)), 1 + i % 4):
            b[pos] = int(rng.integers(0, 256))
        yield f"flip{i}", bytes(b)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the corrupt TIFF tags it skips
@pytest.mark.parametrize("fmt", list(FUZZ_FORMATS) + ["HEIF"])
def test_damaged_files_raise_only_image_errors(fmt: str):
    """Truncations and random byte changes in every format: a decoded image or an ImageError, nothing else."""
    small = make_skin_photo(96, 80, seed=7)
    data = _heic(small) if fmt == "HEIF" else encode_image(small, fmt, **FUZZ_FORMATS[fmt])
    rng = np.random.default_rng(len(data))
    outcomes = {"ok": 0, "error": 0}
    for tag, variant in _fuzz_variants(data, rng):
        try:
            img = load_image(variant, name=f"{fmt}-{tag}")
        except ImageError as exc:
            assert str(exc).startswith(f"{fmt}-{tag}: ") and "\n" not in str(exc)
            outcomes["error"] += 1
        else:
            assert img.rgb.dtype == np.uint8 and img.rgb.shape[2] == 3
            outcomes["ok"] += 1
    assert outcomes["error"] >= 5  # truncations at least must be refused
