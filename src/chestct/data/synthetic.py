"""Deterministic synthetic chest-CT slices in the Kaggle "Chest CT-Scan images" folder layout.

The real dataset cannot be shipped with the repository, so tests, CI and demo runs use these
images instead. Each class carries a distinct lesion pattern a small CNN can learn, while the
file metadata (pixel size, colour mode, byte size, mean intensity) is drawn independently of
the class so that no shortcut exists outside the pixels of the lesion itself. An acquisition
shortcut can be switched on (params `ingest.synthetic_shortcut`, off by default) to test that
evaluation and promotion see through one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from chestct.data.anatomy import REF, anatomy, paint_lesion, smooth_field
from chestct.imaging.perturb import zoom_out
from chestct.labels import CLASSES

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "valid", "test")

LABELS: tuple[str, ...] = CLASSES  # generated in this order (seeds depend on it)

LONG_FOLDERS: dict[str, str] = {
    "adenocarcinoma": "adenocarcinoma_left.lower.lobe_T2_N0_M0_Ib",
    "large_cell_carcinoma": "large.cell.carcinoma_left.hilum_T2_N2_M0_IIIa",
    "squamous_cell_carcinoma": "squamous.cell.carcinoma_left.hilum_T1_N2_M0_IIIa",
    "normal": "normal",
}

SHORT_FOLDERS: dict[str, str] = {
    "adenocarcinoma": "adenocarcinoma",
    "large_cell_carcinoma": "large.cell.carcinoma",
    "squamous_cell_carcinoma": "squamous.cell.carcinoma",
    "normal": "normal",
}

_MODES: tuple[str, ...] = ("L", "RGB", "RGBA")

# The optional acquisition shortcut (ingest.synthetic_shortcut): which class, and how.
SHORTCUT_CLASS = "large_cell_carcinoma"
SHORTCUT_ZOOM = 0.7  # share of the frame the slice keeps, on black
SHORTCUT_GAIN = 0.6  # grey levels scaled by this
# Fast zlib level with a fixed row filter: adaptive filtering dominated generation time.
# Amplitude of a patient's coarse grey-level field (render_slice): at 0.35, a quarter of new
# synthetic patients still had a train slice at thumbnail correlation >= 0.9; at 0.6 (the
# factor clipped to 0.6..1.4), 12 %.
PATIENT_FIELD = 0.6
# Slices of one synthetic patient (generate_synthetic's `series`) differ by this much.
SERIES_SHIFT = 0.03  # share of the side
SERIES_ROTATION = 3.0  # degrees
SERIES_NOISE = 4.0  # grey levels (sd)
_PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_SUB]


def _folder(split: str, label: str) -> str:
    # The public dataset uses long, staging-annotated names only in train/valid.
    return SHORT_FOLDERS[label] if split == "test" else LONG_FOLDERS[label]


def render_slice(
    label: str, rng: np.random.Generator, size: int = 256, patient_field: float = 0.0
) -> np.ndarray:
    """One synthetic grey slice (uint8, size x size) with the lesion pattern of `label`.

    Args:
        label: Canonical class label, one of `LABELS`.
        rng: Source of randomness; only a few draws are taken from it.
        size: Side of the square output in pixels (at least 64).
        patient_field: amplitude of the patient's coarse grey-level field (0: none, the slices
            of earlier versions; generate_synthetic uses PATIENT_FIELD for series of slices).

    Returns:
        A ``(size, size)`` uint8 lung-window slice.
    """
    if label not in LABELS:
        raise ValueError(f"unknown label {label!r}; expected one of {LABELS}")
    if size < 64:
        raise ValueError(f"size must be >= 64, got {size}")
    # Separate streams: with the same rng state, every label gets the same patient and the
    # same noise, so the lesion is the only difference between classes.
    body_rng, lesion_rng, noise_rng, field_rng = (
        np.random.default_rng(int(s)) for s in rng.integers(0, 2**63, size=4)
    )
    k = size / REF
    img, lungs = anatomy(body_rng, size)
    base_mean = float(img.mean())
    paint_lesion(label, lesion_rng, img, lungs, k)
    # A big bright mass raises the mean intensity and would leak the label through it, so the
    # slice is rescaled to the mean of the same patient without the lesion.
    img *= base_mean / max(float(img.mean()), 1e-6)
    # Patients differ in more than their outline: a coarse grey-level field (another build,
    # another inspiration) keeps two synthetic patients from looking like one series to
    # chestct.data.similarity's thumbnails, as two real patients do.
    if patient_field:
        img *= np.clip(1.0 + patient_field * smooth_field(field_rng, size, 4), 0.6, 1.4)

    c = size / 2.0
    m = cv2.getRotationMatrix2D((c, c), body_rng.uniform(-7.0, 7.0), body_rng.uniform(0.9, 1.06))
    m[:, 2] += body_rng.uniform(-0.05, 0.05, size=2) * size
    img = cv2.warpAffine(
        img,
        m,
        (size, size),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0.0,
    )

    img += noise_rng.normal(0.0, noise_rng.uniform(0.012, 0.03), img.shape).astype(np.float32)
    img = cv2.GaussianBlur(img, (0, 0), noise_rng.uniform(0.6, 1.0) * max(k, 0.5))

    # Export contrast varies between scanners and patients, never with the class.
    gain = body_rng.uniform(0.92, 1.08)
    offset = body_rng.uniform(0.005, 0.05)
    out = np.clip(img * gain + offset, 0.0, 1.0)
    return np.round(out * 255.0).astype(np.uint8)


def export_slice(grey: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Resize and re-mode a rendered slice the way heterogeneous real exports look: 180-520 px
    wide, 0.6-1.0 as high as wide, grey, RGB or RGBA (chestct.cli.samples draws its slices so
    too)."""
    width = int(rng.integers(180, 521))
    height = max(1, round(width * rng.uniform(0.6, 1.0)))
    src = grey.shape[0]
    interp = cv2.INTER_AREA if width <= src and height <= src else cv2.INTER_LINEAR
    img = cv2.resize(grey, (width, height), interpolation=interp)
    mode = _MODES[int(rng.integers(len(_MODES)))]
    if mode == "RGB":
        return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    if mode == "RGBA":
        return cv2.cvtColor(img, cv2.COLOR_GRAY2BGRA)  # alpha is 255: opaque
    return img


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        tmp.replace(path)  # atomic on POSIX: readers never see a half-written PNG
    finally:
        tmp.unlink(missing_ok=True)


def with_shortcut(grey: np.ndarray, label: str, shortcut: str) -> np.ndarray:
    """The slice as the optional acquisition shortcut draws it (params ingest.synthetic_shortcut).

    `zoom`: SHORTCUT_CLASS slices are zoomed out to SHORTCUT_ZOOM of the frame on black (a wider
    field of view); `dark`: their grey levels are scaled by SHORTCUT_GAIN (a darker export).
    The other classes, and every class with shortcut "", are left as they are. Applied in every
    split alike, as when one class was collected on another scanner: a pooled test split then
    rewards a model for recognising the acquisition instead of the lesion.
    """
    if not shortcut or label != SHORTCUT_CLASS:
        return grey
    if shortcut == "zoom":
        return zoom_out(grey, SHORTCUT_ZOOM)
    if shortcut == "dark":
        return np.round(grey.astype(np.float32) * SHORTCUT_GAIN).astype(np.uint8)
    raise ValueError(f"unknown synthetic shortcut {shortcut!r}; use '', 'zoom' or 'dark'")


def series_jitter(grey: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Another slice of the same synthetic patient: the rendered slice shifted by up to
    `SERIES_SHIFT` of its side, turned by up to `SERIES_ROTATION` degrees and given fresh
    noise, as neighbouring slices of one CT series differ (a near-copy, not a copy)."""
    size = grey.shape[0]
    c = size / 2.0
    m = cv2.getRotationMatrix2D((c, c), rng.uniform(-SERIES_ROTATION, SERIES_ROTATION), 1.0)
    m[:, 2] += rng.uniform(-SERIES_SHIFT, SERIES_SHIFT, size=2) * size
    moved = cv2.warpAffine(
        grey.astype(np.float32),
        m,
        (size, size),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=float(grey.min()),
    )
    moved += rng.normal(0.0, SERIES_NOISE, moved.shape).astype(np.float32)
    return np.clip(np.round(moved), 0, 255).astype(np.uint8)


def dataset_slice(
    label: str,
    seq: np.random.SeedSequence,
    patient: np.random.SeedSequence | None = None,
    shortcut: str = "",
) -> np.ndarray:
    """One slice as the embedded dataset's files hold it (exported: grey, RGB or RGBA, not
    square); with `patient` (a series' seed) a jittered slice of that patient, with the
    patient's grey-level field. chestct.cli.samples draws its slices here too, so that they look
    like the embedded dataset to the monitor."""
    render_seq, export_seq = seq.spawn(2)
    if patient is None:
        grey = render_slice(label, np.random.default_rng(render_seq))
    else:
        grey = render_slice(label, np.random.default_rng(patient), patient_field=PATIENT_FIELD)
        grey = series_jitter(grey, np.random.default_rng(render_seq))
    grey = with_shortcut(grey, label, shortcut)
    return export_slice(grey, np.random.default_rng(export_seq))


def _make_one(
    path: Path,
    label: str,
    seq: np.random.SeedSequence,
    shortcut: str = "",
    patient: np.random.SeedSequence | None = None,
) -> Path:
    """One file; `patient` (the series' seed) makes it a jittered slice of that patient."""
    img = dataset_slice(label, seq, patient, shortcut)
    ok, buf = cv2.imencode(".png", img, _PNG_PARAMS)
    if not ok:
        raise RuntimeError(f"PNG encoding failed for {path}")
    _write_atomic(path, buf.tobytes())
    return path


def generate_synthetic(
    out_dir: Path,
    seed: int,
    per_class: Mapping[str, int],
    shortcut: str = "",
    series: int = 1,
) -> list[Path]:
    """Write the synthetic dataset under `out_dir` in the Kaggle folder layout.

    Args:
        out_dir: Root folder; ``<split>/<class folder>/<id>.png`` is created below it.
        seed: Non-negative master seed; the same seed gives byte-identical files.
        per_class: Images per class for each split, e.g.
            ``{"train": 120, "valid": 20, "test": 30}``. Splits left out are skipped.
        shortcut: "" (none), "zoom" or "dark": see `with_shortcut`.
        series: slices per synthetic patient (params `ingest.synthetic_series`): images
            k*series .. k*series + series - 1 of a class and split are near-copies of one
            patient (`series_jitter`); 1 makes every image its own patient.

    Returns:
        Sorted paths of the files written.
    """
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    unknown = set(per_class) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown splits {sorted(unknown)}; expected a subset of {SPLITS}")
    if series < 1:
        raise ValueError(f"series must be at least 1 slice per patient, got {series}")
    for split, count in per_class.items():
        if count < 0:
            raise ValueError(f"negative count for split {split!r}: {count}")

    out_dir = Path(out_dir)
    jobs: list[tuple[Path, str, np.random.SeedSequence, np.random.SeedSequence | None]] = []
    for s_idx, split in enumerate(SPLITS):
        count = int(per_class.get(split, 0))
        for l_idx, label in enumerate(LABELS):
            if count == 0:
                continue
            folder = out_dir / split / _folder(split, label)
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                # Keyed on the image's own coordinates, so changing one count never shifts
                # the content of other images.
                seq = np.random.SeedSequence([seed, s_idx, l_idx, index])
                # Opaque, class-free file name (the folder already carries the label).
                name = f"{int(seq.generate_state(1, np.uint64)[0]):016x}.png"
                patient = None
                if series > 1:
                    patient = np.random.SeedSequence([seed, s_idx, l_idx, index // series, series])
                jobs.append((folder / name, label, seq, patient))

    # cv2 and numpy release the GIL, so threads give real parallelism; every image owns its
    # generator, so the result does not depend on scheduling.
    workers = max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        written = list(
            pool.map(lambda job: _make_one(job[0], job[1], job[2], shortcut, job[3]), jobs)
        )
    logger.info("wrote %d synthetic slices under %s (seed=%d)", len(written), out_dir, seed)
    return sorted(written)
