"""ingest: bring a source of chest CT slices into artifacts/ingest/ with a manifest.

Sources (params `ingest.source`): `synthetic` (the embedded default, generated from base.seed), a
local folder, a .zip/.tar.gz/.tgz archive, or an http(s) URL of an archive (with
`ingest.sha256`), laid out as the Kaggle "Chest CT-Scan images" set (chestct.data.sources), or a
CSV listing of files (chestct.data.listing). Every file is decoded by content and copied in
(chestct.data.intake): PNG, JPEG, BMP, TIFF, and DICOM (windowed to 8-bit grey through
`ingest.window`, stored as PNG). Files that cannot be decoded are reported by path and skipped.

Who a slice belongs to is recorded per file as a salt-free sha256 prefix (chestct.data.grouping):
the DICOM `PatientID` and `StudyInstanceUID`, and the listing's `group`. Raw ids are never
written.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from chestct.data.grouping import hash_id
from chestct.data.intake import IngestJob, ingest_files
from chestct.data.listing import is_listing, scan_listing
from chestct.data.manifest import ACQUISITION_COLUMNS, INGEST_COLUMNS, write_manifest
from chestct.data.source_limits import SourceError, SourceLimits, limits_from
from chestct.data.sources import Source, resolve, scan_source
from chestct.data.synthetic import generate_synthetic
from chestct.labels import CLASSES
from chestct.runner import StageFailed, run_main, stage_session
from chestct.settings import BaseParams, IngestParams

log = logging.getLogger(__name__)

SKIPPED_COLUMNS: tuple[str, ...] = ("path", "reason")


@dataclass(frozen=True)
class IngestSummary:
    files: int
    skipped: list[dict[str, str]]
    counts: dict[str, dict[str, int]]  # split -> label -> files
    source: dict[str, str | None] = field(default_factory=dict)  # kind, origin, sha256
    # ACQUISITION_COLUMNS, one row per distinct content (chestct.data.acquisition)
    acquisition: pd.DataFrame | None = field(default=None, repr=False)


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
        try:
            source, files = _source(base, params, root, staging, limits, download_cache)
        except SourceError as exc:
            raise StageFailed(str(exc)) from None
        window = (params.window.level, params.window.width)
        jobs = [
            IngestJob(
                split,
                label,
                path,
                _source_name(source, path),
                images_dir,
                window,
                hash_id(group),
                limits.max_file_bytes,
            )
            for split, label, path, group in files
        ]
        results = ingest_files(jobs, workers or os.cpu_count() or 1)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _manifest(results, source, len(files), root)


def _source(
    base: BaseParams,
    params: IngestParams,
    root: Path,
    staging: Path,
    limits: SourceLimits,
    download_cache: Path | None,
) -> tuple[Source, list[tuple[str, str, Path, str]]]:
    """The source made local and its files: (split, label, file, group) each."""
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
        return Source("listing", str(listing), listing.parent), listed
    else:
        source = resolve(
            params.source,
            root,
            staging,
            params.sha256.strip(),
            cache=download_cache,
            limits=limits,
        )
    scanned = scan_source(source.folder, params.class_map, limits.max_file_bytes)
    return source, [(s, lbl, p, "") for s, lbl, p in scanned]


def _source_name(source: Source, path: Path) -> str:
    """How the manifest names a file of the source."""
    if source.kind == "synthetic":
        return path.relative_to(source.folder).as_posix()
    if source.kind == "listing":
        return str(path)
    return source.describe(path)


def _manifest(
    results: list[dict[str, object]], source: Source, files: int, root: Path
) -> tuple[pd.DataFrame, IngestSummary]:
    """The manifest of the copied files and the summary; a source with no usable file, or
    none for a class, stops the stage."""
    rows = [r for r in results if "reason" not in r]
    skipped = [
        {"path": str(r["path"]), "reason": str(r["reason"])} for r in results if "reason" in r
    ]
    for item in skipped:
        log.warning("skipped %s: %s", item["path"], item["reason"])
    if not rows:
        raise StageFailed(
            f"{source.origin}: none of {files} files could be decoded (first: "
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
