"""Serving prepares an upload as the resize stage does (body crop, normalisation) and puts
the explanation heatmap back over the body in the upload's coordinates."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from chestct.imaging import decoding, preparation
from chestct.imaging.body import body_box
from chestct.imaging.preparation import Preprocessing, prepare
from chestct.settings import ResizeParams
from helpers import NORMALISED, textured, zoomed_out
from model_folder import SIZE
from shipped import shipped


def normalised_model(source: Path, folder: Path, spec: Preprocessing) -> Path:
    """A copy of a served model folder whose card asks for `spec` (at the card's size)."""
    shutil.copytree(source, folder)
    card_path = folder / "model.json"
    card = json.loads(card_path.read_text(encoding="utf-8"))
    card.update(spec.with_size(card["image_size"]).to_card())
    card_path.write_text(json.dumps(card), encoding="utf-8")
    return folder


def test_serving_prepares_like_the_resize_stage(
    tmp_path: Path,
    model_dir: Path,
) -> None:
    from chestct.inference.folder import load_folder
    from chestct.stages.resize import run_resize

    params = shipped(ResizeParams, mode="pad", crop="body", intensity="percentile", workers=1)
    ok, buf = cv2.imencode(".png", zoomed_out(textured(3), 0.7, 0.2, 0.6))
    assert ok
    data = buf.tobytes()
    (tmp_path / "slice.png").write_bytes(data)
    manifest = pd.DataFrame(
        [{"path": "slice.png", "label": "normal", "sha256": "a" * 64, "source_path": "s"}]
    )
    index, _ = run_resize(
        {"train": manifest}, Preprocessing.from_params(params, SIZE), tmp_path / "out", tmp_path
    )
    made = cv2.imread(str(tmp_path / index["resized"][0]), cv2.IMREAD_GRAYSCALE)

    model = load_folder(
        normalised_model(model_dir, tmp_path / "model", Preprocessing.from_params(params, SIZE))
    )
    served = model.prepare(decoding.decode(data))
    np.testing.assert_array_equal(served, made)
    plain = prepare(data, Preprocessing(SIZE, resize="pad"))
    assert not np.array_equal(served, plain)  # the crop did work


def test_explain_heatmap_lies_over_the_body_in_the_upload(
    tmp_path: Path,
    model_dir: Path,
) -> None:
    from chestct.serving import create_app

    folder = normalised_model(model_dir, tmp_path / "model", NORMALISED)
    client = create_app({"MODEL_DIR": str(folder)}).test_client()
    # The body in the lower left of a wide black frame.
    upload = zoomed_out(textured(1), 0.6, 0.05, 0.9)
    # Faint detector noise over the black surround, as on a real slice.
    noise = np.random.default_rng(0).integers(0, 6, upload.shape)
    upload = np.clip(upload.astype(int) + noise, 0, 255).astype(np.uint8)
    box = body_box(upload, NORMALISED.crop_margin)
    ok, buf = cv2.imencode(".png", upload)
    assert ok
    resp = client.post(
        "/explain",
        data={"file": (__import__("io").BytesIO(buf.tobytes()), "s.png")},
        content_type="multipart/form-data",
    )
    assert resp.status_code == 200, resp.get_json()
    overlay = cv2.imdecode(np.frombuffer(resp.data, np.uint8), cv2.IMREAD_COLOR).astype(int)
    assert overlay.shape[:2] == upload.shape  # the upload's own frame, not the model input
    coloured = (np.abs(overlay[:, :, 0] - overlay[:, :, 2]) > 8) | (
        np.abs(overlay[:, :, 1] - overlay[:, :, 2]) > 8
    )
    ys, xs = np.nonzero(coloured)
    assert len(xs) > 0
    assert xs.min() >= box.x and xs.max() < box.x + box.w
    assert ys.min() >= box.y and ys.max() < box.y + box.h


def test_lung_crop_flows_from_resize_through_the_card_to_the_predictor(
    tmp_path: Path,
    model_dir: Path,
) -> None:
    """`resize.crop: lungs`: the card records it, serving cuts the upload to the same lung box
    as the resize stage did, and /predict answers on it."""
    from chestct.data.synthetic import render_slice
    from chestct.imaging.lungs import lung_field
    from chestct.inference.folder import load_folder
    from chestct.serving import create_app
    from chestct.stages.resize import run_resize

    params = shipped(
        ResizeParams, crop="lungs", crop_margin=0.05, intensity="percentile", workers=1
    )
    grey = zoomed_out(render_slice("adenocarcinoma", np.random.default_rng(4)), 0.8, 0.3, 0.4)
    assert lung_field(grey).found
    ok, buf = cv2.imencode(".png", grey)
    assert ok
    data = buf.tobytes()
    (tmp_path / "slice.png").write_bytes(data)
    manifest = pd.DataFrame(
        [{"path": "slice.png", "label": "normal", "sha256": "b" * 64, "source_path": "s"}]
    )
    index, _ = run_resize(
        {"train": manifest}, Preprocessing.from_params(params, SIZE), tmp_path / "out", tmp_path
    )
    made = cv2.imread(str(tmp_path / index["resized"][0]), cv2.IMREAD_GRAYSCALE)

    folder = normalised_model(
        model_dir, tmp_path / "model", Preprocessing.from_params(params, SIZE)
    )
    card = json.loads((folder / "model.json").read_text(encoding="utf-8"))
    assert card["preprocessing"]["crop"] == "lungs"
    served = load_folder(folder).prepare(decoding.decode(data))
    np.testing.assert_array_equal(served, made)
    body = preparation.prepare_slice(grey, Preprocessing(SIZE, crop="body", crop_margin=0.05))
    assert not np.array_equal(served, body.image)  # the lung box, not the body box

    client = create_app({"MODEL_DIR": str(folder)}).test_client()
    resp = client.post(
        "/predict",
        data={"file": (__import__("io").BytesIO(data), "s.png")},
        content_type="multipart/form-data",
    )
    assert resp.status_code == 200, resp.get_json()
    assert resp.get_json()["label"]
