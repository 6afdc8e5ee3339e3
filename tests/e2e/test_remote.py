"""A real S3 remote (moto's S3 server on 127.0.0.1): one clone pushes, a fresh clone pulls and
finds everything up to date, reruns nothing, and serves model/ without training.

The commands are the README's runbook blocks `remote-push` and `remote-pull`, run verbatim.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest

from project_copy import BIN, pipeline_env, run
from runbook import run_block
from services import free_port, service

pytestmark = pytest.mark.e2e

BUCKET = "chestct-team"
KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """moto's S3 server on a free port of 127.0.0.1, with an empty bucket."""
    import boto3

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    cmd = [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    with service(cmd, log, ready_url=f"{url}/moto-api/"):
        s3 = boto3.client(
            "s3",
            endpoint_url=url,
            region_name="us-east-1",
            aws_access_key_id=KEYS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=KEYS["AWS_SECRET_ACCESS_KEY"],
        )
        s3.create_bucket(Bucket=BUCKET)
        yield url


@pytest.fixture(scope="module")
def clones(
    tiny_project: tuple[Path, dict[str, str]],
    s3_endpoint: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, Path, dict[str, str]]:
    """(pusher, puller, env): the pusher is a copy of the reproduced tiny project that
    committed its dvc.lock and pushed; the puller a fresh `git clone` of it that pulled."""
    source, _ = tiny_project
    pusher = tmp_path_factory.mktemp("pusher") / "chestct"
    shutil.copytree(source, pusher, symlinks=True)
    env = pipeline_env(pusher) | KEYS | {"BUCKET": BUCKET, "S3_ENDPOINT": s3_endpoint}
    run(["git", "add", "dvc.lock", "reports"], pusher, env)  # reports/: git-tracked metrics
    run(["git", "commit", "-qm", "dvc.lock of the reproduced pipeline"], pusher, env)
    run_block("remote-push", pusher, env)

    where = tmp_path_factory.mktemp("puller")
    puller = where / "chestct"
    pull_env = pipeline_env(puller) | KEYS | {"REPO": str(pusher)}
    run_block("remote-pull", where, pull_env)
    return pusher, puller, pull_env


def test_push_put_the_cache_in_the_bucket(clones, s3_endpoint: str) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", **_keys())
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])]
    assert keys and all(k.startswith("chestct/files/md5/") for k in keys)
    assert any(k.endswith(".dir") for k in keys)


def test_the_pulled_clone_is_up_to_date_and_reruns_nothing(clones) -> None:
    _, puller, env = clones
    status = run([str(BIN / "dvc"), "status"], puller, env).stdout
    assert "up to date" in status
    out = run([str(BIN / "dvc"), "repro"], puller, env).stdout
    assert "Running stage" not in out
    assert run(["git", "status", "--porcelain"], puller, env).stdout == ""
    assert not (puller / "mlflow.db").exists()  # nothing ran: no run was recorded


def test_the_pulled_outputs_are_the_pushed_ones(clones) -> None:
    from chestct.pointers import read_pointer
    from chestct.settings import STAGES, load_settings

    pusher, puller, _ = clones
    settings = load_settings(puller)
    for stage in STAGES:
        read_pointer(settings.paths, stage)  # every output matches its digest
        ours = settings.paths.pointer(stage).read_bytes()
        assert ours == (pusher / "artifacts" / stage / "pointer.json").read_bytes()
    for name in ("model.json", "model.keras", "model.tflite", "ood.npz", "cam_head.npz"):
        assert (puller / "model" / name).read_bytes() == (pusher / "model" / name).read_bytes()
    assert not (puller / "model" / "promotion.json").exists()  # run-specific: not in DVC


def test_the_pulled_model_is_served_without_training(clones) -> None:
    import cv2
    import numpy as np

    from chestct.labels import CLASSES
    from chestct.serving import create_app

    _, puller, _ = clones
    app = create_app({"MODEL_DIR": str(puller / "model")})
    client = app.test_client()
    ready = client.get("/ready")
    assert ready.status_code == 200
    card = json.loads((puller / "model" / "model.json").read_text(encoding="utf-8"))
    sha = card["model_sha256"]
    assert ready.get_json()["model"]["version"] == f"sha256-{sha[:12]}"
    ok, buf = cv2.imencode(".png", np.random.default_rng(3).integers(0, 255, (64, 64), np.uint8))
    assert ok
    resp = client.post(
        "/predict",
        data={"file": (io.BytesIO(buf.tobytes()), "x.png")},
        content_type="multipart/form-data",
    )
    assert resp.status_code == 200
    assert resp.get_json()["label"] in CLASSES


def _keys() -> dict[str, str]:
    return {
        "aws_access_key_id": KEYS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": KEYS["AWS_SECRET_ACCESS_KEY"],
    }
