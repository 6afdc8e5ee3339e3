"""Decoded grey slice -> the model's input: crop, resize to a square, normalise intensity.

`prepare` (bytes) and `prepare_slice` (grey) are the one preprocessing of training and serving,
so a slice is seen the same way in both. `Preprocessing` is the one value of their settings:
built from params (resize stage, evaluate), written into the model card and read back from it
(promote's champion, serving).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from chestct.imaging.body import BodyBox, body_box
from chestct.imaging.decoding import decode
from chestct.imaging.lungs import lung_field
from chestct.settings import ResizeParams, SettingsError, WindowParams
from chestct.settings.data_params import percentile_pair_problem
from chestct.settings.schema import check_bounds, rule_of

INTERPOLATIONS = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR, "cubic": cv2.INTER_CUBIC}

# How a slice that is not square becomes square (params `resize.mode`).
# The choices and ranges of these settings are declared once, on params `resize`
# (chestct.settings): params, cards and code are all held against them.
_RESIZE_TYPES = typing.get_type_hints(ResizeParams)
_RESIZE_RULES = {item.name: rule_of(item) for item in dataclasses.fields(ResizeParams)}
RESIZE_MODES: tuple[str, ...] = typing.get_args(_RESIZE_TYPES["mode"])


def resize(
    grey: np.ndarray, size: int, interpolation: str = "area", mode: str = "stretch"
) -> np.ndarray:
    """A grey slice to size x size.

    Args:
        grey: uint8 H x W.
        size: side of the square output.
        interpolation: area | linear | cubic.
        mode: stretch (scale each axis on its own; shape distorts), pad (scale the longer side
            to `size`, centre on black; anatomy keeps its proportions but the bands show the
            aspect ratio), crop (cut the centred square, then scale; loses the sides).
    """
    flag = INTERPOLATIONS[interpolation]
    height, width = grey.shape[:2]
    if mode == "stretch" or height == width:
        return cv2.resize(grey, (size, size), interpolation=flag)
    if mode == "crop":
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        return cv2.resize(
            grey[top : top + side, left : left + side], (size, size), interpolation=flag
        )
    if mode == "pad":
        scale = size / max(height, width)
        new_w = max(1, round(width * scale))
        new_h = max(1, round(height * scale))
        small = cv2.resize(grey, (new_w, new_h), interpolation=flag)
        top, left = (size - new_h) // 2, (size - new_w) // 2
        return cv2.copyMakeBorder(
            small, top, size - new_h - top, left, size - new_w - left, cv2.BORDER_CONSTANT, value=0
        )
    raise ValueError(f"resize mode {mode!r} is not one of {', '.join(RESIZE_MODES)}")


# Params `resize.crop` and `resize.intensity`.
CROPS: tuple[str, ...] = typing.get_args(_RESIZE_TYPES["crop"])
INTENSITIES: tuple[str, ...] = typing.get_args(_RESIZE_TYPES["intensity"])
CLAHE_TILES = 8  # tiles per side of the prepared image
# A slice whose percentile window spans fewer grey levels is near-blank and left as it is.
PERCENTILE_MIN_SPREAD = 32

# What a card's `preprocessing` entry says in words beside the settings (not read back).
CARD_NOTES: dict[str, str] = {
    "decode": "by content (PNG, JPEG, BMP, TIFF, DICOM); any mode to 8-bit grey; "
    "transparent pixels over black",
    "input": "float32 in [0, 255], shape (image_size, image_size, 1)",
}
_CARD_KEYS = (
    "resize",
    "interpolation",
    "crop",
    "crop_margin",
    "intensity",
    "percentiles",
    "clahe_clip",
    "window",
)


class PreprocessingError(ValueError):
    """Preprocessing settings that chestct.imaging cannot reproduce; the message starts with
    the setting's name (`key`), which params and cards name in their own way."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class Preprocessing:
    """Everything that turns a decoded slice into the model's input, as one value.

    params `resize` (+ `base.image_size`, `ingest.window`) become one (`from_params`); the resize
    stage prepares with it, the card records it (`to_card`) and evaluate, promote and serving
    read it back (`from_card`). The defaults beside `size` do nothing (the behaviour of models
    made before the crop and intensity settings existed).
    """

    size: int  # side of the square model input: base.image_size, the card's image_size
    interpolation: str = "area"  # area | linear | cubic
    resize: str = "stretch"  # how a slice that is not square becomes square (RESIZE_MODES)
    crop: str = "none"  # body: cut to `body_box` first; lungs: to chestct.imaging.lungs' box
    crop_margin: float = 0.02  # share of the crop box's side added on every side
    intensity: str = "none"  # percentile | equalize | clahe | none
    percentiles: tuple[float, float] = (1.0, 99.5)  # percentile: this window -> 0..255
    clahe_clip: float = 2.0  # clahe: contrast limit
    # DICOM (level, width) in Hounsfield units: params ingest.window; None refuses DICOM bytes.
    window: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        # The one place these ranges are checked: params, cards and code all build this value.
        _one_of("interpolation", self.interpolation, tuple(INTERPOLATIONS))
        _one_of("resize", self.resize, RESIZE_MODES)
        _one_of("crop", self.crop, CROPS)
        _one_of("intensity", self.intensity, INTENSITIES)
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise PreprocessingError("size", f"size: whole pixels >= 1, got {self.size!r}")
        problem = percentile_pair_problem(list(self.percentiles))
        if problem:
            raise PreprocessingError("percentiles", f"percentiles: {problem}")
        for name in ("percentiles", "crop_margin", "clahe_clip"):
            _declared_range(name, getattr(self, name))
        if self.window is not None and not self.window[1] > 0:
            raise PreprocessingError(
                "window", f"window: width must be > 0 Hounsfield units, got {self.window[1]}"
            )

    @classmethod
    def from_params(
        cls, resize: ResizeParams, image_size: int, window: WindowParams | None = None
    ) -> Preprocessing:
        """From params.yaml: the `resize` group, `base.image_size` and `ingest.window` (None:
        no DICOM window, enough for slices ingest already stored as PNG).

        Raises:
            SettingsError: a value out of range, named by its params key.
        """
        try:
            return cls(
                size=image_size,
                interpolation=resize.interpolation,
                resize=resize.mode,
                crop=resize.crop,
                crop_margin=float(resize.crop_margin),
                intensity=resize.intensity,
                percentiles=_pair(resize.percentiles, "percentiles"),
                clahe_clip=float(resize.clahe_clip),
                window=None if window is None else (float(window.level), float(window.width)),
            )
        except PreprocessingError as exc:
            where = {"size": "base.image_size", "window": "ingest.window", "resize": "resize.mode"}
            name = where.get(exc.key, f"resize.{exc.key}")
            raise SettingsError(f"{name}{str(exc)[len(exc.key) :]}") from None

    def to_card(self) -> dict[str, Any]:
        """The card's `image_size` and `preprocessing` entries (merged into model.json)."""
        spec: dict[str, Any] = {
            "decode": CARD_NOTES["decode"],
            "resize": self.resize,
            "interpolation": self.interpolation,
            "input": CARD_NOTES["input"],
            "crop": self.crop,
            "crop_margin": self.crop_margin,
            "intensity": self.intensity,
            "percentiles": list(self.percentiles),
            "clahe_clip": self.clahe_clip,
        }
        if self.window is not None:
            spec["window"] = {"level": self.window[0], "width": self.window[1]}
        return {"image_size": self.size, "preprocessing": spec}

    @classmethod
    def from_card(cls, card: Mapping[str, Any]) -> Preprocessing:
        """From a model card (its `image_size` and `preprocessing`).

        Cards promoted before a setting existed read as the model was trained: without `crop`
        and `intensity` no normalisation, without `window` no DICOM window (serving then uses
        params ingest.window), without `preprocessing` a plain stretched resize.

        Raises:
            PreprocessingError: a key this version cannot reproduce or a value of the wrong
                type or range, named as `preprocessing.<key>`.
        """
        spec = card.get("preprocessing") or {}
        if not isinstance(spec, Mapping):
            raise PreprocessingError(
                "preprocessing", f"card preprocessing must be an object, got {spec!r}"
            )
        unknown = sorted(set(spec) - set(_CARD_KEYS) - set(CARD_NOTES))
        if unknown:
            raise PreprocessingError(
                unknown[0],
                f"card preprocessing.{unknown[0]} is not a setting this version of chestct can "
                "reproduce; serve the model with the version that promoted it, or promote it "
                "again",
            )
        try:
            return cls(
                size=_whole(card.get("image_size"), "image_size"),
                interpolation=_text(spec.get("interpolation", "area"), "interpolation"),
                resize=_text(spec.get("resize", "stretch"), "resize"),
                crop=_text(spec.get("crop", "none"), "crop"),
                crop_margin=_number(spec.get("crop_margin", 0.02), "crop_margin"),
                intensity=_text(spec.get("intensity", "none"), "intensity"),
                percentiles=_pair(spec.get("percentiles", (1.0, 99.5)), "percentiles"),
                clahe_clip=_number(spec.get("clahe_clip", 2.0), "clahe_clip"),
                window=_window(spec.get("window")),
            )
        except PreprocessingError as exc:
            where = "card " if exc.key in ("image_size", "size") else "card preprocessing."
            raise PreprocessingError(exc.key, f"{where}{exc}") from None

    def with_size(self, size: int) -> Preprocessing:
        """The same settings at another input size (a model trained at another image_size)."""
        return dataclasses.replace(self, size=size)


def _declared_range(key: str, value: Any) -> None:
    """Hold a value against the range params `resize.<key>` declares (chestct.settings)."""
    try:
        check_bounds(list(value) if isinstance(value, tuple) else value,
                     _RESIZE_RULES[key], float, key)  # fmt: skip
    except SettingsError as exc:
        raise PreprocessingError(key, str(exc)) from None


def _one_of(key: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise PreprocessingError(key, f"{key} {value!r} is not one of {', '.join(allowed)}")


def _text(value: object, key: str) -> str:
    if not isinstance(value, str):
        raise PreprocessingError(key, f"{key}: a string, got {value!r}")
    return value


def _number(value: object, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PreprocessingError(key, f"{key}: a number, got {value!r}")
    return float(value)


def _whole(value: object, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PreprocessingError(key, f"{key}: a whole number, got {value!r}")
    return value


def _pair(value: object, key: str) -> tuple[float, float]:
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise PreprocessingError(key, f"{key}: a pair [low, high], got {value!r}")
    return (_number(value[0], key), _number(value[1], key))


def _window(value: object) -> tuple[float, float] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping) or set(value) != {"level", "width"}:
        raise PreprocessingError("window", f"window: an object {{level, width}}, got {value!r}")
    return (_number(value["level"], "window"), _number(value["width"], "window"))


@dataclass(frozen=True)
class Prepared:
    """The model input and where in the original slice it came from."""

    image: np.ndarray  # uint8 size x size
    box: BodyBox  # the region of the original slice that was resized (whole frame: no crop)
    # The body box as found (no margin) when the crop looked for one: monitoring reuses it
    # (chestct.monitoring.signals.image_signals) rather than looking for the body a second time.
    body: BodyBox | None = None


def percentile_window(grey: np.ndarray, low: float, high: float) -> np.ndarray:
    """Stretch grey levels so the `low`..`high` percentiles span 0..255 (clipped outside).

    Percentiles come from the histogram (uint8 has 256 levels), far cheaper than sorting."""
    hist = np.bincount(grey.ravel(), minlength=256).cumsum()
    total = hist[-1]
    lo = int(np.searchsorted(hist, total * low / 100.0, side="left"))
    hi = int(np.searchsorted(hist, total * high / 100.0, side="left"))
    if hi - lo < PERCENTILE_MIN_SPREAD:
        # A near-blank slice: stretching would turn its noise into contrast, and validate's
        # near-blank check (the std of the resized slice) would no longer see it.
        return grey
    lut = np.clip(np.rint((np.arange(256) - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)
    return cv2.LUT(grey, lut)


def equalize(grey: np.ndarray) -> np.ndarray:
    """Histogram equalisation: each grey level becomes its rank in the slice.

    A rank does not change under any increasing grey-level map, so a gamma, window or contrast
    change of the acquisition leaves the output nearly as it was; the percentile window undoes
    only linear ones. A near-blank slice is left as it is, as in `percentile_window`."""
    hist = np.bincount(grey.ravel(), minlength=256).cumsum()
    total = hist[-1]
    lo = int(np.searchsorted(hist, total * 0.01, side="left"))
    hi = int(np.searchsorted(hist, total * 0.995, side="left"))
    if hi - lo < PERCENTILE_MIN_SPREAD:
        return grey
    return cv2.equalizeHist(grey)


def normalise_intensity(grey: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """The grey-level normalisation of `prep.intensity` on a prepared slice."""
    if prep.intensity == "percentile":
        return percentile_window(grey, *prep.percentiles)
    if prep.intensity == "equalize":
        return equalize(grey)
    if prep.intensity == "clahe":
        tiles = max(1, min(CLAHE_TILES, min(grey.shape) // 8))
        clahe = cv2.createCLAHE(clipLimit=prep.clahe_clip, tileGridSize=(tiles, tiles))
        return clahe.apply(grey)
    return grey


def prepare_slice(grey: np.ndarray, prep: Preprocessing) -> Prepared:
    """A decoded grey slice -> the model input: body crop, resize, intensity normalisation.

    The intensity is normalised after resizing: the percentiles of the small image are those of
    the crop within a grey level, at a fraction of the cost.
    """
    if prep.crop == "body":
        # The margin goes past the frame's edge, so a body that touches the edge is
        # framed like the same body seen with a wider field (measured on the real slices: the
        # prepared image of a 80 % zoom-out moved 31 % of its spread with the margin clipped
        # at the edge, 8 % this way).
        body: BodyBox | None = body_box(grey, 0.0)
        box = body.grown(prep.crop_margin) if body.found else body
    elif prep.crop == "lungs":
        body, box = None, lung_box(grey, prep.crop_margin)
    else:
        body = None
        box = BodyBox(0, 0, grey.shape[1], grey.shape[0], reason="crop: none")
    image = resize(box.crop(grey), prep.size, prep.interpolation, prep.resize)
    return Prepared(normalise_intensity(image, prep), box, body)


def lung_box(grey: np.ndarray, margin: float) -> BodyBox:
    """The box of `chestct.imaging.lungs.lung_field` grown by `margin` (`resize.crop: lungs`); a
    slice without a lung field is cut to its body box instead, the reason kept."""
    field = lung_field(grey)
    if field.found:
        return BodyBox(field.x, field.y, field.w, field.h).grown(margin)
    body = body_box(grey, 0.0)
    box = body.grown(margin) if body.found else body
    return dataclasses.replace(box, reason=f"no lungs ({field.reason}); body box used")


def map_to_frame(
    values: np.ndarray, box: BodyBox, frame: tuple[int, ...], mode: str = "stretch"
) -> np.ndarray:
    """A map over a prepared image (e.g. a class activation map, any square resolution) put
    back into the original slice's coordinates: float32 (H, W), zero outside what the model saw.

    The inverse of `prepare_slice`'s geometry: the square covers the body box stretched (stretch),
    the box fitted between black bands (pad) or the box's centred square (crop).
    """
    height, width = frame[:2]
    # A canvas wide enough for a box that lies past the frame (the margin), cut back at the end.
    left_pad, top_pad = max(0, -box.x), max(0, -box.y)
    right_pad = max(0, box.x + box.w - width)
    bottom_pad = max(0, box.y + box.h - height)
    out = np.zeros((height + top_pad + bottom_pad, width + left_pad + right_pad), np.float32)
    box = dataclasses.replace(box, x=box.x + left_pad, y=box.y + top_pad)
    values = values.astype(np.float32)
    if mode == "crop" and box.w != box.h:
        side = min(box.w, box.h)
        left, top = box.x + (box.w - side) // 2, box.y + (box.h - side) // 2
        out[top : top + side, left : left + side] = cv2.resize(values, (side, side))
    elif mode == "pad" and box.w != box.h:
        side = max(box.w, box.h)
        full = cv2.resize(values, (side, side))
        top, left = (side - box.h) // 2, (side - box.w) // 2
        out[box.y : box.y + box.h, box.x : box.x + box.w] = full[
            top : top + box.h, left : left + box.w
        ]
    else:
        out[box.y : box.y + box.h, box.x : box.x + box.w] = cv2.resize(values, (box.w, box.h))
    return np.ascontiguousarray(out[top_pad : top_pad + height, left_pad : left_pad + width])


def prepare(data: bytes, prep: Preprocessing) -> np.ndarray:
    """Raw bytes -> uint8 (size, size) grey: the one preprocessing of training and serving.

    DICOM bytes are windowed with `prep.window` (params `ingest.window`) and refused without one.
    """
    return prepare_slice(decode(data, prep.window).grey, prep).image
