"""chestct.data.similarity: thumbnails, nearest neighbours, series grouping, the memorizer."""

from __future__ import annotations

import numpy as np
import pytest

from chestct.data import similarity


def _slice(seed: int, side: int = 96) -> np.ndarray:
    """A dark frame holding a bright ellipse 'body' with random blobs inside."""
    rng = np.random.default_rng(seed)
    grey = np.zeros((side, side), np.uint8)
    yy, xx = np.mgrid[:side, :side]
    body = ((yy - side / 2) / (side * 0.35)) ** 2 + ((xx - side / 2) / (side * 0.42)) ** 2 < 1
    grey[body] = 120
    for _ in range(6):
        cy, cx = rng.integers(side // 4, 3 * side // 4, size=2)
        r = rng.integers(3, side // 8)
        grey[(yy - cy) ** 2 + (xx - cx) ** 2 < r**2] = rng.integers(20, 250)
    return grey


def test_thumbnail_is_standardised_and_blind_to_gain_and_offset() -> None:
    grey = _slice(1)
    thumb = similarity.thumbnail(grey)
    assert thumb.shape == (similarity.THUMB_SIDE**2,)
    assert abs(float(thumb.mean())) < 1e-5
    assert float(np.linalg.norm(thumb)) == pytest.approx(1.0, abs=1e-5)
    brighter = np.clip(grey.astype(np.int32) // 2 + 40, 0, 255).astype(np.uint8)
    assert float(thumb @ similarity.thumbnail(brighter)) > 0.98


def test_thumbnail_of_flat_slice_is_zero_and_shape_is_checked() -> None:
    assert not similarity.thumbnail(np.full((40, 40), 7, np.uint8)).any()
    with pytest.raises(ValueError, match="2-D"):
        similarity.thumbnail(np.zeros((4, 4, 3), np.uint8))


def test_nearest_finds_the_copy_and_excludes_self() -> None:
    refs = similarity.thumbnails([_slice(s) for s in range(5)])
    query = similarity.thumbnails([_slice(3)])
    found = similarity.nearest(query, refs)
    assert found.index.tolist() == [3]
    assert found.similarity[0] == pytest.approx(1.0, abs=1e-5)
    own = similarity.nearest(refs, refs, exclude_self=True)
    assert (own.index != np.arange(5)).all()
    assert (own.similarity < 0.999).all()
    empty = similarity.nearest(query, refs[:0])
    assert empty.index.tolist() == [-1] and np.isnan(empty.similarity[0])


def test_series_groups_link_transitively() -> None:
    base = _slice(7).astype(np.int32)
    rng = np.random.default_rng(0)
    # Three slices of one "series" (small noise) and two unrelated slices.
    series = [
        np.clip(base + rng.normal(0, 4, base.shape), 0, 255).astype(np.uint8) for _ in range(3)
    ]
    thumbs = similarity.thumbnails([*series, _slice(100), _slice(200)])
    groups = similarity.series_groups(thumbs, threshold=0.95)
    assert groups[:3] == [0, 0, 0]
    assert len(set(groups)) == 3


def test_memorizer_labels_by_nearest_and_checks_lengths() -> None:
    refs = similarity.thumbnails([_slice(s) for s in range(4)])
    labels = ["a", "b", "c", "d"]
    predicted, found = similarity.memorizer_predict(
        similarity.thumbnails([_slice(2), _slice(0)]), refs, labels
    )
    assert predicted == ["c", "a"]
    assert found.index.tolist() == [2, 0]
    with pytest.raises(ValueError, match="labels"):
        similarity.memorizer_predict(refs, refs, labels[:3])
