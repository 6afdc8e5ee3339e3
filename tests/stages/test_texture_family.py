"""The model families through the stages' functions: base-model's family.json, train's texture
fit, evaluate and promote on a texture and an ensemble candidate, and the promoted folders
served by the inference core (tiny generated images, no MLflow, no DVC)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from chestct.imaging.preparation import Preprocessing
from chestct.labels import CLASSES
from chestct.model import families, texture
from chestct.model.calibration import softmax
from chestct.settings import (
    BaseModelParams,
    BaseParams,
    EvaluateParams,
    PromoteParams,
    TextureParams,
)
from helpers import IMAGE_SIZE
from shipped import shipped

SPEC = texture.ClassifierSpec(max_iter=10)
SIMILARITY = shipped(BaseParams).near_copy_similarity  # series rule of the cross-fitting folds


def test_base_model_writes_the_family(tmp_path: Path) -> None:
    from chestct.stages.base_model import write_family

    path = write_family(
        shipped(BaseModelParams, family="texture", texture=shipped(TextureParams, max_iter=7)),
        tmp_path,
    )
    family = json.loads(path.read_text())
    assert family["family"] == "texture" and family["texture"]["max_iter"] == 7


def test_texture_spec_from_family_json() -> None:
    from chestct.evaluation.tuning import texture_spec

    assert texture_spec({**shipped(TextureParams).__dict__, "max_iter": 5}).max_iter == 5
    assert texture_spec(shipped(TextureParams)) == texture.ClassifierSpec()


@pytest.fixture(scope="module")
def texture_model(tiny_data, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from chestct.evaluation.tuning import fit_texture_on

    root, data = tiny_data
    model, figures = fit_texture_on(
        data["train"], data["valid"], SPEC, 0, root, IMAGE_SIZE, SIMILARITY
    )
    assert 1 <= figures["iterations"] <= SPEC.max_iter
    assert model.temperature > 0
    return texture.save(model, tmp_path_factory.mktemp("texture-train") / families.TEXTURE_FILE)


def evaluate(model_path: Path, tiny_data) -> Any:
    from chestct.stages.evaluate import run_evaluate

    root, data = tiny_data
    return run_evaluate(model_path, data, shipped(EvaluateParams, batch_size=4), root)


def test_texture_evaluation_has_the_cnns_metric_keys(texture_model, trained, tiny_data) -> None:
    cnn = evaluate(trained[2], tiny_data)
    tex = evaluate(texture_model, tiny_data)
    assert set(tex.metrics) == set(cnn.metrics)
    assert set(tex.metrics["shift"]) == set(cnn.metrics["shift"])  # shift stress on every family
    assert tex.calibration["family"] == "texture" and cnn.calibration["family"] == "cnn"
    assert tex.cam_head is None and tex.explainer is not None
    assert tex.ood.mean.shape == (texture.feature_count(),)


def test_texture_evaluation_writes_the_pictures(texture_model, tiny_data, tmp_path) -> None:
    from chestct.stages.evaluate import write_outputs

    files = write_outputs(evaluate(texture_model, tiny_data), tmp_path, shipped(EvaluateParams))
    assert (tmp_path / "gradcam.png").stat().st_size > 0
    assert json.loads(files["metrics"].read_text())["macro_f1"] >= 0


def test_a_refit_texture_model_keeps_trains_temperature(tiny_data, tmp_path: Path) -> None:
    """base_model.texture.refit: train fits on train + valid (never test), and evaluate, whose
    valid split the model has now seen, leaves the temperature train fitted before the refit."""
    from dataclasses import replace

    from chestct.evaluation.tuning import fit_texture_on

    root, data = tiny_data
    model, figures = fit_texture_on(
        data["train"], data["valid"], replace(SPEC, refit=True), 0, root, IMAGE_SIZE, SIMILARITY
    )
    _, plain = fit_texture_on(data["train"], data["valid"], SPEC, 0, root, IMAGE_SIZE, SIMILARITY)
    # train's valid figures are the held-out ones (before the refit), not in-sample ones.
    assert figures["val_accuracy"] == plain["val_accuracy"]
    assert figures["val_loss"] == pytest.approx(plain["val_loss"], abs=1e-5)
    assert model.details["train_slices"] == len(data["train"]) + len(data["valid"])
    reason = families.kept_calibration(families.TextureFamily(model))
    assert "refit on train + valid" in reason
    path = texture.save(model, tmp_path / families.TEXTURE_FILE)
    ev = evaluate(path, tiny_data)
    assert ev.calibration["temperature"] == 1.0 and not ev.calibration["temperature_fitted"]
    assert ev.calibration["temperature_reason"] == reason
    # The abstain threshold comes from valid as the model saw it before the refit (held out),
    # not from the refit model's in-sample entropies.
    from chestct.evaluation.scoring import label_indices
    from chestct.model.calibration import abstain_threshold

    held_out = families.held_out_valid_logits(families.TextureFamily(model), len(data["valid"]))
    y_valid = label_indices(list(data["valid"]["label"]))
    quantile = shipped(EvaluateParams).abstain_quantile
    expected = abstain_threshold(y_valid, softmax(held_out), quantile)
    assert ev.calibration["abstain_entropy"] == pytest.approx(expected)


class Registry:
    def __init__(self) -> None:
        self.calls: list[tuple[Path, str]] = []

    def __call__(self, path: Path, alias: str) -> dict[str, Any]:
        self.calls.append((path, alias))
        return {"name": "chestct", "version": str(len(self.calls)), "alias": alias}


def promoted(model_path: Path, tiny_data, tmp_path: Path) -> tuple[Path, Any]:
    from chestct.promotion import Candidate
    from chestct.stages.evaluate import write_outputs
    from chestct.stages.promote import run_promote

    root, data = tiny_data
    ev = evaluate(model_path, tiny_data)
    out = tmp_path / "evaluate"
    files = write_outputs(ev, out, shipped(EvaluateParams))
    candidate = Candidate(
        model_path=model_path,
        metrics=ev.metrics,
        calibration=ev.calibration,
        ood_path=files["ood"],
        data_digest="d",
        reference_path=files["reference"],
    )
    model_dir = tmp_path / "model"
    result = run_promote(
        candidate,
        data["test"],
        shipped(PromoteParams, minimum=0.0, metric="macro_f1"),
        model_dir=model_dir,
        root=root,
        batch_size=4,
        preprocessing=Preprocessing(IMAGE_SIZE),
        work_dir=tmp_path / "work",
        register=Registry(),
    )
    assert result.decision.promote, result.decision.reason
    return model_dir, ev


def assert_served_as_evaluated(served: Any, ev: Any, atol: float) -> None:
    """Every test image: the promoted folder's answer is what evaluate measured (evaluate scores
    the served artefact), the same class and the calibrated probabilities within `atol`."""
    from chestct.inference.analysis import analyse

    raw = ev.predictions.filter(like="p_").to_numpy()
    for image, p, predicted in zip(ev.images, raw, ev.predictions["predicted"], strict=True):
        got = analyse(served, image[:, :, 0], 0, 0).probabilities
        np.testing.assert_allclose(got, softmax(np.log(p), ev.metrics["temperature"]), atol=atol)
        assert CLASSES[int(got.argmax())] == predicted


def test_texture_candidate_is_promoted_and_served(texture_model, tiny_data, tmp_path) -> None:
    from chestct.fsutil import sha256_file
    from chestct.inference.folder import load_folder
    from chestct.inference.loaded import ModelRefused

    model_dir, ev = promoted(texture_model, tiny_data, tmp_path)
    card = json.loads((model_dir / "model.json").read_text())
    assert card["family"] == "texture" and card["model_file"] == "texture.skops"
    assert card["inference"]["runtime"] == "skops"
    assert card["inference"]["sha256"] == sha256_file(model_dir / "texture.skops")
    assert "cam" not in card and "not offered" in card["offers"]["mc_dropout"]
    served = load_folder(model_dir)
    assert served.family == "texture" and served.head is None
    # The served answer is evaluate's calibrated probability for the same prepared slice.
    assert_served_as_evaluated(served, ev, atol=1e-6)
    data = bytearray((model_dir / "texture.skops").read_bytes())
    data[-100] ^= 0x01
    (model_dir / "texture.skops").write_bytes(bytes(data))
    with pytest.raises(ModelRefused, match="sha256"):
        load_folder(model_dir)


@pytest.fixture(scope="module")
def ensemble_model(trained, texture_model, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ensemble")
    cnn = shutil.copy2(trained[2], folder / families.CNN_FILE)
    tex = shutil.copy2(texture_model, folder / families.TEXTURE_FILE)
    return families.write_ensemble(folder / families.ENSEMBLE_FILE, Path(cnn), Path(tex), 1.7)


def test_ensemble_probabilities_are_the_average(ensemble_model, tiny_data) -> None:
    from chestct.evaluation.scoring import load_images

    root, data = tiny_data
    model = families.load_any(ensemble_model)
    images = load_images(data["test"], root, IMAGE_SIZE)
    out = model.family_outputs(images)
    cnn_logits, _ = model.cnn_outputs(images)
    tex = model.texture.outputs(images)
    expected = (softmax(cnn_logits, 1.7) + softmax(tex["logits"])) / 2
    np.testing.assert_allclose(out["probabilities"], expected, atol=1e-6)
    np.testing.assert_allclose(softmax(out["logits"]), expected, atol=1e-5)


def test_ensemble_member_swapped_is_refused(ensemble_model, tmp_path) -> None:
    folder = tmp_path / "e"
    shutil.copytree(ensemble_model.parent, folder)
    (folder / families.TEXTURE_FILE).write_bytes(b"other")
    with pytest.raises(families.FamilyError, match="sha256"):
        families.load_any(folder / families.ENSEMBLE_FILE)


def test_ensemble_candidate_is_promoted_and_served(ensemble_model, tiny_data, tmp_path) -> None:
    from chestct.inference.analysis import analyse
    from chestct.inference.explain import explain
    from chestct.inference.folder import load_folder

    model_dir, ev = promoted(ensemble_model, tiny_data, tmp_path)
    card = json.loads((model_dir / "model.json").read_text())
    assert card["family"] == "ensemble" and card["ensemble"]["cnn_temperature"] == 1.7
    assert card["texture"]["sha256"] and card["cam"]["sha256"]
    served = load_folder(model_dir)
    assert served.backend == "litert+skops"
    first = ev.images[0, :, :, 0]
    result = analyse(served, first, 8, 0)
    # Evaluate ran the exported CNN member in batches, the service one image at a time.
    assert_served_as_evaluated(served, ev, atol=1e-5)
    assert result.mc_mean is None  # MC-dropout is not offered by the ensemble
    why = explain(served, first, result.features, CLASSES.index("normal"))
    assert why.method == "grad-cam" and why.heat.ndim == 2
