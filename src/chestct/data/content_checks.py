"""What the pixels of a split say about the dataset: near-copies, series, non-chest, marks.

validate runs these beside the file and copy checks of chestct.data.checks (same `Checker`, same
report). They read each slice once (`read_slices`):

- near_copy_split (warning): a split (or the external set) whose slices are mostly
  near-copies of train: more than `validate.max_near_copy_share` of them at or above
  `base.near_copy_similarity` to their nearest train slice (chestct.data.similarity). Scores on it
  measure recall of train, not generalisation. The report shows each split's distribution
  against train's own (train vs train without itself);
- few_series (warning): a train class drawn from fewer than `validate.min_series_per_class`
  series (connected components at `validate.series_similarity`): a class of one or two
  patients, a shortcut magnet;
- not_chest (warning): slices with no lung field (chestct.imaging.lungs): an abdomen or pelvis
slice;
- annotation_marks (warning): burned-in marks drawn on the pixels (`annotation_marks`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from chestct.data.checks import Checker, _caption
from chestct.data.similarity import nearest, series_groups, thumbnail
from chestct.imaging.body import body_box
from chestct.imaging.decoding import decode
from chestct.imaging.formats import COLOUR_SPREAD, ImageError
from chestct.imaging.lungs import lung_field
from chestct.labels import CLASSES

# Coloured pixels (channel spread above imaging.COLOUR_SPREAD) that count as drawn marks: at
# least this many, and under this share of the slice (a colour-mapped image is not a mark).
MARK_MIN_COLOUR_PIXELS = 20
MARK_MAX_COLOUR_SHARE = 0.05
# Saturated grey strokes: pixels at or above this level, thinner than MARK_STROKE_SHARE of the
# side, forming a straight segment at least MARK_MIN_LINE_SHARE of the side long.
MARK_SATURATED = 250
MARK_STROKE_SHARE = 0.012
MARK_MIN_LINE_SHARE = 0.12
# ... and at least this many pixels: on a small export a bone edge makes a short straight run.
MARK_MIN_LINE_PIXELS = 20
MARK_BODY_MARGIN = 0.05
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def annotation_marks(image: np.ndarray) -> str:
    """Why `image` (as decoded: grey, BGR or BGRA) carries burned-in marks, or "" if none.

    Two signs, each cheap: a few coloured pixels in an otherwise grey slice (a box, arrow or
    cross drawn in colour), and long straight saturated strokes thinner than any anatomy (a
    line, box or marker drawn in white). Ribs and the scanner table are curved or thick, and
    the body's edge is never saturated in a lung window.
    """
    grey = image
    if image.ndim == 3 and image.shape[2] >= 3:
        grey = cv2.cvtColor(image[..., :3], cv2.COLOR_BGR2GRAY)
    # Only inside the body box grown by MARK_BODY_MARGIN: viewer rulers and frames around a
    # screenshot are not on the anatomy.
    box = body_box(grey, 0.0).grown(MARK_BODY_MARGIN)
    x0, y0 = max(0, box.x), max(0, box.y)
    image = image[y0 : box.y + box.h, x0 : box.x + box.w]
    grey = grey[y0 : box.y + box.h, x0 : box.x + box.w]
    if image.ndim == 3 and image.shape[2] >= 3:
        bgr = image[..., :3].astype(np.int16)
        coloured = int(np.count_nonzero(bgr.max(axis=2) - bgr.min(axis=2) > COLOUR_SPREAD))
        if MARK_MIN_COLOUR_PIXELS <= coloured <= MARK_MAX_COLOUR_SHARE * grey.size:
            return f"{coloured} coloured pixels in a grey slice (drawn marks)"
    side = min(grey.shape[:2])
    saturated = (grey >= MARK_SATURATED).astype(np.uint8) * 255
    k = max(3, round(side * MARK_STROKE_SHARE) | 1)
    thick = cv2.morphologyEx(
        saturated, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    )
    # A stroke's neighbourhood is dark on both sides; the rim of a thick bright bone is not.
    thin = cv2.bitwise_and(saturated, cv2.bitwise_not(cv2.dilate(thick, np.ones((3, 3)))))
    length = max(MARK_MIN_LINE_PIXELS, round(side * MARK_MIN_LINE_SHARE))
    lines = cv2.HoughLinesP(thin, 1, np.pi / 180, length, minLineLength=length, maxLineGap=1)
    if lines is not None:
        x0, y0, x1, y1 = (int(v) for v in lines.reshape(-1, 4)[0])
        return (
            f"{len(lines)} straight saturated stroke(s), e.g. ({x0},{y0})-({x1},{y1}) "
            "(drawn lines or boxes)"
        )
    return ""


@dataclass
class SliceInfo:
    """What validate reads once from each decodable slice (rows of the checker's frame)."""

    thumbs: np.ndarray  # n x d thumbnails (chestct.data.similarity), row order of `rows`
    rows: list[Any]  # frame index of each thumbnail
    not_chest: dict[Any, str]  # frame row -> why no lung field was found
    marks: dict[Any, str]  # frame row -> what marks were seen


def read_slices(frame: pd.DataFrame, root: Path) -> SliceInfo:
    """Decode each decodable row's ingested file (`path`) once: thumbnail, lung field, marks."""
    thumbs, rows, not_chest, marks = [], [], {}, {}
    for row in frame[frame["ok"].astype(bool)].itertuples():
        path = root / str(row.path)
        try:
            data = path.read_bytes()
            grey = decode(data).grey
        except (OSError, ImageError):
            continue  # the file checks already name files that do not decode
        thumbs.append(thumbnail(grey))
        rows.append(row.Index)
        field = lung_field(grey)
        if not field.found:
            not_chest[row.Index] = field.reason
        raw = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        seen = annotation_marks(raw if raw is not None and raw.dtype == np.uint8 else grey)
        if seen:
            marks[row.Index] = seen
    width = thumbs[0].shape[0] if thumbs else 0
    return SliceInfo(
        np.stack(thumbs) if thumbs else np.zeros((0, width), np.float32), rows, not_chest, marks
    )


def _quantiles(values: np.ndarray) -> dict[str, float]:
    values = values[np.isfinite(values)]
    if not len(values):
        return {}
    return {f"q{round(q * 100):02d}": round(float(np.quantile(values, q)), 4) for q in QUANTILES}


def novelty_table(
    info: SliceInfo,
    splits: pd.Series,
    threshold: float,
    external: np.ndarray | None = None,
) -> tuple[dict[str, dict[str, Any]], dict[str, np.ndarray]]:
    """Per split (and `external` thumbnails): the nearest-train similarity's quantiles, the
    share at or above `threshold` (near_copy_share) and the count; "train" is train against
    train without itself. Also returns the similarities themselves (for the plot/CSV)."""
    split_of = splits.loc[info.rows].to_numpy() if info.rows else np.array([], dtype=object)
    train = info.thumbs[split_of == "train"]
    table: dict[str, dict[str, Any]] = {}
    values: dict[str, np.ndarray] = {}
    sets = {s: info.thumbs[split_of == s] for s in ("train", "valid", "test")}
    if external is not None:
        sets["external"] = external
    for name, thumbs in sets.items():
        sims = nearest(thumbs, train, exclude_self=name == "train").similarity
        values[name] = sims
        finite = sims[np.isfinite(sims)]
        table[name] = {
            "images": len(thumbs),
            "near_copy_share": round(float(np.mean(finite >= threshold)), 4)
            if len(finite)
            else 0.0,
            **_quantiles(sims),
        }
    return table, values


def content_checks(
    checker: Checker,
    info: SliceInfo,
    near_copy_similarity: float,
    external: np.ndarray | None = None,
) -> dict[str, Any]:
    """near_copy_split, few_series, not_chest and annotation_marks on `info`; returns the
    numbers for the report (novelty table, series per class)."""
    frame, p = checker.frame, checker.params
    table, values = novelty_table(info, frame["split"], near_copy_similarity, external)
    mostly = {
        name: row
        for name, row in table.items()
        if name != "train" and row["images"] and row["near_copy_share"] > p.max_near_copy_share
    }
    if mostly:
        checker.add(
            "near_copy_split",
            "mostly near-copies of train: "
            + "; ".join(
                f"{name} {row['near_copy_share']:.0%} of {row['images']} at or above "
                f"{near_copy_similarity:g} (median {row.get('q50', float('nan')):.3f}, train's "
                f"own {table['train'].get('q50', float('nan')):.3f})"
                for name, row in mostly.items()
            )
            + f"; above validate.max_near_copy_share = {p.max_near_copy_share:g}. Scores there "
            "measure recall of train slices, not new patients: group series in split "
            "(split.series_similarity) or score the novel part apart",
            [],
            [],
        )
    else:
        checker.results["near_copy_split"] = "passed: " + ", ".join(
            f"{n} {r['near_copy_share']:.0%}" for n, r in table.items() if n != "train"
        )
    series: dict[str, int] = {}
    if p.series_similarity != -1 and p.min_series_per_class > 0:
        split_of = frame.loc[info.rows, "split"].to_numpy() if info.rows else np.array([])
        labels = frame.loc[info.rows, "label"].to_numpy() if info.rows else np.array([])
        for label in CLASSES:
            picked = (split_of == "train") & (labels == label)
            if picked.any():
                series[label] = len(set(series_groups(info.thumbs[picked], p.series_similarity)))
        few = {c: n for c, n in series.items() if n < p.min_series_per_class}
        if few:
            checker.add(
                "few_series",
                "train class(es) drawn from few series (slices linked at thumbnail correlation "
                f"{p.series_similarity:g}): "
                + ", ".join(f"{c} {n}" for c, n in few.items())
                + f", below validate.min_series_per_class = {p.min_series_per_class}. A class "
                "of one or two patients teaches the patient, not the class",
                [],
                [],
            )
    else:
        checker.results["few_series"] = "off"
    _per_row(checker, "not_chest", info.not_chest, "slice(s) without a lung field")
    _per_row(checker, "annotation_marks", info.marks, "slice(s) with burned-in marks")
    # Series over all rows, for the shortcut detector's folds: a patient's near-copies in two
    # folds would let it recognise the patient rather than the class.
    linked = series_groups(info.thumbs, p.series_similarity) if p.series_similarity != -1 else []
    return {
        "novelty": table,
        "novelty_values": values,
        "series_per_class": series,
        "series_of_row": {row: int(linked[k]) for k, row in enumerate(info.rows) if linked},
    }


def _per_row(checker: Checker, check: str, found: dict[Any, str], what: str) -> None:
    if not found:
        return
    hits = checker.frame.loc[list(found)]
    checker.add(
        check,
        f"{len(hits)} {what}",
        [f"{r.split}: {r.source_path}: {found[r.Index]}" for r in hits.itertuples()],
        list(hits.index),
        examples=[[(str(r.resized), _caption(r))] for r in hits.head(8).itertuples()],
    )


def novelty_frame(values: dict[str, np.ndarray]) -> pd.DataFrame:
    """The nearest-train similarities as a long table (set, similarity) for the CSV."""
    return pd.DataFrame(
        [(name, float(v)) for name, sims in values.items() for v in sims if np.isfinite(v)],
        columns=["set", "similarity"],
    )
