"""Deterministic synthetic chest-CT slices in the Kaggle "Chest CT-Scan images" folder layout.

The real dataset cannot be shipped with the repository, so tests, CI and demo runs use these
images instead. Each class carries a distinct lesion pattern a small CNN can learn, while the
file metadata (pixel size, colour mode, byte size, mean intensity) is drawn independently of
the class so that no shortcut exists outside the pixels of the lesion itself. An acquisition
shortcut can be switched on (params `ingest.synthetic_shortcut`, off by default) to test that
evaluation and promotion see through one.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from chestct.imaging.perturb import zoom_out
from chestct.labels import CLASSES

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "valid", "test")

LABELS: tuple[str, ...] = CLASSES  # generated in this order (seeds depend on it)

LONG_FOLDERS: dict[str, str] = {
    "adenocarcinoma": "adenocarcinoma_left.lower.lobe_T2_N0_M0_Ib",
    "large_cell_carcinoma": "large.cell.carcinoma_left.hilum_T2_N2_M0_IIIa",
    "squamous_cell_carcinoma": "squamous.cell.carcinoma_left.hilum_T1_N2_M0_IIIa",
    "normal": "normal",
}

SHORT_FOLDERS: dict[str, str] = {
    "adenocarcinoma": "adenocarcinoma",
    "large_cell_carcinoma": "large.cell.carcinoma",
    "squamous_cell_carcinoma": "squamous.cell.carcinoma",
    "normal": "normal",
}

_MODES: tuple[str, ...] = ("L", "RGB", "RGBA")

# The optional acquisition shortcut (ingest.synthetic_shortcut): which class, and how.
SHORTCUT_CLASS = "large_cell_carcinoma"
SHORTCUT_ZOOM = 0.7  # share of the frame the slice keeps, on black
SHORTCUT_GAIN = 0.6  # grey levels scaled by this
# Fast zlib level with a fixed row filter: adaptive filtering dominated generation time.
# Amplitude of a patient's coarse grey-level field (render_slice): at 0.35, a quarter of new
# synthetic patients still had a train slice at thumbnail correlation >= 0.9; at 0.6 (the
# factor clipped to 0.6..1.4), 12 %.
PATIENT_FIELD = 0.6
# Slices of one synthetic patient (generate_synthetic's `series`) differ by this much.
SERIES_SHIFT = 0.03  # share of the side
SERIES_ROTATION = 3.0  # degrees
SERIES_NOISE = 4.0  # grey levels (sd)
_PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_SUB]

# Grey levels of tissues after a lung window, on a 0..1 scale.
_FAT = 0.66
_MUSCLE = 0.78
_LUNG = 0.20
_VESSEL = 0.66
_HEART = 0.80
_BONE = 0.98
_SOLID = 0.80
_AIR = 0.03

# Geometry is designed on a 256 px canvas and scaled to the requested size.
_REF = 256.0
_SUB = 4  # sub-pixel bits for cv2 drawing, so positions are not snapped to whole pixels
_SUBF = float(1 << _SUB)


@dataclass(frozen=True)
class _Lung:
    """Where one lung sits in the canonical frame; lesions are placed relative to it."""

    cx: float
    cy: float
    ax: float  # half-width
    ay: float  # half-height
    lat: float  # -1 for the image-left lung, +1 for the image-right one (lateral direction)
    mask: np.ndarray  # float32 alpha of the lung field


def _folder(split: str, label: str) -> str:
    # The public dataset uses long, staging-annotated names only in train/valid.
    return SHORT_FOLDERS[label] if split == "test" else LONG_FOLDERS[label]


def _pt(x: float, y: float) -> tuple[int, int]:
    return round(x * _SUBF), round(y * _SUBF)


def _ellipse(
    size: int, cx: float, cy: float, ax: float, ay: float, angle: float = 0.0
) -> np.ndarray:
    """Anti-aliased filled ellipse as a float32 alpha mask in 0..1."""
    mask = np.zeros((size, size), np.uint8)
    axes = (max(1, round(ax * _SUBF)), max(1, round(ay * _SUBF)))
    cv2.ellipse(mask, _pt(cx, cy), axes, angle, 0, 360, 255, -1, cv2.LINE_AA, _SUB)
    return mask.astype(np.float32) * (1.0 / 255.0)


def _stamp(
    img: np.ndarray, cx: float, cy: float, ax: float, ay: float, angle: float, value: float
) -> None:
    """Paint a small anti-aliased ellipse, touching only its bounding box (speed)."""
    size = img.shape[0]
    r = max(ax, ay) + 2.0
    x0, y0 = max(0, int(cx - r)), max(0, int(cy - r))
    x1, y1 = min(size, int(cx + r) + 2), min(size, int(cy + r) + 2)
    if x1 <= x0 or y1 <= y0:
        return
    mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
    axes = (max(1, round(ax * _SUBF)), max(1, round(ay * _SUBF)))
    cv2.ellipse(mask, _pt(cx - x0, cy - y0), axes, angle, 0, 360, 255, -1, cv2.LINE_AA, _SUB)
    roi = img[y0:y1, x0:x1]
    roi += mask.astype(np.float32) * (1.0 / 255.0) * (value - roi)


def _polygon(size: int, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Anti-aliased filled polygon as a float32 alpha mask in 0..1."""
    mask = np.zeros((size, size), np.uint8)
    pts = np.stack([np.round(xs * _SUBF), np.round(ys * _SUBF)], axis=1).astype(np.int32)
    cv2.fillPoly(mask, [pts], 255, cv2.LINE_AA, _SUB)
    return mask.astype(np.float32) * (1.0 / 255.0)


def _paint(img: np.ndarray, alpha: np.ndarray, value: float | np.ndarray) -> None:
    img += alpha * (value - img)


def _smooth_field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency random field in roughly -1..1 (texture without per-pixel cost)."""
    coarse = rng.normal(size=(cells, cells)).astype(np.float32)
    return cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)


def _blob(
    rng: np.random.Generator, size: int, cx: float, cy: float, r: float, irregularity: float
) -> np.ndarray:
    """Lobulated closed contour around (cx, cy): a circle with smooth random radial bumps."""
    n = 48
    theta = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    radius = np.ones(n)
    # A few low harmonics give lobulation rather than jagged pixel noise.
    for harmonic in range(2, 6):
        amp = irregularity * rng.uniform(0.3, 1.0) / harmonic**0.5
        radius += amp * np.cos(harmonic * theta + rng.uniform(0.0, 2.0 * np.pi))
    radius = r * np.clip(radius, 0.55, 1.6)
    return _polygon(size, cx + radius * np.cos(theta), cy + radius * np.sin(theta))


def _spicules(
    rng: np.random.Generator,
    size: int,
    cx: float,
    cy: float,
    r: float,
    count: int,
    length: tuple[float, float],
    width: int,
) -> np.ndarray:
    """Thin straight strands radiating from a lesion, as an alpha mask in 0..1."""
    mask = np.zeros((size, size), np.uint8)
    for _ in range(count):
        ang = rng.uniform(0.0, 2.0 * np.pi)
        ln = r + rng.uniform(*length)
        x1, y1 = cx + ln * math.cos(ang), cy + ln * math.sin(ang)
        cv2.line(mask, _pt(cx, cy), _pt(x1, y1), 255, width, cv2.LINE_AA, _SUB)
    return mask.astype(np.float32) * (1.0 / 255.0)


def _lesion(
    label: str, rng: np.random.Generator, img: np.ndarray, lungs: list[_Lung], k: float
) -> None:
    """Paint the class-specific lesion into one lung of the canonical (unrotated) slice."""
    size = img.shape[0]
    lung = lungs[int(rng.integers(2))]
    lx, ly, la, lb, lat = lung.cx, lung.cy, lung.ax, lung.ay, lung.lat

    if label == "adenocarcinoma":
        # Part-solid nodule in the outer, mostly posterior (lower-lobe) lung.
        phi = math.radians(rng.uniform(-20.0, 75.0))
        rho = rng.uniform(0.45, 0.68)
        cx = lx + lat * rho * la * math.cos(phi)
        cy = ly + rho * lb * math.sin(phi)
        halo = rng.uniform(25.0, 33.0) * k
        core = halo * rng.uniform(0.3, 0.4)
        x0, y0 = max(0, int(cx - halo)), max(0, int(cy - halo))
        x1, y1 = min(size, int(cx + halo) + 2), min(size, int(cy + halo) + 2)
        yy, xx = np.ogrid[y0:y1, x0:x1]
        d2 = ((xx - cx) ** 2 + (yy - cy) ** 2) / (halo * halo)
        # Soft-edged ground glass: raised density that fades out, vessels stay visible through it.
        ggo = np.clip(3.0 * (1.0 - d2), 0.0, 1.0).astype(np.float32)
        img[y0:y1, x0:x1] += 0.32 * ggo * lung.mask[y0:y1, x0:x1]
        spic = _spicules(rng, size, cx, cy, core, int(rng.integers(3, 7)), (3 * k, 9 * k), 1)
        _paint(img, spic * lung.mask * 0.8, _SOLID)
        _paint(img, _blob(rng, size, cx, cy, core, 0.2), _SOLID)

    elif label == "large_cell_carcinoma":
        # Big, smooth, homogeneous mass abutting the lateral pleura.
        r = rng.uniform(27.0, 35.0) * k
        phi = math.radians(rng.uniform(-55.0, 60.0))
        rho = float(np.clip(1.0 - 0.75 * r / la, 0.3, 0.75))
        cx = lx + lat * rho * la * math.cos(phi)
        cy = ly + rho * lb * math.sin(phi)
        aspect = rng.uniform(0.85, 1.0)
        _stamp(
            img, cx, cy, r, r * aspect, rng.uniform(0.0, 180.0), _SOLID + rng.uniform(0.10, 0.14)
        )

    elif label == "squamous_cell_carcinoma":
        # Irregular central mass growing out of the hilum, usually cavitated or necrotic.
        r = rng.uniform(22.0, 29.0) * k
        cx = lx - lat * la * rng.uniform(0.2, 0.42)
        cy = ly + lb * rng.uniform(-0.35, 0.15)
        spic = _spicules(rng, size, cx, cy, r, int(rng.integers(4, 8)), (4 * k, 11 * k), 2)
        _paint(img, spic * lung.mask * 0.9, _SOLID)
        _paint(img, _blob(rng, size, cx, cy, r, 0.35), _SOLID - 0.04)
        if rng.random() < 0.85:
            cav = r * rng.uniform(0.5, 0.65)
            ox, oy = rng.uniform(-0.2, 0.2, size=2) * r
            _paint(img, _blob(rng, size, cx + ox, cy + oy, cav, 0.25), _AIR)
        else:
            nec = r * rng.uniform(0.45, 0.6)
            _paint(img, _blob(rng, size, cx, cy, nec, 0.25), _LUNG + 0.08)

    elif label != "normal":
        raise ValueError(f"unknown label {label!r}; expected one of {LABELS}")


def _anatomy(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[_Lung]]:
    """Body, lungs, mediastinum and spine in a canonical frame; returns image and lung info."""
    k = size / _REF
    c = size / 2.0
    img = np.zeros((size, size), np.float32)

    a = rng.uniform(98.0, 114.0) * k  # body half-width
    b = rng.uniform(70.0, 84.0) * k  # body half-height (anterior-posterior)
    fat = rng.uniform(4.0, 11.0) * k
    _paint(img, _ellipse(size, c, c, a, b), _FAT + rng.uniform(-0.03, 0.03))
    muscle = _ellipse(size, c, c, a - fat, b - fat)
    _paint(img, muscle, _MUSCLE + rng.uniform(-0.03, 0.03))

    # Rib cross-sections in the chest wall, bilateral and roughly symmetric.
    ring_a, ring_b = a - fat - 6.0 * k, b - fat - 5.0 * k
    for ang in np.deg2rad(rng.uniform(-6, 6) + np.array([-35, -10, 15, 40, 62, 82])):
        for sgn in (-1.0, 1.0):
            t = ang + rng.uniform(-0.06, 0.06)
            rx, ry = c + sgn * ring_a * math.cos(t), c + ring_b * math.sin(t)
            tang = math.degrees(math.atan2(ring_b * math.cos(t), -sgn * ring_a * math.sin(t)))
            _stamp(img, rx, ry, 4.0 * k, 2.2 * k, tang, _BONE)

    heart = (c + rng.uniform(0.08, 0.16) * a, c - rng.uniform(0.05, 0.15) * b)
    heart_ax = (rng.uniform(0.24, 0.30) * a, rng.uniform(0.32, 0.40) * b)
    heart_ang = rng.uniform(20.0, 40.0)
    spine_y = c + 0.62 * b
    spine_r = rng.uniform(0.12, 0.15) * b
    aorta = (c + 0.14 * a, spine_y - 1.6 * spine_r)
    aorta_r = rng.uniform(0.06, 0.08) * a

    # Mediastinal structures carve the medial outline of each lung.
    block_u8 = np.zeros((size, size), np.uint8)
    for (bx, by), (bax, bay), bang in (
        (heart, (heart_ax[0] + 5 * k, heart_ax[1] + 5 * k), heart_ang),
        (aorta, (aorta_r + 4 * k, aorta_r + 4 * k), 0.0),
        ((c, spine_y), (spine_r + 6 * k, spine_r + 10 * k), 0.0),
        ((c, c - 0.55 * b), (0.10 * a, 0.35 * b), 0.0),  # anterior mediastinum
    ):
        axes = (round(bax * _SUBF), round(bay * _SUBF))
        cv2.ellipse(block_u8, _pt(bx, by), axes, bang, 0, 360, 255, -1, cv2.LINE_AA, _SUB)
    block = block_u8.astype(np.float32) * (1.0 / 255.0)
    texture = _smooth_field(rng, size, 8)
    yy = (np.arange(size, dtype=np.float32)[:, None] - c) / b
    # Dependent (posterior) lung is slightly denser, as in a supine patient.
    lung_tone = _LUNG + 0.025 * texture + 0.04 * np.clip(yy, -1.0, 1.0)
    vessels = np.zeros((size, size), np.uint8)

    lungs = []
    for lat in (-1.0, 1.0):  # -1: image-left lung (patient's right)
        lax = rng.uniform(0.30, 0.34) * a * (0.95 if lat > 0 else 1.0)
        lay = rng.uniform(0.66, 0.74) * b
        lcx = c + lat * rng.uniform(0.42, 0.46) * a
        lcy = c + rng.uniform(-0.04, 0.04) * b
        tilt = lat * rng.uniform(5.0, 15.0)
        mask = _ellipse(size, lcx, lcy, lax, lay, tilt) * (1.0 - block)
        _paint(img, mask, lung_tone)

        # Bronchovascular tree fanning out from the hilum, plus vessels seen end-on.
        hx, hy = lcx - lat * 0.6 * lax, lcy + rng.uniform(-0.1, 0.1) * lay
        for _ in range(int(rng.integers(5, 9))):
            ang = math.atan2(rng.uniform(-1.0, 1.0), lat * rng.uniform(0.2, 1.0))
            x0 = hx + lat * rng.uniform(0.0, 0.25) * lax
            y0, w = hy + rng.uniform(-0.25, 0.25) * lay, 2
            for _ in range(3):
                step = rng.uniform(0.15, 0.35) * lax
                ang += rng.uniform(-0.35, 0.35)
                x1, y1 = x0 + step * math.cos(ang), y0 + step * math.sin(ang)
                cv2.line(
                    vessels, _pt(x0, y0), _pt(x1, y1), 255, max(1, round(w * k)), cv2.LINE_AA, _SUB
                )
                x0, y0, w = x1, y1, max(1, w - 1)
        for _ in range(int(rng.integers(10, 22))):
            px = lcx + rng.uniform(-0.85, 0.85) * lax
            py = lcy + rng.uniform(-0.85, 0.85) * lay
            rr = rng.uniform(0.8, 1.7) * k
            cv2.circle(vessels, _pt(px, py), max(1, round(rr * _SUBF)), 255, -1, cv2.LINE_AA, _SUB)
        lungs.append(_Lung(lcx, lcy, lax, lay, lat, mask))

    lung_all = np.maximum(lungs[0].mask, lungs[1].mask)
    _paint(img, vessels.astype(np.float32) * (0.6 / 255.0) * lung_all, _VESSEL)

    _stamp(img, *heart, *heart_ax, heart_ang, _HEART + rng.uniform(-0.03, 0.03))
    _stamp(img, *aorta, aorta_r, aorta_r, 0.0, _HEART + 0.05)
    # Vertebra: cortical ring, cancellous body, canal and spinous process.
    _stamp(img, c, spine_y, spine_r, spine_r * 0.9, 0.0, _BONE)
    _stamp(img, c, spine_y, spine_r * 0.75, spine_r * 0.65, 0.0, _BONE - 0.07)
    canal_y = spine_y + spine_r * 1.35
    _stamp(img, c, canal_y + 5 * k, 0.5 * spine_r, 0.8 * spine_r, 0.0, _BONE)
    _stamp(img, c, canal_y, 0.45 * spine_r, 0.4 * spine_r, 0.0, _MUSCLE - 0.08)
    _stamp(img, c, canal_y + 1.3 * spine_r, 2.5 * k, 0.7 * spine_r, 0.0, _BONE)
    # Sternum, anterior midline.
    _stamp(img, c, c - b + fat + 5 * k, 7 * k, 3 * k, 0.0, _BONE - 0.05)

    if rng.random() < 0.6:
        ty = c + b + rng.uniform(4.0, 12.0) * k
        cv2.ellipse(
            img,
            _pt(c, ty - 60 * k),
            (round(1.2 * a * _SUBF), round(60 * k * _SUBF)),
            0,
            30,
            150,
            0.55,
            max(1, round(3 * k)),
            cv2.LINE_AA,
            _SUB,
        )
    return img, lungs


def render_slice(
    label: str, rng: np.random.Generator, size: int = 256, patient_field: float = 0.0
) -> np.ndarray:
    """One synthetic grey slice (uint8, size x size) with the lesion pattern of `label`.

    Args:
        label: Canonical class label, one of `LABELS`.
        rng: Source of randomness; only a few draws are taken from it.
        size: Side of the square output in pixels (at least 64).
        patient_field: amplitude of the patient's coarse grey-level field (0: none, the slices
            of earlier versions; generate_synthetic uses PATIENT_FIELD for series of slices).

    Returns:
        A ``(size, size)`` uint8 lung-window slice.
    """
    if label not in LABELS:
        raise ValueError(f"unknown label {label!r}; expected one of {LABELS}")
    if size < 64:
        raise ValueError(f"size must be >= 64, got {size}")
    # Separate streams: with the same rng state, every label gets the same patient and the
    # same noise, so the lesion is the only difference between classes.
    body_rng, lesion_rng, noise_rng, field_rng = (
        np.random.default_rng(int(s)) for s in rng.integers(0, 2**63, size=4)
    )
    k = size / _REF
    img, lungs = _anatomy(body_rng, size)
    base_mean = float(img.mean())
    _lesion(label, lesion_rng, img, lungs, k)
    # A big bright mass raises the mean intensity and would leak the label through it, so the
    # slice is rescaled to the mean of the same patient without the lesion.
    img *= base_mean / max(float(img.mean()), 1e-6)
    # Patients differ in more than their outline: a coarse grey-level field (another build,
    # another inspiration) keeps two synthetic patients from looking like one series to
    # chestct.data.similarity's thumbnails, as two real patients do.
    if patient_field:
        img *= np.clip(1.0 + patient_field * _smooth_field(field_rng, size, 4), 0.6, 1.4)

    c = size / 2.0
    m = cv2.getRotationMatrix2D((c, c), body_rng.uniform(-7.0, 7.0), body_rng.uniform(0.9, 1.06))
    m[:, 2] += body_rng.uniform(-0.05, 0.05, size=2) * size
    img = cv2.warpAffine(
        img,
        m,
        (size, size),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0.0,
    )

    img += noise_rng.normal(0.0, noise_rng.uniform(0.012, 0.03), img.shape).astype(np.float32)
    img = cv2.GaussianBlur(img, (0, 0), noise_rng.uniform(0.6, 1.0) * max(k, 0.5))

    # Export contrast varies between scanners and patients, never with the class.
    gain = body_rng.uniform(0.92, 1.08)
    offset = body_rng.uniform(0.005, 0.05)
    out = np.clip(img * gain + offset, 0.0, 1.0)
    return np.round(out * 255.0).astype(np.uint8)


def export_slice(grey: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Resize and re-mode a rendered slice the way heterogeneous real exports look: 180-520 px
    wide, 0.6-1.0 as high as wide, grey, RGB or RGBA (chestct.cli.samples draws its slices so
    too)."""
    width = int(rng.integers(180, 521))
    height = max(1, round(width * rng.uniform(0.6, 1.0)))
    src = grey.shape[0]
    interp = cv2.INTER_AREA if width <= src and height <= src else cv2.INTER_LINEAR
    img = cv2.resize(grey, (width, height), interpolation=interp)
    mode = _MODES[int(rng.integers(len(_MODES)))]
    if mode == "RGB":
        return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    if mode == "RGBA":
        return cv2.cvtColor(img, cv2.COLOR_GRAY2BGRA)  # alpha is 255: opaque
    return img


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        tmp.replace(path)  # atomic on POSIX: readers never see a half-written PNG
    finally:
        tmp.unlink(missing_ok=True)


def with_shortcut(grey: np.ndarray, label: str, shortcut: str) -> np.ndarray:
    """The slice as the optional acquisition shortcut draws it (params ingest.synthetic_shortcut).

    `zoom`: SHORTCUT_CLASS slices are zoomed out to SHORTCUT_ZOOM of the frame on black (a wider
    field of view); `dark`: their grey levels are scaled by SHORTCUT_GAIN (a darker export).
    The other classes, and every class with shortcut "", are left as they are. Applied in every
    split alike, as when one class was collected on another scanner: a pooled test split then
    rewards a model for recognising the acquisition instead of the lesion.
    """
    if not shortcut or label != SHORTCUT_CLASS:
        return grey
    if shortcut == "zoom":
        return zoom_out(grey, SHORTCUT_ZOOM)
    if shortcut == "dark":
        return np.round(grey.astype(np.float32) * SHORTCUT_GAIN).astype(np.uint8)
    raise ValueError(f"unknown synthetic shortcut {shortcut!r}; use '', 'zoom' or 'dark'")


def series_jitter(grey: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Another slice of the same synthetic patient: the rendered slice shifted by up to
    `SERIES_SHIFT` of its side, turned by up to `SERIES_ROTATION` degrees and given fresh
    noise, as neighbouring slices of one CT series differ (a near-copy, not a copy)."""
    size = grey.shape[0]
    c = size / 2.0
    m = cv2.getRotationMatrix2D((c, c), rng.uniform(-SERIES_ROTATION, SERIES_ROTATION), 1.0)
    m[:, 2] += rng.uniform(-SERIES_SHIFT, SERIES_SHIFT, size=2) * size
    moved = cv2.warpAffine(
        grey.astype(np.float32),
        m,
        (size, size),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=float(grey.min()),
    )
    moved += rng.normal(0.0, SERIES_NOISE, moved.shape).astype(np.float32)
    return np.clip(np.round(moved), 0, 255).astype(np.uint8)


def dataset_slice(
    label: str,
    seq: np.random.SeedSequence,
    patient: np.random.SeedSequence | None = None,
    shortcut: str = "",
) -> np.ndarray:
    """One slice as the embedded dataset's files hold it (exported: grey, RGB or RGBA, not
    square); with `patient` (a series' seed) a jittered slice of that patient, with the
    patient's grey-level field. chestct.cli.samples draws its slices here too, so that they look
    like the embedded dataset to the monitor."""
    render_seq, export_seq = seq.spawn(2)
    if patient is None:
        grey = render_slice(label, np.random.default_rng(render_seq))
    else:
        grey = render_slice(label, np.random.default_rng(patient), patient_field=PATIENT_FIELD)
        grey = series_jitter(grey, np.random.default_rng(render_seq))
    grey = with_shortcut(grey, label, shortcut)
    return export_slice(grey, np.random.default_rng(export_seq))


def _make_one(
    path: Path,
    label: str,
    seq: np.random.SeedSequence,
    shortcut: str = "",
    patient: np.random.SeedSequence | None = None,
) -> Path:
    """One file; `patient` (the series' seed) makes it a jittered slice of that patient."""
    img = dataset_slice(label, seq, patient, shortcut)
    ok, buf = cv2.imencode(".png", img, _PNG_PARAMS)
    if not ok:
        raise RuntimeError(f"PNG encoding failed for {path}")
    _write_atomic(path, buf.tobytes())
    return path


def generate_synthetic(
    out_dir: Path,
    seed: int,
    per_class: Mapping[str, int],
    shortcut: str = "",
    series: int = 1,
) -> list[Path]:
    """Write the synthetic dataset under `out_dir` in the Kaggle folder layout.

    Args:
        out_dir: Root folder; ``<split>/<class folder>/<id>.png`` is created below it.
        seed: Non-negative master seed; the same seed gives byte-identical files.
        per_class: Images per class for each split, e.g.
            ``{"train": 120, "valid": 20, "test": 30}``. Splits left out are skipped.
        shortcut: "" (none), "zoom" or "dark": see `with_shortcut`.
        series: slices per synthetic patient (params `ingest.synthetic_series`): images
            k*series .. k*series + series - 1 of a class and split are near-copies of one
            patient (`series_jitter`); 1 makes every image its own patient.

    Returns:
        Sorted paths of the files written.
    """
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    unknown = set(per_class) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown splits {sorted(unknown)}; expected a subset of {SPLITS}")
    if series < 1:
        raise ValueError(f"series must be at least 1 slice per patient, got {series}")
    for split, count in per_class.items():
        if count < 0:
            raise ValueError(f"negative count for split {split!r}: {count}")

    out_dir = Path(out_dir)
    jobs: list[tuple[Path, str, np.random.SeedSequence, np.random.SeedSequence | None]] = []
    for s_idx, split in enumerate(SPLITS):
        count = int(per_class.get(split, 0))
        for l_idx, label in enumerate(LABELS):
            if count == 0:
                continue
            folder = out_dir / split / _folder(split, label)
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                # Keyed on the image's own coordinates, so changing one count never shifts
                # the content of other images.
                seq = np.random.SeedSequence([seed, s_idx, l_idx, index])
                # Opaque, class-free file name (the folder already carries the label).
                name = f"{int(seq.generate_state(1, np.uint64)[0]):016x}.png"
                patient = None
                if series > 1:
                    patient = np.random.SeedSequence([seed, s_idx, l_idx, index // series, series])
                jobs.append((folder / name, label, seq, patient))

    # cv2 and numpy release the GIL, so threads give real parallelism; every image owns its
    # generator, so the result does not depend on scheduling.
    workers = max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        written = list(
            pool.map(lambda job: _make_one(job[0], job[1], job[2], shortcut, job[3]), jobs)
        )
    logger.info("wrote %d synthetic slices under %s (seed=%d)", len(written), out_dir, seed)
    return sorted(written)
