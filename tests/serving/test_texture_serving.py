"""The texture family served: /predict, /predict/batch and /explain through Flask's test client,
and its model file checked against the card's sha256 at load."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from chestct.inference.analysis import analyse
from chestct.inference.folder import load_folder
from chestct.inference.loaded import ModelRefused
from chestct.labels import CLASSES
from chestct.model import texture
from chestct.serving import create_app
from model_folder import ct_slice, encode, multipart
from texture_folder import build_texture_folder


@pytest.fixture(scope="module")
def texture_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_texture_folder(tmp_path_factory.mktemp("texture") / "model")


@pytest.fixture
def client(texture_dir: Path):
    return create_app({"MODEL_DIR": str(texture_dir)}).test_client()


def test_texture_predict_says_what_it_offers(client) -> None:
    resp = client.post("/predict", **multipart(encode(ct_slice(3))))
    assert resp.status_code == 200, resp.get_data(as_text=True)
    body = resp.get_json()
    assert body["model"]["family"] == "texture"
    assert body["model"]["backend"] == "skops"
    assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    u = body["uncertainty"]
    assert u["method"] == "entropy" and u["mc_dropout"] is None
    assert "not offered" in u["note"]
    assert isinstance(u["abstain"], bool)
    assert body["ood"]["method"] == "mahalanobis_gap"
    assert isinstance(body["ood"]["out_of_distribution"], bool)


def test_texture_batch(client) -> None:
    files = {
        "files": [(__import__("io").BytesIO(encode(ct_slice(s))), f"{s}.png") for s in (1, 2)]
    }
    resp = client.post("/predict/batch", data=files, content_type="multipart/form-data")
    assert resp.status_code == 200, resp.get_data(as_text=True)
    results = resp.get_json()["results"]
    assert len(results) == 2 and all(r["label"] in CLASSES for r in results)


def test_served_probabilities_are_the_texture_models(texture_dir: Path) -> None:
    """The inference core applies the card's temperature to chestct.model.texture's calibrated
    log-probabilities: with T = 1 the served answer is the model's own."""
    model = load_folder(texture_dir)
    grey = cv2.resize(ct_slice(11), (64, 64))
    expected = texture.load(texture_dir / "texture.skops").outputs(grey[None])["probabilities"]
    got = analyse(model, grey, 8, 0)
    np.testing.assert_allclose(got.probabilities, expected[0], atol=1e-5)
    assert got.mc_mean is None and got.ood_score is not None


def test_texture_explain_png_and_json(client) -> None:
    resp = client.post("/explain", **multipart(encode(ct_slice(5))))
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert resp.mimetype == "image/png"
    picture = cv2.imdecode(np.frombuffer(resp.data, np.uint8), cv2.IMREAD_COLOR)
    assert picture is not None and picture.shape[0] > 96  # the slice and the group bars
    resp = client.post("/explain?format=json", **multipart(encode(ct_slice(5))))
    body = resp.get_json()
    assert body["method"] == "occlusion"
    assert set(body["feature_groups"]) == {"lbp", "glcm", "histogram", "hog"}
    assert base64.b64decode(body["heatmap_png"]).startswith(b"\x89PNG")


def test_occlusion_map_is_a_normalised_map(texture_dir: Path) -> None:
    model = texture.load(texture_dir / "texture.skops")
    grey = cv2.resize(ct_slice(7), (64, 64))
    heat = texture.occlusion_map(model, grey, 0)
    assert heat.shape == grey.shape and heat.min() >= 0 and heat.max() <= 1


def test_tampered_texture_file_is_refused(texture_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "model"
    shutil.copytree(texture_dir, copy)
    data = bytearray((copy / "texture.skops").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "texture.skops").write_bytes(bytes(data))
    with pytest.raises(ModelRefused, match="sha256"):
        load_folder(copy)


def test_skops_file_with_a_foreign_type_is_refused(tmp_path: Path) -> None:
    """Even with a matching digest (a card rewritten too), loading refuses types a texture
    model never holds instead of building them."""
    import skops.io as sio

    path = tmp_path / "texture.skops"
    sio.dump({"format": texture.FORMAT, "version": 1, "payload": Foreign()}, path)
    with pytest.raises(texture.TextureError, match="refusing"):
        texture.load(path)


def test_runtime_must_match_family(texture_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "model"
    shutil.copytree(texture_dir, copy)
    card = json.loads((copy / "model.json").read_text())
    card["family"] = "cnn"
    (copy / "model.json").write_text(json.dumps(card))
    with pytest.raises(ModelRefused, match="does not serve family"):
        load_folder(copy)


class Foreign:
    """A type no texture model contains."""

    def __init__(self) -> None:
        self.value = 1
