"""chestct.imaging.perturb: the acquisition perturbations of the shift-stress set, and the
synthetic
acquisition shortcut built on them."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from chestct.imaging.perturb import (
    SHIFT_NAMES,
    SHIFTS,
    apply_shift,
    aspect,
    blur,
    gamma,
    jpeg,
    noise,
    zoom_out,
)


@pytest.fixture(scope="module")
def slice_() -> np.ndarray:
    """A bright body on black, with texture: 120 x 160."""
    from chestct.data.synthetic import render_slice

    grey = render_slice("adenocarcinoma", np.random.default_rng(0), size=128)
    return cv2.resize(grey, (160, 120), interpolation=cv2.INTER_AREA)


def test_the_stress_set_is_the_documented_one() -> None:
    assert SHIFT_NAMES == (
        "zoom_80",
        "zoom_60",
        "aspect_080",
        "aspect_125",
        "gamma_070",
        "gamma_140",
        "blur",
        "jpeg_q30",
        "noise_8",
    )
    assert all("." not in s.name for s in SHIFTS)  # they are metric keys: shift.<name>.*
    assert all(s.description for s in SHIFTS)


@pytest.mark.parametrize("name", SHIFT_NAMES)
def test_every_shift_keeps_the_frame_changes_the_pixels_and_is_reproducible(
    slice_: np.ndarray, name: str
) -> None:
    out = apply_shift(name, slice_, "key")
    assert out.shape == slice_.shape and out.dtype == np.uint8
    assert not np.array_equal(out, slice_)
    np.testing.assert_array_equal(apply_shift(name, slice_, "key"), out)


def test_zoom_out_shrinks_the_slice_onto_a_black_margin(slice_: np.ndarray) -> None:
    out = zoom_out(slice_, 0.6)
    h, w = slice_.shape
    inner_h, inner_w = round(h * 0.6), round(w * 0.6)
    top, left = (h - inner_h) // 2, (w - inner_w) // 2
    margin = np.ones_like(out, bool)
    margin[top : top + inner_h, left : left + inner_w] = False
    assert out[margin].max() == 0
    expected = cv2.resize(slice_, (inner_w, inner_h), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(out[top : top + inner_h, left : left + inner_w], expected)
    np.testing.assert_array_equal(zoom_out(slice_, 1.0), slice_)


def test_aspect_narrows_onto_black_sides_or_widens_and_cuts(slice_: np.ndarray) -> None:
    narrow = aspect(slice_, 0.8)
    side = (slice_.shape[1] - round(slice_.shape[1] * 0.8)) // 2
    assert narrow[:, :side].max() == 0 and narrow[:, -side:].max() == 0
    wide = aspect(slice_, 1.25)
    # The centre column stays; what was at a quarter of the width moves outwards.
    assert wide.shape == slice_.shape
    centre = slice_.shape[1] // 2
    assert abs(int(wide[:, centre].mean()) - int(slice_[:, centre].mean())) < 3


def test_gamma_moves_mid_tones_and_keeps_black_and_white() -> None:
    ramp = np.arange(256, dtype=np.uint8)[None, :].repeat(4, axis=0)
    bright, dark = gamma(ramp, 0.7), gamma(ramp, 1.4)
    assert bright[0, 0] == dark[0, 0] == 0 and bright[0, 255] == dark[0, 255] == 255
    assert (bright[0, 1:255] >= ramp[0, 1:255]).all() and bright[0, 128] > 150
    assert (dark[0, 1:255] <= ramp[0, 1:255]).all() and dark[0, 128] < 100


def test_blur_is_relative_to_the_frame(slice_: np.ndarray) -> None:
    small = blur(slice_, 0.01)
    big = blur(cv2.resize(slice_, (320, 240), interpolation=cv2.INTER_LINEAR), 0.01)
    # The same relative blur: both lose about the same detail once brought to one size.
    detail = lambda g: float(cv2.Laplacian(cv2.resize(g, (80, 60)), cv2.CV_64F).var())  # noqa: E731
    assert detail(small) < detail(slice_)
    assert detail(big) == pytest.approx(detail(small), rel=0.35)


def test_jpeg_and_noise(slice_: np.ndarray) -> None:
    assert 0 < np.abs(jpeg(slice_, 30).astype(int) - slice_).mean() < 10
    rng = np.random.default_rng(0)
    noisy = noise(np.full((200, 200), 128, np.uint8), 8.0, rng)
    assert noisy.std() == pytest.approx(8.0, rel=0.05)
    # Seeded per image key: another image gets other noise, the same image the same.
    a = apply_shift("noise_8", slice_, "image-a")
    b = apply_shift("noise_8", slice_, "image-b")
    assert not np.array_equal(a, b)


def test_bad_inputs_are_refused_with_the_reason(slice_: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"unknown shift 'rotate'.*zoom_80"):
        apply_shift("rotate", slice_, "k")
    with pytest.raises(ValueError, match="8-bit grey"):
        zoom_out(slice_.astype(np.float32), 0.8)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        zoom_out(slice_, 1.5)
    with pytest.raises(ValueError, match="quality"):
        jpeg(slice_, 0)


def test_synthetic_shortcut_changes_only_its_class(tmp_path: Path) -> None:
    from chestct.data.synthetic import SHORTCUT_CLASS, generate_synthetic

    counts = {"train": 1, "test": 1}
    plain = generate_synthetic(tmp_path / "plain", 7, counts)
    zoomed = generate_synthetic(tmp_path / "zoom", 7, counts, shortcut="zoom")
    dark = generate_synthetic(tmp_path / "dark", 7, counts, shortcut="dark")
    for a, z, d in zip(plain, zoomed, dark, strict=True):
        grey = [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in (a, z, d)]
        if SHORTCUT_CLASS.split("_")[0] in a.parent.name:
            h, w = grey[1].shape
            assert grey[1][:, : w // 10].max() < 20 and grey[1][: h // 10].max() < 20
            assert grey[2].mean() < 0.7 * grey[0].mean()
        else:
            assert a.read_bytes() == z.read_bytes() == d.read_bytes()
    with pytest.raises(ValueError, match="unknown synthetic shortcut"):
        from chestct.data.synthetic import with_shortcut

        with_shortcut(grey[0], SHORTCUT_CLASS, "tilt")
