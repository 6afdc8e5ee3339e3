"""MLflow wiring: a reachable store, one experiment, one tagged run per stage execution.

MLflow is only a record. DVC decides what reruns; nothing here caches or skips work.
"""

from __future__ import annotations

import logging
import os
import platform
import sqlite3
import sys
import urllib.error
import urllib.request
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

log = logging.getLogger(__name__)

KEY_PACKAGES = (
    "tensorflow-cpu",
    "tensorflow",
    "keras",
    "mlflow",
    "dvc",
    "numpy",
    "opencv-python-headless",
    "scikit-learn",
    "pandas",
)


class TrackingError(RuntimeError):
    """The MLflow tracking store cannot be used."""


def quiet_environment() -> None:
    """Telemetry off and no endless HTTP retries; must run before mlflow is imported."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # MLflow probes git through GitPython, which warns loudly where git is absent (containers).
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")


def check_store(uri: str, timeout_s: float) -> None:
    """Fail fast, with the fix, when the tracking store cannot be reached or written.

    MLflow's own client retries an unreachable server for minutes; a stage should not hang.
    """
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as resp:
                if resp.status >= 500:
                    raise TrackingError(f"MLflow server at {uri} answered {resp.status}")
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            raise TrackingError(
                f"MLflow tracking server {uri} is unreachable ({exc}). Start it "
                '(`make tracking-server`, README "Scaling out") or '
                "unset MLFLOW_TRACKING_URI to use the local sqlite store."
            ) from exc
    elif parsed.scheme == "sqlite":
        db = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
        if db is None:
            raise TrackingError(f"cannot read sqlite URI {uri!r}; use sqlite:///path/to/file.db")
        if not db.parent.resolve().is_dir():
            raise TrackingError(
                f"tracking store {uri}: folder {db.parent} does not exist; create it or "
                "point MLFLOW_TRACKING_URI elsewhere"
            )
        try:
            with sqlite3.connect(db, timeout=timeout_s) as conn:
                conn.execute("PRAGMA schema_version").fetchone()
        except sqlite3.Error as exc:
            raise TrackingError(
                f"tracking store {uri} is not a usable sqlite database ({exc}); move it aside "
                "or point MLFLOW_TRACKING_URI elsewhere"
            ) from exc
    elif parsed.scheme in ("", "file"):
        raise TrackingError(
            f"tracking URI {uri!r} is a file store, which MLflow 3 no longer uses by default; "
            "use sqlite:///mlflow.db or an http(s) server"
        )


def environment_report(seed: int) -> dict[str, Any]:
    """The facts that shape a stage's results, logged once when the stage starts."""
    versions = {}
    for pkg in KEY_PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    from chestct.cpu import PORTABLE_ENV, mode

    report: dict[str, Any] = {
        "cpu_kernels": {
            "mode": mode(),
            **{k: os.environ.get(k, "") for k in (*PORTABLE_ENV, "OPENCV_CPU_DISABLE")},
        },
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "seed": seed,
        "packages": versions,
    }
    if "tensorflow" in sys.modules:  # only stages that use TF pay for importing it
        tf = sys.modules["tensorflow"]
        report["devices"] = [d.name for d in tf.config.list_physical_devices()]
    return report


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"augment": {"flip": True}}} -> {"train.augment.flip": True}."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def run_tags(stage: str, git_sha: str | None, git_dirty: bool | None) -> dict[str, str]:
    tags = {"chestct.stage": stage, "mlflow.runName": stage}
    if parent := os.environ.get(PARENT_ENV):
        tags["mlflow.parentRunId"] = parent  # nested under the run of `make run`/`make repro`
    if git_sha:
        tags["git.sha"] = git_sha
        tags["mlflow.source.git.commit"] = git_sha
    if git_dirty is not None:
        tags["git.dirty"] = str(git_dirty).lower()
    if exp := os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = exp
    if base := os.environ.get("DVC_EXP_BASELINE_REV"):
        tags["dvc.baseline_rev"] = base
    return tags


# --------------------------------------------------------------------------- conventions

# Set by `make run` / `make repro` (chestct.cli.repro) for the stages of one `dvc repro`: the run
# id
# of the parent run they nest under. A bare `dvc repro` has none: its stages are top-level runs.
PARENT_ENV = "CHESTCT_PIPELINE_RUN"
# MLflow 3's UI opens an experiment by its kind; without it a new experiment opens on the GenAI
# overview. The key and value come from the MLflow UI's code (ExperimentKind).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
DIGEST_CHARS = 16  # of a sha256, as an MLflow dataset digest (the store keeps at most 36)


def run_name(stage: str, pointer_digest: str) -> str:
    """`<stage> <short digest>`: the digest of the pointer the run wrote, so that two runs with
    the same outputs carry the same name."""
    return f"{stage} {pointer_digest[:7]}"


def mark_experiment(experiment_id: str) -> None:
    """Make the experiment open in MLflow's model-training view (unless a user chose a kind)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    if EXPERIMENT_KIND_TAG not in client.get_experiment(experiment_id).tags:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)


def _source(path: Path) -> Any:
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source

    with warnings.catch_warnings():  # "can be interpreted in multiple ways": a local file
        warnings.simplefilter("ignore")
        return resolve_dataset_source(str(path))


def pointer_dataset(name: str, path: Path, digest: str) -> Any:
    """An MLflow dataset for an upstream stage's outputs: its pointer file and sha256."""
    from mlflow.data.meta_dataset import MetaDataset

    return MetaDataset(source=_source(path), name=name, digest=digest[:DIGEST_CHARS])


def manifest_dataset(name: str, path: Path, frame: Any) -> Any:
    """An MLflow dataset for a split's manifest (one row per image: path, label, ...): MLflow
    computes its digest and profile (rows) from the table."""
    import warnings

    import mlflow

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mlflow.data.from_pandas(
            frame, source=_source(path), name=name, targets="label" if "label" in frame else None
        )
