"""The four canonical classes and the mapping from folder names found in the wild."""

from __future__ import annotations

import re
from collections.abc import Mapping

CLASSES: tuple[str, ...] = (
    "adenocarcinoma",
    "large_cell_carcinoma",
    "squamous_cell_carcinoma",
    "normal",
)

DISPLAY_NAMES: dict[str, str] = {
    "adenocarcinoma": "Adenocarcinoma",
    "large_cell_carcinoma": "Large cell carcinoma",
    "squamous_cell_carcinoma": "Squamous cell carcinoma",
    "normal": "Normal",
}

# Prefixes of normalised folder names: the Kaggle set uses long names such as
# "large.cell.carcinoma_left.hilum_T2_N2_M0_IIIa" in train/valid and short ones in test.
_PREFIXES: tuple[tuple[str, str], ...] = (
    ("adenocarcinoma", "adenocarcinoma"),
    ("large_cell", "large_cell_carcinoma"),
    ("squamous", "squamous_cell_carcinoma"),
    ("normal", "normal"),
)


def _normalise(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.strip().lower()).strip("_")


def label_for_folder(folder: str, class_map: Mapping[str, str] | None = None) -> str | None:
    """Canonical label for a class-folder name, or None when it names no known class.

    `class_map` (params `ingest.class_map`) is tried first, on exact and normalised names.
    """
    if class_map:
        for key, label in class_map.items():
            if folder == key or _normalise(folder) == _normalise(key):
                return label
    norm = _normalise(folder)
    for prefix, label in _PREFIXES:
        if norm.startswith(prefix):
            return label
    return None
