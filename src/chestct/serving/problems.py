"""Error answers of the predictor: RFC 9457 problem details (application/problem+json)."""

from __future__ import annotations

from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from chestct.serving.inputs import InputError, NotCTSlice

PROBLEM = "application/problem+json"
MB = 1024 * 1024


class Problem(Exception):
    """An error answer: RFC 9457 fields plus optional extension members."""

    def __init__(self, status: int, title: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail, self.extra = status, title, detail, extra


def problem_response(status: int, title: str, detail: str, **extra: Any) -> Response:
    slug = title.lower().replace(" ", "-")
    body = {"type": f"urn:chestct:problem:{slug}", "title": title, "status": status}
    body.update(detail=detail, instance=request.path, **extra)
    resp = jsonify(body)
    resp.status_code = status
    resp.mimetype = PROBLEM
    return resp


def on_problem(exc: Problem) -> Response:
    return problem_response(exc.status, exc.title, exc.detail, **exc.extra)


def on_input_error(exc: InputError) -> Response:
    # A refused slice was counted and logged where it was refused (prediction.checked_input).
    extra = {"reason": exc.reason} if isinstance(exc, NotCTSlice) else {}
    return problem_response(exc.status, exc.title, exc.detail, **extra)


def on_http_error(exc: HTTPException) -> Response:
    """Werkzeug's errors as problem details, with the fix in the detail."""
    if isinstance(exc, RequestEntityTooLarge):
        from flask import current_app

        limit = (current_app.config["MAX_CONTENT_LENGTH"] or 0) / MB
        return problem_response(
            413,
            "Payload too large",
            f"the request body is over the {limit:g} MB limit (serving.max_upload_mb); "
            "send one slice at its native size",
        )
    detail = exc.description or ""
    if exc.code == 404:
        detail = (
            f"no endpoint {request.path}; see GET / for the upload page and README "
            "'Serving' for the API"
        )
    elif exc.code == 405:
        allowed = exc.get_response().headers.get("Allow", "")
        detail = f"{request.method} is not allowed on {request.path}; use {allowed}"
    resp = problem_response(exc.code or 500, exc.name, detail)
    if exc.code == 405:
        resp.headers["Allow"] = exc.get_response().headers.get("Allow", "")
    return resp


def register(app: Flask) -> None:
    """Answer every error of `app` as problem details."""
    app.register_error_handler(Problem, on_problem)
    app.register_error_handler(InputError, on_input_error)
    app.register_error_handler(HTTPException, on_http_error)
