"""evaluate: score the trained model on the test split; the only stage that writes metrics
and plots (artifacts/evaluate/metrics.json, confusion.csv, confusion.png)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from chestct.fsutil import atomic_write_json, staged_file
from chestct.labels import CLASSES
from chestct.manifest import DATASET_COLUMNS, read_manifest, write_manifest
from chestct.metrics import classification_metrics, confusion
from chestct.modeling import label_indices, load_model, predict_proba
from chestct.pointers import read_pointer
from chestct.runner import run_main, stage_session
from chestct.settings import EvaluateParams

log = logging.getLogger(__name__)


def run_evaluate(
    model_path: Path, test: pd.DataFrame, params: EvaluateParams, root: Path
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Predict the test split; returns the metrics and one row per image."""
    model = load_model(model_path)
    proba = predict_proba(model, [root / p for p in test["path"]], params.batch_size)
    y_true = label_indices(list(test["label"]))
    y_pred = proba.argmax(axis=1)
    predictions = pd.DataFrame(
        {
            "path": test["path"],
            "source_path": test["source_path"],
            "actual": test["label"],
            "predicted": [CLASSES[i] for i in y_pred],
            **{f"p_{c}": proba[:, i] for i, c in enumerate(CLASSES)},
        }
    )
    return classification_metrics(y_true, y_pred), predictions


def plot_confusion(predictions: pd.DataFrame, target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = confusion(
        label_indices(list(predictions["actual"])), label_indices(list(predictions["predicted"]))
    )
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(CLASSES)), CLASSES, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(CLASSES)), CLASSES, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    for (i, j), n in np.ndenumerate(matrix):
        ax.text(
            j,
            i,
            str(n),
            ha="center",
            va="center",
            color="white" if n > matrix.max() / 2 else "black",
        )
    fig.tight_layout()
    with staged_file(target) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def main() -> None:
    with stage_session("evaluate") as session:
        s = session.settings
        root = s.paths.root
        validate = read_pointer(s.paths, "validate")
        train = read_pointer(s.paths, "train")
        test = read_manifest(validate.output_path("test", root), DATASET_COLUMNS)
        metrics, predictions = run_evaluate(
            train.output_path("model", root), test, s.params.evaluate, root
        )
        out = session.out_dir
        atomic_write_json(out / "metrics.json", metrics)
        write_manifest(out / "predictions.csv", predictions)
        # dvc plots' confusion template reads one row per image with these two columns.
        write_manifest(out / "confusion.csv", predictions[["actual", "predicted"]])
        plot_confusion(predictions, out / "confusion.png")
        session.log_artifact(out / "confusion.png")
        session.log_artifact(out / "predictions.csv")
        log.info("test metrics: %s", metrics)
        session.finish(
            inputs=["validate", "train"],
            outputs={"metrics": out / "metrics.json", "predictions": out / "predictions.csv"},
            metrics=metrics,
        )


if __name__ == "__main__":
    run_main("evaluate", main)
