"""Throughput of the resize stage against a bare OpenCV decode + resize loop.

    python bench/resize.py [--source FOLDER] [--size 128] [--workers N] [--repeat 3]

Without --source, 600 chest-CT-like PNGs (synthetic, mixed sizes and modes) are generated in a
temporary folder. The bare loop reads each file, decodes it with `cv2.imdecode(...,
IMREAD_GRAYSCALE)` and resizes it with INTER_AREA, nothing else; its single-process rate times
the number of workers is the ideal the stage is held to (pools run one OpenCV thread per process,
as the stage does). The stage (`run_resize`) additionally converts any mode to grey, encodes and
writes a PNG per image and computes its statistics.
Each round runs the contenders back to back so that load changes hit all alike; ratios are
taken within each round, and the median over the rounds is reported with its range. Reported:
images/s of each, the ratio stage / (bare x workers) (target >= 0.8), and the incremental case
(a second run over the same output, every image reused).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from chestct.data.manifest import INGEST_COLUMNS
from chestct.imaging.preparation import Preprocessing
from chestct.imaging.workers import single_threaded
from chestct.settings import ResizeParams, defaults
from chestct.stages.resize import run_resize

SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def _bare(args: tuple[str, int]) -> int:
    path, size = args
    grey = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_GRAYSCALE)
    return int(cv2.resize(grey, (size, size), interpolation=cv2.INTER_AREA)[0, 0])


def _generate(folder: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(count):
        width, height = int(rng.integers(300, 700)), int(rng.integers(220, 520))
        img = cv2.resize(rng.integers(0, 255, (24, 32), dtype=np.uint8), (width, height))
        cv2.circle(img, (width // 3, height // 2), height // 4, 20, -1)
        cv2.circle(img, (2 * width // 3, height // 2), height // 4, 30, -1)
        img = cv2.add(img, rng.integers(0, 25, img.shape, dtype=np.uint8))
        if i % 3 == 1:
            img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
        elif i % 3 == 2:
            img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGRA)
        cv2.imwrite(str(folder / f"{i:04d}.png"), img)


def _manifest(files: list[Path], root: Path) -> pd.DataFrame:
    rows, seen = [], set()
    for path in files:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest in seen:
            continue
        seen.add(digest)
        rows.append(
            {
                "split": "train",
                "label": "normal",
                "path": path.relative_to(root).as_posix(),
                "source_path": str(path),
                "sha256": digest,
                "width": 0,
                "height": 0,
                "mode": "L",
                "format": "png",
                "bytes": path.stat().st_size,
                "phash": "",
            }
        )
    return pd.DataFrame(rows, columns=list(INGEST_COLUMNS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, help="folder of images (searched recursively)")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeat", type=int, default=7, help="rounds; medians are reported")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="chestct-bench-") as tmp:
        root = Path(tmp)
        if args.source:
            source = args.source.resolve()
            link = root / "source"
            link.symlink_to(source, target_is_directory=True)
        else:
            link = root / "source"
            link.mkdir()
            _generate(link, 600)
        files = sorted(p for p in link.rglob("*") if p.suffix.lower() in SUFFIXES)
        manifest = _manifest(files, root)
        paths = [str(root / p) for p in manifest["path"]]
        n = len(paths)
        for p in paths:  # warm the page cache so that both sides read from memory
            Path(p).read_bytes()

        jobs = [(p, args.size) for p in paths]

        def stage(out: Path, workers: int = args.workers) -> None:
            run_resize(
                {"train": manifest},
                Preprocessing.from_params(defaults(ResizeParams), args.size),
                out,
                root,
                workers,
            )
            shutil.rmtree(out)

        def timed(run) -> float:
            started = time.perf_counter()
            run()
            return time.perf_counter() - started

        # Each round runs the four contenders back to back, so a change in machine load hits
        # them alike; the ratios are taken within each round and their median reported (the
        # shared machines this runs on drift by 10-20 % over a minute).
        rounds: dict[str, list[float]] = {
            "bare_1": [],
            "stage_1": [],
            "bare_pool": [],
            "stage": [],
        }
        with single_threaded(), Pool(args.workers) as pool:
            for i in range(args.repeat):
                rounds["bare_1"].append(timed(lambda: [_bare(j) for j in jobs]))
                rounds["stage_1"].append(timed(lambda: stage(root / "one", 1)))
                rounds["bare_pool"].append(timed(lambda: pool.map(_bare, jobs, chunksize=16)))
                rounds["stage"].append(timed(lambda i=i: stage(root / f"out{i}")))
        run_resize(
            {"train": manifest},
            Preprocessing.from_params(defaults(ResizeParams), args.size),
            root / "inc",
            root,
            args.workers,
        )
        reused = timed(
            lambda: run_resize(
                {"train": manifest},
                Preprocessing.from_params(defaults(ResizeParams), args.size),
                root / "inc",
                root,
                args.workers,
            )
        )

    def rate(name: str) -> float:
        return n / statistics.median(rounds[name])

    def ratio(num: str, den: str, scale: float = 1.0) -> str:
        per_round = sorted(d / (t * scale) for t, d in zip(rounds[num], rounds[den], strict=True))
        return (
            f"{statistics.median(per_round):.2f}  "
            f"(rounds {per_round[0]:.2f} to {per_round[-1]:.2f})"
        )

    print(f"images: {n} distinct, output {args.size}x{args.size}, workers: {args.workers}")
    print(f"rounds: {args.repeat}; rates are medians over the rounds")
    print(f"{'bare decode+resize, 1 process':42s} {rate('bare_1'):8.1f} img/s")
    print(f"{'bare x workers (ideal)':42s} {rate('bare_1') * args.workers:8.1f} img/s")
    print(f"{'bare decode+resize, pool of workers':42s} {rate('bare_pool'):8.1f} img/s")
    print(f"{'resize stage, 1 process':42s} {rate('stage_1'):8.1f} img/s")
    print(f"{'resize stage (run_resize), fresh':42s} {rate('stage'):8.1f} img/s")
    print(f"{'resize stage, incremental (all reused)':42s} {n / reused:8.1f} img/s")
    ideal = ratio("stage", "bare_1", args.workers)
    print(f"ratio stage / (bare x workers): {ideal}  target >= 0.8")
    print(f"ratio stage / bare pool:        {ratio('stage', 'bare_pool')}")
    print(f"ratio stage / bare, 1 process:  {ratio('stage_1', 'bare_1')}")
    print(f"load average (1, 5, 15 min): {', '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
