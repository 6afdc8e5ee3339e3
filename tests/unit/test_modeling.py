"""modeling: architectures, the layer-name contract, preprocessing inside the model, initial
weights (none, imagenet offline, local files) and the freeze policy."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest

from chestct.labels import CLASSES
from chestct.model.modeling import (
    ARCHITECTURES,
    BACKBONES,
    WeightsError,
    build_model,
    host_reachable,
    with_dtype_policy,
)
from chestct.settings import BaseModelParams, SettingsError
from chestct.settings.checks import check_model
from shipped import shipped

SIZE = 32
CONTRACT = ("features", "gap", "dropout", "logits", "probabilities")


def grey(n: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, SIZE, SIZE, 1)).astype("float32")


@pytest.fixture(scope="module")
def models() -> dict[str, keras.Model]:
    """Every architecture, randomly initialised, at 32 px (built once for the module)."""
    return {
        a: build_model(shipped(BaseModelParams, architecture=a, filters=[4, 8]), SIZE, 0)
        for a in ARCHITECTURES
    }


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_every_architecture_keeps_the_layer_contract(
    models: dict[str, keras.Model], architecture: str
) -> None:
    model = models[architecture]
    assert tuple(model.input_shape) == (None, SIZE, SIZE, 1)
    assert model.inputs[0].dtype == "float32"
    names = [layer.name for layer in model.layers]
    assert [n for n in names if n in CONTRACT] == list(CONTRACT)
    assert len(model.get_layer("features").output.shape) == 4
    logits = model.get_layer("logits")
    assert isinstance(logits, keras.layers.Dense)
    assert logits.units == len(CLASSES)
    assert logits.get_config()["activation"] == "linear"
    assert model.get_layer("probabilities").dtype_policy.compute_dtype == "float32"
    proba = keras.ops.convert_to_numpy(model(grey(), training=False))
    assert proba.dtype == np.float32
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    # Nothing but built-in Keras layers: the saved model loads where chestct is not installed.
    modules = _modules(json.loads(model.to_json()))
    assert modules and all(m.startswith("keras") for m in modules), modules


def _modules(config: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(config, dict):
        if isinstance(config.get("module"), str) and "class_name" in config:
            found.add(config["module"])
        for value in config.values():
            found |= _modules(value)
    elif isinstance(config, list):
        for value in config:
            found |= _modules(value)
    return found


@pytest.mark.parametrize("architecture", list(BACKBONES))
def test_backbone_gets_its_own_preprocessing_of_the_grey_input(
    models: dict[str, keras.Model], architecture: str
) -> None:
    """What reaches the backbone is what its preprocess_input makes of the grey image as RGB."""
    model = models[architecture]
    image = grey(seed=1)
    last = "preprocess" if BACKBONES[architecture].preprocessing == "caffe" else "grey_to_rgb"
    head = keras.Model(model.inputs, model.get_layer(last).output)
    module = {
        "mobilenet_v3_small": keras.applications.mobilenet_v3,
        "efficientnet_b0": keras.applications.efficientnet,
        "resnet50": keras.applications.resnet50,
        "vgg16": keras.applications.vgg16,
    }[architecture]
    expected = module.preprocess_input(np.repeat(image, 3, axis=-1))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(head(image)), expected, atol=1e-4)
    if last == "grey_to_rgb":
        # These applications rescale inside themselves and expect [0, 255].
        backbone = model.get_layer("backbone")
        assert any(isinstance(layer, keras.layers.Rescaling) for layer in backbone.layers)


def test_random_backbone_trains_whole_and_pretrained_one_is_frozen(tmp_path: Path) -> None:
    scratch = build_model(shipped(BaseModelParams, architecture="mobilenet_v3_small"), SIZE, 0)
    assert scratch.get_layer("backbone").trainable
    weights = tmp_path / "mobilenet.weights.h5"
    scratch.get_layer("backbone").save_weights(weights)

    loaded = build_model(
        shipped(BaseModelParams, architecture="mobilenet_v3_small", weights=str(weights)), SIZE, 7
    )
    backbone = loaded.get_layer("backbone")
    assert not backbone.trainable
    for ours, theirs in zip(
        backbone.get_weights(), scratch.get_layer("backbone").get_weights(), strict=True
    ):
        np.testing.assert_array_equal(ours, theirs)
    assert {w.path.split("/")[0] for w in loaded.trainable_weights} == {"logits"}

    opened = build_model(
        shipped(
            BaseModelParams, architecture="mobilenet_v3_small", weights=str(weights), freeze="none"
        ),
        SIZE,
        7,
    )
    assert opened.get_layer("backbone").trainable


def test_weights_relative_to_the_root_and_from_a_keras_model(tmp_path: Path) -> None:
    params = shipped(BaseModelParams, filters=[4, 8])
    source = build_model(params, SIZE, 1)
    source.save(tmp_path / "warm.keras")
    source.save_weights(tmp_path / "warm.weights.h5")
    for name in ("warm.keras", "warm.weights.h5"):
        warm = build_model(
            shipped(BaseModelParams, filters=[4, 8], weights=name), SIZE, 2, root=tmp_path
        )
        for ours, theirs in zip(warm.get_weights(), source.get_weights(), strict=True):
            np.testing.assert_array_equal(ours, theirs)


def test_weights_that_do_not_fit_are_refused(tmp_path: Path) -> None:
    build_model(shipped(BaseModelParams, filters=[4, 8]), SIZE, 0).save(tmp_path / "other.keras")
    with pytest.raises(WeightsError, match="does not match chestct_small_cnn"):
        build_model(
            shipped(BaseModelParams, filters=[4, 16], weights="other.keras"),
            SIZE,
            0,
            root=tmp_path,
        )
    with pytest.raises(WeightsError, match=r"missing\.weights\.h5 not found"):
        build_model(shipped(BaseModelParams, weights="missing.weights.h5"), SIZE, 0, root=tmp_path)
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(WeightsError, match="does not hold vgg16 backbone weights"):
        build_model(
            shipped(BaseModelParams, architecture="vgg16", weights="junk.h5"),
            SIZE,
            0,
            root=tmp_path,
        )


def test_imagenet_offline_fails_fast_with_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))  # an empty weights cache
    monkeypatch.setattr("chestct.model.modeling.host_reachable", lambda url: False)
    started = time.monotonic()
    with pytest.raises(WeightsError) as info:
        build_model(
            shipped(BaseModelParams, architecture="efficientnet_b0", weights="imagenet"), SIZE, 0
        )
    assert time.monotonic() - started < 10
    message = str(info.value)
    assert "cannot be downloaded" in message
    assert BACKBONES["efficientnet_b0"].weights_url in message
    assert "set base_model.weights to its path" in message


def test_imagenet_download_error_becomes_the_same_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host that answers but a download that fails is reported alike, without a URL trace."""
    from keras.src.utils import file_utils

    def refuse(*args: object, **kwargs: object) -> str:
        raise Exception("URL fetch failure: HTTP Error 403: Forbidden")

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr("chestct.model.modeling.host_reachable", lambda url: True)
    monkeypatch.setattr(file_utils, "get_file", refuse)
    with pytest.raises(WeightsError, match=r"cannot be downloaded .*403"):
        build_model(shipped(BaseModelParams, architecture="vgg16", weights="imagenet"), SIZE, 0)


def test_host_probe_on_loopback() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        assert host_reachable(f"http://127.0.0.1:{port}/w.h5", timeout_s=2)
    # Nothing listens there any more: refused at once.
    assert not host_reachable(f"http://127.0.0.1:{port}/w.h5", timeout_s=2)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (shipped(BaseModelParams, weights="weights.txt"), "base_model.weights: 'weights.txt'"),
        (shipped(BaseModelParams, weights="imagenet"), "small_cnn has no imagenet weights"),
        (shipped(BaseModelParams, architecture="vgg16", freeze="backbone"), "base_model.freeze"),
    ],
)
def test_settings_refuse_models_no_stage_can_build(model: BaseModelParams, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        check_model(model)


def test_mixed_precision_copy_computes_in_float16_and_answers_in_float32() -> None:
    model = build_model(shipped(BaseModelParams, filters=[4, 8]), SIZE, 0)
    mixed = with_dtype_policy(model, "mixed_float16")
    assert mixed.get_layer("conv0").dtype_policy.name == "mixed_float16"
    assert mixed.get_layer("probabilities").dtype_policy.name == "float32"
    image = grey()
    expected = keras.ops.convert_to_numpy(model(image, training=False))
    got = keras.ops.convert_to_numpy(mixed(image, training=False))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=2e-2)
    back = with_dtype_policy(mixed, "float32")
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(back(image, training=False)), expected, atol=1e-6
    )
