"""Fixtures of every tier: the environment, the tiny reproduced project, the model folders."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from model_folder import add_reference, write_model_folder
from shipped import shipped

REPO = Path(__file__).resolve().parents[1]

# Keep TF and MLflow quiet and offline in every test process.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")


@pytest.fixture(scope="session", autouse=True)
def _private_download_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """URL sources cache archives under the user's home; tests keep theirs in a temp folder."""
    os.environ["CHESTCT_DOWNLOAD_CACHE"] = str(tmp_path_factory.mktemp("downloads"))


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """The whole pipeline reproduced once per session in a tiny copy: (root, environment).

    Shared by the end-to-end and notebook tests; they read it and must not change it.
    """
    from project_copy import reproduced_copy

    return reproduced_copy(tmp_path_factory.mktemp("project"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """model/ as promote writes it, with an untrained 32x32 model (enough to test serving)."""
    from chestct.labels import CLASSES, DISPLAY_NAMES
    from chestct.model.modeling import build_model
    from chestct.modelfolder import write_model_folder
    from chestct.settings import BaseModelParams

    parts = tmp_path_factory.mktemp("tiny-model")
    model = build_model(shipped(BaseModelParams, filters=[4, 8]), image_size=32, seed=0)
    model.save(parts / "model.keras")
    card = {
        "name": "chestct",
        "version": "1",
        "classes": list(CLASSES),
        "display_names": DISPLAY_NAMES,
        "image_size": 32,
        "preprocessing": {"resize": "stretch", "interpolation": "area"},
        "model_file": "model.keras",
        "metrics": {"macro_f1": 0.5},
        "mlflow_run_ids": {"train": "0" * 32},
    }
    # A card from before the digests and the full preprocessing entry, as some folders are.
    folder = parts / "model"
    write_model_folder(folder, card, {"model.keras": parts / "model.keras"}, pin=False)
    return folder


def _session_model(factory: pytest.TempPathFactory, name: str, **options: Any) -> Path:
    """Build once per test session, under the session's base temp folder (a child process
    builds it: see model_folder)."""
    folder = factory.getbasetemp() / "serving-models" / name / "model"
    if not (folder / "model.json").is_file():
        write_model_folder(folder, **options)
    return folder


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete model folder (light artifact, temperature, thresholds, cam, ood)."""
    return _session_model(tmp_path_factory, "v1")


@pytest.fixture(scope="session")
def second_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Version 2 of the model folder: other weights, so its answers differ from version 1."""
    return _session_model(tmp_path_factory, "v2", version="2", seed=7)


@pytest.fixture(scope="session")
def monitored_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model trained a little on synthetic slices (so that the predicted class follows the
    slice's class), with its reference profile."""
    folder = _session_model(tmp_path_factory, "trained64", size=64, train_epochs=30)
    if not (folder / "reference.json").is_file():
        add_reference(folder)
    return folder
