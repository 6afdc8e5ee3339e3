"""Fixtures of the stage tier: one tiny dataset, base model and training run per session,
shared by the base-model, train, evaluate and promote tests (which must not change them)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from chestct.settings import (
    AugmentParams,
    TrainParams,
)
from helpers import (
    IMAGE_SIZE,
    TINY_MODEL,
    tiny_split,
)
from shipped import shipped


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, pd.DataFrame]]:
    root = tmp_path_factory.mktemp("tiny_data")
    return root, {
        "train": tiny_split(root, "train", 2, 0),
        "valid": tiny_split(root, "valid", 1, 1000),
        "test": tiny_split(root, "test", 1, 2000),
    }


@pytest.fixture(scope="session")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from chestct.stages.base_model import run_base_model

    out = tmp_path_factory.mktemp("base-model")
    return run_base_model(TINY_MODEL, IMAGE_SIZE, 0, out)


@pytest.fixture(scope="session")
def trained(base_model: Path, tiny_data, tmp_path_factory: pytest.TempPathFactory):
    from chestct.stages.train import run_train

    root, data = tiny_data
    epochs: list[tuple[int, dict[str, float]]] = []
    params = shipped(
        TrainParams,
        epochs=2,
        batch_size=4,
        patience=5,
        augment=shipped(AugmentParams, rotation=0.0, zoom=0.0),
    )
    result = run_train(
        base_model,
        data["train"],
        data["valid"],
        params,
        seed=0,
        root=root,
        on_epoch=lambda logs, epoch: epochs.append((epoch, logs)),
    )
    path = tmp_path_factory.mktemp("train") / "model.keras"
    result.model.save(path)
    return result, epochs, path
