"""The predictor service through Flask's test client: every endpoint and every error."""

from __future__ import annotations

import base64
import io
import re
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from chestct.imaging import decoding, preparation
from chestct.imaging.preparation import Preprocessing
from chestct.inference.folder import load_folder
from chestct.labels import CLASSES
from chestct.model.calibration import softmax
from chestct.serving import create_app
from model_folder import (
    ABSTAIN,
    SIZE,
    TEMPERATURE,
    ct_slice,
    dicom_bytes,
    encode,
    keras_reference,
    multipart,
    slice_png,
)
from shipped import config_text


@pytest.fixture
def client(model_dir: Path):
    app = create_app({"MODEL_DIR": str(model_dir), "MAX_CONTENT_LENGTH": 1024 * 1024})
    return app.test_client()


def assert_problem(resp, status: int, title: str | None = None) -> dict:
    assert resp.status_code == status, resp.get_data(as_text=True)
    assert resp.mimetype == "application/problem+json"
    body = resp.get_json()
    assert body["status"] == status and body["detail"]
    if title is not None:
        assert body["title"] == title
    return body


def assert_prediction(body: dict) -> None:
    assert body["label"] in CLASSES
    assert set(body["probabilities"]) == set(CLASSES)
    assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    assert body["label"] == max(body["probabilities"], key=body["probabilities"].get)
    u = body["uncertainty"]
    assert 0.0 <= u["entropy"] <= 1.0
    assert u["abstain_threshold"] == ABSTAIN
    assert u["abstain"] == (u["entropy"] > ABSTAIN)
    assert u["method"] == "mc_dropout" and u["mc_dropout"]["samples"] > 0
    assert body["ood"]["method"] == "mahalanobis_gap"
    assert isinstance(body["ood"]["out_of_distribution"], bool)
    assert body["model"] == {
        "name": "chestct",
        "version": "1",
        "run_id": "0" * 32,
        "backend": "litert",
        "family": "cnn",
    }
    assert body["time_ms"] >= 0


# ---------------------------------------------------------------------- endpoints


def test_health_ready_metadata(client) -> None:
    assert client.get("/health").get_json() == {"status": "ok", "model_loaded": True}
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.get_json()["model"]["version"] == "1"
    meta = client.get("/metadata").get_json()
    assert meta["classes"] == list(CLASSES)
    assert meta["backend"] == "litert"
    assert meta["temperature"] == TEMPERATURE
    assert meta["thresholds"] == {"abstain_entropy": ABSTAIN}
    assert meta["explain"] is True and meta["ood"]["method"] == "mahalanobis_gap"
    assert meta["inference"]["runtime"] == "litert"
    assert meta["limits"]["max_upload_mb"] == 1


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
def test_predict_multipart(client, mode: str) -> None:
    grey = ct_slice(1)
    img = {"L": grey, "RGB": cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)}.get(mode)
    if img is None:
        img = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGRA)
    resp = client.post("/predict", **multipart(encode(img)))
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert_prediction(resp.get_json())


def test_predict_raw_bodies_and_json_agree(client) -> None:
    png = slice_png(2)
    by_form = client.post("/predict", **multipart(png)).get_json()
    by_raw = client.post("/predict", data=png, content_type="image/png").get_json()
    b64 = base64.b64encode(png).decode()
    by_json = client.post("/predict", json={"image": b64}).get_json()
    by_data_url = client.post("/predict", json={"image": "data:image/png;base64," + b64})
    for body in (by_raw, by_json, by_data_url.get_json()):
        assert_prediction(body)
        assert body["probabilities"] == by_form["probabilities"]
        assert body["input"]["sha256"] == by_form["input"]["sha256"]
    jpeg = client.post("/predict", data=encode(ct_slice(2), ".jpg"), content_type="image/jpeg")
    assert jpeg.status_code == 200 and jpeg.get_json()["input"]["format"] == "jpeg"


def test_predict_dicom_goes_through_the_ingest_window(client) -> None:
    data = dicom_bytes(3)
    resp = client.post("/predict", data=data, content_type="application/dicom")
    assert resp.status_code == 200, resp.get_data(as_text=True)
    body = resp.get_json()
    assert_prediction(body)
    assert body["input"]["format"] == "dicom"
    # Same pixels as the pipeline sees them: imaging.prepare with the ingest window.
    expected = preparation.prepare(data, Preprocessing(SIZE, window=(-600.0, 1500.0)))
    png = client.post("/predict", data=encode(expected), content_type="image/png").get_json()
    for cls in CLASSES:
        assert body["probabilities"][cls] == pytest.approx(png["probabilities"][cls], abs=1e-5)
    # Older systems write DICOM without the 128-byte preamble: the same answer.
    bare = client.post("/predict", data=data[132:], content_type="application/dicom")
    assert bare.status_code == 200, bare.get_data(as_text=True)
    assert bare.get_json()["probabilities"] == body["probabilities"]


def test_light_model_matches_keras_and_calibration(model_dir: Path) -> None:
    """Served probabilities equal Keras within 1e-4 once the temperature is taken out."""
    images, reference = keras_reference(model_dir)
    model = load_folder(model_dir)
    light = model.run(images)
    assert np.abs(light.probabilities - reference).max() < 1e-4
    app = create_app({"MODEL_DIR": str(model_dir), "MC_DROPOUT_SAMPLES": 0})
    body = app.test_client().post("/predict", data=encode(images[0]), content_type="image/png")
    body = body.get_json()
    calibrated = softmax(np.log(reference[0].astype(np.float64)) / TEMPERATURE)
    served = np.array([body["probabilities"][c] for c in CLASSES])
    assert np.abs(served - calibrated).max() < 1e-4
    assert body["uncertainty"]["method"] == "entropy"


def test_served_input_is_imaging_prepare(model_dir: Path) -> None:
    model = load_folder(model_dir)
    data = slice_png(5, size=120)
    served = model.prepare(decoding.decode(data))
    assert np.array_equal(served, preparation.prepare(data, Preprocessing(SIZE)))


def test_same_image_same_answer(client) -> None:
    png = slice_png(4)
    first = client.post("/predict", **multipart(png)).get_json()
    second = client.post("/predict", **multipart(png)).get_json()
    assert first["uncertainty"] == second["uncertainty"]


def test_batch_in_order_with_per_file_errors(client) -> None:
    files = [
        (io.BytesIO(slice_png(1)), "a.png"),
        (io.BytesIO(b"not an image"), "b.png"),
        (io.BytesIO(encode(np.full((64, 64), 128, np.uint8))), "c.png"),
        (io.BytesIO(slice_png(2)), "d.png"),
    ]
    resp = client.post("/predict/batch", data={"files": files}, content_type="multipart/form-data")
    assert resp.status_code == 200
    body = resp.get_json()
    assert [r["filename"] for r in body["results"]] == ["a.png", "b.png", "c.png", "d.png"]
    assert [r["ok"] for r in body["results"]] == [True, False, False, True]
    assert body["results"][1]["error"]["status"] == 400
    assert body["results"][2]["error"]["reason"] == "blank"
    assert body["failed"] == 2
    assert_prediction(body["results"][0])


def test_batch_limits(model_dir: Path) -> None:
    client = create_app({"MODEL_DIR": str(model_dir), "MAX_BATCH_FILES": 2}).test_client()
    files = [(io.BytesIO(slice_png(i)), f"{i}.png") for i in range(3)]
    resp = client.post("/predict/batch", data={"files": files}, content_type="multipart/form-data")
    assert "limit is 2" in assert_problem(resp, 413, "Too many files")["detail"]
    empty = client.post("/predict/batch", data={}, content_type="multipart/form-data")
    assert_problem(empty, 400, "Missing files")
    assert_problem(client.post("/predict/batch", json={}), 415)


def test_explain_png_and_json(client) -> None:
    png = slice_png(6, size=200)
    resp = client.post("/explain", **multipart(png))
    assert resp.status_code == 200 and resp.mimetype == "image/png"
    overlay = cv2.imdecode(np.frombuffer(resp.data, np.uint8), cv2.IMREAD_COLOR)
    assert overlay.shape == (200, 200, 3)  # over the client's image, at its size
    label = resp.headers["X-Chestct-Label"]
    as_json = client.post("/explain?format=json", **multipart(png)).get_json()
    assert as_json["label"] == label and as_json["explained_class"] == label
    assert base64.b64decode(as_json["heatmap_png"]).startswith(b"\x89PNG")
    other = next(c for c in CLASSES if c != label)
    chosen = client.post(f"/explain?format=json&class={other}", **multipart(png)).get_json()
    assert chosen["explained_class"] == other
    assert chosen["heatmap_png"] != as_json["heatmap_png"]
    bad = client.post("/explain?class=cat", **multipart(png))
    assert "cat" in assert_problem(bad, 400, "Unknown class")["detail"]


def test_index_page_is_self_contained(client) -> None:
    resp = client.get("/")
    assert resp.status_code == 200 and resp.mimetype == "text/html"
    html = resp.get_data(as_text=True)
    assert 'id="file"' in html and "/predict" in html and "/explain" in html
    assert "http://" not in html and "https://" not in html  # no CDN


def test_metrics(client) -> None:
    client.post("/predict", **multipart(slice_png(1)))
    client.post("/predict", **multipart(encode(np.zeros((64, 64), np.uint8))))
    client.get("/nope")
    text = client.get("/metrics").get_data(as_text=True)
    assert 'chestct_requests_total{endpoint="/predict",status="200"} 1.0' in text
    assert 'chestct_requests_total{endpoint="/predict",status="422"} 1.0' in text
    assert 'chestct_requests_total{endpoint="unmatched",status="404"} 1.0' in text
    assert 'chestct_request_latency_seconds_bucket{endpoint="/predict",le="+Inf"} 2.0' in text
    assert "chestct_predictions_total{label=" in text
    # Refused slices and answered ones flagged out of distribution are counted apart.
    assert 'chestct_refusals_total{reason="blank"} 1.0' in text
    assert re.search(r"^chestct_ood_predictions_total [01]\.0$", text, re.M)
    assert "chestct_ood_rejections" not in text
    assert "chestct_abstentions_total" in text
    assert 'chestct_model_info{backend="litert",name="chestct",version="1"} 1.0' in text


# ---------------------------------------------------------------------- bad input


def test_undecodable_truncated_and_empty_are_400(client) -> None:
    body = assert_problem(
        client.post("/predict", **multipart(b"this is not an image")), 400, "Undecodable image"
    )
    assert "PNG" in body["detail"]
    truncated = slice_png()[:80]
    assert_problem(client.post("/predict", **multipart(truncated)), 400, "Undecodable image")
    assert_problem(client.post("/predict", **multipart(b"")), 400, "Empty upload")


def test_bad_base64_and_bad_json_are_400(client) -> None:
    assert_problem(client.post("/predict", json={"image": "%%%not base64"}), 400, "Bad base64")
    assert_problem(client.post("/predict", json={"picture": "x"}), 400, "Bad JSON")
    resp = client.post("/predict", data="{not json", content_type="application/json")
    assert_problem(resp, 400, "Bad JSON")


def test_missing_file_field_is_400(client) -> None:
    resp = client.post("/predict", data={"other": "x"}, content_type="multipart/form-data")
    assert "'file'" in assert_problem(resp, 400, "Missing file")["detail"]


def test_oversized_body_is_413(client) -> None:
    resp = client.post("/predict", **multipart(b"\0" * (2 * 1024 * 1024)))
    assert "1 MB" in assert_problem(resp, 413, "Payload too large")["detail"]
    raw = client.post("/predict", data=b"\0" * (2 * 1024 * 1024), content_type="image/png")
    assert_problem(raw, 413)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A PNG whose header declares width x height; its IDAT is a small zlib stream of zeros."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * (width + 1) * 64, 9)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)


def jpeg_bomb() -> bytes:
    """A real JPEG with its SOF0 height and width patched to 60000 x 60000."""
    data = bytearray(encode(ct_slice(0), ".jpg"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 60000, 60000)
    return bytes(data)


def dicom_bomb() -> bytes:
    """A DICOM whose Rows and Columns declare 60000 x 60000 over a few bytes of pixels."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(0)))
    ds.Rows = ds.Columns = 60000
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.parametrize("bomb", [png_bomb, jpeg_bomb, dicom_bomb], ids=["png", "jpeg", "dicom"])
def test_decompression_bomb_refused_from_header(client, monkeypatch, bomb) -> None:
    def no_decode(*args, **kwargs):
        raise AssertionError("the bomb reached the decoder")

    monkeypatch.setattr(decoding.cv2, "imdecode", no_decode)
    monkeypatch.setattr(decoding, "decode_dicom", no_decode)
    body = assert_problem(client.post("/predict", **multipart(bomb())), 413, "Image too large")
    assert "header declares" in body["detail"]


def test_unsupported_types_are_415(client) -> None:
    body = assert_problem(client.post("/predict", data="hello", content_type="text/plain"), 415)
    assert "multipart/form-data" in body["detail"]
    gif = b"GIF89a" + b"\0" * 64
    assert "GIF" in assert_problem(client.post("/predict", **multipart(gif)), 415)["detail"]


def _screenshot() -> np.ndarray:
    img = np.full((300, 400), 255, np.uint8)
    for row in range(20, 280, 24):
        cv2.putText(img, "Lorem ipsum dolor sit amet", (10, row), 0, 0.6, 0, 1)
    return img


def _photo() -> np.ndarray:
    yy, xx = np.mgrid[:200, :200]
    return np.dstack([xx % 256, yy % 256, (xx + yy) % 256]).astype(np.uint8)


def _dark_ui() -> np.ndarray:
    img = np.full((240, 320), 30, np.uint8)
    img[40:200, 40:280] = 60
    return img


@pytest.mark.parametrize(
    ("image", "reason"),
    [
        (_photo(), "colour"),
        (np.zeros((128, 128), np.uint8), "blank"),
        (np.random.default_rng(0).integers(118, 122, (128, 128)).astype(np.uint8), "blank"),
        (_screenshot(), "white_background"),
        (_dark_ui(), "flat_graphic"),
        (ct_slice(0, size=96)[:20, :20], "too_small"),
        (cv2.resize(ct_slice(0), (400, 100)), "aspect_ratio"),
    ],
    ids=["photo", "black", "near-blank", "text", "dark-ui", "tiny", "banner"],
)
def test_not_a_ct_slice_is_422_with_reason(client, image: np.ndarray, reason: str) -> None:
    body = assert_problem(
        client.post("/predict", **multipart(encode(image))), 422, "Not a chest CT slice"
    )
    assert body["reason"] == reason


def test_routes_404_405_are_problem_json(client) -> None:
    assert "no endpoint /nope" in assert_problem(client.get("/nope"), 404)["detail"]
    resp = client.get("/predict")
    assert_problem(resp, 405)
    assert "POST" in resp.headers["Allow"]


def test_without_model_503_then_serves_once_promoted(tmp_path: Path, model_dir: Path) -> None:
    import shutil

    folder = tmp_path / "model"
    app = create_app({"MODEL_DIR": str(folder), "RELOAD_CHECK_S": 0})
    client = app.test_client()
    assert client.get("/health").get_json()["model_loaded"] is False
    assert "make run" in assert_problem(client.get("/ready"), 503, "Model not ready")["detail"]
    assert_problem(client.post("/predict", **multipart(slice_png())), 503)
    shutil.copytree(model_dir, folder)
    assert client.get("/ready").status_code == 200
    assert client.post("/predict", **multipart(slice_png())).status_code == 200


def test_uploads_never_touch_the_disk(client, monkeypatch) -> None:
    import tempfile

    import werkzeug.formparser

    def refuse(*args, **kwargs):
        raise AssertionError("an upload was spooled to a temporary file")

    for name in ("TemporaryFile", "NamedTemporaryFile", "SpooledTemporaryFile", "mkstemp"):
        monkeypatch.setattr(tempfile, name, refuse)
    monkeypatch.setattr(werkzeug.formparser, "SpooledTemporaryFile", refuse)
    noise = np.random.default_rng(0).integers(0, 64, (900, 900), dtype=np.uint8)
    big = encode(cv2.resize(ct_slice(0), (900, 900)) // 2 + noise)
    assert 500 * 1024 < len(big) < 1024 * 1024  # Werkzeug spools parts over 500 kB
    assert client.post("/predict", **multipart(big)).status_code == 200


# ---------------------------------------------------------------------- audit log


def test_history_requires_token_and_stores_no_pixels(model_dir: Path, tmp_path: Path) -> None:
    import sqlite3

    db = tmp_path / "audit" / "log.sqlite"
    app = create_app(
        {
            "MODEL_DIR": str(model_dir),
            "AUDIT_LOG": True,
            "AUDIT_DB": str(db),
            "HISTORY_TOKEN": "s3",
        }
    )
    client = app.test_client()
    sent = [client.post("/predict", **multipart(slice_png(i))).get_json() for i in range(3)]
    assert_problem(client.get("/history"), 401)
    assert_problem(client.get("/history", headers={"Authorization": "Bearer nope"}), 401)
    auth = {"Authorization": "Bearer s3"}
    body = client.get("/history?limit=2", headers=auth).get_json()
    assert body["count"] == 2
    newest = body["entries"][0]
    assert newest["sha256"] == sent[-1]["input"]["sha256"]
    assert newest["label"] == sent[-1]["label"]
    assert newest["probabilities"] == sent[-1]["probabilities"]
    assert newest["model_version"] == "1" and newest["time"].endswith("+00:00")
    assert_problem(client.get("/history?limit=0", headers=auth), 400, "Bad limit")
    assert_problem(client.get("/history?limit=x", headers=auth), 400, "Bad limit")
    with sqlite3.connect(db) as conn:
        columns = [row[1] for row in conn.execute("PRAGMA table_info(predictions)")]
        sizes = conn.execute("SELECT max(length(probabilities)) FROM predictions").fetchone()
    assert not {"image", "pixels", "data"} & set(columns)
    assert sizes[0] < 200  # a few numbers, no image


def test_history_off_by_default_and_without_token(model_dir: Path, tmp_path: Path) -> None:
    off = create_app({"MODEL_DIR": str(model_dir)}).test_client()
    assert "audit_log" in assert_problem(off.get("/history"), 404)["detail"]
    db = tmp_path / "a.sqlite"
    no_token = create_app({"MODEL_DIR": str(model_dir), "AUDIT_LOG": True, "AUDIT_DB": str(db)})
    assert "history_token" in assert_problem(no_token.test_client().get("/history"), 403)["detail"]


def test_settings_reach_the_app(tmp_path: Path, model_dir: Path, monkeypatch) -> None:
    """Without a test config the app reads config/config.yaml under CHESTCT_ROOT."""
    import shutil

    repo = Path(__file__).resolve().parents[2]
    (tmp_path / "config").mkdir()
    shutil.copy(repo / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "config" / "config.yaml").write_text(
        config_text(
            {
                "model_dir": str(model_dir),
                "serving": {"max_upload_mb": 2, "max_batch_files": 3, "history_token": "x"},
            }
        ),
        encoding="utf-8",
    )
    monkeypatch.setenv("CHESTCT_ROOT", str(tmp_path))
    monkeypatch.setenv("CHESTCT_HISTORY_TOKEN", "from-env")
    app = create_app()
    settings = app.extensions["chestct"].settings  # typed, as config/config.yaml gave them
    assert app.config["MAX_CONTENT_LENGTH"] == 2 * 1024 * 1024
    assert settings.serving.max_batch_files == 3
    assert settings.serving.history_token == "from-env"
    assert settings.audit_db == tmp_path / "audit" / "predictions.sqlite"
    assert app.test_client().get("/ready").status_code == 200


@pytest.mark.parametrize(
    ("serving", "message"),
    [
        ({"max_batch_files": 0}, "serving.max_batch_files"),
        ({"max_upload_mb": -1}, "serving.max_upload_mb"),
        ({"audit_log": "yes"}, "serving.audit_log"),
        ({"history_tokn": "x"}, "unknown key 'history_tokn'"),
    ],
)
def test_bad_serving_settings_name_the_key(tmp_path: Path, serving: dict, message: str) -> None:
    import shutil

    from chestct.settings import SettingsError, load_settings

    repo = Path(__file__).resolve().parents[2]
    (tmp_path / "config").mkdir()
    shutil.copy(repo / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "config" / "config.yaml").write_text(
        config_text({"serving": serving}), encoding="utf-8"
    )
    with pytest.raises(SettingsError, match=message):
        load_settings(tmp_path)


def test_favicon_is_served_not_404(client) -> None:
    for path in ("/favicon.ico", "/favicon.svg"):
        resp = client.get(path)
        assert resp.status_code == 200 and resp.mimetype == "image/svg+xml", path
        assert resp.get_data(as_text=True).startswith("<svg")
    assert 'rel="icon"' in client.get("/").get_data(as_text=True)
