"""Manifests: the CSV tables that hand the dataset from stage to stage."""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd

from chestct.fsutil import atomic_write_text

SPLITS: tuple[str, ...] = ("train", "valid", "test")

# One row per file found at ingest.
INGEST_COLUMNS: tuple[str, ...] = (
    "split",  # train | valid | test, or "" when the source has no split folders
    "label",
    "path",  # the ingested copy, relative to the project root
    "source_path",  # where it came from
    "sha256",
    "width",
    "height",
    "mode",
    "format",
    "bytes",
    "phash",  # 256-bit perceptual hash (64 hex digits) of the decoded slice: near duplicates
    # Who the slice belongs to, as salt-free sha256 prefixes (chestct.data.grouping), "" if
    # unknown:
    "patient_hash",  # DICOM PatientID
    "study_hash",  # DICOM StudyInstanceUID
    "group_hash",  # the `group` column of a CSV listing source
)


# One row per distinct content, written by ingest: chestct.data.acquisition's features of the
# slice.
ACQUISITION_COLUMNS: tuple[str, ...] = (
    "sha256",
    "width",
    "height",
    "frame_mean",
    "body_share",
    "body_aspect",
    "body_found",
    "background",
    "body_p05",
    "body_p50",
    "body_p95",
)

# One row per distinct content, written by resize.
INDEX_COLUMNS: tuple[str, ...] = ("sha256", "resized", "ok", "error", "mean", "std")

# One row per image of a split, written by validate: what train and evaluate read.
# `original` is the ingested file, for re-preparing at another size (promote's re-scoring).
DATASET_COLUMNS: tuple[str, ...] = ("path", "label", "sha256", "source_path", "original")


class ManifestError(ValueError):
    """A manifest is missing or lacks columns."""


def write_manifest(path: Path, frame: pd.DataFrame) -> None:
    buf = io.StringIO()
    frame.to_csv(buf, index=False)
    atomic_write_text(path, buf.getvalue())


def read_manifest(path: Path, required: tuple[str, ...] = ()) -> pd.DataFrame:
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    frame = pd.read_csv(
        path,
        dtype={
            "split": "string",
            "sha256": "string",
            "phash": "string",
            "patient_hash": "string",
            "study_hash": "string",
            "group_hash": "string",
        },
        keep_default_na=False,
    )
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise ManifestError(f"{path}: missing column(s) {', '.join(missing)}")
    return frame
