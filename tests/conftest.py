"""Shared fixtures: a tiny promoted model folder for serving tests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

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
    from chestct.modeling import build_model
    from chestct.settings import BaseModelParams

    folder = tmp_path_factory.mktemp("model")
    model = build_model(BaseModelParams(filters=[4, 8]), image_size=32, seed=0)
    model.save(folder / "model.keras")
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
    (folder / "model.json").write_text(json.dumps(card), encoding="utf-8")
    return folder
