"""Per-slice latency of the texture family on one core: the served path of chestct.inference
(prepare the decoded slice, texture features, gradient-boosted trees, calibration, entropy,
OOD) timed call by call; target (issue 20): p50 <= 40 ms per slice.

Without --model-dir, a texture model (params base_model.texture's defaults, --iterations at
most) is fitted here on 120 synthetic slices at --size (tests/texture_folder.py) and served from
a folder written as promote writes it; with --model-dir, that promoted folder is used. OpenCV
runs single-threaded, as in a worker. The slices timed are the embedded synthetic default's
(bench/slices.py) or the images under --slices.
The breakdown (prepare / features / trees) is timed on the same slices.

    python bench/texture.py [--model-dir model] [--size 192] [--slices DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from chestct.imaging import preparation
from chestct.inference.analysis import analyse_outputs
from chestct.inference.folder import load_folder
from chestct.inference.loaded import Loaded
from chestct.labels import CLASSES
from chestct.model import texture
from slices import decoded_slices

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _percentiles(values: list[float]) -> str:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    return f"p50 {statistics.median(ordered):6.1f} ms, p90 {p90:6.1f} ms"


def built_folder(folder: Path, size: int, iterations: int) -> Path:
    """A texture model folder fitted on synthetic slices at `size` (tests/texture_folder.py)."""
    import texture_folder

    texture_folder.SIZE = size
    model = texture_folder.fitted(size=size, n=120, max_iter=iterations)
    texture_folder.fitted = lambda **_: model  # the folder holds this very model
    return texture_folder.build_texture_folder(folder)


def prepared(model: Loaded, grey: np.ndarray) -> np.ndarray:
    """What Loaded.prepare makes of a decoded slice (imaging.prepare_slice, card settings)."""
    return preparation.prepare_slice(grey, model.preprocessing).image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--size", type=int, default=192, help="side without --model-dir")
    parser.add_argument("--iterations", type=int, default=300, help="without --model-dir")
    parser.add_argument("--slices", type=Path, default=None, help="folder of images to time")
    parser.add_argument("--count", type=int, default=100, help="slices timed")
    args = parser.parse_args()
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model_dir or built_folder(Path(tmp) / "model", args.size, args.iterations)
        model = load_folder(folder, threads=1)
        assert model.texture is not None, f"{folder} does not hold a texture-family model"
        greys = decoded_slices(args.slices)[: args.count]
        total, cpu, prep_ms, feat_ms, tree_ms = [], [], [], [], []
        for grey in greys:
            start, start_cpu = time.perf_counter(), time.process_time()
            image = prepared(model, grey)
            analyse_outputs(model, model.run(image[None]), 0, 0)
            total.append((time.perf_counter() - start) * 1000)
            cpu.append((time.process_time() - start_cpu) * 1000)
            t0 = time.perf_counter()
            prepared(model, grey)
            t1 = time.perf_counter()
            raw = texture.feature_matrix(image[None])
            t2 = time.perf_counter()
            model.texture.logits(raw)
            t3 = time.perf_counter()
            prep_ms.append((t1 - t0) * 1000)
            feat_ms.append((t2 - t1) * 1000)
            tree_ms.append((t3 - t2) * 1000)
        iterations = sum(c.n_iter_ for c in model.texture.classifiers)
        print(
            f"texture family, {model.image_size} px, {iterations} iterations x "
            f"{len(CLASSES)} classes, {texture.feature_count()} features, one core "
            f"(trees held to 1 thread), {len(total)} slices:"
        )
        print(f"  served path (prepare + features + trees + analyse): {_percentiles(total)}")
        # On a shared machine the wall time includes waiting for a core; the CPU time is what
        # one free core would take.
        print(f"  served path, CPU time of this process:               {_percentiles(cpu)}")
        print(f"  prepare:  {_percentiles(prep_ms)}")
        print(f"  features: {_percentiles(feat_ms)}")
        print(f"  trees:    {_percentiles(tree_ms)}")
        print(f"  load average now: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
