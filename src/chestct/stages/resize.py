"""resize: every split image decoded by content, made grey, and made base.image_size square.

The work is `imaging.prepare`, the same function the predictor calls, run in parallel over
processes (`resize.workers`, 0 = all cores). Output images are named by the source's sha256, so
a file present in two splits (a leak that validate reports) is resized once.

The stage is incremental: `images/` survives between runs (dvc.yaml marks the output
`persist: true`, and the stage session keeps it), and `images.json` records the settings that
made it (the Preprocessing's size, interpolation, mode, crop and intensity settings and the
preprocessing version).
While those are unchanged, an image whose source digest already has a complete PNG is not
redone; when they change, the folder is rebuilt. Images no longer in any split are pruned so
the folder holds exactly what the index lists.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from chestct.data.manifest import (
    INDEX_COLUMNS,
    INGEST_COLUMNS,
    SPLITS,
    read_manifest,
    write_manifest,
)
from chestct.fsutil import atomic_write_json
from chestct.imaging.formats import ImageError
from chestct.imaging.preparation import Preprocessing, prepare
from chestct.imaging.workers import worker_pool
from chestct.pointers import read_pointer
from chestct.runner import run_main, stage_session

log = logging.getLogger(__name__)

# Bump when `imaging.prepare` changes what it produces, so cached images are rebuilt.
PREPROCESSING_VERSION = 4  # 4: body crop and intensity normalisation
KEEP: tuple[str, ...] = ("images", "images.json")
_PNG_END = b"IEND\xaeB`\x82"
_PARALLEL_FROM = 32


@dataclass(frozen=True)
class _Job:
    source: Path
    target: Path
    prep: Preprocessing
    reuse: bool  # the target is a complete PNG made with the same settings


@dataclass(frozen=True)
class ResizeSummary:
    resized: int
    reused: int
    failed: int
    pruned: int


def _complete_png(path: Path) -> bool:
    """A PNG that was written to the end (a crash mid-write cannot leave this true)."""
    try:
        size = path.stat().st_size
        if size < 64:
            return False
        with path.open("rb") as fh:
            fh.seek(size - len(_PNG_END))
            return fh.read() == _PNG_END
    except OSError:
        return False


def _stats(grey: np.ndarray) -> tuple[float, float]:
    mean, std = cv2.meanStdDev(grey)
    return float(mean[0, 0]), float(std[0, 0])


# What a worker sends back per image: (ok, error, mean, std, reused). A plain tuple keeps the
# pickling between processes cheap next to the image work.
_Result = tuple[bool, str, float, float, bool]


def _resize_one(job: _Job) -> _Result:
    if job.reuse:
        grey = cv2.imread(str(job.target), cv2.IMREAD_GRAYSCALE)
        if grey is not None and grey.shape == (job.prep.size, job.prep.size):
            return (True, "", *_stats(grey), True)
    try:
        grey = prepare(job.source.read_bytes(), job.prep)
    except (ImageError, OSError) as exc:
        return (False, str(exc), float("nan"), float("nan"), False)
    # OpenCV encodes and writes in one call (no copy through Python); the temporary name
    # keeps the .png suffix that picks the encoder, and the rename makes the file appear whole.
    tmp = job.target.with_name(f".{job.target.stem}.{os.getpid()}.tmp.png")
    if not cv2.imwrite(str(tmp), grey):
        tmp.unlink(missing_ok=True)
        return (False, f"could not write {job.target}", float("nan"), float("nan"), False)
    tmp.replace(job.target)
    return (True, "", *_stats(grey), False)


def _fingerprint(prep: Preprocessing) -> dict[str, object]:
    """What made the images (images.json and the pointer's details; DICOM never reaches resize,
    ingest stored it windowed, so the window is not part of it)."""
    return {
        "image_size": prep.size,
        "interpolation": prep.interpolation,
        "mode": prep.resize,
        "crop": prep.crop,
        "crop_margin": prep.crop_margin,
        "intensity": prep.intensity,
        "percentiles": list(prep.percentiles),
        "clahe_clip": prep.clahe_clip,
        "preprocessing_version": PREPROCESSING_VERSION,
    }


def run_resize(
    manifests: dict[str, pd.DataFrame],
    prep: Preprocessing,
    out_dir: Path,
    root: Path,
    workers: int = 0,
) -> tuple[pd.DataFrame, ResizeSummary]:
    """Prepare the union of the split manifests with `prep` into `out_dir/images`.

    Returns one index row per distinct content (INDEX_COLUMNS) and what was made, reused,
    failed and pruned.

    Args:
        workers: processes; 0 means all cores (params `resize.workers`).
    """
    rows = pd.concat(manifests.values()).drop_duplicates("sha256")
    images = out_dir / "images"
    stamp = out_dir / "images.json"
    fingerprint = _fingerprint(prep)
    previous = json.loads(stamp.read_text(encoding="utf-8")) if stamp.is_file() else None
    if previous != fingerprint and images.exists():
        log.info(
            "resize settings changed (%s -> %s): rebuilding all images", previous, fingerprint
        )
        shutil.rmtree(images)
    images.mkdir(parents=True, exist_ok=True)
    # The stamp goes first: a run that dies half-way leaves complete PNGs made with these
    # settings, which the next run may reuse.
    atomic_write_json(stamp, fingerprint)

    wanted = {f"{sha}.png" for sha in rows["sha256"]}
    pruned = 0
    for path in images.iterdir():
        if path.name not in wanted:
            path.unlink()
            pruned += 1
    jobs = [
        _Job(root / p, images / f"{sha}.png", prep, reuse=_complete_png(images / f"{sha}.png"))
        for sha, p in zip(rows["sha256"], rows["path"], strict=True)
    ]
    workers = workers or os.cpu_count() or 1
    bar = {"total": len(jobs), "desc": "resize", "unit": "img", "leave": False}
    todo = sum(not j.reuse for j in jobs)
    if workers > 1 and todo >= _PARALLEL_FROM:
        # Chunks of up to 16 images: big enough that the pool's per-task cost is small next to
        # the decoding, small enough that the workers finish close together.
        chunk = max(1, min(16, len(jobs) // (workers * 8)))
        with worker_pool(min(workers, todo)) as pool:
            results = list(tqdm(pool.map(_resize_one, jobs, chunksize=chunk), **bar))
    else:
        results = [_resize_one(j) for j in tqdm(jobs, **bar)]
    reused = sum(r[4] for r in results)
    index = pd.DataFrame([r[:4] for r in results], columns=["ok", "error", "mean", "std"])
    index.insert(0, "sha256", rows["sha256"].to_numpy())
    index.insert(
        1,
        "resized",
        [
            j.target.relative_to(root).as_posix() if r[0] else ""
            for j, r in zip(jobs, results, strict=True)
        ],
    )
    failed = int((~index["ok"].astype(bool)).sum())
    summary = ResizeSummary(
        resized=len(index) - failed - reused, reused=reused, failed=failed, pruned=pruned
    )
    return index[list(INDEX_COLUMNS)], summary


def main() -> None:
    with stage_session("resize", keep=KEEP) as session:
        s = session.settings
        split = read_pointer(s.paths, "split")
        manifests = {
            name: read_manifest(split.output_path(name, s.paths.root), INGEST_COLUMNS)
            for name in SPLITS
        }
        prep = Preprocessing.from_params(
            s.params.resize, s.params.base.image_size, s.params.ingest.window
        )
        index, summary = run_resize(
            manifests, prep, session.out_dir, s.paths.root, s.params.resize.workers
        )
        index_path = session.out_dir / "index.csv"
        write_manifest(index_path, index)
        log.info(
            "resize: %d images made, %d reused, %d failed, %d stale removed",
            summary.resized,
            summary.reused,
            summary.failed,
            summary.pruned,
        )
        # How much this run made, reused or pruned depends on what the folder held before (the
        # stage is incremental): MLflow records it; the pointer, which DVC hashes, does not.
        session.log_metrics(
            {"made": summary.resized, "reused": summary.reused, "pruned": summary.pruned}
        )
        session.finish(
            inputs=["split"],
            outputs={"index": index_path, "images": session.out_dir / "images"},
            metrics={"resized": summary.resized + summary.reused, "failed": summary.failed},
            details={"settings": _fingerprint(prep)},
        )


if __name__ == "__main__":
    run_main("resize", main)
