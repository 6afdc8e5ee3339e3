"""An exported model run as the service runs it: the LiteRT CNN, the skops texture model or
the ensemble of both (`open_artefact`), without a card; what evaluate scores.
"""

from __future__ import annotations

import json
import logging
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from chestct.inference.analysis import served_logits
from chestct.inference.loaded import MAX_KERAS_CONFIG, ModelRefused, Outputs
from chestct.model.calibration import softmax
from chestct.model.families import average
from chestct.model.gradcam import CamHead
from chestct.model.texture import (
    TextureError,
    TextureModel,
    log_probabilities,
)
from chestct.model.texture import load as texture_load
from chestct.modelcard import ModelCard

log = logging.getLogger(__name__)


@dataclass
class Artefact:
    """An exported model run as the service runs it, without a card: what evaluate scores.

    It answers the model contract chestct.evaluation.scoring reads (`family_outputs`: logits,
    probabilities, gap, features), its logits and pooled features made by `served_logits`, the
    very formula of `analyse`, so that evaluate's metrics are those of the served artefact.
    """

    family: str
    image_size: int
    runner: Callable[[np.ndarray], Outputs]
    head: CamHead | None  # the CNN's (the ensemble's CNN member's) dense head; None: texture
    texture: TextureModel | None  # texture and ensemble: their texture model

    @property
    def input_shape(self) -> tuple[None, int, int, int]:
        return (None, self.image_size, self.image_size, 1)

    def family_outputs(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """The contract's outputs for prepared images (n, s, s[, 1]) in [0, 255]."""
        batch = np.asarray(images, np.float32)
        batch = batch if batch.ndim == 4 else batch[..., None]
        out = self.runner(batch)
        logits, gap = served_logits(out, self.head, self.family)
        return {
            "logits": logits,
            "probabilities": softmax(logits),
            "gap": gap,
            "features": out.features,
        }


def open_artefact(
    inference: Mapping[str, Any],
    files: Mapping[str, Path],
    entries: Mapping[str, Any],
    image_size: int,
    *,
    threads: int = 1,
    reference: bool = False,
) -> Artefact:
    """The served files of a model (chestct.evaluation.release.Release) opened as
    `load_folder` opens a promoted folder's.

    Args:
        inference: the card's `inference` entry (file, runtime, outputs).
        files: file name -> path, for every file the entries name.
        entries: the family's card entries (family, cam, texture, ensemble).
        image_size: the model's input side.
        threads: LiteRT interpreter threads (a worker runs one).
        reference: LiteRT's reference kernels instead of XNNPACK, which the service runs.
            They compute alike on every machine but take about 30 times as long (0.5 s an
            image for the default CNN here), too slow to score a split with.
    """
    family = str(entries.get("family", "cnn"))
    path = files[inference["file"]]
    if family == "texture":
        tex = open_texture(path)
        return Artefact(family, image_size, texture_runner(tex), None, tex)
    runner = litert_runner(path, inference, threads, reference)
    cam = entries.get("cam")
    head = CamHead.load(files[cam["file"]]) if isinstance(cam, Mapping) else None
    tex = None
    if family == "ensemble":
        tex = open_texture(files[entries["texture"]["file"]])
        temperature = float(entries["ensemble"]["cnn_temperature"])
        runner = ensemble_runner(runner, tex, temperature)
    return Artefact(family, image_size, runner, head, tex)


def file_identity(path: Path) -> tuple[int, ...]:
    st = path.stat()
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def dropout_rate_of(keras_file: Path) -> float:
    """The rate of the layer named "dropout", read from the .keras zip's config (no TF; the
    file was checked by ModelFiles, and only its config is read, not its weights)."""
    try:
        with zipfile.ZipFile(keras_file) as zf:
            info = zf.getinfo("config.json")
            if info.file_size > MAX_KERAS_CONFIG:
                return 0.0
            config = json.loads(zf.read(info))
    except (OSError, KeyError, zipfile.BadZipFile, json.JSONDecodeError, RecursionError):
        return 0.0
    stack: list[Any] = [config]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("class_name") == "Dropout" and node.get("config", {}).get("name") == (
                "dropout"
            ):
                return float(node["config"].get("rate", 0.0))
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return 0.0


def litert_runner(
    path: Path, spec: Mapping[str, Any], threads: int, reference: bool = False
) -> Callable:
    from chestct.model.export import ExportError, LightModel

    try:
        light = LightModel.load(path, threads=threads, reference=reference)
    except (ExportError, ValueError, RuntimeError) as exc:
        raise ModelRefused(f"{path.name} is not a loadable LiteRT model ({exc})") from None
    names = spec.get("outputs") or {}
    feat, prob = names.get("features"), names.get("probabilities")
    logit = names.get("logits")
    if not feat or not prob:
        raise ModelRefused("card inference.outputs must name `features` and `probabilities`")

    def run(batch: np.ndarray) -> Outputs:
        out = light.run(batch)
        return Outputs(out[feat], out.get(logit) if logit else None, out[prob])

    return run


def open_texture(path: Path) -> TextureModel:
    try:
        return texture_load(path)
    except TextureError as exc:
        raise ModelRefused(str(exc)) from None


def texture_runner(model: TextureModel) -> Callable:
    """The texture family: features of the prepared slice, then the trees (chestct.model.texture);
    `features` is the standardised feature vector as a 1 x 1 map (its pooling is itself)."""

    def run(batch: np.ndarray) -> Outputs:
        out = model.outputs(batch[..., 0])
        return Outputs(out["features"], out["logits"], out["probabilities"])

    return run


def cnn_temperature_of(card: ModelCard) -> float:
    spec = card.raw.get("ensemble")
    value = spec.get("cnn_temperature") if isinstance(spec, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ModelRefused(f"card ensemble.cnn_temperature must be a number > 0, got {value!r}")
    return float(value)


def ensemble_runner(cnn: Callable, tex: TextureModel, cnn_temperature: float) -> Callable:
    """The ensemble: the CNN's and the texture model's calibrated probabilities averaged
    (chestct.model.families.average); `features` stay the CNN's, for Grad-CAM and OOD."""

    def run(batch: np.ndarray) -> Outputs:
        out = cnn(batch)
        z = out.logits if out.logits is not None else np.log(np.clip(out.probabilities, 1e-12, 1))
        texture_out = tex.outputs(batch[..., 0])
        proba = average([softmax(z, cnn_temperature), softmax(texture_out["logits"])])
        return Outputs(out.features, log_probabilities(proba), proba)

    return run


def keras_runner(path: Path) -> tuple[Callable, CamHead]:
    """Fallback when the card has no light artifact: Keras through one traced tf.function.
    Costs TensorFlow's memory (about 700 MB a worker); logged as a warning."""
    import keras
    import tensorflow as tf

    try:
        model = keras.models.load_model(path, compile=False)
        heads = keras.Model(
            model.inputs,
            [model.get_layer("features").output, model.get_layer("probabilities").output],
        )
        head = CamHead.from_model(model)
    except Exception as exc:  # Keras raises many types for a bad file
        raise ModelRefused(f"{path.name} is not a loadable Keras model ({exc})") from None
    infer = tf.function(lambda x: heads(x, training=False), reduce_retracing=True)

    def run(batch: np.ndarray) -> Outputs:
        features, probs = infer(tf.constant(batch))
        return Outputs(features.numpy(), None, probs.numpy())

    return run, head
