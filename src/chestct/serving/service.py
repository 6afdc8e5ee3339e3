"""What one predictor app holds: its typed settings, the model, the metrics and the audit log.

`create_app` builds one `Service` per app (per gunicorn worker, after fork) and keeps it in
`app.extensions`; the blueprints reach it through `current_service()`. Settings stay the typed
records of chestct.settings: nothing is turned into app.config keys and cast back.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flask import current_app

from chestct.imaging import formats
from chestct.inference.loaded import Loaded, ModelNotReady, ModelRefused
from chestct.inference.predictor import Predictor
from chestct.monitoring.audit import AuditLog
from chestct.serving import inputs
from chestct.serving.metrics import ServiceMetrics
from chestct.serving.problems import MB, Problem
from chestct.serving.tokens import FEEDBACK_TOKEN_ENV, HISTORY_TOKEN_ENV, RateLimiter
from chestct.settings import MonitorConfig, ServingConfig, load_settings

log = logging.getLogger(__name__)

EXTENSION = "chestct"


@dataclass(frozen=True)
class ServiceSettings:
    """Everything the app is configured with, typed."""

    model_dir: Path
    serving: ServingConfig
    monitor: MonitorConfig
    dicom_window: tuple[float, float]  # params ingest.window: (level, width) for DICOM uploads
    audit_db: Path | None
    load_model: bool = True

    @property
    def max_upload_bytes(self) -> int:
        return int(self.serving.max_upload_mb * MB)


# The keys a test config may set, each onto its typed field (MAX_CONTENT_LENGTH in bytes).
_SERVING_KEYS = {
    "MAX_BATCH_FILES": "max_batch_files",
    "MAX_IMAGE_PIXELS": "max_image_pixels",
    "MAX_DECODED_MB": "max_decoded_mb",
    "MC_DROPOUT_SAMPLES": "mc_dropout_samples",
    "RELOAD_CHECK_S": "reload_check_s",
    "INFERENCE_THREADS": "inference_threads",
    "AUDIT_LOG": "audit_log",
    "HISTORY_TOKEN": "history_token",
    "FEEDBACK_TOKEN": "feedback_token",
    "FEEDBACK_PER_MINUTE": "feedback_per_minute",
    "AUDIT_MAX_ROWS": "audit_max_rows",
    "AUDIT_RETENTION_DAYS": "audit_retention_days",
}
_MONITOR_KEYS = {"LIVE_WINDOW": "live_window", "DRIFT_MIN_REQUESTS": "min_requests"}
TEST_KEYS = frozenset(
    {*_SERVING_KEYS, *_MONITOR_KEYS, "MODEL_DIR", "MAX_CONTENT_LENGTH", "AUDIT_DB"}
    | {"DICOM_WINDOW", "LOAD_MODEL"}
)


def service_settings(test_config: Mapping[str, Any] | None = None) -> ServiceSettings:
    """The app's settings: config/config.yaml (serving.*, monitor.*) and params ingest.window of
    the project (with the model folder a `test_config` MODEL_DIR names); then `test_config`'s keys
    (TEST_KEYS) on top. CHESTCT_HISTORY_TOKEN and CHESTCT_FEEDBACK_TOKEN win over the file's
    tokens.

    Raises:
        ValueError: a test config key that is not one of TEST_KEYS.
    """
    test_config = dict(test_config or {})
    unknown = sorted(set(test_config) - TEST_KEYS)
    if unknown:
        raise ValueError(f"unknown test config key(s) {unknown}; known: {sorted(TEST_KEYS)}")
    s = load_settings()
    window = s.params.ingest.window
    settings = ServiceSettings(
        s.paths.model,
        s.config.serving,
        s.config.monitor,
        (window.level, window.width),
        s.paths.audit_db,
    )
    if "MODEL_DIR" in test_config:  # a test names the model folder; no audit log unless asked
        settings = dataclasses.replace(
            settings, model_dir=Path(test_config["MODEL_DIR"]), audit_db=None
        )
    serving = settings.serving
    tokens = ((HISTORY_TOKEN_ENV, "history_token"), (FEEDBACK_TOKEN_ENV, "feedback_token"))
    for env, name in tokens:
        if os.environ.get(env):
            serving = dataclasses.replace(serving, **{name: os.environ[env]})
    overrides = {field: test_config[k] for k, field in _SERVING_KEYS.items() if k in test_config}
    if "MAX_CONTENT_LENGTH" in test_config:
        overrides["max_upload_mb"] = test_config["MAX_CONTENT_LENGTH"] / MB
    serving = dataclasses.replace(serving, **overrides)
    monitor = dataclasses.replace(
        settings.monitor,
        **{field: test_config[k] for k, field in _MONITOR_KEYS.items() if k in test_config},
    )
    audit_db = settings.audit_db
    if "AUDIT_DB" in test_config:
        audit_db = Path(test_config["AUDIT_DB"]) if test_config["AUDIT_DB"] else None
    window = tuple(test_config.get("DICOM_WINDOW", settings.dicom_window))
    return dataclasses.replace(
        settings,
        serving=serving,
        monitor=monitor,
        audit_db=audit_db,
        dicom_window=(float(window[0]), float(window[1])),
        load_model=bool(test_config.get("LOAD_MODEL", True)),
    )


class Stopwatch:
    """Milliseconds per named step of one request, for its Server-Timing header (browsers show
    it beside the request; bench/serve.py reads it for its breakdown)."""

    def __init__(self) -> None:
        self.steps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        """Charge the time since the previous lap (or the start) to `name`."""
        now = time.perf_counter()
        self.steps[name] = self.steps.get(name, 0.0) + (now - self._last) * 1000
        self._last = now

    def header(self) -> str:
        return ", ".join(f"{name};dur={ms:.3f}" for name, ms in self.steps.items())


@dataclass
class Service:
    """One app's model, metrics, audit log and decode limits."""

    settings: ServiceSettings
    predictor: Predictor
    metrics: ServiceMetrics
    audit: AuditLog | None
    budget: formats.DecodeLimits
    feedback_limiter: RateLimiter
    # One large image decoded at a time per worker (chestct.serving.prediction.hold_large_slot).
    large_slot: threading.BoundedSemaphore = dataclasses.field(
        default_factory=lambda: threading.BoundedSemaphore(1)
    )

    @classmethod
    def start(cls, settings: ServiceSettings) -> Service:
        """Open the audit log and load the model (under gunicorn: in each worker)."""
        serving = settings.serving
        predictor = Predictor(
            settings.model_dir,
            threads=serving.inference_threads,
            reload_check_s=serving.reload_check_s,
            default_window=settings.dicom_window,
        )
        audit = None
        if serving.audit_log:
            if settings.audit_db is None:
                raise ValueError("serving.audit_log is on but no audit_db file is set")
            audit = AuditLog(
                settings.audit_db,
                max_rows=serving.audit_max_rows,
                retention_days=serving.audit_retention_days,
            )
            audit.open()
        budget = inputs.limits(serving.max_image_pixels, int(serving.max_decoded_mb * MB))
        opencv_limit = formats.opencv_pixel_limit()
        if opencv_limit is None or opencv_limit > budget.max_pixels:
            # Only the environment before `import cv2` sets OpenCV's own limit (gunicorn.conf.py
            # does); the header checks still hold without it.
            log.warning(
                "%s is %s: OpenCV's own pixel limit is not the serving limit (%d); start the "
                "service with `make serve` or set it in the environment",
                formats.OPENCV_PIXELS_ENV,
                opencv_limit or "unset",
                budget.max_pixels,
            )
        metrics = ServiceMetrics(settings.monitor.live_window)
        limiter = RateLimiter(serving.feedback_per_minute)
        service = cls(settings, predictor, metrics, audit, budget, limiter)
        if settings.load_model:
            try:
                model = predictor.load()
                service.metrics.set_model(model.name, model.version, model.backend)
            except (ModelNotReady, ModelRefused) as exc:
                log.error("no model to serve yet: %s", exc)
        return service

    def current_model(self) -> Loaded:
        """The model to answer with, after a (rate-limited) look for a new one."""
        if self.predictor.refresh():
            model = self.predictor.model
            self.metrics.set_model(model.name, model.version, model.backend)
        try:
            return self.predictor.model
        except ModelNotReady as exc:
            raise Problem(
                503,
                "Model not ready",
                f"{exc}. The service answers once a model is promoted into "
                f"{self.predictor.model_dir} (`make run`)",
            ) from None


def current_service() -> Service:
    """The Service of the app handling the current request."""
    return current_app.extensions[EXTENSION]
