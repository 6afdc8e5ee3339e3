"""The predictor: loads model/ (card + Keras model) and turns image bytes into probabilities."""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from chestct.imaging import prepare

log = logging.getLogger(__name__)


class ModelNotReady(RuntimeError):
    """No usable model in the model folder."""


@dataclass(frozen=True)
class LoadedModel:
    card: dict[str, Any]
    infer: Any  # compiled function: float32 (n, s, s, 1) -> probabilities (n, k)
    classes: list[str]
    image_size: int
    interpolation: str


class Predictor:
    """Holds one loaded model per process. Loading is explicit: call `load()` in the worker,
    after gunicorn forks, never at import (TensorFlow state does not survive a fork)."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self._model: LoadedModel | None = None
        self._lock = threading.Lock()

    @property
    def ready(self) -> bool:
        return self._model is not None

    def load(self) -> LoadedModel:
        """Read the card and the model, compile the inference function and warm it up."""
        with self._lock:
            if self._model is None:
                self._model = self._load()
            return self._model

    def _load(self) -> LoadedModel:
        card_path = self.model_dir / "model.json"
        if not card_path.is_file():
            raise ModelNotReady(f"{card_path} not found; run `make run` to promote a model")
        card = json.loads(card_path.read_text(encoding="utf-8"))
        import keras
        import tensorflow as tf

        started = time.monotonic()
        model = keras.models.load_model(self.model_dir / card["model_file"], compile=False)
        size = int(card["image_size"])
        # One traced graph per process; model.predict() costs ~70 ms of fixed overhead a call.
        infer = tf.function(
            lambda x: model(x, training=False),
            input_signature=[tf.TensorSpec((None, size, size, 1), tf.float32)],
        )
        infer(tf.zeros((1, size, size, 1), tf.float32))  # warm-up: trace before first request
        log.info(
            "loaded model %s v%s in %.1f s",
            card.get("name"),
            card.get("version"),
            time.monotonic() - started,
        )
        return LoadedModel(
            card=card,
            infer=infer,
            classes=list(card["classes"]),
            image_size=size,
            interpolation=card["preprocessing"]["interpolation"],
        )

    def predict(self, data: bytes) -> dict[str, Any]:
        """Probabilities for one image file's bytes (raises imaging.ImageError when bad)."""
        loaded = self._model
        if loaded is None:
            raise ModelNotReady("model not loaded yet")
        grey = prepare(data, loaded.image_size, loaded.interpolation)
        batch = grey.astype(np.float32)[None, :, :, None]
        proba = np.asarray(loaded.infer(batch))[0]
        best = int(proba.argmax())
        card = loaded.card
        return {
            "label": loaded.classes[best],
            "display_name": card.get("display_names", {}).get(loaded.classes[best]),
            "probabilities": {c: float(p) for c, p in zip(loaded.classes, proba, strict=True)},
            "model": {
                "name": card.get("name"),
                "version": card.get("version"),
                "run_id": card.get("mlflow_run_ids", {}).get("train"),
            },
        }
