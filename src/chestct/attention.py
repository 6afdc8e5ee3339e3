"""Where the model looks: the share of its Grad-CAM mass inside the lung field.

Evaluate reports `attention.lung_share` on the test split: for every image, the class
activation map of the predicted class (chestct.gradcam), stretched over the model's input, and
the lung field of that same input (chestct.lungs); the share of the map's mass inside the
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

from chestct.labels import CLASSES
from chestct.lungs import lung_field, mask_share


@dataclass(frozen=True)
class LungAttention:
    """Per image: the share of CAM mass inside the lungs (NaN without a lung field or a CAM)
    and the lung masks of the model inputs."""

    shares: np.ndarray
    masks: list[np.ndarray]

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


def lung_attention(images: np.ndarray, cams: Sequence[np.ndarray]) -> LungAttention:
    """The lung share of each image's CAM.

    Args:
        images: the model inputs, (n, s, s) or (n, s, s, 1), grey levels 0..255.
        cams: one (h, w) map per image (any resolution; stretched over the input).
    """
    if len(images) != len(cams):
        raise ValueError(f"{len(images)} images but {len(cams)} activation maps")
    shares = np.full(len(images), np.nan)
    masks = []
    for i, (image, cam) in enumerate(zip(images, cams, strict=True)):
        grey = np.clip(np.asarray(image).reshape(image.shape[0], image.shape[1]), 0, 255)
        grey = grey.astype(np.uint8)
        field = lung_field(grey)
        masks.append(field.mask)
        if field.found:
            heat = cv2.resize(np.asarray(cam, np.float32), grey.shape[::-1])
            shares[i] = mask_share(heat, field.mask)
    return LungAttention(shares, masks)


def outline(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """`rgb` with the outline of `mask` (stretched to its size) drawn in white."""
    mask = cv2.resize(mask.astype(np.uint8), rgb.shape[1::-1], interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    out = rgb.copy()
    cv2.drawContours(out, contours, -1, (255, 255, 255), 1)
    return out
