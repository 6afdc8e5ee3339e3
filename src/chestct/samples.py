"""Write sample slices for trying the service: `python -m chestct.samples`.

    python -m chestct.samples                      # slice.png and slice.dcm in this folder
    python -m chestct.samples --label normal --seed 7 --out /tmp/samples

The slices come from the synthetic generator (seeds outside those the embedded default uses), so
they are images the default model has never seen. DICOM goes through the lung window backwards,
as a scanner export in Hounsfield units would.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from chestct.fsutil import atomic_write_bytes
from chestct.imaging import encode_dicom, encode_png
from chestct.labels import CLASSES
from chestct.synthetic import render_slice

# Far from the seeds the embedded default derives from base.seed (small integers).
_SAMPLE_SEED_OFFSET = 10_000_019


def write_samples(out_dir: Path, label: str, seed: int, size: int = 256) -> tuple[Path, Path]:
    """Render one slice of `label` and write it as slice.png and slice.dcm in `out_dir`."""
    if label not in CLASSES:
        raise ValueError(f"unknown label {label!r}; use one of {', '.join(CLASSES)}")
    grey = render_slice(label, np.random.default_rng(_SAMPLE_SEED_OFFSET + seed), size=size)
    png, dcm = out_dir / "slice.png", out_dir / "slice.dcm"
    atomic_write_bytes(png, encode_png(grey))
    atomic_write_bytes(dcm, encode_dicom(grey))
    return png, dcm


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write slice.png and slice.dcm to try /predict.")
    parser.add_argument("--label", default="squamous_cell_carcinoma", choices=CLASSES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path.cwd())
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    # Say which class was written: the service's answer can then be checked against it.
    for path in write_samples(args.out, args.label, args.seed):
        print(f"{path}: a synthetic {args.label} slice (seed {args.seed})")


if __name__ == "__main__":
    main()
