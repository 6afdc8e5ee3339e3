"""Builder of a texture-family model folder as promote writes it (card, texture.skops, ood.npz),
fitted on synthetic slices; no TensorFlow is needed. Shared by the serving and stage tiers;
holds no tests."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from chestct.labels import CLASSES, DISPLAY_NAMES
from chestct.model import texture
from chestct.model.calibration import Mahalanobis
from chestct.modelfolder import OOD_FILE, ood_bytes, write_model_folder
from model_folder import ct_slice

SIZE = 64


def slices(n: int, seed0: int, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """n synthetic slices at `size` (classes in turn) and their class indices."""
    images = [
        cv2.resize(ct_slice(seed0 + i, CLASSES[i % len(CLASSES)]), (size, size)) for i in range(n)
    ]
    return np.stack(images), np.arange(n) % len(CLASSES)


def fitted(size: int = SIZE, n: int = 48, max_iter: int = 15) -> texture.TextureModel:
    x, y = slices(n, 0, size)
    xv, yv = slices(16, 5000, size)
    spec = texture.ClassifierSpec(max_iter=max_iter)
    return texture.fit_texture(x, y, xv, yv, spec, seed=0)


def build_texture_folder(folder: Path, version: str = "1") -> Path:
    """model/ of the texture family: every file pinned by its sha256 in the card."""
    parts = folder.with_name(folder.name + ".parts")
    parts.mkdir(parents=True, exist_ok=True)
    model = fitted()
    texture.save(model, parts / "texture.skops")
    x, _ = slices(24, 9000)
    gap = model.standardised(texture.feature_matrix(x))
    ood = Mahalanobis.fit(gap)
    distances = ood.distance(gap)
    card: dict[str, Any] = {
        "name": "chestct",
        "version": version,
        "family": "texture",
        "classes": list(CLASSES),
        "display_names": DISPLAY_NAMES,
        "image_size": SIZE,
        "preprocessing": {"resize": "stretch", "interpolation": "area"},
        "model_file": "texture.skops",
        "temperature": 1.0,
        "thresholds": {"abstain_entropy": 0.9},
        "inference": {
            "file": "texture.skops",
            "runtime": "skops",
        },
        "ood": {
            "method": "mahalanobis_gap",
            "file": OOD_FILE,
            "threshold": float(distances.max() * 1.5),
        },
        "metrics": {"macro_f1": 0.5},
        "mlflow_run_ids": {"train": "0" * 32},
    }
    # The one writer: every file pinned by its sha256, as promote writes a folder.
    files = {"texture.skops": parts / "texture.skops", OOD_FILE: ood_bytes(ood)}
    write_model_folder(folder, card, files)
    shutil.rmtree(parts)
    return folder
