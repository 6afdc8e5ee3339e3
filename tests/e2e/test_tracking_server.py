"""A live MLflow tracking server, started as `make tracking-server` starts it: the pipeline,
the registry aliases and `python -m chestct.cli.compare` over HTTP, with a sqlite backend and with
PostgreSQL (a throw-away cluster on 127.0.0.1, where Debian's postgresql is installed).

The client commands are the README's runbook blocks `tracking-run` and `tracking-compare`.
"""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from project_copy import BIN, REPO, pipeline_env, run
from runbook import run_block
from services import free_port, require_program, service

pytestmark = pytest.mark.e2e


def server_command(**variables: str) -> tuple[list[str], dict[str, str]]:
    """The command `make tracking-server` runs with these variables, as make prints it, and
    the environment it sets (leading NAME=value words)."""
    args = [f"{k}={v}" for k, v in variables.items()]
    proc = subprocess.run(
        ["make", "--no-print-directory", "-n", "-o", "venv", "tracking-server", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    words = shlex.split(proc.stdout.replace("\\\n", " "))
    assignments = {}
    while "=" in words[0] and not words[0].startswith("-"):
        name, value = words.pop(0).split("=", 1)
        assignments[name] = value
    assert words[:2] == ["mlflow", "server"], proc.stdout
    return [str(BIN / "mlflow"), *words[1:]], assignments


def _server_env(assignments: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return env | assignments | {"PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}"}


def _copy(tiny_project: tuple[Path, dict[str, str]], where: Path) -> Path:
    """A copy of the reproduced tiny project with no champion in model/ and no local store."""
    root = where / "chestct"
    shutil.copytree(tiny_project[0], root, symlinks=True)
    for name in ("model", "mlruns"):
        shutil.rmtree(root / name)
    (root / "mlflow.db").unlink()
    return root


def _set_epochs(root: Path, epochs: int) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8"))
    params["train"]["epochs"] = epochs
    # Two tiny models can tie on macro-F1 and a tie registers nothing (README "Promotion"):
    # ECE (lower is better, `minimum` a ceiling) differs between the runs, so the second
    # registers version 2 whether it wins or not.
    params["promote"]["metric"] = "ece"
    params["promote"]["minimum"] = 1.0
    (root / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")


def test_make_tracking_server_binds_to_localhost_with_sql_and_proxied_artifacts() -> None:
    cmd, env = server_command()
    assert env == {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--backend-store-uri") + 1].startswith("sqlite:///")
    assert "--serve-artifacts" in cmd and "--artifacts-destination" in cmd


# --------------------------------------------------------------------------- sqlite backend


@pytest.fixture(scope="module")
def sqlite_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """(url, artifacts folder) of a live server with a sqlite backend."""
    where = tmp_path_factory.mktemp("tracking")
    port = free_port()
    cmd, assignments = server_command(
        TRACKING_PORT=str(port),
        TRACKING_BACKEND=f"sqlite:///{where / 'server.db'}",
        TRACKING_ARTIFACTS=str(where / "artifacts"),
        TRACKING_WORKERS="1",
    )
    url = f"http://127.0.0.1:{port}"
    env = _server_env(assignments)
    with service(cmd, where / "server.log", f"{url}/health", env=env, cwd=where):
        yield url, where / "artifacts"


@pytest.fixture(scope="module")
def two_runs(
    tiny_project: tuple[Path, dict[str, str]],
    sqlite_server: tuple[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, dict[str, str], str]:
    """The runbook's `tracking-run` twice (train.epochs 1, then 3) against the server."""
    root = _copy(tiny_project, tmp_path_factory.mktemp("client"))
    url, _ = sqlite_server
    env = pipeline_env(root) | {"TRACKING_PORT": url.rsplit(":", 1)[1]}
    outputs = []
    for epochs in (1, 3):
        _set_epochs(root, epochs)
        outputs.append(run_block("tracking-run", root, env).stdout)
    for out in outputs:
        for stage in ("train", "evaluate", "promote"):
            assert f"Running stage '{stage}'" in out
        assert "Running stage 'ingest'" not in out
    return root, env, url


def test_stages_log_runs_metrics_and_proxied_artifacts_to_the_server(
    two_runs, sqlite_server: tuple[str, Path]
) -> None:
    from mlflow import MlflowClient

    root, _, url = two_runs
    client = MlflowClient(tracking_uri=url, registry_uri=url)
    experiment = client.get_experiment_by_name("chestct")
    assert experiment.artifact_location.startswith("mlflow-artifacts:")
    runs = client.search_runs([experiment.experiment_id])
    stages = sorted(r.data.tags["chestct.stage"] for r in runs)
    assert stages == ["evaluate", "evaluate", "promote", "promote", "train", "train"]
    train = [r for r in runs if r.data.tags["chestct.stage"] == "train"]
    assert sorted(r.data.params["train.epochs"] for r in train) == ["1", "3"]
    for r in train:
        history = client.get_metric_history(r.info.run_id, "val_loss")
        assert len(history) == int(r.data.params["train.epochs"])
    # Artifacts went through the server into its artifacts folder, not to the client's disk.
    _, artifacts = sqlite_server
    logged = {p.name for p in artifacts.rglob("*") if p.is_file()}
    assert {"train.log", "train.json", "pointer.json", "curves.png", "model.json"} <= logged
    assert not (root / "mlruns").exists() and not (root / "mlartifacts").exists()
    # The run records name the server's runs.
    from chestct.pointers import read_run_record
    from chestct.settings import load_settings

    record = read_run_record(load_settings(root).paths, "train")
    assert record is not None and record.mlflow.tracking_uri == url
    assert record.mlflow.run_id in {r.info.run_id for r in train}


def test_registry_versions_and_aliases_live_on_the_server(two_runs) -> None:
    import json

    from mlflow import MlflowClient

    root, _, url = two_runs
    client = MlflowClient(tracking_uri=url, registry_uri=url)
    versions = {v.version for v in client.search_model_versions("name='chestct'")}
    assert versions == {"1", "2"}
    champion = client.get_model_version_by_alias("chestct", "champion")
    # The first run had no champion in model/ and was promoted; the second beat it or not.
    aliases = {v: client.get_model_version("chestct", v).aliases for v in versions}
    assert aliases in ({"1": ["champion"], "2": ["challenger"]}, {"1": [], "2": ["champion"]})
    promotion = json.loads((root / "model" / "promotion.json").read_text(encoding="utf-8"))
    assert promotion["version"] == champion.version
    assert promotion["registered"]["alias"] == "champion"


def test_compare_reads_the_server(two_runs) -> None:
    root, env, _ = two_runs
    out = run_block("tracking-compare", root, env).stdout
    epochs = next(line.split() for line in out.splitlines() if "train.epochs" in line)
    values = epochs[epochs.index("train.epochs") + 1 :]
    assert values[:2] == ["1", "3"], out
    assert any("A: champion" in line for line in out.splitlines()), out


# --------------------------------------------------------------------------- PostgreSQL


def _pg_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    path = str(found[-1]) if found else "initdb"
    return Path(require_program(path, "Debian package postgresql")).parent


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A throw-away PostgreSQL cluster on 127.0.0.1 with a database `mlflow`; its URI.

    PostgreSQL refuses to run as root (CI runs as root): then the cluster belongs to the
    `postgres` user that Debian's package creates, and its commands run through runuser.
    """
    bindir = _pg_bin()
    folder = Path(tempfile.mkdtemp(prefix="chestct-pg-"))
    prefix: list[str] = []
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(folder, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    data, port = folder / "data", free_port()

    def pg(*cmd: str) -> None:
        proc = subprocess.run(
            [*prefix, *cmd], capture_output=True, text=True, timeout=120, cwd=folder
        )
        assert proc.returncode == 0, f"{cmd[0]} failed:\n{proc.stdout}\n{proc.stderr}"

    try:
        pg(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {folder}"
        pg(str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(folder / "pg.log"),
           "-w", "start")  # fmt: skip
        try:
            pg(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
               "mlflow")  # fmt: skip
            # SQLAlchemy 2.1 takes psycopg (3) for a bare postgresql://; psycopg2 is pinned.
            yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/mlflow"
        finally:
            pg(str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_postgres_backend_holds_runs_and_the_registry(
    postgres: str,
    tiny_project: tuple[Path, dict[str, str]],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    import psycopg2
    from mlflow import MlflowClient

    where = tmp_path_factory.mktemp("tracking-pg")
    port = free_port()
    cmd, assignments = server_command(
        TRACKING_PORT=str(port),
        TRACKING_BACKEND=postgres,
        TRACKING_ARTIFACTS=str(where / "artifacts"),
        TRACKING_WORKERS="1",
    )
    url = f"http://127.0.0.1:{port}"
    root = _copy(tiny_project, where)
    env = pipeline_env(root) | {"TRACKING_PORT": str(port)}
    server_env = _server_env(assignments)
    with service(cmd, where / "server.log", f"{url}/health", env=server_env, cwd=where):
        out = run_block("tracking-run", root, env).stdout  # promote reruns: model/ is gone
        assert "Running stage 'promote'" in out
        client = MlflowClient(tracking_uri=url, registry_uri=url)
        champion = client.get_model_version_by_alias("chestct", "champion")
        assert champion.version == "1"
        run_id = champion.run_id
    with psycopg2.connect(postgres.replace("+psycopg2", "")) as conn, conn.cursor() as cur:
        cur.execute("SELECT name, alias, version FROM registered_model_aliases")
        assert cur.fetchall() == [("chestct", "champion", 1)]
        cur.execute("SELECT count(*) FROM runs WHERE run_uuid = %s", (run_id,))
        assert cur.fetchone() == (1,)
    assert run([str(BIN / "dvc"), "status"], root, env).stdout.strip().endswith("up to date.")
