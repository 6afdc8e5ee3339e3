"""One MLflow parent run per `dvc repro`: `python -m chestct.cli.repro [dvc repro arguments]`.

`make run` and `make repro` run the pipeline through this. It opens a run named
`dvc repro <arguments>`, hands its id to the stages in CHESTCT_PIPELINE_RUN (DVC passes the
environment on to every stage command), so that each stage's run nests under it, and runs
`dvc repro`. Afterwards it records, nested under the same parent, every stage whose outputs no
MLflow run recorded: those DVC restored from its run cache without running the stage. A bare
`dvc repro` or `dvc exp run` has no parent; its stages are top-level runs, and a later stage
still records upstream stages restored from the run cache (chestct.runner).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from chestct.pointers import git_state
from chestct.runner import record_missing_runs
from chestct.settings import STAGES, SettingsError, load_settings
from chestct.tracking import (
    PARENT_ENV,
    TrackingError,
    check_store,
    mark_experiment,
    quiet_environment,
)


class ReproError(RuntimeError):
    """dvc cannot be found in this Python's environment nor on PATH."""


def dvc_path() -> tuple[str, str]:
    """The dvc executable and a PATH that starts with this interpreter's bin/:
    `.venv/bin/python -m chestct.cli.repro` works without an activated venv, and the stages'
    `python -m chestct.stages.*` (dvc.yaml) run in the same environment as this command."""
    bin_dir = str(Path(sys.executable).parent)
    path = os.pathsep.join([bin_dir, os.environ.get("PATH", "")])
    dvc = shutil.which("dvc", path=path)
    if dvc is None:
        raise ReproError(
            f"dvc is not installed next to {sys.executable} nor on PATH; run `make venv` (or "
            "`pip install -r requirements.txt` in this environment), then try again"
        )
    return dvc, path


def repro(args: list[str]) -> int:
    """Run `dvc repro *args` under a parent MLflow run; returns dvc's exit code."""
    quiet_environment()
    settings = load_settings()
    check_store(settings.tracking_uri, settings.config.tracking.connect_timeout_s)
    dvc, path = dvc_path()  # before a parent run is opened for nothing

    import mlflow

    mlflow.set_tracking_uri(settings.tracking_uri)
    experiment = mlflow.set_experiment(settings.config.tracking.experiment)
    mark_experiment(experiment.experiment_id)
    git = git_state(settings.paths.root)
    tags = {"chestct.pipeline": "dvc repro"}
    if git.sha:
        tags |= {"git.sha": git.sha, "mlflow.source.git.commit": git.sha}
    name = " ".join(["dvc repro", *args])
    with mlflow.start_run(run_name=name, tags=tags) as parent:
        os.environ[PARENT_ENV] = parent.info.run_id
        try:
            ran = subprocess.run([dvc, "repro", *args], env={**os.environ, "PATH": path})
            code = ran.returncode
            recorded = record_missing_runs(settings, STAGES)
        finally:
            del os.environ[PARENT_ENV]
        if recorded:
            print(
                f"chestct repro: {', '.join(recorded)}: restored by DVC without running; "
                "recorded in MLflow from their pointers"
            )
        mlflow.set_tag("chestct.recorded_from_pointer", ",".join(recorded) or "none")
        if code != 0:
            mlflow.end_run("FAILED")
    return code


def main() -> None:
    try:
        code = repro(sys.argv[1:])
    except (SettingsError, TrackingError, ReproError) as exc:
        print(f"chestct repro: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    raise SystemExit(code)


if __name__ == "__main__":
    main()
