"""Error answers of the predictor: RFC 9457 problem details (application/problem+json)."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from chestct.serving.inputs import InputError, NotCTSlice

log = logging.getLogger(__name__)

PROBLEM = "application/problem+json"
MB = 1024 * 1024
# How deep a JSON body may nest: the bodies the API takes are flat objects (depth 1), and a
# deep one costs the parser a stack frame per level.
MAX_JSON_DEPTH = 32


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


def json_depth(value: Any) -> int:
    """How deep a parsed JSON value nests (a scalar: 0), walked without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            depth += 1
            deepest = max(deepest, depth)
            if depth <= MAX_JSON_DEPTH:  # deeper than the limit: no need to look further
                stack.extend((child, depth) for child in (
                    item.values() if isinstance(item, dict) else item
                ))  # fmt: skip
    return deepest


def json_body() -> Any:
    """The request's JSON body, or None when it is not JSON or does not parse.

    Raises:
        Problem: 400 when the body nests deeper than MAX_JSON_DEPTH (or than the parser's
            stack: Python's parser raises RecursionError, which `silent` does not cover).
    """
    try:
        body = request.get_json(silent=True)
    except RecursionError:
        body, depth = None, None
    else:
        depth = json_depth(body)
        if depth <= MAX_JSON_DEPTH:
            return body
    log.warning(
        "refused a JSON body nested %s levels deep on %s",
        "past the parser's stack" if depth is None else depth,
        request.path,
    )
    raise Problem(
        400,
        "JSON too deeply nested",
        f"the JSON body nests more than {MAX_JSON_DEPTH} levels; the API takes a flat object",
    )


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
