"""Model construction and the tf.data input pipeline (TensorFlow is imported here, lazily
by the stages that need it, so that data stages start fast)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from chestct.labels import CLASSES
from chestct.settings import AugmentParams, BaseModelParams


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and TensorFlow in one place."""
    keras.utils.set_random_seed(seed)


def build_model(params: BaseModelParams, image_size: int, seed: int) -> keras.Model:
    """The small CNN baseline: conv blocks, global average pooling, dropout, dense head.

    Input is a grey slice as float32 in [0, 255], shape (size, size, 1); output is the softmax
    over CLASSES. Layer names are a contract: "features" (last 4-D feature map), "gap",
    "dropout", "logits" (dense), "probabilities" (softmax), for calibration and Grad-CAM.
    """
    set_seed(seed)
    inputs = keras.Input((image_size, image_size, 1), name="image")
    x = keras.layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)
    for i, filters in enumerate(params.filters):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = keras.layers.BatchNormalization(name=f"bn{i}")(x)
        last = i == len(params.filters) - 1
        # The last feature map is named "features" in every architecture: Grad-CAM reads it.
        x = keras.layers.Activation("relu", name="features" if last else f"relu{i}")(x)
        if not last:
            x = keras.layers.MaxPooling2D(name=f"pool{i}")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dropout(params.dropout, name="dropout")(x)
    logits = keras.layers.Dense(len(CLASSES), name="logits")(x)
    outputs = keras.layers.Activation("softmax", name="probabilities", dtype="float32")(logits)
    return keras.Model(inputs, outputs, name=f"chestct_{params.architecture}")


def label_indices(labels: Sequence[str]) -> np.ndarray:
    lookup = {c: i for i, c in enumerate(CLASSES)}
    return np.array([lookup[label] for label in labels], dtype=np.int32)


def _load_png(path: tf.Tensor) -> tf.Tensor:
    image = tf.io.decode_png(tf.io.read_file(path), channels=1)
    return tf.cast(image, tf.float32)


def augmenter(params: AugmentParams, seed: int) -> keras.Sequential:
    """Random flip, rotation, zoom and contrast, applied in the input pipeline only."""
    layers: list[keras.layers.Layer] = []
    if params.flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed))
    if params.rotation > 0:
        layers.append(
            keras.layers.RandomRotation(params.rotation, fill_mode="constant", seed=seed + 1)
        )
    if params.zoom > 0:
        layers.append(keras.layers.RandomZoom(params.zoom, fill_mode="constant", seed=seed + 2))
    if params.contrast > 0:
        # RandomContrast expects [0, 255] inputs with value_range given explicitly.
        layers.append(
            keras.layers.RandomContrast(params.contrast, value_range=(0, 255), seed=seed + 3)
        )
    return keras.Sequential(layers, name="augment")


def make_dataset(
    paths: Sequence[Path],
    labels: Sequence[str] | None,
    batch_size: int,
    *,
    shuffle_seed: int | None = None,
    augment: keras.Sequential | None = None,
) -> tf.data.Dataset:
    """Decode → cache → (shuffle) → batch → (augment) → prefetch.

    Decoded images are cached in memory after the first epoch; augmentation runs on whole
    batches after the cache so that every epoch sees new variants.
    """
    files = tf.data.Dataset.from_tensor_slices([str(p) for p in paths])
    images = files.map(_load_png, num_parallel_calls=tf.data.AUTOTUNE)
    if labels is None:
        ds = images
    else:
        ds = tf.data.Dataset.zip(images, tf.data.Dataset.from_tensor_slices(label_indices(labels)))
    ds = ds.cache()
    if shuffle_seed is not None:
        ds = ds.shuffle(len(paths), seed=shuffle_seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if augment is not None and augment.layers:
        ds = ds.map(
            lambda x, y: (augment(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE
        )
    return ds.prefetch(tf.data.AUTOTUNE)


def predict_proba(model: keras.Model, paths: Sequence[Path], batch_size: int) -> np.ndarray:
    """Class probabilities for image files, shape (n, len(CLASSES))."""
    ds = make_dataset(paths, None, batch_size)
    infer = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    return np.concatenate([infer(batch).numpy() for batch in ds], axis=0)


def load_model(path: Path) -> keras.Model:
    return keras.models.load_model(path, compile=False)
