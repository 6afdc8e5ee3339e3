"""The operations routes (GET /, /health, /ready, /metadata, /metrics, /history) and what
every request goes through: timing, counting, headers, and memory handed back after large
uploads."""

from __future__ import annotations

import base64
import hashlib
import re
import time

from flask import Blueprint, Response, g, jsonify, request

from chestct.imaging import workers
from chestct.serving.page import FAVICON_SVG, INDEX_HTML
from chestct.serving.prediction import RELEASE_BYTES, release_large_slot
from chestct.serving.problems import MB, Problem
from chestct.serving.service import Stopwatch, current_service
from chestct.serving.tokens import HISTORY_TOKEN_ENV, token_refusal

bp = Blueprint("operations", __name__)

HISTORY_MAX = 1000


def content_security_policy(html: str) -> str:
    """A policy for a self-contained page: nothing from elsewhere, its own inline script and
    style by their sha256 (no 'unsafe-inline'), data: images for the heatmap, fetches to this
    origin only, and no framing (clickjacking)."""

    def hashes(tag: str) -> str:
        bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
        return " ".join(
            "'sha256-" + base64.b64encode(hashlib.sha256(b.encode()).digest()).decode() + "'"
            for b in bodies
        )

    return (
        f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
        "img-src 'self' data:; connect-src 'self'; form-action 'self'; base-uri 'none'; "
        "frame-ancestors 'none'"
    )


PAGE_POLICY = content_security_policy(INDEX_HTML)


# ---------------------------------------------------------------- every request


@bp.before_app_request
def start_timer() -> None:
    g.started = time.perf_counter()
    g.watch = Stopwatch()


@bp.after_app_request
def count(resp: Response) -> Response:
    metrics = current_service().metrics
    endpoint = request.url_rule.rule if request.url_rule is not None else "unmatched"
    elapsed = time.perf_counter() - g.get("started", time.perf_counter())
    metrics.answered(endpoint, resp.status_code, elapsed)
    watch = g.get("watch")
    if watch is not None and watch.steps:
        resp.headers["Server-Timing"] = watch.header()
    resp.headers.setdefault("Cache-Control", "no-store")
    resp.headers.setdefault("X-Content-Type-Options", "nosniff")
    return resp


@bp.teardown_app_request
def release(exc: BaseException | None) -> None:
    if g.get("large_upload") or (request.content_length or 0) >= RELEASE_BYTES:
        workers.release_memory()  # a large upload's freed pages go back to the kernel
    release_large_slot()  # after the trim: the next large image starts from a lean heap


# ---------------------------------------------------------------- routes


@bp.get("/")
def index() -> Response:
    resp = Response(INDEX_HTML, mimetype="text/html")
    resp.headers["Content-Security-Policy"] = PAGE_POLICY
    resp.headers["X-Frame-Options"] = "DENY"  # for browsers without frame-ancestors
    resp.headers["Referrer-Policy"] = "no-referrer"
    return resp


@bp.get("/favicon.svg")
@bp.get("/favicon.ico")  # asked for by browsers on every page, the JSON ones too
def favicon() -> Response:
    resp = Response(FAVICON_SVG, mimetype="image/svg+xml")
    resp.headers["Cache-Control"] = "public, max-age=86400"
    return resp


@bp.get("/health")
def health() -> Response:
    return jsonify(status="ok", model_loaded=current_service().predictor.ready)


@bp.get("/ready")
def ready() -> Response:
    model = current_service().current_model()
    return jsonify(ready=True, model={"name": model.name, "version": model.version})


@bp.get("/metadata")
def metadata() -> Response:
    service = current_service()
    model = service.current_model()
    card, serving = model.card, service.settings.serving
    return jsonify(
        name=model.name,
        version=model.version,
        classes=model.classes,
        display_names={c: model.display_name(c) for c in model.classes},
        image_size=model.image_size,
        preprocessing=model.preprocessing.to_card()["preprocessing"],
        backend=model.backend,
        inference={
            "runtime": model.backend,
            "parity_max_abs_diff": None
            if card.inference is None
            else card.inference.info.get("parity_max_abs_diff"),
        },
        temperature=model.temperature,
        thresholds={"abstain_entropy": model.abstain_threshold},
        ood=None
        if model.ood is None
        else {"method": "mahalanobis_gap", "threshold": model.ood.threshold},
        explain=model.head is not None,
        monitoring=None
        if model.reference is None
        else {
            "reference_images": model.reference.get("n"),
            "expected_rates": model.reference.get("rates"),
            "live_window": service.settings.monitor.live_window,
        },
        metrics=card.metrics,
        mlflow_run_ids=card.raw.get("mlflow_run_ids"),
        promoted_at=card.promoted_at,
        intended_use=card.intended_use,
        limits={
            "max_upload_mb": service.settings.max_upload_bytes / MB,
            "max_batch_files": serving.max_batch_files,
            "max_image_pixels": serving.max_image_pixels,
            "max_decoded_mb": serving.max_decoded_mb,
        },
        notes=model.notes,
    )


@bp.get("/metrics")
def prometheus() -> Response:
    service = current_service()
    predictor = service.predictor
    reference = predictor.model.reference if predictor.ready else None
    payload, content_type = service.metrics.exposition(
        reference, service.settings.monitor.min_requests
    )
    return Response(payload, content_type=content_type)


@bp.get("/history")
def history() -> Response:
    service = current_service()
    if service.audit is None:
        raise Problem(
            404,
            "Audit log off",
            "the audit log is off; set serving.audit_log: true in config/config.yaml",
        )
    token = service.settings.serving.history_token
    refusal = token_refusal(token, "serving.history_token", HISTORY_TOKEN_ENV, "History")
    if refusal is not None:
        return refusal
    raw = request.args.get("limit", "20")
    # isascii: "²" and other Unicode digits pass isdigit() but not int().
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 6 and 1 <= int(raw) <= HISTORY_MAX):
        raise Problem(
            400,
            "Bad limit",
            f"limit must be an integer from 1 to {HISTORY_MAX}, got {raw[:40]!r}",
        )
    entries = service.audit.latest(int(raw))
    return jsonify(entries=entries, count=len(entries))
