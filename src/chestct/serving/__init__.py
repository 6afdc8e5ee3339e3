"""Flask app factory for the predictor service."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from chestct.imaging import ImageError
from chestct.serving.predictor import ModelNotReady, Predictor

log = logging.getLogger(__name__)


def create_app(test_config: dict[str, Any] | None = None) -> Flask:
    """Build the app. Config keys: MODEL_DIR, MAX_CONTENT_LENGTH, LOAD_MODEL (default True).

    Settings come from config/config.yaml unless `test_config` overrides them. The model loads
    here, which under gunicorn (preload_app off) happens in each worker after fork.
    """
    app = Flask(__name__)
    if test_config is None or "MODEL_DIR" not in test_config:
        from chestct.settings import load_settings

        settings = load_settings()
        app.config.update(
            MODEL_DIR=str(settings.paths.model),
            MAX_CONTENT_LENGTH=int(settings.config.serving.max_upload_mb * 1024 * 1024),
        )
    app.config.setdefault("MAX_CONTENT_LENGTH", 10 * 1024 * 1024)
    app.config.setdefault("LOAD_MODEL", True)
    if test_config:
        app.config.update(test_config)

    predictor = Predictor(Path(app.config["MODEL_DIR"]))
    app.extensions["chestct.predictor"] = predictor
    if app.config["LOAD_MODEL"]:
        try:
            predictor.load()
        except ModelNotReady as exc:
            log.error("%s", exc)

    def error(status: int, title: str, detail: str):
        body = {"type": "about:blank", "title": title, "status": status, "detail": detail}
        resp = jsonify(body)
        resp.status_code = status
        resp.mimetype = "application/problem+json"
        return resp

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        if isinstance(exc, RequestEntityTooLarge):
            limit = app.config["MAX_CONTENT_LENGTH"] / (1024 * 1024)
            return error(413, "Payload too large", f"the upload limit is {limit:g} MB")
        return error(exc.code or 500, exc.name, exc.description or "")

    @app.get("/health")
    def health():
        return jsonify(status="ok", model_loaded=predictor.ready)

    @app.post("/predict")
    def predict():
        started = time.perf_counter()
        upload = request.files.get("file")
        if upload is None:
            return error(
                400,
                "Missing file",
                "send the image as multipart form field 'file' "
                "(curl -F file=@slice.png …/predict)",
            )
        data = upload.read()
        if not predictor.ready:
            try:
                predictor.load()
            except ModelNotReady as exc:
                return error(503, "Model not ready", str(exc))
        try:
            result = predictor.predict(data)
        except ImageError as exc:
            return error(400, "Undecodable image", str(exc))
        result["time_ms"] = round((time.perf_counter() - started) * 1000, 2)
        return jsonify(result)

    return app
