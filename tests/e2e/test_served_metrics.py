"""Evaluate what is served (issue #23): the tiny reproduced project's metrics.json, test split,
equals what POST /predict answers for the test split's images through the real Flask app on the
promoted model/ — same predicted class for every image, the same calibrated probabilities within
float tolerance, hence the same headline metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from chestct.labels import CLASSES

pytestmark = pytest.mark.e2e

# Both run the same LiteRT file with XNNPACK, evaluate in batches and the service one image at
# a time; the JSON answer rounds probabilities to 6 decimals.
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def served(tiny_project: tuple[Path, dict[str, str]]) -> dict:
    """Every test-split image posted to /predict as a client would send it: the ingested
    original file, prepared by the service as resize prepared it."""
    from chestct.data.manifest import DATASET_COLUMNS, read_manifest
    from chestct.pointers import read_pointer
    from chestct.serving import create_app
    from chestct.settings import load_settings

    root, _ = tiny_project
    settings = load_settings(root)
    test = read_manifest(
        read_pointer(settings.paths, "validate").output_path("test", root), DATASET_COLUMNS
    )
    client = create_app(
        {"MODEL_DIR": str(root / "model"), "MC_DROPOUT_SAMPLES": 0, "AUDIT_LOG": False}
    ).test_client()
    answers = []
    for original in test["original"]:
        resp = client.post(
            "/predict", data=(root / original).read_bytes(), content_type="image/png"
        )
        assert resp.status_code == 200, resp.get_json()
        answers.append(resp.get_json())
    return {
        "root": root,
        "test": test,
        "answers": answers,
        "metrics": json.loads((root / "reports/evaluate/metrics.json").read_text("utf-8")),
        "predictions": pd.read_csv(root / "artifacts/evaluate/predictions.csv"),
        "card": json.loads((root / "model/model.json").read_text("utf-8")),
    }


def test_predict_answers_what_evaluate_measured_image_by_image(served) -> None:
    from chestct.model.calibration import softmax

    answers, predictions = served["answers"], served["predictions"]
    assert served["card"]["family"] == "cnn"
    assert list(predictions["path"]) == list(served["test"]["path"])
    assert [a["label"] for a in answers] == list(predictions["predicted"])
    # predictions.csv holds the uncalibrated probabilities; the service answers calibrated ones.
    raw = predictions[[f"p_{c}" for c in CLASSES]].to_numpy(np.float64)
    expected = softmax(np.log(raw), served["metrics"]["temperature"])
    answered = np.array([[a["probabilities"][c] for c in CLASSES] for a in answers])
    assert np.abs(answered - expected).max() <= TOLERANCE
    entropy = np.array([a["uncertainty"]["entropy"] for a in answers])
    assert np.abs(entropy - predictions["entropy_calibrated"].to_numpy()).max() <= TOLERANCE
    distance = np.array([a["ood"]["score"] for a in answers])
    relative = np.abs(distance - predictions["ood_distance"].to_numpy()) / distance
    assert relative.max() <= 1e-3  # the answer rounds the distance to 4 decimals


def test_metrics_json_equals_the_metrics_of_predicts_answers(served) -> None:
    from chestct.evaluation.metrics import classification_metrics, expected_calibration_error
    from chestct.model.modeling import label_indices

    answers, metrics = served["answers"], served["metrics"]
    y = label_indices(list(served["test"]["label"]))
    answered = np.array([[a["probabilities"][c] for c in CLASSES] for a in answers])
    served_metrics = classification_metrics(y, answered)
    for key in ("accuracy", "balanced_accuracy", "macro_f1"):
        assert served_metrics[key] == metrics[key], key
    assert served_metrics["sensitivity"] == metrics["sensitivity"]
    ece = expected_calibration_error(y, answered)
    assert ece == pytest.approx(metrics["ece_calibrated"], abs=TOLERANCE)
    assert np.mean([a["uncertainty"]["abstain"] for a in answers]) == metrics["abstain_rate"]
    assert np.mean([a["ood"]["out_of_distribution"] for a in answers]) == metrics["ood_rate"]
