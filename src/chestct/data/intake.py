"""Copying one source file into the ingest folder: decode it, store it, describe it.

`ingest_files` runs `IngestJob`s (a process pool from 64 files on): each file is read with its
size cap, decoded by content, stored as it came (DICOM windowed to 8-bit grey and stored as PNG)
under `<split>/<label>/<sha256 prefix>_<name>`, and described by a manifest row: digest, size,
format, perceptual hash, hashed patient, study and group ids (chestct.data.grouping) and the
acquisition features (chestct.data.acquisition). A file that cannot be used gives a row with a
`reason` instead.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from chestct.data.acquisition import acquisition_features
from chestct.data.dedup import phash
from chestct.data.grouping import hash_id
from chestct.data.source_limits import SourceError
from chestct.data.sources import read_file
from chestct.fsutil import sha256_bytes
from chestct.imaging.decoding import decode
from chestct.imaging.encoding import encode_png
from chestct.imaging.formats import ImageError, has_dicom_preamble
from chestct.imaging.workers import worker_pool

# Below this many files the process pool costs more than it saves.
_PARALLEL_FROM = 64


@dataclass(frozen=True)
class IngestJob:
    """One file to copy in: where it goes (split, label) and how the manifest names it."""

    split: str
    label: str
    path: Path
    source_name: str
    images_dir: Path
    window: tuple[float, float]
    group_hash: str = ""  # hashed `group` of a CSV listing
    max_bytes: int = 512 * 1024 * 1024  # params ingest.max_file_mb


def dicom_identity(data: bytes) -> tuple[str, str]:
    """(hashed PatientID, hashed StudyInstanceUID) of DICOM bytes; '' for an absent tag.

    Only these two tags are read (no pixels); a file pydicom cannot parse gives ('', '').
    """
    import pydicom  # imported here: only DICOM sources pay for it

    try:
        ds = pydicom.dcmread(
            io.BytesIO(data),
            force=not has_dicom_preamble(data),
            stop_before_pixels=True,
            specific_tags=["PatientID", "StudyInstanceUID"],
        )
    except Exception:  # any parse failure means "no identity", never a crash
        return "", ""
    return hash_id(ds.get("PatientID", "")), hash_id(ds.get("StudyInstanceUID", ""))


def _write_new(path: Path, data: bytes) -> None:
    """Write beside and rename: two workers writing one name never interleave. The stage's
    output is thrown away on failure, so a crash needs no fsync here."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _ingest_one(job: IngestJob) -> dict[str, object]:
    """Decode one file and store its copy; a dict with `reason` when it cannot be used."""
    try:
        data = read_file(job.path, job.max_bytes)  # a FIFO swapped in is refused, not waited on
    except OSError as exc:
        return {"path": job.source_name, "reason": f"cannot be read: {exc.strerror or exc}"}
    except SourceError as exc:
        return {"path": job.source_name, "reason": str(exc)}
    try:
        info = decode(data, job.window)
    except ImageError as exc:
        return {"path": job.source_name, "reason": str(exc)}
    # DICOM is stored windowed, as PNG: every later stage and the model see 8-bit grey.
    stored = encode_png(info.grey) if info.format == "dicom" else data
    name = job.path.name if info.format != "dicom" else f"{job.path.stem or 'slice'}.png"
    patient, study = dicom_identity(data) if info.format == "dicom" else ("", "")
    digest = sha256_bytes(stored)
    target = job.images_dir / (job.split or "all") / job.label / f"{digest[:12]}_{name}"
    target.parent.mkdir(parents=True, exist_ok=True)
    _write_new(target, stored)
    return {
        "split": job.split,
        "label": job.label,
        "path": target,
        "source_path": job.source_name,
        "sha256": digest,
        "width": info.width,
        "height": info.height,
        "mode": info.mode,
        "format": info.format,
        "bytes": len(data),
        "phash": phash(info.grey),
        "patient_hash": patient,
        "study_hash": study,
        "group_hash": job.group_hash,
        "acquisition": acquisition_features(info.grey),
    }


def ingest_files(jobs: list[IngestJob], workers: int) -> list[dict[str, object]]:
    """Every job's manifest row (or `reason`), in the jobs' order."""
    bar = {"total": len(jobs), "desc": "ingest", "unit": "file", "leave": False}
    if workers > 1 and len(jobs) >= _PARALLEL_FROM:
        with worker_pool(workers) as pool:
            return list(tqdm(pool.map(_ingest_one, jobs, chunksize=8), **bar))
    return [_ingest_one(j) for j in tqdm(jobs, **bar)]
