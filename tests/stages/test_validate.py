"""validate: every check with its severity, quarantine, the shortcut detector, and the report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from chestct.data.check_report import Report, fails
from chestct.data.checks import CHECKS
from chestct.data.manifest import DATASET_COLUMNS, INDEX_COLUMNS, INGEST_COLUMNS, SPLITS
from chestct.data.shortcuts import detect_shortcut
from chestct.imaging.preparation import Preprocessing
from chestct.labels import CLASSES
from chestct.runner import StageFailed
from chestct.settings import (
    ResizeParams,
    SplitParams,
    ValidateParams,
)
from chestct.stages.resize import run_resize
from chestct.stages.split import run_split
from chestct.stages.validate import run_validate, write_pictures
from helpers import (
    IMAGE_SIZE,
    LONG_FOLDERS,
    ingest_folder,
    ingest_row,
    make_kaggle_folder,
    ok_index,
    split_manifests,
)
from shipped import shipped

_RNG = np.random.default_rng(11)
# Tests that are not about the shortcut detector skip it (its cross-validation costs seconds).
QUICK = {"shortcut_min_images": 10_000}


def row(split: str, label: str, key: str, **kw: object) -> dict[str, object]:
    """An ingest row with a far-from-everything perceptual hash unless one is given."""
    return ingest_row(split, label, key) | {"phash": _RNG.bytes(32).hex()} | kw


def dataset(per_class: int = 3, extra: list[dict] | None = None) -> dict[str, pd.DataFrame]:
    rows = [row(s, c, f"{s}-{c}-{i}") for s in SPLITS for c in CLASSES for i in range(per_class)]
    frame = pd.DataFrame(rows + (extra or []), columns=list(INGEST_COLUMNS))
    return {s: frame[frame["split"] == s].reset_index(drop=True) for s in SPLITS}


def index_for(manifests: dict[str, pd.DataFrame], **by_sha: dict) -> pd.DataFrame:
    shas = pd.concat(manifests.values())["sha256"].drop_duplicates()
    rows = []
    for s in shas:
        base = {
            "sha256": s,
            "resized": f"artifacts/resize/images/{s}.png",
            "ok": True,
            "error": "",
            "mean": 100.0 + _RNG.normal(),
            "std": 20.0,
        }
        rows.append(base | by_sha.get(s, {}))
    return pd.DataFrame(rows, columns=list(INDEX_COLUMNS))


def found(report) -> dict[str, str]:
    return {f.check: f.severity for f in report.findings}


def test_clean_data_passes_every_check() -> None:
    manifests = dataset()
    datasets, report = run_validate(manifests, index_for(manifests), shipped(ValidateParams))
    assert report.findings == []
    assert set(report.checks) == set(CHECKS)
    assert report.checks["shortcut"]["result"].startswith("skipped")  # 36 < 40 images
    assert report.checks["acquisition_shortcut"]["result"].startswith("skipped")
    shortcuts = {"shortcut", "acquisition_shortcut"}
    assert {c["result"] for n, c in report.checks.items() if n not in shortcuts} == {"passed"}
    assert sum(len(d) for d in datasets.values()) == 36


def test_per_file_checks() -> None:
    extra = [
        row("train", "normal", "tiny", bytes=10),
        row("train", "normal", "thin", width=8, height=300),
        row("train", "normal", "huge", width=9000, height=300),
        row("train", "normal", "blank"),
        row("train", "normal", "cmyk", mode="CMYK"),
        row("train", "normal", "jpeg", format="jpeg"),
        row("train", "normal", "noext", format="jpeg", source_path="src/train/normal/IM0001"),
    ]
    manifests = dataset(extra=extra)
    blank = extra[3]["sha256"]
    _, report = run_validate(
        manifests, index_for(manifests, **{blank: {"std": 0.5}}), shipped(ValidateParams, **QUICK)
    )
    assert found(report) == {
        "small_file": "warning",
        "dimensions": "warning",
        "near_blank": "warning",
        "unexpected_mode": "warning",
        "format_mismatch": "info",
    }
    files = {f.check: f.files for f in report.findings}
    assert files["small_file"] == ["src/train/normal/tiny.png: 10 bytes"]
    assert sorted(files["dimensions"]) == [
        "src/train/normal/huge.png: 9000x300",
        "src/train/normal/thin.png: 8x300",
    ]
    assert files["near_blank"] == ["src/train/normal/blank.png: std 0.50"]
    assert files["unexpected_mode"] == ["src/train/normal/cmyk.png: mode CMYK"]
    assert files["format_mismatch"] == ["src/train/normal/jpeg.png: jpeg data"]  # not IM0001
    assert "jpeg under .png" in next(
        f.message for f in report.findings if f.check == "format_mismatch"
    )
    assert report.worst == "warning"


def test_undecodable_includes_files_ingest_skipped() -> None:
    manifests = dataset()
    bad = manifests["test"].iloc[0]["sha256"]
    index = index_for(manifests, **{bad: {"ok": False, "resized": "", "error": "broken"}})
    skipped = [{"path": "/data/x.dcm", "reason": "DICOM file has no pixel data"}]
    datasets, report = run_validate(manifests, index, shipped(ValidateParams), skipped=skipped)
    (finding,) = report.findings
    assert finding.check == "undecodable" and finding.severity == "error"
    assert finding.files == [
        "/data/x.dcm: DICOM file has no pixel data",
        f"{manifests['test'].iloc[0]['source_path']}: broken",
    ]
    assert "(1 skipped at ingest)" in finding.message
    assert len(datasets["test"]) == 11
    assert report.summary["files"] == 37


def test_copies_conflicts_and_leaks() -> None:
    near_hash = "5a" * 32
    extra = [
        row("train", "normal", "a"),
        row("train", "normal", "a", source_path="train/a-copy.png"),  # exact copy
        row("train", "adenocarcinoma", "n1", phash=near_hash),
        row("train", "adenocarcinoma", "n2", phash=near_hash[:-1] + "b"),  # near copy
        row("train", "squamous_cell_carcinoma", "c"),
        row("train", "large_cell_carcinoma", "c", source_path="train/c-other.png"),  # conflict
        row("train", "normal", "m1", phash="77" * 32),
        row("train", "adenocarcinoma", "m2", phash="77" * 31 + "76"),  # near conflict
        row("train", "normal", "l"),
        row("valid", "normal", "l", source_path="valid/l.png"),  # exact leak
        row("train", "normal", "k1", phash="e1" * 32),
        row("test", "normal", "k2", phash="e1" * 31 + "e0"),  # near leak
    ]
    manifests = dataset(extra=extra)
    _, report = run_validate(manifests, index_for(manifests), shipped(ValidateParams, **QUICK))
    assert found(report) == {
        "duplicate_within_split": "warning",
        "near_duplicate": "info",
        "label_conflict": "error",
        "near_label_conflict": "warning",
        "cross_split_duplicate": "error",
        "cross_split_near_duplicate": "warning",
    }
    by = {f.check: f for f in report.findings}
    assert by["duplicate_within_split"].message.startswith("train: 2 redundant cop(ies)")
    # n1~n2, and m1~m2 (which also conflict in label).
    assert by["near_duplicate"].message.startswith("train: 2 near-duplicate file(s) in 2 group")
    assert "large_cell_carcinoma: train/c-other.png" in by["label_conflict"].files
    assert by["near_label_conflict"].message.startswith("1 group(s)")
    assert "1 valid file(s) identical to train files" in by["cross_split_duplicate"].message
    assert by["cross_split_duplicate"].files[0] == "valid: valid/l.png"
    assert "test: src/test/normal/k2.png" in by["cross_split_near_duplicate"].files
    assert report.summary["exact_redundant_copies"] == 3
    assert report.summary["exact_copy_groups"] == 3


def test_near_checks_can_be_turned_off() -> None:
    extra = [
        row("train", "normal", "k1", phash="e1" * 32),
        row("test", "normal", "k2", phash="e1" * 31 + "e0"),
    ]
    manifests = dataset(extra=extra)
    _, report = run_validate(
        manifests, index_for(manifests), shipped(ValidateParams, near_duplicate_distance=-1)
    )
    assert report.findings == []
    assert report.checks["cross_split_near_duplicate"]["result"].startswith("off")


def test_quarantine_leaves_offenders_out_and_resolves_their_findings() -> None:
    extra = [
        row("train", "squamous_cell_carcinoma", "c"),
        row("train", "large_cell_carcinoma", "c", source_path="train/c-other.png"),
        row("train", "normal", "l"),
        row("test", "normal", "l", source_path="test/l.png"),
        row("train", "normal", "tiny", bytes=10),
        row("train", "normal", "jpeg", format="jpeg"),
    ]
    manifests = dataset(extra=extra)
    params = shipped(ValidateParams, quarantine=True, **QUICK)
    datasets, report = run_validate(manifests, index_for(manifests), params)

    assert found(report) == {
        "label_conflict": "error",
        "cross_split_duplicate": "error",
        "small_file": "warning",
        "format_mismatch": "info",
        "duplicate_within_split": "warning",
    }
    assert all(f.resolved for f in report.findings if f.severity != "info")
    assert report.worst == "info"
    assert not fails(report, "warning")
    quarantined = {q["source_path"]: q["checks"] for q in report.quarantined}
    assert quarantined == {
        "src/train/squamous_cell_carcinoma/c.png": "label_conflict",
        "train/c-other.png": "duplicate_within_split,label_conflict",
        "test/l.png": "cross_split_duplicate",
        "src/train/normal/tiny.png": "small_file",
    }
    handed_on = set(pd.concat(datasets.values())["source_path"])
    assert not handed_on & set(quarantined)
    assert {"src/train/normal/l.png", "src/train/normal/jpeg.png"} <= handed_on  # kept
    assert report.summary["quarantined"] == 4

    # Without quarantine the same data fails and nothing is left out.
    datasets, report = run_validate(
        manifests, index_for(manifests), shipped(ValidateParams, **QUICK)
    )
    assert fails(report, "error")
    assert sum(len(d) for d in datasets.values()) == 36 + 6


def test_class_count_and_imbalance() -> None:
    manifests = dataset(per_class=2)
    train = manifests["train"]
    extra = pd.DataFrame([row("train", "normal", f"more-{i}") for i in range(30)])
    manifests["train"] = pd.concat([train, extra], ignore_index=True)
    manifests["valid"] = manifests["valid"][manifests["valid"]["label"] != "normal"]
    _, report = run_validate(
        manifests, index_for(manifests), shipped(ValidateParams, max_imbalance=5, **QUICK)
    )
    assert found(report) == {"class_count": "error", "class_imbalance": "warning"}
    imbalance = next(f for f in report.findings if f.check == "class_imbalance")
    assert imbalance.message.startswith("train: the largest class (normal, 32) is 16.0x")


def test_severities_override_and_unknown_checks_are_named() -> None:
    extra = [row("train", "normal", "jpeg", format="jpeg")]
    manifests = dataset(extra=extra)
    params = shipped(ValidateParams, severities={"format_mismatch": "error"})
    _, report = run_validate(manifests, index_for(manifests), params)
    assert found(report) == {"format_mismatch": "error"}
    with pytest.raises(StageFailed, match="unknown check 'typo'; checks are undecodable, "):
        run_validate(
            manifests, index_for(manifests), shipped(ValidateParams, severities={"typo": "info"})
        )


def metadata_frame(leaky: bool, per_class: int = 20) -> pd.DataFrame:
    rng = np.random.default_rng(3)
    rows = []
    for c, label in enumerate(CLASSES):
        for i in range(per_class):
            width = (
                300 + 150 * c + int(rng.integers(0, 40)) if leaky else int(rng.integers(300, 800))
            )
            rows.append(
                {
                    "label": label,
                    "width": width,
                    "height": int(width * 0.7),
                    "mode": "RGBA",
                    "format": "png",
                    "bytes": int(rng.integers(9e4, 2e5)),
                    "mean": float(rng.normal(110, 5)),
                    "group": f"{label}{i}",
                }
            )
    return pd.DataFrame(rows)


def test_shortcut_detector_finds_size_and_stays_quiet_without_it() -> None:
    leaky = metadata_frame(True)
    result = detect_shortcut(leaky, leaky["group"], seed=0)
    assert result is not None and result.leaks(0.15)
    assert result.score > 0.8 and result.chance == 0.25
    assert result.strongest() == "size"
    fair = metadata_frame(False)
    result = detect_shortcut(fair, fair["group"], seed=0)
    assert result is not None and not result.leaks(0.15)
    assert detect_shortcut(fair.head(3), fair["group"].head(3), seed=0) is None


def test_shortcut_is_a_finding_with_a_picture_in_the_report(tmp_path: Path) -> None:
    rows = []
    for c, label in enumerate(CLASSES):
        for i in range(12):
            key = f"{label}-{i}"
            rows.append(
                row(
                    "train" if i < 8 else ("valid" if i < 10 else "test"),
                    label,
                    key,
                    width=200 + 200 * c + i,
                    height=150 + 150 * c,
                )
            )
    frame = pd.DataFrame(rows, columns=list(INGEST_COLUMNS))
    manifests = {s: frame[frame["split"] == s].reset_index(drop=True) for s in SPLITS}
    frame = pd.concat(manifests.values())
    extra = pd.DataFrame([dict(frame.iloc[0]) | {"source_path": "copy.png"}])
    manifests["train"] = pd.concat([manifests["train"], extra], ignore_index=True)
    index = index_for(manifests)
    for sha in index["sha256"]:
        cv2.imwrite(str(tmp_path / f"{sha}.png"), np.full((16, 16), 128, np.uint8))
    index["resized"] = [f"{sha}.png" for sha in index["sha256"]]

    _, report = run_validate(manifests, index, shipped(ValidateParams), seed=1)
    assert found(report) == {"duplicate_within_split": "warning", "shortcut": "warning"}
    shortcut = next(f for f in report.findings if f.check == "shortcut")
    assert "strongest alone: size" in shortcut.message
    pictures = write_pictures(report, tmp_path / "out", tmp_path)
    assert set(pictures) == {"01_duplicate_within_split", "shortcut"}
    assert all((tmp_path / "out" / p).stat().st_size > 1000 for p in pictures.values())
    text = report.to_markdown()
    assert "![duplicate_within_split](examples/01_duplicate_within_split.png)" in text
    assert "## Shortcut detector" in text and "| size |" in text
    data = json.loads(json.dumps(report.to_dict()))
    assert data["status"] == "warning"
    assert data["shortcut"]["by_family"]["size"] > 0.8
    assert data["findings"][0]["picture"] == "examples/01_duplicate_within_split.png"


def checks(report: Report) -> dict[str, str]:
    return {f.check: f.severity for f in report.findings}


def test_validate_clean_data_passes_and_hands_on_resized_paths() -> None:
    manifests = split_manifests(per_class=2)
    index = ok_index(manifests)
    datasets, report = run_validate(manifests, index, shipped(ValidateParams, min_class_count=2))

    assert report.findings == []
    assert report.worst == "info"
    assert not fails(report, "warning")
    assert report.counts == {s: dict.fromkeys(CLASSES, 2) for s in SPLITS}
    for split in SPLITS:
        data = datasets[split]
        assert list(data.columns) == list(DATASET_COLUMNS)
        assert len(data) == 8
        assert data["path"].str.startswith("artifacts/resize/images/").all()
        assert list(data["sha256"]) == list(manifests[split]["sha256"])


def test_validate_duplicate_within_a_split_is_a_warning() -> None:
    manifests = split_manifests(per_class=2)
    train = manifests["train"]
    manifests["train"] = pd.concat(
        [train, train.iloc[[0]].assign(source_path="copy.png")], ignore_index=True
    )
    _, report = run_validate(manifests, ok_index(manifests), shipped(ValidateParams))

    assert checks(report) == {"duplicate_within_split": "warning"}
    (finding,) = report.findings
    assert finding.message.startswith("train: 1 redundant cop(ies) in 1 group(s)")
    assert sorted(finding.files) == sorted(["copy.png", train.iloc[0]["source_path"]])
    assert report.worst == "warning"
    assert not fails(report, "error")
    assert fails(report, "warning")
    assert not fails(report, "never")


def test_validate_same_content_in_two_splits_is_an_error() -> None:
    manifests = split_manifests(per_class=2)
    leaked = manifests["train"].iloc[[0]].assign(split="test", source_path="leak.png")
    manifests["test"] = pd.concat([manifests["test"], leaked], ignore_index=True)
    _, report = run_validate(manifests, ok_index(manifests), shipped(ValidateParams))

    assert checks(report) == {"cross_split_duplicate": "error"}
    (finding,) = report.findings
    assert "1 content(s) appear in more than one split" in finding.message
    assert "test: leak.png" in finding.files
    assert f"train: {manifests['train'].iloc[0]['source_path']}" in finding.files
    assert fails(report, "error")
    assert not fails(report, "never")


def test_validate_label_conflict_is_an_error() -> None:
    manifests = split_manifests(per_class=2)
    valid = manifests["valid"]
    conflict = valid.iloc[[0]].assign(label="normal", source_path="other.png")
    assert valid.iloc[0]["label"] != "normal"
    manifests["valid"] = pd.concat([valid, conflict], ignore_index=True)
    _, report = run_validate(manifests, ok_index(manifests), shipped(ValidateParams))

    assert checks(report)["label_conflict"] == "error"
    finding = next(f for f in report.findings if f.check == "label_conflict")
    assert "normal: other.png" in finding.files
    assert report.worst == "error"


def test_validate_low_class_count_is_an_error() -> None:
    manifests = split_manifests(per_class=2)
    valid = manifests["valid"]
    manifests["valid"] = valid[valid["label"] != "normal"].reset_index(drop=True)
    _, report = run_validate(
        manifests, ok_index(manifests), shipped(ValidateParams, min_class_count=2)
    )

    assert checks(report) == {"class_count": "error"}
    (finding,) = report.findings
    assert finding.message == "valid: class(es) normal have fewer than 2 images"
    assert report.counts["valid"]["normal"] == 0

    _, relaxed = run_validate(
        manifests, ok_index(manifests), shipped(ValidateParams, min_class_count=0)
    )
    assert relaxed.findings == []


def test_validate_leaves_out_undecodable_files() -> None:
    manifests = split_manifests(per_class=3)
    index = ok_index(manifests)
    bad_sha = manifests["test"].iloc[0]["sha256"]
    index.loc[index["sha256"] == bad_sha, ["ok", "resized", "error"]] = [False, "", "broken"]
    datasets, report = run_validate(manifests, index, shipped(ValidateParams))

    assert checks(report) == {"undecodable": "error"}
    assert report.findings[0].files == [f"{manifests['test'].iloc[0]['source_path']}: broken"]
    assert len(datasets["test"]) == 4 * 3 - 1
    assert bad_sha not in set(datasets["test"]["sha256"])


def test_validate_report_markdown_lists_counts_and_findings() -> None:
    manifests = split_manifests(per_class=2)
    train = manifests["train"]
    manifests["train"] = pd.concat([train, train.iloc[[0]]], ignore_index=True)
    _, report = run_validate(manifests, ok_index(manifests), shipped(ValidateParams))
    text = report.to_markdown()
    assert "Status: **warning**" in text
    assert "| valid | 2 | 2 | 2 | 2 |" in text
    assert "`duplicate_within_split`" in text
    assert report.to_dict()["status"] == "warning"


def test_validate_on_resized_images(tmp_path: Path) -> None:
    """ingest -> split -> resize -> validate on real files, with one leaked copy."""
    source = make_kaggle_folder(tmp_path / "kaggle", {"train": 2, "valid": 2, "test": 2})
    leak = next((source / "train" / LONG_FOLDERS["adenocarcinoma"]).iterdir())
    shutil.copy(leak, source / "test" / "adenocarcinoma" / "leak.png")
    frame, _ = ingest_folder(tmp_path)
    parts, _ = run_split(frame, shipped(SplitParams), seed=0)
    index, _ = run_resize(
        parts,
        Preprocessing.from_params(shipped(ResizeParams), IMAGE_SIZE),
        tmp_path / "artifacts" / "resize",
        tmp_path,
        workers=1,
    )
    datasets, report = run_validate(parts, index, shipped(ValidateParams))

    assert checks(report) == {"cross_split_duplicate": "error"}
    assert all((tmp_path / p).is_file() for d in datasets.values() for p in d["path"])
    assert len(datasets["test"]) == 4 * 2 + 1


def test_validate_reads_the_pixels_near_copies_series_and_report(tmp_path: Path) -> None:
    """ingest (synthetic series of 3) -> split -> resize -> validate with the project root:
    the near-copy table per split against train's own, series per class, novelty.png."""
    frame, _ = ingest_folder(
        tmp_path, "synthetic", synthetic_per_class={"train": 6, "valid": 3, "test": 3}
    )
    parts, _ = run_split(frame, shipped(SplitParams), seed=0)
    index, _ = run_resize(
        parts,
        Preprocessing.from_params(shipped(ResizeParams), IMAGE_SIZE),
        tmp_path / "artifacts" / "resize",
        tmp_path,
        workers=1,
    )
    params = shipped(ValidateParams, min_series_per_class=3, **QUICK)
    _, report = run_validate(parts, index, params, root=tmp_path, near_copy_similarity=0.9)

    novelty = report.summary["novelty"]
    assert set(novelty) == {"train", "valid", "test"}
    # Train's slices come in series of 3 (near-copies); valid and test are other patients.
    assert novelty["train"]["near_copy_share"] == 1.0
    for split in ("valid", "test"):
        assert novelty[split]["near_copy_share"] <= 0.5 and novelty[split]["q50"] < 0.9
    assert report.checks["near_copy_split"]["result"].startswith("passed")
    # 6 train slices per class = 2 synthetic patients: below the minimum of 3.
    assert report.summary["series_per_class"] == dict.fromkeys(CLASSES, 2)
    assert "few_series" in {f.check for f in report.findings}
    assert "Near-copies of train" in report.to_markdown()
    assert len(report.novelty_values["test"]) == 4 * 3
