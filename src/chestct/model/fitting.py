"""One pass of fitting: keras' fit(), or the same loop written out for several workers.

The train stage fits through `fit`, which picks the loop the distribution strategy allows, and
reads the strategy for `train.strategy` from `distribution_strategy`. A training setting that
cannot be honoured stops with `TrainingError`, whose message names the key and the fix.
"""

from __future__ import annotations

import logging
import os

import keras
import numpy as np
import tensorflow as tf

from chestct.labels import CLASSES

log = logging.getLogger(__name__)


class TrainingError(ValueError):
    """A training setting that cannot be honoured; the message says which key and what to do."""


def distribution_strategy(name: str) -> tf.distribute.Strategy:
    """The tf.distribute strategy for `train.strategy`.

    mirrored: synchronous data parallelism over the local devices (GPUs, else the CPU).
    multi_worker: the same across the processes that the TF_CONFIG environment variable
    lists, each on its own machine (or port); every one of them must run this stage.
    """
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        if not os.environ.get("TF_CONFIG"):
            log.warning("train.strategy multi_worker without TF_CONFIG: one worker only")
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def gpu_present() -> bool:
    return bool(tf.config.list_physical_devices("GPU"))


def fit(
    model: keras.Model,
    strategy: tf.distribute.Strategy,
    train_ds: tf.data.Dataset,
    valid_ds: tf.data.Dataset,
    *,
    initial_epoch: int,
    epochs: int,
    class_weight: dict[int, float] | None,
    callbacks: list[keras.callbacks.Callback],
    label_smoothing: float,
) -> None:
    """model.fit(), or the same loop written out for MultiWorkerMirroredStrategy.

    Keras 3's fit() fails under MultiWorkerMirroredStrategy with more than one worker (it
    reduces an input batch across workers before the first step; keras-team/keras#20585), so
    multi-worker training runs the loop below: the same loss, class weights, callbacks and
    logged metrics, with each step's gradients summed over all workers.
    """
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        model.fit(
            train_ds,
            validation_data=valid_ds,
            initial_epoch=initial_epoch,
            epochs=epochs,
            class_weight=class_weight,
            callbacks=callbacks,
            verbose=2,
        )
        return
    loss_fn = keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing, reduction=None)
    train_step = _train_step(model, strategy, loss_fn, class_weight)

    @tf.function
    def predict(images: tf.Tensor) -> tf.Tensor:
        return model(images, training=False)

    distributed = strategy.experimental_distribute_dataset(train_ds)
    hooks = keras.callbacks.CallbackList(callbacks, model=model)
    model.stop_training = False
    hooks.on_train_begin()
    for epoch in range(initial_epoch, epochs):
        hooks.on_epoch_begin(epoch)
        losses, confusion = [], np.zeros((len(CLASSES), len(CLASSES)))
        for batch in distributed:
            loss, step_confusion = train_step(batch)
            losses.append(float(loss))
            confusion += step_confusion.numpy()
        # Every worker validates on the whole valid split with the same weights, so every
        # worker's callbacks (early stopping, learning rate) decide alike without a reduction.
        hooks.on_test_begin()
        val_loss, val_confusion = _validate(predict, valid_ds, loss_fn)
        hooks.on_test_end()
        logs = {
            "loss": float(np.mean(losses)),
            **confusion_metrics(confusion, ""),
            "val_loss": val_loss,
            **confusion_metrics(val_confusion, "val_"),
        }
        log.info(
            "epoch %d/%d: %s",
            epoch + 1,
            epochs,
            ", ".join(f"{k} {v:.4f}" for k, v in logs.items()),
        )
        hooks.on_epoch_end(epoch, logs)
        if model.stop_training:
            break
    hooks.on_train_end()


def _train_step(
    model: keras.Model,
    strategy: tf.distribute.Strategy,
    loss_fn: keras.losses.Loss,
    class_weight: dict[int, float] | None,
) -> tf.types.experimental.GenericFunction:
    """One synchronous step over all workers: (summed loss, summed confusion matrix)."""
    classes = len(CLASSES)
    per_class = [1.0] * classes
    for index, weight in (class_weight or {}).items():
        per_class[index] = weight
    sample_weights = tf.constant(per_class, tf.float32)

    def replica_step(images: tf.Tensor, targets: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        context = tf.distribute.get_replica_context()
        global_batch = context.all_reduce(
            tf.distribute.ReduceOp.SUM, tf.cast(tf.shape(images)[0], tf.float32)
        )
        with tf.GradientTape() as tape:
            probabilities = model(images, training=True)
            truth = tf.argmax(targets, axis=1)
            weighted = loss_fn(targets, probabilities) * tf.gather(sample_weights, truth)
            loss = tf.math.divide_no_nan(tf.reduce_sum(weighted), global_batch)
        grads = tape.gradient(loss, model.trainable_variables)
        model.optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        confusion = tf.math.confusion_matrix(
            truth, tf.argmax(probabilities, axis=1), num_classes=classes, dtype=tf.float32
        )
        return loss, confusion

    @tf.function
    def train_step(batch: tuple) -> tuple[tf.Tensor, tf.Tensor]:
        loss, confusion = strategy.run(replica_step, args=batch)
        return (
            strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None),
            strategy.reduce(tf.distribute.ReduceOp.SUM, confusion, axis=None),
        )

    return train_step


def _validate(
    predict: tf.types.experimental.GenericFunction,
    valid_ds: tf.data.Dataset,
    loss_fn: keras.losses.Loss,
) -> tuple[float, np.ndarray]:
    """Mean loss and confusion matrix of the model over the whole valid split."""
    classes = len(CLASSES)
    val_losses, val_confusion, seen = 0.0, np.zeros((classes, classes)), 0
    for images, targets in valid_ds:
        probabilities = predict(images)
        val_losses += float(tf.reduce_sum(loss_fn(targets, probabilities)))
        seen += int(images.shape[0])
        val_confusion += tf.math.confusion_matrix(
            tf.argmax(targets, axis=1),
            tf.argmax(probabilities, axis=1),
            num_classes=classes,
            dtype=tf.float32,
        ).numpy()
    return val_losses / max(seen, 1), val_confusion


def confusion_metrics(confusion: np.ndarray, prefix: str) -> dict[str, float]:
    """Accuracy and macro-F1 (as Keras' F1Score(average="macro")) from a confusion matrix."""
    tp = np.diag(confusion)
    fp = confusion.sum(axis=0) - tp
    fn = confusion.sum(axis=1) - tp
    denominator = 2 * tp + fp + fn
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    total = confusion.sum()
    return {
        f"{prefix}accuracy": float(tp.sum() / total) if total else 0.0,
        f"{prefix}macro_f1": float(f1.mean()),
    }
