"""Error analysis of the promoted model on the test split (research/02-error-analysis.ipynb).

The promoted model (model/) is loaded by the inference core the service runs on
(chestct.inference) and every test image goes through what /predict does: decode by content,
the card's resize, the served model, temperature scaling, abstention and the
out-of-distribution score. The functions below turn those answers into tables: per-class
precision and recall, the confusion matrix, the most confident mistakes, abstention and OOD
among right and wrong answers, and calibration; chestct.evaluation.plots draws them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from chestct.imaging.decoding import decode
from chestct.labels import CLASSES
from chestct.data.manifest import DATASET_COLUMNS, read_manifest
from chestct.pointers import read_pointer
from chestct.settings import Settings

if TYPE_CHECKING:
    from chestct.inference.loaded import Loaded

log = logging.getLogger(__name__)

# Short class names for picture titles.
SHORT_NAMES: dict[str, str] = {
    "adenocarcinoma": "adeno",
    "large_cell_carcinoma": "large cell",
    "squamous_cell_carcinoma": "squamous",
    "normal": "normal",
}


class AnalysisError(RuntimeError):
    """Nothing to analyse yet; the message says which command produces it."""


@dataclass(frozen=True)
class Promoted:
    """The promoted model as the inference core serves it, with its card (as JSON)."""

    card: dict[str, Any]
    served: Loaded
    folder: Path


def load_promoted(settings: Settings) -> Promoted:
    """Load model/ through the inference core (refused folders raise its ModelRefused)."""
    folder = settings.paths.model
    if not (folder / "model.json").is_file():
        raise AnalysisError(
            f"{folder / 'model.json'} not found: no model has been promoted; run `dvc repro` "
            "(or `make run`)"
        )
    from chestct.inference.folder import load_folder

    served = load_folder(folder)
    return Promoted(card=served.card.to_dict(), served=served, folder=folder)


def load_test_split(settings: Settings) -> pd.DataFrame:
    """The test split that validate handed on (DATASET_COLUMNS), found through its pointer."""
    pointer = read_pointer(settings.paths, "validate")
    return read_manifest(pointer.output_path("test", settings.paths.root), DATASET_COLUMNS)


def model_input(served: Loaded, root: Path, path: str, original: Any) -> np.ndarray:
    """The model input of one split row as /predict makes it from an upload: the ingested
    original through the served model's preparation. Without a readable original, the row's
    resized copy, which resize already prepared: it goes in as it is when it has the model's
    size (preparing it again would crop, equalise and resize twice, as this did before:
    accuracy 0.813 against evaluate's 0.824 on the real data)."""
    if isinstance(original, str) and original and (root / original).is_file():
        return served.prepare(decode((root / original).read_bytes(), served.window))
    decoded = decode((root / path).read_bytes(), served.window)
    if decoded.grey.shape == (served.image_size, served.image_size):
        return decoded.grey
    return served.prepare(decoded)


def predict_split(promoted: Promoted, split: pd.DataFrame, root: Path) -> pd.DataFrame:
    """What the service answers for every image of a split.

    Returns:
        One row per image: path, source_path, actual, predicted, confidence (the top calibrated
        probability), correct, entropy (normalised), abstain and out_of_distribution (None when
        the card has no threshold for them), ood_score, and p_<class> for every class.
    """
    from chestct.inference.analysis import analyse

    served = promoted.served
    names = [f"p_{c}" for c in served.classes]
    originals = split["original"] if "original" in split else pd.Series([None] * len(split))
    rows = []
    for path, original in zip(split["path"], originals, strict=True):
        image = model_input(served, root, path, original)
        answer = analyse(served, image, mc_samples=0, seed=0)
        rows.append(
            {
                "entropy": answer.entropy,
                "abstain": answer.abstain,
                "out_of_distribution": answer.out_of_distribution,
                "ood_score": answer.ood_score,
                **dict(zip(names, map(float, answer.probabilities), strict=True)),
            }
        )
    answers = pd.DataFrame(rows, index=split.index)
    proba = answers[names].to_numpy()
    frame = pd.DataFrame(
        {
            "path": split["path"].to_numpy(),
            "source_path": split["source_path"].to_numpy(),
            "actual": split["label"].to_numpy(),
            "predicted": [served.classes[i] for i in proba.argmax(axis=1)],
            "confidence": proba.max(axis=1),
        }
    )
    frame["correct"] = frame["actual"] == frame["predicted"]
    return pd.concat([frame, answers.reset_index(drop=True)], axis=1)


def answer_summary(pred: pd.DataFrame) -> pd.DataFrame:
    """Right and wrong answers side by side: count, mean confidence and entropy, and the share
    the service would abstain on or flag as out of distribution (NaN without a threshold)."""

    def share(values: pd.Series) -> float:
        known = values.dropna()
        return float(known.astype(bool).mean()) if len(known) else np.nan

    groups = pred.assign(answer=pred["correct"].map({True: "right", False: "wrong"}))
    table = groups.groupby("answer").agg(
        images=("correct", "size"),
        mean_confidence=("confidence", "mean"),
        mean_entropy=("entropy", "mean"),
        abstained=("abstain", share),
        out_of_distribution=("out_of_distribution", share),
    )
    return table.reindex(["right", "wrong"]).dropna(how="all")


def headline_metrics(pred: pd.DataFrame) -> dict[str, float]:
    """Accuracy, balanced accuracy and macro-F1 over the four classes, as evaluate reports them."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    return {
        "accuracy": float(accuracy_score(pred["actual"], pred["predicted"])),
        "balanced_accuracy": float(balanced_accuracy_score(pred["actual"], pred["predicted"])),
        "macro_f1": float(
            f1_score(
                pred["actual"],
                pred["predicted"],
                labels=list(CLASSES),
                average="macro",
                zero_division=0,
            )
        ),
    }


def per_class_report(pred: pd.DataFrame) -> pd.DataFrame:
    """Precision, recall, F1 and support per class, plus macro and weighted averages."""
    from sklearn.metrics import classification_report

    report = classification_report(
        pred["actual"],
        pred["predicted"],
        labels=list(CLASSES),
        output_dict=True,
        zero_division=0,
    )
    table = pd.DataFrame(report).T.drop(index=["accuracy", "micro avg"], errors="ignore")
    table["support"] = table["support"].astype(int)
    return table


def confusion_table(pred: pd.DataFrame, normalise: bool = False) -> pd.DataFrame:
    """Actual class (rows) by predicted class (columns); `normalise` divides rows by their sum."""
    table = pd.crosstab(pred["actual"], pred["predicted"]).reindex(
        index=list(CLASSES), columns=list(CLASSES), fill_value=0
    )
    table.index.name, table.columns.name = "actual", "predicted"
    if normalise:
        return table.div(table.sum(axis=1).replace(0, np.nan), axis=0).fillna(0.0)
    return table


def worst_errors(pred: pd.DataFrame, n: int = 12) -> pd.DataFrame:
    """The `n` wrong predictions made with the highest confidence (the most misleading ones)."""
    return pred[~pred["correct"]].sort_values("confidence", ascending=False).head(n)


def calibration(pred: pd.DataFrame, bins: int = 10) -> tuple[pd.DataFrame, float]:
    """Reliability table (confidence bins: count, mean confidence, accuracy) and the ECE.

    Bins are equal-width and closed on the right, as in evaluate. The expected calibration
    error is the count-weighted mean gap between confidence and accuracy over the bins: 0 means
    the model's confidence can be read as a probability.
    """
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(pred["confidence"], edges[1:-1], right=True), 0, bins - 1)
    rows = []
    for b in range(bins):
        part = pred[which == b]
        rows.append(
            {
                "bin": f"{edges[b]:.1f}-{edges[b + 1]:.1f}",
                "count": len(part),
                "mean_confidence": float(part["confidence"].mean()) if len(part) else np.nan,
                "accuracy": float(part["correct"].mean()) if len(part) else np.nan,
            }
        )
    table = pd.DataFrame(rows)
    used = table[table["count"] > 0]
    ece = float(
        (used["count"] * (used["mean_confidence"] - used["accuracy"]).abs()).sum()
        / max(len(pred), 1)
    )
    return table, ece


def error_tiles(errors: pd.DataFrame, root: Path) -> list[tuple[np.ndarray, str]]:
    """The given wrong predictions as (grey image, caption) for `plots.error_grid`: actual,
    predicted and confidence."""
    return [
        (
            decode((root / item["path"]).read_bytes()).grey,
            f"is {SHORT_NAMES.get(item['actual'], item['actual'])}\n"
            f"said {SHORT_NAMES.get(item['predicted'], item['predicted'])} "
            f"({item['confidence']:.2f})",
        )
        for _, item in errors.iterrows()
    ]
