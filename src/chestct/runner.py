"""What every stage's main() shares: settings, a clean output folder, logging, the MLflow run,
the pointer and the run record. A stage's real work lives in its run_<stage>() function, which
knows none of this.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from chestct.data.manifest import ManifestError
from chestct.fsutil import reset_dir, sha256_file
from chestct.pointers import (
    Pointer,
    PointerError,
    TrackingRef,
    git_state,
    make_input,
    make_output,
    make_run_record,
    read_pointer,
    read_run_record,
    write_pointer,
    write_run_record,
)
from chestct.settings import STAGES, Settings, SettingsError, load_settings
from chestct.tracking import (
    TrackingError,
    check_store,
    environment_report,
    flatten,
    manifest_dataset,
    mark_experiment,
    pointer_dataset,
    quiet_environment,
    run_name,
    run_tags,
)

log = logging.getLogger("chestct")

# Which params groups each stage reads; dvc.yaml lists the same groups.
STAGE_PARAMS: dict[str, tuple[str, ...]] = {
    "ingest": ("base", "ingest"),
    "split": ("base", "split"),
    "resize": ("base", "resize"),
    "validate": ("base", "validate"),
    "base-model": ("base", "base_model"),
    "train": ("base", "train"),
    "evaluate": ("base", "evaluate"),
    "promote": ("base", "promote", "evaluate"),
}


class StageFailed(RuntimeError):
    """A stage stopped for a reason the user can fix; the message says which and how."""


_P = ParamSpec("_P")
_R = TypeVar("_R")


def stops_stage(
    *errors: type[Exception],
) -> Callable[[Callable[_P, _R]], Callable[_P, _R]]:
    """A library function as a stage's run_<stage>(): the library's own errors, which name
    the problem and the fix, stop the stage as StageFailed with the same message.

    A library room cannot raise StageFailed (it sits below the runner), so a stage wraps the
    function that does its work: `run_split = stops_stage(SplitError)(split_manifest)`.
    """

    def wrap(function: Callable[_P, _R]) -> Callable[_P, _R]:
        @functools.wraps(function)
        def run(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            try:
                return function(*args, **kwargs)
            except errors as exc:
                raise StageFailed(str(exc)) from None

        return run

    return wrap


def configure_logging(log_file: Path) -> None:
    """Console and a per-stage log file; done once per process, in main()."""
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    file_handler = logging.FileHandler(log_file, mode="w", encoding="utf-8")
    file_handler.setFormatter(fmt)
    root.addHandler(console)
    root.addHandler(file_handler)
    for noisy in ("mlflow", "alembic", "urllib3", "git", "h5py", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@dataclass
class StageSession:
    """The open run of one stage; `finish()` records results and writes the pointer."""

    stage: str
    settings: Settings
    out_dir: Path
    run_id: str | None
    started: float = field(default_factory=time.monotonic)
    finished: bool = False

    @property
    def params(self) -> dict[str, Any]:
        return {g: self.settings.params.group(g) for g in STAGE_PARAMS[self.stage]}

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import mlflow

        numeric = {k: float(v) for k, v in flatten(metrics).items() if _is_number(v)}
        if numeric:
            mlflow.log_metrics(numeric, step=step)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        import mlflow

        mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_manifest(self, name: str, path: Path, frame: Any, context: str) -> None:
        """Log a split's manifest as an MLflow dataset input (context: training, validation,
        testing), with the digest and row count MLflow computes from the table."""
        import mlflow

        mlflow.log_input(manifest_dataset(name, path, frame), context=context)

    def finish(
        self,
        inputs: Sequence[str],
        outputs: dict[str, Path],
        metrics: dict[str, Any],
        details: dict[str, Any] | None = None,
    ) -> Pointer:
        """Log metrics, write the pointer and then the run record atomically, attach both to
        the MLflow run.

        The pointer holds only what deps and params determine (DVC hashes it); the time, git
        SHA, host and MLflow run go to the run record in artifacts/runs/, which DVC ignores.
        """
        paths = self.settings.paths
        pointer = Pointer(
            stage=self.stage,
            params=self.params,
            inputs=[make_input(paths, s) for s in inputs],
            outputs={name: make_output(p, paths.root) for name, p in outputs.items()},
            metrics=metrics,
            details=details or {},
        )
        self.log_metrics(metrics)
        write_pointer(paths.pointer(self.stage), pointer)
        log_upstream_inputs(paths, pointer)
        import mlflow

        mlflow.set_tag(
            "mlflow.runName", run_name(self.stage, sha256_file(paths.pointer(self.stage)))
        )
        record = make_run_record(
            self.stage,
            paths.pointer(self.stage),
            TrackingRef(
                tracking_uri=self.settings.tracking_uri,
                experiment=self.settings.config.tracking.experiment,
                run_id=self.run_id,
            ),
            paths.root,
        )
        self.log_artifact(paths.pointer(self.stage))
        self.log_artifact(write_run_record(paths, record))
        self.finished = True
        log.info("%s done in %.1f s", self.stage, time.monotonic() - self.started)
        return pointer


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@contextmanager
def stage_session(
    stage: str, root: Path | None = None, keep: Sequence[str] = ()
) -> Iterator[StageSession]:
    """Open a stage: settings, an emptied artifacts/<stage>/, logging, a tagged MLflow run.

    Args:
        stage: the stage name as in dvc.yaml.
        root: project root (default: found from the working directory).
        keep: names inside the output folder to keep when emptying it (incremental stages).
    """
    quiet_environment()
    settings = load_settings(root)
    uri = settings.tracking_uri
    # Before anything is emptied: an unreachable store must fail fast and destroy nothing.
    check_store(uri, settings.config.tracking.connect_timeout_s)
    out_dir = settings.paths.stage_dir(stage)
    if keep and out_dir.exists():
        for child in out_dir.iterdir():
            if child.name not in keep:
                _remove(child)
    else:
        reset_dir(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reports = settings.paths.report_dir(stage)
    if reports.exists():  # a file an earlier run wrote there must not outlive it
        reset_dir(reports)
    configure_logging(settings.paths.stage_log(stage))

    import mlflow  # imported late: telemetry and retry settings must be in place first

    mlflow.set_tracking_uri(uri)
    experiment = mlflow.set_experiment(settings.config.tracking.experiment)
    mark_experiment(experiment.experiment_id)
    # Upstream stages that DVC restored from its run cache (or that were pulled) ran nowhere
    # here: record them first, so that this run's lineage tags name them.
    record_missing_runs(settings, STAGES[: STAGES.index(stage)])
    git = git_state(settings.paths.root)
    with mlflow.start_run(tags=run_tags(stage, git.sha, git.dirty)) as run:
        session = StageSession(
            stage=stage, settings=settings, out_dir=out_dir, run_id=run.info.run_id
        )
        mlflow.log_params(_params_for_mlflow(session.params))
        env = environment_report(settings.params.base.seed)
        log.info("stage %s, environment: %s", stage, json.dumps(env, sort_keys=True))
        mlflow.log_dict(env, "environment.json")
        try:
            yield session
        finally:
            for handler in logging.getLogger().handlers:
                handler.flush()
            log_file = settings.paths.stage_log(stage)
            if log_file.exists():
                mlflow.log_artifact(str(log_file))


def log_upstream_inputs(paths: Any, pointer: Pointer) -> None:
    """Each upstream pointer the stage consumed, as an MLflow dataset input (its sha256)."""
    import mlflow

    for item in pointer.inputs:
        mlflow.log_input(
            pointer_dataset(f"{item.stage} outputs", paths.root / item.pointer, item.digest),
            context="upstream",
        )


def record_missing_runs(settings: Settings, stages: Sequence[str]) -> list[str]:
    """An MLflow run for every stage in `stages` whose outputs no run here recorded.

    DVC restores a stage from its run cache (or `dvc pull`/`dvc checkout` bring its outputs)
    without running its command, so no MLflow run and no run record exist for what is in
    artifacts/<stage>/. The run made here says so (tag chestct.recorded_from = pointer): its
    params, metrics and inputs come from the pointer, and a run record now names it, so that
    lineage tags and `chestct.cli.compare` find it. Returns the stages recorded.
    """
    import mlflow

    paths = settings.paths
    recorded = []
    for stage in stages:
        try:
            if not paths.pointer(stage).is_file() or read_run_record(paths, stage) is not None:
                continue
            pointer = read_pointer(paths, stage, verify=False)
        except PointerError:
            continue  # the stage that reads it will say what is wrong
        digest = sha256_file(paths.pointer(stage))
        git = git_state(paths.root)
        tags = run_tags(stage, git.sha, git.dirty) | {
            "mlflow.runName": run_name(stage, digest),
            "chestct.recorded_from": "pointer",
        }
        with mlflow.start_run(tags=tags, nested=mlflow.active_run() is not None) as run:
            mlflow.log_params(_params_for_mlflow(pointer.params))
            numeric = {k: float(v) for k, v in flatten(pointer.metrics).items() if _is_number(v)}
            if numeric:
                mlflow.log_metrics(numeric)
            log_upstream_inputs(paths, pointer)
            mlflow.log_artifact(str(paths.pointer(stage)))
            ref = TrackingRef(
                tracking_uri=settings.tracking_uri,
                experiment=settings.config.tracking.experiment,
                run_id=run.info.run_id,
            )
            record = make_run_record(stage, paths.pointer(stage), ref, paths.root)
            mlflow.log_artifact(str(write_run_record(paths, record)))
        log.info("%s: outputs restored by DVC, recorded as MLflow run %s", stage, run.info.run_id)
        recorded.append(stage)
    return recorded


def _params_for_mlflow(params: dict[str, Any]) -> dict[str, str]:
    # MLflow params are strings of at most 6000 chars; lists and dicts are logged as JSON.
    return {
        k: json.dumps(v) if isinstance(v, list | dict) else str(v)
        for k, v in flatten(params).items()
    }


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


def run_main(stage: str, body: Any) -> None:
    """Run a stage's main body and turn expected failures into one clear line and exit code 1."""
    try:
        body()
    except (SettingsError, TrackingError, StageFailed, PointerError, ManifestError) as exc:
        report_failure(stage, exc)
        raise SystemExit(1) from None


def report_failure(stage: str, exc: BaseException) -> None:
    """Print the error once on stderr, and into stage.log when logging is set up.

    Logging it through the console handler as well (or, before logging is configured, through
    Python's last-resort handler) would show the same message twice.
    """
    record = log.makeRecord(
        log.name, logging.ERROR, __file__, 0, "%s failed: %s", (stage, exc), None
    )
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
    print(f"chestct {stage}: {exc}", file=sys.stderr)
