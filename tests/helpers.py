"""Small builders shared by the unit tests: tiny images, Kaggle-layout folders, manifests."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from chestct.data.manifest import DATASET_COLUMNS, INDEX_COLUMNS, INGEST_COLUMNS, SPLITS

# Folder names as the Kaggle "Chest CT-Scan images" set spells them: long in train/valid,
# short in test (the synthetic default uses the same).
from chestct.data.synthetic import LONG_FOLDERS, SHORT_FOLDERS
from chestct.fsutil import sha256_file
from chestct.imaging.preparation import Preprocessing
from chestct.labels import CLASSES
from chestct.settings import (
    BaseModelParams,
    BaseParams,
    IngestParams,
    TrainParams,
)
from chestct.stages.ingest import IngestSummary, run_ingest
from shipped import shipped

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
    from chestct.data.manifest import DATASET_COLUMNS
    from chestct.data.synthetic import generate_synthetic
    from chestct.imaging.preparation import prepare
    from chestct.labels import label_for_folder

    folder = root / f"synthetic-{seed}-{shortcut or 'none'}"
    rows: dict[str, list[dict[str, object]]] = {}
    for f in generate_synthetic(folder / "original", seed, per_class, shortcut):
        split = f.parts[-3]
        data = f.read_bytes()
        resized = folder / "resized" / split / f.name
        resized.parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(resized), prepare(data, Preprocessing(size)))
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


# The crafted body: an ellipse centred at (CX, CY) with semi-axes (AX, AY) in a FRAME_W x FRAME_H
# frame, so its true box is [CX-AX, CX+AX] x [CY-AY, CY+AY].
FRAME_W, FRAME_H = 320, 240


CX, CY, AX, AY = 150, 110, 100, 70


def chest(frame: tuple[int, int] = (FRAME_W, FRAME_H)) -> np.ndarray:
    """A CT-like slice: grey soft tissue, two dark lungs, a bright spine, black around."""
    width, height = frame
    grey = np.zeros((height, width), np.uint8)
    cv2.ellipse(grey, (CX, CY), (AX, AY), 0, 0, 360, 120, -1)
    cv2.ellipse(grey, (CX - 45, CY - 5), (35, 45), 0, 0, 360, 25, -1)
    cv2.ellipse(grey, (CX + 45, CY - 5), (35, 45), 0, 0, 360, 25, -1)
    cv2.circle(grey, (CX, CY + 50), 12, 230, -1)
    return grey


SIZE = 32


def write_split(root: Path, split: str, per_class: int, seed: int) -> pd.DataFrame:
    """Grey PNGs whose brightness band tells the class, and their manifest."""
    rows = []
    for c, label in enumerate(CLASSES):
        for i in range(per_class):
            rel = f"data/{split}/{label}/{i}.png"
            rng = np.random.default_rng(seed + 100 * c + i)
            img = (rng.integers(0, 60, (SIZE, SIZE)) + 60 * c).astype(np.uint8)
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            ok, buf = cv2.imencode(".png", img)
            assert ok
            (root / rel).write_bytes(buf.tobytes())
            rows.append(
                {"path": rel, "label": label, "sha256": f"{split}{c}{i}", "source_path": rel}
            )
    return pd.DataFrame(rows, columns=list(DATASET_COLUMNS))


def base_file(folder: Path, params: BaseModelParams, seed: int = 0) -> Path:
    """An initial model for run_train, saved as base-model saves it."""
    from chestct.model.modeling import build_model

    path = folder / "base.keras"
    build_model(params, SIZE, seed).save(path)
    return path


def train(data, base: Path, params: TrainParams, seed: int = 0, sink=None):
    """run_train on (root, train split, valid split) from `base`."""
    from chestct.stages.train import run_train

    root, train_split, valid_split = data
    return run_train(base, train_split, valid_split, params, seed, root, on_epoch=sink)


def zoomed(img: np.ndarray, keep: float = 0.6) -> np.ndarray:
    """A scanner zoomed in: the central `keep` of the field of view at the same pixel size."""
    n = img.shape[0]
    k = int(n * keep)
    o = (n - k) // 2
    return cv2.resize(img[o : o + k, o : o + k], (n, n), interpolation=cv2.INTER_LINEAR)


def zoom_out_file(path: Path, scale: float) -> None:
    """Redraw a slice at `scale` of its frame, centred, with a black margin."""
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    height, width = img.shape[:2]
    small = cv2.resize(img, (round(width * scale), round(height * scale)), cv2.INTER_AREA)
    out = np.zeros_like(img)
    if out.ndim == 3 and out.shape[2] == 4:
        out[:, :, 3] = 255
    top, left = (height - small.shape[0]) // 2, (width - small.shape[1]) // 2
    out[top : top + small.shape[0], left : left + small.shape[1]] = small
    cv2.imwrite(str(path), out)


IMAGE_SIZE = 32


TINY_MODEL = shipped(BaseModelParams, filters=[4, 8])


def ingest_folder(
    root: Path, source: str = "kaggle", **params: Any
) -> tuple[pd.DataFrame, IngestSummary]:
    """run_ingest on root/<source> into root/artifacts/ingest."""
    return run_ingest(
        shipped(BaseParams, seed=3, image_size=IMAGE_SIZE),
        shipped(IngestParams, source=source, **params),
        root / "artifacts" / "ingest",
        root,
    )


def tiny_split(root: Path, split: str, per_class: int, seed: int) -> pd.DataFrame:
    """A DATASET_COLUMNS frame of 32x32 grey PNGs whose brightness depends on the class."""
    rows = []
    for c, label in enumerate(CLASSES):
        for i in range(per_class):
            rel = f"data/{split}/{label}/{i}.png"
            img = np.random.default_rng(seed + 100 * c + i).integers(0, 60, (32, 32))
            img = (img + 60 * c).astype(np.uint8)
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            ok, buf = cv2.imencode(".png", img)
            assert ok
            path.write_bytes(buf.tobytes())
            rows.append(
                {
                    "path": rel,
                    "label": label,
                    "sha256": sha256_file(path),
                    "source_path": rel,
                    "original": rel,
                }
            )
    return pd.DataFrame(rows, columns=list(DATASET_COLUMNS))


# The body crop and percentile window at 64 px (`.with_size` for another size).
NORMALISED = Preprocessing(64, crop="body", intensity="percentile")


def textured(seed: int = 0) -> np.ndarray:
    """`chest()` with vessels and noise in the lungs, so that resizing errors show."""
    grey = chest().astype(np.float32)
    rng = np.random.default_rng(seed)
    grey += cv2.GaussianBlur(rng.normal(0, 12, grey.shape).astype(np.float32), (3, 3), 0)
    grey[grey < 12] = 0  # the surround stays black
    return np.clip(grey, 0, 255).astype(np.uint8)


def zoomed_out(grey: np.ndarray, share: float, left: float = 0.5, top: float = 0.5) -> np.ndarray:
    """The same slice shrunk to `share` of the frame inside a black margin (a wider field)."""
    height, width = grey.shape
    small = cv2.resize(grey, (round(width * share), round(height * share)), cv2.INTER_AREA)
    out = np.zeros_like(grey)
    y = round((height - small.shape[0]) * top)
    x = round((width - small.shape[1]) * left)
    out[y : y + small.shape[0], x : x + small.shape[1]] = small
    return out


SHIFT = {
    "zoom_out": 0.4,
    "aspect": 0.3,
    "translation": 0.2,
    "gamma": 0.5,
    "window": 0.2,
    "blur": 1.5,
    "noise": 8.0,
}
