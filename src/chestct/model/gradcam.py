"""Grad-CAM from the "features" map and the dense head's weights, with NumPy alone.

For the head the models share (features → global average pooling → dropout → dense), the
gradient of a class logit with respect to feature map k at every position is w[k, c] / (H·W),
so Grad-CAM's channel weights are the dense kernel's column c up to a constant and Grad-CAM
equals CAM: relu(Σ_k w[k, c] · A_k). Serving computes it from the light model's "features"
output and cam_head.npz without TensorFlow; evaluate uses the same functions for its gallery.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import cv2
import numpy as np

from chestct.fsutil import staged_file

CAM_FILE = "cam_head.npz"


@dataclass(frozen=True)
class CamHead:
    """The dense head: kernel (C × K) and bias (K,)."""

    kernel: np.ndarray
    bias: np.ndarray

    @classmethod
    def from_model(cls, model: Any) -> CamHead:
        """Read the "logits" layer's weights from a Keras model."""
        kernel, bias = model.get_layer("logits").get_weights()
        return cls(np.asarray(kernel, np.float32), np.asarray(bias, np.float32))

    @classmethod
    def load(cls, path: Path | BinaryIO) -> CamHead:
        """Read cam_head.npz as written by `save`."""
        with np.load(path) as data:
            return cls(data["kernel"], data["bias"])

    def save(self, path: Path) -> None:
        """Write kernel and bias to an .npz file, atomically."""
        with staged_file(path) as tmp, tmp.open("wb") as fh:
            np.savez(fh, kernel=self.kernel, bias=self.bias)

    def cam(self, features: np.ndarray, class_index: int) -> np.ndarray:
        """The class activation map of one image, scaled to [0, 1].

        Args:
            features: one feature map, shape (H, W, C).
            class_index: the class to explain.

        Returns:
            (H, W) float32; all zeros when nothing speaks for the class.
        """
        if features.ndim != 3 or features.shape[-1] != self.kernel.shape[0]:
            raise ValueError(
                f"features of shape {features.shape} do not match a head with "
                f"{self.kernel.shape[0]} channels; pass one (H, W, C) map"
            )
        heat = np.maximum(features.astype(np.float32) @ self.kernel[:, class_index], 0.0)
        top = float(heat.max())
        return heat / top if top > 0 else np.zeros_like(heat)


def overlay(grey: np.ndarray, heat: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """An RGB uint8 picture of a grey image with the heat map in colour over it.

    Args:
        grey: (S, S) or (S, S, 1) image in [0, 255].
        heat: (H, W) map in [0, 1]; stretched to the image size.
        alpha: weight of the heat map.
    """
    grey = np.clip(np.asarray(grey, np.float32).reshape(grey.shape[0], grey.shape[1]), 0, 255)
    heat = cv2.resize(heat.astype(np.float32), grey.shape[::-1], interpolation=cv2.INTER_LINEAR)
    colour = cv2.applyColorMap(np.uint8(np.clip(heat, 0, 1) * 255), cv2.COLORMAP_JET)
    colour = cv2.cvtColor(colour, cv2.COLOR_BGR2RGB).astype(np.float32)
    base = np.repeat(grey[:, :, None], 3, axis=2)
    return np.uint8(np.clip((1 - alpha) * base + alpha * colour, 0, 255))
