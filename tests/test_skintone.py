"""Individual Typology Angle from peri-lesional skin, on synthetic images of known CIELAB colour
(issue 12 item 6)."""
from __future__ import annotations

import math
import time

import numpy as np
import pytest
from skimage.color import lab2rgb

from lesiontriage.skintone import (
    ITA_TO_FITZPATRICK,
    agreement_with_fitzpatrick,
    estimate_ita,
    ita_category,
    ita_from_lab,
    parse_fitzpatrick,
    ring_mask,
)

# (category, skin L*, a*, b*) with the ITA well inside each band
SKINS = [
    ("very_light", 75.0, 8.0, 12.0),    # ITA 64.4
    ("light", 65.0, 10.0, 13.5),        # 48.0
    ("intermediate", 60.0, 10.0, 14.5),  # 34.6
    ("tan", 55.0, 10.0, 14.5),          # 19.0
    ("brown", 47.0, 12.0, 17.0),        # -10.0
    ("dark", 35.0, 10.0, 12.6),         # -50.0
]
LESION = (25.0, 15.0, 20.0)  # dark brown: ITA about -51 ('dark')


def lab_patch(lab, h, w):
    return np.round(lab2rgb(np.broadcast_to(np.array(lab, float), (h, w, 3)).copy()) * 255).astype(np.uint8)


def make_image(skin, h=240, w=320, box=(120, 80, 200, 160), lesion=LESION, seed=0, noise=3.0):
    rng = np.random.default_rng(seed)
    img = lab_patch(skin, h, w).astype(float)
    if box is not None:
        x1, y1, x2, y2 = box
        img[y1:y2, x1:x2] = lab_patch(lesion, y2 - y1, x2 - x1)
    img += rng.normal(0, noise, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("cat,L,a,b", SKINS)
def test_known_skin_colour_lands_in_its_category(cat, L, a, b):
    img = make_image((L, a, b))
    est = estimate_ita(img, box=(120, 80, 200, 160))
    assert est.ok, est.reason
    assert est.category == cat
    assert est.ita == pytest.approx(ita_from_lab(L, b), abs=2.0)
    assert est.n_pixels > 1000
    # without a box, the border ring samples skin too
    border = estimate_ita(img)
    assert border.ok and border.category == cat


def test_ring_excludes_the_lesion():
    h, w, box = 200, 300, (100, 60, 180, 140)
    mask = ring_mask((h, w), box)
    x1, y1, x2, y2 = box
    assert not mask[y1:y2, x1:x2].any()
    margin = int(0.25 * 80)
    assert not mask[y1 - margin:y2 + margin, x1 - margin:x2 + margin].any()  # dilated box too
    assert mask.sum() > 0.2 * h * w
    assert mask[y1 - margin - 2, x1] and not mask[0, 0]  # ring, not the whole image
    # border ring when there is no box
    border = ring_mask((h, w), None)
    assert border[0, 150] and border[100, 0] and not border[100, 150]


def test_lesion_that_looks_like_skin_does_not_bias_the_estimate():
    # lesion in a skin-like brown that passes every pixel filter and covers 56% of the photo:
    # only the ring keeps it out (the full margin leaves no ring here, so a smaller one is used)
    skin, lesion = SKINS[1][1:], (45.0, 14.0, 22.0)  # light skin (48.0) vs lesion ITA -12.8
    box = (40, 30, 280, 210)
    img = make_image(skin, box=box, lesion=lesion)
    est = estimate_ita(img, box=box)
    assert est.ok and est.category == "light" and est.ita == pytest.approx(48.0, abs=2.0)
    whole = estimate_ita(img, box=(0, 0, 1, 1), ring=1000.0)  # a "ring" covering the whole image
    assert whole.ita < est.ita - 30  # the lesion would have dragged it down


def test_hair_specular_highlights_and_dermoscope_vignette_are_ignored():
    skin = SKINS[2][1:]  # intermediate, ITA 34.6
    img = make_image(skin, h=300, w=300, box=(110, 110, 190, 190)).astype(float)
    rng = np.random.default_rng(5)
    for _ in range(25):  # dark hairs: 2-px lines across the image
        r = rng.integers(0, 300)
        img[r:r + 2, :] = (30, 22, 18)
        c = rng.integers(0, 300)
        img[:, c:c + 2] = (25, 20, 15)
    for _ in range(40):  # specular highlights
        y, x = rng.integers(0, 295, 2)
        img[y:y + 4, x:x + 4] = 253
    yy, xx = np.mgrid[:300, :300]
    img[np.abs(np.hypot(yy - 150, xx - 150) - 95) < 2] = (40, 70, 200)  # blue pen circle
    img[np.hypot(yy - 150, xx - 150) > 165] = 0  # black dermoscope vignette in the corners
    img = img.astype(np.uint8)
    for box in ((110, 110, 190, 190), None):
        est = estimate_ita(img, box=box)
        assert est.ok and est.category == "intermediate", (box, est)
        assert est.ita == pytest.approx(ita_from_lab(skin[0], skin[2]), abs=3.0)


def test_unusable_images_are_flagged_not_raised():
    grey = np.full((100, 100, 3), 128, np.uint8)
    est = estimate_ita(grey)
    assert not est.ok and est.reason
    tiny = make_image(SKINS[0][1:], h=8, w=8, box=None)
    small = estimate_ita(tiny)
    assert not small.ok and "skin pixels" in small.reason and small.category == "very_light"
    covered = estimate_ita(make_image(SKINS[0][1:], box=None), box=(0, 0, 320, 240))
    assert not covered.ok and covered.n_pixels == 0 and covered.to_dict()["ita"] is None
    # a bluish dermoscope cast: b* < 0, ITA undefined rather than 'very light' or 'dark'
    cast = estimate_ita(make_image((65.0, 8.0, -6.0), box=None))
    assert not cast.ok and "colour cast" in cast.reason and math.isnan(cast.ita) and cast.category is None
    with pytest.raises(ValueError, match="RGB"):
        estimate_ita(np.zeros((10, 10)))
    with pytest.raises(ValueError, match="x2 >= x1"):
        estimate_ita(grey, box=(50, 50, 10, 10))


def test_large_photo_is_fast():
    skin = SKINS[3][1:]
    img = np.empty((3024, 4032, 3), np.uint8)
    img[:] = lab_patch(skin, 1, 1)[0, 0]
    img[1400:1600, 1900:2100] = lab_patch(LESION, 1, 1)[0, 0]
    t0 = time.perf_counter()
    est = estimate_ita(img, box=(1900, 1400, 2100, 1600))
    assert time.perf_counter() - t0 < 2.0
    assert est.ok and est.category == "tan"


def test_category_boundaries():
    assert ita_category(55.01) == "very_light" and ita_category(55.0) == "light"
    assert ita_category(41.0) == "intermediate" and ita_category(28.0) == "tan"
    assert ita_category(10.0) == "brown" and ita_category(-29.9) == "brown"
    assert ita_category(-30.0) == "dark" and ita_category(float("nan")) is None
    assert ita_from_lab(60.0, 10.0) == pytest.approx(45.0)
    assert ita_from_lab(40.0, 10.0) == pytest.approx(-45.0)


def test_parse_fitzpatrick():
    assert [parse_fitzpatrick(v) for v in (1, 2.0, "3", "IV", "type V", "FST6", None, float("nan"), 7, "x", 2.5)] == \
        [1, 2, 3, 4, 5, 6, None, None, None, None, None]


def test_agreement_with_fitzpatrick():
    centres = {"very_light": 65.0, "light": 48.0, "intermediate": 34.0, "tan": 19.0, "brown": -10.0, "dark": -50.0}
    ita = [centres[c] for c in centres] * 3
    fitz = [ITA_TO_FITZPATRICK[c] for c in centres] * 3
    perfect = agreement_with_fitzpatrick(ita, fitz)
    assert perfect["n"] == 18 and perfect["exact_agreement"] == 1.0
    assert perfect["spearman_rho"] == pytest.approx(-1.0) and perfect["weighted_kappa"] == pytest.approx(1.0)
    assert perfect["crosstab"]["tan"][4] == 3 and perfect["crosstab"]["tan"][3] == 0
    # off by one type everywhere, plus missing values on either side
    shifted = [min(f + 1, 6) for f in fitz]
    res = agreement_with_fitzpatrick(ita + [float("nan"), 30.0], shifted + [2, None])
    assert res["n"] == 18 and res["n_missing"] == 2
    assert res["exact_agreement"] == pytest.approx(3 / 18)  # only 'dark' (6 -> 6) stays exact
    assert res["within_one_agreement"] == 1.0
    assert res["spearman_rho"] < -0.9 and res["weighted_kappa"] < 1.0
    with pytest.raises(ValueError, match="Fitzpatrick values"):
        agreement_with_fitzpatrick([1.0, 2.0], [1])
    empty = agreement_with_fitzpatrick([float("nan")], [None])
    assert empty["n"] == 0 and math.isnan(empty["spearman_rho"])
