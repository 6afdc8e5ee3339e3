"""ingest: bring a source of chest CT slices into artifacts/ingest/ with a manifest.

Sources (params `ingest.source`): `synthetic` (the embedded default, generated from base.seed) or
a local folder in the layout of the Kaggle "Chest CT-Scan images" set:
`[train|valid|test/]<class folder>/<image>`. Class folders may use the long Kaggle names; they are
normalised to the four canonical labels.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from chestct.fsutil import sha256_bytes
from chestct.imaging import ImageError, decode
from chestct.labels import CLASSES, label_for_folder
from chestct.manifest import INGEST_COLUMNS, SPLITS, write_manifest
from chestct.runner import StageFailed, run_main, stage_session
from chestct.settings import BaseParams, IngestParams
from chestct.synthetic import generate_synthetic

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


@dataclass(frozen=True)
class IngestSummary:
    files: int
    skipped: list[dict[str, str]]
    counts: dict[str, dict[str, int]]  # split -> label -> files


def _class_folders(folder: Path, class_map: dict[str, str]) -> list[tuple[Path, str]]:
    found = []
    for child in sorted(p for p in folder.iterdir() if p.is_dir()):
        label = label_for_folder(child.name, class_map)
        if label is None:
            raise StageFailed(
                f"{child}: folder name does not name a class ({', '.join(CLASSES)}); rename it "
                "or map it in params.yaml under ingest.class_map"
            )
        if label not in CLASSES:
            raise StageFailed(
                f"ingest.class_map maps {child.name!r} to {label!r}, which is not one of "
                f"{', '.join(CLASSES)}"
            )
        found.append((child, label))
    return found


def scan_source(source: Path, class_map: dict[str, str]) -> list[tuple[str, str, Path]]:
    """(split, label, file) for every image file in a Kaggle-layout folder.

    Split folders are optional: a folder with class folders directly in it has no splits ("").
    """
    if not source.is_dir():
        raise StageFailed(
            f"ingest.source {str(source)!r} is not a folder; use `synthetic` or a folder in the "
            "layout [train|valid|test/]<class>/<image>"
        )
    split_dirs = [source / s for s in SPLITS if (source / s).is_dir()]
    groups = [(d.name, d) for d in split_dirs] if split_dirs else [("", source)]
    files: list[tuple[str, str, Path]] = []
    for split, folder in groups:
        class_dirs = _class_folders(folder, class_map)
        if not class_dirs:
            raise StageFailed(f"{folder}: no class folders in it")
        for class_dir, label in class_dirs:
            images = sorted(
                p for p in class_dir.rglob("*") if p.is_file() and not p.name.startswith(".")
            )
            if not images:
                raise StageFailed(f"{class_dir}: class folder has no files")
            files.extend((split, label, p) for p in images)
    if not files:
        raise StageFailed(f"{source}: no image files found")
    return files


def run_ingest(
    base: BaseParams, params: IngestParams, out_dir: Path, root: Path
) -> tuple[pd.DataFrame, IngestSummary]:
    """Copy every decodable image of the source into out_dir/images and describe it.

    Undecodable files are reported and skipped; they never stop the stage.

    Returns:
        The manifest (INGEST_COLUMNS) and a summary.
    """
    images_dir = out_dir / "images"
    staging = out_dir / ".synthetic"
    if params.source == "synthetic":
        if staging.exists():
            shutil.rmtree(staging)
        generate_synthetic(staging, base.seed, params.synthetic_per_class)
        source = staging
    else:
        source = (root / params.source).resolve()
    try:
        files = scan_source(source, params.class_map)
        rows, skipped = [], []
        for split, label, path in tqdm(files, desc="ingest", unit="file", leave=False):
            data = path.read_bytes()
            try:
                info = decode(data)
            except ImageError as exc:
                skipped.append({"path": str(path), "reason": str(exc)})
                log.warning("skipped %s: %s", path, exc)
                continue
            digest = sha256_bytes(data)
            target = images_dir / (split or "all") / label / f"{digest[:12]}_{path.name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            source_name = path.relative_to(source).as_posix() if source == staging else str(path)
            rows.append(
                {
                    "split": split,
                    "label": label,
                    "path": target.relative_to(root).as_posix(),
                    "source_path": source_name,
                    "sha256": digest,
                    "width": info.width,
                    "height": info.height,
                    "mode": info.mode,
                    "format": info.format,
                    "bytes": len(data),
                }
            )
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    if not rows:
        raise StageFailed(f"{source}: none of {len(files)} files could be decoded")
    frame = pd.DataFrame(rows, columns=list(INGEST_COLUMNS))
    counts: dict[str, dict[str, int]] = {}
    for (split, label), n in frame.groupby(["split", "label"]).size().items():
        counts.setdefault(split or "all", {})[label] = int(n)
    return frame, IngestSummary(files=len(frame), skipped=skipped, counts=counts)


def main() -> None:
    with stage_session("ingest") as session:
        s = session.settings
        frame, summary = run_ingest(s.params.base, s.params.ingest, session.out_dir, s.paths.root)
        manifest = session.out_dir / "manifest.csv"
        write_manifest(manifest, frame)
        log.info(
            "ingested %d files (%d skipped): %s",
            summary.files,
            len(summary.skipped),
            summary.counts,
        )
        session.finish(
            inputs=[],
            outputs={"manifest": manifest, "images": session.out_dir / "images"},
            metrics={
                "files": summary.files,
                "skipped": len(summary.skipped),
                "counts": summary.counts,
            },
            details={"skipped": summary.skipped, "source": s.params.ingest.source},
        )


if __name__ == "__main__":
    run_main("ingest", main)
