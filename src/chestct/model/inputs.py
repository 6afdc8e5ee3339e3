"""The tf.data input pipeline of training: decode, cache, shuffle, batch, augment, prefetch.

`make_dataset` feeds PNG slices of the model's size (float32 in [0, 255], one channel) with
their labels; `augmenter` builds the random transforms of params `train.augment` from Keras
layers and two of chestct's own (`RandomAcquisitionGeometry`, `RandomIntensity`), each drawn
from its own seed so that a seeded run repeats exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from chestct.labels import CLASSES
from chestct.model.modeling import label_indices
from chestct.settings import AugmentParams


def _load_png(path: tf.Tensor) -> tf.Tensor:
    image = tf.io.decode_png(tf.io.read_file(path), channels=1)
    return tf.cast(image, tf.float32)


class _SeededAugment(keras.layers.Layer):
    """A random transform of training batches drawn from the layer's own seed; identity at
    inference.

    A subclass names its strengths in STRENGTHS (each 0 = off); they are given in that order or
    by name, and set as attributes of the same names.
    """

    STRENGTHS: tuple[str, ...] = ()

    def __init__(self, *strengths: float, seed: int = 0, **kw: Any) -> None:
        if len(strengths) > len(self.STRENGTHS):
            raise TypeError(f"{type(self).__name__} takes the strengths {self.STRENGTHS}")
        values = dict(zip(self.STRENGTHS, strengths, strict=False))
        values.update({name: kw.pop(name) for name in self.STRENGTHS if name in kw})
        super().__init__(**kw)
        self.seed_generator = keras.random.SeedGenerator(seed)
        for name in self.STRENGTHS:
            setattr(self, name, values.get(name, 0.0))

    def call(self, images: tf.Tensor, training: bool = True) -> tf.Tensor:
        # Each subclass defines augment(images): the transform it draws.
        return self.augment(images) if training else images


class RandomIntensity(_SeededAugment):
    """Per-image grey-level jitter of [0, 255] images: gamma, then a window clipped and
    stretched back, then additive Gaussian noise, clipped to [0, 255].

    Each draws from the layer's own seed, so a seeded run repeats exactly.
    """

    STRENGTHS = ("gamma", "window", "noise")

    def augment(self, images: tf.Tensor) -> tf.Tensor:
        ops = keras.ops
        n = ops.shape(images)[0]
        x = ops.clip(images, 0.0, 255.0)
        if self.gamma > 0:
            span = float(np.log1p(self.gamma))
            log_g = keras.random.uniform((n, 1, 1, 1), -span, span, seed=self.seed_generator)
            x = 255.0 * ops.power(x / 255.0, ops.exp(log_g))
        if self.window > 0:
            low = keras.random.uniform((n, 1, 1, 1), 0.0, self.window, seed=self.seed_generator)
            high = 1.0 - keras.random.uniform(
                (n, 1, 1, 1), 0.0, self.window, seed=self.seed_generator
            )
            x = (x / 255.0 - low) / (high - low) * 255.0
        if self.noise > 0:
            sd = keras.random.uniform((n, 1, 1, 1), 0.0, self.noise, seed=self.seed_generator)
            x = x + sd * keras.random.normal(ops.shape(x), seed=self.seed_generator)
        return ops.clip(x, 0.0, 255.0)


class RandomAcquisitionGeometry(_SeededAugment):
    """Per-image zoom-out into a black margin, aspect and translation, in one affine warp.

    One warp instead of a Keras layer each: three separate warps cost about 140 ms per batch of
    32 at 128 px here, this one about a tenth of it, and it interpolates once.
    """

    STRENGTHS = ("zoom_out", "aspect", "translation")

    def augment(self, images: tf.Tensor) -> tf.Tensor:
        ops = keras.ops
        n = ops.shape(images)[0]
        height = ops.cast(ops.shape(images)[1], "float32")
        width = ops.cast(ops.shape(images)[2], "float32")

        def draw(low: float, high: float) -> tf.Tensor:
            return keras.random.uniform((n,), low, high, seed=self.seed_generator)

        scale = 1.0 - draw(0.0, self.zoom_out) if self.zoom_out > 0 else ops.ones((n,))
        stretch = 1.0 + draw(-self.aspect, self.aspect) if self.aspect > 0 else ops.ones((n,))
        if self.translation > 0:
            dx = draw(-self.translation, self.translation) * width
            dy = draw(-self.translation, self.translation) * height
        else:
            dx = dy = ops.zeros((n,))
        sx, sy = scale, scale * stretch
        cx, cy = (width - 1.0) / 2.0, (height - 1.0) / 2.0
        # Output pixel (x, y) reads input (cx + (x - cx) / sx - dx, cy + (y - cy) / sy - dy).
        zeros = ops.zeros((n,))
        transform = ops.stack(
            [1.0 / sx, zeros, cx - cx / sx - dx, zeros, 1.0 / sy, cy - cy / sy - dy, zeros, zeros],
            axis=1,
        )
        return ops.image.affine_transform(
            images, transform, interpolation="bilinear", fill_mode="constant", fill_value=0.0
        )


def augmenter(params: AugmentParams, seed: int) -> keras.Sequential:
    """The random transforms of params `train.augment`, applied in the input pipeline only.

    Geometry first (flip, rotation, scale jitter, zoom-out into a black margin, aspect,
    translation; all fill with black, the background of a slice), then grey levels
    (contrast, gamma, window, noise) and blur. Each layer has its own seed from `seed`.
    """
    layers: list[keras.layers.Layer] = []
    if params.flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed))
    if params.rotation > 0:
        layers.append(
            keras.layers.RandomRotation(params.rotation, fill_mode="constant", seed=seed + 1)
        )
    if params.zoom > 0:
        layers.append(keras.layers.RandomZoom(params.zoom, fill_mode="constant", seed=seed + 2))
    if params.zoom_out > 0 or params.aspect > 0 or params.translation > 0:
        layers.append(
            RandomAcquisitionGeometry(
                params.zoom_out, params.aspect, params.translation, seed=seed + 4
            )
        )
    if params.contrast > 0:
        # RandomContrast expects [0, 255] inputs with value_range given explicitly.
        layers.append(
            keras.layers.RandomContrast(params.contrast, value_range=(0, 255), seed=seed + 3)
        )
    if params.gamma > 0 or params.window > 0 or params.noise > 0:
        layers.append(RandomIntensity(params.gamma, params.window, params.noise, seed=seed + 7))
    if params.blur > 0:
        kernel = 2 * int(np.ceil(2 * params.blur)) + 1  # covers +-2 sigma
        layers.append(
            keras.layers.RandomGaussianBlur(
                1.0,
                kernel_size=kernel,
                sigma=(0.0, params.blur),
                value_range=(0, 255),
                seed=seed + 8,
            )
        )
    return keras.Sequential(layers, name="augment")


def make_dataset(
    paths: Sequence[Path],
    labels: Sequence[str] | None,
    batch_size: int,
    *,
    shuffle_seed: int | None = None,
    augment: keras.Sequential | None = None,
    one_hot: bool = False,
) -> tf.data.Dataset:
    """Decode → cache → (shuffle) → batch → (augment) → prefetch.

    Decoded images are cached in memory after the first epoch; augmentation runs on whole
    batches after the cache so that every epoch sees new variants.

    Args:
        paths: PNG files of the size the model takes.
        labels: class names, or None for images only.
        batch_size: images per batch.
        shuffle_seed: shuffle anew every epoch with this seed (None: keep the order).
        augment: random transforms for training batches.
        one_hot: labels as one-hot float vectors (for label smoothing and F1) instead of
            class indices.
    """
    files = tf.data.Dataset.from_tensor_slices([str(p) for p in paths])
    images = files.map(_load_png, num_parallel_calls=tf.data.AUTOTUNE)
    if labels is None:
        ds = images
    else:
        y = label_indices(labels)
        targets = np.eye(len(CLASSES), dtype=np.float32)[y] if one_hot else y
        ds = tf.data.Dataset.zip(images, tf.data.Dataset.from_tensor_slices(targets))
    ds = ds.cache()
    if shuffle_seed is not None:
        ds = ds.shuffle(len(paths), seed=shuffle_seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if augment is not None and augment.layers:
        if labels is None:
            ds = ds.map(lambda x: augment(x, training=True), num_parallel_calls=tf.data.AUTOTUNE)
        else:
            ds = ds.map(
                lambda x, y: (augment(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE
            )
    return ds.prefetch(tf.data.AUTOTUNE)


def predict_proba(model: keras.Model, paths: Sequence[Path], batch_size: int) -> np.ndarray:
    """Class probabilities for image files, shape (n, len(CLASSES))."""
    ds = make_dataset(paths, None, batch_size)
    infer = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    return np.concatenate([infer(batch).numpy() for batch in ds], axis=0)
