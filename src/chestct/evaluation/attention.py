"""Where the model looks: the share of its Grad-CAM mass inside the lung field.

Evaluate reports `attention.lung_share` on the test split: for every image, the class
activation map of the predicted class (chestct.model.gradcam), put back into the original slice's
coordinates through the crop the model's preprocessing made (`imaging.map_to_frame`, as
/explain does), and the lung field of that original slice (chestct.imaging.lungs, found on the
slice
as acquired rather than on the equalised model input); the share of the map's mass inside the
field, averaged over the images and per true class. A model that reads the chest wall, the
table or the crop's edge scores low however accurate it is. Images without a lung field (the
lungs' fallback) are counted apart, not averaged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from chestct.imaging.body import BodyBox
from chestct.imaging.lungs import lung_field, mask_share
from chestct.imaging.preparation import map_to_frame
from chestct.labels import CLASSES


@dataclass(frozen=True)
class LungAttention:
    """Per image: the share of CAM mass inside the lungs (NaN without a lung field or a CAM),
    and for the pictures the original slices, their lung masks and the CAMs in their frame."""

    shares: np.ndarray
    greys: list[np.ndarray]
    masks: list[np.ndarray]
    heats: list[np.ndarray]

    def summary(self, labels: Sequence[str]) -> dict[str, Any]:
        """metrics.json's `attention` block: lung_share (mean), per class, counts."""
        shares = self.shares
        ok = np.isfinite(shares)
        labels = np.asarray(labels)

        def mean(picked: np.ndarray) -> float | None:
            return round(float(shares[picked].mean()), 4) if picked.any() else None

        return {
            "lung_share": mean(ok),
            "lung_share_per_class": {c: mean(ok & (labels == c)) for c in CLASSES},
            "images": int(ok.sum()),
            "without_lungs": int((~ok).sum()),
        }

    def worst(self, limit: int) -> list[int]:
        """Indices of the images with the lowest share, lowest first."""
        order = np.argsort(np.where(np.isfinite(self.shares), self.shares, np.inf), kind="stable")
        return [int(i) for i in order[:limit] if np.isfinite(self.shares[i])]


def lung_attention(
    greys: Sequence[np.ndarray],
    boxes: Sequence[BodyBox],
    cams: Sequence[np.ndarray],
    mode: str = "stretch",
) -> LungAttention:
    """The lung share of each image's CAM.

    Args:
        greys: the original slices (uint8 H x W), as decoded.
        boxes: the region of each slice the model saw (`imaging.Prepared.box`).
        cams: one map per image over the model input (any resolution).
        mode: params `resize.mode`, for putting the map back (`imaging.map_to_frame`).
    """
    if not len(greys) == len(boxes) == len(cams):
        raise ValueError(
            f"{len(greys)} slices, {len(boxes)} boxes and {len(cams)} activation maps differ"
        )
    shares = np.full(len(greys), np.nan)
    masks, heats = [], []
    for i, (grey, box, cam) in enumerate(zip(greys, boxes, cams, strict=True)):
        field = lung_field(grey)
        heat = map_to_frame(np.asarray(cam, np.float32), box, grey.shape, mode)
        masks.append(field.mask)
        heats.append(heat)
        if field.found:
            shares[i] = mask_share(heat, field.mask)
    return LungAttention(shares, list(greys), masks, heats)


def outline(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """`rgb` with the outline of `mask` (stretched to its size) drawn in white."""
    mask = cv2.resize(mask.astype(np.uint8), rgb.shape[1::-1], interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    out = rgb.copy()
    cv2.drawContours(out, contours, -1, (255, 255, 255), 1)
    return out
