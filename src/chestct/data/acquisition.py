"""How a slice was acquired, read from its pixels: framing, zoom and grey levels.

Classes collected on different scanners or exported differently can be told apart without
looking at the anatomy: the body fills less of the frame in one source (a wider zoom, the
scanner table in view), or one class was exported darker. `acquisition_features` measures
those cues per slice so that validate's shortcut detector (chestct.data.shortcuts) can ask whether
they alone predict the class, and so that serving can watch them per request.

Every feature is computed on a copy whose longer side is at most `WORK_SIDE` pixels (the body
box and grey-level percentiles are coarse by nature), so one slice costs about a millisecond
of CPU time whatever its size (bench/acquisition_features.py measures it).

Features (all floats):

- `width`, `height`: the slice's size in pixels;
- `frame_mean`: the slice's mean grey level (0..255) as stored, before any preprocessing;
- `body_share`: area of the body's bounding box (`imaging.body_box`, no margin) over the frame's;
- `body_aspect`: the body box's width over its height;
- `body_found`: 1 when a body was found, 0 when the box fell back to the whole frame;
- `background`: mean grey level (0..255) outside the body box (the 1st percentile of the frame
  when the box fills it);
- `body_p05`, `body_p50`, `body_p95`: grey-level percentiles inside the body box.
"""

from __future__ import annotations

import numpy as np

from chestct.data.manifest import ACQUISITION_COLUMNS
from chestct.imaging.body import body_box, body_features, shrink

WORK_SIDE = 256
# The columns ingest writes beside each content's sha256 (one list: manifest.py).
FEATURES: tuple[str, ...] = ACQUISITION_COLUMNS[1:]


def acquisition_features(grey: np.ndarray) -> dict[str, float]:
    """Acquisition cues of one 8-bit grey slice (see the module docstring for each feature).

    Args:
        grey: uint8 H x W (as `imaging.decode` returns it).

    Raises:
        ValueError: not a 2-D uint8 array.
    """
    if grey.ndim != 2 or grey.dtype != np.uint8 or grey.size == 0:
        raise ValueError(
            f"acquisition_features needs a 2-D uint8 grey slice, got {grey.dtype} {grey.shape}"
        )
    height, width = grey.shape
    small, _ = shrink(grey, WORK_SIDE)
    return {
        "width": float(width),
        "height": float(height),
        "frame_mean": round(float(small.mean()), 3),
        **body_features(small, body_box(small, margin=0.0)),
    }
