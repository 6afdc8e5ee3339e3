"""The painted anatomy of a synthetic chest-CT slice: body, lungs, mediastinum, lesions.

`anatomy` draws one patient's chest in a canonical frame (on a 256 px design canvas scaled to
the requested size) and returns where the lungs are; `paint_lesion` adds the lesion pattern of a
class relative to them. chestct.data.synthetic turns both into slices. Every draw comes from
the generator it is given, in a fixed order: the same seed paints the same slice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from chestct.labels import CLASSES

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
REF = 256.0
_SUB = 4  # sub-pixel bits for cv2 drawing, so positions are not snapped to whole pixels
_SUBF = float(1 << _SUB)


@dataclass(frozen=True)
class Lung:
    """Where one lung sits in the canonical frame; lesions are placed relative to it."""

    cx: float
    cy: float
    ax: float  # half-width
    ay: float  # half-height
    lat: float  # -1 for the image-left lung, +1 for the image-right one (lateral direction)
    mask: np.ndarray  # float32 alpha of the lung field


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


def smooth_field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
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


def paint_lesion(
    label: str, rng: np.random.Generator, img: np.ndarray, lungs: list[Lung], k: float
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
        raise ValueError(f"unknown label {label!r}; expected one of {CLASSES}")


def anatomy(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[Lung]]:
    """Body, lungs, mediastinum and spine in a canonical frame; returns image and lung info."""
    k = size / REF
    c = size / 2.0
    img = np.zeros((size, size), np.float32)
    a, b, fat = _chest_wall(img, rng, size, c, k)
    mediastinum = _Mediastinum.draw(rng, c, k, a, b)
    lungs = _lungs(img, rng, size, c, k, a, b, mediastinum.block(size, k))
    _mediastinum_and_spine(img, rng, mediastinum, c, k, b, fat)
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


def _chest_wall(
    img: np.ndarray, rng: np.random.Generator, size: int, c: float, k: float
) -> tuple[float, float, float]:
    """Fat, muscle and ribs; returns the body's half-width, half-height and fat thickness."""
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
    return a, b, fat


@dataclass(frozen=True)
class _Mediastinum:
    """Where the heart, aorta, spine and anterior mediastinum sit."""

    heart: tuple[float, float]
    heart_ax: tuple[float, float]
    heart_ang: float
    spine_y: float
    spine_r: float
    aorta: tuple[float, float]
    aorta_r: float
    c: float
    a: float
    b: float

    @classmethod
    def draw(
        cls, rng: np.random.Generator, c: float, k: float, a: float, b: float
    ) -> _Mediastinum:
        heart = (c + rng.uniform(0.08, 0.16) * a, c - rng.uniform(0.05, 0.15) * b)
        heart_ax = (rng.uniform(0.24, 0.30) * a, rng.uniform(0.32, 0.40) * b)
        heart_ang = rng.uniform(20.0, 40.0)
        spine_y = c + 0.62 * b
        spine_r = rng.uniform(0.12, 0.15) * b
        aorta = (c + 0.14 * a, spine_y - 1.6 * spine_r)
        aorta_r = rng.uniform(0.06, 0.08) * a
        return cls(heart, heart_ax, heart_ang, spine_y, spine_r, aorta, aorta_r, c, a, b)

    def block(self, size: int, k: float) -> np.ndarray:
        """The float alpha of the mediastinal structures that carve each lung's medial edge."""
        c, a, b = self.c, self.a, self.b
        block_u8 = np.zeros((size, size), np.uint8)
        for (bx, by), (bax, bay), bang in (
            (self.heart, (self.heart_ax[0] + 5 * k, self.heart_ax[1] + 5 * k), self.heart_ang),
            (self.aorta, (self.aorta_r + 4 * k, self.aorta_r + 4 * k), 0.0),
            ((c, self.spine_y), (self.spine_r + 6 * k, self.spine_r + 10 * k), 0.0),
            ((c, c - 0.55 * b), (0.10 * a, 0.35 * b), 0.0),  # anterior mediastinum
        ):
            axes = (round(bax * _SUBF), round(bay * _SUBF))
            cv2.ellipse(block_u8, _pt(bx, by), axes, bang, 0, 360, 255, -1, cv2.LINE_AA, _SUB)
        return block_u8.astype(np.float32) * (1.0 / 255.0)


def _lungs(
    img: np.ndarray,
    rng: np.random.Generator,
    size: int,
    c: float,
    k: float,
    a: float,
    b: float,
    block: np.ndarray,
) -> list[Lung]:
    """Both lung fields with their bronchovascular trees, painted into `img`."""
    texture = smooth_field(rng, size, 8)
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
        lung = Lung(lcx, lcy, lax, lay, lat, mask)
        _vessels(vessels, rng, lung, k)
        lungs.append(lung)

    lung_all = np.maximum(lungs[0].mask, lungs[1].mask)
    _paint(img, vessels.astype(np.float32) * (0.6 / 255.0) * lung_all, _VESSEL)
    return lungs


def _vessels(vessels: np.ndarray, rng: np.random.Generator, lung: Lung, k: float) -> None:
    """Bronchovascular tree fanning out from the hilum, plus vessels seen end-on."""
    lcx, lcy, lax, lay, lat = lung.cx, lung.cy, lung.ax, lung.ay, lung.lat
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


def _mediastinum_and_spine(
    img: np.ndarray,
    rng: np.random.Generator,
    m: _Mediastinum,
    c: float,
    k: float,
    b: float,
    fat: float,
) -> None:
    """Heart, aorta, vertebra and sternum over the lungs."""
    _stamp(img, *m.heart, *m.heart_ax, m.heart_ang, _HEART + rng.uniform(-0.03, 0.03))
    _stamp(img, *m.aorta, m.aorta_r, m.aorta_r, 0.0, _HEART + 0.05)
    # Vertebra: cortical ring, cancellous body, canal and spinous process.
    spine_y, spine_r = m.spine_y, m.spine_r
    _stamp(img, c, spine_y, spine_r, spine_r * 0.9, 0.0, _BONE)
    _stamp(img, c, spine_y, spine_r * 0.75, spine_r * 0.65, 0.0, _BONE - 0.07)
    canal_y = spine_y + spine_r * 1.35
    _stamp(img, c, canal_y + 5 * k, 0.5 * spine_r, 0.8 * spine_r, 0.0, _BONE)
    _stamp(img, c, canal_y, 0.45 * spine_r, 0.4 * spine_r, 0.0, _MUSCLE - 0.08)
    _stamp(img, c, canal_y + 1.3 * spine_r, 2.5 * k, 0.7 * spine_r, 0.0, _BONE)
    # Sternum, anterior midline.
    _stamp(img, c, c - b + fat + 5 * k, 7 * k, 3 * k, 0.0, _BONE - 0.05)
