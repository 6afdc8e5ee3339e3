"""Flask app factory for the predictor service (see README "Serving").

Routes live in blueprints: chestct.serving.prediction (POST /predict, /predict/batch,
/explain), chestct.serving.operations (GET /, /health, /ready, /metadata, /metrics, /history)
and chestct.serving.feedback (POST /feedback). The model runs in the inference core
(chestct.inference); errors are RFC 9457 problem details (chestct.serving.problems).
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

from flask import Flask, Request

from chestct.serving import feedback, operations, prediction, problems
from chestct.serving.service import EXTENSION, Service, service_settings


class InMemoryRequest(Request):
    """Uploaded files stay in memory (bounded by MAX_CONTENT_LENGTH): Werkzeug would spool
    parts over 500 kB to a temporary file, and uploads must never touch the disk."""

    def _get_file_stream(  # type: ignore[override]
        self,
        total_content_length: int | None,
        content_type: str | None,
        filename: str | None = None,
        content_length: int | None = None,
    ) -> io.BytesIO:
        return io.BytesIO()


def create_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    """Build the predictor app.

    Settings come from config/config.yaml (serving.*, monitor.*) unless `test_config` names
    MODEL_DIR; `test_config` overrides any of chestct.serving.service.TEST_KEYS. The model
    loads here, which under gunicorn (preload_app off) happens in each worker after fork.
    """
    settings = service_settings(test_config)
    app = Flask(__name__)
    app.request_class = InMemoryRequest
    app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_bytes  # Flask refuses larger bodies
    app.extensions[EXTENSION] = Service.start(settings)

    problems.register(app)
    app.register_blueprint(operations.bp)
    app.register_blueprint(prediction.bp)
    app.register_blueprint(feedback.bp)
    return app
