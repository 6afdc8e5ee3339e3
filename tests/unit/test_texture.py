"""chestct.model.texture on generated slices: the feature layout, the body mask, early stopping by
truncation, calibration, and the skops round trip."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from chestct.model import texture
from chestct.model.calibration import softmax
from chestct.model.texture_fit import _classifier


def slices(n: int, seed: int, size: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """Dark-surround discs whose texture (noise scale) depends on the class."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (0.4 * size) ** 2
    images, labels = [], []
    for i in range(n):
        label = i % 4
        noise = rng.normal(0, 10 + 15 * label, (size, size))
        images.append(np.where(disc, np.clip(120 + noise, 1, 255), 0).astype(np.uint8))
        labels.append(label)
    return np.stack(images), np.array(labels)


def test_feature_groups_tile_the_vector() -> None:
    groups = texture.feature_groups()
    assert [g.name for g in groups] == ["lbp", "glcm", "histogram", "hog"]
    assert groups[0].start == 0
    assert all(a.stop == b.start for a, b in itertools.pairwise(groups))
    assert texture.feature_count() == 1006  # the recipe of issue 20
    x, _ = slices(3, 0)
    features = texture.feature_matrix(x)
    assert features.shape == (3, 1006) and np.isfinite(features).all()


def test_body_mask_fills_the_lungs_and_keeps_the_frame_of_a_blank_slice() -> None:
    image = np.zeros((40, 40), np.uint8)
    image[5:35, 5:35] = 200
    image[12:28, 12:28] = 10  # a dark "lung" inside the body
    mask = texture.body_mask(image)
    assert mask[20, 20] and not mask[1, 1]
    assert texture.body_mask(np.full((40, 40), 7, np.uint8)).all()


def test_truncation_is_the_staged_model() -> None:
    x, y = slices(40, 1)
    features = texture.feature_matrix(x)
    spec = texture.ClassifierSpec(max_iter=12)
    with texture.limited_threads(1):
        clf = _classifier(spec, 0, 12).fit(features, y)
        staged = list(clf.staged_predict_proba(features))
        texture.truncate(clf, 5)
        np.testing.assert_allclose(clf.predict_proba(features), staged[4])
    with pytest.raises(ValueError, match="cannot keep"):
        texture.truncate(clf, 6)


def test_fit_chooses_iterations_and_temperature_on_valid(tmp_path: Path) -> None:
    x, y = slices(48, 2)
    xv, yv = slices(16, 3)
    model = texture.fit_texture(x, y, xv, yv, texture.ClassifierSpec(max_iter=30), seed=0)
    assert 1 <= model.details["iterations"] <= 30
    assert [c.n_iter_ for c in model.classifiers] == [model.details["iterations"]]
    assert model.temperature > 0
    out = model.outputs(xv)
    np.testing.assert_allclose(out["probabilities"], softmax(out["logits"]), atol=1e-6)
    assert out["features"].shape == (16, 1, 1, texture.feature_count())
    assert (out["probabilities"].argmax(axis=1) == yv).mean() > 0.5  # the classes differ
    path = texture.save(model, tmp_path / "texture.skops")
    again = texture.load(path)
    np.testing.assert_array_equal(again.outputs(xv)["logits"], out["logits"])


def test_load_refuses_what_is_not_a_texture_model(tmp_path: Path) -> None:
    import skops.io as sio

    path = tmp_path / "other.skops"
    sio.dump({"format": "something-else"}, path)
    with pytest.raises(texture.TextureError, match="not a chestct texture model"):
        texture.load(path)
    (tmp_path / "junk.skops").write_bytes(b"not a zip")
    with pytest.raises(texture.TextureError, match="not a readable skops file"):
        texture.load(tmp_path / "junk.skops")


@pytest.mark.parametrize("classes", [4, 2])
def test_flat_trees_are_scikit_learns_predictions(classes: int) -> None:
    x, y = slices(48, 4)
    keep = y < classes
    features, y = texture.feature_matrix(x[keep]), y[keep]
    with texture.limited_threads(1):
        clf = _classifier(texture.ClassifierSpec(max_iter=25), 0, 25).fit(features, y)
        expected = clf.predict_proba(features)
    flat = texture.FlatTrees.of(clf)
    np.testing.assert_allclose(flat.probabilities(features), expected, atol=1e-9)


@pytest.mark.parametrize("radius", [1, 2, 3])
def test_lbp_is_scikit_images_uniform_lbp(radius: int) -> None:
    """Away from the border and up to OpenCV's 1/32-pixel interpolation grid, the patterns are
    scikit-image's: nearly every interior pixel gets the same code."""
    from skimage.feature import local_binary_pattern

    x, _ = slices(1, 5, size=64)
    ours = texture.lbp_uniform(x[0], 8 * radius, radius)
    theirs = local_binary_pattern(x[0], 8 * radius, radius, method="uniform")
    inner = (slice(radius + 1, -radius - 1),) * 2
    assert np.mean(ours[inner] == theirs[inner]) > 0.97
