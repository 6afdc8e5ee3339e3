"""base-model (run_base_model): a loadable initial model, seeded weights, and weights errors as
stage failures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from chestct.labels import CLASSES
from chestct.runner import StageFailed
from chestct.settings import (
    BaseModelParams,
)
from helpers import (
    IMAGE_SIZE,
    TINY_MODEL,
)
from shipped import shipped


def test_base_model_writes_a_loadable_model(base_model: Path) -> None:
    from chestct.model.modeling import load_model

    assert base_model.name == "model.keras"
    assert [p.name for p in base_model.parent.iterdir()] == ["model.keras"]
    model = load_model(base_model)
    assert tuple(model.input_shape) == (None, IMAGE_SIZE, IMAGE_SIZE, 1)
    assert tuple(model.output_shape) == (None, len(CLASSES))
    assert [model.get_layer(f"conv{i}").filters for i in range(2)] == [4, 8]
    proba = model.predict(np.zeros((2, IMAGE_SIZE, IMAGE_SIZE, 1), np.float32), verbose=0)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)


def test_base_model_weights_depend_on_the_seed_only(tmp_path: Path, base_model: Path) -> None:
    from chestct.model.modeling import load_model
    from chestct.stages.base_model import run_base_model

    same = load_model(run_base_model(TINY_MODEL, IMAGE_SIZE, 0, tmp_path / "same"))
    other = load_model(run_base_model(TINY_MODEL, IMAGE_SIZE, 1, tmp_path / "other"))
    reference = load_model(base_model).get_layer("conv0").get_weights()[0]
    np.testing.assert_array_equal(same.get_layer("conv0").get_weights()[0], reference)
    assert not np.array_equal(other.get_layer("conv0").get_weights()[0], reference)


SIZE = 32


def test_base_model_stage_turns_weights_errors_into_a_stage_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from chestct.stages.base_model import run_base_model

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr("chestct.model.modeling.host_reachable", lambda url: False)
    with pytest.raises(StageFailed, match="cannot be downloaded"):
        run_base_model(
            shipped(BaseModelParams, architecture="resnet50", weights="imagenet"),
            SIZE,
            0,
            tmp_path / "out",
        )
    assert not (tmp_path / "out" / "model.keras").exists()
