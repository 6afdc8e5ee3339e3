"""Wrong ingest/split/resize/validate params are named, with the allowed keys or values."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from chestct.settings import SettingsError, load_settings

REPO = Path(__file__).resolve().parents[2]


def settings_with(tmp_path: Path, group: str, values: dict) -> object:
    shutil.copytree(REPO / "config", tmp_path / "config")
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    params[group] = {**params[group], **values}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    (tmp_path / "dvc.yaml").write_text("stages: {}\n", encoding="utf-8")
    return load_settings(tmp_path)


def test_defaults_load(tmp_path: Path) -> None:
    s = settings_with(tmp_path, "split", {})
    assert s.params.split.mode == "keep"
    assert s.params.resize.mode == "stretch"
    assert (s.params.ingest.window.level, s.params.ingest.window.width) == (-600.0, 1500.0)
    assert s.params.validate.quarantine is False


@pytest.mark.parametrize(
    ("group", "values", "message"),
    [
        ("split", {"mode": "shuffle"}, "split.mode: 'shuffle' is not allowed; use one of 'keep'"),
        ("split", {"dedupe": True}, "split.dedupe: True is not allowed; use one of 'report'"),
        ("resize", {"mode": "fit"}, "resize.mode: 'fit' is not allowed; use one of 'stretch'"),
        ("resize", {"worker": 2}, "resize: unknown key 'worker'; allowed keys are interpolation"),
        ("resize", {"workers": -1}, "resize.workers: must be >= 0"),
        ("ingest", {"window": {"level": -600, "width": 0}}, "ingest.window.width: must be > 0"),
        ("ingest", {"window": {"centre": 40}}, "unknown key 'centre'; allowed keys"),
        ("ingest", {"source": "https://x.org/ct.zip"}, "ingest.sha256: required when"),
        ("ingest", {"sha256": "abc"}, "ingest.sha256: 'abc' is not a sha256 (64 hex digits)"),
        ("ingest", {"timeout_s": 0}, "ingest.timeout_s: must be > 0"),
        ("split", {"near_duplicate_distance": 300}, "near_duplicate_distance: must be in -1"),
        ("validate", {"quarantine": "yes"}, "validate.quarantine: expected true or false, got"),
        ("validate", {"severities": {"shortcut": "fatal"}}, "severities.shortcut: 'fatal'"),
        ("validate", {"min_side": 100, "max_side": 50}, "validate.min_side, validate.max_side"),
        ("validate", {"max_imbalance": 0.5}, "validate.max_imbalance: must be >= 1"),
        ("validate", {"allowed_modes": "L"}, "validate.allowed_modes: expected a list, got 'L'"),
    ],
)
def test_bad_values_are_named(tmp_path: Path, group: str, values: dict, message: str) -> None:
    with pytest.raises(SettingsError) as info:
        settings_with(tmp_path, group, values)
    assert message in str(info.value)
