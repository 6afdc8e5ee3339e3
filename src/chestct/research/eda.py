"""Exploratory data analysis of a source of chest CT slices (research/01-eda.ipynb).

The notebook only calls these functions (and chestct.evaluation.plots to draw), so that what it shows is
tested code: a scan of the source as ingest sees it (labels from folder names, format by
content), class counts, image size and mode by class, intensity by class, exact and
pixel-identical duplicates, and sample slices per class. research/03-acquisition-shortcut.ipynb
adds the acquisition cues of each slice (chestct.data.acquisition), their distribution per class, a
classifier on those cues alone (chestct.data.shortcuts) and the body boxes of sample slices.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from tqdm import tqdm

from chestct.data.acquisition import FEATURES, acquisition_features
from chestct.fsutil import sha256_bytes
from chestct.imaging.formats import ImageError
from chestct.imaging.body import body_box
from chestct.imaging.decoding import decode
from chestct.labels import CLASSES
from chestct.data.manifest import SPLITS
from chestct.settings import Settings

if TYPE_CHECKING:
    from chestct.evaluation.plots import Panel
    from chestct.data.shortcuts import ShortcutResult

log = logging.getLogger(__name__)

SCAN_COLUMNS: tuple[str, ...] = (
    "split",  # train | valid | test, or "" when the source has no split folders
    "label",
    "path",  # absolute path of the file
    "relative",  # path relative to the source folder (what reports show)
    "sha256",  # of the file's bytes
    "pixel_sha256",  # of the decoded 8-bit grey pixels: equal for lossless re-encodings
    "format",  # by content
    "mode",
    "width",
    "height",
    "bytes",
    "mean",  # grey level mean and standard deviation
    "std",
    "error",  # "" when the file decoded
)


# The acquisition features drawn and summarised per class (body_found is a share, shown apart).
CUES: tuple[str, ...] = tuple(c for c in FEATURES if c != "body_found")


class EdaError(ValueError):
    """The data source cannot be explored; the message names it and the fix."""


@contextmanager
def open_source(settings: Settings, source: str | None = None) -> Iterator[Path]:
    """The folder to explore, as a context; anything made for it is removed on exit.

    Sources are those of ingest: `synthetic` (generated into a temporary folder from
    `base.seed` and `ingest.synthetic_per_class`), a folder, a .zip/.tar.gz archive (unpacked
    into a temporary folder), or an http(s) URL of one (downloaded and checked against
    `ingest.sha256`, so only the URL params.yaml names).

    Args:
        settings: project settings.
        source: as above; relative paths start at the project root; None means params.yaml's
            `ingest.source`.
    """
    from chestct.data.source_limits import SourceError, limits_from
    from chestct.data.sources import resolve

    params = settings.params.ingest
    source = source or params.source
    with tempfile.TemporaryDirectory(prefix="chestct-eda-") as tmp:
        staging = Path(tmp)
        if source == "synthetic":
            from chestct.data.synthetic import generate_synthetic

            generate_synthetic(staging, settings.params.base.seed, params.synthetic_per_class)
            yield staging
            return
        # The pinned digest belongs to params.yaml's source; another archive is not checked.
        sha256 = params.sha256.strip() if source == params.source else ""
        try:
            resolved = resolve(
                source,
                settings.paths.root,
                staging,
                sha256,
                limits=limits_from(params),
            )
        except SourceError as exc:
            raise EdaError(str(exc)) from None
        yield resolved.folder


def window_of(settings: Settings) -> tuple[float, float]:
    """The (level, width) CT window ingest applies to DICOM files (params `ingest.window`)."""
    window = settings.params.ingest.window
    return (window.level, window.width)


def scan(
    folder: Path,
    class_map: dict[str, str] | None = None,
    window: tuple[float, float] | None = None,
) -> pd.DataFrame:
    """One row per file of a Kaggle-layout folder (SCAN_COLUMNS); undecodable files included.

    Labels come from class-folder names exactly as ingest reads them (`ingest.class_map` first);
    DICOM files decode through `window` (level, width), as in ingest, and are undecodable
    without one.
    """
    from chestct.data.sources import SourceError, scan_source

    try:
        files = scan_source(folder, dict(class_map or {}))
    except SourceError as exc:
        raise EdaError(str(exc)) from None
    rows = []
    for split, label, path in tqdm(files, desc="scan", unit="file", leave=False):
        data = path.read_bytes()
        row: dict[str, object] = {
            "split": split,
            "label": label,
            "path": str(path),
            "relative": path.relative_to(folder).as_posix(),
            "sha256": sha256_bytes(data),
            "bytes": len(data),
            "error": "",
        }
        try:
            img = decode(data, window)
        except ImageError as exc:
            row |= {"pixel_sha256": "", "format": "", "mode": "", "error": str(exc)}
        else:
            row |= {
                "pixel_sha256": hashlib.sha256(
                    np.ascontiguousarray(img.grey).tobytes() + str(img.grey.shape).encode()
                ).hexdigest(),
                "format": img.format,
                "mode": img.mode,
                "width": img.width,
                "height": img.height,
                "mean": float(img.grey.mean()),
                "std": float(img.grey.std()),
            }
        rows.append(row)
    return pd.DataFrame(rows, columns=list(SCAN_COLUMNS))


def _decoded(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["error"] == ""]


def class_counts(frame: pd.DataFrame) -> pd.DataFrame:
    """Decodable images per class (rows, in CLASSES order) and split (columns), with totals."""
    good = _decoded(frame).assign(split=lambda f: f["split"].replace("", "all"))
    table = pd.crosstab(good["label"], good["split"]).reindex(index=list(CLASSES), fill_value=0)
    order = [s for s in (*SPLITS, "all") if s in table.columns]
    table = table.reindex(columns=order, fill_value=0)
    table["total"] = table.sum(axis=1)
    table.loc["total"] = table.sum(axis=0)
    table.index.name = "label"
    table.columns.name = None
    return table.astype(int)


def _share(values: pd.Series) -> str:
    counts = values.value_counts()
    return ", ".join(f"{k} {v}" for k, v in counts.items())


def size_and_mode_by_class(frame: pd.DataFrame) -> pd.DataFrame:
    """Per class: image count, width and height range and median, colour modes and formats."""
    good = _decoded(frame)
    rows = []
    for label in CLASSES:
        part = good[good["label"] == label]
        if part.empty:
            rows.append({"label": label, "images": 0})
            continue
        rows.append(
            {
                "label": label,
                "images": len(part),
                "width min": int(part["width"].min()),
                "width median": float(part["width"].median()),
                "width max": int(part["width"].max()),
                "height min": int(part["height"].min()),
                "height median": float(part["height"].median()),
                "height max": int(part["height"].max()),
                "modes": _share(part["mode"]),
                "formats": _share(part["format"]),
            }
        )
    return pd.DataFrame(rows).set_index("label")


def intensity_by_class(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean and spread of each image's grey level, per class.

    Classes whose brightness alone separates them invite a model to learn the scanner or the
    export, not the disease: compare these rows before trusting a high score.
    """
    good = _decoded(frame)
    table = good.groupby("label")[["mean", "std"]].agg(["mean", "std"])
    table.columns = [f"{stat} of {col}" for col, stat in table.columns]
    return table.reindex(list(CLASSES))


def duplicate_groups(frame: pd.DataFrame, key: str = "sha256") -> pd.DataFrame:
    """Groups of files sharing `key` (`sha256`: same bytes; `pixel_sha256`: same pixels).

    Returns one row per group with its size, the splits and labels it spans, whether it leaks
    across splits or conflicts in label, and its files; sorted with the worst groups first.
    """
    if key not in ("sha256", "pixel_sha256"):
        raise EdaError(f"duplicate key {key!r} is not known; use 'sha256' or 'pixel_sha256'")
    good = frame[frame[key] != ""]
    groups = []
    for value, part in good.groupby(key):
        if len(part) < 2:
            continue
        splits = sorted(set(part["split"]))
        labels = sorted(set(part["label"]))
        groups.append(
            {
                key: value,
                "files": len(part),
                "splits": ", ".join(s or "all" for s in splits),
                "labels": ", ".join(labels),
                "cross_split": len(splits) > 1,
                "label_conflict": len(labels) > 1,
                "paths": sorted(part["relative"]),
            }
        )
    columns = [key, "files", "splits", "labels", "cross_split", "label_conflict", "paths"]
    table = pd.DataFrame(groups, columns=columns)
    return table.sort_values(
        ["label_conflict", "cross_split", "files"], ascending=False, ignore_index=True
    )


def _class_picks(
    frame: pd.DataFrame, per_class: int, seed: int, window: tuple[float, float] | None
) -> list[tuple[str, list[tuple[pd.Series, np.ndarray]]]]:
    """Per class (in CLASSES order), up to `per_class` random decodable rows with their grey
    pixels; DICOM files through `window`, as in `scan`."""
    if per_class < 1:
        raise EdaError(f"per_class must be at least 1, got {per_class}")
    good = _decoded(frame)
    rng = np.random.default_rng(seed)
    picked = []
    for label in CLASSES:
        part = good[good["label"] == label]
        picks = part.iloc[rng.permutation(len(part))[:per_class]] if len(part) else part
        picked.append(
            (
                label,
                [
                    (item, decode(Path(item["path"]).read_bytes(), window).grey)
                    for _, item in picks.iterrows()
                ],
            )
        )
    return picked


def class_panels(
    frame: pd.DataFrame,
    per_class: int = 6,
    seed: int = 0,
    window: tuple[float, float] | None = None,
    *,
    boxes: bool = False,
) -> list[tuple[str, list[Panel]]]:
    """Up to `per_class` random decodable slices of each class, for `plots.class_grid`.

    Slices are shown as stored (aspect kept), in grey, titled with their size and mode; DICOM
    files through `window`, as in `scan`. With `boxes`, each carries the body box that the
    acquisition features measure instead, titled with its share of the frame.
    """
    rows = []
    for label, picks in _class_picks(frame, per_class, seed, window):
        panels: list[Panel] = []
        for item, grey in picks:
            if not boxes:
                panels.append((grey, f"{item['width']}x{item['height']} {item['mode']}", None))
                continue
            box = body_box(grey, margin=0.0)
            share = box.w * box.h / grey.size
            title = f"{label.split('_')[0][:8]}: body {share:.0%}"
            panels.append((grey, title, (box.x, box.y, box.w, box.h)))
        rows.append((label, panels))
    return rows


# --------------------------------------------------------------------------- acquisition cues


def acquisition_table(
    frame: pd.DataFrame, window: tuple[float, float] | None = None
) -> pd.DataFrame:
    """The scan's decodable rows with each slice's acquisition features (chestct.data.acquisition)
    added; DICOM files through `window`, as in `scan`."""
    good = _decoded(frame).reset_index(drop=True)
    rows = []
    for path in tqdm(good["path"], desc="acquisition", unit="file", leave=False):
        grey = decode(Path(path).read_bytes(), window).grey
        features = acquisition_features(grey)
        rows.append({k: v for k, v in features.items() if k not in ("width", "height")})
    return pd.concat([good, pd.DataFrame(rows, index=good.index)], axis=1)


def acquisition_by_class(table: pd.DataFrame) -> pd.DataFrame:
    """Median (and interquartile range) of each acquisition feature, one row per class."""
    columns = list(CUES)
    grouped = table.groupby("label")[columns]
    median, q1, q3 = grouped.median(), grouped.quantile(0.25), grouped.quantile(0.75)
    out = pd.DataFrame(index=median.index)
    for column in columns:
        out[column] = [
            f"{m:.3g} ({a:.3g}..{b:.3g})"
            for m, a, b in zip(median[column], q1[column], q3[column], strict=True)
        ]
    out["body found"] = table.groupby("label")["body_found"].mean().map("{:.0%}".format)
    return out.reindex([c for c in CLASSES if c in out.index])


def acquisition_shortcut(table: pd.DataFrame, seed: int = 0) -> ShortcutResult | None:
    """validate's shortcut detector on a scan: metadata and acquisition cues together, the
    pixel cues together, each family and each feature alone (always, not only on a leak).
    Files with identical pixels stay on one side of every fold. None: too few per class."""
    from chestct.data.shortcuts import detect_shortcut

    groups = pd.Series(pd.factorize(table["pixel_sha256"])[0], index=table.index)
    return detect_shortcut(table, groups, seed, family_margin=-1.0)
