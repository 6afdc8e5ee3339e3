"""Shift stress, calibration on shifted copies, the external test set and the selection metric:
evaluate's run_evaluate() on synthetic slices with their originals, an untrained 32x32 model
(no MLflow, no DVC)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from chestct.imaging.perturb import SHIFT_NAMES, apply_shift
from chestct.labels import CLASSES
from chestct.settings import BaseModelParams, EvaluateParams, PromoteParams
from helpers import synthetic_splits
from shipped import shipped

SIZE = 32


@pytest.fixture(scope="module")
def project(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, dict[str, pd.DataFrame], Path]:
    from chestct.model.modeling import build_model

    root = tmp_path_factory.mktemp("shift")
    splits = synthetic_splits(root, SIZE, {"train": 2, "valid": 2, "test": 3})
    model_path = root / "model.keras"
    build_model(shipped(BaseModelParams, filters=[4, 8]), SIZE, seed=0).save(model_path)
    return root, splits, model_path


@pytest.fixture(scope="module")
def evaluation(project):
    from chestct.stages.evaluate import run_evaluate

    root, splits, model_path = project
    return run_evaluate(model_path, splits, shipped(EvaluateParams, batch_size=8), root)


def test_every_shift_is_scored_with_its_summary_and_the_robust_metric(evaluation) -> None:
    m = evaluation.metrics
    shift = m["shift"]
    for name in SHIFT_NAMES:
        for key in ("macro_f1", "balanced_accuracy", "accuracy", "ece", "ece_calibrated"):
            assert 0.0 <= shift[name][key] <= 1.0, (name, key)
    f1 = {n: shift[n]["macro_f1"] for n in SHIFT_NAMES}
    assert shift["worst_macro_f1"] == min(f1.values())
    assert f1[shift["worst_shift"]] == shift["worst_macro_f1"]
    assert shift["mean_macro_f1"] == pytest.approx(np.mean(list(f1.values())))
    eces = [shift[n]["ece_calibrated"] for n in SHIFT_NAMES]
    assert shift["worst_ece"] == max(eces)
    assert shift["mean_ece"] == pytest.approx(np.mean(eces))
    assert m["robust_macro_f1"] == pytest.approx((m["macro_f1"] + shift["worst_macro_f1"]) / 2)


def test_shifts_are_applied_to_the_original_before_preprocessing(evaluation, project) -> None:
    from chestct.evaluation.metrics import classification_metrics
    from chestct.imaging.decoding import decode
    from chestct.imaging.preparation import Preprocessing, prepare_slice
    from chestct.model.modeling import label_indices, load_model

    root, splits, model_path = project
    test = splits["test"]
    model = load_model(model_path)
    for name in ("zoom_60", "noise_8"):
        images = np.stack(
            [
                prepare_slice(
                    apply_shift(name, decode((root / o).read_bytes()).grey, key),
                    Preprocessing(SIZE),
                ).image
                for o, key in zip(test["original"], test["sha256"], strict=True)
            ]
        )[..., None].astype(np.float32)
        proba = model.predict(images, verbose=0)
        expected = classification_metrics(label_indices(list(test["label"])), proba)
        assert evaluation.metrics["shift"][name]["macro_f1"] == pytest.approx(expected["macro_f1"])


def test_champion_rescoring_produces_the_same_keys_and_values(evaluation, project) -> None:
    from chestct.evaluation.scoring import score

    root, splits, model_path = project
    metrics, _ = score(
        model_path, splits["test"], 8, root, temperature=evaluation.metrics["temperature"]
    )
    assert metrics["robust_macro_f1"] == pytest.approx(evaluation.metrics["robust_macro_f1"])
    for name in SHIFT_NAMES:
        assert metrics["shift"][name] == pytest.approx(evaluation.metrics["shift"][name])
    assert metrics["shift"]["worst_ece"] == pytest.approx(evaluation.metrics["shift"]["worst_ece"])


def test_shift_table_picture_and_external_file_are_written(evaluation, tmp_path: Path) -> None:
    import cv2

    from chestct.stages.evaluate import write_outputs

    files = write_outputs(evaluation, tmp_path, shipped(EvaluateParams, gallery_per_class=0))
    table = pd.read_csv(files["shift"])
    assert list(table["perturbation"]) == ["clean", *SHIFT_NAMES]
    assert table["macro_f1"].iloc[0] == evaluation.metrics["macro_f1"]
    picture = cv2.imread(str(tmp_path / "shift.png"))
    assert picture is not None and picture.shape[0] > 100
    assert json.loads(files["external"].read_text(encoding="utf-8")) == {"source": "", "n": 0}
    metrics = json.loads(files["metrics"].read_text(encoding="utf-8"))
    assert metrics["shift"]["worst_macro_f1"] == evaluation.metrics["shift"]["worst_macro_f1"]
    assert not any(k.startswith("external") for k in metrics)


# --------------------------------------------------------------------------- calibration


def test_temperature_fitted_on_shifted_copies_covers_their_overconfidence() -> None:
    from chestct.assessment import fit_calibration
    from chestct.evaluation.metrics import expected_calibration_error
    from chestct.model.calibration import softmax

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 50)
    clean = rng.normal(0, 1, (200, 4))
    clean[np.arange(200), y] += 4.0  # mostly right and confident
    shifted = {"a": rng.normal(0, 1, (200, 4)) * 4.0}  # as confident, right by chance only
    shifted["a"][np.arange(200), y] += 1.0
    only_valid, what = fit_calibration(y, clean, shifted, "valid")
    assert what == "the validation split"
    both, what = fit_calibration(y, clean, shifted, "valid_and_shifted")
    assert what == "the validation split and its 1 shifted copies"
    assert both.fitted and both.temperature > only_valid.temperature
    ece = {
        t: expected_calibration_error(y, softmax(shifted["a"], t))
        for t in (only_valid.temperature, both.temperature)
    }
    assert ece[both.temperature] < ece[only_valid.temperature]


def test_calibration_json_says_what_the_temperature_was_fitted_on(project, evaluation) -> None:
    from chestct.stages.evaluate import run_evaluate

    assert evaluation.calibration["temperature_fit_on"] == "valid"
    root, splits, model_path = project
    shifted = run_evaluate(
        model_path,
        splits,
        shipped(EvaluateParams, batch_size=8, calibrate_on="valid_and_shifted"),
        root,
    )
    assert shifted.calibration["temperature_fit_on"] == "valid_and_shifted"
    # The clean figures do not depend on the calibration data; the shift block is there too.
    assert shifted.metrics["macro_f1"] == evaluation.metrics["macro_f1"]
    assert set(shifted.metrics["shift"]) == set(evaluation.metrics["shift"])


def test_serving_applies_the_calibration_formulas_evaluate_fits_with() -> None:
    from chestct.inference import analysis, folder
    from chestct.model import calibration

    assert analysis.softmax is calibration.softmax
    assert analysis.entropy is calibration.normalised_entropy
    assert analysis.abstains is calibration.abstains
    assert analysis.out_of_distribution is calibration.out_of_distribution
    assert folder.Mahalanobis is calibration.Mahalanobis
    logits = np.array([2.0, 0.5, -1.0, 0.0])
    np.testing.assert_allclose(
        calibration.softmax(logits, 1.7), calibration.softmax(logits[None], 1.7)[0], rtol=1e-12
    )


# --------------------------------------------------------------------------- external test set


@pytest.fixture(scope="module")
def external_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder <split>/<class folder>/<image>, as the public dataset's test folder."""
    from chestct.data.synthetic import generate_synthetic

    folder = tmp_path_factory.mktemp("external") / "independent"
    generate_synthetic(folder, 99, {"test": 2})
    return folder


def test_external_folder_and_archive_are_scored_with_every_metric_and_kept_apart(
    project, evaluation, external_folder: Path, tmp_path: Path
) -> None:
    from chestct.stages.evaluate import run_evaluate, write_outputs

    root, splits, model_path = project
    archive = Path(shutil.make_archive(str(tmp_path / "independent"), "zip", external_folder))
    results = {}
    for source in (str(external_folder), str(archive)):
        ev = run_evaluate(
            model_path, splits, shipped(EvaluateParams, batch_size=8, external=source), root
        )
        ext = ev.external
        assert ext["n"] == 2 * len(CLASSES) and ext["skipped"] == 0
        for key in ("accuracy", "balanced_accuracy", "macro_f1", "macro_f2", "ece"):
            assert 0.0 <= ext[key] <= 1.0, key
        assert {"ece_calibrated", "nll_calibrated", "sensitivity", "roc_auc_per_class"} <= set(ext)
        assert len(ext["digest"]) == 64 and ext["source"] == source
        assert len(ev.external_predictions) == ext["n"]
        assert set(ev.external_predictions["actual"]) == set(CLASSES)
        # The memorizer, the novel part and the intervals, as on the test split.
        assert 0.0 <= ext["baseline"]["nearest_neighbour"]["macro_f1"] <= 1.0
        assert ext["novel"]["n"] + ext["near_copy"]["n"] == ext["n"]
        assert ext["ci"]["macro_f1"]["low"] <= ext["macro_f1"] <= ext["ci"]["macro_f1"]["high"]
        assert ev.external_predictions["nearest_train_similarity"].between(-1, 1).all()
        # Never used for calibration or selection: the same temperature, the same metrics.json.
        assert ev.calibration == evaluation.calibration
        assert ev.metrics == evaluation.metrics
        results[source] = ext
        out = tmp_path / f"out-{len(results)}"
        files = write_outputs(ev, out, shipped(EvaluateParams, gallery_per_class=0))
        written = json.loads(files["external"].read_text(encoding="utf-8"))
        assert written["macro_f1"] == ext["macro_f1"]
        assert len(pd.read_csv(files["external_predictions"])) == ext["n"]
    folder_result, archive_result = results.values()
    assert folder_result["digest"] == archive_result["digest"]
    assert folder_result["macro_f1"] == archive_result["macro_f1"]


def test_external_set_errors_name_the_problem(project, tmp_path: Path) -> None:
    from chestct.runner import StageFailed
    from chestct.stages.evaluate import run_evaluate

    root, splits, model_path = project

    def run(source: str) -> None:
        run_evaluate(
            model_path, splits, shipped(EvaluateParams, batch_size=8, external=source), root
        )

    with pytest.raises(StageFailed, match=r"evaluate\.external.*nothing exists"):
        run(str(tmp_path / "missing"))
    with pytest.raises(StageFailed, match="URL is not accepted"):
        run("https://example.org/test.zip")
    (tmp_path / "notes.txt").write_text("x", encoding="utf-8")
    with pytest.raises(StageFailed, match=r"not a \.zip"):
        run(str(tmp_path / "notes.txt"))
    odd = tmp_path / "odd" / "mystery"
    odd.mkdir(parents=True)
    (odd / "a.png").write_bytes(b"x")
    with pytest.raises(StageFailed, match="mystery does not name a class"):
        run(str(tmp_path / "odd"))


# --------------------------------------------------------------------------- selection metric


def test_any_dotted_metric_key_can_select_and_lower_is_better_turns_round() -> None:
    from chestct.evaluation.selection import decide

    cand = {"macro_f1": 0.9, "shift": {"blur": {"macro_f1": 0.4}, "worst_ece": 0.03}}
    champ = {"macro_f1": 0.8, "shift": {"blur": {"macro_f1": 0.6}, "worst_ece": 0.08}}
    blur = decide(shipped(PromoteParams, metric="shift.blur.macro_f1", minimum=0.0), cand, champ)
    assert not blur.promote and (blur.candidate, blur.champion) == (0.4, 0.6)
    ece = decide(shipped(PromoteParams, metric="shift.worst_ece", minimum=0.1), cand, champ)
    assert ece.promote and "promoted" in ece.reason
    worse = decide(shipped(PromoteParams, metric="shift.worst_ece", minimum=0.1), champ, cand)
    assert not worse.promote
    first = decide(shipped(PromoteParams, metric="shift.worst_ece", minimum=0.05), champ, None)
    assert not first.promote and "maximum" in first.reason


def test_an_unknown_metric_lists_the_valid_dotted_keys() -> None:
    from chestct.evaluation.selection import SelectionError, decide

    cand = {"macro_f1": 0.9, "worst": "blur", "shift": {"blur": {"macro_f1": 0.4}}}
    with pytest.raises(
        SelectionError,
        match=r"'shift\.zoom_60\.macro_f1'.*macro_f1, "
        r"shift\.blur\.macro_f1\)",
    ):
        decide(shipped(PromoteParams, metric="shift.zoom_60.macro_f1"), cand, None)


def test_promote_refuses_the_external_set_as_selection_metric() -> None:
    from chestct.evaluation.selection import SelectionError, decide
    from chestct.settings import SettingsError
    from chestct.settings.checks import check_promote

    with pytest.raises(SettingsError, match="external test set is reported apart"):
        check_promote(shipped(PromoteParams, metric="external.macro_f1"))
    with pytest.raises(SelectionError, match="external test set"):
        decide(
            shipped(PromoteParams, metric="external.macro_f1"),
            {"external": {"macro_f1": 1.0}},
            None,
        )


def test_the_default_selection_metric_is_the_robust_one() -> None:
    assert shipped(PromoteParams).metric == "robust_macro_f1"
