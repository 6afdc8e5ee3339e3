"""chestct.imaging.lungs: the lung field, its fallback, and `resize.crop: lungs` in prepare."""

from __future__ import annotations

import numpy as np
import pytest

from chestct.data.synthetic import render_slice
from chestct.imaging import lungs, preparation


def _abdomen(side: int = 256) -> np.ndarray:
    """A body without lungs: a bright ellipse of soft tissue with a small gas pocket."""
    grey = np.zeros((side, side), np.uint8)
    yy, xx = np.mgrid[:side, :side]
    grey[((yy - side / 2) / (side * 0.35)) ** 2 + ((xx - side / 2) / (side * 0.42)) ** 2 < 1] = 170
    grey[(yy - 100) ** 2 + (xx - 140) ** 2 < 9] = 5
    return grey


def test_lung_field_found_on_synthetic_chest_slices() -> None:
    for seed in range(4):
        grey = render_slice("normal", np.random.default_rng(seed))
        field = lungs.lung_field(grey)
        assert field.found, field.reason
        assert field.mask.shape == grey.shape and field.mask.dtype == bool
        # Lungs are dark, inside the body, and not the outside air in the corners.
        assert grey[field.mask].mean() < grey[~field.mask].mean() + 40
        assert not field.mask[:5, :5].any() and not field.mask[-5:, -5:].any()
        assert lungs.LUNG_MIN_SHARE <= field.share < 0.8
        assert field.x > 0 and field.y > 0 and field.w < grey.shape[1]


def test_lung_field_falls_back_with_a_reason() -> None:
    field = lungs.lung_field(_abdomen())
    assert not field.found and "not a chest slice" in field.reason
    assert field.share == 0.0 and field.mask.any()  # the body stands in
    blank = lungs.lung_field(np.full((64, 64), 9, np.uint8))
    assert not blank.found and "uniform" in blank.reason and blank.mask.all()
    tiny = lungs.lung_field(np.zeros((8, 8), np.uint8))
    assert "too small" in tiny.reason
    with pytest.raises(ValueError, match="2-D"):
        lungs.lung_field(np.zeros((8, 8, 3), np.uint8))


def test_mask_share() -> None:
    mask = np.zeros((4, 4), bool)
    mask[:2] = True
    weights = np.zeros((4, 4))
    weights[0, 0], weights[3, 3] = 3.0, 1.0
    assert lungs.mask_share(weights, mask) == pytest.approx(0.75)
    assert np.isnan(lungs.mask_share(np.zeros((4, 4)), mask))
    with pytest.raises(ValueError, match="shape"):
        lungs.mask_share(np.zeros((3, 3)), mask)


def test_prepare_slice_crops_to_the_lungs_and_falls_back_to_the_body() -> None:
    grey = render_slice("adenocarcinoma", np.random.default_rng(1))
    spec = preparation.Preprocessing(64, crop="lungs", crop_margin=0.05)
    prepared = preparation.prepare_slice(grey, spec)
    body = preparation.prepare_slice(grey, preparation.Preprocessing(64, crop="body"))
    assert prepared.image.shape == (64, 64)
    assert prepared.box.w * prepared.box.h < body.box.w * body.box.h
    field = lungs.lung_field(grey)
    assert prepared.box.x <= field.x and prepared.box.x + prepared.box.w >= field.x + field.w
    fallback = preparation.prepare_slice(_abdomen(), spec)
    assert "body box used" in fallback.box.reason
    assert fallback.box.w < 256  # the body, not the whole frame
    card = {"image_size": 64, "preprocessing": {"crop": "lungs"}}
    assert preparation.Preprocessing.from_card(card).crop == "lungs"
