"""Typed, validated settings: params.yaml (what changes results) and config/config.yaml (where).

Every path the project uses is built here, once, from the project root. Stages receive these
frozen dataclasses; nothing else reads the YAML files.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

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


class SettingsError(ValueError):
    """A settings file is missing, malformed, or has a wrong key or value."""


# --------------------------------------------------------------------------- params.yaml


@dataclass(frozen=True)
class BaseParams:
    seed: int = 42
    image_size: int = 128
    # Thumbnail correlation (chestct.data.similarity) at or above which a slice is a near-copy of
    # its nearest training slice: split's series, validate's near-copy report, evaluate's
    # novel part. Adjacent slices of one series sit above it, other patients below.
    near_copy_similarity: float = 0.9


@dataclass(frozen=True)
class WindowParams:
    """The CT window that maps DICOM Hounsfield units to 8-bit grey (default: lung)."""

    level: float = -600.0
    width: float = 1500.0


@dataclass(frozen=True)
class IngestParams:
    # synthetic | a folder | a .zip/.tar.gz/.tgz archive | an http(s):// URL to an archive |
    # a .csv listing (path,label[,split][,group]; chestct.stages.ingest)
    source: str = "synthetic"
    synthetic_per_class: dict[str, int] = field(
        default_factory=lambda: {"train": 120, "valid": 20, "test": 30}
    )
    class_map: dict[str, str] = field(default_factory=dict)
    sha256: str = ""  # required for a URL source: checked before anything is unpacked
    timeout_s: float = 60.0  # URL source: seconds without an answer before giving up
    deadline_s: float = 3600.0  # URL source: the whole download must end within this
    max_download_mb: float = 10240.0  # URL source: a larger download is stopped
    redirect_hosts: list[str] = field(default_factory=list)  # `host` or `host:port`
    # URL source: loopback, private and link-local addresses are refused unless this is true
    allow_private_hosts: bool = False
    max_members: int = 100_000  # archive: entries
    max_unpacked_mb: float = 20480.0  # archive: total unpacked size
    max_ratio: float = 100.0  # archive: unpacked / packed bytes (a zip bomb is 1000+)
    max_file_mb: float = 512.0  # folder or listing source: one larger file is refused
    window: WindowParams = field(default_factory=WindowParams)
    # "" (off) | zoom | dark: the synthetic default draws one class at another zoom or grey
    # level in every split, an acquisition shortcut for testing that promote cannot be fooled
    synthetic_shortcut: Literal["", "zoom", "dark"] = ""
    # Slices per synthetic patient: near-copies (shifted, turned, noised) of one rendered
    # slice, so that series grouping and novelty have something to find; 1: one each.
    synthetic_series: int = 3


@dataclass(frozen=True)
class SplitParams:
    mode: Literal["keep", "pool"] = "keep"
    valid_fraction: float = 0.15
    test_fraction: float = 0.15
    near_duplicate_distance: int = 12  # pHash bits (of 256); -1 turns near-duplicates off
    dedupe: Literal["report", "drop"] = "report"
    # Thumbnail correlation (chestct.data.similarity) at or above which two slices are one series
    # and move together (connected components); -1 turns series grouping off. 0.9, as
    # base.near_copy_similarity: no test slice is then a near-copy of a train slice
    # (docs/data-checks.md: on the real train folder 54 % of a test split were before).
    series_similarity: float = 0.9


@dataclass(frozen=True)
class ResizeParams:
    interpolation: Literal["area", "linear", "cubic"] = "area"
    mode: Literal["stretch", "pad", "crop"] = "stretch"
    workers: int = 0  # processes; 0 = all cores
    # Acquisition normalisation (imaging.Normalise; README "Acquisition shift").
    crop: Literal["body", "lungs", "none"] = "body"
    crop_margin: float = 0.02
    intensity: Literal["percentile", "equalize", "clahe", "none"] = "percentile"
    percentiles: list[float] = field(default_factory=lambda: [1.0, 99.5])
    clahe_clip: float = 2.0

    def __post_init__(self) -> None:
        pair = self.percentiles
        if len(pair) != 2 or not 0.0 <= pair[0] < pair[1] <= 100.0:
            raise SettingsError(
                f"resize.percentiles: expected [low, high] with 0 <= low < high <= 100, got "
                f"{self.percentiles}"
            )
        if not 0.0 <= self.crop_margin <= 0.5:
            raise SettingsError(f"resize.crop_margin: expected 0..0.5, got {self.crop_margin}")
        if self.clahe_clip <= 0:
            raise SettingsError(f"resize.clahe_clip: expected > 0, got {self.clahe_clip}")


@dataclass(frozen=True)
class ValidateParams:
    fail_on: Literal["error", "warning", "never"] = "error"
    min_class_count: int = 2
    max_imbalance: float = 10.0  # largest / smallest class count in a split
    min_file_bytes: int = 64
    min_side: int = 16
    max_side: int = 8192
    min_std: float = 2.0  # grey-level std of the resized slice below which it is near-blank
    allowed_modes: list[str] = field(default_factory=lambda: ["L", "LA", "RGB", "RGBA", "I;16"])
    near_duplicate_distance: int = 12
    shortcut_margin: float = 0.15  # metadata-only balanced accuracy above chance + this warns
    shortcut_min_images: int = 40
    quarantine: bool = False
    severities: dict[str, Literal["info", "warning", "error"]] = field(default_factory=dict)
    # A split (or the external set) with more than this share of its slices at or above
    # base.near_copy_similarity to their nearest train slice is mostly near-copies of train.
    max_near_copy_share: float = 0.5
    series_similarity: float = 0.95  # thumbnail correlation linking slices into one series
    min_series_per_class: int = 3  # a class drawn from fewer series (of train) is flagged


@dataclass(frozen=True)
class TextureParams:
    """The texture family's classifier (chestct.model.texture: HistGradientBoostingClassifier)."""

    max_iter: int = 300  # boosting iterations at most; the valid split picks how many are kept
    learning_rate: float = 0.05
    max_features: float = 0.5  # share of the features each split considers
    max_leaf_nodes: int = 31
    l2_regularization: float = 0.0
    class_weight: Literal["balanced", "none"] = "balanced"
    threads: int = 1  # OpenMP threads of the trees (their default, every core, crawls here)
    bag: int = 1  # boosters with seeds base.seed, +1, ...: their probabilities averaged
    refit: bool = False  # once valid chose iterations and temperature: fit on train + valid


@dataclass(frozen=True)
class BaseModelParams:
    # cnn: the Keras network below | texture: chestct.model.texture features + gradient boosting |
    # ensemble: both, their calibrated probabilities averaged
    family: Literal["cnn", "texture", "ensemble"] = "cnn"
    texture: TextureParams = field(default_factory=TextureParams)
    architecture: Literal[
        "small_cnn", "mobilenet_v3_small", "efficientnet_b0", "resnet50", "vgg16"
    ] = "small_cnn"
    weights: str = "none"  # none | imagenet | path to a .h5/.weights.h5/.keras file
    freeze: Literal["auto", "backbone", "none"] = "auto"
    filters: list[int] = field(default_factory=lambda: [16, 32, 64, 128, 256])
    dropout: float = 0.3


@dataclass(frozen=True)
class AugmentParams:
    """Random transforms of training batches (modeling.augmenter); 0 turns one off."""

    flip: bool = True
    rotation: float = 0.05  # fraction of a full turn, either way
    zoom: float = 0.1  # scale jitter: zoom in or out by up to this share
    contrast: float = 0.1  # contrast jitter around the image mean, by up to this share
    # Acquisition shift (README "Acquisition shift"):
    zoom_out: float = 0.0  # shrink by up to this share, inside a black margin (a wider field)
    aspect: float = 0.0  # stretch the height alone by up to this share either way
    translation: float = 0.0  # shift by up to this share of the side, black fill
    gamma: float = 0.0  # grey-level gamma in [1/(1+g), 1+g], log-uniform
    window: float = 0.0  # clip up to this share of the grey range at each end, stretch back
    blur: float = 0.0  # Gaussian blur, sigma up to this many pixels
    noise: float = 0.0  # additive Gaussian noise, sd up to this many grey levels

    def __post_init__(self) -> None:
        limits = {"zoom_out": 1.0, "window": 0.5}  # the image would vanish at these
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if item.name == "flip":
                continue
            if value < 0 or value >= limits.get(item.name, float("inf")):
                bound = f" and < {limits[item.name]}" if item.name in limits else ""
                raise SettingsError(
                    f"train.augment.{item.name}: expected >= 0{bound} (0 = off), got {value}"
                )


@dataclass(frozen=True)
class ReduceLrParams:
    factor: float = 0.5
    patience: int = 3
    min_learning_rate: float = 1e-6


@dataclass(frozen=True)
class FineTuneParams:
    unfreeze_top: int = 0  # 0: no second phase
    epochs: int = 10
    learning_rate: float = 1e-5


@dataclass(frozen=True)
class TrainParams:
    epochs: int = 12
    batch_size: int = 32
    learning_rate: float = 1e-3
    optimizer: Literal["adam", "adamw"] = "adam"
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    monitor: Literal["val_loss", "val_accuracy", "val_macro_f1"] = "val_loss"
    patience: int = 5
    class_weights: Literal["balanced", "none"] = "balanced"
    bn_recalibration: int = 8  # clean train batches that re-estimate batch-norm statistics
    reduce_lr: ReduceLrParams = field(default_factory=ReduceLrParams)
    fine_tune: FineTuneParams = field(default_factory=FineTuneParams)
    deterministic: bool = True
    strategy: Literal["default", "mirrored", "multi_worker"] = "default"
    mixed_precision: bool = False
    ensemble: int = 1  # members trained from seeds base.seed + k and merged (logits averaged)
    augment: AugmentParams = field(default_factory=AugmentParams)


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = 64
    abstain_quantile: float = 0.95  # of valid entropy over correct predictions: abstain above
    ood_quantile: float = 0.99  # of valid Mahalanobis distances: out of distribution above
    gallery_per_class: int = 2  # Grad-CAM gallery: top-confidence and worst images per class
    # valid | valid_and_shifted: what the temperature is fitted on (shifted = perturb.SHIFTS)
    calibrate_on: Literal["valid", "valid_and_shifted"] = "valid"
    external: str = ""  # "" (off) | a folder or .zip/.tar.gz/.tgz archive of <class>/<image>
    # Bootstrap intervals (chestct.evaluation.uncertainty): resamples of groups, two-sided
    # confidence.
    bootstrap_resamples: int = 1000
    confidence: float = 0.95


@dataclass(frozen=True)
class PromoteParams:
    # any number in evaluate's metrics.json, dotted for nested keys ("shift.blur.macro_f1")
    metric: str = "robust_macro_f1"
    minimum: float = 0.5
    margin: float = 0.0
    registered_model: str = "chestct"
    # A win over the champion must survive the paired bootstrap of the metric difference on
    # the same test items (chestct.evaluation.uncertainty) at this confidence; `none`: the margin
    # alone.
    paired: Literal["bootstrap", "none"] = "bootstrap"
    confidence: float = 0.95
    # Refuse a candidate below the nearest-neighbour memorizer on the test split.
    beat_memorizer: bool = True


@dataclass(frozen=True)
class Params:
    base: BaseParams = field(default_factory=BaseParams)
    ingest: IngestParams = field(default_factory=IngestParams)
    split: SplitParams = field(default_factory=SplitParams)
    resize: ResizeParams = field(default_factory=ResizeParams)
    validate: ValidateParams = field(default_factory=ValidateParams)
    base_model: BaseModelParams = field(default_factory=BaseModelParams)
    train: TrainParams = field(default_factory=TrainParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    promote: PromoteParams = field(default_factory=PromoteParams)

    def group(self, name: str) -> dict[str, Any]:
        """One params group as a plain dict (for pointers and MLflow)."""
        return dataclasses.asdict(getattr(self, name))


# --------------------------------------------------------------------------- config.yaml


@dataclass(frozen=True)
class TrackingConfig:
    uri: str = "sqlite:///mlflow.db"
    experiment: str = "chestct"
    connect_timeout_s: float = 5.0


@dataclass(frozen=True)
class ServingConfig:
    """The predictor service (chestct.serving); see README "Serving"."""

    max_upload_mb: float = 10.0  # request body limit (413 above it)
    max_batch_files: int = 16  # files per /predict/batch request
    max_image_pixels: int = 16_777_216  # width x height from the header (4096 x 4096); more: 413
    max_decoded_mb: float = 32.0  # w x h x channels x bytes per sample (+ decoder buffers); 413
    mc_dropout_samples: int = 30  # MC-dropout passes through the dense head (0 = off)
    reload_check_s: float = 1.0  # how often a worker looks for a new model/ (hot reload)
    inference_threads: int = 1  # LiteRT threads per worker (workers x threads <= cores)
    audit_log: bool = False  # record predictions (sha256, label, probabilities; no pixels)
    audit_db: str = "audit/predictions.sqlite"  # SQLite file, relative to the project root
    history_token: str = ""  # bearer token for GET /history; CHESTCT_HISTORY_TOKEN overrides
    feedback_token: str = ""  # bearer token for POST /feedback; CHESTCT_FEEDBACK_TOKEN overrides
    feedback_per_minute: int = 60  # POST /feedback answers per token per minute per worker
    audit_max_rows: int = 200_000  # predictions kept in the audit log (oldest deleted); 0: all
    audit_retention_days: float = 90.0  # predictions older than this deleted; 0: kept


@dataclass(frozen=True)
class MonitorConfig:
    """Drift and performance monitoring (chestct.monitoring.monitor, /metrics); README
    "Monitoring"."""

    window_requests: int = 500  # the monitor's window when neither --last nor --since is given
    min_requests: int = 50  # fewer predictions in a window: not judged (too noisy)
    psi_threshold: float = 0.25  # a signal drifts at PSI >= this (and p < p_value)
    p_value: float = 0.01  # significance of the two-sample and rate tests
    rate_margin: float = 0.10  # abstain/OOD rate drifts above expected + this (and p < p_value)
    min_labelled: int = 20  # live metrics are judged from this many labelled predictions on
    performance_drop: float = 0.10  # live macro-F1 this far below the card's test figure: alarm
    live_window: int = 200  # predictions per worker in the rolling window behind /metrics
    report_dir: str = "monitoring"  # where the monitor writes report.json and report.html


@dataclass(frozen=True)
class Config:
    artifacts_dir: str = "artifacts"
    reports_dir: str = "reports"  # git-tracked metrics and plot tables, reports/<stage>/
    model_dir: str = "model"
    params_file: str = "params.yaml"
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)


# --------------------------------------------------------------------------- paths


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


# --------------------------------------------------------------------------- loading


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against type `tp`; return it converted (ints accepted as floats)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise SettingsError(f"{where}: expected a mapping, got {value!r}")
        return build(tp, value, where)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise SettingsError(
                f"{where}: {value!r} is not allowed; use one of {', '.join(map(repr, allowed))}"
            )
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, where)
            except SettingsError:
                continue
        raise SettingsError(f"{where}: {value!r} is not {_describe(tp)}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise SettingsError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise SettingsError(f"{where}: expected a mapping, got {value!r}")
        return {
            _coerce(k, key_tp, f"{where} key"): _coerce(v, val_tp, f"{where}.{k}")
            for k, v in value.items()
        }
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SettingsError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SettingsError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise SettingsError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise SettingsError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported settings type {tp!r} at {where}")


def build(cls: type, data: dict[str, Any] | None, where: str) -> Any:
    """Build dataclass `cls` from a mapping, naming any unknown key and the known ones."""
    data = data or {}
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in known]
    if unknown:
        raise SettingsError(
            f"{where or 'top level'}: unknown key {unknown[0]!r}; "
            f"allowed keys are {', '.join(known)}"
        )
    values = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**values)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SettingsError(
            f"{path}: file not found (run from the project root, or set CHESTCT_ROOT)"
        )
    try:
        with path.open(encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        raise SettingsError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: expected a mapping at the top level")
    return data


def _check_params(params: Params) -> None:
    """Cross-field checks that a type alone cannot express."""
    if params.base.image_size < 16:
        raise SettingsError("base.image_size: must be at least 16 pixels")
    if not 0 < params.base.near_copy_similarity <= 1:
        raise SettingsError(
            "base.near_copy_similarity: a thumbnail correlation in (0, 1], e.g. 0.9"
        )
    fractions = params.split.valid_fraction + params.split.test_fraction
    if not 0 < fractions < 1 or min(params.split.valid_fraction, params.split.test_fraction) <= 0:
        raise SettingsError(
            "split.valid_fraction and split.test_fraction: each must be > 0 and together < 1"
        )
    bad = set(params.ingest.synthetic_per_class) - {"train", "valid", "test"}
    if bad:
        raise SettingsError(
            f"ingest.synthetic_per_class: unknown split {sorted(bad)[0]!r}; use train, valid, test"
        )
    for name in ("epochs", "batch_size", "patience"):
        if getattr(params.train, name) < 1:
            raise SettingsError(f"train.{name}: must be at least 1")
    if params.base.seed < 0:
        raise SettingsError("base.seed: must be >= 0")
    if any(n < 0 for n in params.ingest.synthetic_per_class.values()):
        raise SettingsError("ingest.synthetic_per_class: counts must be >= 0")
    if params.evaluate.batch_size < 1:
        raise SettingsError("evaluate.batch_size: must be at least 1")
    if not params.base_model.filters or min(params.base_model.filters) < 1:
        raise SettingsError("base_model.filters: must be a non-empty list of positive integers")
    if params.train.learning_rate <= 0:
        raise SettingsError("train.learning_rate: must be > 0")
    if not 0 <= params.base_model.dropout < 1:
        raise SettingsError("base_model.dropout: must be in [0, 1)")
    _check_model_and_training(params.base_model, params.train)
    _check_data_params(params)
    _check_evaluate_and_promote(params.evaluate, params.promote)


def _check_evaluate_and_promote(evaluate: EvaluateParams, promote: PromoteParams) -> None:
    """evaluate and promote values that no run can use."""
    if evaluate.batch_size < 1:
        raise SettingsError("evaluate.batch_size: must be at least 1")
    for name in ("abstain_quantile", "ood_quantile"):
        if not 0 < getattr(evaluate, name) <= 1:
            raise SettingsError(f"evaluate.{name}: must be in (0, 1], e.g. 0.95")
    if evaluate.gallery_per_class < 0:
        raise SettingsError("evaluate.gallery_per_class: must be >= 0 (0 = an empty gallery)")
    if not 0 <= promote.minimum <= 1:
        raise SettingsError("promote.minimum: must be in [0, 1] (the metric is a fraction)")
    if not -1 < promote.margin < 1:
        raise SettingsError("promote.margin: must be in (-1, 1), e.g. 0.01")
    metric = promote.metric.strip()
    if not metric or metric.split(".")[0] == "external":
        raise SettingsError(
            f"promote.metric {promote.metric!r}: "
            + (
                "the external test set is reported apart and never used for selection; "
                if metric
                else "must name a metric; "
            )
            + "choose a key of reports/evaluate/metrics.json such as robust_macro_f1"
        )
    if evaluate.bootstrap_resamples < 10:
        raise SettingsError("evaluate.bootstrap_resamples: must be at least 10, e.g. 1000")
    for group, value in (("evaluate", evaluate.confidence), ("promote", promote.confidence)):
        if not 0.5 <= value < 1:
            raise SettingsError(f"{group}.confidence: must be in [0.5, 1), e.g. 0.95")
    if not promote.registered_model.strip():
        raise SettingsError("promote.registered_model: must be a non-empty name")


# The environment variable that holds a source URL kept out of params (`env:CHESTCT_SOURCE_URL`).
URL_ENV = "CHESTCT_SOURCE_URL"
# Keys that carry credentials in signed or token URLs (matched as substrings), in a query, a
# fragment, a path segment's `;key=value` parameters or a `key=value` path segment.
_SECRET_KEYS = ("token", "sig", "secret", "key", "password", "passwd", "auth", "credential",
                "x-amz-", "x-goog-", "session", "jwt", "bearer")  # fmt: skip
# Values that are credentials by their form wherever they sit: GitHub, GitLab, Slack, AWS,
# OpenAI-style keys and JWTs.
_SECRET_VALUE = re.compile(
    r"(gh[pousr]_[A-Za-z0-9]{20,}|github_pat_\w{20,}|glpat-[\w-]{20,}|xox[abprs]-[\w-]{10,}"
    r"|(AKIA|ASIA)[0-9A-Z]{16}|sk-[A-Za-z0-9_-]{20,}|eyJ[\w-]{8,}\.eyJ[\w-]{8,}\.[\w-]*)"
)
# A long run of mixed-case letters and digits (base64url) with the entropy of a random token:
# hex digests and UUIDs (one case) and words are not taken for one.
_RANDOM_RUN = re.compile(r"[A-Za-z0-9_-]{32,}")


def _random_token(text: str) -> bool:
    import math
    from collections import Counter

    for run in _RANDOM_RUN.findall(text):
        classes = (any(c.islower() for c in run), any(c.isupper() for c in run))
        digits = sum(c.isdigit() for c in run)
        if not (all(classes) and digits >= 3):
            continue
        counts = Counter(run)
        entropy = -sum(n / len(run) * math.log2(n / len(run)) for n in counts.values())
        if entropy >= 4.0:
            return True
    return False


def secret_in_url(url: str) -> str | None:
    """What in `url` looks like a credential, or None: user info; a query, fragment or path
    parameter whose key names one (token, sig, key, X-Amz-Signature, ...); a `key=value` path
    segment of that kind; a value shaped like a known token (ghp_, AKIA, JWT, ...); or a long
    random-looking run of letters and digits anywhere after the host."""
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    if parts.username or parts.password:
        return "user name or password"
    pairs = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    pairs += urllib.parse.parse_qsl(parts.fragment, keep_blank_values=True)
    path = urllib.parse.unquote(parts.path)
    for segment in path.split("/"):
        for piece in [*segment.split(";")[1:], segment]:
            if "=" in piece:
                key, _, value = piece.partition("=")
                pairs.append((key, value))
    for key, _ in pairs:
        if any(word in key.lower() for word in _SECRET_KEYS):
            return f"parameter {key!r}"
    rest = " ".join([path, *(v for _, v in pairs), urllib.parse.unquote(parts.fragment)])
    if _SECRET_VALUE.search(rest):
        return "a value shaped like an access token or key"
    if _random_token(rest):
        return "a long random-looking value (a signature or token?)"
    return None


# A redirect_hosts entry: a host name or [IPv6] address, with an optional port.
_HOST_PORT = r"([A-Za-z0-9.\-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?"


def _check_data_params(params: Params) -> None:
    """ingest, split, resize and validate values that no stage can run with."""
    ingest, split, resize, validate = params.ingest, params.split, params.resize, params.validate
    digest = ingest.sha256.strip().lower()
    if digest and (len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest)):
        raise SettingsError(
            f"ingest.sha256: {ingest.sha256!r} is not a sha256 (64 hex digits); "
            "compute it with `sha256sum <archive>`"
        )
    if ingest.source.lower().startswith(("http://", "https://")):
        secret = secret_in_url(ingest.source)
        if secret:
            # Refused here, before any stage logs its params to MLflow or DVC locks them.
            raise SettingsError(
                f"ingest.source: the URL carries a credential ({secret}); params are written "
                "to dvc.lock, pointer.json and MLflow. Export the URL as "
                f"{URL_ENV}=... and set ingest.source: env:{URL_ENV} (or send a bearer token "
                "in CHESTCT_SOURCE_TOKEN)"
            )
    if ingest.source.lower().startswith(("http://", "https://", "env:")) and not digest:
        raise SettingsError(
            "ingest.sha256: required when ingest.source is a URL; set it to the archive's "
            "sha256 (`sha256sum <archive>`) so that a changed or corrupted download is refused"
        )
    if ingest.timeout_s <= 0:
        raise SettingsError("ingest.timeout_s: must be > 0 seconds")
    if ingest.deadline_s <= 0:
        raise SettingsError("ingest.deadline_s: must be > 0 seconds")
    if min(ingest.max_download_mb, ingest.max_unpacked_mb, ingest.max_members) <= 0:
        raise SettingsError("ingest.max_download_mb, max_unpacked_mb and max_members: must be > 0")
    if ingest.max_ratio < 1:
        raise SettingsError("ingest.max_ratio: must be >= 1 (unpacked / packed bytes)")
    if ingest.max_file_mb <= 0:
        raise SettingsError(
            "ingest.max_file_mb: must be > 0 (MB); one CT slice is well under 1 MB, raise it "
            "only for very large DICOM files"
        )
    for host in ingest.redirect_hosts:
        if not re.fullmatch(_HOST_PORT, host):
            raise SettingsError(
                f"ingest.redirect_hosts: {host!r} is not a host name or host:port (no scheme, "
                "path or user); e.g. downloads.example.org or mirror.example.org:8443"
            )
    if ingest.window.width <= 0:
        raise SettingsError("ingest.window.width: must be > 0 Hounsfield units")
    for group, value in (("split", split), ("validate", validate)):
        if not -1 <= value.near_duplicate_distance <= 256:
            raise SettingsError(
                f"{group}.near_duplicate_distance: must be in -1..256 (bits of the 256-bit "
                "perceptual hash; -1 turns near-duplicate detection off)"
            )
    if resize.workers < 0:
        raise SettingsError("resize.workers: must be >= 0 (0 = all cores)")
    if ingest.synthetic_series < 1:
        raise SettingsError("ingest.synthetic_series: must be >= 1 slice per synthetic patient")
    for key, value in (
        ("split.series_similarity", split.series_similarity),
        ("validate.series_similarity", validate.series_similarity),
    ):
        if value != -1 and not 0.0 < value <= 1.0:
            raise SettingsError(
                f"{key}: must be a thumbnail correlation in (0, 1], or -1 for off; got {value}"
            )
    if not 0.0 <= validate.max_near_copy_share <= 1.0:
        raise SettingsError("validate.max_near_copy_share: must be a share in 0..1")
    if validate.min_series_per_class < 0:
        raise SettingsError("validate.min_series_per_class: must be >= 0 (0 turns it off)")
    if validate.min_class_count < 0 or validate.min_file_bytes < 0:
        raise SettingsError("validate.min_class_count and validate.min_file_bytes: must be >= 0")
    if not 1 <= validate.min_side <= validate.max_side:
        raise SettingsError("validate.min_side, validate.max_side: need 1 <= min_side <= max_side")
    if validate.max_imbalance < 1:
        raise SettingsError("validate.max_imbalance: must be >= 1 (largest / smallest class)")
    if validate.min_std < 0 or validate.shortcut_margin < 0 or validate.shortcut_min_images < 0:
        raise SettingsError(
            "validate.min_std, validate.shortcut_margin and validate.shortcut_min_images: "
            "must be >= 0"
        )


def _check_model_and_training(model: BaseModelParams, train: TrainParams) -> None:
    """base_model and train values that no stage can run with."""
    texture = model.texture
    if texture.max_iter < 1 or texture.max_leaf_nodes < 2 or texture.threads < 1:
        raise SettingsError(
            "base_model.texture: max_iter and threads must be >= 1 and max_leaf_nodes >= 2, "
            f"got {texture.max_iter}, {texture.threads} and {texture.max_leaf_nodes}"
        )
    if not 0 < texture.learning_rate <= 1 or not 0 < texture.max_features <= 1:
        raise SettingsError(
            "base_model.texture: learning_rate and max_features must be in (0, 1], got "
            f"{texture.learning_rate} and {texture.max_features}"
        )
    if texture.l2_regularization < 0:
        raise SettingsError("base_model.texture.l2_regularization: must be >= 0")
    if not 1 <= texture.bag <= 20:
        raise SettingsError(
            f"base_model.texture.bag: the number of boosters must be 1..20, got {texture.bag}"
        )
    weights = model.weights
    if weights not in ("none", "imagenet") and not weights.endswith((".h5", ".keras")):
        raise SettingsError(
            f"base_model.weights: {weights!r} is not allowed; use none, imagenet or a path to "
            "a .h5/.weights.h5/.keras file"
        )
    if model.architecture == "small_cnn" and weights == "imagenet":
        raise SettingsError(
            "base_model.weights: small_cnn has no imagenet weights; use none, a path to a "
            ".weights.h5/.keras file, or a pretrained architecture"
        )
    if model.freeze == "backbone" and weights == "none":
        raise SettingsError(
            "base_model.freeze: backbone would keep randomly initialised weights fixed "
            "(base_model.weights is none); use auto or none, or give pretrained weights"
        )
    if train.ensemble < 1:
        raise SettingsError(
            f"train.ensemble: must be at least 1 (1: one model), got {train.ensemble}"
        )
    if train.bn_recalibration < 0:
        raise SettingsError("train.bn_recalibration: must be >= 0 (0 turns it off)")
    if train.weight_decay < 0:
        raise SettingsError("train.weight_decay: must be >= 0")
    if not 0 <= train.label_smoothing < 1:
        raise SettingsError("train.label_smoothing: must be in [0, 1)")
    if not 0 < train.reduce_lr.factor < 1:
        raise SettingsError("train.reduce_lr.factor: must be in (0, 1)")
    if train.reduce_lr.patience < 1:
        raise SettingsError("train.reduce_lr.patience: must be at least 1")
    if train.reduce_lr.min_learning_rate < 0:
        raise SettingsError("train.reduce_lr.min_learning_rate: must be >= 0")
    if train.fine_tune.unfreeze_top < 0:
        raise SettingsError("train.fine_tune.unfreeze_top: must be >= 0 (0: no second phase)")
    if train.fine_tune.epochs < 1:
        raise SettingsError("train.fine_tune.epochs: must be at least 1")
    if train.fine_tune.learning_rate <= 0:
        raise SettingsError("train.fine_tune.learning_rate: must be > 0")
    augment = train.augment
    for name in ("rotation", "zoom", "contrast"):
        if not 0 <= getattr(augment, name) < 1:
            raise SettingsError(f"train.augment.{name}: must be in [0, 1) (0 turns it off)")


def find_root(start: Path | None = None) -> Path:
    """The project root: CHESTCT_ROOT, else the nearest folder upwards holding dvc.yaml."""
    if env := os.environ.get("CHESTCT_ROOT"):
        return Path(env).resolve()
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file() and (folder / "config").is_dir():
            return folder
    return here


def _check_serving(serving: ServingConfig) -> None:
    """serving.* values the predictor cannot run with."""
    if serving.max_upload_mb <= 0:
        raise SettingsError("serving.max_upload_mb: must be > 0 (megabytes per request)")
    if serving.max_batch_files < 1:
        raise SettingsError("serving.max_batch_files: must be at least 1")
    if serving.max_image_pixels < 1024:
        raise SettingsError("serving.max_image_pixels: must be at least 1024 (32 x 32)")
    if serving.max_decoded_mb < 1:
        raise SettingsError("serving.max_decoded_mb: must be at least 1 (a 512 x 512 slice)")
    if serving.mc_dropout_samples < 0 or serving.reload_check_s < 0:
        raise SettingsError("serving.mc_dropout_samples and serving.reload_check_s: must be >= 0")
    if serving.inference_threads < 1:
        raise SettingsError("serving.inference_threads: must be at least 1")
    if serving.audit_log and not serving.audit_db:
        raise SettingsError("serving.audit_db: set a file path when serving.audit_log is true")
    if serving.feedback_per_minute < 1:
        raise SettingsError("serving.feedback_per_minute: must be at least 1")
    if serving.audit_max_rows < 0 or serving.audit_retention_days < 0:
        raise SettingsError(
            "serving.audit_max_rows and serving.audit_retention_days: must be >= 0 (0 keeps all)"
        )


def _check_monitor(monitor: MonitorConfig) -> None:
    """monitor.* values the monitor cannot judge with."""
    for name in ("window_requests", "min_requests", "min_labelled", "live_window"):
        if getattr(monitor, name) < 1:
            raise SettingsError(f"monitor.{name}: must be at least 1")
    if monitor.psi_threshold <= 0:
        raise SettingsError("monitor.psi_threshold: must be > 0 (0.25 is a major shift)")
    if not 0 < monitor.p_value < 1:
        raise SettingsError("monitor.p_value: must be in (0, 1), e.g. 0.01")
    if not 0 <= monitor.rate_margin < 1 or not 0 <= monitor.performance_drop < 1:
        raise SettingsError("monitor.rate_margin and monitor.performance_drop: must be in [0, 1)")
    if not monitor.report_dir:
        raise SettingsError("monitor.report_dir: set a folder for the reports")


DOWNLOAD_CACHE_ENV = "CHESTCT_DOWNLOAD_CACHE"


def download_cache() -> Path:
    """Where URL sources keep their verified archives: $CHESTCT_DOWNLOAD_CACHE, else
    $XDG_CACHE_HOME/chestct/downloads, else ~/.cache/chestct/downloads. Outside the project, so
    clones share it and `git clean` keeps it."""
    if os.environ.get(DOWNLOAD_CACHE_ENV):
        return Path(os.environ[DOWNLOAD_CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "chestct" / "downloads"


def validate_params(data: dict[str, Any]) -> Params:
    """A params.yaml mapping -> checked Params (the same checks load_settings makes)."""
    params = build(Params, data, "")
    _check_params(params)
    return params


def load_settings(root: Path | None = None) -> Settings:
    """Read config/config.yaml and params.yaml under `root` into validated settings."""
    root = (root or find_root()).resolve()
    config_path = root / "config" / "config.yaml"
    try:
        config = build(Config, _read_yaml(config_path), "")
        _check_serving(config.serving)
        _check_monitor(config.monitor)
    except SettingsError as exc:
        if str(exc).startswith(str(config_path)):
            raise
        raise SettingsError(f"{config_path}: {exc}") from None
    params_path = root / config.params_file
    try:
        params = validate_params(_read_yaml(params_path))
    except SettingsError as exc:
        if str(exc).startswith(str(params_path)):
            raise
        raise SettingsError(f"{params_path.name}: {exc}") from None
    paths = Paths(
        root=root,
        artifacts=root / config.artifacts_dir,
        model=root / config.model_dir,
        params_file=params_path,
        reports=root / config.reports_dir,
        audit_db=root / config.serving.audit_db,
        downloads=download_cache(),
    )
    return Settings(params=params, config=config, paths=paths)
