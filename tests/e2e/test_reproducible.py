"""What DVC tracks is a function of deps and params: a fresh clone that runs the pipeline
reproduces the committed dvc.lock byte for byte, and `git status` stays clean.

The first run is the session's tiny project; the second is a fresh git copy of the same code
and params with the first run's dvc.lock committed, as a teammate's clone would be.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from chestct.settings import STAGES
from project_copy import BIN, pipeline_env, project_copy, run
from shipped import shipped


def test_saved_model_bytes_do_not_depend_on_the_time(tmp_path: Path, monkeypatch) -> None:
    """Keras stamps a .keras zip with the time; save_model() does not."""
    import time
    import zipfile

    from chestct.model.modeling import build_model, load_model, save_model
    from chestct.settings import BaseModelParams

    model = build_model(shipped(BaseModelParams, filters=[4]), image_size=16, seed=0)
    first = save_model(model, tmp_path / "a" / "model.keras").read_bytes()
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 86_400 * 400)  # a year later
    second = save_model(model, tmp_path / "b" / "model.keras").read_bytes()
    assert first == second
    with zipfile.ZipFile(tmp_path / "b" / "model.keras") as zf:
        assert {i.date_time for i in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}
        config = zf.read("config.json").decode("utf-8")
    # Keras names shared objects by memory address, which differs in every process.
    shared = {int(n) for n in re.findall(r'"shared_object_id": (\d+)', config)}
    assert shared and shared == set(range(1, len(shared) + 1))
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["model.keras"]  # no temp left
    back = load_model(tmp_path / "b" / "model.keras")
    assert [w.tolist() for w in back.get_weights()] == [w.tolist() for w in model.get_weights()]


def _outs(lock: dict) -> dict[str, dict[str, str]]:
    """{stage: {out path: md5}} from a parsed dvc.lock."""
    return {
        stage: {out["path"]: out["md5"] for out in entry.get("outs", [])}
        for stage, entry in lock["stages"].items()
    }


@pytest.fixture(scope="module")
def second(
    tiny_project: tuple[Path, dict[str, str]], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """(first, second): the second a fresh clone with the first's dvc.lock, reproduced."""
    first, _ = tiny_project
    root = project_copy(tmp_path_factory.mktemp("second"))
    shutil.copy2(first / "dvc.lock", root / "dvc.lock")
    # The git-tracked metrics and plot tables (cache: false) come with a clone, like dvc.lock.
    shutil.copytree(first / "reports", root / "reports")
    env = pipeline_env(root)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "clone"]):
        run(cmd, root, env)
    run([str(BIN / "dvc"), "repro"], root, env)
    return first, root


@pytest.mark.e2e
def test_a_fresh_clone_reproduces_the_committed_dvc_lock(second: tuple[Path, Path]) -> None:
    first, root = second
    env = pipeline_env(root)
    ours = yaml.safe_load((root / "dvc.lock").read_text(encoding="utf-8"))
    theirs = yaml.safe_load((first / "dvc.lock").read_text(encoding="utf-8"))
    assert _outs(ours) == _outs(theirs)
    assert set(_outs(ours)) == set(STAGES)
    assert run(["git", "status", "--porcelain"], root, env).stdout == ""
    assert "up to date" in run([str(BIN / "dvc"), "status"], root, env).stdout


@pytest.mark.e2e
def test_the_run_specific_record_differs_and_is_not_tracked(second: tuple[Path, Path]) -> None:
    import json

    first, root = second
    for stage in ("train", "promote"):
        a = json.loads((first / "artifacts" / "runs" / f"{stage}.json").read_text("utf-8"))
        b = json.loads((root / "artifacts" / "runs" / f"{stage}.json").read_text("utf-8"))
        assert a["mlflow"]["run_id"] != b["mlflow"]["run_id"]
        assert a["pointer_digest"] == b["pointer_digest"]  # the same pointer, another run
    for name in ("model.keras", "model.json", "model.tflite", "ood.npz", "cam_head.npz"):
        assert (first / "model" / name).read_bytes() == (root / "model" / name).read_bytes()
    a = json.loads((first / "model" / "promotion.json").read_text("utf-8"))
    b = json.loads((root / "model" / "promotion.json").read_text("utf-8"))
    assert a["mlflow_run_ids"]["train"] != b["mlflow_run_ids"]["train"]


@pytest.mark.e2e
def test_an_incremental_resize_writes_the_pointer_a_fresh_run_wrote(
    second: tuple[Path, Path],
) -> None:
    """A forced rerun of resize reuses every image; its pointer, which DVC hashes, must be the
    one the fresh run wrote (how many images a run made or reused goes to MLflow only), or a
    dvc.lock committed after an incremental run would not match a fresh clone's."""
    _, root = second
    env = pipeline_env(root)
    pointer = root / "artifacts" / "resize" / "pointer.json"
    before = pointer.read_bytes()
    run([str(BIN / "dvc"), "repro", "-f", "-s", "resize"], root, env)
    assert pointer.read_bytes() == before
    assert run(["git", "status", "--porcelain"], root, env).stdout == ""
