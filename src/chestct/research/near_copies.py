"""The near-copy structure of a train/valid pair of folders and the runs' figures beside the
memorizer (research/04-near-copies.ipynb).

Same thumbnails, memorizer and novelty split as evaluate (chestct.evaluation.novelty, chestct.data.similarity);
this module only gathers them into the arrays and tables a notebook draws.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from chestct.labels import CLASSES
from chestct.evaluation.novelty import BASELINE, HEADLINE, TrainReference, assess, item_groups, labelled_thumbnails
from chestct.data.similarity import nearest

THRESHOLDS = (0.8, 0.85, 0.9, 0.93, 0.95, 0.97)


@dataclass(frozen=True)
class Structure:
    """Nearest-train correlations of a train folder with itself and of a query folder."""

    train_to_train: np.ndarray  # each train slice's nearest other train slice
    train_to_other_class: np.ndarray  # ... among train slices of another class (other patient)
    query_to_train: np.ndarray  # each query slice's nearest train slice
    memorizer: dict[str, Any]  # chestct.evaluation.novelty.assess metrics of the memorizer as a "model"
    query_labels: list[str]
    threshold: float


def structure(train: Path, query: Path, threshold: float, seed: int = 0) -> Structure:
    """Thumbnails of both `<class>/<image>` folders (one file per distinct content; query
    files byte-identical to a train file dropped) and their nearest-train correlations."""
    train_thumbs, train_labels, thumbs, labels = labelled_thumbnails(train, query)
    y_train = np.asarray([CLASSES.index(c) for c in train_labels])
    other = np.full(len(y_train), np.nan)
    for c in np.unique(y_train):
        other[y_train == c] = nearest(
            train_thumbs[y_train == c], train_thumbs[y_train != c]
        ).similarity
    reference = TrainReference(train_thumbs, train_labels, threshold)
    y = np.asarray([CLASSES.index(c) for c in labels])
    found = nearest(thumbs, train_thumbs)
    memo = np.eye(len(CLASSES))[y_train[found.index]]  # the memorizer's answers, one-hot
    groups = item_groups(None, thumbs, threshold)
    memorizer = assess(reference, thumbs, y, memo, memo, groups, seed=seed).metrics
    return Structure(
        train_to_train=nearest(train_thumbs, train_thumbs, exclude_self=True).similarity,
        train_to_other_class=other,
        query_to_train=found.similarity,
        memorizer=memorizer,
        query_labels=labels,
        threshold=threshold,
    )


def threshold_table(s: Structure, thresholds: tuple[float, ...] = THRESHOLDS) -> pd.DataFrame:
    """Share of each distribution at or above each candidate threshold."""
    rows = {
        "train -> train": s.train_to_train,
        "train -> train of another class": s.train_to_other_class,
        "query -> train": s.query_to_train,
    }
    return pd.DataFrame(
        {f">= {t:.2f}": {k: float(np.mean(v >= t)) for k, v in rows.items()} for t in thresholds}
    )


def memorizer_table(s: Structure) -> pd.DataFrame:
    """The memorizer on the whole query folder, its near-copy part and its novel part."""
    m = s.memorizer
    rows = {"all": {"n": len(s.query_labels), **m["baseline"][BASELINE]}}
    for part in ("near_copy", "novel"):
        rows[part] = {"n": m[part]["n"], **{k: m[part].get(k, np.nan) for k in HEADLINE}}
    return pd.DataFrame(rows).T


def run_rows(paths: dict[str, Path]) -> pd.DataFrame:
    """One row per metrics file (evaluate's metrics.json or external.json): the model, the
    memorizer, the novel part and the macro-F1 interval. Files that are missing are skipped."""
    rows = {}
    for name, path in paths.items():
        if not path.is_file():
            continue
        m = json.loads(path.read_text(encoding="utf-8"))
        if "macro_f1" not in m:
            continue
        memo = m.get("baseline", {}).get(BASELINE, {})
        novel = m.get("novel", {})
        novel_memo = novel.get("baseline", {}).get(BASELINE, {})
        ci = m.get("ci", {}).get("macro_f1", {})
        rows[name] = {
            "n": m.get("n"),
            "accuracy": m.get("accuracy"),
            "macro_f1": m.get("macro_f1"),
            "macro_f1 95% low": ci.get("low"),
            "macro_f1 95% high": ci.get("high"),
            "memorizer macro_f1": memo.get("macro_f1"),
            "near_copy_share": m.get("near_copy_share"),
            "novel n": novel.get("n"),
            "novel macro_f1": novel.get("macro_f1"),
            "novel memorizer macro_f1": novel_memo.get("macro_f1"),
        }
    return pd.DataFrame(rows).T
