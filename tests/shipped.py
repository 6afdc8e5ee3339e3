"""The project's params.yaml and config/config.yaml as settings: what tests build groups from.

No settings dataclass has a default; a test takes a group as the repository's files set it,
with its own changes on top: `shipped(SplitParams, mode="pool")`.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, TypeVar

import yaml

from chestct.settings import Settings, load_settings, pick

REPO = Path(__file__).resolve().parents[1]
G = TypeVar("G")


@functools.cache
def repository_settings() -> Settings:
    """The repository's own settings (read once per test process)."""
    return load_settings(REPO)


def shipped(cls: type[G], /, **changes: Any) -> G:
    """Group `cls` as the repository's params.yaml or config.yaml sets it, with `changes`."""
    settings = repository_settings()
    tree = settings.config if cls.__name__.endswith("Config") else settings.params
    return pick(tree, cls, **changes)


def _merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for name, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(name), dict):
            out[name] = _merged(out[name], value)
        else:
            out[name] = value
    return out


def config_text(changes: dict[str, Any]) -> str:
    """The repository's config/config.yaml with `changes` merged in, group by group (a test's
    config sets every key, as any config.yaml must)."""
    text = (REPO / "config" / "config.yaml").read_text(encoding="utf-8")
    return yaml.safe_dump(_merged(yaml.safe_load(text), changes), sort_keys=False)
