"""Novelty-aware evaluation: the memorizer baseline and the near-copy / novel split.

For every scored slice, its nearest training slice by thumbnail correlation
(chestct.data.similarity: body crop, 32 x 32, Pearson). A slice at or above
`base.near_copy_similarity` is a *near-copy* of training data (another slice of a series train
holds); below it, *novel*, as a new patient's slice is. Evaluate reports the model's metrics on
both parts apart, and the memorizer, which labels each slice like its nearest training slice
(no learning), overall and on each part: a model that does not beat it on the novel part has
learned nothing a lookup table does not know.

Thumbnails come from the ingested originals (scoring.original_slices), as serving sees an
upload, not from the resized copies the model reads.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from chestct.data.similarity import memorizer_predict, nearest, series_groups, thumbnails
from chestct.evaluation.scoring import original_slices
from chestct.evaluation.uncertainty import (
    DEFAULT_CONFIDENCE,
    DEFAULT_RESAMPLES,
    bootstrap_intervals,
    weighted_scores,
)
from chestct.imaging.decoding import decode
from chestct.imaging.formats import ImageError
from chestct.labels import CLASSES

log = logging.getLogger(__name__)

BASELINE = "nearest_neighbour"
HEADLINE = ("accuracy", "balanced_accuracy", "macro_f1")


@dataclass(frozen=True)
class TrainReference:
    """The training slices as the memorizer and the novelty split see them."""

    thumbs: np.ndarray  # n x d thumbnails (chestct.data.similarity)
    labels: list[str]
    threshold: float  # base.near_copy_similarity

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, root: Path, threshold: float) -> TrainReference:
        return cls(frame_thumbnails(frame, root), list(frame["label"]), threshold)


def frame_thumbnails(frame: pd.DataFrame, root: Path) -> np.ndarray:
    """Thumbnails of a manifest's ingested originals (its resized copies where missing)."""
    slices, _ = original_slices(frame, root)
    return thumbnails(slices)


def file_thumbnails(
    files: Sequence[Path], window: tuple[float, float] | None = None
) -> tuple[np.ndarray, list[bool]]:
    """Thumbnails of the files that decode, and which did (the external set's scorer skips the
    others in the same way)."""
    greys, ok = [], []
    for f in files:
        try:
            greys.append(decode(f.read_bytes(), window).grey)
            ok.append(True)
        except ImageError:
            ok.append(False)
    return thumbnails(greys), ok


# A similarity component holding more than this share of a set is not a series: the threshold
# does not separate series in this data (synthetic slices all correlate above 0.9), and
# resampling one giant group would give intervals of zero width. Slices are resampled then.
MAX_SERIES_SHARE = 0.5


def item_groups(frame: pd.DataFrame | None, thumbs: np.ndarray, threshold: float) -> list[str]:
    """The resampling group of each item, as `<source>:<id>`: the manifest's `group` column
    where split wrote one (`manifest`), else the series the slices form by similarity
    (`series`: connected components at `threshold`), else each slice alone (`slice`) when
    one component would hold more than MAX_SERIES_SHARE of the set."""
    if frame is not None and "group" in frame and frame["group"].astype(str).str.len().all():
        return [f"manifest:{g}" for g in frame["group"].astype(str)]
    series = series_groups(thumbs, threshold)
    if series and np.unique(series, return_counts=True)[1].max() > MAX_SERIES_SHARE * len(series):
        log.warning(
            "one similarity component holds more than %.0f%% of %d slices at correlation %.2f: "
            "not a series; the bootstrap resamples slices",
            100 * MAX_SERIES_SHARE,
            len(series),
            threshold,
        )
        return [f"slice:{i}" for i in range(len(series))]
    return [f"series:{g}" for g in series]


def _scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    scores = weighted_scores(y_true, y_pred, np.ones((1, len(y_true))))
    return {k: float(scores[k][0]) for k in HEADLINE}


def _indices(labels: Sequence[str]) -> np.ndarray:
    return np.asarray([CLASSES.index(label) for label in labels], np.int64)


@dataclass(frozen=True)
class Assessment:
    """What the novelty split and the memorizer add to one scored set."""

    metrics: dict[str, Any]  # baseline, near_copy_share, novel, near_copy, ci, similarity
    columns: dict[str, Any]  # per item: nearest_train_similarity, near_copy, memorizer, group


def assess(
    reference: TrainReference,
    thumbs: np.ndarray,
    y_true: np.ndarray,
    proba: np.ndarray,
    calibrated: np.ndarray,
    groups: Sequence[str],
    *,
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> Assessment:
    """The memorizer, the near-copy / novel split and the bootstrap intervals of one set.

    Args:
        reference: the training slices.
        thumbs: the set's thumbnails, item for item with y_true.
        y_true: true class indices.
        proba: the model's raw probabilities; calibrated: after temperature scaling.
        groups: resampling group per item (item_groups).
    """
    y_true = np.asarray(y_true)
    if len(thumbs) != len(y_true):
        raise ValueError(f"{len(thumbs)} thumbnails for {len(y_true)} scored items")
    remembered, found = memorizer_predict(thumbs, reference.thumbs, reference.labels)
    memo = _indices(remembered)
    model = np.asarray(proba).argmax(axis=1)
    near = found.similarity >= reference.threshold
    model_scores, memo_scores = _scores(y_true, model), _scores(y_true, memo)
    metrics: dict[str, Any] = {
        "baseline": {
            BASELINE: memo_scores,
            "model_above": {k: model_scores[k] - memo_scores[k] for k in HEADLINE},
        },
        "near_copy_share": float(near.mean()) if len(near) else 0.0,
        "near_copy_similarity": reference.threshold,
        "nearest_train_similarity": {
            "median": float(np.median(found.similarity)),
            "p10": float(np.quantile(found.similarity, 0.1)),
            "p90": float(np.quantile(found.similarity, 0.9)),
        },
        "ci": {
            **bootstrap_intervals(
                y_true,
                proba,
                groups,
                calibrated=calibrated,
                resamples=resamples,
                confidence=confidence,
                seed=seed,
            ),
            "confidence": confidence,
            "resamples": resamples,
            "groups": len(set(groups)),
            "grouped_by": groups[0].split(":")[0] if groups else "slice",
        },
    }
    for part, mask in (("novel", ~near), ("near_copy", near)):
        block: dict[str, Any] = {"n": int(mask.sum())}
        if mask.any():
            block.update(_scores(y_true[mask], model[mask]))
            block["baseline"] = {BASELINE: _scores(y_true[mask], memo[mask])}
            part_groups = [g for g, m in zip(groups, mask, strict=True) if m]
            intervals = bootstrap_intervals(
                y_true[mask],
                np.asarray(proba)[mask],
                part_groups,
                resamples=resamples,
                confidence=confidence,
                seed=seed,
            )
            block["ci"] = {k: intervals[k] for k in HEADLINE}
        metrics[part] = block
    columns = {
        "nearest_train_similarity": np.round(found.similarity, 6),
        "near_copy": near,
        "memorizer": remembered,
        "group": list(groups),
    }
    return Assessment(metrics, columns)


def assess_files(
    reference: TrainReference,
    files: Sequence[Path],
    predictions: pd.DataFrame,
    temperature: float,
    window: tuple[float, float] | None = None,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> Assessment:
    """`assess` for scored files (the external set): `predictions` holds one row (actual,
    p_<class>) per file that decoded, in order; groups are the series of the files' slices.

    Raises:
        ValueError: the files that decode here are not as many as the scored rows.
    """
    from chestct.model.calibration import softmax

    thumbs, _ = file_thumbnails(files, window)
    if len(thumbs) != len(predictions):
        raise ValueError(
            f"{len(thumbs)} slices decoded for the memorizer but {len(predictions)} scored"
        )
    proba = predictions[[f"p_{c}" for c in CLASSES]].to_numpy()
    # log p differs from the logits by a constant per row: the same softmax at any temperature.
    calibrated = softmax(np.log(np.clip(proba, 1e-300, 1.0)), temperature)
    return assess(
        reference,
        thumbs,
        _indices(list(predictions["actual"])),
        proba,
        calibrated,
        item_groups(None, thumbs, reference.threshold),
        resamples=resamples,
        confidence=confidence,
        seed=seed,
    )


def card_entry(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """The model card's `baseline` entry: the memorizer on the test split, how far the model
    is above it, overall and on the novel part, and the intervals' level (None for metrics
    from before the memorizer)."""
    if BASELINE not in metrics.get("baseline", {}):
        return None
    novel = metrics.get("novel", {})
    entry: dict[str, Any] = {
        "method": f"{BASELINE}: the label of the most correlated training slice (body-cropped "
        "32x32 thumbnails of the ingested originals, Pearson); no learning",
        "test": metrics["baseline"][BASELINE],
        "model_above": metrics["baseline"]["model_above"],
        "near_copy_similarity": metrics.get("near_copy_similarity"),
        "near_copy_share": metrics.get("near_copy_share"),
        "novel": {"n": novel.get("n", 0)},
    }
    if novel.get("n"):
        memo = novel["baseline"][BASELINE]
        entry["novel"].update(
            {
                "model": {k: novel[k] for k in HEADLINE},
                "memorizer": memo,
                "model_above": {k: novel[k] - memo[k] for k in HEADLINE},
            }
        )
    ci = metrics.get("ci", {})
    if ci:
        entry["intervals"] = (
            f"{ci.get('confidence', 0.95):.0%} bootstrap intervals over {ci.get('groups')} "
            f"groups ({ci.get('grouped_by')}), {ci.get('resamples')} resamples: metrics.ci"
        )
    return entry


def describe(metrics: dict[str, Any]) -> str:
    """One log line: the model against the memorizer, overall and on the novel part."""
    memo = metrics["baseline"][BASELINE]
    novel = metrics["novel"]
    text = (
        f"memorizer macro-F1 {memo['macro_f1']:.4f} (model "
        f"{metrics['baseline']['model_above']['macro_f1']:+.4f} above it); "
        f"near-copy share {metrics['near_copy_share']:.2f}"
    )
    how = metrics.get("ci", {})
    if "macro_f1" in how:
        ci = how["macro_f1"]
        text += (
            f"; macro-F1 {how['confidence']:.0%} interval [{ci['low']:.4f}, {ci['high']:.4f}] "
            f"over {how['groups']} groups ({how['grouped_by']})"
        )
    if novel["n"]:
        text += (
            f"; novel part ({novel['n']}): model macro-F1 {novel['macro_f1']:.4f}, memorizer "
            f"{novel['baseline'][BASELINE]['macro_f1']:.4f}"
        )
    return text


# --------------------------------------------------------------------------- measuring a folder


def folder_files(folder: Path) -> list[tuple[str, Path]]:
    """(label, file) of a `<class>/<image>` folder, one file per distinct content."""
    import hashlib

    from chestct.labels import label_for_folder

    seen: set[str] = set()
    files = []
    for child in sorted(p for p in folder.iterdir() if p.is_dir()):
        label = label_for_folder(child.name)
        if label is None:
            raise SystemExit(f"{child}: not a class folder ({', '.join(CLASSES)})")
        for f in sorted(p for p in child.rglob("*") if p.is_file()):
            digest = hashlib.sha256(f.read_bytes()).hexdigest()
            if digest not in seen:
                seen.add(digest)
                files.append((label, f))
    return files


def labelled_thumbnails(
    train: Path, query: Path
) -> tuple[np.ndarray, list[str], np.ndarray, list[str]]:
    """Thumbnails and labels of a train folder and of a query folder (both `<class>/<image>`):
    query files byte-identical to a train file dropped, files that do not decode left out."""
    import hashlib

    train_files = folder_files(train)
    train_digests = {hashlib.sha256(f.read_bytes()).digest() for _, f in train_files}
    query_files = [
        (label, f)
        for label, f in folder_files(query)
        if hashlib.sha256(f.read_bytes()).digest() not in train_digests
    ]
    train_thumbs, train_ok = file_thumbnails([f for _, f in train_files])
    train_labels = [label for (label, _), ok in zip(train_files, train_ok, strict=True) if ok]
    thumbs, ok = file_thumbnails([f for _, f in query_files])
    labels = [label for (label, _), good in zip(query_files, ok, strict=True) if good]
    return train_thumbs, train_labels, thumbs, labels


def measure(
    train: Path, query: Path, threshold: float, resamples: int, seed: int
) -> dict[str, Any]:
    """The memorizer and the near-copy structure of a labelled query folder against a train
    folder (both `<class>/<image>`), query files byte-identical to a train file dropped."""
    train_thumbs, train_labels, thumbs, labels = labelled_thumbnails(train, query)
    reference = TrainReference(train_thumbs, train_labels, threshold)
    y = _indices(labels)
    remembered, _ = memorizer_predict(thumbs, train_thumbs, train_labels)
    proba = np.eye(len(CLASSES))[_indices(remembered)]  # the memorizer as a one-hot "model"
    groups = item_groups(None, thumbs, threshold)
    found = assess(reference, thumbs, y, proba, proba, groups, resamples=resamples, seed=seed)
    # Where series sit: a slice's nearest train slice of its own class can be the same series;
    # its nearest train slice of another class is certainly another patient.
    own = nearest(train_thumbs, train_thumbs, exclude_self=True).similarity
    train_y = _indices(train_labels)
    other = np.full(len(train_y), np.nan)
    for c in np.unique(train_y):
        mine, rest = train_y == c, train_y != c
        other[mine] = nearest(train_thumbs[mine], train_thumbs[rest]).similarity

    def spread(values: np.ndarray) -> dict[str, float]:
        return {
            "median": float(np.median(values)),
            "p05": float(np.quantile(values, 0.05)),
            "p95": float(np.quantile(values, 0.95)),
            "share_at_or_above_threshold": float(np.mean(values >= threshold)),
        }

    return {
        "train_files": len(train_labels),
        "query_files": len(labels),
        "query_per_class": {c: labels.count(c) for c in CLASSES},
        "threshold": threshold,
        "memorizer": found.metrics["baseline"][BASELINE],
        "memorizer_ci": {k: found.metrics["ci"][k] for k in HEADLINE},
        "memorizer_groups": found.metrics["ci"]["groups"],
        "near_copy_share": found.metrics["near_copy_share"],
        "novel": found.metrics["novel"],
        "near_copy": found.metrics["near_copy"],
        "query_to_train": spread(found.columns["nearest_train_similarity"]),
        "train_to_train": spread(own),
        "train_to_other_class": spread(other),
        # Where the threshold could sit: the share of each distribution at or above it.
        "share_at_or_above": {
            f"{t:.2f}": {
                "query_to_train": float(np.mean(found.columns["nearest_train_similarity"] >= t)),
                "train_to_train": float(np.mean(own >= t)),
                "train_to_other_class": float(np.mean(other >= t)),
            }
            for t in (0.8, 0.85, 0.9, 0.93, 0.95, 0.97)
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m chestct.evaluation.novelty TRAIN QUERY`: the memorizer and near-copy structure
    of a
    labelled folder against a training folder, as JSON."""
    import argparse
    import json

    parser = argparse.ArgumentParser(
        prog="python -m chestct.evaluation.novelty", description=main.__doc__
    )
    parser.add_argument("train", type=Path, help="training folder <class>/<image>")
    parser.add_argument("query", type=Path, help="folder to measure, <class>/<image>")
    parser.add_argument("--threshold", type=float, default=0.9, help="near-copy correlation")
    parser.add_argument("--resamples", type=int, default=DEFAULT_RESAMPLES)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for folder in (args.train, args.query):
        if not folder.is_dir():
            parser.error(f"{folder} is not a folder; pass a <class>/<image> folder")
    report = measure(args.train, args.query, args.threshold, args.resamples, args.seed)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
