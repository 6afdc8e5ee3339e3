"""Acquisition shift: the body crop and intensity normalisation of imaging.prepare, their
params, card and serving round trip, the heatmap in the upload's coordinates, and the shift
augmentation of train."""

from __future__ import annotations

import dataclasses
import json
import re

import cv2
import numpy as np
import pytest

from chestct.imaging import preparation
from chestct.imaging.body import BodyBox
from chestct.imaging.preparation import Preprocessing, map_to_frame, prepare, prepare_slice
from chestct.settings import AugmentParams, ResizeParams, SettingsError, build
from helpers import NORMALISED, SHIFT, textured, zoomed_out
from shipped import shipped


def gap(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute grey-level difference."""
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())


# --------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize(("share", "left", "top"), [(0.6, 0.5, 0.5), (0.75, 0.1, 0.8)])
def test_a_wider_field_gives_nearly_the_same_prepared_slice(
    share: float, left: float, top: float
) -> None:
    grey = textured()
    wide = zoomed_out(grey, share, left, top)
    plain = gap(
        prepare_slice(grey, Preprocessing(64)).image, prepare_slice(wide, Preprocessing(64)).image
    )
    normalised = gap(
        prepare_slice(grey, NORMALISED).image,
        prepare_slice(wide, NORMALISED).image,
    )
    assert normalised < 6.0, normalised
    assert normalised < plain / 4, (normalised, plain)


def test_another_contrast_and_brightness_gives_the_same_prepared_slice() -> None:
    grey = textured()
    # Another linear grey scale for the whole slice (an export with another window).
    dimmer = np.clip(grey.astype(np.float32) * 0.6 + 20, 0, 255).astype(np.uint8)
    plain = gap(
        prepare_slice(grey, Preprocessing(64)).image,
        prepare_slice(dimmer, Preprocessing(64)).image,
    )
    normalised = gap(
        prepare_slice(grey, NORMALISED).image,
        prepare_slice(dimmer, NORMALISED).image,
    )
    assert normalised < 3.0, normalised
    assert normalised < plain / 5, (normalised, plain)


@pytest.mark.parametrize("gamma", [0.7, 1.4])
@pytest.mark.parametrize("intensity", ["percentile", "clahe"])
def test_another_gamma_stays_close_after_normalisation(gamma: float, intensity: str) -> None:
    grey = textured()
    other = (255.0 * (grey / 255.0) ** gamma).astype(np.uint8)
    spec = Preprocessing(64, crop="body", intensity=intensity)
    plain = gap(
        prepare_slice(grey, Preprocessing(64)).image, prepare_slice(other, Preprocessing(64)).image
    )
    normalised = gap(
        prepare_slice(grey, spec).image,
        prepare_slice(other, spec).image,
    )
    # Neither a percentile window (linear) nor CLAHE undoes a gamma, and stretching the range
    # scales the difference up with it (measured: about 2x the un-normalised gap): the prepared
    # slices stay within 8 % of the grey range; train.augment.gamma covers the rest.
    assert normalised < 20.0, (normalised, plain)


def test_percentile_window_spans_the_full_range() -> None:
    grey = np.linspace(50, 150, 10_000).astype(np.uint8).reshape(100, 100)
    out = preparation.percentile_window(grey, 1.0, 99.0)
    assert out.min() == 0 and out.max() == 255
    flat = np.full((8, 8), 90, np.uint8)
    np.testing.assert_array_equal(preparation.percentile_window(flat, 1.0, 99.5), flat)
    # A near-blank slice (noise of a few grey levels) is not stretched into a contrasty one,
    # so validate's near-blank check still sees it.
    noisy = (90 + np.random.default_rng(0).integers(-3, 4, (64, 64))).astype(np.uint8)
    np.testing.assert_array_equal(preparation.percentile_window(noisy, 1.0, 99.5), noisy)
    out = prepare_slice(noisy, NORMALISED.with_size(32)).image
    assert out.std() < 2.0


def test_no_normalisation_is_the_old_preprocessing() -> None:
    grey = textured()
    ok, buf = cv2.imencode(".png", grey)
    assert ok
    np.testing.assert_array_equal(
        prepare(buf.tobytes(), Preprocessing(48)), preparation.resize(grey, 48)
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"crop": "ribs"}, "card preprocessing.crop 'ribs'"),
        ({"intensity": "hist"}, "card preprocessing.intensity 'hist'"),
        ({"percentiles": [99.0, 1.0]}, "card preprocessing.percentiles"),
        ({"percentiles": [1.0]}, "pair"),
        ({"crop_margin": 0.9}, "card preprocessing.crop_margin"),
        ({"crop_margin": "wide"}, "card preprocessing.crop_margin: a number"),
        ({"resize": "fit"}, "card preprocessing.resize 'fit'"),
        ({"interpolation": "nearest"}, "card preprocessing.interpolation 'nearest'"),
        ({"window": [-600, 1500]}, "card preprocessing.window"),
        ({"window": {"level": -600, "width": 0}}, "card preprocessing.window: width"),
        ({"lung_mask": True}, "card preprocessing.lung_mask is not a setting"),
    ],
)
def test_a_bad_normalisation_spec_names_the_key(spec: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        Preprocessing.from_card({"image_size": 64, "preprocessing": spec})


def test_a_bad_card_size_or_entry_is_refused() -> None:
    for card, message in (
        ({"image_size": "64"}, "card image_size: a whole number"),
        ({"image_size": 0}, "card size: whole pixels >= 1"),
        ({"image_size": 64, "preprocessing": ["area"]}, "card preprocessing must be an object"),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            Preprocessing.from_card(card)


# --------------------------------------------------------------------------- params and card


def test_card_round_trip_and_old_cards() -> None:
    spec = Preprocessing(
        64,
        "cubic",
        "pad",
        crop="body",
        crop_margin=0.05,
        intensity="clahe",
        percentiles=(2.0, 98.0),
        clahe_clip=3.0,
        window=(-500.0, 1200.0),
    )
    card = json.loads(json.dumps(spec.to_card()))
    assert Preprocessing.from_card(card) == spec
    # A card written before these keys existed: the model was trained without them.
    old = {"image_size": 64, "preprocessing": {"resize": "stretch", "interpolation": "area"}}
    assert Preprocessing.from_card(old) == Preprocessing(64)
    assert Preprocessing.from_card({"image_size": 64}) == Preprocessing(64)
    # params `resize` + base.image_size + ingest.window make the same value.
    params = shipped(ResizeParams, crop="body", intensity="percentile", percentiles=[0.5, 99.0])
    assert Preprocessing.from_params(params, 64) == Preprocessing(
        64, crop="body", intensity="percentile", percentiles=(0.5, 99.0)
    )


def test_a_card_promoted_before_the_preprocessing_value_reads_as_it_was_served() -> None:
    """The `preprocessing` entry promote wrote before Preprocessing existed (its own keys, the
    window from ingest's params) reads back to the same settings and is written again alike."""
    before = {
        "image_size": 128,
        "preprocessing": {
            "decode": "by content (PNG, JPEG, BMP, TIFF, DICOM); any mode to 8-bit grey; "
            "transparent pixels over black",
            "resize": "stretch",
            "interpolation": "area",
            "input": "float32 in [0, 255], shape (image_size, image_size, 1)",
            "crop": "body",
            "crop_margin": 0.02,
            "intensity": "percentile",
            "percentiles": [1.0, 99.5],
            "clahe_clip": 2.0,
            "window": {"level": -600.0, "width": 1500.0},
        },
    }
    prep = Preprocessing.from_card(before)
    assert prep == Preprocessing(128, crop="body", intensity="percentile", window=(-600.0, 1500.0))
    assert prep.to_card() == before


@pytest.mark.parametrize(
    ("group", "message"),
    [
        ({"crop": "ribs"}, "resize.crop"),
        ({"percentiles": [50, 10]}, "resize.percentiles"),
        ({"crop_margin": -0.1}, "resize.crop_margin"),
        ({"clahe_clip": 0}, "resize.clahe_clip"),
    ],
)
def test_bad_resize_params_name_the_key(group: dict, message: str) -> None:
    # A key's type is checked as params.yaml is read; its range where the params become the one
    # Preprocessing value (the resize stage, evaluate, promote).
    with pytest.raises(SettingsError, match=message):
        params = build(
            ResizeParams, {**dataclasses.asdict(shipped(ResizeParams)), **group}, "resize"
        )
        Preprocessing.from_params(params, 128)


@pytest.mark.parametrize(
    ("group", "message"),
    [
        ({"zoom_out": 1.0}, "train.augment.zoom_out"),
        ({"window": 0.5}, "train.augment.window"),
        ({"noise": -1}, "train.augment.noise"),
    ],
)
def test_bad_augment_params_name_the_key(group: dict, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        build(
            AugmentParams, {**dataclasses.asdict(shipped(AugmentParams)), **group}, "train.augment"
        )


# --------------------------------------------------------------------------- serving


@pytest.mark.parametrize("mode", ["stretch", "pad", "crop"])
def test_map_to_frame_puts_each_input_pixel_back_where_it_came_from(mode: str) -> None:
    # A frame whose body box is 60 x 30 at (100, 50): an input-space map marking the top-left
    # quarter of the (squared) body must land on the top-left of what that mode kept.
    box = BodyBox(100, 50, 60, 30)
    frame = np.zeros((200, 300), np.uint8)
    frame[50:80, 100:160] = np.arange(60, dtype=np.uint8)[None, :] * 4
    prepared = preparation.resize(box.crop(frame), 64, "linear", mode)
    back = map_to_frame(prepared.astype(np.float32), box, frame.shape, mode)
    assert back.shape == frame.shape
    assert back[:50].max() == 0 and back[:, :100].max() == 0  # nothing outside the box
    assert back[81:].max() == 0 and back[:, 161:].max() == 0
    kept = back[50:80, 100:160]
    if mode == "crop":  # only the centred 30 x 30 was seen
        seen = frame[50:80, 115:145].astype(np.float32)
        assert kept[:, :15].max() == 0 and kept[:, 45:].max() == 0
        assert np.abs(kept[:, 15:45] - seen).mean() < 6
    else:
        assert np.abs(kept - frame[50:80, 100:160]).mean() < 6


# --------------------------------------------------------------------------- augmentation


OFF = shipped(AugmentParams, flip=False, rotation=0.0, zoom=0.0, contrast=0.0)


def batch() -> np.ndarray:
    """Eight 48 px slices, float32 in [0, 255] as the input pipeline gives them."""
    return np.stack([cv2.resize(textured(i), (48, 48))[:, :, None] for i in range(8)]).astype(
        np.float32
    )


@pytest.mark.parametrize("key", list(SHIFT))
def test_each_shift_augmentation_changes_the_image_within_its_bounds(key: str) -> None:
    import tensorflow as tf

    from chestct.model.inputs import augmenter

    x = batch()
    params = dataclasses.replace(OFF, **{key: SHIFT[key]})
    out = augmenter(params, seed=3)(tf.constant(x), training=True).numpy()
    again = augmenter(params, seed=3)(tf.constant(x), training=True).numpy()
    other = augmenter(params, seed=4)(tf.constant(x), training=True).numpy()
    np.testing.assert_array_equal(out, again)  # seeded
    assert not np.array_equal(out, other)
    assert out.shape == x.shape
    assert out.min() >= 0.0 and out.max() <= 255.0
    changed = gap(out, x)
    assert changed > 0.2, changed
    if key == "zoom_out":
        # Never zoomed in: what is bright covers no more than before, inside a black rim.
        assert (out > 30).sum() <= (x > 30).sum()
        assert out[:, 0, :, 0].max() <= x[:, 0, :, 0].max() + 1e-3
    if key == "translation":
        # The body moves: its centre of brightness shifts in some image.
        weights = x[:, :, :, 0].sum(axis=1)
        moved = out[:, :, :, 0].sum(axis=1)
        cols = np.arange(x.shape[2])
        shift = np.abs(
            (moved * cols).sum(1) / moved.sum(1) - (weights * cols).sum(1) / weights.sum(1)
        )
        assert shift.max() > 1.0
    if key == "gamma":
        # A monotone map per image: the order of grey levels is kept.
        for a, b in zip(x[:, :, :, 0], out[:, :, :, 0], strict=True):
            order = np.argsort(a.ravel(), kind="stable")
            assert np.all(np.diff(b.ravel()[order]) >= -1e-3)
    if key == "noise":
        assert changed < SHIFT["noise"]
    if key == "blur":
        # Blur lowers the local contrast.
        assert np.abs(np.diff(out, axis=2)).mean() < np.abs(np.diff(x, axis=2)).mean()


def test_all_augmentations_off_leave_no_layer() -> None:
    from chestct.model.inputs import augmenter

    assert augmenter(OFF, 0).layers == []


@pytest.mark.parametrize("gamma", [0.7, 1.4])
def test_equalize_undoes_a_gamma_the_percentile_window_does_not(gamma: float) -> None:
    grey = textured()
    other = (255.0 * (grey / 255.0) ** gamma).astype(np.uint8)
    gaps = {}
    for intensity in ("percentile", "equalize"):
        spec = Preprocessing(64, crop="body", intensity=intensity)
        gaps[intensity] = gap(
            prepare_slice(grey, spec).image,
            prepare_slice(other, spec).image,
        )
    # Ranks survive any increasing grey-level map; what is left comes from levels that the
    # gamma merged or split in uint8.
    assert gaps["equalize"] < 4.0, gaps
    assert gaps["equalize"] < gaps["percentile"] / 2, gaps


def test_equalize_leaves_a_near_blank_slice_as_it_is() -> None:
    noisy = (90 + np.random.default_rng(0).integers(-3, 4, (64, 64))).astype(np.uint8)
    np.testing.assert_array_equal(preparation.equalize(noisy), noisy)
    assert prepare_slice(noisy, Preprocessing(32, intensity="equalize")).image.std() < 2.0


def test_preprocessing_choices_and_ranges_are_the_declared_params_ones() -> None:
    """One declaration (params `resize` in chestct.settings) for params and cards alike."""
    import typing

    hints = typing.get_type_hints(ResizeParams)
    assert set(preparation.INTERPOLATIONS) == set(typing.get_args(hints["interpolation"]))
    assert typing.get_args(hints["crop"]) == preparation.CROPS
    for field, bad in (("crop_margin", 0.51), ("clahe_clip", 0.0), ("percentiles", (-1.0, 50.0))):
        with pytest.raises(preparation.PreprocessingError, match=field):
            Preprocessing(64, **{field: bad})
