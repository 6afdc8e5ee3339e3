"""The texture (radiomics-style) model family: hand-made grey-level texture features of the
prepared slice and gradient-boosted trees on them (docs/texture-family.md).

Three modules by concern, gathered here so that callers import one name:
- chestct.model.texture_features: the features of one prepared slice (LBP, GLCM, histogram,
  HOG: 1006 numbers), the same for train, evaluate, promote and serving;
- chestct.model.texture_fit: the boosters, their iterations chosen and their temperature
  fitted on the valid split, optionally a bag of boosters and a refit on train + valid;
- chestct.model.texture_model: the fitted model (`TextureModel`), its numpy tree walk and
  its skops file.
This module adds the explanations served by /explain: which tiles of the slice and which
feature groups drove the answer.
"""

from __future__ import annotations

import cv2
import numpy as np

from chestct.model.calibration import softmax
from chestct.model.texture_features import (
    FeatureGroup,
    body_mask,
    feature_count,
    feature_groups,
    feature_matrix,
    lbp_uniform,
    texture_features,
)
from chestct.model.texture_fit import (
    ClassifierSpec,
    classification_metrics_of,
    fit_texture,
    fit_texture_features,
    limited_threads,
    refit,
    truncate,
)
from chestct.model.texture_model import (
    FORMAT,
    FORMAT_VERSION,
    TRUSTED_TYPES,
    FlatTrees,
    TextureError,
    TextureModel,
    load,
    log_probabilities,
    ood_statistics,
    save,
)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "TRUSTED_TYPES",
    "ClassifierSpec",
    "FeatureGroup",
    "FlatTrees",
    "TextureError",
    "TextureModel",
    "body_mask",
    "classification_metrics_of",
    "feature_count",
    "feature_groups",
    "feature_matrix",
    "fit_texture",
    "fit_texture_features",
    "group_importance",
    "lbp_uniform",
    "limited_threads",
    "load",
    "log_probabilities",
    "occlusion_map",
    "ood_statistics",
    "refit",
    "save",
    "texture_features",
    "truncate",
]

OCCLUSION_TILES = 6  # a 6 x 6 grid of tiles over the prepared slice
OCCLUSION_BLUR = 7  # px (odd): an occluded tile keeps its mean grey but loses its texture


def occlusion_map(model: TextureModel, image: np.ndarray, class_index: int) -> np.ndarray:
    """Where the texture drove the answer: for each tile of an OCCLUSION_TILES grid, how much
    the class's calibrated probability drops when that tile's texture is blurred away (its
    grey level kept), scaled to [0, 1] over the slice (all zeros when nothing lowers it).
    Tiles outside the body are skipped (no texture to remove)."""
    image = np.ascontiguousarray(np.asarray(image, np.float32).reshape(image.shape[:2]))
    grey = np.clip(image, 0, 255).astype(np.uint8)
    side_y, side_x = grey.shape
    blurred = cv2.GaussianBlur(grey, (OCCLUSION_BLUR, OCCLUSION_BLUR), 0)
    mask = body_mask(grey)
    edges_y = np.linspace(0, side_y, OCCLUSION_TILES + 1).astype(int)
    edges_x = np.linspace(0, side_x, OCCLUSION_TILES + 1).astype(int)
    variants, where = [grey], []
    for i in range(OCCLUSION_TILES):
        for j in range(OCCLUSION_TILES):
            ys, xs = slice(edges_y[i], edges_y[i + 1]), slice(edges_x[j], edges_x[j + 1])
            if not mask[ys, xs].any():
                continue
            occluded = grey.copy()
            occluded[ys, xs] = blurred[ys, xs]
            variants.append(occluded)
            where.append((ys, xs))
    proba = softmax(model.logits(feature_matrix(variants)))[:, class_index]
    heat = np.zeros((side_y, side_x), np.float32)
    for (ys, xs), p in zip(where, proba[1:], strict=True):
        heat[ys, xs] = max(float(proba[0] - p), 0.0)
    top = float(heat.max())
    return heat / top if top > 0 else heat


def group_importance(model: TextureModel, image: np.ndarray, class_index: int) -> dict[str, float]:
    """How much each feature group carries the answer for this slice: the drop of the class's
    calibrated probability when the group's features are set to the train split's mean
    (negative: the group argued against the class)."""
    raw = feature_matrix([np.asarray(image).reshape(np.asarray(image).shape[:2])])
    variants = [raw[0]]
    groups = feature_groups()
    for group in groups:
        neutral = raw[0].copy()
        neutral[group.start : group.stop] = model.mean[group.start : group.stop]
        variants.append(neutral)
    proba = softmax(model.logits(np.stack(variants)))[:, class_index]
    return {g.name: float(proba[0] - p) for g, p in zip(groups, proba[1:], strict=True)}
