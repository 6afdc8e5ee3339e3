"""Hot reload of model/ in a running app, refusal of broken folders, and the Keras fallback."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from chestct.fsutil import replace_dir
from chestct.serving import create_app
from model_folder import multipart, slice_png


def _client(folder: Path):
    return create_app({"MODEL_DIR": str(folder), "RELOAD_CHECK_S": 0}).test_client()


def _version(client) -> str:
    resp = client.post("/predict", **multipart(slice_png(1)))
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return resp.get_json()["model"]["version"]


def test_swap_switches_running_app_without_restart(
    tmp_path: Path,
    model_dir: Path,
    second_model: Path,
) -> None:
    live = tmp_path / "model"
    shutil.copytree(model_dir, live)
    client = _client(live)
    first = client.post("/predict", **multipart(slice_png(1))).get_json()
    assert first["model"]["version"] == "1"
    staged = tmp_path / ".model.new"
    shutil.copytree(second_model, staged)
    replace_dir(staged, live)  # what promote does: one renameat2 exchange
    after = client.post("/predict", **multipart(slice_png(1))).get_json()
    assert after["model"]["version"] == "2"
    assert after["probabilities"] != first["probabilities"]
    assert client.get("/metadata").get_json()["version"] == "2"
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'chestct_model_info{backend="litert",name="chestct",version="2"} 1.0' in metrics
    assert 'chestct_model_info{backend="litert",name="chestct",version="1"} 0.0' in metrics


def test_reload_check_is_rate_limited(tmp_path: Path, model_dir: Path, second_model: Path) -> None:
    live = tmp_path / "model"
    shutil.copytree(model_dir, live)
    client = create_app({"MODEL_DIR": str(live), "RELOAD_CHECK_S": 3600}).test_client()
    staged = tmp_path / ".model.new"
    shutil.copytree(second_model, staged)
    replace_dir(staged, live)
    assert _version(client) == "1"  # not checked again within the hour


@pytest.mark.parametrize(
    "damage",
    ["truncated_tflite", "garbage_tflite", "missing_file", "bad_card", "wrong_head"],
)
def test_broken_new_model_is_refused_and_old_keeps_serving(
    tmp_path: Path,
    model_dir: Path,
    second_model: Path,
    caplog: pytest.LogCaptureFixture,
    damage: str,
) -> None:
    live = tmp_path / "model"
    shutil.copytree(model_dir, live)
    client = _client(live)
    assert _version(client) == "1"
    staged = tmp_path / ".model.new"
    shutil.copytree(second_model, staged)
    tflite = staged / "model.tflite"
    if damage == "truncated_tflite":
        tflite.write_bytes(tflite.read_bytes()[: tflite.stat().st_size // 3])
    elif damage == "garbage_tflite":
        tflite.write_bytes(b"\0" * 4096)
    elif damage == "missing_file":
        tflite.unlink()
    elif damage == "bad_card":
        (staged / "model.json").write_text("{not json", encoding="utf-8")
    else:
        shutil.copy(model_dir / "cam_head.npz", staged / "cam_head.npz")  # v1's head on v2
        card = json.loads((staged / "model.json").read_text(encoding="utf-8"))
        (staged / "model.json").write_text(json.dumps({**card, "version": "2b"}), "utf-8")
    replace_dir(staged, live)
    with caplog.at_level(logging.ERROR, logger="chestct.inference"):
        assert _version(client) == "1"
        assert _version(client) == "1"
    refused = [r for r in caplog.records if "refused the new model" in r.getMessage()]
    assert len(refused) == 1  # logged once per change, not on every request
    assert "still serving version 1" in refused[0].getMessage()
    assert client.get("/ready").status_code == 200


def test_old_card_degrades_clearly(
    tmp_path: Path,
    model_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No inference/cam/ood/temperature: Keras through tf.function, entropy only, logged.

    Runs TensorFlow in this process (the fallback's point), so it sits in a module that runs
    after the tests that fork.
    """
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    card = json.loads((folder / "model.json").read_text(encoding="utf-8"))
    for key in ("inference", "cam", "ood", "temperature", "thresholds"):
        del card[key]
    (folder / "model.json").write_text(json.dumps(card), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="chestct.inference"):
        client = _client(folder)
    assert any("through Keras/TensorFlow" in r.getMessage() for r in caplog.records)
    body = client.post("/predict", **multipart(slice_png(1))).get_json()
    assert body["model"]["backend"] == "keras"
    assert body["uncertainty"]["abstain"] is None
    assert body["uncertainty"]["method"] == "mc_dropout"  # the head comes from the Keras model
    assert body["ood"] == {
        "input_checks": "passed",
        "method": None,
        "score": None,
        "threshold": None,
        "out_of_distribution": None,
    }
    notes = client.get("/metadata").get_json()["notes"]
    assert any("Keras" in n for n in notes) and any("ood" in n for n in notes)
    explain = client.post("/explain", **multipart(slice_png(1)))
    assert explain.status_code == 200 and explain.mimetype == "image/png"


def test_light_model_without_cam_cannot_explain(tmp_path: Path, model_dir: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    card = json.loads((folder / "model.json").read_text(encoding="utf-8"))
    del card["cam"]
    (folder / "model.json").write_text(json.dumps(card), encoding="utf-8")
    client = _client(folder)
    resp = client.post("/explain", **multipart(slice_png(1)))
    assert resp.status_code == 501 and "cam" in resp.get_json()["detail"]
    body = client.post("/predict", **multipart(slice_png(1))).get_json()
    assert body["uncertainty"]["method"] == "entropy"
