"""resize: every split image decoded by content, made grey, and resized to base.image_size.

Work runs in parallel over processes. Output images are named by the source's sha256, so a
file present in two splits (a leak that validate reports) is resized once.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from chestct.fsutil import atomic_write_bytes
from chestct.imaging import ImageError, encode_png, prepare
from chestct.manifest import INDEX_COLUMNS, INGEST_COLUMNS, SPLITS, read_manifest, write_manifest
from chestct.pointers import read_pointer
from chestct.runner import run_main, stage_session
from chestct.settings import ResizeParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Job:
    source: Path
    target: Path
    size: int
    interpolation: str


def _resize_one(job: _Job) -> dict[str, object]:
    try:
        grey = prepare(job.source.read_bytes(), job.size, job.interpolation)
    except (ImageError, OSError) as exc:
        return {"ok": False, "error": str(exc), "mean": float("nan"), "std": float("nan")}
    atomic_write_bytes(job.target, encode_png(grey))
    return {"ok": True, "error": "", "mean": float(grey.mean()), "std": float(grey.std())}


def run_resize(
    manifests: dict[str, pd.DataFrame],
    params: ResizeParams,
    image_size: int,
    out_dir: Path,
    root: Path,
    workers: int | None = None,
) -> pd.DataFrame:
    """Resize the union of the split manifests; returns one index row per distinct content."""
    rows = pd.concat(manifests.values()).drop_duplicates("sha256")
    images = out_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    jobs = [
        _Job(root / p, images / f"{sha}.png", image_size, params.interpolation)
        for sha, p in zip(rows["sha256"], rows["path"], strict=True)
    ]
    workers = workers or os.cpu_count() or 1
    if workers > 1 and len(jobs) > 32:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(
                tqdm(
                    pool.map(_resize_one, jobs, chunksize=16),
                    total=len(jobs),
                    desc="resize",
                    unit="img",
                    leave=False,
                )
            )
    else:
        results = [_resize_one(j) for j in tqdm(jobs, desc="resize", unit="img", leave=False)]
    index = pd.DataFrame(results)
    index.insert(0, "sha256", rows["sha256"].to_numpy())
    index.insert(
        1,
        "resized",
        [
            j.target.relative_to(root).as_posix() if r["ok"] else ""
            for j, r in zip(jobs, results, strict=True)
        ],
    )
    return index[list(INDEX_COLUMNS)]


def main() -> None:
    with stage_session("resize") as session:
        s = session.settings
        split = read_pointer(s.paths, "split")
        manifests = {
            name: read_manifest(split.output_path(name, s.paths.root), INGEST_COLUMNS)
            for name in SPLITS
        }
        index = run_resize(
            manifests, s.params.resize, s.params.base.image_size, session.out_dir, s.paths.root
        )
        index_path = session.out_dir / "index.csv"
        write_manifest(index_path, index)
        failed = int((~index["ok"]).sum())
        log.info("resized %d images, %d failed", len(index) - failed, failed)
        session.finish(
            inputs=["split"],
            outputs={"index": index_path, "images": session.out_dir / "images"},
            metrics={"resized": len(index) - failed, "failed": failed},
        )


if __name__ == "__main__":
    run_main("resize", main)
