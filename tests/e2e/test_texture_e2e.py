"""A fresh `dvc repro` with base_model.family texture on the tiny config: every stage runs, the
texture model is promoted with its skops file pinned in the card, and the promoted folder
answers /predict and /explain through the Flask test client."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chestct.labels import CLASSES
from project_copy import BIN, TINY, pipeline_env, project_copy, run

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def texture_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("texture-project")
    texture = {"family": "texture", "texture": {"max_iter": 20}}
    override = {**TINY, "base_model": {**TINY["base_model"], **texture}}
    project_copy(root, override)
    env = pipeline_env(root)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        run(cmd, root, env)
    run([str(BIN / "dvc"), "repro"], root, env)
    return root


def test_texture_pipeline_promotes_a_served_texture_model(texture_project: Path) -> None:
    from chestct.fsutil import sha256_file
    from chestct.inference.folder import load_folder
    from chestct.pointers import read_pointer
    from chestct.settings import load_settings

    root = texture_project
    settings = load_settings(root)
    train = read_pointer(settings.paths, "train")
    assert train.output_path("model", root).name == "texture.skops"
    assert train.details["family"] == "texture"
    assert not (root / "artifacts" / "base-model" / "model.keras").exists()  # no CNN built
    metrics = json.loads((root / "reports" / "evaluate" / "metrics.json").read_text())
    assert {"macro_f1", "ece_calibrated", "robust_macro_f1", "shift"} <= set(metrics)
    card = json.loads((root / "model" / "model.json").read_text())
    assert card["family"] == "texture" and card["inference"]["runtime"] == "skops"
    assert card["inference"]["sha256"] == sha256_file(root / "model" / "texture.skops")
    assert card["model_sha256"] == sha256_file(root / "model" / "texture.skops")
    assert load_folder(root / "model").family == "texture"


def test_texture_pipeline_serves_predict_and_explain(texture_project: Path) -> None:
    from chestct.serving import create_app
    from model_folder import ct_slice, encode, multipart

    client = create_app({"MODEL_DIR": str(texture_project / "model")}).test_client()
    resp = client.post("/predict", **multipart(encode(ct_slice(2))))
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert resp.get_json()["label"] in CLASSES
    resp = client.post("/explain", **multipart(encode(ct_slice(2))))
    assert resp.status_code == 200 and resp.mimetype == "image/png"
