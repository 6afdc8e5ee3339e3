"""The prediction routes: POST /predict, /predict/batch and /explain.

Each image goes through one checked-input path (`checked_input`: format, header budget,
decoding, not-a-CT-slice checks) and then the inference core (chestct.inference).
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Response, g, jsonify, request

from chestct.fsutil import sha256_bytes
from chestct.imaging import formats, workers
from chestct.imaging.body import BodyBox
from chestct.inference.analysis import analyse, analyse_outputs
from chestct.inference.explain import explain as explain_image
from chestct.inference.explain import overlay_png
from chestct.inference.loaded import Loaded
from chestct.inference.predictor import seed_of
from chestct.model.families import OFFERS
from chestct.monitoring.signals import image_signals, request_signals
from chestct.serving import inputs
from chestct.serving.inputs import InputError, NotCTSlice, Upload
from chestct.serving.problems import Problem, json_body
from chestct.serving.service import Service, current_service

log = logging.getLogger(__name__)

bp = Blueprint("prediction", __name__)

MB = 1024 * 1024
# A request whose body or declared decode cost reaches this hands freed memory back to the
# kernel afterwards (imaging.release_memory): below it the freed buffers are reused by the next
# request, and trimming them would cost each 512 x 512 slice about 0.5 ms of page faults.
RELEASE_BYTES = 4 * MB
# Images whose declared decode cost reaches RELEASE_BYTES are worked on one at a time per
# worker (Service.large_slot), whatever the worker's threads: two largest allowed images at once
# took a worker from 145 to 265 MB (bench/hostile.py); one at a time bounds it near 205 MB.
# A request that waits longer than this for the slot gets a 503 to retry.
LARGE_WAIT_S = 30.0


@dataclass(frozen=True)
class CheckedInput:
    """An upload that passed every input check, decoded."""

    upload: Upload
    format: str
    decoded: formats.Decoded


def checked_input(service: Service, model: Loaded, upload: Upload) -> CheckedInput:
    """Format by content, the header's declared cost, decoding within the limits, then the
    not-a-CT-slice checks; raises InputError (answered as problem details)."""
    watch = g.watch
    fmt = inputs.check_format(upload.data)
    header = inputs.check_header(upload.data, fmt, service.budget)
    if header.nbytes >= RELEASE_BYTES:
        g.large_upload = True
        hold_large_slot(service)
    watch.lap("checks")
    decoded = inputs.decode(upload.data, model.window, service.budget, header)
    watch.lap("decode")
    try:
        inputs.check_slice(decoded)
    except NotCTSlice as exc:
        _record_refusal(service, model, upload, exc.reason, decoded)
        raise
    watch.lap("checks")
    return CheckedInput(upload, fmt, decoded)


def _record_refusal(
    service: Service, model: Loaded, upload: Upload, reason: str, decoded: formats.Decoded
) -> None:
    """A refused slice is monitoring traffic too: counted by reason on /metrics, put in the
    rolling window and written to the audit log with its image signals (numbers only)."""
    service.metrics.refuse(reason)
    audit = service.audit
    if audit is None:
        return
    try:
        signals = image_signals(decoded.grey)
        audit.record_refusal(
            request.path, sha256_bytes(upload.data), reason, (model.name, model.version), signals
        )
    except Exception:  # a full disk must not take predictions down; it is logged
        log.exception("could not write the audit log %s", audit.path)


def hold_large_slot(service: Service) -> None:
    """Wait for this worker's one slot for large images (held until `release_large_slot`,
    which the request's teardown calls).

    Raises:
        Problem: 503 when the slot stays taken for LARGE_WAIT_S.
    """
    if g.get("large_slot") is not None:
        return
    if not service.large_slot.acquire(timeout=LARGE_WAIT_S):
        raise Problem(
            503,
            "Busy with large images",
            f"this worker has been decoding other large images for {LARGE_WAIT_S:g} s; retry, "
            "or send slices at their native size (about 512 x 512)",
        )
    g.large_slot = service.large_slot


def release_large_slot() -> None:
    """Give back the large-image slot this request holds, if any."""
    slot = g.pop("large_slot", None)
    if slot is not None:
        slot.release()


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
        body = json_body()
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


def _by_class(model: Loaded, values: Any) -> dict[str, float]:
    # tolist: Python floats in one call, not one np.float64 conversion per class.
    return {c: round(v, 6) for c, v in zip(model.classes, values.tolist(), strict=True)}


def predict_one(service: Service, model: Loaded, upload: Upload, endpoint: str) -> dict[str, Any]:
    """Checks, decoding and the prediction for one image; raises InputError."""
    started = time.perf_counter()
    watch = g.watch
    watch.lap("receive")
    checked = checked_input(service, model, upload)
    decoded = checked.decoded
    sha = sha256_bytes(upload.data)
    watch.lap("checks")
    prepared = model.prepare_with_box(decoded)
    watch.lap("prepare")
    outputs = model.run(prepared.image[None])
    watch.lap("infer")
    samples = service.settings.serving.mc_dropout_samples
    result = analyse_outputs(model, outputs, samples, seed_of(sha))
    label = model.classes[int(result.probabilities.argmax())]
    body = {
        "id": uuid.uuid4().hex,  # for POST /feedback
        "label": label,
        "display_name": model.display_name(label),
        "display_names": {c: model.display_name(c) for c in model.classes},
        "probabilities": _by_class(model, result.probabilities),
        "uncertainty": {
            "entropy": round(result.entropy, 6),
            "abstain_threshold": model.abstain_threshold,
            "abstain": result.abstain,
            "method": "mc_dropout" if result.mc_mean is not None else "entropy",
            "mc_dropout": None
            if result.mc_mean is None
            else {
                "samples": samples,
                "dropout_rate": model.dropout_rate,
                "mutual_information": round(float(result.mutual_information), 6),
                "mean": _by_class(model, result.mc_mean),
                "std": _by_class(model, result.mc_std),
            },
            **({"note": OFFERS[model.family]["mc_dropout"]} if model.family != "cnn" else {}),
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
            "run_id": model.card.train_run_id,
            "backend": model.backend,
            "family": model.family,
        },
        "input": {
            "sha256": sha,
            "format": checked.format,
            "width": decoded.width,
            "height": decoded.height,
        },
        "time_ms": round((time.perf_counter() - started) * 1000, 2),
    }
    watch.lap("analyse")
    _record(service, model, endpoint, body, result, decoded, prepared.body)
    watch.lap("monitor")
    return body


def _record(
    service: Service,
    model: Loaded,
    endpoint: str,
    body: dict[str, Any],
    result: Any,
    decoded: formats.Decoded,
    body_box: BodyBox | None,
) -> None:
    """Metrics, monitoring signals and the audit log of one answer; `body_box` is the box
    the model's body crop found (None without one: the signals then look for it)."""
    metrics, audit = service.metrics, service.audit
    metrics.predictions.labels(body["label"]).inc()
    if result.abstain:
        metrics.abstentions.inc()
    if result.out_of_distribution:
        metrics.ood_predictions.inc()
    signals = request_signals(
        result.probabilities,
        result.entropy,
        result.ood_score,
        None if model.ood is None else model.ood.threshold,
        decoded.grey,
        body_box,
    )
    flags = {"abstain": result.abstain, "ood": result.out_of_distribution}
    metrics.observe(signals, body["label"], flags)
    if audit is not None:
        try:
            audit.record(endpoint, body, signals)
        except Exception:  # a full disk must not take predictions down; it is logged
            log.exception("could not write the audit log %s", audit.path)


@bp.post("/predict")
def predict() -> Response:
    upload = single_upload()
    service = current_service()
    model = service.current_model()
    return jsonify(predict_one(service, model, upload, "/predict"))


@bp.post("/predict/batch")
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
    service = current_service()
    limit = service.settings.serving.max_batch_files
    if len(parts) > limit:
        raise Problem(
            413,
            "Too many files",
            f"{len(parts)} files sent; the limit is {limit} per request "
            "(serving.max_batch_files): split the batch",
        )
    model = service.current_model()
    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    for index, part in enumerate(parts):
        name = part.filename or f"file {index + 1}"
        if g.pop("large_upload", False):
            workers.release_memory()  # the previous file's pages, before the next decode
        release_large_slot()  # the previous file's, so that other requests get their turn
        try:
            result = predict_one(service, model, Upload(part.read(), name), "/predict/batch")
            results.append({"index": index, "filename": name, "ok": True, **result})
        except InputError as exc:
            error = {"status": exc.status, "title": exc.title, "detail": exc.detail}
            if isinstance(exc, NotCTSlice):
                error["reason"] = exc.reason  # counted and logged by checked_input
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


@bp.post("/explain")
def explain() -> Response:
    upload = single_upload()
    service = current_service()
    model = service.current_model()
    if model.head is None and model.family != "texture":
        raise Problem(
            501,
            "Explanation unavailable",
            "the served model's card has no `cam` head weights; promote a model "
            "exported with them",
        )
    started = time.perf_counter()
    decoded = checked_input(service, model, upload).decoded
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
    why = explain_image(model, prepared.image, result.features, model.classes.index(wanted))
    png = overlay_png(model, decoded, prepared, why.heat, why.groups)
    wants_json = request.args.get("format") == "json" or (
        request.accept_mimetypes.best == "application/json"
    )
    if wants_json:
        return jsonify(
            label=predicted,
            explained_class=wanted,
            probability=round(float(result.probabilities[model.classes.index(wanted)]), 6),
            method=why.method,
            **({"feature_groups": why.groups} if why.groups is not None else {}),
            heatmap_png=base64.b64encode(png).decode("ascii"),
            model={"name": model.name, "version": model.version},
            time_ms=round((time.perf_counter() - started) * 1000, 2),
        )
    resp = Response(png, mimetype="image/png")
    resp.headers["X-Chestct-Label"] = predicted
    resp.headers["X-Chestct-Explained-Class"] = wanted
    return resp
