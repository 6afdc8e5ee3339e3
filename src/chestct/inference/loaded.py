"""A loaded model as the inference core holds it, and the errors of loading one."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from chestct.imaging import formats, preparation
from chestct.model.calibration import Mahalanobis
from chestct.model.gradcam import CamHead
from chestct.model.texture import (
    TextureModel,
)
from chestct.modelcard import ModelCard

log = logging.getLogger(__name__)


# The lung window (level, width) for a card that names none, when the caller (research code,
# tests) passes no params ingest.window; promote writes the window into every card, and the
# service passes the project's.
DEFAULT_WINDOW: tuple[float, float] = (-600.0, 1500.0)

MAX_KERAS_CONFIG = 64 * 1024 * 1024  # a .keras config.json larger than this is not read

HEAD_TOLERANCE = 1e-3  # |softmax(head(gap)) - model probabilities| above this: wrong head file


class ModelNotReady(RuntimeError):
    """No model has been loaded (yet)."""


class ModelRefused(RuntimeError):
    """A model folder that cannot be served (missing, truncated or inconsistent files)."""


@dataclass(frozen=True)
class OodModel:
    """Gaussian of the training set's pooled features (evaluate's ood.npz, the statistics
    evaluate fitted): a Mahalanobis distance above `threshold` is out of distribution."""

    stats: Mahalanobis
    threshold: float


@dataclass(frozen=True)
class Outputs:
    features: np.ndarray  # (n, h, w, f)
    logits: np.ndarray | None  # (n, c) when the artifact gives them
    probabilities: np.ndarray  # (n, c)


@dataclass
class Loaded:
    """One model version, ready to run."""

    card: ModelCard
    card_sha: str
    classes: list[str]
    # The card's preprocessing, with params ingest.window when the card names no DICOM window.
    preprocessing: preparation.Preprocessing
    backend: str
    temperature: float
    abstain_threshold: float | None
    head: CamHead | None
    dropout_rate: float
    ood: OodModel | None
    notes: list[str]
    runner: Callable[[np.ndarray], Outputs]
    reference: dict[str, Any] | None = None  # the monitoring profile (chestct.monitoring.signals)
    family: str = "cnn"  # cnn | texture | ensemble (chestct.model.families)
    texture: TextureModel | None = None  # texture and ensemble: explains by occlusion
    loaded_at: float = field(default_factory=time.time)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def name(self) -> str:
        return self.card.name

    @property
    def version(self) -> str:
        """The registry version from promotion.json; without one (a folder pulled from a DVC
        remote), the model's content digest, so that replicas of one model agree."""
        return self.card.version

    def display_name(self, cls: str) -> str:
        return self.card.display_name(cls)

    @property
    def image_size(self) -> int:
        return self.preprocessing.size

    @property
    def window(self) -> tuple[float, float] | None:
        """The DICOM window uploads are decoded with."""
        return self.preprocessing.window

    def prepare(self, decoded: formats.Decoded) -> np.ndarray:
        """The model input (uint8 size x size), exactly as imaging.prepare makes it."""
        return self.prepare_with_box(decoded).image

    def prepare_with_box(self, decoded: formats.Decoded) -> preparation.Prepared:
        """The model input and the region of the upload it was made from."""
        return preparation.prepare_slice(decoded.grey, self.preprocessing)

    def run(self, images: np.ndarray) -> Outputs:
        """Run the model on uint8 or float images shaped (n, s, s); interpreters are not
        thread-safe, hence the lock."""
        batch = np.asarray(images, dtype=np.float32)[..., None]
        with self._lock:
            return self.runner(batch)
