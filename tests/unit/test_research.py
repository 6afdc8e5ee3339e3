"""The research helpers the notebooks call (chestct.research: eda, error_analysis), on small
hand-made data."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from chestct.evaluation import plots
from chestct.labels import CLASSES
from chestct.research import eda
from chestct.research import error_analysis as ea
from chestct.settings import load_settings
from helpers import make_kaggle_folder, write_image
from model_folder import dicom_bytes
from project_copy import project_copy


@pytest.fixture
def scanned(tmp_path: Path) -> pd.DataFrame:
    """A Kaggle-layout folder with a cross-split copy, a label conflict and a broken file."""
    source = make_kaggle_folder(tmp_path / "src", {"train": 2, "valid": 1, "test": 1})
    first = next((source / "train").rglob("*.png"))
    label_dir = first.parent.name
    # The same bytes in test (leakage) and under another class (label conflict).
    shutil.copy2(first, next((source / "test").glob(f"{label_dir[:5]}*")) / "copy.png")
    other = next(d for d in (source / "train").iterdir() if d.name != label_dir)
    shutil.copy2(first, other / "conflict.png")
    (other / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return eda.scan(source)


def test_scan_reads_labels_format_size_and_errors(scanned: pd.DataFrame) -> None:
    assert list(scanned.columns) == list(eda.SCAN_COLUMNS)
    assert set(scanned["label"]) == set(CLASSES)
    assert set(scanned["split"]) == {"train", "valid", "test"}
    broken = scanned[scanned["relative"].str.endswith("broken.png")]
    assert len(broken) == 1 and "PNG header is truncated" in broken.iloc[0]["error"]
    good = scanned[scanned["error"] == ""]
    assert (good["width"] >= 20).all() and set(good["mode"]) <= {"L", "RGB", "RGBA"}
    assert set(good["format"]) == {"png"}


def test_class_counts_and_size_tables(scanned: pd.DataFrame) -> None:
    counts = eda.class_counts(scanned)
    assert list(counts.index) == [*CLASSES, "total"]
    assert list(counts.columns) == ["train", "valid", "test", "total"]
    assert counts.loc["total", "total"] == (scanned["error"] == "").sum()
    sizes = eda.size_and_mode_by_class(scanned)
    assert list(sizes.index) == list(CLASSES)
    assert (sizes["width min"] <= sizes["width max"]).all()
    assert set(eda.intensity_by_class(scanned).index) == set(CLASSES)


def test_duplicate_groups_flag_leakage_and_label_conflicts(scanned: pd.DataFrame) -> None:
    groups = eda.duplicate_groups(scanned, "sha256")
    assert len(groups) == 1
    group = groups.iloc[0]
    assert group["files"] == 3 and group["cross_split"] and group["label_conflict"]
    assert eda.duplicate_groups(scanned, "pixel_sha256")["files"].tolist() == [3]
    with pytest.raises(eda.EdaError, match="pixel_sha256"):
        eda.duplicate_groups(scanned, "md5")


def test_pixel_duplicates_catch_lossless_reencoding(tmp_path: Path) -> None:
    write_image(tmp_path / "normal" / "a.png", fmt="png", seed=7)
    write_image(tmp_path / "normal" / "a.bmp", fmt="bmp", seed=7)
    write_image(tmp_path / "adenocarcinoma" / "b.png", seed=8)
    frame = eda.scan(tmp_path)
    assert eda.duplicate_groups(frame, "sha256").empty
    (group,) = eda.duplicate_groups(frame, "pixel_sha256").itertuples()
    assert group.files == 2 and not group.cross_split


def test_sample_grid_has_a_row_per_class(scanned: pd.DataFrame) -> None:
    fig = plots.class_grid(eda.class_panels(scanned, per_class=3, seed=1))
    assert len(fig.axes) == len(CLASSES) * 3
    assert sum(bool(ax.images) for ax in fig.axes) == len(CLASSES) * 3
    with pytest.raises(eda.EdaError, match="per_class"):
        eda.class_panels(scanned, per_class=0)


def test_open_source_names_a_missing_folder(tmp_path: Path) -> None:
    settings = load_settings(project_copy(tmp_path))
    with pytest.raises(eda.EdaError, match="not a folder"), eda.open_source(settings, "nope"):
        pass


def test_scan_names_a_folder_that_is_no_class(tmp_path: Path) -> None:
    write_image(tmp_path / "normal" / "a.png")
    write_image(tmp_path / "holiday photos" / "b.png")
    with pytest.raises(eda.EdaError, match=r"holiday photos.*ingest\.class_map"):
        eda.scan(tmp_path)


def test_open_source_unpacks_an_archive_and_cleans_up(tmp_path: Path) -> None:
    settings = load_settings(project_copy(tmp_path / "project"))
    folder = make_kaggle_folder(tmp_path / "kaggle", {"train": 1, "valid": 1, "test": 1})
    archive = shutil.make_archive(str(tmp_path / "chest"), "zip", folder)
    with eda.open_source(settings, archive) as unpacked:
        frame = eda.scan(unpacked)
        assert unpacked.is_dir()
    assert len(frame) == 12 and set(frame["split"]) == {"train", "valid", "test"}
    assert not unpacked.exists()


def test_dicom_files_decode_through_ingests_window(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "normal").mkdir(parents=True)
    (data / "normal" / "slice.dcm").write_bytes(dicom_bytes(seed=1))
    write_image(data / "adenocarcinoma" / "a.png", seed=2)
    settings = load_settings(project_copy(tmp_path / "project"))
    frame = eda.scan(data, window=eda.window_of(settings))
    dicom = frame[frame["relative"] == "normal/slice.dcm"].iloc[0]
    assert dicom["error"] == "" and dicom["format"] == "dicom" and dicom["width"] == 64
    refused = eda.scan(data)  # without a window, as ingest would never read it
    assert "window" in refused[refused["relative"] == "normal/slice.dcm"].iloc[0]["error"]


def test_acquisition_table_summary_plot_and_classifier(scanned: pd.DataFrame) -> None:
    table = eda.acquisition_table(scanned)
    assert len(table) == (scanned["error"] == "").sum()
    assert {"body_share", "body_aspect", "background", "body_p05", "body_p95"} <= set(table)
    assert table["body_share"].between(0, 1).all()
    summary = eda.acquisition_by_class(table)
    assert list(summary.index) == list(CLASSES) and "body found" in summary.columns
    assert len(plots.cue_boxes(table, eda.CUES).axes) == 9
    result = eda.acquisition_shortcut(table, seed=0)
    assert result is not None and result.pixels is not None
    # Scored always in the notebook, not only when there is a leak to explain.
    assert set(result.by_family) >= {"body box", "grey levels"}
    assert list(result.by_feature) and result.top_features(1)
    grid = plots.class_grid(eda.class_panels(scanned, per_class=2, seed=1, boxes=True), side=2.0)
    assert sum(bool(ax.patches) for ax in grid.axes) == len(CLASSES) * 2


def _predictions(actual: list[str], predicted: list[str], confidence: list[float]):
    frame = pd.DataFrame({"actual": actual, "predicted": predicted, "confidence": confidence})
    frame["correct"] = frame["actual"] == frame["predicted"]
    return frame


def test_confusion_report_and_worst_errors() -> None:
    a, b, c, d = CLASSES
    pred = _predictions([a, a, b, b, c, d], [a, b, b, b, a, d], [0.9, 0.95, 0.6, 0.7, 0.5, 0.8])
    table = ea.confusion_table(pred)
    assert table.loc[a, b] == 1 and table.loc[b, b] == 2 and table.to_numpy().sum() == 6
    share = ea.confusion_table(pred, normalise=True)
    assert share.loc[a].sum() == pytest.approx(1.0) and share.loc[a, a] == pytest.approx(0.5)
    report = ea.per_class_report(pred)
    assert report.loc[b, "recall"] == pytest.approx(1.0)
    assert report.loc[b, "precision"] == pytest.approx(2 / 3)
    assert report.loc[c, "support"] == 1
    headline = ea.headline_metrics(pred)
    assert headline["accuracy"] == pytest.approx(4 / 6)
    assert list(ea.worst_errors(pred, 5)["confidence"]) == [0.95, 0.5]


def test_answer_summary_compares_right_and_wrong_answers() -> None:
    a, b, *_ = CLASSES
    pred = _predictions([a, a, b, b], [a, a, a, b], [0.9, 0.7, 0.6, 0.8])
    pred["entropy"] = [0.1, 0.5, 0.9, 0.3]
    pred["abstain"] = [False, True, True, None]
    pred["out_of_distribution"] = [None, None, None, None]
    table = ea.answer_summary(pred)
    assert list(table.index) == ["right", "wrong"]
    assert table.loc["right", "images"] == 3 and table.loc["wrong", "images"] == 1
    assert table.loc["right", "abstained"] == pytest.approx(0.5)  # the unknown one is left out
    assert table.loc["wrong", "abstained"] == pytest.approx(1.0)
    assert table.loc["right", "mean_confidence"] == pytest.approx(0.8)
    assert np.isnan(table.loc["wrong", "out_of_distribution"])


def test_calibration_bins_and_ece() -> None:
    a, b, *_ = CLASSES
    # Four answers at 0.95 confidence, three right: a gap of 0.2 in that bin; one at 0.55, right.
    pred = _predictions([a, a, a, b, a], [a, a, a, a, a], [0.95, 0.95, 0.95, 0.95, 0.55])
    table, ece = ea.calibration(pred, bins=10)
    assert len(table) == 10 and table["count"].sum() == 5
    top = table.iloc[9]
    assert top["count"] == 4 and top["accuracy"] == pytest.approx(0.75)
    assert ece == pytest.approx((4 * 0.2 + 1 * 0.45) / 5)
    with pytest.raises(ValueError, match="bins"):
        ea.calibration(pred, bins=0)


def test_error_analysis_needs_a_promoted_model(tmp_path: Path) -> None:
    settings = load_settings(project_copy(tmp_path))
    with pytest.raises(ea.AnalysisError, match="dvc repro"):
        ea.load_promoted(settings)


def test_predict_split_prepares_each_slice_once(tmp_path: Path, monkeypatch) -> None:
    """The error analysis feeds the model what /predict would: the original prepared once, or
    the resized copy as it is; never the resized copy prepared a second time (before: the body
    crop and equalisation ran twice, accuracy 0.813 against evaluate's 0.824 on real data)."""
    from types import SimpleNamespace

    import cv2

    from chestct.imaging.encoding import encode_png
    from chestct.inference import analysis
    from chestct.research.error_analysis import Promoted, predict_split

    size = 32
    rng = np.random.default_rng(0)

    def prepare(decoded):  # a stand-in preparation that is visibly not idempotent
        grey = decoded.grey[2:-2, 2:-2]
        return cv2.resize(grey, (size, size), interpolation=cv2.INTER_AREA)

    served = SimpleNamespace(prepare=prepare, window=None, classes=list(CLASSES), image_size=size)
    rows = []
    for i in range(3):
        original = rng.integers(0, 255, (60, 70), dtype=np.uint8)
        (tmp_path / f"o{i}.png").write_bytes(encode_png(original))
        resized = prepare(SimpleNamespace(grey=original))
        (tmp_path / f"r{i}.png").write_bytes(encode_png(resized))
        rows.append(
            {
                "path": f"r{i}.png",
                "label": CLASSES[i],
                "source_path": f"s{i}",
                "original": f"o{i}.png" if i < 2 else "",
            }
        )
    seen = []

    def analyse(model, image, mc_samples, seed):
        seen.append(np.asarray(image).copy())
        proba = np.full(len(CLASSES), 0.1)
        proba[0] = 0.7
        return SimpleNamespace(
            entropy=0.5,
            abstain=False,
            out_of_distribution=False,
            ood_score=1.0,
            probabilities=proba,
        )

    monkeypatch.setattr(analysis, "analyse", analyse)
    pred = predict_split(Promoted({}, served, tmp_path), pd.DataFrame(rows), tmp_path)
    assert len(pred) == 3
    for i, image in enumerate(seen):
        expected = cv2.imread(str(tmp_path / f"r{i}.png"), cv2.IMREAD_GRAYSCALE)
        np.testing.assert_array_equal(image, expected)
