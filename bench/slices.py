"""Decoded grey slices for the per-slice benches (acquisition_features.py, monitoring_signals.py).

Not a bench itself: the benches run as `python bench/<name>.py`, so this folder is on their
import path.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from chestct.data.synthetic import generate_synthetic
from chestct.imaging.decoding import decode

SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def decoded_slices(source: Path | None) -> list[np.ndarray]:
    """Every image under `source` decoded to 8-bit grey; without a source, the 200 slices of
    the embedded synthetic default's train split (mixed sizes and modes), generated in a
    temporary folder. Exits with a message when the folder holds no image."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = source
        if folder is None:
            folder = Path(tmp)
            generate_synthetic(folder, 0, {"train": 50, "valid": 0, "test": 0})
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in SUFFIXES)
        greys = [decode(p.read_bytes()).grey for p in files]
    if not greys:
        raise SystemExit(f"{folder}: no image files")
    return greys
