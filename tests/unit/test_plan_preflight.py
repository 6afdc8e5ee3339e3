"""`make plan` (chestct.cli.plan) and `make run`/`make repro`'s check before DVC
(chestct.cli.preflight),
and the one-line error a stage prints. The DVC side of both runs in
tests/e2e/test_readme_path.py."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from chestct.cli.plan import changed_params, describe_status, plan, render, upstream_graph
from chestct.cli.preflight import preflight
from chestct.settings import SettingsError
from chestct.tracking import TrackingError

REPO = Path(__file__).resolve().parents[2]


def test_the_graph_follows_outputs_into_deps() -> None:
    graph = upstream_graph(REPO / "dvc.yaml")
    assert graph["ingest"] == set()
    assert graph["train"] == {"validate", "resize", "base-model"}
    assert graph["promote"] == {"validate", "resize", "train", "evaluate"}
    # validate depends on a file inside ingest's output folder
    assert "ingest" in graph["validate"]


def test_a_train_params_change_plans_evaluate_and_promote_too() -> None:
    graph = upstream_graph(REPO / "dvc.yaml")
    status = {"train": [{"changed deps": {"params.yaml": {"train": "modified"}}}]}
    planned = plan(graph, status)
    assert [p.stage for p in planned] == ["train", "evaluate", "promote"]
    assert planned[0].why == "params train (modified)"
    assert planned[1].why == "reads the outputs of train"
    assert planned[2].why == "reads the outputs of train, evaluate"
    text = render(planned, status)
    assert "`dvc status` and `dvc repro --dry` list only train: evaluate, promote run" in text
    assert "Nothing was run." in text


def test_an_up_to_date_pipeline_plans_nothing() -> None:
    assert plan(upstream_graph(REPO / "dvc.yaml"), {}) == []
    assert render([], {}).startswith("Nothing to rerun")


def test_changed_params_are_named_key_by_key(tmp_path: Path) -> None:
    # dvc.lock writes 0.00001 as 1e-05, which PyYAML reads as a string: still equal.
    recorded = {"train": {"epochs": 2, "augment": {"flip": True}, "learning_rate": "1e-05"}}
    lock = {"stages": {"train": {"params": {"params.yaml": recorded}}}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock), encoding="utf-8")
    params = {
        "train": {
            "epochs": 3,
            "augment": {"flip": True},
            "learning_rate": 0.00001,
            "label_smoothing": 0.1,
        }
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    assert changed_params(tmp_path, "train", "train") == [
        "train.epochs (2 -> 3)",
        "train.label_smoothing (- -> 0.1)",
    ]
    entries = [
        {"changed deps": {"params.yaml": {"train": "modified"}, "src/x.py": "modified"}},
        {"changed outs": {"artifacts/train": "deleted"}},
    ]
    assert describe_status(entries, tmp_path, "train") == (
        "params train.epochs (2 -> 3), train.label_smoothing (- -> 0.1)",
        "deps src/x.py (modified)",
        "outs artifacts/train (deleted)",
    )


def _project(tmp_path: Path) -> Path:
    (tmp_path / "config").mkdir()
    shutil.copy2(REPO / "config" / "config.yaml", tmp_path / "config" / "config.yaml")
    shutil.copy2(REPO / "params.yaml", tmp_path / "params.yaml")
    shutil.copy2(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    return tmp_path


def test_preflight_passes_on_the_shipped_settings(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(_project(tmp_path))
    assert "tracking store sqlite:///mlflow.db answers" in preflight(tmp_path)


def test_preflight_names_a_params_typo(tmp_path: Path, monkeypatch) -> None:
    root = _project(tmp_path)
    text = (root / "params.yaml").read_text(encoding="utf-8")
    (root / "params.yaml").write_text(
        text.replace("  learning_rate: 0.001", "  learning_rat: 0.001"), encoding="utf-8"
    )
    monkeypatch.chdir(root)
    with pytest.raises(SettingsError, match="train: unknown key 'learning_rat'"):
        preflight(root)


def test_preflight_names_an_unreachable_tracking_server(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.chdir(_project(tmp_path))
    with pytest.raises(TrackingError, match="unreachable"):
        preflight(tmp_path)


def test_preflight_of_a_single_stage_needs_its_upstream_pointers(
    tmp_path: Path, monkeypatch
) -> None:
    from chestct.pointers import PointerError

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = _project(tmp_path)
    monkeypatch.chdir(root)
    with pytest.raises(PointerError, match="stage 'base-model' has not run here"):
        preflight(root, single=("train",))
    with pytest.raises(SettingsError, match=r"no stage 'trian' in dvc\.yaml"):
        preflight(root, single=("trian",))
    assert "the inputs of ingest are in place" in preflight(root, single=("ingest",))


def _stderr_of(module: str, root: Path) -> subprocess.CompletedProcess:
    env = {
        "PATH": str(Path(sys.executable).parent),
        "PYTHONPATH": str(REPO / "src"),
        "CHESTCT_ROOT": str(root),
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    return subprocess.run(
        [sys.executable, "-m", module], cwd=root, env=env, capture_output=True, text=True
    )


@pytest.mark.parametrize("module", ["chestct.cli.preflight", "chestct.stages.split"])
def test_a_params_error_is_printed_once(tmp_path: Path, module: str) -> None:
    root = _project(tmp_path)
    text = (root / "params.yaml").read_text(encoding="utf-8")
    (root / "params.yaml").write_text(
        text.replace("  mode: keep", "  mode: kept"), encoding="utf-8"
    )
    done = _stderr_of(module, root)
    assert done.returncode == 1
    assert done.stderr.count("split.mode: 'kept' is not allowed") == 1, done.stderr
    assert not (root / "artifacts").exists()  # nothing was emptied or created


def test_make_ui_takes_port_and_host() -> None:
    def dry(*args: str) -> str:
        cmd = ["make", "-n", "-o", "venv", "ui", *args]
        env = {"PATH": "/usr/bin:/bin"}  # no PORT/HOST inherited from the caller
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True).stdout

    default = "mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000"
    assert default in dry()
    assert "--host 0.0.0.0 --port 5001" in dry("PORT=5001", "HOST=0.0.0.0")


def test_what_the_readme_examples_write_is_git_ignored() -> None:
    names = ["slice.png", "slice.dcm", "heatmap.png", "dvc_plots/index.html", ".venv"]
    done = subprocess.run(
        ["git", "check-ignore", "--no-index", *names], cwd=REPO, capture_output=True, text=True
    )
    assert sorted(done.stdout.split()) == sorted(names)
