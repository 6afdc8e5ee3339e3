"""POST /feedback: the true label of a served prediction, for the monitor's live metrics.

Protected by the same bearer token as GET /history, and only with the audit log on (the
labels are stored beside the predictions there). `python -m chestct.monitor` scores the
labelled predictions of its window against the test figures in the model card.
"""

from __future__ import annotations

import hmac
import re

from flask import Blueprint, Response, jsonify, request

from chestct.serving.problems import problem_response as _problem
from chestct.serving.service import TOKEN_ENV, current_service

bp = Blueprint("feedback", __name__)

PREDICTION_ID = re.compile(r"^[0-9a-f]{32}$")


def _token_refusal() -> Response | None:
    """None when the request carries the configured bearer token, else the error answer."""
    token = current_service().settings.serving.history_token
    if not token:
        return _problem(
            403,
            "Feedback disabled",
            f"no token is configured; set serving.history_token or {TOKEN_ENV}",
        )
    given = request.headers.get("Authorization", "")
    if given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), token.encode()):
        return None
    resp = _problem(
        401, "Unauthorized", "send the configured token as 'Authorization: Bearer <token>'"
    )
    resp.headers["WWW-Authenticate"] = 'Bearer realm="chestct"'
    return resp


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
    refusal = _token_refusal()
    if refusal is not None:
        return refusal
    body = request.get_json(silent=True) if request.mimetype == "application/json" else None
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
