"""The predictor service through Flask's test client."""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pytest

from chestct.labels import CLASSES
from chestct.serving import create_app


def png_bytes(size: tuple[int, int] = (60, 50), channels: int = 1) -> bytes:
    rng = np.random.default_rng(0)
    shape = (size[1], size[0]) if channels == 1 else (size[1], size[0], channels)
    ok, buf = cv2.imencode(".png", rng.integers(0, 255, shape, dtype=np.uint8))
    assert ok
    return buf.tobytes()


@pytest.fixture
def client(tiny_model_dir: Path):
    app = create_app({"MODEL_DIR": str(tiny_model_dir), "MAX_CONTENT_LENGTH": 1024 * 1024})
    return app.test_client()


def test_health(client) -> None:
    resp = client.get("/health")
    assert resp.status_code == 200
    assert resp.get_json() == {"status": "ok", "model_loaded": True}


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_predict_returns_label_and_probabilities(client, channels: int) -> None:
    data = {"file": (io.BytesIO(png_bytes(channels=channels)), "slice.png")}
    resp = client.post("/predict", data=data, content_type="multipart/form-data")
    assert resp.status_code == 200, resp.get_data(as_text=True)
    body = resp.get_json()
    assert body["label"] in CLASSES
    assert set(body["probabilities"]) == set(CLASSES)
    assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert body["label"] == max(body["probabilities"], key=body["probabilities"].get)
    assert body["model"]["version"] == "1"
    assert body["time_ms"] >= 0


def test_undecodable_upload_is_400_problem_json(client) -> None:
    data = {"file": (io.BytesIO(b"this is not an image"), "slice.png")}
    resp = client.post("/predict", data=data, content_type="multipart/form-data")
    assert resp.status_code == 400
    assert resp.mimetype == "application/problem+json"
    assert resp.get_json()["title"] == "Undecodable image"


def test_truncated_png_is_400(client) -> None:
    data = {"file": (io.BytesIO(png_bytes()[:60]), "slice.png")}
    resp = client.post("/predict", data=data, content_type="multipart/form-data")
    assert resp.status_code == 400


def test_missing_file_field_is_400(client) -> None:
    resp = client.post("/predict", data={"other": "x"}, content_type="multipart/form-data")
    assert resp.status_code == 400
    assert "'file'" in resp.get_json()["detail"]


def test_oversized_upload_is_413(client) -> None:
    data = {"file": (io.BytesIO(b"\0" * (2 * 1024 * 1024)), "big.png")}
    resp = client.post("/predict", data=data, content_type="multipart/form-data")
    assert resp.status_code == 413
    assert "1 MB" in resp.get_json()["detail"]


def test_unknown_route_and_method_are_json(client) -> None:
    assert client.get("/nope").status_code == 404
    assert client.get("/nope").mimetype == "application/problem+json"
    assert client.get("/predict").status_code == 405


def test_without_model_predict_is_503(tmp_path: Path) -> None:
    app = create_app({"MODEL_DIR": str(tmp_path)})
    client = app.test_client()
    assert client.get("/health").get_json()["model_loaded"] is False
    data = {"file": (io.BytesIO(png_bytes()), "slice.png")}
    resp = client.post("/predict", data=data, content_type="multipart/form-data")
    assert resp.status_code == 503
    assert "make run" in resp.get_json()["detail"]
