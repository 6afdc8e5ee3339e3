"""ingest: bring a source of chest CT slices into artifacts/ingest/ with a manifest.

Sources (params `ingest.source`): `synthetic` (the embedded default, generated from base.seed), a
local folder, a .zip/.tar.gz/.tgz archive, or an http(s) URL of an archive (with
`ingest.sha256`). The files are laid out as the Kaggle "Chest CT-Scan images" set,
`[train|valid|test/]<class folder>/<file>`; class folders may use the long Kaggle names and are
normalised to the four canonical labels. Every file is decoded by content: PNG, JPEG, BMP, TIFF,
and DICOM (windowed to 8-bit grey through `ingest.window`, stored as PNG). Files that cannot be
decoded are reported by path and skipped.

A source may also be a CSV listing (a file ending in `.csv`): one row per image with columns
`path` (relative to the CSV's folder, or absolute), `label` (a class or class-folder name) and,
optionally, `split` (train | valid | test, on every row or on none) and `group` (any id: slices
sharing it are kept in one split). `relpath` and `class` are accepted for `path` and `label`.

Who a slice belongs to is recorded per file as a salt-free sha256 prefix (chestct.data.grouping):
the DICOM `PatientID` and `StudyInstanceUID`, and the listing's `group`. Raw ids are never
written.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from chestct.data.acquisition import acquisition_features
from chestct.data.dedup import phash
from chestct.data.grouping import hash_id
from chestct.data.manifest import ACQUISITION_COLUMNS, INGEST_COLUMNS, SPLITS, write_manifest
from chestct.data.sources import (
    Source,
    SourceError,
    check_file,
    limits_from,
    read_file,
    resolve,
    scan_source,
)
from chestct.data.synthetic import generate_synthetic
from chestct.fsutil import sha256_bytes
from chestct.imaging.decoding import decode
from chestct.imaging.encoding import encode_png
from chestct.imaging.formats import ImageError, has_dicom_preamble
from chestct.imaging.workers import worker_pool
from chestct.labels import CLASSES, label_for_folder
from chestct.runner import StageFailed, run_main, stage_session
from chestct.settings import BaseParams, IngestParams

log = logging.getLogger(__name__)

SKIPPED_COLUMNS: tuple[str, ...] = ("path", "reason")
# Below this many files the process pool costs more than it saves.
_PARALLEL_FROM = 64


@dataclass(frozen=True)
class IngestSummary:
    files: int
    skipped: list[dict[str, str]]
    counts: dict[str, dict[str, int]]  # split -> label -> files
    source: dict[str, str | None] = field(default_factory=dict)  # kind, origin, sha256
    # ACQUISITION_COLUMNS, one row per distinct content (chestct.data.acquisition)
    acquisition: pd.DataFrame | None = field(default=None, repr=False)


@dataclass(frozen=True)
class _Job:
    split: str
    label: str
    path: Path
    source_name: str
    images_dir: Path
    window: tuple[float, float]
    group_hash: str = ""  # hashed `group` of a CSV listing
    max_bytes: int = 512 * 1024 * 1024  # params ingest.max_file_mb


# Accepted names of a CSV listing's columns (the first found is used).
LISTING_COLUMNS: dict[str, tuple[str, ...]] = {
    "path": ("path", "relpath"),
    "label": ("label", "class"),
    "split": ("split",),
    "group": ("group",),
}


def is_listing(source: str) -> bool:
    """True when `ingest.source` names a CSV listing rather than a folder or an archive."""
    return source.lower().endswith(".csv")


def scan_listing(
    listing: Path, class_map: dict[str, str], max_file_bytes: int | None = None
) -> list[tuple[str, str, Path, str]]:
    """(split, label, file, group) for every row of a CSV listing (see the module docstring).

    A listed file that is a FIFO, a device or larger than `max_file_bytes` is refused.
    """
    if not listing.is_file():
        raise StageFailed(
            f"ingest.source {str(listing)!r}: CSV listing not found; give the path of a CSV "
            "with columns path,label[,split][,group] (relative paths are relative to the "
            "project root)"
        )
    try:
        table = pd.read_csv(listing, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise StageFailed(f"{listing}: not a readable CSV listing ({exc})") from None
    table.columns = [str(c).strip().lower() for c in table.columns]
    found = {
        role: next((n for n in names if n in table.columns), None)
        for role, names in LISTING_COLUMNS.items()
    }
    missing = [role for role in ("path", "label") if found[role] is None]
    if missing:
        raise StageFailed(
            f"{listing}: CSV listing has no {' or '.join(missing)} column (columns: "
            f"{', '.join(table.columns)}); it needs path,label and optionally split and group"
        )
    if table.empty:
        raise StageFailed(f"{listing}: CSV listing has a header but no rows")
    splits = table[found["split"]].str.strip() if found["split"] else pd.Series("", table.index)
    bad_split = sorted(set(splits) - {"", *SPLITS})
    if bad_split:
        raise StageFailed(
            f"{listing}: split column has {bad_split[0]!r}; use train, valid or test"
        )
    if splits.eq("").any() and splits.ne("").any():
        raise StageFailed(
            f"{listing}: row {int(splits.eq('').to_numpy().argmax()) + 2} has no split while "
            "others do; give every row a split, or none (split then carves them)"
        )
    rows: list[tuple[str, str, Path, str]] = []
    for number, (rel, name, split) in enumerate(
        zip(table[found["path"]], table[found["label"]], splits, strict=True), start=2
    ):
        label = label_for_folder(name.strip(), class_map)
        if label not in CLASSES:
            raise StageFailed(
                f"{listing}: row {number}: label {name!r} does not name a class "
                f"({', '.join(CLASSES)}); fix it or map it under ingest.class_map"
            )
        path = Path(rel.strip()).expanduser()
        path = path if path.is_absolute() else listing.parent / path
        if not rel.strip() or not path.is_file():
            raise StageFailed(
                f"{listing}: row {number}: file {rel!r} not found (paths are relative to "
                f"{listing.parent})"
            )
        if max_file_bytes is not None:
            try:
                check_file(path, max_file_bytes)
            except SourceError as exc:
                raise StageFailed(f"{listing}: row {number}: {exc}") from None
        group = table.at[number - 2, found["group"]] if found["group"] else ""
        rows.append((split, label, path, group))
    return rows


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


def _ingest_one(job: _Job) -> dict[str, object]:
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


def _map(jobs: list[_Job], workers: int) -> list[dict[str, object]]:
    bar = {"total": len(jobs), "desc": "ingest", "unit": "file", "leave": False}
    if workers > 1 and len(jobs) >= _PARALLEL_FROM:
        with worker_pool(workers) as pool:
            return list(tqdm(pool.map(_ingest_one, jobs, chunksize=8), **bar))
    return [_ingest_one(j) for j in tqdm(jobs, **bar)]


def run_ingest(
    base: BaseParams,
    params: IngestParams,
    out_dir: Path,
    root: Path,
    workers: int | None = None,
    download_cache: Path | None = None,
) -> tuple[pd.DataFrame, IngestSummary]:
    """Copy every decodable file of the source into out_dir/images and describe it.

    Undecodable files (corrupt, empty, truncated, not an image, DICOM without pixel data or in
    an unsupported transfer syntax) are reported and skipped; they never stop the stage. An
    empty source, or a class with no usable file, does.

    Args:
        download_cache: where a URL source's verified archive is kept and looked for
            (settings `paths.downloads`); None downloads it afresh.

    Returns:
        The manifest (INGEST_COLUMNS) and a summary (with the acquisition features).
    """
    images_dir = out_dir / "images"
    staging = out_dir / ".source"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    limits = limits_from(params)
    try:
        listed: list[tuple[str, str, Path, str]] | None = None
        if params.source == "synthetic":
            generate_synthetic(
                staging / "synthetic",
                base.seed,
                params.synthetic_per_class,
                params.synthetic_shortcut,
                params.synthetic_series,
            )
            source = Source("synthetic", "synthetic", staging / "synthetic")
        elif is_listing(params.source):
            listing = Path(params.source).expanduser()
            listing = (listing if listing.is_absolute() else root / listing).resolve()
            listed = scan_listing(listing, params.class_map, limits.max_file_bytes)
            source = Source("listing", str(listing), listing.parent)
        else:
            try:
                source = resolve(
                    params.source,
                    root,
                    staging,
                    params.sha256.strip(),
                    cache=download_cache,
                    limits=limits,
                )
            except SourceError as exc:
                raise StageFailed(str(exc)) from None
        if listed is None:
            try:
                scanned = scan_source(source.folder, params.class_map, limits.max_file_bytes)
            except SourceError as exc:
                raise StageFailed(str(exc)) from None
            listed = [(s, lbl, p, "") for s, lbl, p in scanned]
        files = listed
        window = (params.window.level, params.window.width)
        jobs = [
            _Job(
                split,
                label,
                path,
                path.relative_to(source.folder).as_posix()
                if source.kind == "synthetic"
                else str(path)
                if source.kind == "listing"
                else source.describe(path),
                images_dir,
                window,
                hash_id(group),
                limits.max_file_bytes,
            )
            for split, label, path, group in files
        ]
        results = _map(jobs, workers or os.cpu_count() or 1)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    rows = [r for r in results if "reason" not in r]
    skipped = [
        {"path": str(r["path"]), "reason": str(r["reason"])} for r in results if "reason" in r
    ]
    for item in skipped:
        log.warning("skipped %s: %s", item["path"], item["reason"])
    if not rows:
        raise StageFailed(
            f"{source.origin}: none of {len(files)} files could be decoded (first: "
            f"{skipped[0]['path']}: {skipped[0]['reason']})"
        )
    acquisition = (
        pd.DataFrame([{"sha256": r["sha256"], **r["acquisition"]} for r in rows])
        .drop_duplicates("sha256")
        .sort_values("sha256")
        .reset_index(drop=True)[list(ACQUISITION_COLUMNS)]
    )
    frame = pd.DataFrame(rows, columns=list(INGEST_COLUMNS))
    frame["path"] = [Path(p).relative_to(root).as_posix() for p in frame["path"]]
    missing = [c for c in CLASSES if c not in set(frame["label"])]
    if missing:
        raise StageFailed(
            f"{source.origin}: no usable file for class(es) {', '.join(missing)}; add a class "
            "folder for each (or map a folder name to it with ingest.class_map)"
        )
    counts: dict[str, dict[str, int]] = {}
    for (split, label), n in frame.groupby(["split", "label"]).size().items():
        counts.setdefault(split or "all", {})[label] = int(n)
    info = {"kind": source.kind, "origin": source.origin, "sha256": source.archive_sha256}
    return frame, IngestSummary(
        files=len(frame), skipped=skipped, counts=counts, source=info, acquisition=acquisition
    )


def main() -> None:
    with stage_session("ingest") as session:
        s = session.settings
        frame, summary = run_ingest(
            s.params.base,
            s.params.ingest,
            session.out_dir,
            s.paths.root,
            download_cache=s.paths.downloads,
        )
        manifest = session.out_dir / "manifest.csv"
        write_manifest(manifest, frame)
        acquisition = session.out_dir / "acquisition.csv"
        write_manifest(acquisition, summary.acquisition)
        skipped = session.out_dir / "skipped.csv"
        write_manifest(skipped, pd.DataFrame(summary.skipped, columns=list(SKIPPED_COLUMNS)))
        # What was read from the source, one row per image (MLflow computes the digest).
        session.log_manifest(f"source {summary.source['kind']}", manifest, frame, context="source")
        log.info(
            "ingested %d files from %s %s (%d skipped): %s",
            summary.files,
            summary.source["kind"],
            summary.source["origin"],
            len(summary.skipped),
            summary.counts,
        )
        session.finish(
            inputs=[],
            outputs={
                "manifest": manifest,
                "acquisition": acquisition,
                "skipped": skipped,
                "images": session.out_dir / "images",
            },
            metrics={
                "files": summary.files,
                "skipped": len(summary.skipped),
                "counts": summary.counts,
            },
            details={"skipped": summary.skipped, "source": summary.source},
        )


if __name__ == "__main__":
    run_main("ingest", main)
