"""Decoded grey slice -> the model's input: crop, resize to a square, normalise intensity.

`prepare` (bytes) and `prepare_slice` (grey) are the one preprocessing of training and serving,
so a slice is seen the same way in both; `Normalise` carries params `resize.crop`,
`resize.intensity` and their knobs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import cv2
import numpy as np

from chestct.imaging.body import BodyBox, body_box
from chestct.imaging.decoding import decode
from chestct.imaging.lungs import lung_field

INTERPOLATIONS = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR, "cubic": cv2.INTER_CUBIC}

# How a slice that is not square becomes square (params `resize.mode`).
RESIZE_MODES: tuple[str, ...] = ("stretch", "pad", "crop")


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
CROPS: tuple[str, ...] = ("body", "lungs", "none")
INTENSITIES: tuple[str, ...] = ("percentile", "equalize", "clahe", "none")
CLAHE_TILES = 8  # tiles per side of the prepared image
# A slice whose percentile window spans fewer grey levels is near-blank and left as it is.
PERCENTILE_MIN_SPREAD = 32


@dataclass(frozen=True)
class Normalise:
    """What makes slices from different acquisitions alike before the model sees them.

    The defaults here do nothing (the behaviour of models made before these settings existed);
    params `resize` and the model card choose what a pipeline and a served model use.
    """

    crop: str = "none"  # body: cut to `body_box` first; lungs: to chestct.imaging.lungs' box; none
    crop_margin: float = 0.02  # share of the body box's side added on every side
    intensity: str = "none"  # percentile | equalize | clahe | none
    percentiles: tuple[float, float] = (1.0, 99.5)  # percentile: this window -> 0..255
    clahe_clip: float = 2.0  # clahe: contrast limit

    def __post_init__(self) -> None:
        if self.crop not in CROPS:
            raise ValueError(f"crop {self.crop!r} is not one of {', '.join(CROPS)}")
        if self.intensity not in INTENSITIES:
            raise ValueError(
                f"intensity {self.intensity!r} is not one of {', '.join(INTENSITIES)}"
            )
        low, high = self.percentiles
        if not 0.0 <= low < high <= 100.0:
            raise ValueError(
                f"percentiles {list(self.percentiles)} must be 0 <= low < high <= 100"
            )
        if not 0.0 <= self.crop_margin <= 0.5:
            raise ValueError(f"crop_margin {self.crop_margin} must be within 0..0.5")
        if self.clahe_clip <= 0:
            raise ValueError(f"clahe_clip {self.clahe_clip} must be > 0")

    def card(self) -> dict[str, object]:
        """The settings as the model card records them."""
        return {
            "crop": self.crop,
            "crop_margin": self.crop_margin,
            "intensity": self.intensity,
            "percentiles": list(self.percentiles),
            "clahe_clip": self.clahe_clip,
        }

    @classmethod
    def from_spec(cls, spec: Mapping[str, object]) -> Normalise:
        """From a card's `preprocessing` or params `resize` (same key names). A card without
        these keys gets no normalisation, which is how its model was trained."""
        pair = spec.get("percentiles", (1.0, 99.5))
        if not isinstance(pair, list | tuple) or len(pair) != 2:
            raise ValueError(f"percentiles {pair!r} must be a pair [low, high]")
        low, high = pair
        return cls(
            crop=str(spec.get("crop", "none")),
            crop_margin=float(spec.get("crop_margin", cls.crop_margin)),  # type: ignore[arg-type]
            intensity=str(spec.get("intensity", "none")),
            percentiles=(float(low), float(high)),
            clahe_clip=float(spec.get("clahe_clip", cls.clahe_clip)),  # type: ignore[arg-type]
        )


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


def normalise_intensity(grey: np.ndarray, normalise: Normalise) -> np.ndarray:
    """The grey-level normalisation of `normalise.intensity` on a prepared slice."""
    if normalise.intensity == "percentile":
        return percentile_window(grey, *normalise.percentiles)
    if normalise.intensity == "equalize":
        return equalize(grey)
    if normalise.intensity == "clahe":
        tiles = max(1, min(CLAHE_TILES, min(grey.shape) // 8))
        clahe = cv2.createCLAHE(clipLimit=normalise.clahe_clip, tileGridSize=(tiles, tiles))
        return clahe.apply(grey)
    return grey


def prepare_slice(
    grey: np.ndarray,
    size: int,
    interpolation: str = "area",
    mode: str = "stretch",
    normalise: Normalise = Normalise(),
) -> Prepared:
    """A decoded grey slice -> the model input: body crop, resize, intensity normalisation.

    The intensity is normalised after resizing: the percentiles of the small image are those of
    the crop within a grey level, at a fraction of the cost.
    """
    if normalise.crop == "body":
        # The margin goes past the frame's edge, so a body that touches the edge is
        # framed like the same body seen with a wider field (measured on the real slices: the
        # prepared image of a 80 % zoom-out moved 31 % of its spread with the margin clipped
        # at the edge, 8 % this way).
        body: BodyBox | None = body_box(grey, 0.0)
        box = body.grown(normalise.crop_margin) if body.found else body
    elif normalise.crop == "lungs":
        body, box = None, lung_box(grey, normalise.crop_margin)
    else:
        body = None
        box = BodyBox(0, 0, grey.shape[1], grey.shape[0], reason="crop: none")
    image = resize(box.crop(grey), size, interpolation, mode)
    return Prepared(normalise_intensity(image, normalise), box, body)


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


def prepare(
    data: bytes,
    size: int,
    interpolation: str = "area",
    *,
    mode: str = "stretch",
    window: tuple[float, float] | None = None,
    normalise: Normalise = Normalise(),
) -> np.ndarray:
    """Raw bytes -> uint8 (size, size) grey: the one preprocessing of training and serving.

    `mode` is params `resize.mode`, `normalise` params `resize.crop`/`intensity`/...; `window`
    is params `ingest.window` (level, width), used only for DICOM bytes.
    """
    return prepare_slice(decode(data, window).grey, size, interpolation, mode, normalise).image
