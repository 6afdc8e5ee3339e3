"""Model construction, saving and loading (TensorFlow is imported here, lazily by the stages
that need it, so that data stages start fast; the input pipeline is chestct.model.inputs).

Every model takes a grey slice as float32 in [0, 255], shape (size, size, 1), and carries its
own preprocessing (channel replication and the backbone's normalisation), so that serving feeds
the same input to every architecture. Layer names are a contract that evaluation and serving
rely on: "features" (last 4-D feature map), "gap", "dropout", "logits" (dense, no activation)
and "probabilities" (softmax, float32). Keras-applications backbones sit in a nested model
named "backbone".
"""

from __future__ import annotations

import json
import os
import socket
import threading
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import keras
import numpy as np

from chestct.fsutil import staged_file
from chestct.labels import CLASSES
from chestct.settings import BaseModelParams

# How long to wait for the weights host before declaring it unreachable.
WEIGHTS_PROBE_TIMEOUT_S = 3.0

# The caffe-style mean that resnet50 and vgg16 subtract (BGR order). The channel flip that
# their preprocess_input does first is a no-op here: the three channels are the same grey.
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


class WeightsError(ValueError):
    """Initial weights cannot be obtained or do not fit the architecture."""


@dataclass(frozen=True)
class Backbone:
    """A keras.applications backbone and where its ImageNet weights (without top) live."""

    constructor: str  # attribute of keras.applications
    weights_url: str
    preprocessing: str  # "internal" (inside the application) or "caffe"


BACKBONES: dict[str, Backbone] = {
    "mobilenet_v3_small": Backbone(
        "MobileNetV3Small",
        "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v3/"
        "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5",
        "internal",
    ),
    "efficientnet_b0": Backbone(
        "EfficientNetB0",
        "https://storage.googleapis.com/keras-applications/efficientnetb0_notop.h5",
        "internal",
    ),
    "resnet50": Backbone(
        "ResNet50",
        "https://storage.googleapis.com/tensorflow/keras-applications/resnet/"
        "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "caffe",
    ),
    "vgg16": Backbone(
        "VGG16",
        "https://storage.googleapis.com/tensorflow/keras-applications/vgg16/"
        "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "caffe",
    ),
}

ARCHITECTURES: tuple[str, ...] = ("small_cnn", *BACKBONES)


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and TensorFlow in one place."""
    keras.utils.set_random_seed(seed)


# --------------------------------------------------------------------------- weights


def _keras_cache(url: str) -> Path:
    home = Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras")
    return home / "models" / Path(urlparse(url).path).name


def host_reachable(url: str, timeout_s: float = WEIGHTS_PROBE_TIMEOUT_S) -> bool:
    """True when a TCP connection to the URL's host opens within `timeout_s` (DNS included).

    The probe runs in a daemon thread because name resolution has no timeout of its own.
    """
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((parsed.hostname, port), timeout=timeout_s):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s + 0.5)
    return bool(result and result[0])


def _unavailable(architecture: str, reason: str) -> WeightsError:
    url = BACKBONES[architecture].weights_url
    return WeightsError(
        f"base_model.weights: imagenet weights for {architecture} cannot be downloaded "
        f"({reason}). Pretrained weights are not fetched here; get the file {url} on a "
        f"machine with internet access, copy it here and set base_model.weights to its path "
        f"(a .h5/.weights.h5 backbone file, or a .keras chestct model), or use "
        f"base_model.weights: none to train from scratch."
    )


def resolve_weights(params: BaseModelParams, root: Path | None = None) -> str | Path | None:
    """What keras.applications gets as `weights`: None, "imagenet" (cached or reachable) or a
    checked local file. Fails within seconds, with the fix, when nothing can be obtained."""
    if params.weights == "none":
        return None
    if params.weights == "imagenet":
        if params.architecture not in BACKBONES:
            raise WeightsError(
                f"base_model.weights: {params.architecture} has no pretrained weights; "
                "use none or a path to a .weights.h5/.keras file"
            )
        url = BACKBONES[params.architecture].weights_url
        if _keras_cache(url).is_file() or host_reachable(url):
            return "imagenet"
        host = urlparse(url).hostname
        raise _unavailable(params.architecture, f"{host} is unreachable from this machine")
    path = Path(params.weights)
    if not path.is_absolute() and root is not None:
        path = root / path
    if not path.is_file():
        raise WeightsError(
            f"base_model.weights: file {path} not found; give the path (absolute, or relative "
            "to the project root) of a .h5/.weights.h5 or .keras file, or use none"
        )
    return path


def _backbone(architecture: str, image_size: int, weights: str | Path | None) -> keras.Model:
    spec = BACKBONES[architecture]
    constructor = getattr(keras.applications, spec.constructor)
    kwargs: dict[str, object] = {}
    if architecture == "mobilenet_v3_small":
        kwargs["include_preprocessing"] = True
    as_file = isinstance(weights, Path) and weights.suffix == ".h5"
    try:
        return constructor(
            include_top=False,
            weights=str(weights) if as_file else ("imagenet" if weights == "imagenet" else None),
            input_shape=(image_size, image_size, 3),
            name="backbone",
            **kwargs,
        )
    except WeightsError:
        raise
    except Exception as exc:  # keras raises many types for a failed download or a bad file
        if weights == "imagenet":
            raise _unavailable(architecture, f"{type(exc).__name__}: {exc}") from None
        if as_file:
            raise WeightsError(
                f"base_model.weights: {weights} does not hold {architecture} backbone weights "
                f"({type(exc).__name__}: {exc}); it must be the no-top file that "
                f"keras.applications uses ({Path(spec.weights_url).name}) or backbone weights "
                "saved with save_weights()"
            ) from None
        raise


def _copy_from_keras_file(model: keras.Model, path: Path) -> None:
    try:
        source = keras.models.load_model(path, compile=False)
    except Exception as exc:
        raise WeightsError(
            f"base_model.weights: {path} is not a loadable .keras model ({exc})"
        ) from None
    ours = [w.shape for w in model.get_weights()]
    theirs = [w.shape for w in source.get_weights()]
    if ours != theirs:
        raise WeightsError(
            f"base_model.weights: the model in {path} ({source.name}, input "
            f"{tuple(source.input_shape)[1:]}) does not match {model.name} with input "
            f"{tuple(model.input_shape)[1:]}; use a model trained with the same "
            "architecture, filters and image size"
        )
    model.set_weights(source.get_weights())


# --------------------------------------------------------------------------- models


def _small_cnn(inputs: keras.KerasTensor, params: BaseModelParams) -> keras.KerasTensor:
    x = keras.layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)
    for i, filters in enumerate(params.filters):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
        # momentum 0.5: with a few dozen steps per epoch, a longer average (Keras' default
        # 0.99, even 0.9) trails the weights so far that inference-mode scores collapse to
        # chance while training-mode ones are high (measured on the synthetic default).
        x = keras.layers.BatchNormalization(momentum=0.5, name=f"bn{i}")(x)
        last = i == len(params.filters) - 1
        x = keras.layers.Activation("relu", name="features" if last else f"relu{i}")(x)
        if not last:
            x = keras.layers.MaxPooling2D(name=f"pool{i}")(x)
    return x


def _preprocess(x: keras.KerasTensor, architecture: str) -> keras.KerasTensor:
    x = keras.layers.Concatenate(axis=-1, name="grey_to_rgb")([x, x, x])
    if BACKBONES[architecture].preprocessing == "caffe":
        # Built-in layers only: the saved model must load without chestct being importable.
        x = keras.layers.Normalization(
            mean=list(_CAFFE_MEAN_BGR), variance=[1.0, 1.0, 1.0], name="preprocess"
        )(x)
    return x


def frozen_backbone(params: BaseModelParams) -> bool:
    """Whether the freeze policy keeps the backbone's weights fixed in the first phase."""
    if params.freeze == "auto":
        return params.weights != "none"
    return params.freeze == "backbone"


def build_model(
    params: BaseModelParams, image_size: int, seed: int, *, root: Path | None = None
) -> keras.Model:
    """Build the model named by `params.architecture` with a GAP + dropout + dense head.

    Args:
        params: the base_model params group.
        image_size: side of the square grey input.
        seed: seeds weight initialisation (identical seeds give identical weights).
        root: folder that a relative `params.weights` path is resolved against.

    Raises:
        WeightsError: pretrained weights cannot be obtained or do not fit.
    """
    weights = resolve_weights(params, root)
    set_seed(seed)
    inputs = keras.Input((image_size, image_size, 1), name="image")
    if params.architecture == "small_cnn":
        x = _small_cnn(inputs, params)
    else:
        x = _preprocess(inputs, params.architecture)
        backbone = _backbone(params.architecture, image_size, weights)
        backbone.trainable = not frozen_backbone(params)
        # Pretrained batch-norm statistics stay in inference mode, also once unfrozen for
        # fine-tuning; a backbone trained from scratch must learn its own.
        pretrained = weights is not None
        x = backbone(x, training=False) if pretrained else backbone(x)
        x = keras.layers.Identity(name="features")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dropout(params.dropout, name="dropout")(x)
    logits = keras.layers.Dense(len(CLASSES), name="logits")(x)
    outputs = keras.layers.Activation("softmax", name="probabilities", dtype="float32")(logits)
    model = keras.Model(inputs, outputs, name=f"chestct_{params.architecture}")
    if isinstance(weights, Path) and weights.suffix == ".keras":
        _copy_from_keras_file(model, weights)
    elif isinstance(weights, Path) and params.architecture == "small_cnn":
        try:
            model.load_weights(weights)
        except Exception as exc:
            raise WeightsError(
                f"base_model.weights: {weights} does not hold weights of this small_cnn "
                f"({exc}); save them with model.save_weights() from a model with the same "
                "filters and image size"
            ) from None
    return model


def reinitialised(model: keras.Model, seed: int) -> keras.Model:
    """A copy of `model` with freshly drawn weights (seeded), for another ensemble member.

    A nested "backbone" keeps the weights of `model`: pretrained weights are the point of it,
    and they are what every member starts from.
    """
    set_seed(seed)
    copy = keras.models.clone_model(model)
    for source, target in zip(all_layers(model), all_layers(copy), strict=True):
        target.trainable = source.trainable
    if any(layer.name == "backbone" for layer in model.layers):
        copy.get_layer("backbone").set_weights(model.get_layer("backbone").get_weights())
    return copy


def merge_members(members: Sequence[keras.Model]) -> keras.Model:
    """One model whose logits are the mean of the members' logits (an ensemble).

    Each member's layers up to its "features" map become a nested model "member<k>"; their
    maps are concatenated along channels as the merged "features", followed by the same
    head as every model ("gap", "dropout", "logits", "probabilities"). The merged dense
    kernel is the members' kernels stacked and divided by their number, its bias their mean:
    the global average of concatenated maps is the concatenation of their averages, so the
    merged logits equal the members' mean exactly. Evaluation, Grad-CAM (the mean of the
    members' maps), the LiteRT export, MC-dropout and the OOD features then work unchanged.
    """
    if len(members) == 1:
        return members[0]
    first = members[0]
    inputs = keras.Input(tuple(first.input_shape[1:]), name="image")
    maps = []
    for k, member in enumerate(members):
        trunk = keras.Model(member.inputs, member.get_layer("features").output, name=f"member{k}")
        maps.append(trunk(inputs))
    x = keras.layers.Concatenate(axis=-1, name="features")(maps)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dropout(first.get_layer("dropout").rate, name="dropout")(x)
    dense = keras.layers.Dense(len(CLASSES), name="logits")
    logits = dense(x)
    outputs = keras.layers.Activation("softmax", name="probabilities", dtype="float32")(logits)
    merged = keras.Model(inputs, outputs, name=first.name)
    heads = [member.get_layer("logits").get_weights() for member in members]
    kernel = np.concatenate([w for w, _ in heads], axis=0) / len(members)
    dense.set_weights([kernel, np.mean([b for _, b in heads], axis=0)])
    return merged


def with_dtype_policy(model: keras.Model, policy: str) -> keras.Model:
    """A copy of `model` whose layers compute in `policy` (e.g. "mixed_float16"); the
    "probabilities" layer stays float32. Weights are copied (variables stay float32)."""

    def clone(layer: keras.layers.Layer) -> keras.layers.Layer:
        config = layer.get_config()
        # Plain operations inside applications (e.g. ops.add) take no dtype.
        is_layer = isinstance(layer, keras.layers.Layer) and "dtype" in config
        if (
            is_layer
            and layer.name != "probabilities"
            and not isinstance(layer, keras.layers.InputLayer)
        ):
            config["dtype"] = policy
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(model, clone_function=clone, recursive=True)
    copy.set_weights(model.get_weights())
    for source, target in zip(all_layers(model), all_layers(copy), strict=True):
        target.trainable = source.trainable
    return copy


def all_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """Every layer, nested models' layers included, in a stable order."""
    found: list[keras.layers.Layer] = []
    for layer in model.layers:
        found.append(layer)
        if isinstance(layer, keras.Model):
            found.extend(all_layers(layer))
    return found


def label_indices(labels: Sequence[str]) -> np.ndarray:
    """Class names -> indices into CLASSES."""
    lookup = {c: i for i, c in enumerate(CLASSES)}
    return np.array([lookup[label] for label in labels], dtype=np.int32)


def load_model(path: Path) -> keras.Model:
    """A saved model, uncompiled."""
    return keras.models.load_model(path, compile=False)


# A .keras file is a zip: Keras stamps the weights entry with the time of saving, writes the
# date into metadata.json, and names objects shared between layers in config.json by their
# memory address (`shared_object_id`), which differs in every process. The dates are replaced
# by a fixed one and the addresses by their order of appearance, so that the same weights give
# the same bytes (DVC hashes the file; the model card carries its sha256).
_FIXED_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
_FIXED_DATE_SAVED = "1980-01-01@00:00:00"


def save_model(model: keras.Model, target: Path) -> Path:
    """Save `model` as a .keras file atomically, byte-identical for identical weights."""
    with staged_file(target) as stable:
        raw = stable.with_name(f"{stable.stem}.raw.keras")
        try:
            model.save(raw)
            _restamp_keras_zip(raw, stable)
        finally:
            raw.unlink(missing_ok=True)
    return target


def _restamp_keras_zip(source: Path, target: Path) -> None:
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename == "metadata.json":
                meta = json.loads(data)
                meta["date_saved"] = _FIXED_DATE_SAVED
                data = json.dumps(meta).encode("utf-8")
            elif info.filename == "config.json":
                data = json.dumps(_renumber_shared_objects(json.loads(data))).encode("utf-8")
            fixed = zipfile.ZipInfo(info.filename, date_time=_FIXED_ZIP_TIME)
            fixed.compress_type = info.compress_type
            fixed.external_attr = info.external_attr
            zout.writestr(fixed, data)


def _renumber_shared_objects(config: Any, ids: dict[int, int] | None = None) -> Any:
    """`config` with every shared_object_id replaced by 1, 2, ... in order of appearance.

    Keras only matches these ids with each other when loading, so any consistent renaming
    keeps the model; the order of appearance makes the renaming the same in every process.
    """
    ids = {} if ids is None else ids
    if isinstance(config, dict):
        out = {}
        for key, value in config.items():
            if key == "shared_object_id" and isinstance(value, int):
                out[key] = ids.setdefault(value, len(ids) + 1)
            else:
                out[key] = _renumber_shared_objects(value, ids)
        return out
    if isinstance(config, list):
        return [_renumber_shared_objects(item, ids) for item in config]
    return config
