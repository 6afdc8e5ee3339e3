"""Small builders shared by the unit tests: tiny images, Kaggle-layout folders, manifests."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from chestct.labels import CLASSES
from chestct.manifest import INDEX_COLUMNS, INGEST_COLUMNS, SPLITS

# Folder names as the Kaggle "Chest CT-Scan images" set spells them: long in train/valid,
# short in test (the synthetic default uses the same).
from chestct.synthetic import LONG_FOLDERS, SHORT_FOLDERS

_CHANNELS = {"L": 1, "RGB": 3, "RGBA": 4}
_EXTENSIONS = {"png": ".png", "jpeg": ".jpg", "bmp": ".bmp", "tiff": ".tiff"}


def pixels(
    width: int, height: int, mode: str = "L", seed: int = 0, dtype: type = np.uint8
) -> np.ndarray:
    """Random pixels in OpenCV layout (H x W [x C], BGR[A]); alpha is opaque."""
    rng = np.random.default_rng(seed)
    top = np.iinfo(dtype).max
    channels = _CHANNELS[mode]
    shape = (height, width) if channels == 1 else (height, width, channels)
    img = rng.integers(0, top, shape, dtype=dtype, endpoint=True)
    if channels == 4:
        img[:, :, 3] = top
    return img


def encode(img: np.ndarray, fmt: str = "png") -> bytes:
    """Encode an OpenCV array as `fmt` (png, jpeg, bmp, tiff)."""
    ok, buf = cv2.imencode(_EXTENSIONS[fmt], img)
    assert ok, f"cv2 could not encode {fmt}"
    return buf.tobytes()


def image_bytes(
    width: int = 24, height: int = 20, mode: str = "L", fmt: str = "png", seed: int = 0
) -> bytes:
    """A tiny random image of the given size, colour mode and format, as file bytes."""
    return encode(pixels(width, height, mode, seed), fmt)


def write_image(
    path: Path,
    width: int = 24,
    height: int = 20,
    mode: str = "L",
    fmt: str = "png",
    seed: int = 0,
) -> Path:
    """Write a tiny random image to `path` (whatever its extension says) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(width, height, mode, fmt, seed))
    return path


def make_kaggle_folder(
    root: Path,
    per_class: Mapping[str, int] | None = None,
    seed: int = 0,
) -> Path:
    """A folder in the Kaggle layout `<split>/<class folder>/<image>` with distinct images.

    train and valid use the long Kaggle folder names, test the short ones; modes and sizes
    vary so that ingest sees a mix. `per_class` maps split -> images per class; a split that
    is absent (or 0) gets no folder.
    """
    per_class = {"train": 3, "valid": 2, "test": 2} if per_class is None else per_class
    modes = ("L", "RGB", "RGBA")
    n = seed * 10_000
    for split, count in per_class.items():
        names = SHORT_FOLDERS if split == "test" else LONG_FOLDERS
        for label in CLASSES:
            for i in range(count):
                n += 1
                write_image(
                    root / split / names[label] / f"{label[:4]}_{i:03d}.png",
                    width=20 + i,
                    height=16 + i % 3,
                    mode=modes[n % 3],
                    seed=n,
                )
    return root


def sha(text: str) -> str:
    """A stand-in content digest for manifests built by hand."""
    return hashlib.sha256(text.encode()).hexdigest()


def ingest_row(split: str, label: str, key: str, path: str | None = None) -> dict[str, object]:
    """One INGEST_COLUMNS row; rows with the same `key` have the same content digest."""
    return {
        "split": split,
        "label": label,
        "path": path or f"artifacts/ingest/images/{split or 'all'}/{label}/{key}.png",
        "source_path": f"src/{split}/{label}/{key}.png",
        "sha256": sha(key),
        "width": 20,
        "height": 20,
        "mode": "L",
        "format": "png",
        "bytes": 100,
    }


def split_manifests(per_class: int = 2) -> dict[str, pd.DataFrame]:
    """Hand-made split manifests: `per_class` distinct images per class in every split."""
    return {
        split: pd.DataFrame(
            [
                ingest_row(split, label, f"{split}-{label}-{i}")
                for label in CLASSES
                for i in range(per_class)
            ],
            columns=list(INGEST_COLUMNS),
        )
        for split in SPLITS
    }


def ok_index(manifests: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """A resize index (INDEX_COLUMNS) saying every distinct content resized fine."""
    shas = pd.concat(manifests.values())["sha256"].drop_duplicates()
    return pd.DataFrame(
        [
            {
                "sha256": s,
                "resized": f"artifacts/resize/images/{s}.png",
                "ok": True,
                "error": "",
                "mean": 100.0,
                "std": 10.0,
            }
            for s in shas
        ],
        columns=list(INDEX_COLUMNS),
    )


def synthetic_splits(
    root: Path, size: int, per_class: Mapping[str, int], seed: int = 5, shortcut: str = ""
) -> dict[str, pd.DataFrame]:
    """Synthetic slices as validate hands them on: DATASET_COLUMNS frames whose `path` is the
    image prepared at `size` and whose `original` is the generated file (relative to root)."""
    from chestct.labels import label_for_folder
    from chestct.manifest import DATASET_COLUMNS
    from chestct.scoring import Preprocessing
    from chestct.synthetic import generate_synthetic

    folder = root / f"synthetic-{seed}-{shortcut or 'none'}"
    rows: dict[str, list[dict[str, object]]] = {}
    for f in generate_synthetic(folder / "original", seed, per_class, shortcut):
        split = f.parts[-3]
        data = f.read_bytes()
        resized = folder / "resized" / split / f.name
        resized.parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(resized), Preprocessing().prepare(data, size))
        rows.setdefault(split, []).append(
            {
                "path": resized.relative_to(root).as_posix(),
                "label": label_for_folder(f.parent.name),
                "sha256": hashlib.sha256(data).hexdigest(),
                "source_path": f.relative_to(root).as_posix(),
                "original": f.relative_to(root).as_posix(),
            }
        )
    return {s: pd.DataFrame(r, columns=list(DATASET_COLUMNS)) for s, r in rows.items()}
