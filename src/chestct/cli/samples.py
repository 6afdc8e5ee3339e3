"""Write sample slices for trying the service: `python -m chestct.cli.samples`.

    python -m chestct.cli.samples                      # slice.png and slice.dcm in this folder
    python -m chestct.cli.samples --label normal --seed 7 --out /tmp/samples

The slices come from the synthetic generator (seeds outside those the embedded default uses), so
they are images the default model has never seen, rendered and then exported as the embedded
dataset's files are (chestct.data.synthetic.dataset_slice: a new patient, 180-520 px wide, not
square, grey or colour PNG). A square 256 px render sent as is would differ from every
reference slice in size, framing and grey level, and the monitor would rightly call a stream of
them drift. DICOM goes through the lung window backwards, as a scanner export in Hounsfield
units would.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from chestct.data.synthetic import dataset_slice
from chestct.fsutil import atomic_write_bytes
from chestct.imaging.encoding import encode_dicom, encode_png
from chestct.labels import CLASSES

# Far from the seeds the embedded default derives from base.seed (small integers).
_SAMPLE_SEED_OFFSET = 10_000_019


def sample_slice(label: str, seed: int) -> np.ndarray:
    """One slice of `label` as the embedded dataset's files hold them (grey, RGB or RGBA)."""
    if label not in CLASSES:
        raise ValueError(f"unknown label {label!r}; use one of {', '.join(CLASSES)}")
    seq, patient = np.random.SeedSequence([_SAMPLE_SEED_OFFSET, seed]).spawn(2)
    # A slice of a new patient, drawn as the embedded default draws its series
    # (ingest.synthetic_series > 1: the patient's grey-level field and a jitter).
    return dataset_slice(label, seq, patient)


def write_samples(out_dir: Path, label: str, seed: int) -> tuple[Path, Path]:
    """Write one slice of `label` as slice.png and slice.dcm (the same grey pixels) in
    `out_dir`."""
    image = sample_slice(label, seed)
    # Grey in every channel: written as a grey PNG, a third of the size of an RGB one (the
    # README sends it base64 inside one curl argument, which Linux caps at 128 KiB); decoding
    # gives the same grey slice either way.
    grey = np.ascontiguousarray(image if image.ndim == 2 else image[..., 0])
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
