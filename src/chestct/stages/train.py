"""train: fit the base model on the validated train split, checkpointed on the valid split.

The family base-model chose (family.json) decides what is fitted: cnn the network below,
texture the chestct.model.texture classifier (iterations chosen and temperature fitted on valid),
ensemble both, written with ensemble.json (chestct.model.families) that averages them.

Phase 1 trains with the base model's freeze policy; an optional phase 2 unfreezes the top N
layers of a keras-applications backbone and continues at a lower learning rate. The weights
with the best validation score over both phases are what the stage saves.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from sklearn.utils.class_weight import compute_class_weight

from chestct.data.manifest import DATASET_COLUMNS, read_manifest, write_manifest
from chestct.evaluation.metrics import classification_metrics
from chestct.evaluation.plots import plot_history
from chestct.evaluation.scoring import load_images, model_outputs
from chestct.labels import CLASSES
from chestct.model.calibration import fit_temperature, nll, softmax
from chestct.model.distributed import WorkerRole, worker_role
from chestct.model.families import ENSEMBLE_FILE, TEXTURE_FILE, write_ensemble
from chestct.model.modeling import (
    all_layers,
    augmenter,
    label_indices,
    load_model,
    make_dataset,
    merge_members,
    reinitialised,
    save_model,
    set_seed,
    with_dtype_policy,
)
from chestct.model.texture import (
    ClassifierSpec,
    TextureError,
    TextureModel,
    feature_matrix,
    fit_texture_features,
)
from chestct.model.texture import save as save_texture
from chestct.pointers import read_pointer
from chestct.runner import StageFailed, run_main, stage_session
from chestct.settings import TextureParams, TrainParams, load_settings

log = logging.getLogger(__name__)

EpochSink = Callable[[dict[str, float], int], None]


@dataclass(frozen=True)
class TrainResult:
    model: keras.Model  # with train.ensemble > 1, the members merged into one model
    history: pd.DataFrame  # one row per member and epoch: member, epoch, phase, lr, metrics
    best_epoch: int  # of the first member
    best_value: float  # of the monitored validation metric at the best epoch (members' mean)
    details: dict[str, Any] = field(default_factory=dict)


class _EpochLogger(keras.callbacks.Callback):
    """Hands each epoch's metrics and learning rate to a sink (MLflow in main()).

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
            raise StageFailed(
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


def class_weights(labels: pd.Series, mode: str) -> dict[int, float] | None:
    """Inverse-frequency weights of the classes present, or None."""
    if mode == "none":
        return None
    y = label_indices(labels)
    present = np.unique(y)
    weights = compute_class_weight("balanced", classes=present, y=y)
    return {int(c): float(w) for c, w in zip(present, weights, strict=True)}


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


def _optimizer(params: TrainParams, learning_rate: float) -> keras.optimizers.Optimizer:
    if params.optimizer == "adamw":
        return keras.optimizers.AdamW(learning_rate, weight_decay=params.weight_decay)
    return keras.optimizers.Adam(learning_rate)


def _compile(model: keras.Model, params: TrainParams, learning_rate: float) -> None:
    model.compile(
        optimizer=_optimizer(params, learning_rate),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=params.label_smoothing),
        metrics=[
            keras.metrics.CategoricalAccuracy(name="accuracy"),
            keras.metrics.F1Score(average="macro", name="macro_f1"),
        ],
    )


def unfreeze_top(model: keras.Model, count: int) -> int:
    """Make the top `count` layers of the nested "backbone" trainable, the rest frozen.

    Batch-norm layers stay frozen: their statistics were learned on far more data. Returns
    the number of layers made trainable.
    """
    backbone = _backbone(model, count)
    backbone.trainable = True
    layers = backbone.layers
    cut = max(len(layers) - count, 0)
    opened = 0
    for i, layer in enumerate(layers):
        open_ = i >= cut and not isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = open_
        opened += open_
    return opened


def _backbone(model: keras.Model, count: int) -> keras.Model:
    try:
        return model.get_layer("backbone")
    except ValueError:
        raise StageFailed(
            f"train.fine_tune.unfreeze_top is {count} but {model.name} has no backbone to "
            "unfreeze (small_cnn trains all its layers); set it to 0"
        ) from None


def _callbacks(
    params: TrainParams,
    best: BestWeights,
    logger: _EpochLogger,
    recalibration: tf.data.Dataset | None,
) -> list[keras.callbacks.Callback]:
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


def _fit(
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
    classes = len(CLASSES)
    per_class = [1.0] * classes
    for index, weight in (class_weight or {}).items():
        per_class[index] = weight
    sample_weights = tf.constant(per_class, tf.float32)
    loss_fn = keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing, reduction=None)

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

    @tf.function
    def predict(images: tf.Tensor) -> tf.Tensor:
        return model(images, training=False)

    distributed = strategy.experimental_distribute_dataset(train_ds)
    hooks = keras.callbacks.CallbackList(callbacks, model=model)
    model.stop_training = False
    hooks.on_train_begin()
    for epoch in range(initial_epoch, epochs):
        hooks.on_epoch_begin(epoch)
        losses, confusion = [], np.zeros((classes, classes))
        for batch in distributed:
            loss, step_confusion = train_step(batch)
            losses.append(float(loss))
            confusion += step_confusion.numpy()
        # Every worker validates on the whole valid split with the same weights, so every
        # worker's callbacks (early stopping, learning rate) decide alike without a reduction.
        hooks.on_test_begin()
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
        hooks.on_test_end()
        logs = {
            "loss": float(np.mean(losses)),
            **_confusion_metrics(confusion, ""),
            "val_loss": val_losses / max(seen, 1),
            **_confusion_metrics(val_confusion, "val_"),
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


def _confusion_metrics(confusion: np.ndarray, prefix: str) -> dict[str, float]:
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


def run_train(
    base_model: Path,
    train: pd.DataFrame,
    valid: pd.DataFrame,
    params: TrainParams,
    seed: int,
    root: Path,
    on_epoch: EpochSink | None = None,
    strategy: tf.distribute.Strategy | None = None,
) -> TrainResult:
    """Fit the base model; returns it with the best validation weights restored.

    With `params.ensemble` N > 1, N members are trained one after another (member k from
    seed + k, k >= 1 with freshly drawn weights) and merged into one model that averages
    their logits (modeling.merge_members).

    Args:
        base_model: the untrained model file from base-model.
        train: training manifest (DATASET_COLUMNS), paths relative to `root`.
        valid: validation manifest, same layout.
        params: the train params group.
        seed: seeds weights, shuffling and augmentation.
        root: folder the manifest paths are relative to.
        on_epoch: called with (metrics, epoch index) after every epoch of both phases.
        strategy: the tf.distribute strategy, when the caller made it (multi-worker
            collectives must be set up before other TF work); else one for params.strategy.
    """
    if strategy is None:
        strategy = distribution_strategy(params.strategy)
    if params.deterministic:
        tf.config.experimental.enable_op_determinism()
    set_seed(seed)
    use_mixed = params.mixed_precision and gpu_present()
    if params.mixed_precision and not use_mixed:
        log.warning("train.mixed_precision: no GPU present, training in float32")

    weights = class_weights(train["label"], params.class_weights)
    recalibration = None
    if params.bn_recalibration > 0:
        # A fixed, seeded sample that mixes the classes; read whole each time, so it caches.
        sample = train.sample(frac=1.0, random_state=seed)
        sample = sample.iloc[: params.bn_recalibration * params.batch_size]
        recalibration = make_dataset(
            [root / p for p in sample["path"]], list(sample["label"]), params.batch_size
        )
    valid_ds = make_dataset(
        [root / p for p in valid["path"]], list(valid["label"]), params.batch_size, one_hot=True
    )
    if params.fine_tune.unfreeze_top > 0:
        with strategy.scope():
            _backbone(load_model(base_model), params.fine_tune.unfreeze_top)  # refuse first

    rows: list[dict[str, float]] = []
    members: list[keras.Model] = []
    member_details: list[dict[str, Any]] = []
    opened = 0
    for k in range(params.ensemble):
        # Member k draws its own weights (k >= 1), shuffling and augmentation from seed + k;
        # member 0 is the base model as base-model made it, so ensemble: 1 is plain training.
        member_seed = seed + k
        set_seed(member_seed)
        train_ds = make_dataset(
            [root / p for p in train["path"]],
            list(train["label"]),
            params.batch_size,
            shuffle_seed=member_seed,
            augment=augmenter(params.augment, member_seed),
            one_hot=True,
        )
        with strategy.scope():
            model = load_model(base_model)
            if k > 0:
                model = reinitialised(model, member_seed)
            if use_mixed:
                model = with_dtype_policy(model, "mixed_float16")
            _compile(model, params, params.learning_rate)
        if params.ensemble > 1:
            log.info("ensemble member %d of %d (seed %d)", k + 1, params.ensemble, member_seed)
        member_rows: list[dict[str, float]] = []
        best = BestWeights(params.monitor)
        _fit(
            model,
            strategy,
            train_ds,
            valid_ds,
            initial_epoch=0,
            epochs=params.epochs,
            class_weight=weights,
            callbacks=_callbacks(
                params, best, _EpochLogger(on_epoch, member_rows, 1, len(rows)), recalibration
            ),
            label_smoothing=params.label_smoothing,
        )
        best.restore()
        phase1_epochs = len(member_rows)
        if params.fine_tune.unfreeze_top > 0:
            with strategy.scope():
                opened = unfreeze_top(model, params.fine_tune.unfreeze_top)
                _compile(model, params, params.fine_tune.learning_rate)
            log.info(
                "fine-tuning: %d backbone layers trainable, learning rate %g",
                opened,
                params.fine_tune.learning_rate,
            )
            _fit(
                model,
                strategy,
                train_ds,
                valid_ds,
                initial_epoch=phase1_epochs,
                epochs=phase1_epochs + params.fine_tune.epochs,
                class_weight=weights,
                callbacks=_callbacks(
                    params, best, _EpochLogger(on_epoch, member_rows, 2, len(rows)), recalibration
                ),
                label_smoothing=params.label_smoothing,
            )
            best.restore()
        if use_mixed:
            # Served and evaluated on CPUs too: hand on a float32 model with the same weights.
            model = with_dtype_policy(model, "float32")
        assert best.best is not None  # fit() ran at least one epoch
        for i, row in enumerate(member_rows):
            row.update({"member": k, "epoch": i + 1})
        rows.extend(member_rows)
        members.append(model)
        member_details.append(
            {
                "member": k,
                "seed": member_seed,
                "phase1_epochs": phase1_epochs,
                "epochs_run": len(member_rows),
                "best_epoch": best.best_epoch,
                "best_value": best.best,
            }
        )

    model = merge_members(members)
    history = pd.DataFrame(rows)
    details = {
        "strategy": params.strategy,
        "replicas": int(strategy.num_replicas_in_sync),
        "mixed_precision": use_mixed,
        "deterministic": params.deterministic,
        "ensemble": params.ensemble,
        "members": member_details,
        "phase1_epochs": member_details[0]["phase1_epochs"],
        "fine_tune_layers": opened,
        "trainable_parameters": int(sum(np.prod(w.shape) for w in model.trainable_weights)),
    }
    return TrainResult(
        model=model,
        history=history,
        best_epoch=member_details[0]["best_epoch"],
        best_value=float(np.mean([m["best_value"] for m in member_details])),
        details=details,
    )


def texture_spec(params: TextureParams | dict[str, Any]) -> ClassifierSpec:
    """The classifier settings from params base_model.texture (or family.json's copy)."""
    values = params if isinstance(params, dict) else dataclasses.asdict(params)
    return ClassifierSpec(**values)


def run_train_texture(
    train: pd.DataFrame,
    valid: pd.DataFrame,
    spec: ClassifierSpec,
    seed: int,
    root: Path,
    image_size: int,
    history: list[dict[str, float]] | None = None,
) -> tuple[TextureModel, dict[str, float]]:
    """Fit the texture model on the resized train slices (chestct.model.texture.fit_texture):
    iterations and temperature chosen on valid. Returns it with its valid-split figures; with
    `history`, its training curve (a row per boosting iteration) is appended there."""
    train_images = load_images(train, root, image_size)
    valid_images = load_images(valid, root, image_size)
    y_train = label_indices(list(train["label"]))
    y_valid = label_indices(list(valid["label"]))
    log.info("texture features of %d + %d slices", len(train_images), len(valid_images))
    x_train = feature_matrix(train_images)
    x_valid = feature_matrix(valid_images)
    curve: list[dict[str, float]] = []
    try:
        model = fit_texture_features(
            x_train, y_train, x_valid, y_valid, spec, seed, image_size, curve
        )
    except TextureError as exc:
        raise StageFailed(str(exc)) from None
    # A refit model has seen valid: its figures are those of the boosters before the refit.
    held_out = model.details.get("held_out_valid_logits")
    proba = softmax(np.asarray(held_out) if held_out else model.logits(x_valid))
    m = classification_metrics(y_valid, proba)
    figures = {
        "val_loss": nll(y_valid, proba),
        "val_accuracy": m["accuracy"],
        "val_macro_f1": m["macro_f1"],
        "iterations": model.details["iterations"],
        "temperature": model.temperature,
    }
    if history is not None:
        history.extend(curve)
    log.info(
        "texture model: %d iterations (of %d), temperature %.3f; valid accuracy %.4f, "
        "macro-F1 %.4f",
        figures["iterations"],
        spec.max_iter,
        model.temperature,
        figures["val_accuracy"],
        figures["val_macro_f1"],
    )
    return model, figures


def cnn_temperature(model: keras.Model, valid: pd.DataFrame, root: Path) -> float:
    """The CNN's temperature on the valid split (metrics.fit_temperature), so that an
    ensemble averages calibrated probabilities."""
    images = load_images(valid, root, int(model.input_shape[1]))
    logits = model_outputs(model, images, 64, ["logits"])["logits"]
    return float(fit_temperature(label_indices(list(valid["label"])), logits).temperature)


def run_worker(role: WorkerRole, strategy: tf.distribute.Strategy) -> TrainResult:
    """A non-chief worker of a multi-worker run: train in step with the chief, write nothing.

    It reads the same inputs as the chief (through the pointers, which must match their
    digests: the machines share them through a DVC remote) and takes part in every gradient
    step; the chief alone writes artifacts/train/, the pointer and the MLflow run.
    """
    settings = load_settings()
    paths = settings.paths
    validate = read_pointer(paths, "validate")
    base = read_pointer(paths, "base-model")
    train = read_manifest(validate.output_path("train", paths.root), DATASET_COLUMNS)
    valid = read_manifest(validate.output_path("valid", paths.root), DATASET_COLUMNS)
    log.info(
        "worker %s:%d of %d workers: training on %d images; the chief writes the outputs",
        role.task_type,
        role.index,
        role.workers,
        len(train),
    )
    result = run_train(
        base.output_path("model", paths.root),
        train,
        valid,
        settings.params.train,
        settings.params.base.seed,
        paths.root,
        strategy=strategy,
    )
    log.info(
        "worker %s:%d done: %d epochs, best epoch %d; nothing written",
        role.task_type,
        role.index,
        len(result.history),
        result.best_epoch,
    )
    return result


def main() -> None:
    settings = load_settings()
    role = worker_role(settings.params.train.strategy)
    # Before anything else touches TensorFlow: multi-worker collectives start with the program.
    strategy = distribution_strategy(settings.params.train.strategy)
    if not role.chief:
        logging.basicConfig(
            level=logging.INFO,
            stream=sys.stderr,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        run_worker(role, strategy)
        return
    with stage_session("train") as session:
        s = session.settings
        root = s.paths.root
        validate = read_pointer(s.paths, "validate")
        base = read_pointer(s.paths, "base-model")
        train = read_manifest(validate.output_path("train", root), DATASET_COLUMNS)
        valid = read_manifest(validate.output_path("valid", root), DATASET_COLUMNS)
        session.log_manifest("train split", validate.output_path("train", root), train, "training")
        session.log_manifest(
            "valid split", validate.output_path("valid", root), valid, "validation"
        )
        log.info(
            "training on %d images, validating on %d; classes %s", len(train), len(valid), CLASSES
        )
        family = read_family(base, root)
        out = session.out_dir
        tex_figures: dict[str, float] = {}
        history = s.paths.report_dir("train") / "history.csv"  # a dvc plot, git-tracked
        history.parent.mkdir(parents=True, exist_ok=True)
        if family["family"] in ("texture", "ensemble"):
            curve: list[dict[str, float]] = []
            tex_model, tex_figures = run_train_texture(
                train,
                valid,
                texture_spec(family["texture"]),
                s.params.base.seed,
                root,
                s.params.base.image_size,
                curve,
            )
            texture_path = save_texture(tex_model, out / TEXTURE_FILE)
        if family["family"] == "texture":
            # One row per boosting iteration: the texture family's training curve.
            rows = pd.DataFrame(curve).assign(member=0, phase="boosting")
            write_manifest(history, rows)
            session.log_artifact(history)
            session.finish(
                inputs=["validate", "base-model"],
                outputs={"model": texture_path, "history": history},
                metrics={
                    "epochs_run": int(tex_figures["iterations"]),
                    "best_epoch": int(tex_figures["iterations"]),
                    "ensemble": 1,
                    "best_val_loss": tex_figures["val_loss"],
                    "best_val_accuracy": tex_figures["val_accuracy"],
                    "best_val_macro_f1": tex_figures["val_macro_f1"],
                },
                details={"family": "texture", "texture": tex_model.details},
            )
            return
        result = run_train(
            base.output_path("model", root),
            train,
            valid,
            s.params.train,
            s.params.base.seed,
            root,
            on_epoch=lambda m, e: session.log_metrics(m, step=e),
            strategy=strategy,
        )
        model_path = save_model(result.model, out / "model.keras")
        outputs = {"model": model_path}
        details = dict(result.details, family=family["family"])
        if family["family"] == "ensemble":
            temperature = cnn_temperature(result.model, valid, root)
            outputs = {
                "model": write_ensemble(
                    out / ENSEMBLE_FILE, model_path, texture_path, temperature
                ),
                "cnn": model_path,
                "texture": texture_path,
            }
            details.update({"cnn_temperature": temperature, "texture": tex_model.details})
        write_manifest(history, result.history)
        plot_history(result.history, out / "curves.png")
        session.log_artifact(out / "curves.png")
        session.log_artifact(history)
        # The members' best epochs, averaged (one row without an ensemble).
        bests = {(m["member"], m["best_epoch"]) for m in result.details["members"]}
        at_best = [
            pair in bests
            for pair in zip(result.history["member"], result.history["epoch"], strict=True)
        ]
        best = result.history[at_best].mean(numeric_only=True)
        session.finish(
            inputs=["validate", "base-model"],
            outputs={**outputs, "history": history},
            metrics={
                "epochs_run": len(result.history),
                "best_epoch": result.best_epoch,
                "ensemble": s.params.train.ensemble,
                "best_val_loss": float(best["val_loss"]),
                "best_val_accuracy": float(best["val_accuracy"]),
                "best_val_macro_f1": float(best["val_macro_f1"]),
            },
            details=details,
        )


def read_family(base: Any, root: Path) -> dict[str, Any]:
    """base-model's family.json ({"family", "texture"}); a base-model run from before the
    families existed made a CNN."""
    if "family" not in base.outputs:
        return {"family": "cnn", "texture": {}}
    path = base.output_path("family", root)
    try:
        family = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise StageFailed(f"{path}: unreadable ({exc}); rerun `dvc repro base-model`") from None
    return family


if __name__ == "__main__":
    run_main("train", main)
