"""Flask app factory for the predictor service (see README "Serving").

Endpoints: POST /predict, /predict/batch, /explain, /feedback; GET /, /health, /ready,
/metadata, /metrics, /history. Errors are RFC 9457 problem details (application/problem+json).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import io
import logging
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any

from flask import Flask, Request, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from chestct import imaging
from chestct.audit import AuditLog
from chestct.monitoring import request_signals
from chestct.serving import inputs
from chestct.serving.feedback import bp as feedback_bp
from chestct.serving.inputs import InputError, NotCTSlice, Upload
from chestct.serving.metrics import ServiceMetrics
from chestct.serving.page import INDEX_HTML
from chestct.serving.predictor import (
    Loaded,
    ModelNotReady,
    ModelRefused,
    Predictor,
    analyse,
    analyse_outputs,
    class_activation,
    input_sha256,
    overlay_png,
    seed_of,
)
from chestct.settings import MonitorConfig, ServingConfig, WindowParams

log = logging.getLogger(__name__)

PROBLEM = "application/problem+json"
TOKEN_ENV = "CHESTCT_HISTORY_TOKEN"
HISTORY_MAX = 1000
MB = 1024 * 1024
# A request whose body or declared decode cost reaches this hands freed memory back to the
# kernel afterwards (imaging.release_memory): below it the freed buffers are reused by the next
# request, and trimming them would cost each 512 x 512 slice about 0.5 ms of page faults.
RELEASE_BYTES = 4 * MB


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


class Problem(Exception):
    """An error answer: RFC 9457 fields plus optional extension members."""

    def __init__(self, status: int, title: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail, self.extra = status, title, detail, extra


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


def problem_response(status: int, title: str, detail: str, **extra: Any) -> Response:
    slug = title.lower().replace(" ", "-")
    body = {"type": f"urn:chestct:problem:{slug}", "title": title, "status": status}
    body.update(detail=detail, instance=request.path, **extra)
    resp = jsonify(body)
    resp.status_code = status
    resp.mimetype = PROBLEM
    return resp


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


def _serving_config(
    serving: ServingConfig, window: WindowParams, monitor: MonitorConfig
) -> dict[str, Any]:
    """App config keys from the serving and monitor settings and the DICOM window."""
    return {
        "LIVE_WINDOW": monitor.live_window,
        "DRIFT_MIN_REQUESTS": monitor.min_requests,
        "MAX_CONTENT_LENGTH": int(serving.max_upload_mb * MB),
        "MAX_BATCH_FILES": serving.max_batch_files,
        "MAX_IMAGE_PIXELS": serving.max_image_pixels,
        "MAX_DECODED_MB": serving.max_decoded_mb,
        "MC_DROPOUT_SAMPLES": serving.mc_dropout_samples,
        "RELOAD_CHECK_S": serving.reload_check_s,
        "INFERENCE_THREADS": serving.inference_threads,
        "AUDIT_LOG": serving.audit_log,
        "HISTORY_TOKEN": serving.history_token,
        "DICOM_WINDOW": (window.level, window.width),
    }


def _defaults() -> dict[str, Any]:
    """App config from config/config.yaml (serving.*) and the project's paths."""
    from chestct.settings import load_settings

    s = load_settings()
    return {
        **_serving_config(s.config.serving, s.params.ingest.window, s.config.monitor),
        "MODEL_DIR": str(s.paths.model),
        "AUDIT_DB": str(s.paths.audit_db),
    }


def _static_defaults() -> dict[str, Any]:
    """Defaults when a test config names the model folder itself (no settings files read)."""
    return {
        **_serving_config(ServingConfig(), WindowParams(), MonitorConfig()),
        "AUDIT_LOG": False,
        "AUDIT_DB": "",
        "HISTORY_TOKEN": "",
    }


def create_app(test_config: dict[str, Any] | None = None) -> Flask:
    """Build the predictor app.

    Settings come from config/config.yaml (serving.*) unless `test_config` names MODEL_DIR;
    `test_config` overrides any key (MODEL_DIR, MAX_CONTENT_LENGTH, MAX_BATCH_FILES,
    MAX_IMAGE_PIXELS, MAX_DECODED_MB, MC_DROPOUT_SAMPLES, RELOAD_CHECK_S, INFERENCE_THREADS,
    AUDIT_LOG, AUDIT_DB, HISTORY_TOKEN, DICOM_WINDOW, LOAD_MODEL, LIVE_WINDOW,
    DRIFT_MIN_REQUESTS). The model loads here, which under gunicorn (preload_app off) happens
    in each worker after fork.
    """
    app = Flask(__name__)
    app.request_class = InMemoryRequest
    config = (
        _static_defaults()
        if test_config is not None and "MODEL_DIR" in test_config
        else _defaults()
    )
    app.config.update(config)
    app.config["LOAD_MODEL"] = True
    app.config["HISTORY_TOKEN"] = os.environ.get(TOKEN_ENV) or app.config["HISTORY_TOKEN"]
    if test_config:
        app.config.update(test_config)

    predictor = Predictor(
        Path(app.config["MODEL_DIR"]),
        threads=int(app.config["INFERENCE_THREADS"]),
        reload_check_s=float(app.config["RELOAD_CHECK_S"]),
        default_window=tuple(app.config["DICOM_WINDOW"]),
    )
    metrics = ServiceMetrics(window=int(app.config["LIVE_WINDOW"]))
    audit = AuditLog(Path(app.config["AUDIT_DB"])) if app.config["AUDIT_LOG"] else None
    if audit is not None:
        audit.open()
    app.extensions["chestct.predictor"] = predictor
    budget = inputs.limits(
        int(app.config["MAX_IMAGE_PIXELS"]), int(float(app.config["MAX_DECODED_MB"]) * MB)
    )
    opencv_limit = imaging.opencv_pixel_limit()
    if opencv_limit is None or opencv_limit > budget.max_pixels:
        # Only the environment before `import cv2` sets OpenCV's own limit (gunicorn.conf.py
        # does); the header checks still hold without it.
        log.warning(
            "%s is %s: OpenCV's own pixel limit is not the serving limit (%d); start the "
            "service with `make serve` or set it in the environment",
            imaging.OPENCV_PIXELS_ENV,
            opencv_limit or "unset",
            budget.max_pixels,
        )
    app.extensions["chestct.metrics"] = metrics
    app.extensions["chestct.audit"] = audit
    app.register_blueprint(feedback_bp)
    if app.config["LOAD_MODEL"]:
        try:
            model = predictor.load()
            metrics.set_model(model.name, model.version, model.backend)
        except (ModelNotReady, ModelRefused) as exc:
            log.error("no model to serve yet: %s", exc)

    # ------------------------------------------------------------------ plumbing

    @app.before_request
    def start_timer() -> None:
        g.started = time.perf_counter()
        g.watch = Stopwatch()

    @app.teardown_request
    def release(exc: BaseException | None) -> None:
        if g.get("large_upload") or (request.content_length or 0) >= RELEASE_BYTES:
            imaging.release_memory()  # a large upload's freed pages go back to the kernel

    @app.after_request
    def count(resp: Response) -> Response:
        endpoint = request.url_rule.rule if request.url_rule is not None else "unmatched"
        metrics.requests.labels(endpoint, str(resp.status_code)).inc()
        elapsed = time.perf_counter() - g.get("started", time.perf_counter())
        metrics.latency.labels(endpoint).observe(elapsed)
        if g.watch.steps:
            resp.headers["Server-Timing"] = g.watch.header()
        resp.headers.setdefault("Cache-Control", "no-store")
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        return resp

    @app.errorhandler(Problem)
    def on_problem(exc: Problem) -> Response:
        return problem_response(exc.status, exc.title, exc.detail, **exc.extra)

    @app.errorhandler(InputError)
    def on_input_error(exc: InputError) -> Response:
        extra = {"reason": exc.reason} if isinstance(exc, NotCTSlice) else {}
        if isinstance(exc, NotCTSlice):
            metrics.ood.labels(exc.reason).inc()
        return problem_response(exc.status, exc.title, exc.detail, **extra)

    @app.errorhandler(HTTPException)
    def on_http_error(exc: HTTPException) -> Response:
        if isinstance(exc, RequestEntityTooLarge):
            limit = app.config["MAX_CONTENT_LENGTH"] / MB
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

    def current_model() -> Loaded:
        """The model to answer with, after a (rate-limited) look for a new one."""
        if predictor.refresh():
            model = predictor.model
            metrics.set_model(model.name, model.version, model.backend)
        try:
            return predictor.model
        except ModelNotReady as exc:
            raise Problem(
                503,
                "Model not ready",
                f"{exc}. The service answers once a model is promoted into "
                f"{predictor.model_dir} (`make run`)",
            ) from None

    # ------------------------------------------------------------------ inputs

    def single_upload() -> Upload:
        """The one image of a request: multipart `file`, a raw image body, or JSON base64."""
        mimetype = request.mimetype
        if mimetype == "multipart/form-data":
            part = request.files.get("file")
            if part is None:
                raise Problem(
                    400,
                    "Missing file",
                    "send the image as multipart form field 'file' "
                    "(curl -F file=@slice.png …/predict)",
                )
            return Upload(part.read(), part.filename or "file")
        if mimetype == "application/json":
            try:
                body = request.get_json(silent=True)
            except RecursionError:
                # silent=True covers malformed JSON, not nesting deeper than the parser's stack.
                body = None
            if not isinstance(body, dict) or not isinstance(body.get("image"), str):
                raise Problem(
                    400,
                    "Bad JSON",
                    'send a JSON object {"image": "<base64 of the file>"}',
                )
            text = body["image"]
            if text.startswith("data:") and "," in text:
                text = text.split(",", 1)[1]  # a data: URL from a browser
            try:
                data = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                raise Problem(
                    400,
                    "Bad base64",
                    "the 'image' field is not valid base64; encode the file's bytes "
                    "(base64 -w0 slice.png)",
                ) from None
            return Upload(data, "image")
        if mimetype in inputs.RAW_TYPES:
            return Upload(request.get_data(cache=False), "body")
        raise Problem(
            415,
            "Unsupported media type",
            f"Content-Type {mimetype or '(none)'} is not accepted; send multipart/form-data "
            "with a 'file' field, a raw body typed image/png, image/jpeg or "
            'application/dicom, or application/json {"image": "<base64>"}',
        )

    def predict_one(model: Loaded, upload: Upload, endpoint: str) -> dict[str, Any]:
        """Checks, decoding and the prediction for one image; raises InputError."""
        started = time.perf_counter()
        watch = g.watch
        watch.lap("receive")
        fmt = inputs.check_format(upload.data)
        if inputs.check_header(upload.data, fmt, budget).nbytes >= RELEASE_BYTES:
            g.large_upload = True
        watch.lap("checks")
        decoded = inputs.decode(upload.data, model.window, budget)
        watch.lap("decode")
        inputs.check_slice(decoded)
        sha = input_sha256(upload.data)
        watch.lap("checks")
        prepared = model.prepare(decoded)
        watch.lap("prepare")
        outputs = model.run(prepared[None])
        watch.lap("infer")
        samples = int(app.config["MC_DROPOUT_SAMPLES"])
        result = analyse_outputs(model, outputs, samples, seed_of(sha))
        best = int(result.probabilities.argmax())
        label = model.classes[best]
        body = {
            "id": uuid.uuid4().hex,  # for POST /feedback
            "label": label,
            "display_name": model.display_name(label),
            "display_names": {c: model.display_name(c) for c in model.classes},
            "probabilities": {
                c: round(float(p), 6)
                for c, p in zip(model.classes, result.probabilities, strict=True)
            },
            "uncertainty": {
                "entropy": round(result.entropy, 6),
                "abstain_threshold": model.abstain_threshold,
                "abstain": result.abstain,
                "method": "mc_dropout" if result.mc_mean is not None else "entropy",
                "mc_dropout": None
                if result.mc_mean is None
                else {
                    "samples": int(app.config["MC_DROPOUT_SAMPLES"]),
                    "dropout_rate": model.dropout_rate,
                    "mutual_information": round(float(result.mutual_information), 6),
                    "mean": {
                        c: round(float(p), 6)
                        for c, p in zip(model.classes, result.mc_mean, strict=True)
                    },
                    "std": {
                        c: round(float(p), 6)
                        for c, p in zip(model.classes, result.mc_std, strict=True)
                    },
                },
            },
            "ood": {
                "input_checks": "passed",
                "method": "mahalanobis_gap" if model.ood is not None else None,
                "score": None if result.ood_score is None else round(result.ood_score, 4),
                "threshold": None if model.ood is None else model.ood.threshold,
                "out_of_distribution": result.out_of_distribution,
            },
            "model": {
                "name": model.name,
                "version": model.version,
                "run_id": (model.card.get("mlflow_run_ids") or {}).get("train"),
                "backend": model.backend,
            },
            "input": {
                "sha256": sha,
                "format": fmt,
                "width": decoded.width,
                "height": decoded.height,
            },
            "time_ms": round((time.perf_counter() - started) * 1000, 2),
        }
        watch.lap("analyse")
        metrics.predictions.labels(label).inc()
        if result.abstain:
            metrics.abstentions.inc()
        if result.out_of_distribution:
            metrics.ood.labels("feature_distance").inc()
        signals = request_signals(
            result.probabilities,
            result.entropy,
            result.ood_score,
            None if model.ood is None else model.ood.threshold,
            decoded.grey,
        )
        metrics.observe(
            signals,
            label,
            {"abstain": result.abstain, "ood": result.out_of_distribution},
        )
        if audit is not None:
            try:
                audit.record(endpoint, body, signals)
            except Exception:  # a full disk must not take predictions down; it is logged
                log.exception("could not write the audit log %s", audit.path)
        watch.lap("monitor")
        return body

    # ------------------------------------------------------------------ endpoints

    page_policy = content_security_policy(INDEX_HTML)

    @app.get("/")
    def index() -> Response:
        resp = Response(INDEX_HTML, mimetype="text/html")
        resp.headers["Content-Security-Policy"] = page_policy
        resp.headers["X-Frame-Options"] = "DENY"  # for browsers without frame-ancestors
        resp.headers["Referrer-Policy"] = "no-referrer"
        return resp

    @app.get("/health")
    def health() -> Response:
        return jsonify(status="ok", model_loaded=predictor.ready)

    @app.get("/ready")
    def ready() -> Response:
        model = current_model()
        return jsonify(ready=True, model={"name": model.name, "version": model.version})

    @app.get("/metadata")
    def metadata() -> Response:
        model = current_model()
        card = model.card
        return jsonify(
            name=model.name,
            version=model.version,
            classes=model.classes,
            display_names={c: model.display_name(c) for c in model.classes},
            image_size=model.image_size,
            preprocessing=card.get("preprocessing"),
            backend=model.backend,
            inference={
                "runtime": model.backend,
                "parity_max_abs_diff": (card.get("inference") or {}).get("parity_max_abs_diff"),
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
                "live_window": app.config["LIVE_WINDOW"],
            },
            metrics=card.get("metrics"),
            mlflow_run_ids=card.get("mlflow_run_ids"),
            promoted_at=card.get("promoted_at"),
            intended_use=card.get(
                "intended_use", "research and education only; not a medical device"
            ),
            limits={
                "max_upload_mb": app.config["MAX_CONTENT_LENGTH"] / MB,
                "max_batch_files": app.config["MAX_BATCH_FILES"],
                "max_image_pixels": app.config["MAX_IMAGE_PIXELS"],
                "max_decoded_mb": app.config["MAX_DECODED_MB"],
            },
            notes=model.notes,
        )

    @app.get("/metrics")
    def prometheus() -> Response:
        reference = predictor.model.reference if predictor.ready else None
        payload, content_type = metrics.exposition(
            reference, int(app.config["DRIFT_MIN_REQUESTS"])
        )
        return Response(payload, content_type=content_type)

    @app.post("/predict")
    def predict() -> Response:
        upload = single_upload()
        model = current_model()
        return jsonify(predict_one(model, upload, "/predict"))

    @app.post("/predict/batch")
    def predict_batch() -> Response:
        if request.mimetype != "multipart/form-data":
            raise Problem(
                415,
                "Unsupported media type",
                "send the files as multipart/form-data fields named 'files' "
                "(curl -F files=@a.png -F files=@b.png …/predict/batch)",
            )
        parts = request.files.getlist("files") + request.files.getlist("file")
        if not parts:
            raise Problem(400, "Missing files", "send one or more multipart fields 'files'")
        limit = int(app.config["MAX_BATCH_FILES"])
        if len(parts) > limit:
            raise Problem(
                413,
                "Too many files",
                f"{len(parts)} files sent; the limit is {limit} per request "
                "(serving.max_batch_files): split the batch",
            )
        model = current_model()
        started = time.perf_counter()
        results: list[dict[str, Any]] = []
        for index, part in enumerate(parts):
            name = part.filename or f"file {index + 1}"
            if g.pop("large_upload", False):
                imaging.release_memory()  # the previous file's pages, before the next decode
            try:
                result = predict_one(model, Upload(part.read(), name), "/predict/batch")
                results.append({"index": index, "filename": name, "ok": True, **result})
            except InputError as exc:
                error = {"status": exc.status, "title": exc.title, "detail": exc.detail}
                if isinstance(exc, NotCTSlice):
                    error["reason"] = exc.reason
                    metrics.ood.labels(exc.reason).inc()
                results.append({"index": index, "filename": name, "ok": False, "error": error})
            except Exception:  # a bug must not cost the other files their answers
                log.exception("batch file %d (%r) failed unexpectedly", index, name)
                error = {
                    "status": 500,
                    "title": "Internal error",
                    "detail": "this file could not be processed (logged on the server); the "
                    "others were",
                }
                results.append({"index": index, "filename": name, "ok": False, "error": error})
        return jsonify(
            results=results,
            count=len(results),
            failed=sum(not r["ok"] for r in results),
            model={"name": model.name, "version": model.version},
            time_ms=round((time.perf_counter() - started) * 1000, 2),
        )

    @app.post("/explain")
    def explain() -> Response:
        upload = single_upload()
        model = current_model()
        if model.head is None:
            raise Problem(
                501,
                "Explanation unavailable",
                "the served model's card has no `cam` head weights; promote a model "
                "exported with them",
            )
        started = time.perf_counter()
        fmt = inputs.check_format(upload.data)
        if inputs.check_header(upload.data, fmt, budget).nbytes >= RELEASE_BYTES:
            g.large_upload = True
        decoded = inputs.decode(upload.data, model.window, budget)
        inputs.check_slice(decoded)
        prepared = model.prepare_with_box(decoded)
        result = analyse(model, prepared.image, 0, 0)
        predicted = model.classes[int(result.probabilities.argmax())]
        wanted = request.args.get("class", predicted)
        if wanted not in model.classes:
            raise Problem(
                400,
                "Unknown class",
                f"class {wanted!r} is not one of {', '.join(model.classes)}",
            )
        cam = class_activation(model, result.features, model.classes.index(wanted))
        png = overlay_png(model, decoded, prepared, cam)
        wants_json = request.args.get("format") == "json" or (
            request.accept_mimetypes.best == "application/json"
        )
        if wants_json:
            return jsonify(
                label=predicted,
                explained_class=wanted,
                probability=round(float(result.probabilities[model.classes.index(wanted)]), 6),
                method="grad-cam",
                heatmap_png=base64.b64encode(png).decode("ascii"),
                model={"name": model.name, "version": model.version},
                time_ms=round((time.perf_counter() - started) * 1000, 2),
            )
        resp = Response(png, mimetype="image/png")
        resp.headers["X-Chestct-Label"] = predicted
        resp.headers["X-Chestct-Explained-Class"] = wanted
        return resp

    @app.get("/history")
    def history() -> Response:
        if audit is None:
            raise Problem(
                404,
                "Audit log off",
                "the audit log is off; set serving.audit_log: true in config/config.yaml",
            )
        token = app.config["HISTORY_TOKEN"]
        if not token:
            raise Problem(
                403,
                "History disabled",
                f"no token is configured; set serving.history_token or {TOKEN_ENV}",
            )
        # Compared as bytes: compare_digest refuses str with non-ASCII characters (a 500), and
        # WSGI hands headers over as latin-1, which encodes back to the bytes that were sent.
        given = request.headers.get("Authorization", "").encode("latin-1", "replace")
        expected = b"Bearer " + str(token).encode("utf-8")
        if not hmac.compare_digest(given, expected):
            resp = problem_response(
                401,
                "Unauthorized",
                "send the configured token as 'Authorization: Bearer <token>'",
            )
            resp.headers["WWW-Authenticate"] = 'Bearer realm="chestct"'
            return resp
        raw = request.args.get("limit", "20")
        # isascii: "²" and other Unicode digits pass isdigit() but not int().
        if not (
            raw.isascii() and raw.isdigit() and len(raw) <= 6 and 1 <= int(raw) <= HISTORY_MAX
        ):
            raise Problem(
                400,
                "Bad limit",
                f"limit must be an integer from 1 to {HISTORY_MAX}, got {raw[:40]!r}",
            )
        entries = audit.latest(int(raw))
        return jsonify(entries=entries, count=len(entries))

    return app
