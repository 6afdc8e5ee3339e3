"""train: fit the base model on the validated train split, early-stopped on the valid split."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import pandas as pd
from sklearn.utils.class_weight import compute_class_weight

from chestct.fsutil import staged_file
from chestct.labels import CLASSES
from chestct.manifest import DATASET_COLUMNS, read_manifest, write_manifest
from chestct.modeling import augmenter, label_indices, load_model, make_dataset, set_seed
from chestct.pointers import read_pointer
from chestct.runner import run_main, stage_session
from chestct.settings import TrainParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    model: keras.Model
    history: pd.DataFrame  # one row per epoch
    best_epoch: int


class _EpochLogger(keras.callbacks.Callback):
    """Hands each epoch's metrics to a sink (MLflow in main(), nothing in tests)."""

    def __init__(self, sink) -> None:
        super().__init__()
        self.sink = sink

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs:
            self.sink({k: float(v) for k, v in logs.items()}, epoch)


def class_weights(labels: pd.Series, mode: str) -> dict[int, float] | None:
    if mode == "none":
        return None
    y = label_indices(labels)
    present = np.unique(y)
    weights = compute_class_weight("balanced", classes=present, y=y)
    return {int(c): float(w) for c, w in zip(present, weights, strict=True)}


def run_train(
    base_model: Path,
    train: pd.DataFrame,
    valid: pd.DataFrame,
    params: TrainParams,
    seed: int,
    root: Path,
    on_epoch=None,
) -> TrainResult:
    """Fit the model; returns it with the best validation-loss weights restored."""
    set_seed(seed)
    model = load_model(base_model)
    model.compile(
        optimizer=keras.optimizers.Adam(params.learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    train_ds = make_dataset(
        [root / p for p in train["path"]],
        list(train["label"]),
        params.batch_size,
        shuffle_seed=seed,
        augment=augmenter(params.augment, seed),
    )
    valid_ds = make_dataset(
        [root / p for p in valid["path"]], list(valid["label"]), params.batch_size
    )
    callbacks: list[keras.callbacks.Callback] = [
        keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=params.patience, restore_best_weights=True
        ),
    ]
    if on_epoch is not None:
        callbacks.append(_EpochLogger(on_epoch))
    fit = model.fit(
        train_ds,
        validation_data=valid_ds,
        epochs=params.epochs,
        class_weight=class_weights(train["label"], params.class_weights),
        callbacks=callbacks,
        verbose=2,
    )
    history = pd.DataFrame(fit.history)
    history.insert(0, "epoch", range(1, len(history) + 1))
    best_epoch = int(history["val_loss"].idxmin()) + 1
    return TrainResult(model=model, history=history, best_epoch=best_epoch)


def plot_history(history: pd.DataFrame, target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        ax.plot(history["epoch"], history[metric], label="train")
        ax.plot(history["epoch"], history[f"val_{metric}"], label="valid")
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.legend()
    fig.tight_layout()
    with staged_file(target) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def main() -> None:
    with stage_session("train") as session:
        s = session.settings
        root = s.paths.root
        validate = read_pointer(s.paths, "validate")
        base = read_pointer(s.paths, "base-model")
        train = read_manifest(validate.output_path("train", root), DATASET_COLUMNS)
        valid = read_manifest(validate.output_path("valid", root), DATASET_COLUMNS)
        log.info(
            "training on %d images, validating on %d; classes %s", len(train), len(valid), CLASSES
        )
        result = run_train(
            base.output_path("model", root),
            train,
            valid,
            s.params.train,
            s.params.base.seed,
            root,
            on_epoch=lambda m, e: session.log_metrics(m, step=e),
        )
        out = session.out_dir
        model_path = out / "model.keras"
        with staged_file(model_path) as tmp:
            result.model.save(tmp)
        write_manifest(out / "history.csv", result.history)
        plot_history(result.history, out / "curves.png")
        session.log_artifact(out / "curves.png")
        best = result.history.iloc[result.best_epoch - 1]
        session.finish(
            inputs=["validate", "base-model"],
            outputs={"model": model_path, "history": out / "history.csv"},
            metrics={
                "epochs_run": len(result.history),
                "best_epoch": result.best_epoch,
                "best_val_loss": float(best["val_loss"]),
                "best_val_accuracy": float(best["val_accuracy"]),
            },
        )


if __name__ == "__main__":
    run_main("train", main)
