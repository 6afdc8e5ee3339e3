"""train.strategy multi_worker: two worker processes on 127.0.0.1 (two "machines": two copies
of a reproduced project, as two clones that pulled the same outputs) train together through
TF_CONFIG; the chief alone writes the model, the pointer and the MLflow run.

The commands are the README's runbook blocks `multi-worker-chief` and `multi-worker-worker`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import yaml

from project_copy import pipeline_env
from runbook import blocks


@pytest.mark.parametrize(
    ("config", "chief", "workers"),
    [
        ({"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 0}}, 1, 2),
        ({"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 1}}, 0, 2),
        (
            {
                "cluster": {"chief": ["c:1"], "worker": ["a:1"]},
                "task": {"type": "worker", "index": 0},
            },
            0,
            2,
        ),
        (
            {
                "cluster": {"chief": ["c:1"], "worker": ["a:1"]},
                "task": {"type": "chief", "index": 0},
            },
            1,
            2,
        ),
    ],
)
def test_the_chief_is_tensorflows_chief(config: dict, chief: int, workers: int) -> None:
    from chestct.model.distributed import worker_role

    role = worker_role("multi_worker", json.dumps(config))
    assert role.chief == bool(chief) and role.workers == workers


def test_tf_config_matters_only_for_multi_worker() -> None:
    from chestct.model.distributed import worker_role

    config = '{"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 1}}'
    assert worker_role("default", config).chief
    assert worker_role("multi_worker", "").chief


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("{not json", "TF_CONFIG is not a TensorFlow cluster description"),
        ('{"cluster": {"worker": ["a:1"]}}', "TF_CONFIG is not a TensorFlow cluster"),
        (
            '{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 1}}',
            "task worker:1 is not in its cluster",
        ),
    ],
)
def test_a_bad_tf_config_is_refused_with_an_example(raw: str, expected: str) -> None:
    from chestct.model.distributed import worker_role
    from chestct.settings import SettingsError

    with pytest.raises(SettingsError, match=expected) as info:
        worker_role("multi_worker", raw)
    assert '"task": {"type": "worker", "index": 0}' in str(info.value)


def _ports(count: int) -> list[int]:
    """`count` distinct free ports (all held open while choosing, so none repeats)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def _snapshot(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `root` (bytecode caches aside)."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


@pytest.fixture(scope="module")
def cluster_run(tiny_project: tuple[Path, dict[str, str]], tmp_path_factory):
    """Both workers run to the end; returns (chief root, worker root, worker snapshot before,
    logs by role)."""
    roots = {}
    for role in ("chief", "worker"):
        root = tmp_path_factory.mktemp(role) / "chestct"
        shutil.copytree(tiny_project[0], root, symlinks=True)
        params = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8"))
        params["train"]["strategy"] = "multi_worker"
        (root / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
        roots[role] = root
    before = _snapshot(roots["worker"])
    hosts = ",".join(f'"127.0.0.1:{port}"' for port in _ports(2))
    procs, logs = {}, {}
    for index, role in enumerate(("chief", "worker")):
        env = pipeline_env(roots[role]) | {
            "TF_CONFIG": (
                f'{{"cluster": {{"worker": [{hosts}]}}, '
                f'"task": {{"type": "worker", "index": {index}}}}}'
            ),
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        logs[role] = roots[role].parent / f"{role}.log"
        with logs[role].open("wb") as out:
            procs[role] = subprocess.Popen(
                ["bash", "-euo", "pipefail", "-c", blocks()[f"multi-worker-{role}"]],
                cwd=roots[role],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
    try:
        for proc in procs.values():
            proc.wait(timeout=900)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()
    text = {role: log.read_text(encoding="utf-8", errors="replace") for role, log in logs.items()}
    for role, proc in procs.items():
        assert proc.returncode == 0, f"{role} exited {proc.returncode}:\n{text[role][-5000:]}"
    return roots["chief"], roots["worker"], before, text


@pytest.mark.e2e
def test_both_workers_train_in_one_cluster(cluster_run) -> None:
    chief, _, _, logs = cluster_run
    assert "worker worker:1 of 2 workers: training on" in logs["worker"]
    assert "worker worker:1 done: 2 epochs" in logs["worker"]
    assert "Running stage 'train'" in logs["chief"]
    pointer = json.loads((chief / "artifacts/train/pointer.json").read_text(encoding="utf-8"))
    assert pointer["details"]["strategy"] == "multi_worker"
    assert pointer["details"]["replicas"] == 2  # one CPU replica on each worker
    assert pointer["metrics"]["epochs_run"] == 2


@pytest.mark.e2e
def test_the_chief_alone_writes_the_model_pointer_and_run(cluster_run) -> None:
    from mlflow import MlflowClient

    from chestct.pointers import read_pointer, read_run_record
    from chestct.settings import load_settings

    chief, worker, before, _ = cluster_run
    assert _snapshot(worker) == before  # the worker wrote nothing at all
    paths = load_settings(chief).paths
    pointer = read_pointer(paths, "train")  # digests match the files
    assert (chief / pointer.outputs["model"].path).is_file()
    record = read_run_record(paths, "train")
    assert record is not None
    client = MlflowClient(tracking_uri=f"sqlite:///{chief / 'mlflow.db'}")
    run = client.get_run(record.mlflow.run_id)
    assert run.data.params["train.strategy"] == "multi_worker"
    assert run.data.tags["chestct.stage"] == "train"
