"""How far acquisition changes move the prepared image, per preprocessing setting.

    python bench/acquisition.py [FOLDER] [--size 128] [--limit 200] [--record FILE.json]

Takes the slices under FOLDER (any image files, recursively; default: 80 synthetic slices),
applies each acquisition change of the slice as a scanner or an export would (a wider field of
view with a black margin, another aspect, another gamma, another linear grey scale, blur,
noise) and prints, per preprocessing setting (`resize.crop` x `resize.intensity`), the mean
absolute difference in grey levels (0..255) between the prepared original and the prepared
changed slice, as a share of the grey-level spread of the prepared original. Lower means the
model sees the change less; it says nothing about what the model learns from the anatomy.
--record also writes the table as a results file for the docs (bench/results.py).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import cv2
import numpy as np

from chestct.imaging.decoding import decode
from chestct.imaging.preparation import Preprocessing, prepare_slice

# At a placeholder size: --size sets the one measured (Preprocessing.with_size).
SETTINGS: dict[str, Preprocessing] = {
    "none / none": Preprocessing(128),
    "none / percentile": Preprocessing(128, intensity="percentile"),
    "body / none": Preprocessing(128, crop="body"),
    "body / percentile": Preprocessing(128, crop="body", intensity="percentile"),
    "body / clahe": Preprocessing(128, crop="body", intensity="clahe"),
}


def zoom_out(grey: np.ndarray, share: float) -> np.ndarray:
    height, width = grey.shape
    small = cv2.resize(grey, (round(width * share), round(height * share)), cv2.INTER_AREA)
    out = np.zeros_like(grey)
    y, x = (height - small.shape[0]) // 2, (width - small.shape[1]) // 2
    out[y : y + small.shape[0], x : x + small.shape[1]] = small
    return out


def aspect(grey: np.ndarray, ratio: float) -> np.ndarray:
    height, width = grey.shape
    return cv2.resize(grey, (width, max(16, round(height * ratio))), cv2.INTER_AREA)


def gamma(grey: np.ndarray, g: float) -> np.ndarray:
    return (255.0 * (grey / 255.0) ** g).round().astype(np.uint8)


def linear(grey: np.ndarray, scale: float, offset: float) -> np.ndarray:
    return np.clip(grey * scale + offset, 0, 255).round().astype(np.uint8)


def noise(grey: np.ndarray, sd: float) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.clip(grey + rng.normal(0, sd, grey.shape), 0, 255).round().astype(np.uint8)


CHANGES = {
    "zoom-out 80 %": lambda g: zoom_out(g, 0.8),
    "zoom-out 60 %": lambda g: zoom_out(g, 0.6),
    "aspect 0.8": lambda g: aspect(g, 0.8),
    "gamma 0.7": lambda g: gamma(g, 0.7),
    "gamma 1.4": lambda g: gamma(g, 1.4),
    "grey x0.7 +20": lambda g: linear(g, 0.7, 20.0),
    "blur sigma 2": lambda g: cv2.GaussianBlur(g, (0, 0), 2.0),
    "noise sd 8": lambda g: noise(g, 8.0),
}


def slices(folder: Path | None, limit: int) -> list[np.ndarray]:
    if folder is None:
        from chestct.data.synthetic import render_slice
        from chestct.labels import CLASSES

        rng = np.random.default_rng(0)
        return [render_slice(CLASSES[i % 4], rng, 256) for i in range(80)]
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() != ".csv")
    out = []
    for path in files[:: max(1, len(files) // limit)][:limit]:
        try:
            out.append(decode(path.read_bytes()).grey)
        except ValueError:
            continue
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", type=Path)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--record", type=Path, help="also write the table as a docs results file")
    args = parser.parse_args()
    greys = slices(args.folder, args.limit)
    print(f"{len(greys)} slices from {args.folder or 'the synthetic generator'}, {args.size} px")
    print("mean |prepared(original) - prepared(changed)| / std(prepared original), in %")
    print(f"{'change':<16}" + "".join(f"{name:>19}" for name in SETTINGS))
    totals: dict[str, list[float]] = {name: [] for name in SETTINGS}
    rows: list[list[str]] = []
    for change, apply in CHANGES.items():
        row = []
        for name, setting in SETTINGS.items():
            spec = setting.with_size(args.size)
            gaps = []
            for grey in greys:
                a = prepare_slice(grey, spec).image.astype(np.float32)
                b = prepare_slice(apply(grey), spec).image.astype(np.float32)
                gaps.append(float(np.abs(a - b).mean() / max(a.std(), 1.0)))
            value = 100 * statistics.mean(gaps)
            totals[name].append(value)
            row.append(value)
        print(f"{change:<16}" + "".join(f"{v:>19.1f}" for v in row))
        rows.append([change, *(f"{v:.1f}" for v in row)])
    print(f"{'mean':<16}" + "".join(f"{statistics.mean(v):>19.1f}" for v in totals.values()))
    rows.append(["mean", *(f"{statistics.mean(v):.1f}" for v in totals.values())])
    if args.record is not None:
        from results import write_result

        source = args.folder.name if args.folder else "the synthetic default"
        write_result(
            args.record,
            f"How far the prepared image moves under each acquisition change (mean absolute "
            f"difference / grey-level spread of the prepared original, %), {len(greys)} slices "
            f"of {source} at {args.size} px",
            ["change", *SETTINGS],
            rows,
        )
        print(f"recorded {args.record}")


if __name__ == "__main__":
    main()
