"""evaluate's run_evaluate() and write_outputs(), Grad-CAM and the light LiteRT artifact, on
an untrained 32x32 model and tiny generated images (no MLflow, no DVC)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from chestct.data.manifest import DATASET_COLUMNS
from chestct.labels import CLASSES
from chestct.settings import (
    BaseModelParams,
    EvaluateParams,
)
from shipped import shipped

SIZE = 32


def write_split(
    root: Path, split: str, per_class: int, seed: int, size: int = SIZE
) -> pd.DataFrame:
    """Grey PNGs whose brightness depends on the class, as a DATASET_COLUMNS frame."""
    rows = []
    for c, label in enumerate(CLASSES):
        for i in range(per_class):
            rel = f"data/{split}/{label}/{i}.png"
            img = np.random.default_rng(seed + 100 * c + i).integers(0, 60, (size, size))
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            assert cv2.imwrite(str(path), (img + 60 * c).astype(np.uint8))
            rows.append(
                {
                    "path": rel,
                    "label": label,
                    "sha256": f"{split}{c}{i}",
                    "source_path": rel,
                    "original": "",
                }
            )
    return pd.DataFrame(rows, columns=list(DATASET_COLUMNS))


@pytest.fixture(scope="module")
def project(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, dict[str, pd.DataFrame], Path]:
    from chestct.model.modeling import build_model

    root = tmp_path_factory.mktemp("evaluate")
    splits = {
        "train": write_split(root, "train", 4, 0),
        "valid": write_split(root, "valid", 3, 1000),
        "test": write_split(root, "test", 3, 2000),
    }
    model = build_model(shipped(BaseModelParams, filters=[4, 8]), SIZE, seed=0)
    model_path = root / "model.keras"
    model.save(model_path)
    return root, splits, model_path


@pytest.fixture(scope="module")
def evaluation(project):
    from chestct.stages.evaluate import run_evaluate

    root, splits, model_path = project
    return run_evaluate(model_path, splits, shipped(EvaluateParams, batch_size=5), root)


def test_run_evaluate_scores_the_test_split_and_calibrates_on_valid(evaluation, project) -> None:
    _, splits, _ = project
    m = evaluation.metrics
    for key in (
        "accuracy",
        "balanced_accuracy",
        "macro_f1",
        "macro_f2",
        "roc_auc",
        "ece",
        "ece_calibrated",
        "abstain_rate",
        "ood_rate",
    ):
        assert 0.0 <= m[key] <= 1.0, key
    assert m["temperature"] > 0
    assert m["n"] == len(splits["test"]) == len(evaluation.predictions)
    for per_class in ("sensitivity", "specificity", "precision", "roc_auc_per_class"):
        assert set(m[per_class]) == set(CLASSES)

    cal = evaluation.calibration
    assert cal["temperature"] == m["temperature"]
    assert cal["temperature_reason"]  # fitted, or why not
    assert 0.0 <= cal["abstain_entropy"] <= 1.0
    assert cal["ood_threshold"] > 0
    p = evaluation.predictions
    assert list(p["path"]) == list(splits["test"]["path"])
    proba = p[[f"p_{c}" for c in CLASSES]].to_numpy()
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    assert list(p["predicted"]) == [CLASSES[i] for i in proba.argmax(axis=1)]
    assert evaluation.features.shape[0] == len(p)
    assert evaluation.images.shape == (len(p), SIZE, SIZE, 1)
    # Where the model looks: the share of its CAM mass inside the lungs of the test images.
    attention = m["attention"]
    assert attention["images"] + attention["without_lungs"] == len(p)
    # These test images are noise bands: the lung field is rarely found on them; the share is
    # a mean over those where it is (the computation itself: tests/unit/test_attention.py).
    assert attention["without_lungs"] > len(p) // 2
    assert attention["lung_share"] is None or 0.0 <= attention["lung_share"] <= 1.0
    assert set(attention["lung_share_per_class"]) == set(CLASSES)


def test_run_evaluate_adds_the_memorizer_novelty_and_intervals(evaluation, project) -> None:
    from chestct.evaluation.metrics import numeric_keys
    from chestct.imaging.perturb import SHIFT_NAMES

    m, p = evaluation.metrics, evaluation.predictions
    memo = m["baseline"]["nearest_neighbour"]
    for key in ("accuracy", "balanced_accuracy", "macro_f1"):
        assert 0.0 <= memo[key] <= 1.0
        assert m["baseline"]["model_above"][key] == pytest.approx(m[key] - memo[key])
        assert m["ci"][key]["low"] <= m[key] <= m["ci"][key]["high"]
    assert (
        m["ci"]["ece_calibrated"]["low"]
        <= m["ece_calibrated"]
        <= m["ci"]["ece_calibrated"]["high"]
    )
    assert m["novel"]["n"] + m["near_copy"]["n"] == m["n"]
    assert m["near_copy_share"] == pytest.approx(m["near_copy"]["n"] / m["n"])
    # dvc metrics shows only numbers: every interval end is a scalar leaf.
    assert {"ci.accuracy.low", "ci.macro_f1.high", "baseline.nearest_neighbour.macro_f1"} <= set(
        numeric_keys(m)
    )
    assert p["nearest_train_similarity"].between(-1, 1).all()
    assert (p["near_copy"] == (p["nearest_train_similarity"] >= 0.9)).all()
    assert set(p["memorizer"]) <= set(CLASSES)
    assert p["group"].astype(str).str.len().all()
    for shift in SHIFT_NAMES:
        assert set(p[f"predicted_{shift}"]) <= set(CLASSES)


def test_write_outputs_writes_every_metric_table_and_picture(evaluation, tmp_path: Path) -> None:
    from chestct.stages.evaluate import PLOTS, write_outputs

    files = write_outputs(evaluation, tmp_path, shipped(EvaluateParams, gallery_per_class=1))
    metrics = json.loads(files["metrics"].read_text(encoding="utf-8"))
    assert metrics["macro_f1"] == evaluation.metrics["macro_f1"]
    calibration = json.loads(files["calibration"].read_text(encoding="utf-8"))
    assert set(calibration) >= {"temperature", "abstain_entropy", "ood_threshold"}
    with np.load(files["ood"]) as ood:
        c = evaluation.features.shape[-1]
        assert ood["mean"].shape == (c,) and ood["precision"].shape == (c, c)
    # The monitoring reference: every signal of the valid + test images, and evaluate's rates.
    from chestct.monitoring.signals import CLASS_SIGNAL, SIGNALS, check_reference

    reference = check_reference(json.loads(files["reference"].read_text()), "reference.json")
    assert reference == evaluation.reference
    assert set(reference["signals"]) == {s.name for s in SIGNALS} | {CLASS_SIGNAL}
    # write_split(root, "valid", 3, …) holds 3 images per class.
    assert reference["n"] == len(evaluation.predictions) + 3 * len(CLASSES)
    assert reference["true_class_mix"] == {c: 0.25 for c in CLASSES}
    assert reference["rates"]["ood"] is not None and reference["rates"]["abstain"] is not None

    confusion = pd.read_csv(files["confusion"])
    assert list(confusion.columns) == ["actual", "predicted"]
    roc = pd.read_csv(files["roc"])
    assert list(roc.columns) == ["fpr", *CLASSES]
    reliability = pd.read_csv(files["reliability"])
    assert len(reliability) == 15
    assert reliability["count"].sum() == len(evaluation.predictions)
    for name in PLOTS:
        picture = cv2.imread(str(tmp_path / name))
        assert picture is not None and picture.shape[0] > 100, name


def test_gradcam_gallery_picks_top_and_worst_per_class(evaluation) -> None:
    from chestct.evaluation.outputs import gradcam_tiles, misclassified_tiles

    tiles = gradcam_tiles(evaluation, per_class=1)
    p = evaluation.predictions
    expected = []
    for name in CLASSES:
        mine = p[p["actual"] == name]
        right = mine[mine["predicted"] == name]
        top = [right[f"p_{name}"].idxmax()] if len(right) else []
        worst = mine[f"p_{name}"].idxmin()
        expected += [f"top {name}"] * len(top) + [f"worst {name}"] * (worst not in top)
    assert [caption.split("\n")[0] for _, caption in tiles] == expected
    assert all(t.shape == (SIZE, SIZE, 3) and t.dtype == np.uint8 for t, _ in tiles)
    wrong = int((p["actual"] != p["predicted"]).sum())
    assert len(misclassified_tiles(evaluation)) == min(wrong, 16)


def test_cam_equals_grad_cam_computed_by_tensorflow(project) -> None:
    import tensorflow as tf

    from chestct.model.gradcam import CamHead
    from chestct.model.modeling import load_model

    root, splits, model_path = project
    model = load_model(model_path)
    image = cv2.imread(str(root / splits["test"]["path"][0]), cv2.IMREAD_GRAYSCALE)
    x = tf.constant(image[None, :, :, None].astype(np.float32))
    grad_model = tf.keras.Model(
        model.inputs, [model.get_layer("features").output, model.get_layer("logits").output]
    )
    head = CamHead.from_model(model)
    for c in range(len(CLASSES)):
        with tf.GradientTape() as tape:
            features, logits = grad_model(x, training=False)
            target = logits[0, c]
        grads = tape.gradient(target, features)[0].numpy()
        weights = grads.mean(axis=(0, 1))
        grad_cam = np.maximum(features[0].numpy() @ weights, 0)
        expected = grad_cam / grad_cam.max() if grad_cam.max() > 0 else grad_cam
        np.testing.assert_allclose(head.cam(features[0].numpy(), c), expected, atol=1e-5)


def test_cam_head_round_trips_and_refuses_a_wrong_map(tmp_path: Path) -> None:
    from chestct.model.gradcam import CamHead, overlay

    head = CamHead(np.arange(12, dtype=np.float32).reshape(3, 4), np.zeros(4, np.float32))
    head.save(tmp_path / "cam_head.npz")
    again = CamHead.load(tmp_path / "cam_head.npz")
    np.testing.assert_array_equal(again.kernel, head.kernel)
    heat = again.cam(np.ones((2, 2, 3), np.float32), 1)
    assert heat.max() == 1.0 and heat.shape == (2, 2)
    assert again.cam(np.zeros((2, 2, 3), np.float32), 1).max() == 0.0
    with pytest.raises(ValueError, match="channels"):
        again.cam(np.ones((2, 2, 5), np.float32), 0)
    picture = overlay(np.full((8, 8), 100, np.uint8), heat)
    assert picture.shape == (8, 8, 3) and picture.dtype == np.uint8


def test_score_prepares_images_at_the_models_own_size(project, tmp_path: Path) -> None:
    from chestct.evaluation.scoring import score

    _, _, model_path = project
    small = write_split(tmp_path, "test", 1, 0, size=20)  # made for another image size
    metrics, predictions = score(model_path, small, 4, tmp_path)
    assert metrics["n"] == len(predictions) == len(small)


def test_run_evaluate_refuses_an_empty_split(project) -> None:
    from chestct.runner import StageFailed
    from chestct.stages.evaluate import run_evaluate

    root, splits, model_path = project
    empty = {**splits, "valid": splits["valid"].iloc[:0]}
    with pytest.raises(StageFailed, match="empty"):
        run_evaluate(model_path, empty, shipped(EvaluateParams), root)
    one_train_image = {**splits, "train": splits["train"].iloc[:1]}
    with pytest.raises(StageFailed, match="at least two"):
        run_evaluate(model_path, one_train_image, shipped(EvaluateParams), root)


# --------------------------------------------------------------------------- light artifact


@pytest.fixture(scope="module")
def light(project, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    from chestct.model.export import export_light
    from chestct.model.modeling import load_model

    target = tmp_path_factory.mktemp("light") / "model.tflite"
    return target, export_light(load_model(project[2]), target)


def test_light_model_matches_keras_and_outputs_features(project, light) -> None:
    from chestct.evaluation.scoring import load_images, model_outputs
    from chestct.model.export import PARITY_TOLERANCE, LightModel, parity
    from chestct.model.modeling import load_model

    root, splits, model_path = project
    path, info = light
    assert info["runtime"] == "litert" and info["file"] == "model.tflite"
    assert set(info["outputs"]) == {"probabilities", "logits", "features"}
    images = load_images(splits["test"], root, SIZE)
    model = load_model(model_path)
    keras_out = model_outputs(model, images, 5, ["probabilities", "features"])
    out = LightModel.load(path).run(images)
    assert parity(out["probabilities"], keras_out["probabilities"]) <= PARITY_TOLERANCE
    np.testing.assert_allclose(out["features"], keras_out["features"], atol=1e-4)
    one = LightModel.load(path).run(images[:1])  # any batch size
    assert one["probabilities"].shape == (1, len(CLASSES))


def test_light_model_runs_without_tensorflow(project, light) -> None:
    path, _ = light
    code = (
        "import sys, numpy as np; from pathlib import Path; "
        "from chestct.model.export import LightModel; "
        f"out = LightModel.load(Path({str(path)!r})).run(np.zeros((2, {SIZE}, {SIZE}, 1))); "
        "assert out['probabilities'].shape == (2, 4), out; "
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules; print('ok')"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("ok")


def test_light_model_errors_name_the_fix(tmp_path: Path) -> None:
    from chestct.model.export import ExportError, LightModel, parity

    with pytest.raises(ExportError, match="run promote"):
        LightModel.load(tmp_path / "missing.tflite")
    with pytest.raises(ExportError, match="shape"):
        parity(np.zeros((2, 4)), np.zeros((3, 4)))


def test_export_refuses_a_model_without_the_contract_layers(tmp_path: Path) -> None:
    import keras

    from chestct.model.export import ExportError, export_light

    inputs = keras.Input((8, 8, 1))
    plain = keras.Model(inputs, keras.layers.Dense(4)(keras.layers.Flatten()(inputs)))
    with pytest.raises(ExportError, match="contract layer"):
        export_light(plain, tmp_path / "m.tflite")
    assert not (tmp_path / "m.tflite").exists()


# --------------------------------------------------------------------------- MLflow lineage


def test_lineage_tags_and_upstream_params_come_from_the_pointers(tmp_path: Path) -> None:
    from chestct.pointers import (
        Pointer,
        TrackingRef,
        make_run_record,
        write_pointer,
        write_run_record,
    )
    from chestct.settings import Paths
    from chestct.stages.evaluate import lineage_tags, upstream_params

    paths = Paths(
        root=tmp_path,
        artifacts=tmp_path / "artifacts",
        model=tmp_path / "model",
        params_file=tmp_path / "params.yaml",
    )
    for stage, run, params in [
        ("base-model", "b" * 32, {"base": {"seed": 1}, "base_model": {"filters": [4, 8]}}),
        (
            "train",
            "t" * 32,
            {"base": {"seed": 1}, "train": {"learning_rate": 0.01, "augment": {"flip": True}}},
        ),
        ("evaluate", "e" * 32, {"evaluate": {"batch_size": 3}}),  # not upstream of evaluate
    ]:
        pointer = Pointer(
            stage=stage, params=params, inputs=[], outputs={}, metrics={}, details={}
        )
        paths.stage_dir(stage).mkdir(parents=True)
        write_pointer(paths.pointer(stage), pointer)
        tracking = TrackingRef("sqlite:///x.db", "chestct", run)
        write_run_record(paths, make_run_record(stage, paths.pointer(stage), tracking, tmp_path))

    assert lineage_tags(paths, "evaluate") == {
        "chestct.run.base-model": "b" * 32,
        "chestct.run.train": "t" * 32,
    }
    assert lineage_tags(paths, "promote")["chestct.run.evaluate"] == "e" * 32
    assert upstream_params(paths, "evaluate", own=["base", "evaluate"]) == {
        "base_model.filters": "[4, 8]",
        "train.learning_rate": "0.01",
        "train.augment.flip": "True",
    }


def test_evaluate_scores_every_test_image(trained, tiny_data) -> None:
    from chestct.evaluation.scoring import score

    root, data = tiny_data
    test = data["test"]
    metrics, predictions = score(
        trained[2], test, shipped(EvaluateParams, batch_size=3).batch_size, root
    )

    for name in ("accuracy", "balanced_accuracy", "macro_f1", "macro_f2", "ece"):
        assert 0.0 <= metrics[name] <= 1.0, name
    assert set(metrics["sensitivity"]) == set(CLASSES)
    assert all(0.0 <= r <= 1.0 for r in metrics["sensitivity"].values())
    assert metrics["n"] == len(test) == len(predictions)
    assert list(predictions["path"]) == list(test["path"])
    assert list(predictions["actual"]) == list(test["label"])
    assert set(predictions["predicted"]) <= set(CLASSES)
    proba = predictions[[f"p_{c}" for c in CLASSES]].to_numpy()
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    assert list(predictions["predicted"]) == [CLASSES[i] for i in proba.argmax(axis=1)]
    assert metrics["accuracy"] == pytest.approx(
        float((predictions["actual"] == predictions["predicted"]).mean())
    )
