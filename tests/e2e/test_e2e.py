"""The whole pipeline: `dvc repro` in a temporary copy of the repo with tiny params, then
/predict on the promoted model through the Flask test client."""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pytest

from chestct.labels import CLASSES
from chestct.settings import STAGES, MonitorConfig
from project_copy import BIN, run
from shipped import shipped

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def project(tiny_project: tuple[Path, dict[str, str]]) -> tuple[Path, dict[str, str]]:
    """A git + DVC copy of the repo (code, dvc.yaml, config) with tiny params, reproduced."""
    return tiny_project


def test_every_stage_left_a_valid_pointer_and_mlflow_run(project) -> None:
    from chestct.pointers import read_pointer, read_run_record
    from chestct.settings import load_settings

    root, _ = project
    settings = load_settings(root)
    run_ids = set()
    for stage in STAGES:
        read_pointer(settings.paths, stage)  # validates schema and output digests
        record = read_run_record(settings.paths, stage)  # the run that wrote this pointer
        assert record is not None and record.git.sha and record.git.dirty is not None
        assert record.mlflow.run_id
        run_ids.add(record.mlflow.run_id)
        assert settings.paths.stage_log(stage).stat().st_size > 0
        assert settings.paths.stage_log(stage).parent == root / "artifacts" / "runs"
    assert len(run_ids) == len(STAGES)
    train = read_pointer(settings.paths, "train")
    assert {i.stage for i in train.inputs} == {"validate", "base-model"}

    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    client = MlflowClient()
    exp = client.get_experiment_by_name("chestct")
    runs = client.search_runs([exp.experiment_id])
    assert {r.data.tags["chestct.stage"] for r in runs} == set(STAGES)
    assert all(r.data.tags.get("git.sha") for r in runs)
    train_run = next(r for r in runs if r.data.tags["chestct.stage"] == "train")
    assert train_run.data.params["train.epochs"] == "2"
    assert len(client.get_metric_history(train_run.info.run_id, "val_loss")) == 2
    artifacts = {a.path for a in client.list_artifacts(train_run.info.run_id)}
    assert {"train.log", "train.json", "pointer.json"} <= artifacts
    version = client.get_model_version_by_alias("chestct", "champion")
    assert str(version.version) == "1"


def test_model_folder_holds_the_promoted_model_and_card(project) -> None:
    import json

    root, _ = project
    card = json.loads((root / "model" / "model.json").read_text(encoding="utf-8"))
    assert card["classes"] == list(CLASSES)
    assert card["image_size"] == 32
    promotion = json.loads((root / "model" / "promotion.json").read_text(encoding="utf-8"))
    assert promotion["version"] == "1" and promotion["git_sha"]
    assert {"accuracy", "balanced_accuracy", "macro_f1"} <= set(card["metrics"])
    assert len(card["data_digest"]) == 64
    assert (root / "model" / card["model_file"]).is_file()
    metrics = json.loads((root / "reports/evaluate/metrics.json").read_text(encoding="utf-8"))
    assert set(metrics["sensitivity"]) == set(CLASSES)
    assert card["inference"]["parity_max_abs_diff"] <= 1e-4
    assert (root / "model" / card["inference"]["file"]).is_file()


def test_repro_again_is_a_no_op_and_status_clean(project) -> None:
    root, env = project
    out = run([str(BIN / "dvc"), "repro"], root, env).stdout
    assert "didn't change" in out or "up to date" in out
    assert "Running stage" not in out
    status = run([str(BIN / "dvc"), "status"], root, env).stdout
    assert "up to date" in status


def test_predict_on_the_promoted_model(project) -> None:
    from chestct.serving import create_app

    root, _ = project
    app = create_app({"MODEL_DIR": str(root / "model")})
    image = np.random.default_rng(1).integers(0, 255, (70, 90), dtype=np.uint8)
    ok, buf = cv2.imencode(".png", image)
    assert ok
    resp = app.test_client().post(
        "/predict",
        data={"file": (io.BytesIO(buf.tobytes()), "x.png")},
        content_type="multipart/form-data",
    )
    assert resp.status_code == 200
    assert resp.get_json()["label"] in CLASSES


def test_monitor_agrees_with_evaluates_reference(project, tmp_path: Path) -> None:
    """evaluate's reference (Keras outputs, the ingested originals) and what serving measures
    (LiteRT, the decoded upload) agree: slices from the same generator do not drift in the
    acquisition signals, zoomed ones do."""
    import json

    from chestct.data.synthetic import dataset_slice, render_slice
    from chestct.fsutil import sha256_file
    from chestct.monitoring.drift import Thresholds
    from chestct.monitoring.monitor import run_monitor
    from chestct.serving import create_app

    root, _ = project
    model = root / "model"
    card = json.loads((model / "model.json").read_text(encoding="utf-8"))
    assert card["monitoring"]["sha256"] == sha256_file(model / card["monitoring"]["file"])

    def zoomed(img: np.ndarray) -> np.ndarray:
        n = img.shape[0]
        k, o = int(n * 0.6), (n - int(n * 0.6)) // 2
        return cv2.resize(img[o : o + k, o : o + k], (n, n), interpolation=cv2.INTER_LINEAR)

    def sample(i: int) -> np.ndarray:
        # New slices drawn as the tiny project's own were (one slice per patient); that
        # `python -m chestct.cli.samples` monitors clean against the default's reference is
        # tests/unit/test_samples.py's.
        seq = np.random.SeedSequence([700_001, i])
        image = dataset_slice(CLASSES[i % 4], seq)
        return image if image.ndim == 2 else np.ascontiguousarray(image[..., 0])

    def zoomed_render(i: int) -> np.ndarray:
        return zoomed(render_slice(CLASSES[i % 4], np.random.default_rng(700_000 + i)))

    reports = {}
    for name, make in (("same", sample), ("zoom", zoomed_render)):
        db = tmp_path / name / "audit.sqlite"
        app = create_app({"MODEL_DIR": str(model), "AUDIT_LOG": True, "AUDIT_DB": str(db)})
        client = app.test_client()
        for i in range(60):
            img = make(i)
            ok, buf = cv2.imencode(".png", img)
            assert ok
            resp = client.post("/predict", data=buf.tobytes(), content_type="image/png")
            assert resp.status_code == 200, resp.get_json()
        reports[name] = run_monitor(
            db=db,
            model_dir=model,
            out_dir=tmp_path / name,
            thresholds=Thresholds.from_config(shipped(MonitorConfig)),
            last=None,
            since=None,
        )
    # chestct.cli.samples exports its slices as ingest's synthetic files are (180-520 px wide,
    # 0.6-1.0 of that high): every acquisition signal agrees, the size and aspect too.
    acquisition = {"mean_grey", "input_side", "foreground", "body_share", "body_aspect"}
    acquisition |= {"background", "body_p50"}
    assert not acquisition & set(reports["same"]["drifted"]), reports["same"]
    assert {"foreground", "body_share"} <= set(reports["zoom"]["drifted"]), reports["zoom"][
        "drifted"
    ]
    assert reports["same"]["not_in_reference"] == []
