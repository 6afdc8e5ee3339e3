"""`python -m chestct.cli.repro` finds dvc in its own environment, not only on PATH."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from chestct.cli.repro import ReproError, dvc_path


def _python_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A venv-like bin/ whose python is this interpreter's path, and a PATH without it."""
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    return bin_dir


def test_dvc_next_to_the_interpreter_is_used_without_an_activated_venv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = _python_in(tmp_path, monkeypatch)
    dvc = bin_dir / "dvc"
    dvc.write_text("#!/bin/sh\n", encoding="utf-8")
    dvc.chmod(0o755)
    found, path = dvc_path()
    assert found == str(dvc)
    # The stages' `python -m chestct.stages.*` then resolves to the same environment.
    assert path.split(os.pathsep)[0] == str(bin_dir)


def test_no_dvc_anywhere_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _python_in(tmp_path, monkeypatch)
    with pytest.raises(ReproError, match="make venv"):
        dvc_path()
