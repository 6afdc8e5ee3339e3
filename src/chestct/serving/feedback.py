"""POST /feedback: the true label of a served prediction, for the monitor's live metrics.

Protected by its own bearer token (serving.feedback_token or CHESTCT_FEEDBACK_TOKEN; the
/history token cannot write labels), rate-limited per token (serving.feedback_per_minute), and
only with the audit log on (the labels are stored beside the predictions there).
`python -m chestct.monitoring.monitor` scores the labelled predictions of its window against the
test
figures in the model card.
"""

from __future__ import annotations

import math
import re

from flask import Blueprint, Response, jsonify, request

from chestct.serving.problems import json_body
from chestct.serving.problems import problem_response as _problem
from chestct.serving.service import current_service
from chestct.serving.tokens import FEEDBACK_TOKEN_ENV, token_refusal

bp = Blueprint("feedback", __name__)

PREDICTION_ID = re.compile(r"^[0-9a-f]{32}$")


@bp.post("/feedback")
def feedback() -> Response:
    """Record `{"id": "<prediction id>", "label": "<class>"}`; a second label replaces it."""
    service = current_service()
    audit = service.audit
    if audit is None:
        return _problem(
            404,
            "Audit log off",
            "feedback is stored in the audit log, which is off; set serving.audit_log: true "
            "in config/config.yaml",
        )
    token = service.settings.serving.feedback_token
    refusal = token_refusal(token, "serving.feedback_token", FEEDBACK_TOKEN_ENV, "Feedback")
    if refusal is not None:
        return refusal
    wait = service.feedback_limiter.wait_s(token)
    if wait > 0:
        resp = _problem(
            429,
            "Too many requests",
            f"more than {service.settings.serving.feedback_per_minute} labels a minute for "
            f"this token (serving.feedback_per_minute); retry in {math.ceil(wait)} s",
        )
        resp.headers["Retry-After"] = str(math.ceil(wait))
        return resp
    body = json_body() if request.mimetype == "application/json" else None
    if not isinstance(body, dict):
        return _problem(
            400,
            "Bad feedback",
            'send JSON {"id": "<the id /predict answered>", "label": "<true class>"} with '
            "Content-Type: application/json",
        )
    pid, label = body.get("id"), body.get("label")
    if not isinstance(pid, str) or not PREDICTION_ID.match(pid):
        return _problem(
            400, "Bad prediction id", "'id' must be the 32-hex-digit id that /predict answered"
        )
    predictor = service.predictor
    classes = predictor.model.classes if predictor.ready else None
    if not isinstance(label, str) or (classes is not None and label not in classes):
        names = ", ".join(classes) if classes else "the model's classes (GET /metadata)"
        return _problem(400, "Unknown label", f"'label' must be one of {names}, got {label!r}")
    if not audit.record_feedback(pid, label):
        return _problem(
            404,
            "Unknown prediction",
            f"no prediction with id {pid} is in the audit log; send the id a /predict "
            "answer carried while the audit log was on",
        )
    return jsonify(id=pid, label=label, recorded=True)
