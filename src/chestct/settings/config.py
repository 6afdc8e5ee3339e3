"""config/config.yaml (paths and environment, nothing that changes results) and the paths built
from it.

Each key is declared once, with its type, range and description (`chestct.settings.schema.key`);
its value lives in config/config.yaml alone. docs/generated/config.md is rendered from these
declarations and the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from chestct.settings.params import Params
from chestct.settings.schema import SettingsError, key

STAGES: tuple[str, ...] = (
    "ingest",
    "split",
    "resize",
    "validate",
    "base-model",
    "train",
    "evaluate",
    "promote",
)


@dataclass(frozen=True)
class TrackingConfig:
    """The MLflow tracking store."""

    uri: str = key("MLflow tracking URI; `MLFLOW_TRACKING_URI` overrides it")
    experiment: str = key("MLflow experiment the stages log their runs to")
    connect_timeout_s: float = key(
        "an unreachable tracking server is reported within this many seconds (+ ~2 s start-up)",
        gt=0,
    )


@dataclass(frozen=True)
class ServingConfig:
    """The predictor service (chestct.serving); see [Serving](serving.md)."""

    max_upload_mb: float = key("request body limit in megabytes; larger bodies get 413", gt=0)
    max_batch_files: int = key("files per `POST /predict/batch`", ge=1)
    max_image_pixels: int = key(
        "width × height from the file header (4096 × 4096 = 16777216); more: 413", ge=1024
    )
    max_decoded_mb: float = key(
        "decoded bytes: width × height × channels × bytes per sample (+ decoder buffers); "
        "more: 413",
        ge=1,
    )
    mc_dropout_samples: int = key("MC-dropout passes through the dense head; `0`: off", ge=0)
    reload_check_s: float = key(
        "seconds between checks for a newly promoted model/ (hot reload)", ge=0
    )
    inference_threads: int = key(
        "LiteRT threads per gunicorn worker (workers × threads ≤ cores)", ge=1
    )
    audit_log: bool = key(
        "record each prediction (sha256, label, probabilities; no pixels) in `audit_db`"
    )
    audit_db: str = key("the audit log's SQLite file, relative to the project root")
    history_token: str = key(
        'bearer token for `GET /history` (read; `""`: 403); `CHESTCT_HISTORY_TOKEN` overrides it'
    )
    feedback_token: str = key(
        'bearer token for `POST /feedback` (write labels; `""`: 403); '
        "`CHESTCT_FEEDBACK_TOKEN` overrides it"
    )
    feedback_per_minute: int = key(
        "`/feedback` answers per token per minute, per worker; more: 429 with `Retry-After`",
        ge=1,
    )
    audit_max_rows: int = key(
        "predictions the audit log keeps (oldest deleted first); `0`: all", ge=0
    )
    audit_retention_days: float = key(
        "predictions older than this many days are deleted; `0`: kept", ge=0
    )


@dataclass(frozen=True)
class MonitorConfig:
    """Drift and performance monitoring (chestct.monitoring.monitor, /metrics); see
    [Monitoring](monitoring.md)."""

    window_requests: int = key(
        "predictions in the window of `python -m chestct.monitoring.monitor` when neither "
        "`--last` nor `--since` is given",
        ge=1,
    )
    min_requests: int = key(
        "a smaller window (answered + refused requests) is not judged (verdict "
        "`insufficient`, exit 3); `/metrics` exports no PSI below it",
        ge=1,
    )
    psi_threshold: float = key(
        "a signal drifts at PSI ≥ this (the usual reading: < 0.1 stable, 0.1-0.25 moderate, "
        "> 0.25 major)…",
        gt=0,
    )
    p_value: float = key(
        "…and when its two-sample test's (KS / chi-square) p-value is below this (magnitude "
        "and evidence, so small windows do not cry wolf)",
        gt=0,
        lt=1,
    )
    rate_margin: float = key(
        "the abstain or OOD rate drifts above evaluate's rate + this (and binomial p < `p_value`)",
        ge=0,
        lt=1,
    )
    performance_drop: float = key(
        "live macro-F1 this far below the card's test macro-F1 counts as drift (`performance`)",
        ge=0,
        lt=1,
    )
    min_labelled: int = key(
        "labelled predictions (`POST /feedback`) needed before live metrics are judged", ge=1
    )
    live_window: int = key(
        "predictions each worker keeps in the rolling window behind `/metrics`", ge=1
    )
    report_dir: str = key("where the monitor writes report.json and report.html (not empty)")


@dataclass(frozen=True)
class Config:
    """config/config.yaml: paths and environment only; relative paths are resolved from the
    project root."""

    artifacts_dir: str = key("each stage's outputs, `artifacts/<stage>/`")
    reports_dir: str = key(
        "git-tracked metrics and plot tables, `reports/<stage>/` (`cache: false` in dvc.yaml)"
    )
    model_dir: str = key("the promoted model and its card: the only thing the predictor reads")
    params_file: str = key("the params file")
    tracking: TrackingConfig
    serving: ServingConfig
    monitor: MonitorConfig


@dataclass(frozen=True)
class Paths:
    """Every location the project reads or writes, derived from one root."""

    root: Path
    artifacts: Path
    model: Path
    params_file: Path
    reports: Path | None = None  # git-tracked metrics and plot tables (config reports_dir)
    audit_db: Path | None = None  # the predictor's audit log (config serving.audit_db)
    downloads: Path | None = None  # verified URL-source archives, by sha256 (download_cache())

    def stage_dir(self, stage: str) -> Path:
        """Output folder of a stage: artifacts/<stage>/ (the stage's only writable place)."""
        if stage not in STAGES:
            raise SettingsError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
        return self.artifacts / stage

    def report_dir(self, stage: str) -> Path:
        """reports/<stage>/: the stage's metrics and plot tables, small files git tracks
        (`cache: false` outputs in dvc.yaml), so that DVC compares them across commits."""
        self.stage_dir(stage)  # validates the name
        return (self.reports or self.root / "reports") / stage

    def pointer(self, stage: str) -> Path:
        return self.stage_dir(stage) / "pointer.json"

    @property
    def runs(self) -> Path:
        """artifacts/runs/: what is run-specific (time, git SHA, MLflow run, log). It lies
        outside every stage's DVC output, so DVC hashes none of it."""
        return self.artifacts / "runs"

    def run_record(self, stage: str) -> Path:
        self.stage_dir(stage)  # validates the name
        return self.runs / f"{stage}.json"

    def stage_log(self, stage: str) -> Path:
        self.stage_dir(stage)
        return self.runs / f"{stage}.log"


@dataclass(frozen=True)
class Settings:
    params: Params
    config: Config
    paths: Paths

    @property
    def tracking_uri(self) -> str:
        """MLFLOW_TRACKING_URI wins over config.yaml so that CI and users can redirect runs."""
        return os.environ.get("MLFLOW_TRACKING_URI") or self.config.tracking.uri


def check_config(config: Config) -> None:
    """config.yaml values that a range alone cannot refuse."""
    if config.serving.audit_log and not config.serving.audit_db:
        raise SettingsError("serving.audit_db: set a file path when serving.audit_log is true")
    if not config.monitor.report_dir:
        raise SettingsError("monitor.report_dir: set a folder for the reports")
