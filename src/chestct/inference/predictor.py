"""The predictor a gunicorn worker holds: the loaded model, hot reload when model/ changes,
and the thread-safe predict and explain calls the service makes.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from chestct.inference.folder import load_folder
from chestct.inference.loaded import DEFAULT_WINDOW, Loaded, ModelNotReady, ModelRefused
from chestct.modelcard import CARD_NAME

log = logging.getLogger(__name__)


class Predictor:
    """One per worker: holds the current model and swaps in a newly promoted one.

    Loading is explicit (`load()` in the factory, which gunicorn runs in each worker after
    fork); importing this module loads nothing.
    """

    def __init__(
        self,
        model_dir: Path,
        threads: int = 1,
        reload_check_s: float = 1.0,
        default_window: tuple[float, float] = DEFAULT_WINDOW,
    ) -> None:
        self.model_dir = model_dir
        self.default_window = default_window
        self.threads = threads
        self.reload_check_s = reload_check_s
        self._model: Loaded | None = None
        self.file_identity: tuple[int, ...] | None = None
        self._checked = -float("inf")
        self._lock = threading.Lock()
        self.last_error: str | None = None

    @property
    def model(self) -> Loaded:
        model = self._model
        if model is None:
            raise ModelNotReady(self.last_error or "no model loaded yet")
        return model

    @property
    def ready(self) -> bool:
        return self._model is not None

    def _card_identity(self) -> tuple[int, ...] | None:
        try:
            st = (self.model_dir / CARD_NAME).stat()
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)

    def load(self) -> Loaded:
        """Load model/ now (first load, or a forced reload). Raises ModelNotReady/Refused."""
        with self._lock:
            self._checked = time.monotonic()
            identity = self._card_identity()
            try:
                model = load_folder(self.model_dir, self.threads, self.default_window)
            except (ModelNotReady, ModelRefused) as exc:
                self.last_error = str(exc)
                self.file_identity = identity
                raise
            self._install(model, identity)
            return model

    def _install(self, model: Loaded, identity: tuple[int, ...] | None) -> None:
        old = self._model
        self._model, self.file_identity, self.last_error = model, identity, None
        for note in model.notes:
            log.warning("model %s v%s: %s", model.name, model.version, note)
        # One line per load and per hot swap: which model answers from now on, and from where.
        log.info(
            "serving model %s version %s (train run %s, %s) from %s%s",
            model.name,
            model.version,
            model.card.train_run_id or "unknown",
            model.backend,
            self.model_dir,
            f", replacing version {old.version}" if old else "",
        )

    def refresh(self) -> bool:
        """Switch to a newly promoted model if model.json changed; True when it switched.

        Checks at most every `reload_check_s` seconds. A folder that cannot be served is
        refused (logged once per change) and the current model keeps serving.
        """
        now = time.monotonic()
        if now - self._checked < self.reload_check_s:
            return False
        self._checked = now
        identity = self._card_identity()
        if identity is None or identity == self.file_identity:
            return False
        with self._lock:
            if identity == self.file_identity:
                return False
            try:
                model = load_folder(self.model_dir, self.threads, self.default_window)
            except (ModelNotReady, ModelRefused) as exc:
                self.file_identity = identity  # do not retry the same broken folder every second
                self.last_error = str(exc)
                if self._model is not None:
                    log.error(
                        "refused the new model in %s: %s; still serving version %s",
                        self.model_dir,
                        exc,
                        self._model.version,
                    )
                else:
                    log.error("cannot load the model in %s: %s", self.model_dir, exc)
                return False
            if self._model is not None and model.card_sha == self._model.card_sha:
                self.file_identity = identity  # same card rewritten: keep the warm model
                return False
            self._install(model, identity)
            return True


def seed_of(sha: str) -> int:
    """MC-dropout seed from the input's hash: the same image gets the same answer."""
    return int(sha[:16], 16)
