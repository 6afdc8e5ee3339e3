"""Acquisition perturbations: the shifts a slice from another scanner, protocol or export shows.

Each function takes an 8-bit grey slice (H x W, the decoded original, before any preprocessing)
and returns another 8-bit grey slice of the same size. `SHIFTS` is the fixed, documented set
that evaluate's shift-stress test scores the test split under; monitoring and tests reuse the
same functions. Everything is pure NumPy/OpenCV and
deterministic: the only randomness (noise) comes from a generator seeded per image
(`image_seed`), so a shift-stress score is reproducible byte for byte.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np


def _check(grey: np.ndarray) -> np.ndarray:
    if grey.ndim != 2 or grey.dtype != np.uint8 or grey.size == 0:
        raise ValueError(
            f"a perturbation takes an 8-bit grey slice (H x W uint8), got {grey.dtype} "
            f"{grey.shape}"
        )
    return grey


def zoom_out(grey: np.ndarray, fraction: float) -> np.ndarray:
    """The slice shrunk to `fraction` of each side, centred in the same frame on black.

    A wider field of view (or a smaller patient): the body fills less of the picture.
    """
    grey = _check(grey)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"zoom_out fraction must be in (0, 1], got {fraction}")
    height, width = grey.shape
    new_w, new_h = max(1, round(width * fraction)), max(1, round(height * fraction))
    small = cv2.resize(grey, (new_w, new_h), interpolation=cv2.INTER_AREA)
    out = np.zeros_like(grey)
    top, left = (height - new_h) // 2, (width - new_w) // 2
    out[top : top + new_h, left : left + new_w] = small
    return out


def aspect(grey: np.ndarray, ratio: float) -> np.ndarray:
    """The anatomy's width scaled by `ratio` inside the same frame: narrower on black side
    margins (ratio < 1) or wider with its sides cut off (ratio > 1).

    Another pixel spacing or reconstruction field: the body's proportions change relative to
    the frame, which a plain resize (even `stretch`) does not undo.
    """
    grey = _check(grey)
    if ratio <= 0:
        raise ValueError(f"aspect ratio must be positive, got {ratio}")
    height, width = grey.shape
    new_w = max(1, round(width * ratio))
    flag = cv2.INTER_AREA if ratio < 1 else cv2.INTER_LINEAR
    scaled = cv2.resize(grey, (new_w, height), interpolation=flag)
    if new_w >= width:
        left = (new_w - width) // 2
        return np.ascontiguousarray(scaled[:, left : left + width])
    out = np.zeros_like(grey)
    left = (width - new_w) // 2
    out[:, left : left + new_w] = scaled
    return out


def gamma(grey: np.ndarray, exponent: float) -> np.ndarray:
    """Grey levels through a power curve (x/255)^exponent: another window or display LUT.

    Below 1 brightens the mid-tones, above 1 darkens them; black and white stay put.
    """
    grey = _check(grey)
    if exponent <= 0:
        raise ValueError(f"gamma exponent must be positive, got {exponent}")
    lut = np.round(255.0 * (np.arange(256) / 255.0) ** exponent).astype(np.uint8)
    return cv2.LUT(grey, lut)


def blur(grey: np.ndarray, sigma_fraction: float) -> np.ndarray:
    """Gaussian blur with sigma = `sigma_fraction` of the frame's longer side.

    Relative to the frame, so that a slice exported at 512 px and one at 256 px lose the same
    detail once resized (a soft reconstruction kernel, a thicker slice).
    """
    grey = _check(grey)
    sigma = max(sigma_fraction * max(grey.shape), 0.1)
    return cv2.GaussianBlur(grey, (0, 0), sigma)


def jpeg(grey: np.ndarray, quality: int) -> np.ndarray:
    """The slice after a lossy JPEG round trip at `quality` (1-100): a re-exported image."""
    grey = _check(grey)
    if not 1 <= quality <= 100:
        raise ValueError(f"jpeg quality must be in [1, 100], got {quality}")
    ok, buf = cv2.imencode(".jpg", grey, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError("OpenCV could not encode the slice as JPEG")
    return cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE)


def noise(grey: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Additive Gaussian noise of `sigma` grey levels, clipped to [0, 255]: a low-dose scan."""
    grey = _check(grey)
    noisy = grey.astype(np.float32) + rng.normal(0.0, sigma, grey.shape).astype(np.float32)
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class Shift:
    """One named perturbation of the stress set; `name` is a metrics.json key (no dots)."""

    name: str
    description: str
    apply: Callable[[np.ndarray, np.random.Generator], np.ndarray]


# The fixed stress set, in the order the picture shows it. Names are metric keys:
# metrics.json's shift.<name>.macro_f1. Change a definition and the shift metrics change, so
# keep them as they are unless the README's table changes with them.
SHIFTS: tuple[Shift, ...] = (
    Shift("zoom_80", "slice at 80 % of the frame, black margin", lambda g, r: zoom_out(g, 0.8)),
    Shift("zoom_60", "slice at 60 % of the frame, black margin", lambda g, r: zoom_out(g, 0.6)),
    Shift("aspect_080", "anatomy width x 0.8, black sides", lambda g, r: aspect(g, 0.8)),
    Shift("aspect_125", "anatomy width x 1.25, sides cut", lambda g, r: aspect(g, 1.25)),
    Shift("gamma_070", "gamma 0.7 (brighter mid-tones)", lambda g, r: gamma(g, 0.7)),
    Shift("gamma_140", "gamma 1.4 (darker mid-tones)", lambda g, r: gamma(g, 1.4)),
    Shift("blur", "Gaussian blur, sigma 1 % of the longer side", lambda g, r: blur(g, 0.01)),
    Shift("jpeg_q30", "JPEG round trip at quality 30", lambda g, r: jpeg(g, 30)),
    Shift("noise_8", "additive Gaussian noise, sigma 8 grey levels", lambda g, r: noise(g, 8, r)),
)
SHIFT_NAMES: tuple[str, ...] = tuple(s.name for s in SHIFTS)
STRESS_SEED = 11  # fixed: the stress set is the same for every run and every model


def image_seed(key: str, shift: str, seed: int = STRESS_SEED) -> np.random.Generator:
    """The generator for one image under one shift: from a fixed seed and the image's key
    (its content digest), so the result depends on neither the order nor the batch, nor on
    params base.seed (a champion and a candidate see the very same perturbed images)."""
    return np.random.default_rng([seed, zlib.crc32(key.encode()), zlib.crc32(shift.encode())])


def apply_shift(name: str, grey: np.ndarray, key: str, seed: int = STRESS_SEED) -> np.ndarray:
    """The shift `name` of SHIFTS applied to one slice, seeded by (`seed`, `key`)."""
    for shift in SHIFTS:
        if shift.name == name:
            return shift.apply(grey, image_seed(key, name, seed))
    raise ValueError(f"unknown shift {name!r}; the stress set is {', '.join(SHIFT_NAMES)}")
