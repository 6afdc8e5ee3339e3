"""The lung field of an axial chest CT slice: the large dark air regions inside the body.

One implementation for `resize.crop: lungs` (imaging.prepare_slice crops to the lung box),
validate's non-chest check (a slice with no lung field: an abdomen or pelvis slice) and
evaluate's `attention.lung_share` (the share of the Grad-CAM mass inside the mask).

The mask is worked out on a copy whose longer side is at most `LUNG_WORK_SIDE` pixels:

1. the body: grey levels above the level halfway between the darkest and Otsu's (as
   `imaging.body_box` finds it), thin strokes opened away, holes filled: the body with its
   lungs, not the air around it;
2. air inside the body: below Otsu's level and inside the filled body, so the outside air,
   which the filling never reaches, is not a lung;
3. the lungs: connected air regions of at least `LUNG_PIECE_SHARE` of the body's area,
   together at least `LUNG_MIN_SHARE` of it (the gas in a pelvis or abdomen slice is less).

When no region qualifies the mask is the body (or the whole frame) and `reason` says why.
This module needs only numpy and OpenCV, so imaging can import it without a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

LUNG_WORK_SIDE = 256
# The air regions inside the body (pieces of at least LUNG_PIECE_SHARE) must cover at least
# this share of its area. On the real chest-CT folders (docs/data-checks.md) 7 of 685 slices
# fall below: the valid folder's pelvis slice and upper-abdomen slices; no synthetic slice.
LUNG_MIN_SHARE = 0.03
# Air regions of at least this share of the body count as lung (vessels and a mass cut a lung
# into pieces); smaller ones are specks of gas. 0.8 %: the pelvis's bowel gas stays out, the
# synthetic lungs that a mass or vessels cut apart count (0 of 200 synthetic slices missed).
LUNG_PIECE_SHARE = 0.008
# Where the body threshold lies between the darkest level (0) and Otsu's (1), as for the body box.
_BODY_LEVEL = 0.5
_MIN_SIDE = 16
# Air lies below this level between the darkest grey (0) and Otsu's (1): lung parenchyma
# in a lung window sits near the outside air, fat in a soft-tissue window (a pelvis) above it.
_AIR_LEVEL = 0.6


@dataclass(frozen=True)
class LungField:
    """The lung mask of a slice, in that slice's pixels, and its bounding box.

    `reason` is empty when lungs were found; otherwise the mask is the body (the whole frame
    when no body stood out either) and `reason` says why.
    """

    mask: np.ndarray  # bool H x W
    x: int
    y: int
    w: int
    h: int
    share: float  # the mask's area over the body's (0 when no lungs were found)
    reason: str = ""

    @property
    def found(self) -> bool:
        return not self.reason


def _enclosed(mask: np.ndarray) -> np.ndarray:
    """A 0/255 mask with every region that the frame's border cannot reach filled in."""
    padded = cv2.copyMakeBorder(mask, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    reach = padded.copy()
    flood = np.zeros((padded.shape[0] + 2, padded.shape[1] + 2), np.uint8)
    cv2.floodFill(reach, flood, (0, 0), 255)
    return (padded | ~reach)[1:-1, 1:-1]


def _air_regions(dark: np.ndarray, body: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Connected dark regions inside the body: their label image and areas (label k+1 has
    areas[k])."""
    air = (dark & (body > 0)).astype(np.uint8) * 255
    air = cv2.morphologyEx(air, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    _, labels, stats, _ = cv2.connectedComponentsWithStats(air, connectivity=8)
    return labels, stats[1:, cv2.CC_STAT_AREA].astype(np.int64)


def _air(areas: np.ndarray, body_area: int) -> int:
    """The area of the air regions big enough to be lung (pieces of a lung that vessels or
    a mass cut apart count together; specks of gas do not)."""
    return int(areas[areas >= LUNG_PIECE_SHARE * body_area].sum())


def _hull(bright: np.ndarray) -> np.ndarray | None:
    """The filled convex hull of the bright regions (0/255; thin strokes were opened away),
    or None without any."""
    points = cv2.findNonZero(bright)
    if points is None:
        return None
    hull = np.zeros_like(bright)
    cv2.fillConvexPoly(hull, cv2.convexHull(points), 255)
    return hull


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return 0, 0, mask.shape[1], mask.shape[0]
    return int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)


def _fallback(grey: np.ndarray, body: np.ndarray | None, reason: str) -> LungField:
    height, width = grey.shape[:2]
    if body is None or not body.any():
        mask = np.ones((height, width), bool)
    else:
        mask = cv2.resize(body, (width, height), interpolation=cv2.INTER_NEAREST) > 0
    return LungField(mask, *_box(mask), share=0.0, reason=reason)


def lung_field(grey: np.ndarray) -> LungField:
    """The lung mask of a uint8 H x W slice, or the body and why there are no lungs."""
    if grey.ndim != 2:
        raise ValueError(f"lung_field needs a 2-D grey slice, got shape {grey.shape}")
    height, width = grey.shape
    if min(height, width) < _MIN_SIDE:
        return _fallback(grey, None, f"slice too small ({width}x{height} px) to look for lungs")
    scale = min(1.0, LUNG_WORK_SIDE / max(height, width))
    small = grey
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        small = cv2.resize(grey, size, interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (5, 5), 0)
    low, high = int(small.min()), int(small.max())
    if high - low < 10:
        return _fallback(grey, None, f"slice is uniform (grey {low}..{high}): no lungs to find")
    otsu, _ = cv2.threshold(small, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    _, bright = cv2.threshold(small, low + (otsu - low) * _BODY_LEVEL, 255, cv2.THRESH_BINARY)
    k = max(3, round(min(small.shape) * 0.03) | 1)
    bright = cv2.morphologyEx(
        bright, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    )
    body = _enclosed(bright)
    body_area = int(np.count_nonzero(body))
    if body_area < 0.02 * body.size:
        return _fallback(grey, None, "no body stood out from the background: no lungs to find")
    dark = small < low + (otsu - low) * _AIR_LEVEL
    labels, areas = _air_regions(dark, body)
    if _air(areas, body_area) < LUNG_MIN_SHARE * body_area:
        # A body whose rim the threshold left open (dark fat or skin in a narrow window): the
        # lungs then touch the outside air. The convex hull of the bright body closes the rim.
        hull = _hull(bright)
        if hull is not None:
            body, body_area = hull, max(1, int(np.count_nonzero(hull)))
            labels, areas = _air_regions(dark, body)
    air = _air(areas, body_area)
    if air < LUNG_MIN_SHARE * body_area:
        return _fallback(
            grey,
            body,
            f"the air regions inside the body cover {air / body_area:.1%} of it, under "
            f"{LUNG_MIN_SHARE:.0%}: not a chest slice at lung level",
        )
    keep = 1 + np.flatnonzero(areas >= LUNG_PIECE_SHARE * body_area)
    lungs = np.isin(labels, keep).astype(np.uint8)
    share = float(np.count_nonzero(lungs)) / body_area
    mask = cv2.resize(lungs, (width, height), interpolation=cv2.INTER_NEAREST) > 0
    return LungField(mask, *_box(mask), share=round(share, 4))


def mask_share(weights: np.ndarray, mask: np.ndarray) -> float:
    """The share of the non-negative `weights` (e.g. a Grad-CAM map in the slice's
    coordinates) that lies inside `mask`; NaN when the weights sum to zero."""
    if weights.shape != mask.shape:
        raise ValueError(f"weights {weights.shape} and mask {mask.shape} differ in shape")
    w = np.clip(weights.astype(np.float64), 0.0, None)
    total = float(w.sum())
    return float(w[mask].sum() / total) if total > 0 else float("nan")
