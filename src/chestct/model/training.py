"""Training the CNN: from the base model's file to the weights of the best validation epoch.

`train_members` fits one model (or, with `train.ensemble` N > 1, N members merged into one):
phase 1 with the base model's freeze policy, an optional phase 2 that unfreezes the top layers
of a keras-applications backbone at a lower learning rate, and the best validation weights
over both phases kept. The train stage calls it and writes what it returns.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from sklearn.utils.class_weight import compute_class_weight

from chestct.model.callbacks import BestWeights, EpochLogger, EpochSink, callbacks
from chestct.model.fitting import TrainingError, distribution_strategy, fit, gpu_present
from chestct.model.inputs import augmenter, make_dataset
from chestct.model.modeling import (
    label_indices,
    load_model,
    merge_members,
    reinitialised,
    set_seed,
    with_dtype_policy,
)
from chestct.settings import TrainParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    model: keras.Model  # with train.ensemble > 1, the members merged into one model
    history: pd.DataFrame  # one row per member and epoch: member, epoch, phase, lr, metrics
    best_epoch: int  # of the first member
    best_value: float  # of the monitored validation metric at the best epoch (members' mean)
    details: dict[str, Any] = field(default_factory=dict)

    def at_best_epochs(self) -> pd.Series:
        """The history's figures at the members' best epochs, averaged (one row without an
        ensemble)."""
        bests = {(m["member"], m["best_epoch"]) for m in self.details["members"]}
        at_best = [
            pair in bests
            for pair in zip(self.history["member"], self.history["epoch"], strict=True)
        ]
        return self.history[at_best].mean(numeric_only=True)


def class_weights(labels: pd.Series, mode: str) -> dict[int, float] | None:
    """Inverse-frequency weights of the classes present, or None."""
    if mode == "none":
        return None
    y = label_indices(labels)
    present = np.unique(y)
    weights = compute_class_weight("balanced", classes=present, y=y)
    return {int(c): float(w) for c, w in zip(present, weights, strict=True)}


def optimizer(params: TrainParams, learning_rate: float) -> keras.optimizers.Optimizer:
    """The optimizer `train.optimizer` names, at `learning_rate`."""
    if params.optimizer == "adamw":
        return keras.optimizers.AdamW(learning_rate, weight_decay=params.weight_decay)
    return keras.optimizers.Adam(learning_rate)


def compile_model(model: keras.Model, params: TrainParams, learning_rate: float) -> None:
    """Compile for training: the train params' optimizer and label smoothing, with accuracy
    and macro-F1 logged."""
    model.compile(
        optimizer=optimizer(params, learning_rate),
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
    backbone = backbone_of(model, count)
    backbone.trainable = True
    layers = backbone.layers
    cut = max(len(layers) - count, 0)
    opened = 0
    for i, layer in enumerate(layers):
        open_ = i >= cut and not isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = open_
        opened += open_
    return opened


def backbone_of(model: keras.Model, count: int) -> keras.Model:
    """The nested "backbone" whose top `count` layers fine-tuning opens; refused without one."""
    try:
        return model.get_layer("backbone")
    except ValueError:
        raise TrainingError(
            f"train.fine_tune.unfreeze_top is {count} but {model.name} has no backbone to "
            "unfreeze (small_cnn trains all its layers); set it to 0"
        ) from None


@dataclass(frozen=True)
class _Run:
    """What every member of one training run shares."""

    base_model: Path
    train: pd.DataFrame
    root: Path
    params: TrainParams
    strategy: tf.distribute.Strategy
    use_mixed: bool
    weights: dict[int, float] | None
    recalibration: tf.data.Dataset | None
    valid_ds: tf.data.Dataset
    on_epoch: EpochSink | None


def train_members(
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
    their logits (modeling.merge_members). Raises TrainingError on a setting it cannot honour.

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
    strategy, use_mixed = _prepare(params, seed, strategy)
    valid_paths = [root / p for p in valid["path"]]
    run = _Run(
        base_model=base_model,
        train=train,
        root=root,
        weights=class_weights(train["label"], params.class_weights),
        recalibration=_recalibration_batches(train, params, seed, root),
        valid_ds=make_dataset(valid_paths, list(valid["label"]), params.batch_size, one_hot=True),
        params=params,
        strategy=strategy,
        use_mixed=use_mixed,
        on_epoch=on_epoch,
    )
    if params.fine_tune.unfreeze_top > 0:
        with strategy.scope():
            backbone_of(load_model(base_model), params.fine_tune.unfreeze_top)  # refuse first
    rows: list[dict[str, float]] = []
    members: list[keras.Model] = []
    member_details: list[dict[str, Any]] = []
    opened = 0
    for k in range(params.ensemble):
        model, member_rows, detail, opened = _train_member(run, k, seed + k, len(rows))
        rows.extend(member_rows)
        members.append(model)
        member_details.append(detail)

    model = merge_members(members)
    return TrainResult(
        model=model,
        history=pd.DataFrame(rows),
        best_epoch=member_details[0]["best_epoch"],
        best_value=float(np.mean([m["best_value"] for m in member_details])),
        details=_details(run, model, member_details, opened),
    )


def _details(
    run: _Run, model: keras.Model, member_details: list[dict[str, Any]], opened: int
) -> dict[str, Any]:
    """How the model was trained: strategy, precision, members, fine-tuning, size."""
    params = run.params
    return {
        "strategy": params.strategy,
        "replicas": int(run.strategy.num_replicas_in_sync),
        "mixed_precision": run.use_mixed,
        "deterministic": params.deterministic,
        "ensemble": params.ensemble,
        "members": member_details,
        "phase1_epochs": member_details[0]["phase1_epochs"],
        "fine_tune_layers": opened,
        "trainable_parameters": int(sum(np.prod(w.shape) for w in model.trainable_weights)),
    }


def _prepare(
    params: TrainParams, seed: int, strategy: tf.distribute.Strategy | None
) -> tuple[tf.distribute.Strategy, bool]:
    """The distribution strategy and whether to train in mixed precision; determinism and
    the seed set."""
    if strategy is None:
        strategy = distribution_strategy(params.strategy)
    if params.deterministic:
        tf.config.experimental.enable_op_determinism()
    set_seed(seed)
    use_mixed = params.mixed_precision and gpu_present()
    if params.mixed_precision and not use_mixed:
        log.warning("train.mixed_precision: no GPU present, training in float32")
    return strategy, use_mixed


def _recalibration_batches(
    train: pd.DataFrame, params: TrainParams, seed: int, root: Path
) -> tf.data.Dataset | None:
    """The clean batches batch-norm statistics are re-estimated on (train.bn_recalibration)."""
    if params.bn_recalibration <= 0:
        return None
    # A fixed, seeded sample that mixes the classes; read whole each time, so it caches.
    sample = train.sample(frac=1.0, random_state=seed)
    sample = sample.iloc[: params.bn_recalibration * params.batch_size]
    return make_dataset(
        [root / p for p in sample["path"]], list(sample["label"]), params.batch_size
    )


def _train_member(
    run: _Run, k: int, member_seed: int, offset: int
) -> tuple[keras.Model, list[dict[str, float]], dict[str, Any], int]:
    """Member k: its model, its history rows, its summary and the layers fine-tuning opened.

    Member k draws its own weights (k >= 1), shuffling and augmentation from seed + k;
    member 0 is the base model as base-model made it, so ensemble: 1 is plain training.
    """
    params, strategy = run.params, run.strategy
    set_seed(member_seed)
    train_ds = make_dataset(
        [run.root / p for p in run.train["path"]],
        list(run.train["label"]),
        params.batch_size,
        shuffle_seed=member_seed,
        augment=augmenter(params.augment, member_seed),
        one_hot=True,
    )
    with strategy.scope():
        model = load_model(run.base_model)
        if k > 0:
            model = reinitialised(model, member_seed)
        if run.use_mixed:
            model = with_dtype_policy(model, "mixed_float16")
        compile_model(model, params, params.learning_rate)
    if params.ensemble > 1:
        log.info("ensemble member %d of %d (seed %d)", k + 1, params.ensemble, member_seed)
    member_rows: list[dict[str, float]] = []
    best = BestWeights(params.monitor)
    logger = EpochLogger(run.on_epoch, member_rows, 1, offset)
    _phase(run, model, train_ds, best, logger, 0, params.epochs)
    phase1_epochs = len(member_rows)
    opened = 0
    if params.fine_tune.unfreeze_top > 0:
        with strategy.scope():
            opened = unfreeze_top(model, params.fine_tune.unfreeze_top)
            compile_model(model, params, params.fine_tune.learning_rate)
        log.info(
            "fine-tuning: %d backbone layers trainable, learning rate %g",
            opened,
            params.fine_tune.learning_rate,
        )
        logger = EpochLogger(run.on_epoch, member_rows, 2, offset)
        epochs = phase1_epochs + params.fine_tune.epochs
        _phase(run, model, train_ds, best, logger, phase1_epochs, epochs)
    if run.use_mixed:
        # Served and evaluated on CPUs too: hand on a float32 model with the same weights.
        model = with_dtype_policy(model, "float32")
    assert best.best is not None  # fit() ran at least one epoch
    for i, row in enumerate(member_rows):
        row.update({"member": k, "epoch": i + 1})
    detail = {
        "member": k,
        "seed": member_seed,
        "phase1_epochs": phase1_epochs,
        "epochs_run": len(member_rows),
        "best_epoch": best.best_epoch,
        "best_value": best.best,
    }
    return model, member_rows, detail, opened


def _phase(
    run: _Run,
    model: keras.Model,
    train_ds: tf.data.Dataset,
    best: BestWeights,
    logger: EpochLogger,
    initial_epoch: int,
    epochs: int,
) -> None:
    """One fitting phase from `initial_epoch` to `epochs`, ending on its best weights so far."""
    fit(
        model,
        run.strategy,
        train_ds,
        run.valid_ds,
        initial_epoch=initial_epoch,
        epochs=epochs,
        class_weight=run.weights,
        callbacks=callbacks(run.params, best, logger, run.recalibration),
        label_smoothing=run.params.label_smoothing,
    )
    best.restore()
