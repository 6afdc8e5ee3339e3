"""Where a model looked: the class activation map of a CNN, the occlusion map and feature
groups of a texture model, drawn over the upload (`overlay_png`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import numpy as np

from chestct.imaging import body, formats, preparation
from chestct.inference.loaded import Loaded, ModelRefused
from chestct.model.texture import (
    group_importance,
    occlusion_map,
)

log = logging.getLogger(__name__)


PANEL_MIN_WIDTH = 240  # px: the feature-group bars under a texture explanation


def class_activation(model: Loaded, features: np.ndarray, class_index: int) -> np.ndarray:
    """Grad-CAM of one class on the feature map, in [0, 1], shape (h, w).

    For logits = dense(GAP(A)), d logit_c / d A_k = w_kc / (h w) everywhere, so Grad-CAM's
    channel weights are the head's kernel column and the map is ReLU(sum_k w_kc A_k).
    """
    if model.head is None:
        raise ModelRefused("the model folder has no dense-head weights (card `cam`)")
    return model.head.cam(features, class_index)


@dataclass(frozen=True)
class Explanation:
    """Why the model answered as it did, for one prepared image and one class."""

    heat: np.ndarray  # over the prepared image, in [0, 1]
    method: str  # grad-cam | occlusion
    groups: dict[str, float] | None  # texture: probability carried by each feature group


def explain(
    model: Loaded, image: np.ndarray, features: np.ndarray, class_index: int
) -> Explanation:
    """The family's explanation (chestct.model.families.OFFERS): Grad-CAM of the CNN (the
    ensemble's
    CNN member), or for the texture family the occlusion map of body tiles and the share of
    each feature group (chestct.model.texture.occlusion_map / group_importance)."""
    if model.family == "texture" and model.texture is not None:
        with model._lock:
            return Explanation(
                occlusion_map(model.texture, image, class_index),
                "occlusion",
                group_importance(model.texture, image, class_index),
            )
    return Explanation(class_activation(model, features, class_index), "grad-cam", None)


def _group_panel(groups: dict[str, float], width: int) -> np.ndarray:
    """A bar per feature group (BGR): green where the group argued for the class, red
    against, the length its share of the probability."""
    row, pad = 22, 6
    panel = np.full((pad * 2 + row * len(groups), width, 3), 255, np.uint8)
    top = max((abs(v) for v in groups.values()), default=0.0) or 1.0
    label_w = min(110, width // 3)
    for k, (name, value) in enumerate(groups.items()):
        y = pad + k * row
        cv2.putText(panel, name, (4, y + 15), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1)
        length = int((width - label_w - 70) * abs(value) / top)
        colour = (60, 160, 60) if value >= 0 else (60, 60, 200)
        cv2.rectangle(panel, (label_w, y + 4), (label_w + length, y + row - 4), colour, -1)
        cv2.putText(
            panel,
            f"{value:+.3f}",
            (label_w + length + 4, y + 15),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.4,
            (0, 0, 0),
            1,
        )
    return panel


def overlay_png(
    model: Loaded,
    decoded: formats.Decoded,
    prepared: preparation.Prepared,
    cam: np.ndarray,
    groups: dict[str, float] | None = None,
) -> bytes:
    """The heatmap over the client's own image, as PNG (longer side at most 512 px).

    The map covers what the model saw (the body crop, squared by the resize mode); it is put
    back where that came from in the upload, and is zero (the picture shows through) outside.
    With `groups` (the texture family), a bar per feature group is drawn under the picture.
    """
    base, box = decoded.grey, prepared.box
    scale = min(1.0, 512.0 / max(base.shape))
    if scale < 1.0:
        # The map goes straight to the output's size (the box scaled with the picture): a
        # float32 map of the full frame would be 64 MB for a 4096 x 4096 upload.
        size = (round(base.shape[1] * scale), round(base.shape[0] * scale))
        base = cv2.resize(base, size, interpolation=cv2.INTER_AREA)
        x0, y0 = round(box.x * scale), round(box.y * scale)
        x1, y1 = round((box.x + box.w) * scale), round((box.y + box.h) * scale)
        box = body.BodyBox(x0, y0, max(1, x1 - x0), max(1, y1 - y0), box.reason)
    heat = preparation.map_to_frame(cam, box, base.shape, model.preprocessing.resize)
    heat8 = np.clip(heat * 255.0, 0, 255).astype(np.uint8)
    colour = cv2.applyColorMap(heat8, cv2.COLORMAP_JET)
    grey_bgr = cv2.cvtColor(base, cv2.COLOR_GRAY2BGR)
    # Weight the colour by the map itself so cold regions keep the original picture.
    alpha = (0.55 * heat)[:, :, None]
    blended = (grey_bgr * (1.0 - alpha) + colour * alpha).astype(np.uint8)
    if groups:
        # The panel needs about 240 px for its labels: a smaller picture gets a white margin.
        narrow = max(0, PANEL_MIN_WIDTH - blended.shape[1])
        blended = cv2.copyMakeBorder(
            blended, 0, 0, 0, narrow, cv2.BORDER_CONSTANT, value=(255, 255, 255)
        )
        blended = np.vstack([blended, _group_panel(groups, blended.shape[1])])
    ok, buf = cv2.imencode(".png", blended)
    if not ok:
        raise RuntimeError("OpenCV could not encode the heatmap PNG")
    return buf.tobytes()
