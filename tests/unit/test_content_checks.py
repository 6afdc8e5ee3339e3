"""chestct.data.content_checks: near-copy splits, series per class, non-chest slices, marks."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from chestct.data.checks import Checker
from chestct.data.content_checks import annotation_marks, content_checks, read_slices
from chestct.data.synthetic import PATIENT_FIELD, render_slice, series_jitter
from chestct.labels import CLASSES
from chestct.settings import ValidateParams
from shipped import shipped


def _patient(label: str, seed: int) -> np.ndarray:
    return render_slice(label, np.random.default_rng(seed), patient_field=PATIENT_FIELD)


def _frame(tmp_path: Path, slices: list[tuple[str, str, np.ndarray]]) -> pd.DataFrame:
    rows = []
    for i, (split, label, grey) in enumerate(slices):
        name = f"{split}_{label}_{i}.png"
        cv2.imwrite(str(tmp_path / name), grey)
        rows.append(
            {
                "split": split,
                "label": label,
                "path": name,
                "source_path": name,
                "ok": True,
                "resized": "",
            }
        )
    return pd.DataFrame(rows)


def _run(tmp_path: Path, slices: list, **params: object) -> tuple[Checker, dict]:
    frame = _frame(tmp_path, slices)
    checker = Checker(frame, shipped(ValidateParams, **params))
    numbers = content_checks(checker, read_slices(frame, tmp_path), 0.9)
    return checker, numbers


def _train(patients: int = 3, per: int = 2) -> list[tuple[str, str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [
        ("train", label, series_jitter(_patient(label, 100 * k + p), rng))
        for k, label in enumerate(CLASSES)
        for p in range(patients)
        for _ in range(per)
    ]


def test_near_copy_split_fires_on_copies_and_not_on_novel_slices(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    train = _train()
    copies = [
        ("test", lbl, series_jitter(_patient(lbl, 100 * k), rng)) for k, lbl in enumerate(CLASSES)
    ]
    (tmp_path / "a").mkdir()
    checker, numbers = _run(tmp_path / "a", train + copies)
    fired = [f for f in checker.findings if f.check == "near_copy_split"]
    assert fired and "test 100%" in fired[0].message
    assert numbers["novelty"]["test"]["near_copy_share"] == 1.0
    assert numbers["novelty"]["train"]["q50"] > 0.9  # train's own: its series

    novel = [("test", lbl, _patient(lbl, 5000 + k)) for k, lbl in enumerate(CLASSES)]
    (tmp_path / "b").mkdir()
    checker, numbers = _run(tmp_path / "b", train + novel)
    assert not [f for f in checker.findings if f.check == "near_copy_split"]
    assert numbers["novelty"]["test"]["near_copy_share"] == 0.0
    assert checker.results["near_copy_split"].startswith("passed")


def test_few_series_flags_a_class_of_one_patient(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    train = _train(patients=3, per=1)
    one = [("train", "normal", series_jitter(_patient("normal", 77), rng)) for _ in range(4)]
    slices = [s for s in train if s[1] != "normal"] + one
    checker, numbers = _run(tmp_path, slices, min_series_per_class=3)
    assert numbers["series_per_class"]["normal"] == 1
    assert numbers["series_per_class"]["adenocarcinoma"] == 3
    fired = [f for f in checker.findings if f.check == "few_series"]
    assert len(fired) == 1 and "normal 1" in fired[0].message
    assert "adenocarcinoma" not in fired[0].message


def _abdomen(side: int = 256) -> np.ndarray:
    grey = np.zeros((side, side), np.uint8)
    yy, xx = np.mgrid[:side, :side]
    grey[((yy - side / 2) / (side * 0.35)) ** 2 + ((xx - side / 2) / (side * 0.42)) ** 2 < 1] = 170
    return grey


def test_not_chest_names_the_slice_without_lungs(tmp_path: Path) -> None:
    slices = [*_train(patients=1, per=1), ("valid", "normal", _abdomen())]
    checker, _ = _run(tmp_path, slices)
    fired = [f for f in checker.findings if f.check == "not_chest"]
    assert len(fired) == 1 and fired[0].rows == [4]
    assert "valid_normal_4.png" in fired[0].files[0] and "not a chest slice" in fired[0].files[0]


def _marked(kind: str) -> np.ndarray:
    grey = _patient("normal", 3).copy()
    if kind == "box":
        cv2.rectangle(grey, (90, 90), (150, 140), 255, 1)
    elif kind == "line":
        cv2.line(grey, (70, 170), (160, 120), 255, 1)
    elif kind == "square":
        cv2.rectangle(grey, (120, 100), (160, 140), 255, 1)
        cv2.line(grey, (120, 100), (160, 140), 255, 1)  # a crossed marker
    elif kind == "colour":
        bgr = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
        cv2.rectangle(bgr, (100, 100), (130, 130), (0, 255, 0), 1)
        return bgr
    return grey


def test_annotation_marks_sees_drawn_boxes_lines_and_markers() -> None:
    for seed in range(4):
        assert annotation_marks(_patient("normal", seed)) == ""
    for kind in ("box", "line", "square"):
        assert "saturated stroke" in annotation_marks(_marked(kind)), kind
    assert "coloured pixels" in annotation_marks(_marked("colour"))


def test_annotation_marks_is_a_finding(tmp_path: Path) -> None:
    slices = [*_train(patients=1, per=1), ("test", "normal", _marked("box"))]
    checker, _ = _run(tmp_path, slices)
    fired = [f for f in checker.findings if f.check == "annotation_marks"]
    assert len(fired) == 1 and fired[0].rows == [4]
