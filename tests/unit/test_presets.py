"""python -m chestct.cli.presets: a preset merged into params.yaml, comments kept, bad keys
refused."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from chestct.cli import presets
from chestct.settings import load_settings

ROOT = Path(__file__).resolve().parents[2]


def committed_params() -> str:
    """params.yaml as committed: the working tree's may hold a preset already (the README's
    real-data step), and these tests merge presets into the defaults."""
    done = subprocess.run(
        ["git", "show", "HEAD:params.yaml"], cwd=ROOT, capture_output=True, text=True
    )
    if done.returncode != 0:  # not a git checkout (an unpacked sdist): the file is the default
        return (ROOT / "params.yaml").read_text(encoding="utf-8")
    return done.stdout


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    (root / "config").mkdir(parents=True)
    shutil.copy(ROOT / "config" / "config.yaml", root / "config" / "config.yaml")
    (root / "params.yaml").write_text(committed_params(), encoding="utf-8")
    (root / "dvc.yaml").write_text("stages: {}\n")
    return root


def test_the_real_data_preset_merges_with_its_two_paths(project: Path) -> None:
    params = project / "params.yaml"
    before = params.read_text()
    rc = presets.main(
        [
            str(ROOT / "config" / "presets" / "real-data.yaml"),
            "--set",
            "ingest.source=/data/chest-ct/train",
            "--set",
            "evaluate.external=/data/chest-ct/valid",
            "--params",
            str(params),
        ]
    )
    assert rc == 0
    after = params.read_text()
    settings = load_settings(project).params
    preset = yaml.safe_load((ROOT / "config" / "presets" / "real-data.yaml").read_text())
    assert settings.ingest.source == "/data/chest-ct/train"
    assert settings.evaluate.external == "/data/chest-ct/valid"
    assert settings.resize.intensity == preset["resize"]["intensity"]
    assert settings.train.epochs == preset["train"]["epochs"]
    assert settings.train.augment.blur == preset["train"]["augment"]["blur"]
    # Keys the preset leaves alone keep their values; comments and inline lists survive.
    assert settings.base_model.family == preset["base_model"]["family"]
    assert settings.base.image_size == preset["base"]["image_size"]
    assert settings.evaluate.batch_size == yaml.safe_load(before)["evaluate"]["batch_size"]
    assert after.count("#") == before.count("#")
    assert "filters: [16, 32, 64, 128, 256]" in after
    changed = [a for a, b in zip(after.splitlines(), before.splitlines(), strict=True) if a != b]
    assert 5 < len(changed) < 30, changed


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "train.epoch=3"], "preset key 'train.epoch' is not in params.yaml"),
        (["--set", "resize.intensity=sharpen"], "resize.intensity"),
        (["--set", "train.epochs"], "expected KEY.PATH=VALUE"),
        (["--set", "train.epochs=0"], "train.epochs: must be at least 1"),
    ],
)
def test_a_bad_preset_is_refused_and_params_yaml_is_untouched(
    project: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    params = project / "params.yaml"
    before = params.read_bytes()
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    assert presets.main([str(empty), *args, "--params", str(params)]) == 2
    assert message in capsys.readouterr().err
    assert params.read_bytes() == before
    assert sorted(p.name for p in project.iterdir()) == ["config", "dvc.yaml", "params.yaml"]


def test_a_missing_or_malformed_preset_file_is_named(
    project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params = project / "params.yaml"
    assert presets.main([str(tmp_path / "nope.yaml"), "--params", str(params)]) == 2
    assert "preset file not found" in capsys.readouterr().err
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    assert presets.main([str(listed), "--params", str(params)]) == 2
    assert "a preset is a mapping" in capsys.readouterr().err
