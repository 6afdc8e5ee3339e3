"""What watches training epoch by epoch: the log of each epoch, the best weights, batch norm.

`callbacks` assembles the list one fitting phase runs with: batch-norm recalibration, the best
weights checkpoint, early stopping, the learning-rate schedule and the epoch logger.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from chestct.model.fitting import TrainingError
from chestct.model.modeling import all_layers
from chestct.settings import TrainParams

EpochSink = Callable[[dict[str, float], int], None]


class EpochLogger(keras.callbacks.Callback):
    """Hands each epoch's metrics and learning rate to a sink (MLflow in the train stage).

    The sink's step counts on over phases and ensemble members (`offset`: epochs logged by
    earlier members), so every epoch of a run has its own step.
    """

    def __init__(
        self, sink: EpochSink | None, rows: list[dict[str, float]], phase: int, offset: int = 0
    ) -> None:
        super().__init__()
        self.sink = sink
        self.rows = rows
        self.phase = phase
        self.offset = offset

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        metrics = {k: float(v) for k, v in (logs or {}).items()}
        metrics["learning_rate"] = float(
            keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)
        )
        self.rows.append({"epoch": epoch + 1, "phase": self.phase, **metrics})
        if self.sink is not None:
            self.sink(metrics, self.offset + epoch)


class BestWeights(keras.callbacks.Callback):
    """Keeps the weights of the best epoch by a validation metric, across fit() calls.

    Keras' EarlyStopping restores its best weights only when it stops early; this checkpoint
    holds them whether or not training stopped, and across the fine-tuning phase.
    """

    def __init__(self, monitor: str) -> None:
        super().__init__()
        self.monitor = monitor
        self.lower_is_better = monitor.endswith("loss")
        self.best: float | None = None
        self.best_epoch = 0
        self.weights: list[np.ndarray] | None = None

    def improved(self, value: float) -> bool:
        if self.best is None:
            return True
        return value < self.best if self.lower_is_better else value > self.best

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        value = (logs or {}).get(self.monitor)
        if value is None:
            raise TrainingError(
                f"train.monitor: {self.monitor!r} is not among the logged metrics "
                f"{sorted(logs or {})}"
            )
        if np.isfinite(value) and self.improved(float(value)):
            self.best = float(value)
            self.best_epoch = epoch + 1
            self.weights = self.model.get_weights()

    def restore(self) -> None:
        if self.weights is not None:
            self.model.set_weights(self.weights)


class RecalibrateBatchNorm(keras.callbacks.Callback):
    """Re-estimates batch-norm moving statistics on clean training batches before every
    validation (and so before every checkpoint).

    With few steps per epoch, the moving averages trail the weights, and augmented batches
    have other statistics than clean images: validation scores then swing to chance while
    training-mode ones are high. Averaging the statistics of a few un-augmented batches with the
    current weights removes both. Layers in inference mode (frozen, pretrained) are untouched.
    """

    def __init__(self, batches: tf.data.Dataset) -> None:
        super().__init__()
        self.batches = batches

    def on_test_begin(self, logs: dict | None = None) -> None:
        norms = [
            layer
            for layer in all_layers(self.model)
            if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable
        ]
        if not norms:
            return
        saved = [layer.momentum for layer in norms]
        for k, (images, _) in enumerate(self.batches):
            for layer in norms:
                layer.momentum = k / (k + 1)  # a running mean of the batch statistics
            self.model(images, training=True)
        for layer, momentum in zip(norms, saved, strict=True):
            layer.momentum = momentum


def callbacks(
    params: TrainParams,
    best: BestWeights,
    logger: EpochLogger,
    recalibration: tf.data.Dataset | None,
) -> list[keras.callbacks.Callback]:
    """The callbacks of one fitting phase, in the order they must run."""
    mode = "min" if params.monitor.endswith("loss") else "max"
    recalibrate = [] if recalibration is None else [RecalibrateBatchNorm(recalibration)]
    return [
        *recalibrate,
        best,
        keras.callbacks.EarlyStopping(monitor=params.monitor, mode=mode, patience=params.patience),
        keras.callbacks.ReduceLROnPlateau(
            monitor=params.monitor,
            mode=mode,
            factor=params.reduce_lr.factor,
            patience=params.reduce_lr.patience,
            min_lr=params.reduce_lr.min_learning_rate,
        ),
        logger,
    ]
