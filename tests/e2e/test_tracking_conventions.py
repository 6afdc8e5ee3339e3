"""MLflow as its users expect (docs/tracking.md), with a real `dvc repro` of a tiny copy and a
real sqlite store: one parent run per `make run`/`make repro` with the stages nested, runs named
`<stage> <short digest>`, input datasets with digests, the experiment opening in the
model-training view, registered versions described and tagged, and a stage that DVC restores
from its run cache recorded all the same."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from project_copy import pipeline_env, project_copy, run

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def repro(root: Path, *args: str) -> str:
    """`python -m chestct.cli.repro`, as `make run` / `make repro ARGS=…` run it."""
    done = subprocess.run(
        [sys.executable, "-m", "chestct.cli.repro", *args],
        cwd=root,
        env=pipeline_env(root),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = project_copy(tmp_path_factory.mktemp("tracking"))
    env = pipeline_env(root)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "c"]):
        run(cmd, root, env)
    repro(root)
    return root


@pytest.fixture
def client(project: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")


def _runs(client, **filters: str):
    experiment = client.get_experiment_by_name("chestct")
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in filters.items())
    return client.search_runs(
        [experiment.experiment_id], query, order_by=["attributes.start_time DESC"]
    )


def _pointer_digest(root: Path, stage: str) -> str:
    return hashlib.sha256((root / "artifacts" / stage / "pointer.json").read_bytes()).hexdigest()


def test_one_parent_per_repro_with_named_nested_stage_runs(project: Path, client) -> None:
    experiment = client.get_experiment_by_name("chestct")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    (parent,) = _runs(client, **{"chestct.pipeline": "dvc repro"})
    assert parent.info.run_name == "dvc repro" and parent.info.status == "FINISHED"
    children = _runs(client, **{"mlflow.parentRunId": parent.info.run_id})
    names = {r.data.tags["chestct.stage"]: r.info.run_name for r in children}
    stages = ["ingest", "split", "resize", "validate", "base-model", "train", "evaluate"]
    for stage in [*stages, "promote"]:
        assert names[stage] == f"{stage} {_pointer_digest(project, stage)[:7]}"


def test_stages_log_their_input_datasets_with_digests(project: Path, client) -> None:
    (train,) = _runs(client, **{"chestct.stage": "train"})
    inputs = {
        d.dataset.name: (d.dataset.digest, {t.value for t in d.tags})
        for d in train.inputs.dataset_inputs
    }
    assert inputs["validate outputs"] == (_pointer_digest(project, "validate")[:16], {"upstream"})
    assert inputs["base-model outputs"][0] == _pointer_digest(project, "base-model")[:16]
    assert inputs["train split"][1] == {"training"}
    assert inputs["valid split"][1] == {"validation"}
    (evaluate,) = _runs(client, **{"chestct.stage": "evaluate"})
    contexts = {d.dataset.name: {t.value for t in d.tags} for d in evaluate.inputs.dataset_inputs}
    assert contexts["test split"] == {"testing"} and contexts["train outputs"] == {"upstream"}


def test_the_registered_version_says_what_it_was_trained_on(client) -> None:
    (version,) = client.search_model_versions("name = 'chestct'")
    assert version.description.startswith("small_cnn trained on synthetic data")
    assert "macro_f1" in version.description
    assert version.tags["chestct.data_source"] == "synthetic"
    assert version.tags["chestct.family"] == "small_cnn"
    assert float(version.tags["metric.macro_f1"]) >= 0


def test_a_stage_restored_from_the_run_cache_is_recorded(project: Path, client) -> None:
    params = project / "params.yaml"
    original = params.read_text(encoding="utf-8")
    assert original.count("valid_fraction: 0.15") == 1
    params.write_text(original.replace("valid_fraction: 0.15", "valid_fraction: 0.2"), "utf-8")
    repro(project, "split")
    params.write_text(original, encoding="utf-8")
    out = repro(project, "split")  # DVC restores split from its run cache: no stage runs
    assert "Stage 'split' is cached - skipping run" in out
    assert "split: restored by DVC without running; recorded in MLflow" in out
    parent = _runs(client, **{"chestct.pipeline": "dvc repro"})[0]  # the latest
    (recorded,) = _runs(client, **{"chestct.recorded_from": "pointer"})
    assert recorded.data.tags["chestct.stage"] == "split"
    assert recorded.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert recorded.info.run_name == f"split {_pointer_digest(project, 'split')[:7]}"
    assert recorded.data.params["split.valid_fraction"] == "0.15"
    record = (project / "artifacts" / "runs" / "split.json").read_text(encoding="utf-8")
    assert recorded.info.run_id in record  # lineage tags and chestct.cli.compare now find it
