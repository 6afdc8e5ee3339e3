"""train: the training loop options on tiny generated images (determinism, fine-tuning,
optimizers, label smoothing, best checkpoint by a validation metric, tf.distribute)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import keras
import numpy as np
import pandas as pd
import pytest

from chestct.labels import CLASSES
from chestct.model.inputs import make_dataset
from chestct.model.modeling import build_model, label_indices
from chestct.runner import StageFailed
from chestct.settings import (
    AugmentParams,
    BaseModelParams,
    FineTuneParams,
    TrainParams,
)
from helpers import (
    IMAGE_SIZE,
    SHIFT,
    base_file,
    train,
    write_split,
)
from shipped import shipped

SIZE = 32
REPO = Path(__file__).resolve().parents[2]
QUIET = shipped(AugmentParams, rotation=0.0, zoom=0.0)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame, pd.DataFrame]:
    root = tmp_path_factory.mktemp("train_data")
    return root, write_split(root, "train", 3, 0), write_split(root, "valid", 2, 500)


def test_two_deterministic_runs_give_identical_metrics_and_weights(data, tmp_path: Path) -> None:
    base = base_file(tmp_path, shipped(BaseModelParams, filters=[4, 8]))
    params = shipped(
        TrainParams, epochs=3, batch_size=4, augment=shipped(AugmentParams), deterministic=True
    )
    first = train(data, base, params)
    second = train(data, base, params)
    pd.testing.assert_frame_equal(first.history, second.history, check_exact=True)
    for a, b in zip(first.model.get_weights(), second.model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    other = train(data, base, params, seed=1)
    assert not first.history["loss"].equals(other.history["loss"])


def test_best_checkpoint_by_validation_macro_f1_with_adamw_and_smoothing(
    data, tmp_path: Path
) -> None:
    root, _, valid = data
    base = base_file(tmp_path, shipped(BaseModelParams, filters=[4, 8]))
    params = shipped(
        TrainParams,
        epochs=4,
        batch_size=4,
        optimizer="adamw",
        label_smoothing=0.1,
        monitor="val_macro_f1",
        patience=10,
        augment=QUIET,
    )
    logged: list[tuple[int, dict[str, float]]] = []
    result = train(data, base, params, sink=lambda m, e: logged.append((e, m)))

    history = result.history
    assert list(history["epoch"]) == [1, 2, 3, 4]
    assert set(history["phase"]) == {1}
    assert {"loss", "accuracy", "macro_f1", "val_macro_f1", "learning_rate"} <= set(history)
    assert result.best_value == history["val_macro_f1"].max()
    assert result.best_epoch == int(history["val_macro_f1"].idxmax()) + 1
    assert [e for e, _ in logged] == [0, 1, 2, 3]
    assert all("learning_rate" in m and "val_macro_f1" in m for _, m in logged)
    assert isinstance(result.model.optimizer, keras.optimizers.AdamW)
    # The returned weights are the checkpoint's: its macro-F1 on valid is the best one.
    from sklearn.metrics import f1_score

    ds = make_dataset([root / p for p in valid["path"]], None, 8)
    pred = result.model.predict(ds, verbose=0).argmax(axis=1)
    f1 = f1_score(label_indices(list(valid["label"])), pred, average="macro")
    assert f1 == pytest.approx(result.best_value, abs=1e-5)


def test_batch_norm_statistics_are_re_estimated_on_clean_batches() -> None:
    import tensorflow as tf

    from chestct.model.callbacks import RecalibrateBatchNorm

    inputs = keras.Input((2,))
    outputs = keras.layers.BatchNormalization(momentum=0.99, name="bn")(inputs)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(0)
    batches = [rng.normal(loc, 1.0, (8, 2)).astype("float32") for loc in (1.0, 3.0, 8.0)]
    ds = tf.data.Dataset.from_tensor_slices((np.concatenate(batches), np.zeros(24))).batch(8)
    callback = RecalibrateBatchNorm(ds)
    callback.set_model(model)
    callback.on_test_begin()

    bn = model.get_layer("bn")
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(bn.moving_mean),
        np.mean([b.mean(0) for b in batches], 0),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(bn.moving_variance),
        np.mean([b.var(0) for b in batches], 0),
        rtol=1e-4,
    )
    assert bn.momentum == 0.99


def test_fine_tuning_opens_only_the_top_of_a_frozen_backbone(data, tmp_path: Path) -> None:
    # vgg16: few layers, so tracing is quick; the "pretrained" weights are a saved random init.
    scratch = build_model(shipped(BaseModelParams, architecture="vgg16"), SIZE, 0)
    weights = tmp_path / "backbone.weights.h5"
    scratch.get_layer("backbone").save_weights(weights)
    base = base_file(
        tmp_path, shipped(BaseModelParams, architecture="vgg16", weights=str(weights))
    )
    params = shipped(
        TrainParams,
        epochs=2,
        batch_size=6,
        patience=5,
        augment=QUIET,
        fine_tune=shipped(FineTuneParams, unfreeze_top=3, epochs=2, learning_rate=1e-4),
    )
    result = train(data, base, params)

    history = result.history
    assert list(history["phase"]) == [1, 1, 2, 2]
    assert list(history["epoch"]) == [1, 2, 3, 4]
    assert history.loc[history["phase"] == 2, "learning_rate"].iloc[0] == pytest.approx(1e-4)
    layers = result.model.get_layer("backbone").layers
    before = {layer.name: layer.get_weights() for layer in scratch.get_layer("backbone").layers}
    top = {
        layer.name
        for layer in layers[-3:]
        if not isinstance(layer, keras.layers.BatchNormalization)
    }
    assert result.details["fine_tune_layers"] == len(top)
    changed = {
        layer.name
        for layer in layers
        if layer.get_weights()
        and any(
            not np.array_equal(a, b)
            for a, b in zip(layer.get_weights(), before[layer.name], strict=True)
        )
    }
    # Phase 2 may move only the top layers; if phase 2's epochs won, they did move.
    assert changed <= top
    if result.best_epoch > 2:
        assert changed


def test_unfreeze_top_keeps_batch_norm_and_lower_layers_frozen() -> None:
    from chestct.model.training import unfreeze_top

    model = build_model(shipped(BaseModelParams, architecture="mobilenet_v3_small"), SIZE, 0)
    backbone = model.get_layer("backbone")
    backbone.trainable = False
    opened = unfreeze_top(model, 12)
    layers = backbone.layers
    top = layers[-12:]
    norms = [layer for layer in top if isinstance(layer, keras.layers.BatchNormalization)]
    assert norms, "the top of mobilenet_v3_small holds batch-norm layers"
    assert opened == 12 - len(norms)
    assert [layer.name for layer in layers if layer.trainable] == [
        layer.name for layer in top if layer not in norms
    ]


def test_fine_tuning_a_model_without_backbone_is_refused(data, tmp_path: Path) -> None:
    base = base_file(tmp_path, shipped(BaseModelParams, filters=[4]))
    params = shipped(
        TrainParams,
        epochs=1,
        batch_size=6,
        augment=QUIET,
        fine_tune=shipped(FineTuneParams, unfreeze_top=3, epochs=1),
    )
    with pytest.raises(StageFailed, match=r"no backbone to unfreeze.*set it to 0"):
        train(data, base, params)


def test_training_curves_picture(data, tmp_path: Path) -> None:
    from chestct.evaluation.plots import plot_history

    history = pd.DataFrame(
        {
            "epoch": [1, 2, 3],
            "phase": [1, 1, 2],
            "learning_rate": [1e-3, 1e-3, 1e-5],
            **{
                f"{p}{m}": [0.5, 0.6, 0.7]
                for p in ("", "val_")
                for m in ("loss", "accuracy", "macro_f1")
            },
        }
    )
    target = tmp_path / "curves.png"
    plot_history(history, target)
    image = cv2.imread(str(target))
    assert image is not None and image.shape[1] > image.shape[0] > 100


MIRRORED = textwrap.dedent(
    """
    import json, sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
    from pathlib import Path
    import pandas as pd
    from chestct.settings import AugmentParams, TrainParams, defaults
    from chestct.stages.train import run_train
    root = Path(sys.argv[1])
    params = defaults(TrainParams, epochs=2, batch_size=8, strategy="mirrored",
                      augment=defaults(AugmentParams, rotation=0.0, zoom=0.0))
    result = run_train(root / "base.keras", pd.read_csv(root / "train.csv"),
                       pd.read_csv(root / "valid.csv"), params, 0, root)
    print(json.dumps({"details": result.details,
                      "val_loss": result.history["val_loss"].tolist()}))
    """
)


def test_training_under_mirrored_strategy_on_two_logical_cpus(data, tmp_path: Path) -> None:
    """Logical devices must be set before TensorFlow starts: a fresh process does it."""
    root, train_split, valid_split = data
    base_file(root, shipped(BaseModelParams, filters=[4, 8]))
    train_split.to_csv(root / "train.csv", index=False)
    valid_split.to_csv(root / "valid.csv", index=False)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(
        [sys.executable, "-c", MIRRORED, str(root)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["details"]["strategy"] == "mirrored"
    assert report["details"]["replicas"] == 2
    assert len(report["val_loss"]) == 2 and all(np.isfinite(report["val_loss"]))


def test_train_returns_history_and_model(trained, tiny_data) -> None:
    result, epochs, _ = trained
    history = result.history
    assert list(history["epoch"]) == [1, 2]
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(history.columns)
    assert np.isfinite(history["val_loss"]).all()
    assert result.best_epoch == int(history["val_loss"].idxmin()) + 1
    assert [e for e, _ in epochs] == [0, 1]
    assert all("val_loss" in logs for _, logs in epochs)
    assert epochs[-1][1]["val_loss"] == pytest.approx(history["val_loss"].iloc[-1])
    assert result.model.predict(np.zeros((3, IMAGE_SIZE, IMAGE_SIZE, 1)), verbose=0).shape == (
        3,
        len(CLASSES),
    )


def test_train_returns_the_best_weights(trained, tiny_data) -> None:
    from chestct.model.inputs import make_dataset

    result = trained[0]
    root, data = tiny_data
    valid = data["valid"]
    ds = make_dataset([root / p for p in valid["path"]], list(valid["label"]), 4, one_hot=True)
    loss = result.model.evaluate(ds, verbose=0, return_dict=True)["loss"]
    assert loss == pytest.approx(result.history["val_loss"].min(), rel=1e-4)


def test_train_changes_the_weights(trained, base_model: Path) -> None:
    from chestct.model.modeling import load_model

    before = load_model(base_model).get_layer("logits").get_weights()[0]
    after = trained[0].model.get_layer("logits").get_weights()[0]
    assert not np.allclose(before, after)


def test_class_weights() -> None:
    from chestct.model.training import class_weights

    labels = pd.Series(["normal"] * 6 + ["adenocarcinoma"] * 2)
    assert class_weights(labels, "none") is None
    weights = class_weights(labels, "balanced")
    assert weights == pytest.approx(
        {CLASSES.index("adenocarcinoma"): 2.0, CLASSES.index("normal"): 8 / 12}
    )


def test_training_with_every_shift_augmentation_is_repeatable(tmp_path: Path) -> None:
    from chestct.settings import BaseModelParams, TrainParams
    from helpers import base_file, train, write_split

    root = tmp_path / "data"
    data = (root, write_split(root, "train", 3, 0), write_split(root, "valid", 2, 500))
    base = base_file(tmp_path, shipped(BaseModelParams, filters=[4, 8]))
    params = shipped(
        TrainParams,
        epochs=2,
        batch_size=4,
        augment=shipped(AugmentParams, **SHIFT),
        deterministic=True,
    )
    first = train(data, base, params)
    second = train(data, base, params)
    pd.testing.assert_frame_equal(first.history, second.history, check_exact=True)
    for a, b in zip(first.model.get_weights(), second.model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_merged_members_answer_the_mean_of_their_logits_through_keras_cam_and_litert(
    tmp_path: Path,
) -> None:
    from chestct.model.export import LightModel, export_light, light_outputs
    from chestct.model.gradcam import CamHead
    from chestct.model.modeling import load_model, merge_members, save_model

    members = []
    for seed in range(3):
        member = build_model(shipped(BaseModelParams, filters=[4, 8]), SIZE, seed)
        kernel, bias = member.get_layer("logits").get_weights()
        member.get_layer("logits").set_weights([kernel, bias + seed])  # biases differ too
        members.append(member)
    merged = merge_members(members)
    images = np.random.default_rng(0).uniform(0, 255, (5, SIZE, SIZE, 1)).astype(np.float32)

    def logits(model: keras.Model) -> np.ndarray:
        head = keras.Model(model.inputs, model.get_layer("logits").output)
        return np.asarray(head(images, training=False))

    expected = np.mean([logits(m) for m in members], axis=0)
    np.testing.assert_allclose(logits(merged), expected, rtol=1e-5, atol=1e-5)
    assert [merged.get_layer(n).name for n in ("features", "gap", "dropout", "probabilities")]
    assert merged.get_layer("features").output.shape[-1] == 3 * 8
    assert merged.get_layer("dropout").rate == members[0].get_layer("dropout").rate

    # Saved and loaded without chestct's help, it answers the same.
    reloaded = load_model(save_model(merged, tmp_path / "merged.keras"))
    np.testing.assert_allclose(logits(reloaded), expected, rtol=1e-5, atol=1e-5)

    # Grad-CAM of the merged head is the mean of the members' (before each is rescaled).
    def raw_cam(model: keras.Model, image: np.ndarray) -> np.ndarray:
        feats = np.asarray(keras.Model(model.inputs, model.get_layer("features").output)(image))
        return feats[0] @ CamHead.from_model(model).kernel[:, 1]

    one = images[:1]
    np.testing.assert_allclose(
        raw_cam(merged, one),
        np.mean([raw_cam(m, one) for m in members], axis=0),
        rtol=1e-4,
        atol=1e-5,
    )

    # The LiteRT export (what serving runs) keeps the contract and the averaged logits.
    card = export_light(reloaded, tmp_path / "model.tflite")
    light = light_outputs(LightModel.load(tmp_path / "model.tflite"), images)
    assert set(card["outputs"]) >= {"features", "logits", "probabilities"}
    np.testing.assert_allclose(light["logits"], expected, rtol=1e-4, atol=1e-4)
    assert light["features"].shape[-1] == 3 * 8

    assert merge_members(members[:1]) is members[0]


def test_ensemble_trains_seeded_members_and_hands_on_one_merged_model(
    data, tmp_path: Path
) -> None:
    root, _, valid = data
    base = base_file(tmp_path, shipped(BaseModelParams, filters=[4, 8]))
    params = shipped(TrainParams, epochs=2, batch_size=4, ensemble=3, patience=10, augment=QUIET)
    logged: list[int] = []
    result = train(data, base, params, seed=5, sink=lambda m, e: logged.append(e))

    history = result.history
    assert list(history["member"]) == [0, 0, 1, 1, 2, 2]
    assert list(history["epoch"]) == [1, 2, 1, 2, 1, 2]
    assert logged == [0, 1, 2, 3, 4, 5]  # one MLflow step per epoch of any member
    members = result.details["members"]
    assert [m["seed"] for m in members] == [5, 6, 7]
    assert result.details["ensemble"] == 3
    assert result.best_value == pytest.approx(np.mean([m["best_value"] for m in members]))
    model = result.model
    assert model.get_layer("features").output.shape[-1] == 3 * 8
    trunks = [model.get_layer(f"member{k}") for k in range(3)]
    # Members 1 and 2 drew their own weights; member 0 started from the base model.
    first_kernels = [t.get_layer("conv0").get_weights()[0] for t in trunks]
    assert not np.allclose(first_kernels[0], first_kernels[1])
    assert not np.allclose(first_kernels[1], first_kernels[2])
    ds = make_dataset([root / p for p in valid["path"]], None, 8)
    proba = model.predict(ds, verbose=0)
    assert proba.shape == (len(valid), len(CLASSES))
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)

    from chestct.evaluation.plots import plot_history

    plot_history(history, tmp_path / "curves.png")  # one pair of lines per member
    assert cv2.imread(str(tmp_path / "curves.png")) is not None

    # The same seed gives the same ensemble.
    again = train(data, base, params, seed=5)
    pd.testing.assert_frame_equal(history, again.history, check_exact=True)


def test_one_member_is_plain_training(data, tmp_path: Path) -> None:
    base = base_file(tmp_path, shipped(BaseModelParams, filters=[4, 8]))
    result = train(data, base, shipped(TrainParams, epochs=2, batch_size=4, augment=QUIET))
    assert set(result.history["member"]) == {0}
    assert result.details["ensemble"] == 1
    assert not any(layer.name.startswith("member") for layer in result.model.layers)
    assert result.model.get_layer("features").output.shape[-1] == 8
