"""A newcomer's first hour, in a temporary copy of the project: the documented commands for the
Quick start (README.md), dry runs and a failed stage (docs/pipeline.md), an experiment and the
way back (docs/experiments.md), run as printed.

Commands are taken from README.md and the docs pages (tests/runbook.py;
tests/unit/test_readme_commands.py lists which test runs which).
Two things differ from a user's shell, both for the shared test machine: `make` gets
`-o venv` (the copy's `.venv` is a link to this environment, which must not be reinstalled), and
servers get a free port instead of 8000/5000. The tests run in file order on one copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from chestct.labels import CLASSES
from chestct.modelcard import card_version, with_promotion
from project_copy import pipeline_env, project_copy, run
from runbook import readme_commands

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
TRAIN_LR = "\n  learning_rate: 0.001\n"  # train.learning_rate as project_copy writes params.yaml


def readme(section: str, *starts: str) -> list[str]:
    """The README's commands under `section` that start with one of `starts`, in order."""
    found = [c for _, c in readme_commands(section) if c.startswith(starts)]
    assert found, f"README has no {starts} command under {section!r}"
    return found


def readme_one(section: str, command: str) -> str:
    """One exact README command (fails when the README no longer has it)."""
    assert command in [c for _, c in readme_commands(section)], f"{command!r} not in {section}"
    return command


def shell(command: str, root: Path, env: dict[str, str], ok: bool = True):
    """Run a README line through bash in the copy; `make` without reinstalling .venv."""
    if command.startswith("make "):
        command = "make -o venv " + command.removeprefix("make ")
    done = subprocess.run(
        ["bash", "-c", command], cwd=root, env=env, capture_output=True, text=True, timeout=900
    )
    if ok:
        assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


# Run-specific records that DVC does not track (README "Scaling out"): a way back restores
# everything else byte for byte, and these are read only when they match what was restored.
UNTRACKED = ("artifacts/runs/", "model/promotion.json")


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under artifacts/ and model/ that DVC tracks."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for folder in ("artifacts", "model")
        for p in sorted((root / folder).rglob("*"))
        if p.is_file() and not str(p.relative_to(root)).startswith(UNTRACKED)
    }


def served_version(root: Path) -> str:
    """The version the predictor would report for model/."""
    card = json.loads((root / "model" / "model.json").read_text())
    return card_version(with_promotion(root / "model", card)[0])


def git_status(root: Path, env: dict[str, str]) -> str:
    return run(["git", "status", "--porcelain"], root, env).stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url: str, proc: subprocess.Popen, log: Path, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        assert time.monotonic() < deadline, f"{url} did not answer in {seconds} s"
        time.sleep(0.5)


def background(command: str, root: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    """A README command started in its own session (so `stop` ends its children), output to log."""
    with log.open("wb") as out:
        return subprocess.Popen(
            ["bash", "-c", command],
            cwd=root,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop(proc: subprocess.Popen) -> None:
    """Stop a server started in its own process group (make and its gunicorn, or mlflow)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A committed git + DVC copy with tiny params, after the README's `make run`."""
    root = project_copy(tmp_path_factory.mktemp("newcomer"))
    (root / "Makefile").write_bytes((REPO / "Makefile").read_bytes())
    (root / ".venv").symlink_to(Path(sys.executable).parent.parent)  # git-ignored
    env = pipeline_env(root)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        run(cmd, root, env)
    made = shell(readme_one("## Quick start", "make run"), root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "baseline"], root, env)
    return {"root": root, "env": env, "make_run": made.stdout}


def test_make_run_reproduces_and_prints_the_decision(project) -> None:
    root, env = project["root"], project["env"]
    out = project["make_run"]
    assert "chestct preflight: params.yaml and config/config.yaml are valid" in out
    assert "Promotion decision:\n  promoted (first model): no champion" in out
    assert "python -m chestct.cli.samples" in out
    assert json.loads((root / "model" / "promotion.json").read_text())["version"] == "1"
    assert git_status(root, env) == ""


def test_quick_start_serve_samples_curl_and_mlflow_ui(project, tmp_path: Path) -> None:
    root, env = project["root"], project["env"]
    port, ui_port = free_port(), free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    serve = readme_one("## Quick start", "make serve")
    server = background(f"make -o venv {serve.removeprefix('make ')} PORT={port}", root, env, log)
    try:
        wait_for(f"{base}/ready", server, log)
        (samples,) = readme("## Quick start", ".venv/bin/python -m chestct.cli.samples")
        written = shell(samples, root, env).stdout
        assert "slice.png: a synthetic squamous_cell_carcinoma slice (seed 0)" in written
        (curl,) = readme("## Quick start", "curl ")
        answer = json.loads(shell(curl.replace("http://127.0.0.1:8000", base), root, env).stdout)
        assert answer["label"] in CLASSES and answer["model"]["version"] == "1"
        loads = [line for line in log.read_text().splitlines() if "serving model chestct" in line]
        assert loads and all("version 1 (train run " in line for line in loads)
        assert all(f"from {root / 'model'}" in line for line in loads)

        (ui,) = readme("## Quick start", ".venv/bin/mlflow ui")
        ui_log = tmp_path / "ui.log"
        mlflow_ui = background(f"{ui} --port {ui_port}", root, env, ui_log)
        try:
            url = f"http://127.0.0.1:{ui_port}"
            wait_for(url, mlflow_ui, ui_log)
            query = "/api/2.0/mlflow/experiments/get-by-name?experiment_name=chestct"
            with urllib.request.urlopen(url + query, timeout=30) as resp:
                assert json.load(resp)["experiment"]["name"] == "chestct"
        finally:
            stop(mlflow_ui)
    finally:
        stop(server)
    # slice.png and slice.dcm landed in the project folder, git-ignored.
    assert (root / "slice.png").is_file() and (root / "slice.dcm").is_file()
    assert git_status(root, env) == ""


def test_dry_run_block_on_an_up_to_date_pipeline(project) -> None:
    root, env = project["root"], project["env"]
    before = snapshot(root)
    section = "### Dry runs"
    for command in ("dvc repro", "dvc repro train", "dvc repro -s train"):
        out = shell(readme_one(section, command), root, env).stdout
        assert "Running stage" not in out, (command, out)
    for command in ("dvc repro --downstream train", "dvc repro --keep-going"):
        out = shell(readme_one(section, command), root, env).stdout
        assert "Running stage" not in out, (command, out)
    metrics = shell(readme_one(section, "dvc metrics show"), root, env).stdout
    assert "macro_f1" in metrics
    shell(readme_one(section, "dvc plots show"), root, env)
    assert (root / "dvc_plots" / "index.html").is_file()
    assert snapshot(root) == before
    assert git_status(root, env) == ""  # dvc_plots/ is git-ignored


def _edit_params(root: Path, old: str, new: str) -> None:
    params = root / "params.yaml"
    text = params.read_text(encoding="utf-8")
    assert text.count(old) == 1, old
    params.write_text(text.replace(old, new), encoding="utf-8")


def test_make_plan_names_the_downstream_stages_and_runs_nothing(project) -> None:
    root, env = project["root"], project["env"]
    before = snapshot(root)
    section = "### Dry runs"
    _edit_params(root, TRAIN_LR, "\n  learning_rate: 0.0005\n")
    try:
        planned = shell(readme_one(section, "make plan"), root, env).stdout
        status = shell(readme_one(section, "dvc status"), root, env).stdout
        dry = shell(readme_one(section, "dvc repro --dry"), root, env).stdout
    finally:
        run(["git", "checkout", "--", "params.yaml"], root, env)
    assert "`dvc repro` would run 3 stage(s), in this order:" in planned
    assert "  train     params train.learning_rate (0.001 -> 0.0005)\n" in planned
    assert "  evaluate  reads the outputs of train\n" in planned
    assert "  promote   reads the outputs of train, evaluate\n" in planned
    # What the README says DVC's own answers leave out.
    assert "train:" in status and "evaluate:" not in status and "promote:" not in status
    assert "Stage 'evaluate' didn't change, skipping" in dry
    assert snapshot(root) == before
    assert git_status(root, env) == ""


def test_a_params_typo_through_make_repro_leaves_artifacts_intact(project) -> None:
    root, env = project["root"], project["env"]
    before = snapshot(root)
    _edit_params(root, TRAIN_LR, "\n  learning_rat: 0.001\n")
    try:
        done = shell(readme_one("### Dry runs", "make repro"), root, env, ok=False)
    finally:
        run(["git", "checkout", "--", "params.yaml"], root, env)
    assert done.returncode != 0
    message = "chestct preflight: params.yaml: train: unknown key 'learning_rat'"
    assert done.stderr.count(message) == 1, done.stderr
    assert "Running stage" not in done.stdout
    assert snapshot(root) == before


def test_dvc_repro_after_a_typo_loses_train_and_dvc_checkout_restores(project) -> None:
    root, env = project["root"], project["env"]
    before = snapshot(root)
    _edit_params(root, TRAIN_LR, "\n  learning_rat: 0.001\n")
    try:
        done = shell("dvc repro", root, env, ok=False)
    finally:
        run(["git", "checkout", "--", "params.yaml"], root, env)
    assert done.returncode != 0
    assert done.stderr.count("train: unknown key 'learning_rat'") == 1, done.stderr
    # What the README warns about: DVC deleted train's outputs before the stage failed.
    assert not (root / "artifacts" / "train" / "pointer.json").exists()
    shell(
        readme_one("### Dry runs", "dvc checkout train && git checkout -- reports/train"),
        root,
        env,
    )
    assert snapshot(root) == before
    assert "up to date" in shell("dvc status", root, env).stdout
    assert git_status(root, env) == ""


def test_an_experiment_and_the_way_back(project) -> None:
    root, env = project["root"], project["env"]
    baseline = snapshot(root)
    section = "## Experiments and comparison"
    way_back = readme_one(section, "python -m chestct.cli.restore")
    apply = readme_one(section, "dvc exp apply <name>")

    shell(readme_one(section, "dvc exp run -S train.learning_rate=0.0003"), root, env)
    (show,) = readme(section, "dvc exp show ")
    # A wide terminal, as a user reading it would have; DVC cuts columns to $COLUMNS.
    table = shell(show + " --no-pager", root, {**env, "COLUMNS": "250"}).stdout
    assert "macro_f1" in table and "train.learning_rate" in table and "sensitivity" not in table
    everything = shell(readme_one(section, "dvc exp show"), root, {**env, "COLUMNS": "250"})
    assert "Experiment" in everything.stdout  # the full table, cut to the terminal's width
    # The experiment stays in the workspace, modified but not staged (README says so).
    status = git_status(root, env).splitlines()
    assert " M params.yaml" in status and " M dvc.lock" in status, status
    shell(way_back, root, env)
    assert git_status(root, env) == ""
    assert snapshot(root) == baseline
    assert "up to date" in shell("dvc status", root, env).stdout

    # An experiment that surely wins promotion (roc_auc differs between two trained models; the
    # margin lets a worse one win): model/ changes, and the way back must restore it too.
    shell(
        "dvc exp run -n won -S train.learning_rate=0.0003 -S promote.metric=roc_auc "
        "-S promote.margin=-0.99",
        root,
        env,
    )
    decision = json.loads((root / "artifacts/promote/decision.json").read_text())
    assert decision["promote"], decision["reason"]
    won = snapshot(root)
    assert won["model/model.keras"] != baseline["model/model.keras"]
    won_version = served_version(root)
    assert not won_version.startswith("sha256-")
    shell(way_back, root, env)
    assert git_status(root, env) == ""
    assert snapshot(root) == baseline
    # promotion.json still describes the experiment's model: it must not name the restored one.
    assert served_version(root) != won_version

    shell(apply.replace("<name>", "won"), root, env)
    assert snapshot(root) == won
    shell(way_back, root, env)
    assert git_status(root, env) == ""
    assert snapshot(root) == baseline


def test_forced_ingest_reruns_ingest_alone(project) -> None:
    root, env = project["root"], project["env"]
    out = shell(readme_one("### Dry runs", "dvc repro -f -s ingest"), root, env).stdout
    assert "Running stage 'ingest'" in out
    assert out.count("Running stage") == 1


def test_metrics_and_plots_compare_commits_without_a_cache(project) -> None:
    """The tracking page's `dvc metrics diff HEAD~1` and `dvc plots diff HEAD~1`: the metrics
    and plot tables are git-tracked (reports/, `cache: false`), so DVC reads the previous
    commit's from git. An experiment committed on top of the baseline is compared with it;
    then the baseline comes back."""
    root, env = project["root"], project["env"]
    baseline = snapshot(root)
    shell("dvc exp run -S train.learning_rate=0.0003", root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "learning rate 0.0003"], root, env)
    section = "### DVC: metrics and plots that compare commits"
    try:
        diff = shell(readme_one(section, "dvc metrics diff HEAD~1"), root, env)
        out = diff.stdout + diff.stderr
        assert "reports/evaluate/metrics.json" in diff.stdout, out
        # Both columns read: the committed previous figures and this commit's (what changed).
        assert "HEAD~1" in diff.stdout and "ci.ece.high" in diff.stdout, out
        assert "failed to load" not in out, out
        shell(readme_one(section, "dvc plots diff HEAD~1"), root, env)
        page = (root / "dvc_plots" / "index.html").read_text(encoding="utf-8")
        # Both revisions drawn, from the offline template (no CDN script).
        assert "HEAD~1" in page and "workspace" in page and "chestct plots" in page
        assert "cdn.jsdelivr" not in page
    finally:
        shutil.rmtree(root / "dvc_plots", ignore_errors=True)
        run(["git", "reset", "-q", "--hard", "HEAD~1"], root, env)
        shell("python -m chestct.cli.restore", root, env)
    assert git_status(root, env) == ""
    assert snapshot(root) == baseline
