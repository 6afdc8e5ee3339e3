"""load_settings: the project's YAML files become validated, typed settings or a clear error."""

from __future__ import annotations

import dataclasses
import functools
import re
import shutil
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from chestct.settings import (
    STAGES,
    Params,
    ServingConfig,
    SettingsError,
    SplitParams,
    defaults,
    load_settings,
    pick,
    validate_params,
)
from chestct.settings.schema import Rule, bounds_text, rule_of

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project root with the repository's config.yaml and params.yaml and an empty dvc.yaml."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("CHESTCT_ROOT", raising=False)
    (tmp_path / "config").mkdir()
    shutil.copy(REPO / "config" / "config.yaml", tmp_path / "config" / "config.yaml")
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "dvc.yaml").touch()
    return tmp_path


def edit_yaml(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    with path.open(encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    change(data)
    with path.open("w", encoding="utf-8") as fh:
        yaml.safe_dump(data, fh)


def edit_params(root: Path, change: Callable[[dict[str, Any]], None]) -> None:
    edit_yaml(root / "params.yaml", change)


def config_uri(root: Path) -> str:
    with (root / "config" / "config.yaml").open(encoding="utf-8") as fh:
        return yaml.safe_load(fh)["tracking"]["uri"]


def params_error(root: Path, change: Callable[[dict[str, Any]], None]) -> str:
    edit_params(root, change)
    with pytest.raises(SettingsError) as info:
        load_settings(root)
    return str(info.value)


def test_repository_files_load_with_every_value_as_written(root: Path) -> None:
    with (root / "params.yaml").open(encoding="utf-8") as fh:
        written = yaml.safe_load(fh)
    settings = load_settings(root)
    for group, values in written.items():
        assert settings.params.group(group) == values, group
    assert settings.config.tracking.uri == config_uri(root)
    assert settings.paths.root == root.resolve()
    assert settings.paths.artifacts == root.resolve() / "artifacts"
    assert settings.paths.model == root.resolve() / "model"
    assert settings.paths.params_file == root.resolve() / "params.yaml"


def test_an_empty_params_file_gives_the_defaults(root: Path) -> None:
    """The defaults live in the shipped params.yaml alone: a file without a key is refused
    with the key's name, where it goes and where its shipped value is written."""
    (root / "params.yaml").write_text("", encoding="utf-8")
    with pytest.raises(SettingsError) as info:
        load_settings(root)
    assert str(info.value) == (
        "params.yaml: top level: missing key 'base'; every key is set in the file, none has a "
        "built-in default: add `base: <value>` (its shipped value and range are in "
        "docs/params.md)"
    )
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    assert load_settings(root).params == validate_params(
        yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    )
    message = params_error(root, lambda p: p["train"]["augment"].pop("blur"))
    assert "train.augment: missing key 'blur'" in message
    assert "add `blur: <value>` under `train.augment`" in message


def test_settings_are_frozen(root: Path) -> None:
    settings = load_settings(root)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.params.train.epochs = 1  # type: ignore[misc]


def test_ints_are_accepted_where_floats_are_expected(root: Path) -> None:
    edit_params(root, lambda p: p["train"].update(learning_rate=1))
    rate = load_settings(root).params.train.learning_rate
    assert rate == 1.0
    assert isinstance(rate, float)


def test_unknown_top_level_key_is_named_with_the_allowed_keys(root: Path) -> None:
    message = params_error(root, lambda p: p.update(trian={"epochs": 3}))
    assert "params.yaml" in message
    assert "unknown key 'trian'" in message
    assert "allowed keys are base, ingest, split, resize, validate, base_model, train" in message


def test_unknown_nested_key_is_named_with_the_allowed_keys(root: Path) -> None:
    message = params_error(root, lambda p: p["train"].update(learning_rat=0.1))
    assert message.startswith("params.yaml: train: unknown key 'learning_rat'")
    assert "learning_rate" in message.split("allowed keys are", 1)[1]


def test_unknown_key_two_levels_down_names_its_group(root: Path) -> None:
    message = params_error(root, lambda p: p["train"]["augment"].update(flipp=True))
    assert "train.augment: unknown key 'flipp'" in message
    assert "flip, rotation, zoom, contrast" in message


@pytest.mark.parametrize(
    ("group", "key", "value", "expected"),
    [
        ("train", "epochs", "ten", "train.epochs: expected an integer, got 'ten'"),
        ("train", "epochs", 2.5, "train.epochs: expected an integer"),
        ("train", "epochs", True, "train.epochs: expected an integer"),
        ("train", "learning_rate", "fast", "train.learning_rate: expected a number"),
        ("base", "seed", None, "base.seed: expected an integer, got None"),
        ("base_model", "filters", 16, "base_model.filters: expected a list"),
        ("base_model", "filters", [16, "x"], "base_model.filters[1]: expected an integer"),
        ("ingest", "source", 3, "ingest.source: expected a string"),
        ("train", "augment", "yes", "train.augment: expected a mapping"),
    ],
)
def test_wrong_type_names_the_key(
    root: Path, group: str, key: str, value: Any, expected: str
) -> None:
    message = params_error(root, lambda p: p[group].update({key: value}))
    assert expected in message


def test_literal_out_of_range_names_the_allowed_values(root: Path) -> None:
    message = params_error(root, lambda p: p["validate"].update(fail_on="sometimes"))
    assert "validate.fail_on" in message
    assert "'sometimes' is not allowed" in message
    assert "'error', 'warning', 'never'" in message


@pytest.mark.parametrize(
    ("valid", "test"),
    [(0.5, 0.5), (0.7, 0.4), (0.0, 0.2), (0.2, -0.1)],
)
def test_split_fractions_must_be_positive_and_sum_below_one(
    root: Path, valid: float, test: float
) -> None:
    message = params_error(
        root, lambda p: p["split"].update(valid_fraction=valid, test_fraction=test)
    )
    assert "split.valid_fraction and split.test_fraction" in message


@pytest.mark.parametrize(
    ("group", "values", "expected"),
    [
        ("base", {"image_size": 8}, "base.image_size: must be at least 16"),
        ("train", {"epochs": 0}, "train.epochs: must be at least 1"),
        ("train", {"batch_size": 0}, "train.batch_size: must be at least 1"),
        ("train", {"learning_rate": 0}, "train.learning_rate: must be > 0"),
        ("train", {"ensemble": 0}, "train.ensemble: must be at least 1"),
        ("base_model", {"dropout": 1.0}, "base_model.dropout: must be in [0, 1)"),
        (
            "ingest",
            {"synthetic_per_class": {"training": 3}},
            "ingest.synthetic_per_class: unknown split 'training'",
        ),
    ],
)
def test_cross_field_checks(root: Path, group: str, values: dict[str, Any], expected: str) -> None:
    assert expected in params_error(root, lambda p: p[group].update(values))


def test_tracking_uri_comes_from_config_without_the_environment(root: Path) -> None:
    assert load_settings(root).tracking_uri == config_uri(root)


def test_mlflow_tracking_uri_overrides_config(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    settings = load_settings(root)
    assert settings.tracking_uri == "http://127.0.0.1:5999"
    assert settings.config.tracking.uri == config_uri(root) != settings.tracking_uri


def test_missing_params_file_is_named(root: Path) -> None:
    (root / "params.yaml").unlink()
    with pytest.raises(SettingsError, match=r"params\.yaml: file not found") as info:
        load_settings(root)
    assert str(root / "params.yaml") in str(info.value)


def test_params_file_that_is_not_a_mapping(root: Path) -> None:
    (root / "params.yaml").write_text("- 1\n- 2\n", encoding="utf-8")
    with pytest.raises(SettingsError, match="expected a mapping at the top level"):
        load_settings(root)


def test_params_file_that_is_not_yaml(root: Path) -> None:
    (root / "params.yaml").write_text("train: [1, 2\n", encoding="utf-8")
    with pytest.raises(SettingsError, match="not valid YAML"):
        load_settings(root)


def test_config_chooses_folders_and_params_file(root: Path) -> None:
    shutil.move(root / "params.yaml", root / "other.yaml")
    edit_yaml(
        root / "config" / "config.yaml",
        lambda c: c.update(artifacts_dir="out", model_dir="served", params_file="other.yaml"),
    )
    paths = load_settings(root).paths
    assert paths.params_file == root.resolve() / "other.yaml"
    assert paths.stage_dir("base-model") == root.resolve() / "out" / "base-model"
    assert paths.pointer("train") == root.resolve() / "out" / "train" / "pointer.json"
    assert paths.model == root.resolve() / "served"


def test_every_stage_has_a_folder_and_unknown_stages_are_refused(root: Path) -> None:
    paths = load_settings(root).paths
    assert [paths.stage_dir(s).name for s in STAGES] == list(STAGES)
    with pytest.raises(SettingsError, match="unknown stage 'base_model'"):
        paths.stage_dir("base_model")


def test_unknown_config_key_names_the_config_file(root: Path) -> None:
    edit_yaml(root / "config" / "config.yaml", lambda c: c["tracking"].update(url="x"))
    with pytest.raises(SettingsError) as info:
        load_settings(root)
    message = str(info.value)
    assert message.startswith(str(root.resolve() / "config" / "config.yaml"))
    assert "tracking: unknown key 'url'" in message
    assert "uri, experiment, connect_timeout_s" in message


def test_missing_config_file_names_the_path_once(root: Path) -> None:
    config = root / "config" / "config.yaml"
    config.unlink()
    with pytest.raises(SettingsError, match="file not found") as info:
        load_settings(root)
    assert str(info.value).count(str(config.resolve())) == 1


@pytest.mark.parametrize(
    ("group", "values", "key"),
    [
        ("base", {"seed": -1}, "base.seed"),  # generate_synthetic / keras.set_random_seed
        ("ingest", {"synthetic_per_class": {"train": -2}}, "ingest.synthetic_per_class"),
        ("evaluate", {"batch_size": 0}, "evaluate.batch_size"),  # tf.data batch(0)
        ("base_model", {"filters": [16, 0]}, "base_model.filters"),  # Conv2D(0)
    ],
)
def test_values_no_stage_can_run_with_are_refused_at_load_time(
    root: Path, group: str, values: dict[str, Any], key: str
) -> None:
    assert key in params_error(root, lambda p: p[group].update(values))


def test_pyproject_license_is_an_spdx_string() -> None:
    """`make venv` installs the package; a `license = { text = ... }` table made setuptools
    print a BuildBackendWarning (three times) on every install."""
    import tomllib

    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    assert isinstance(pyproject["project"]["license"], str)
    assert "setuptools>=77" in pyproject["build-system"]["requires"]  # PEP 639 support


def _ranged(cls: type, prefix: str = "") -> Iterator[tuple[str, Rule, bool]]:
    """(dotted key, its rule, whether it holds integers) for every key declared with a range."""
    hints = typing.get_type_hints(cls)
    for item in dataclasses.fields(cls):
        tp = hints[item.name]
        if dataclasses.is_dataclass(tp):
            yield from _ranged(tp, f"{prefix}{item.name}.")
        elif (rule := rule_of(item)) is not None and bounds_text(rule):
            yield f"{prefix}{item.name}", rule, int in (tp, *typing.get_args(tp))


def _outside(rule: Rule, integer: bool) -> list[float]:
    """A value just outside each bound of `rule`."""
    step = 1 if integer else 0.001
    below = [rule.ge - step] if rule.ge is not None else [rule.gt] if rule.gt is not None else []
    above = [rule.le + step] if rule.le is not None else [rule.lt] if rule.lt is not None else []
    return [v for v in below + above if v != rule.off]


def test_every_declared_range_is_enforced_when_the_file_is_read() -> None:
    """Ranges are declared once, on the fields; reading a file checks each of them, for a
    number, each item of a list and each value of a mapping."""
    checked = 0
    for dotted, rule, integer in _ranged(Params):
        for value in _outside(rule, integer):
            data = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
            *parents, leaf = dotted.split(".")
            node = functools.reduce(lambda d, k: d[k], parents, data)
            shipped_value = node[leaf]
            if isinstance(shipped_value, list):
                node[leaf] = [*shipped_value[:-1], value]
            elif isinstance(shipped_value, dict):
                node[leaf] = {"train": value}
            else:
                node[leaf] = value
            with pytest.raises(SettingsError, match=re.escape(dotted) + ": must be"):
                validate_params(data)
            checked += 1
    assert checked > 80, checked


def test_a_config_file_without_a_key_is_refused_with_the_key(root: Path) -> None:
    edit_yaml(root / "config" / "config.yaml", lambda c: c["serving"].pop("audit_db"))
    with pytest.raises(SettingsError) as info:
        load_settings(root)
    assert "serving: missing key 'audit_db'" in str(info.value)
    assert "add `audit_db: <value>` under `serving`" in str(info.value)


def test_defaults_take_a_group_from_the_projects_files(root: Path) -> None:
    edit_params(root, lambda p: p["split"].update(mode="pool", valid_fraction=0.3))
    split = defaults(SplitParams, root=root, test_fraction=0.2)
    assert (split.mode, split.valid_fraction, split.test_fraction) == ("pool", 0.3, 0.2)
    assert defaults(ServingConfig, root=root) == load_settings(root).config.serving
    with pytest.raises(TypeError, match="not a group of Params"):
        pick(load_settings(root).params, ServingConfig)
