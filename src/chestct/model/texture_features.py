"""The texture family's features: hand-made grey-level texture numbers of one prepared slice.

One implementation for train, evaluate, promote and serving: every caller hands in the slice
exactly as `imaging.prepare_slice` made it (body crop, intensity normalisation,
base.image_size), so the features see what the CNN sees.

The features (`feature_groups`, 1006 numbers):
- lbp: uniform local binary pattern histograms at radii 1, 2 and 3 (8 r neighbours each)
  inside the body mask;
- glcm: grey-level co-occurrence contrast, homogeneity, energy, correlation and dissimilarity
  at distances 1, 2, 4 and 8 px (averaged over 4 directions, 32 grey levels, body pixels only);
- histogram: a 32-bin grey histogram of the body;
- hog: histograms of oriented gradients of the slice at 96 px (16 px cells, 2 x 2 blocks).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

LBP_RADII = (1, 2, 3)
GLCM_DISTANCES = (1, 2, 4, 8)
GLCM_ANGLES = (0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4)
GLCM_PROPS = ("contrast", "homogeneity", "energy", "correlation", "dissimilarity")
GLCM_LEVELS = 32
HIST_BINS = 32
HOG_SIDE = 96
HOG_CELL = 16
HOG_ORIENTATIONS = 9
# Where the body threshold lies between the darkest level (0) and Otsu's (1), as in
# imaging.body_box: the prepared slice is already cut to the body, this finds its outline.
MASK_LEVEL = 0.5
# The fewest body pixels for body-only statistics; a blank slice uses the whole frame.
MASK_MIN_PIXELS = 64
_EPS = 1e-12


@dataclass(frozen=True)
class FeatureGroup:
    name: str
    start: int
    stop: int


def _lbp_bins(radius: int) -> int:
    return 8 * radius + 2  # uniform patterns of P = 8 r neighbours, plus "non-uniform"


def feature_groups(image_size: int = 0) -> list[FeatureGroup]:
    """Where each group of features lies in the feature vector (`image_size` is unused:
    the layout does not depend on it, HOG is computed at HOG_SIDE)."""
    del image_size
    cells = HOG_SIDE // HOG_CELL
    sizes = {
        "lbp": sum(_lbp_bins(r) for r in LBP_RADII),
        "glcm": len(GLCM_PROPS) * len(GLCM_DISTANCES),
        "histogram": HIST_BINS,
        "hog": (cells - 1) ** 2 * 4 * HOG_ORIENTATIONS,
    }
    groups, start = [], 0
    for name, size in sizes.items():
        groups.append(FeatureGroup(name, start, start + size))
        start += size
    return groups


def feature_count() -> int:
    return feature_groups()[-1].stop


def body_mask(image: np.ndarray) -> np.ndarray:
    """Boolean mask of the body in a prepared slice: above a level halfway between the
    darkest grey and Otsu's, holes (the lungs) filled. The whole frame when too little is
    found (a blank or uniform slice)."""
    low, high = int(image.min()), int(image.max())
    if high - low < 10:
        return np.ones(image.shape, bool)
    otsu, _ = cv2.threshold(image, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    _, mask = cv2.threshold(image, low + (otsu - low) * MASK_LEVEL, 255, cv2.THRESH_BINARY)
    padded = cv2.copyMakeBorder(mask, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    reach = padded.copy()
    flood = np.zeros((padded.shape[0] + 2, padded.shape[1] + 2), np.uint8)
    cv2.floodFill(reach, flood, (0, 0), 255)
    filled = (padded | ~reach)[1:-1, 1:-1] > 0
    if int(filled.sum()) < MASK_MIN_PIXELS:
        return np.ones(image.shape, bool)
    return filled


def lbp_uniform(image: np.ndarray, points: int, radius: float) -> np.ndarray:
    """Rotation-invariant uniform local binary patterns, as scikit-image's
    `local_binary_pattern(image, points, radius, method="uniform")` defines them: each
    neighbour on the circle (bilinear, zero outside the frame) at or above the centre is a 1;
    a pattern with at most two 0/1 changes along the circle's sequence is its number of ones,
    any other is `points + 1`. Computed with one OpenCV shift per neighbour for the whole
    slice (scikit-image walks pixel by pixel: about 10 x slower at radius 3)."""
    grey = image.astype(np.float32)
    bits = np.empty((points, *grey.shape), bool)
    for p in range(points):
        dy = round(-radius * np.sin(2 * np.pi * p / points), 5)
        dx = round(radius * np.cos(2 * np.pi * p / points), 5)
        shift = np.float32([[1, 0, dx], [0, 1, dy]])
        sample = cv2.warpAffine(
            grey,
            shift,
            (grey.shape[1], grey.shape[0]),
            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=0,
        )
        bits[p] = sample >= grey
    # Sums of booleans as uint8 (points <= 255): numpy's count_nonzero along an axis is ~50 x
    # slower here.
    changes = (bits[1:] != bits[:-1]).sum(axis=0, dtype=np.uint8)
    return np.where(changes <= 2, bits.sum(axis=0, dtype=np.uint8), points + 1)


def texture_features(image: np.ndarray) -> np.ndarray:
    """The feature vector (float32, `feature_count()` long) of one prepared uint8 slice."""
    from skimage.feature import graycomatrix, graycoprops, hog

    if image.ndim == 3:
        image = image[..., 0]
    image = np.ascontiguousarray(np.clip(image, 0, 255).astype(np.uint8))
    mask = body_mask(image)
    parts: list[np.ndarray] = []
    for radius in LBP_RADII:
        points = 8 * radius
        codes = lbp_uniform(image, points, radius)
        hist = np.bincount(codes[mask].astype(np.int64), minlength=points + 2)[: points + 2]
        parts.append(hist / max(hist.sum(), 1))
    # Body pixels on levels 1..32, the surround on 0; the co-occurrences with 0 are dropped.
    levels = np.where(mask, 1 + (image.astype(np.int32) * GLCM_LEVELS) // 256, 0).astype(np.uint8)
    glcm = graycomatrix(
        levels, GLCM_DISTANCES, GLCM_ANGLES, levels=GLCM_LEVELS + 1, symmetric=True
    )[1:, 1:].astype(np.float64)
    glcm /= np.maximum(glcm.sum(axis=(0, 1), keepdims=True), _EPS)
    for prop in GLCM_PROPS:
        # (distances, angles) -> the mean over directions, one number per distance.
        parts.append(np.nan_to_num(graycoprops(glcm, prop)).mean(axis=1))
    hist = np.bincount(image[mask] // (256 // HIST_BINS), minlength=HIST_BINS)[:HIST_BINS]
    parts.append(hist / max(hist.sum(), 1))
    small = cv2.resize(image, (HOG_SIDE, HOG_SIDE), interpolation=cv2.INTER_AREA)
    parts.append(
        hog(
            small,
            orientations=HOG_ORIENTATIONS,
            pixels_per_cell=(HOG_CELL, HOG_CELL),
            cells_per_block=(2, 2),
            feature_vector=True,
        )
    )
    return np.concatenate(parts).astype(np.float32)


def feature_matrix(images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """Features of many prepared slices ((n, s, s) or (n, s, s, 1)), one row each."""
    rows = [texture_features(np.asarray(image)) for image in images]
    if not rows:
        return np.zeros((0, feature_count()), np.float32)
    return np.stack(rows)
