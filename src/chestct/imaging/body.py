"""Where the body lies in a slice (`body_box`) and the numbers that describe it.

The body box drives the body crop (params `resize.crop`), the acquisition signals of
validate and monitoring (`body_features`) and the thumbnails of the near-copy checks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import cv2
import numpy as np

# Body crop (params `resize.crop`). The mask is worked out on a copy whose longer side is at most
# this many pixels: the box is coarse by nature, and the kernel sizes below were checked on the
# real slices at this scale (a larger work copy left a mottled fat rim outside the box).
_BODY_WORK_SIDE = 256
# Components at least this share of the largest are kept (both halves of a split body).
BODY_KEEP_SHARE = 0.25
# A body box smaller than this share of the frame is a speck, not a body: the frame is kept.
BODY_MIN_SHARE = 0.02
# Where the body threshold lies between the darkest level (0) and Otsu's (1).
BODY_LEVEL = 0.5
# The smallest side (pixels) a slice needs before looking for a body makes sense.
BODY_MIN_SIDE = 16


@dataclass(frozen=True)
class BodyBox:
    """Where the body lies in a slice, in that slice's pixel coordinates.

    `reason` is empty when a body was found; otherwise the box is the whole frame and
    `reason` says why (blank slice, nothing stood out, only a speck...).
    """

    x: int
    y: int
    w: int
    h: int
    reason: str = ""

    @property
    def found(self) -> bool:
        return not self.reason

    def grown(self, margin: float) -> BodyBox:
        """The box with `margin` (a share of its side) added on every side, even past the
        frame's edge: `crop` fills what lies outside with the slice's background."""
        pad_x, pad_y = round(self.w * margin), round(self.h * margin)
        return dataclasses.replace(
            self, x=self.x - pad_x, y=self.y - pad_y, w=self.w + 2 * pad_x, h=self.h + 2 * pad_y
        )

    def crop(self, grey: np.ndarray) -> np.ndarray:
        """The part of `grey` inside the box. Where the box lies past the frame, the slice's
        darkest level fills it (its background: black, or the grey an export lifted it to)."""
        height, width = grey.shape[:2]
        x0, y0 = max(0, self.x), max(0, self.y)
        x1, y1 = min(width, self.x + self.w), min(height, self.y + self.h)
        inside = grey[y0:y1, x0:x1]
        if (x0 - self.x, y0 - self.y, self.x + self.w - x1, self.y + self.h - y1) == (0, 0, 0, 0):
            return inside
        return cv2.copyMakeBorder(
            inside,
            y0 - self.y,
            self.y + self.h - y1,
            x0 - self.x,
            self.x + self.w - x1,
            cv2.BORDER_CONSTANT,
            value=int(grey.min()),
        )


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """A 0/255 mask with every region the background cannot reach filled (the dark lungs
    inside the body), so the body is one solid blob."""
    padded = cv2.copyMakeBorder(mask, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    reach = padded.copy()
    flood = np.zeros((padded.shape[0] + 2, padded.shape[1] + 2), np.uint8)
    cv2.floodFill(reach, flood, (0, 0), 255)
    return (padded | ~reach)[1:-1, 1:-1]


def shrink(grey: np.ndarray, side: int) -> tuple[np.ndarray, float]:
    """`grey` scaled down (area interpolation) so its longer side is at most `side`, and the
    scale used (1.0: returned as it is)."""
    height, width = grey.shape[:2]
    scale = min(1.0, side / max(height, width))
    if scale >= 1.0:
        return grey, 1.0
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(grey, size, interpolation=cv2.INTER_AREA), scale


# Below this share of the frame outside the body box, "background" is the frame's darkest grey.
_MIN_OUTSIDE = 0.01


def grey_percentiles(values: np.ndarray, quantiles: tuple[float, ...]) -> list[float]:
    """Percentiles of uint8 values through a histogram (cheaper than sorting)."""
    counts = np.bincount(values.reshape(-1), minlength=256)
    cumulative = np.cumsum(counts)
    total = int(cumulative[-1])
    return [float(np.searchsorted(cumulative, q * total, side="left")) for q in quantiles]


def body_features(grey: np.ndarray, box: BodyBox) -> dict[str, float]:
    """How the body sits in the frame and its grey levels, given its box in `grey`'s
    coordinates (within the frame): the acquisition cues of chestct.data.acquisition (ingest,
    validate) and chestct.monitoring.signals (serving, the reference profile), one implementation.

    Returns body_share (box area over the frame's), body_aspect (box width over height),
    body_found, background (mean grey outside the box; the frame's 1st percentile when the box
    fills it) and body_p05/p50/p95 (grey-level percentiles inside the box).
    """
    inside = box.crop(grey)
    outside = grey.size - inside.size
    if outside >= _MIN_OUTSIDE * grey.size:
        background = (float(grey.sum(dtype=np.int64)) - float(inside.sum(dtype=np.int64))) / (
            outside
        )
    else:
        background = grey_percentiles(grey, (0.01,))[0]
    p05, p50, p95 = grey_percentiles(inside, (0.05, 0.50, 0.95))
    return {
        "body_share": round(inside.size / grey.size, 4),
        "body_aspect": round(box.w / max(box.h, 1), 4),
        "body_found": float(box.found),
        "background": round(background, 3),
        "body_p05": p05,
        "body_p50": p50,
        "body_p95": p95,
    }


def body_box(grey: np.ndarray, margin: float = 0.02) -> BodyBox:
    """The bounding box of the body in a grey CT slice, or the whole frame and why.

    The body is what stands out from the dark surround: a light blur, a threshold halfway
    between the darkest level and Otsu's (`BODY_LEVEL`), then a round opening that removes thin
    strokes (burned-in text, rulers, the scanner table seen edge-on), the holes (lungs) filled,
    and a tall thin opening that removes any band flatter than about 6 % of the frame (a thicker
    table under the body) while the filled body is far taller. Connected components at least
    `BODY_KEEP_SHARE` of the largest are kept together, so a body the threshold split in two
    keeps both halves.

    Args:
        grey: uint8 H x W.
        margin: added on every side, as a share of the box's side, clipped to the frame
            (`prepare` asks for 0 and grows the box past the frame with `BodyBox.grown`).
    """
    height, width = grey.shape[:2]
    whole = BodyBox(0, 0, width, height)
    if min(height, width) < BODY_MIN_SIDE:
        return dataclasses.replace(
            whole, reason=f"slice too small ({width}x{height} px) to look for a body"
        )
    small, scale = shrink(grey, _BODY_WORK_SIDE)
    small = cv2.GaussianBlur(small, (5, 5), 0)
    low, high = int(small.min()), int(small.max())
    if high - low < 10:
        level = "black" if high < 128 else "bright"
        return dataclasses.replace(
            whole,
            reason=f"slice is uniformly {level} (grey {low:.0f}..{high:.0f}): no body to find",
        )
    otsu, _ = cv2.threshold(small, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    # Below Otsu's level, nearer the background: Otsu alone splits a soft-tissue-window slice
    # between fat and muscle and keeps only the mediastinum of a body with a mottled fat rim.
    _, mask = cv2.threshold(small, low + (otsu - low) * BODY_LEVEL, 255, cv2.THRESH_BINARY)
    share = float(np.count_nonzero(mask)) / mask.size
    if share > 0.97:
        return dataclasses.replace(
            whole, reason=f"{share:.0%} of the slice is bright: no dark surround around a body"
        )
    # Thin strokes go before the holes are filled, so a table that touches the body cannot
    # close a pocket under it that the filling would then count as body.
    round_k = max(3, round(min(small.shape) * 0.03) | 1)
    mask = cv2.morphologyEx(
        mask, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (round_k, round_k))
    )
    mask = _fill_holes(mask)
    tall_k = max(3, round(small.shape[0] * 0.06) | 1)
    mask = cv2.morphologyEx(
        mask, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_RECT, (1, tall_k))
    )
    # 4-connectivity: half the time of 8 here, and the opened mask has no diagonal-only links.
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=4)
    if count <= 1:
        return dataclasses.replace(
            whole, reason="nothing but thin strokes stood out from the background: no body"
        )
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = stats[1:][areas >= BODY_KEEP_SHARE * areas.max()]
    left = int(keep[:, cv2.CC_STAT_LEFT].min())
    top = int(keep[:, cv2.CC_STAT_TOP].min())
    right = int((keep[:, cv2.CC_STAT_LEFT] + keep[:, cv2.CC_STAT_WIDTH]).max())
    bottom = int((keep[:, cv2.CC_STAT_TOP] + keep[:, cv2.CC_STAT_HEIGHT]).max())
    # Back to the slice's own pixels, rounding outwards.
    x0, y0 = int(np.floor(left / scale)), int(np.floor(top / scale))
    x1 = min(width, int(np.ceil(right / scale)))
    y1 = min(height, int(np.ceil(bottom / scale)))
    box_share = (x1 - x0) * (y1 - y0) / (width * height)
    if box_share < BODY_MIN_SHARE:
        return dataclasses.replace(
            whole,
            reason=f"the largest bright region covers only {box_share:.1%} of the slice: "
            "too small to be a body",
        )
    pad_x, pad_y = round((x1 - x0) * margin), round((y1 - y0) * margin)
    x0, y0 = max(0, x0 - pad_x), max(0, y0 - pad_y)
    x1, y1 = min(width, x1 + pad_x), min(height, y1 + pad_y)
    return BodyBox(x0, y0, x1 - x0, y1 - y0)
