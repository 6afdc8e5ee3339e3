"""Acquisition features in pixels (chestct.data.acquisition) and validate's acquisition shortcut
check: it fires when one class was drawn at another zoom, and stays quiet on the embedded
synthetic default."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from chestct.data.acquisition import FEATURES, acquisition_features
from chestct.data.manifest import ACQUISITION_COLUMNS
from chestct.data.shortcuts import PIXEL_FEATURES
from chestct.data.synthetic import generate_synthetic
from chestct.imaging.preparation import Preprocessing
from chestct.labels import CLASSES
from chestct.settings import BaseParams, IngestParams, ResizeParams, SplitParams, ValidateParams
from chestct.stages.ingest import run_ingest
from chestct.stages.resize import run_resize
from chestct.stages.split import run_split
from chestct.stages.validate import run_validate, write_pictures
from helpers import zoom_out_file
from shipped import shipped

# 40 slices per class: enough for the detector's five folds, quick to make.
PER_CLASS = {"train": 30, "valid": 5, "test": 5}


def _body(width: int, height: int, box: tuple[int, int, int, int], grey: int = 150) -> np.ndarray:
    """A black frame holding a filled ellipse (the body) inside `box` = (x, y, w, h)."""
    img = np.zeros((height, width), np.uint8)
    x, y, w, h = box
    cv2.ellipse(img, (x + w // 2, y + h // 2), (w // 2, h // 2), 0, 0, 360, grey, -1)
    return img


def test_features_measure_the_body_box_and_grey_levels() -> None:
    img = _body(400, 300, (100, 75, 200, 150))
    img[:, :20] = 30  # a grey band at the left edge, outside the body: the background level
    features = acquisition_features(img)
    assert set(features) == set(FEATURES)
    assert features["width"] == 400 and features["height"] == 300
    assert features["body_found"] == 1.0
    assert features["body_share"] == pytest.approx(0.25, abs=0.03)
    assert features["body_aspect"] == pytest.approx(200 / 150, abs=0.08)
    assert features["body_p50"] == pytest.approx(150, abs=2)
    assert features["body_p95"] == pytest.approx(150, abs=2)
    # The corners of the box are outside the ellipse: black.
    assert features["body_p05"] == pytest.approx(0, abs=2)
    outside = 30 * 20 * 300 / (400 * 300 - 200 * 150)
    assert features["background"] == pytest.approx(outside, abs=1.5)


def test_zooming_out_shrinks_the_body_share_and_keeps_the_aspect() -> None:
    near = acquisition_features(_body(300, 300, (30, 60, 240, 180)))
    far = acquisition_features(_body(300, 300, (90, 105, 120, 90)))
    assert far["body_share"] == pytest.approx(near["body_share"] / 4, rel=0.15)
    assert far["body_aspect"] == pytest.approx(near["body_aspect"], rel=0.1)


def test_a_blank_slice_falls_back_to_the_frame_and_says_so() -> None:
    features = acquisition_features(np.zeros((64, 80), np.uint8))
    assert features["body_found"] == 0.0 and features["body_share"] == 1.0
    assert features["background"] == 0.0


@pytest.mark.parametrize(
    "bad",
    [np.zeros((8, 8), np.float32), np.zeros((8, 8, 3), np.uint8), np.zeros((0, 5), np.uint8)],
)
def test_features_refuse_what_is_not_a_grey_slice(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="2-D uint8 grey slice"):
        acquisition_features(bad)


def _pipeline(
    root: Path, source: str, synthetic_shortcut: str = ""
) -> tuple[object, dict[str, pd.DataFrame], pd.DataFrame]:
    """ingest -> split -> resize -> validate, with the stages' default params."""
    frame, summary = run_ingest(
        shipped(BaseParams, seed=42, image_size=32),
        shipped(
            IngestParams,
            source=source,
            synthetic_per_class=PER_CLASS,
            synthetic_shortcut=synthetic_shortcut,
        ),
        root / "artifacts" / "ingest",
        root,
    )
    assert list(summary.acquisition.columns) == list(ACQUISITION_COLUMNS)
    assert len(summary.acquisition) == frame["sha256"].nunique()
    parts, _ = run_split(frame, shipped(SplitParams), seed=42)
    index, _ = run_resize(
        parts,
        Preprocessing.from_params(shipped(ResizeParams), 32),
        root / "artifacts" / "resize",
        root,
    )
    # With the project root, as the stage runs it: the pixel checks, and shortcut folds that
    # keep a synthetic patient's series together.
    datasets, report = run_validate(
        parts, index, shipped(ValidateParams), seed=42, acquisition=summary.acquisition, root=root
    )
    return report, datasets, summary.acquisition


def test_one_class_at_another_zoom_fires_and_names_the_body_share(tmp_path: Path) -> None:
    source = tmp_path / "zoomed"
    generate_synthetic(source, 42, PER_CLASS)
    normal = [p for p in source.rglob("*.png") if p.parent.name == "normal"]
    assert len(normal) == 40
    for path in normal:
        zoom_out_file(path, 0.6)
    report, _, _ = _pipeline(tmp_path, str(source))
    finding = next(f for f in report.findings if f.check == "acquisition_shortcut")
    assert finding.severity == "warning"
    shortcut = report.shortcut
    assert shortcut["pixels"] >= shortcut["chance"] + 0.15
    # body_share gives the class away best among the pixel cues, and the report says so.
    best_pixel = next(k for k in shortcut["by_feature"] if k in PIXEL_FEATURES)
    assert best_pixel == "body_share"
    assert "on their own: body_share" in finding.message
    markdown = report.to_markdown()
    assert "| `body_share` |" in markdown and "acquisition_shortcut" in markdown
    pictures = write_pictures(report, tmp_path / "out", tmp_path)
    assert (tmp_path / "out" / pictures["acquisition"]).is_file()


def test_the_embedded_synthetic_default_raises_no_shortcut_alarm(tmp_path: Path) -> None:
    report, datasets, acquisition = _pipeline(tmp_path, "synthetic")
    assert sum(len(d) for d in datasets.values()) == 4 * 40
    checks = {f.check for f in report.findings}
    assert "acquisition_shortcut" not in checks and "shortcut" not in checks
    assert report.checks["acquisition_shortcut"]["result"].startswith("passed")
    assert report.shortcut["pixels"] < report.shortcut["chance"] + 0.15
    # Every class's slices have a body found and comparable framing.
    assert (acquisition["body_found"] == 1.0).all()
    assert set(CLASSES) == {
        lbl for s in datasets.values() for lbl in s["label"]
    }  # all four classes reached validate


@pytest.mark.parametrize(
    ("shortcut", "cues"),
    [("zoom", {"body_share"}), ("dark", {"background", "body_p05", "body_p95"})],
)
def test_the_synthetic_shortcut_option_is_caught_by_the_cue_it_plants(
    tmp_path: Path, shortcut: str, cues: set[str]
) -> None:
    """`ingest.synthetic_shortcut` (large-cell slices zoomed out, or darker, in every split)."""
    report, _, _ = _pipeline(tmp_path, "synthetic", synthetic_shortcut=shortcut)
    assert any(f.check == "acquisition_shortcut" for f in report.findings)
    best_pixel = next(k for k in report.shortcut["by_feature"] if k in PIXEL_FEATURES)
    assert best_pixel in cues
