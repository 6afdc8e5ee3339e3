"""How alike two slices look: body-cropped thumbnails and their Pearson correlation.

One implementation shared by the memorizer baseline and the novelty split of evaluate, by
validate's near-copy report and by split's series grouping. A thumbnail is the slice cut to
its body box (`imaging.body_box`), shrunk to `THUMB_SIDE` x `THUMB_SIDE` with area
interpolation and standardised to zero mean and unit norm, so the dot product of two
thumbnails is their Pearson correlation: blind to a grey-level offset or gain, which is how
the same patient's slice looks after another export.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from chestct.data.dedup import UnionFind
from chestct.imaging.body import body_box

# 32 px: adjacent slices of one series still correlate above 0.9 while different patients
# fall below; larger thumbnails start to separate adjacent slices of the same series.
THUMB_SIDE = 32
# Rows of the query compared against the whole reference at once (memory: block x reference).
_BLOCK = 1024


def thumbnail(grey: np.ndarray, side: int = THUMB_SIDE) -> np.ndarray:
    """The standardised body-cropped thumbnail of one uint8 H x W slice: float32, length
    `side` * `side`, zero mean and unit norm (all zeros for a flat slice)."""
    if grey.ndim != 2:
        raise ValueError(f"thumbnail needs a 2-D grey slice, got shape {grey.shape}")
    body = body_box(grey, margin=0.0).crop(grey)
    small = cv2.resize(body, (side, side), interpolation=cv2.INTER_AREA).astype(np.float32)
    small = small.reshape(-1) - small.mean()
    norm = float(np.linalg.norm(small))
    return small / norm if norm > 1e-6 else np.zeros_like(small)


def thumbnails(slices: Iterable[np.ndarray], side: int = THUMB_SIDE) -> np.ndarray:
    """Thumbnails of many slices stacked into an n x side² float32 array."""
    rows = [thumbnail(grey, side) for grey in slices]
    if not rows:
        return np.zeros((0, side * side), np.float32)
    return np.stack(rows)


@dataclass(frozen=True)
class Nearest:
    """For each query row, the index of its most similar reference row and that correlation
    (-1..1; NaN index -1 when the reference is empty)."""

    index: np.ndarray
    similarity: np.ndarray


def nearest(query: np.ndarray, reference: np.ndarray, exclude_self: bool = False) -> Nearest:
    """The nearest reference thumbnail of every query thumbnail by correlation.

    Args:
        query: n x d thumbnails.
        reference: m x d thumbnails.
        exclude_self: query and reference are the same set; a row is not its own neighbour.
    """
    n = len(query)
    index = np.full(n, -1, np.int64)
    similarity = np.full(n, np.nan, np.float64)
    if n == 0 or len(reference) == 0 or (exclude_self and len(reference) < 2):
        return Nearest(index, similarity)
    for start in range(0, n, _BLOCK):
        block = query[start : start + _BLOCK] @ reference.T
        if exclude_self:
            rows = np.arange(len(block))
            block[rows, start + rows] = -np.inf
        best = np.argmax(block, axis=1)
        index[start : start + len(block)] = best
        similarity[start : start + len(block)] = block[np.arange(len(block)), best]
    return Nearest(index, np.clip(similarity, -1.0, 1.0))


def similar_pairs(thumbs: np.ndarray, threshold: float) -> np.ndarray:
    """Index pairs (i < j) whose correlation is at least `threshold`, as a k x 2 array."""
    pairs = []
    for start in range(0, len(thumbs), _BLOCK):
        block = thumbs[start : start + _BLOCK] @ thumbs.T
        rows, cols = np.nonzero(block >= threshold)
        rows = rows + start
        keep = rows < cols
        pairs.append(np.stack([rows[keep], cols[keep]], axis=1))
    if not pairs:
        return np.zeros((0, 2), np.int64)
    return np.concatenate(pairs).astype(np.int64)


def series_groups(thumbs: np.ndarray, threshold: float) -> list[int]:
    """A series id per slice: connected components of the graph linking slices whose
    correlation is at least `threshold` (ids are each component's smallest index)."""
    uf = UnionFind(len(thumbs))
    for a, b in similar_pairs(thumbs, threshold):
        uf.union(int(a), int(b))
    return [uf.find(i) for i in range(len(thumbs))]


def memorizer_predict(
    query: np.ndarray, reference: np.ndarray, labels: Sequence[str]
) -> tuple[list[str], Nearest]:
    """The nearest-neighbour memorizer: each query takes the label of its most similar
    reference slice. No learning; the baseline a model must beat on novel slices."""
    if len(reference) != len(labels):
        raise ValueError(f"{len(reference)} reference thumbnails but {len(labels)} labels")
    found = nearest(query, reference)
    return [labels[i] if i >= 0 else "" for i in found.index], found
