"""Tests for the synthetic chest-CT dataset generator."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
from sklearn.model_selection import StratifiedKFold, cross_val_score

from chestct.data.synthetic import (
    LABELS,
    LONG_FOLDERS,
    SHORT_FOLDERS,
    SPLITS,
    generate_synthetic,
    render_slice,
)

LEAK_PER_CLASS = 60


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def _mode_code(img: np.ndarray) -> int:
    return 1 if img.ndim == 2 else img.shape[2]


@pytest.fixture(scope="module")
def leak_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("leak")
    generate_synthetic(root, seed=7, per_class={"train": LEAK_PER_CLASS})
    return root


def test_layout_and_counts(tmp_path: Path) -> None:
    counts = {"train": 3, "valid": 1, "test": 2}
    paths = generate_synthetic(tmp_path, seed=0, per_class=counts)

    assert paths == sorted(paths)
    assert len(paths) == len(set(paths)) == sum(counts.values()) * len(LABELS)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(SPLITS)
    for split in SPLITS:
        folders = SHORT_FOLDERS if split == "test" else LONG_FOLDERS
        present = sorted(p.name for p in (tmp_path / split).iterdir())
        assert present == sorted(folders.values())
        for label in LABELS:
            files = list((tmp_path / split / folders[label]).iterdir())
            assert len(files) == counts[split]
            assert all(f.suffix == ".png" for f in files)  # no temp file left behind
    assert "adenocarcinoma_left.lower.lobe_T2_N0_M0_Ib" in LONG_FOLDERS.values()
    assert set(LONG_FOLDERS) == set(SHORT_FOLDERS) == set(LABELS)


def test_skipped_splits_are_not_created(tmp_path: Path) -> None:
    generate_synthetic(tmp_path, seed=0, per_class={"test": 1})
    assert [p.name for p in tmp_path.iterdir()] == ["test"]


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    counts = {"train": 2, "test": 1}
    generate_synthetic(tmp_path / "a", seed=3, per_class=counts)
    generate_synthetic(tmp_path / "b", seed=3, per_class=counts)
    generate_synthetic(tmp_path / "c", seed=4, per_class=counts)
    a, b, c = (_tree(tmp_path / name) for name in "abc")

    assert a == b
    assert set(a.values()).isdisjoint(c.values())


def test_image_does_not_depend_on_other_counts(tmp_path: Path) -> None:
    generate_synthetic(tmp_path / "small", seed=5, per_class={"valid": 1})
    generate_synthetic(tmp_path / "big", seed=5, per_class={"train": 2, "valid": 3})
    small, big = _tree(tmp_path / "small"), _tree(tmp_path / "big")

    assert len(small) == len(LABELS)
    assert small.items() <= big.items()


def test_modes_and_sizes_vary(tmp_path: Path) -> None:
    paths = generate_synthetic(tmp_path, seed=1, per_class={"train": 10})
    imgs = [cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in paths]

    assert {_mode_code(i) for i in imgs} == {1, 3, 4}
    assert len({i.shape[:2] for i in imgs}) > len(imgs) // 2
    for img in imgs:
        h, w = img.shape[:2]
        assert 180 <= w <= 520 and 0.55 * w <= h <= w
        if img.ndim == 3:
            # Colour exports are grey in disguise; alpha is opaque.
            assert np.array_equal(img[..., 0], img[..., 1])
            assert np.array_equal(img[..., 0], img[..., 2])
        if _mode_code(img) == 4:
            assert (img[..., 3] == 255).all()


def test_metadata_does_not_reveal_class(leak_set: Path) -> None:
    feats, labels = [], []
    for label, folder in LONG_FOLDERS.items():
        for path in sorted((leak_set / "train" / folder).glob("*.png")):
            raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            grey = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
            h, w = raw.shape[:2]
            feats.append([w, h, _mode_code(raw), path.stat().st_size, float(grey.mean())])
            labels.append(label)
    x, y = np.array(feats), np.array(labels)
    assert len(y) == LEAK_PER_CLASS * len(LABELS)

    cv = StratifiedKFold(n_splits=5, shuffle=True, random_state=0)
    models = (
        RandomForestClassifier(n_estimators=100, random_state=0),
        GradientBoostingClassifier(n_estimators=50, random_state=0),
    )
    for model in models:
        acc = cross_val_score(model, x, y, cv=cv, scoring="accuracy").mean()
        # Chance is 0.25; well above it would mean a shortcut outside the lesion pixels.
        assert acc < 0.40, f"{type(model).__name__} reads the class from metadata: {acc:.3f}"


def test_render_slice_shape_and_type() -> None:
    for label in LABELS:
        img = render_slice(label, np.random.default_rng(0), size=128)
        assert img.shape == (128, 128) and img.dtype == np.uint8
        # Lung window: black surroundings, dark lungs and near-white bone all present.
        assert img.min() < 30 and img.max() > 200


@pytest.mark.parametrize("label", [lb for lb in LABELS if lb != "normal"])
def test_lesion_is_a_local_change(label: str) -> None:
    size = 256
    for seed in range(5):
        # Same rng state: same patient, pose and noise, so only the lesion may differ.
        normal = render_slice("normal", np.random.default_rng(seed), size).astype(int)
        other = render_slice(label, np.random.default_rng(seed), size).astype(int)
        changed = np.abs(other - normal) > 40
        frac = changed.mean()
        assert 0.002 < frac < 0.08, f"{label} seed {seed}: {frac:.4f} of pixels changed"
        ys, xs = np.nonzero(changed)
        # One compact focus, not a global shift of the picture.
        assert np.ptp(ys) < 0.4 * size and np.ptp(xs) < 0.4 * size
        # It grows in the lung field (central masses also reach into the mediastinum): much of
        # it is dark lung on the unchanged slice.
        assert (normal[changed] < 110).mean() > 0.3


def test_normal_is_reproducible_from_rng_state() -> None:
    a = render_slice("normal", np.random.default_rng(11))
    b = render_slice("normal", np.random.default_rng(11))
    assert np.array_equal(a, b)


def test_invalid_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        render_slice("mesothelioma", np.random.default_rng(0))
    with pytest.raises(ValueError):
        generate_synthetic(tmp_path, seed=0, per_class={"training": 1})
    with pytest.raises(ValueError):
        generate_synthetic(tmp_path, seed=-1, per_class={"train": 1})
    with pytest.raises(ValueError):
        generate_synthetic(tmp_path, seed=0, per_class={"train": -1})
    assert not any(tmp_path.iterdir())
