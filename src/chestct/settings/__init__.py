"""Typed, validated settings: params.yaml (what changes results) and config/config.yaml (where).

The YAML files hold every value; the frozen dataclasses here declare each key once, with its
type, allowed values or range and description, and hold no default (a missing key is an error
naming it). Every path the project uses is built here, once, from the project root. Stages
receive these dataclasses; nothing else reads the YAML files. Code without a stage's settings
(tools, benches, tests) takes a group as the project's files set it with `defaults`.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, TypeVar

import yaml

from chestct.settings.checks import check_params
from chestct.settings.config import (
    STAGES,
    Config,
    MonitorConfig,
    Paths,
    ServingConfig,
    Settings,
    TrackingConfig,
    check_config,
)
from chestct.settings.data_params import (
    BaseParams,
    IngestParams,
    ResizeParams,
    SplitParams,
    ValidateParams,
    WindowParams,
)
from chestct.settings.model_params import (
    AugmentParams,
    BaseModelParams,
    EvaluateParams,
    FineTuneParams,
    PromoteParams,
    ReduceLrParams,
    TextureParams,
    TrainParams,
)
from chestct.settings.params import Params
from chestct.settings.schema import SettingsError, build
from chestct.settings.secrets import URL_ENV, secret_in_url

__all__ = [
    "DOWNLOAD_CACHE_ENV",
    "STAGES",
    "URL_ENV",
    "AugmentParams",
    "BaseModelParams",
    "BaseParams",
    "Config",
    "EvaluateParams",
    "FineTuneParams",
    "IngestParams",
    "MonitorConfig",
    "Params",
    "Paths",
    "PromoteParams",
    "ReduceLrParams",
    "ResizeParams",
    "ServingConfig",
    "Settings",
    "SettingsError",
    "SplitParams",
    "TextureParams",
    "TrackingConfig",
    "TrainParams",
    "ValidateParams",
    "WindowParams",
    "build",
    "defaults",
    "download_cache",
    "find_root",
    "load_settings",
    "pick",
    "secret_in_url",
    "validate_config",
    "validate_params",
]

DOWNLOAD_CACHE_ENV = "CHESTCT_DOWNLOAD_CACHE"
G = TypeVar("G")


def find_root(start: Path | None = None) -> Path:
    """The project root: CHESTCT_ROOT, else the nearest folder upwards holding dvc.yaml."""
    if env := os.environ.get("CHESTCT_ROOT"):
        return Path(env).resolve()
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file() and (folder / "config").is_dir():
            return folder
    return here


def download_cache() -> Path:
    """Where URL sources keep their verified archives: $CHESTCT_DOWNLOAD_CACHE, else
    $XDG_CACHE_HOME/chestct/downloads, else ~/.cache/chestct/downloads. Outside the project, so
    clones share it and `git clean` keeps it."""
    if os.environ.get(DOWNLOAD_CACHE_ENV):
        return Path(os.environ[DOWNLOAD_CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "chestct" / "downloads"


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML file's top-level mapping, or a SettingsError naming the file."""
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


def validate_params(data: dict[str, Any]) -> Params:
    """A params.yaml mapping -> checked Params (the same checks load_settings makes)."""
    params = build(Params, data, "")
    check_params(params)
    return params


def validate_config(data: dict[str, Any]) -> Config:
    """A config/config.yaml mapping -> checked Config (the same checks load_settings makes)."""
    config = build(Config, data, "")
    check_config(config)
    return config


def _named(path: Path, label: str, check: Any) -> Any:
    """`check(read_yaml(path))`, its SettingsError prefixed with `label` once."""
    try:
        return check(read_yaml(path))
    except SettingsError as exc:
        if str(exc).startswith(str(path)):
            raise
        raise SettingsError(f"{label}: {exc}") from None


def load_settings(root: Path | None = None) -> Settings:
    """Read config/config.yaml and params.yaml under `root` into validated settings."""
    root = (root or find_root()).resolve()
    config_path = root / "config" / "config.yaml"
    config: Config = _named(config_path, str(config_path), validate_config)
    params_path = root / config.params_file
    params: Params = _named(params_path, params_path.name, validate_params)
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


def pick(tree: Params | Config, cls: type[G], **changes: Any) -> G:
    """The group of type `cls` inside `tree` (e.g. SplitParams in Params), with `changes` on
    top (dataclasses.replace: the field names are checked, the values are not)."""
    todo: list[Any] = [tree]
    while todo:
        node = todo.pop(0)
        if isinstance(node, cls):
            return dataclasses.replace(node, **changes)
        todo += [getattr(node, f.name) for f in dataclasses.fields(node)]
        todo = [n for n in todo if dataclasses.is_dataclass(n)]
    raise TypeError(f"{cls.__name__} is not a group of {type(tree).__name__}")


def defaults(cls: type[G], /, root: Path | None = None, **changes: Any) -> G:
    """Group `cls` as the project's params.yaml or config/config.yaml sets it (the project at
    `root`, else find_root()), with `changes` on top: for tools, benches and tests that need a
    whole group without a stage's settings. Every value still comes from the files."""
    settings = load_settings(root)
    tree = settings.config if cls.__name__.endswith("Config") else settings.params
    return pick(tree, cls, **changes)
