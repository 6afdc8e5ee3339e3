"""Each stage's run_<stage>() called directly on tiny generated images (no MLflow, no DVC)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import pytest

from chestct.checks import Report, fails
from chestct.fsutil import sha256_file
from chestct.imaging import prepare
from chestct.labels import CLASSES
from chestct.manifest import DATASET_COLUMNS, INDEX_COLUMNS, INGEST_COLUMNS, SPLITS
from chestct.runner import StageFailed
from chestct.settings import (
    AugmentParams,
    BaseModelParams,
    BaseParams,
    EvaluateParams,
    IngestParams,
    PromoteParams,
    ResizeParams,
    SplitParams,
    TrainParams,
    ValidateParams,
)
from chestct.stages.ingest import IngestSummary, run_ingest
from chestct.stages.promote import decide, install_model, read_card
from chestct.stages.resize import normalise_of, run_resize
from chestct.stages.split import run_split
from chestct.stages.validate import run_validate
from helpers import (
    LONG_FOLDERS,
    SHORT_FOLDERS,
    ingest_row,
    make_kaggle_folder,
    ok_index,
    split_manifests,
    write_image,
)

IMAGE_SIZE = 32
TINY_MODEL = BaseModelParams(filters=[4, 8])


def ingest_folder(
    root: Path, source: str = "kaggle", **params: Any
) -> tuple[pd.DataFrame, IngestSummary]:
    """run_ingest on root/<source> into root/artifacts/ingest."""
    return run_ingest(
        BaseParams(seed=3, image_size=IMAGE_SIZE),
        IngestParams(source=source, **params),
        root / "artifacts" / "ingest",
        root,
    )


# --------------------------------------------------------------------------- ingest


def test_ingest_reads_long_and_short_kaggle_names(tmp_path: Path) -> None:
    source = make_kaggle_folder(tmp_path / "kaggle", {"train": 3, "valid": 2, "test": 2})
    frame, summary = ingest_folder(tmp_path)

    assert list(frame.columns) == list(INGEST_COLUMNS)
    assert summary.files == len(frame) == 4 * (3 + 2 + 2)
    assert summary.skipped == []
    assert summary.counts == {
        "train": dict.fromkeys(CLASSES, 3),
        "valid": dict.fromkeys(CLASSES, 2),
        "test": dict.fromkeys(CLASSES, 2),
    }
    for row in frame.itertuples():
        copy = tmp_path / row.path
        original = Path(row.source_path)
        assert copy.is_relative_to(tmp_path / "artifacts" / "ingest" / "images" / row.split)
        assert original.is_relative_to(source.resolve() / row.split)
        assert copy.read_bytes() == original.read_bytes()
        assert sha256_file(copy) == row.sha256
        assert row.bytes == original.stat().st_size
        assert row.format == "png"
        names = SHORT_FOLDERS if row.split == "test" else LONG_FOLDERS
        assert original.parent.name == names[row.label]
    assert set(frame["mode"]) == {"L", "RGB", "RGBA"}
    first = frame.iloc[0]
    assert (first.width, first.height) == (
        cv2.imread(str(tmp_path / first.path), cv2.IMREAD_UNCHANGED).shape[1::-1]
    )


def test_ingest_skips_and_reports_an_undecodable_file(tmp_path: Path) -> None:
    source = make_kaggle_folder(tmp_path / "kaggle", {"train": 2, "valid": 1, "test": 1})
    broken = source / "train" / "normal" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    junk = source / "test" / "normal" / "notes.txt"
    junk.write_text("not an image", encoding="utf-8")
    (source / "train" / "normal" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")

    frame, summary = ingest_folder(tmp_path)

    assert summary.files == len(frame) == 4 * 4
    reasons = {Path(s["path"]).name: s["reason"] for s in summary.skipped}
    assert set(reasons) == {"broken.png", "notes.txt"}
    assert "PNG header is truncated" in reasons["broken.png"]  # named by the header reader
    assert "not a supported image" in reasons["notes.txt"]
    assert not frame["source_path"].str.contains("broken|notes|DS_Store").any()


def test_ingest_fails_on_an_empty_class_folder(tmp_path: Path) -> None:
    source = make_kaggle_folder(tmp_path / "kaggle", {"train": 2, "valid": 1, "test": 1})
    empty = source / "valid" / LONG_FOLDERS["normal"]
    shutil.rmtree(empty)
    empty.mkdir()
    with pytest.raises(StageFailed) as info:
        ingest_folder(tmp_path)
    assert str(empty.resolve()) in str(info.value)
    assert "class folder has no files" in str(info.value)


def test_ingest_fails_on_a_folder_that_names_no_class(tmp_path: Path) -> None:
    source = make_kaggle_folder(tmp_path / "kaggle", {"train": 2, "valid": 1, "test": 1})
    write_image(source / "train" / "benign" / "a.png")
    with pytest.raises(StageFailed) as info:
        ingest_folder(tmp_path)
    message = str(info.value)
    assert str((source / "train" / "benign").resolve()) in message
    assert "ingest.class_map" in message


def test_ingest_class_map_names_an_extra_folder(tmp_path: Path) -> None:
    source = make_kaggle_folder(tmp_path / "kaggle", {"train": 2, "valid": 1, "test": 1})
    write_image(source / "train" / "benign" / "a.png", seed=999)
    frame, summary = ingest_folder(tmp_path, class_map={"benign": "normal"})
    benign = frame[frame["source_path"].str.contains("/benign/")]
    assert list(benign["label"]) == ["normal"]
    assert summary.counts["train"]["normal"] == 3


def test_ingest_class_map_to_an_unknown_label_fails(tmp_path: Path) -> None:
    source = make_kaggle_folder(tmp_path / "kaggle", {"train": 2, "valid": 1, "test": 1})
    write_image(source / "train" / "benign" / "a.png", seed=999)
    with pytest.raises(StageFailed, match=r"ingest\.class_map maps 'benign' to 'tumour'"):
        ingest_folder(tmp_path, class_map={"benign": "tumour"})


def test_ingest_without_split_folders_leaves_split_empty(tmp_path: Path) -> None:
    make_kaggle_folder(tmp_path / "pool", {"valid": 2})
    shutil.move(tmp_path / "pool" / "valid", tmp_path / "flat")
    frame, summary = ingest_folder(tmp_path, source="flat")
    assert set(frame["split"]) == {""}
    assert summary.counts == {"all": dict.fromkeys(CLASSES, 2)}
    assert frame["path"].str.startswith("artifacts/ingest/images/all/").all()


def test_ingest_source_that_is_not_a_folder(tmp_path: Path) -> None:
    with pytest.raises(StageFailed, match=r"ingest\.source .*missing.* is not a folder"):
        ingest_folder(tmp_path, source="missing")


def test_ingest_fails_when_nothing_decodes(tmp_path: Path) -> None:
    for label in CLASSES:
        folder = tmp_path / "bad" / label
        folder.mkdir(parents=True)
        (folder / "x.png").write_bytes(b"garbage")
    with pytest.raises(StageFailed, match="none of 4 files could be decoded"):
        ingest_folder(tmp_path, source="bad")


def test_ingest_synthetic(tmp_path: Path) -> None:
    per_class = {"train": 3, "valid": 1, "test": 1}
    frame, summary = ingest_folder(tmp_path, source="synthetic", synthetic_per_class=per_class)

    assert summary.files == len(frame) == 4 * 5
    assert summary.skipped == []
    assert summary.counts == {s: dict.fromkeys(CLASSES, n) for s, n in per_class.items()}
    assert all((tmp_path / p).is_file() for p in frame["path"])
    # The generated source is staged and removed; the manifest names files relative to it.
    out = tmp_path / "artifacts" / "ingest"
    assert sorted(p.name for p in out.iterdir()) == ["images"]
    assert frame["source_path"].str.match(r"^(train|valid|test)/[^/]+/[0-9a-f]{16}\.png$").all()
    assert frame["sha256"].is_unique

    again, _ = run_ingest(
        BaseParams(seed=3),
        IngestParams(synthetic_per_class=per_class),
        tmp_path / "again",
        tmp_path,
    )
    assert sorted(again["sha256"]) == sorted(frame["sha256"])


# --------------------------------------------------------------------------- split


def test_split_keeps_the_source_splits(tmp_path: Path) -> None:
    make_kaggle_folder(tmp_path / "kaggle", {"train": 3, "valid": 2, "test": 2})
    frame, _ = ingest_folder(tmp_path)
    parts, summary = run_split(frame, SplitParams(), seed=0)
    assert summary.mode == "keep"
    for split in SPLITS:
        expected = frame[frame["split"] == split].reset_index(drop=True)
        pd.testing.assert_frame_equal(parts[split], expected)
    assert summary.counts["valid"] == dict.fromkeys(sorted(CLASSES), 2)


@pytest.fixture
def pooled_source(tmp_path: Path) -> pd.DataFrame:
    """An ingest manifest with only train and valid, and copies of one image on both sides."""
    source = make_kaggle_folder(tmp_path / "kaggle", {"train": 8, "valid": 2})
    original = next((source / "train" / "normal").iterdir())
    shutil.copy(original, source / "valid" / "normal" / "copy.png")
    shutil.copy(original, source / "train" / "normal" / "copy.png")
    frame, _ = ingest_folder(tmp_path)
    assert set(frame["split"]) == {"train", "valid"}
    return frame


def test_split_pools_when_a_split_is_missing(pooled_source: pd.DataFrame) -> None:
    params = SplitParams(mode="pool", valid_fraction=0.2, test_fraction=0.2)
    parts, summary = run_split(pooled_source, params, seed=0)

    assert summary.mode == "pool"
    assert sum(len(p) for p in parts.values()) == len(pooled_source)
    sides = {s: set(p["sha256"]) for s, p in parts.items()}
    assert not sides["train"] & sides["valid"]
    assert not sides["train"] & sides["test"]
    assert not sides["valid"] & sides["test"]
    for split, part in parts.items():
        assert set(part["label"]) == set(CLASSES), split
        assert (part["split"] == split).all()
    # Each class gives test and valid their share of its images, overshooting by less than
    # one group (the three copies of one normal image move together).
    for label in CLASSES:
        total = int((pooled_source["label"] == label).sum())
        for split in ("test", "valid"):
            want = round(total * 0.2)
            assert want <= summary.counts[split][label] < want + 3, (split, label)


def test_split_pool_is_deterministic_for_a_seed(pooled_source: pd.DataFrame) -> None:
    params = SplitParams(mode="pool")

    def assignment(seed: int) -> dict[str, str]:
        parts, _ = run_split(pooled_source, params, seed=seed)
        return {p: s for s, part in parts.items() for p in part["path"]}

    assert assignment(1) == assignment(1)
    assert assignment(1) != assignment(2)


def test_split_fails_when_a_split_would_be_empty(tmp_path: Path) -> None:
    make_kaggle_folder(tmp_path / "kaggle", {"train": 1})
    frame, _ = ingest_folder(tmp_path)
    message = r"split '(train|valid)' is empty.*too few images \(4, in 4 groups"
    with pytest.raises(StageFailed, match=message):
        run_split(frame, SplitParams(), seed=0)


# --------------------------------------------------------------------------- resize


def test_resize_writes_one_png_per_content(tmp_path: Path) -> None:
    source = make_kaggle_folder(tmp_path / "kaggle", {"train": 2, "valid": 1, "test": 1})
    # The same content in two splits is resized once.
    copy = next((source / "train" / "normal").iterdir())
    shutil.copy(copy, source / "test" / "normal" / "c.png")
    frame, _ = ingest_folder(tmp_path)
    parts, _ = run_split(frame, SplitParams(), seed=0)
    out = tmp_path / "artifacts" / "resize"

    index, _ = run_resize(parts, ResizeParams(), IMAGE_SIZE, out, tmp_path, workers=1)

    assert list(index.columns) == list(INDEX_COLUMNS)
    assert len(index) == frame["sha256"].nunique() == len(frame) - 1
    assert index["ok"].all()
    assert len(list((out / "images").iterdir())) == len(index)
    originals = dict(zip(frame["sha256"], frame["path"], strict=False))
    for row in index.itertuples():
        assert row.resized == f"artifacts/resize/images/{row.sha256}.png"
        img = cv2.imread(str(tmp_path / row.resized), cv2.IMREAD_UNCHANGED)
        assert img.shape == (IMAGE_SIZE, IMAGE_SIZE)
        assert img.dtype == np.uint8
        expected = prepare(
            (tmp_path / originals[row.sha256]).read_bytes(),
            IMAGE_SIZE,
            normalise=normalise_of(ResizeParams()),
        )
        np.testing.assert_array_equal(img, expected)
        assert row.mean == pytest.approx(float(expected.mean()))
        assert row.std == pytest.approx(float(expected.std()))


def test_resize_records_failures(tmp_path: Path) -> None:
    write_image(tmp_path / "in" / "good.png", width=40, height=30)
    (tmp_path / "in" / "bad.png").write_bytes(b"\xff\xd8\xff\xe0 this is no jpeg")
    manifests = {
        "train": pd.DataFrame(
            [
                ingest_row("train", "normal", "good", "in/good.png"),
                ingest_row("train", "normal", "bad", "in/bad.png"),
            ]
        ),
        "valid": pd.DataFrame([ingest_row("valid", "normal", "gone", "in/gone.png")]),
        "test": pd.DataFrame(columns=list(INGEST_COLUMNS)),
    }
    out = tmp_path / "artifacts" / "resize"

    index, _ = run_resize(
        manifests, ResizeParams(interpolation="cubic"), IMAGE_SIZE, out, tmp_path, workers=1
    )
    index = index.set_index("sha256")

    good, bad, gone = (
        index.loc[manifests[s]["sha256"].iloc[i]]
        for s, i in (("train", 0), ("train", 1), ("valid", 0))
    )
    assert bool(good["ok"]) and good["error"] == ""
    assert not bad["ok"] and bad["resized"] == ""
    assert "JPEG has no frame header" in bad["error"]  # named by the header reader
    assert not gone["ok"] and gone["resized"] == ""
    assert "gone.png" in gone["error"]
    assert [p.name for p in (out / "images").iterdir()] == [f"{good.name}.png"]


# --------------------------------------------------------------------------- validate


def checks(report: Report) -> dict[str, str]:
    return {f.check: f.severity for f in report.findings}


def test_validate_clean_data_passes_and_hands_on_resized_paths() -> None:
    manifests = split_manifests(per_class=2)
    index = ok_index(manifests)
    datasets, report = run_validate(manifests, index, ValidateParams(min_class_count=2))

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
    _, report = run_validate(manifests, ok_index(manifests), ValidateParams())

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
    _, report = run_validate(manifests, ok_index(manifests), ValidateParams())

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
    _, report = run_validate(manifests, ok_index(manifests), ValidateParams())

    assert checks(report)["label_conflict"] == "error"
    finding = next(f for f in report.findings if f.check == "label_conflict")
    assert "normal: other.png" in finding.files
    assert report.worst == "error"


def test_validate_low_class_count_is_an_error() -> None:
    manifests = split_manifests(per_class=2)
    valid = manifests["valid"]
    manifests["valid"] = valid[valid["label"] != "normal"].reset_index(drop=True)
    _, report = run_validate(manifests, ok_index(manifests), ValidateParams(min_class_count=2))

    assert checks(report) == {"class_count": "error"}
    (finding,) = report.findings
    assert finding.message == "valid: class(es) normal have fewer than 2 images"
    assert report.counts["valid"]["normal"] == 0

    _, relaxed = run_validate(manifests, ok_index(manifests), ValidateParams(min_class_count=0))
    assert relaxed.findings == []


def test_validate_leaves_out_undecodable_files() -> None:
    manifests = split_manifests(per_class=3)
    index = ok_index(manifests)
    bad_sha = manifests["test"].iloc[0]["sha256"]
    index.loc[index["sha256"] == bad_sha, ["ok", "resized", "error"]] = [False, "", "broken"]
    datasets, report = run_validate(manifests, index, ValidateParams())

    assert checks(report) == {"undecodable": "error"}
    assert report.findings[0].files == [f"{manifests['test'].iloc[0]['source_path']}: broken"]
    assert len(datasets["test"]) == 4 * 3 - 1
    assert bad_sha not in set(datasets["test"]["sha256"])


def test_validate_report_markdown_lists_counts_and_findings() -> None:
    manifests = split_manifests(per_class=2)
    train = manifests["train"]
    manifests["train"] = pd.concat([train, train.iloc[[0]]], ignore_index=True)
    _, report = run_validate(manifests, ok_index(manifests), ValidateParams())
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
    parts, _ = run_split(frame, SplitParams(), seed=0)
    index, _ = run_resize(
        parts, ResizeParams(), IMAGE_SIZE, tmp_path / "artifacts" / "resize", tmp_path, workers=1
    )
    datasets, report = run_validate(parts, index, ValidateParams())

    assert checks(report) == {"cross_split_duplicate": "error"}
    assert all((tmp_path / p).is_file() for d in datasets.values() for p in d["path"])
    assert len(datasets["test"]) == 4 * 2 + 1


# --------------------------------------------------------------------------- models


def tiny_split(root: Path, split: str, per_class: int, seed: int) -> pd.DataFrame:
    """A DATASET_COLUMNS frame of 32x32 grey PNGs whose brightness depends on the class."""
    rows = []
    for c, label in enumerate(CLASSES):
        for i in range(per_class):
            rel = f"data/{split}/{label}/{i}.png"
            img = np.random.default_rng(seed + 100 * c + i).integers(0, 60, (32, 32))
            img = (img + 60 * c).astype(np.uint8)
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            ok, buf = cv2.imencode(".png", img)
            assert ok
            path.write_bytes(buf.tobytes())
            rows.append(
                {
                    "path": rel,
                    "label": label,
                    "sha256": sha256_file(path),
                    "source_path": rel,
                    "original": rel,
                }
            )
    return pd.DataFrame(rows, columns=list(DATASET_COLUMNS))


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, pd.DataFrame]]:
    root = tmp_path_factory.mktemp("tiny_data")
    return root, {
        "train": tiny_split(root, "train", 2, 0),
        "valid": tiny_split(root, "valid", 1, 1000),
        "test": tiny_split(root, "test", 1, 2000),
    }


@pytest.fixture(scope="module")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from chestct.stages.base_model import run_base_model

    out = tmp_path_factory.mktemp("base-model")
    return run_base_model(TINY_MODEL, IMAGE_SIZE, 0, out)


@pytest.fixture(scope="module")
def trained(base_model: Path, tiny_data, tmp_path_factory: pytest.TempPathFactory):
    from chestct.stages.train import run_train

    root, data = tiny_data
    epochs: list[tuple[int, dict[str, float]]] = []
    params = TrainParams(
        epochs=2, batch_size=4, patience=5, augment=AugmentParams(rotation=0.0, zoom=0.0)
    )
    result = run_train(
        base_model,
        data["train"],
        data["valid"],
        params,
        seed=0,
        root=root,
        on_epoch=lambda logs, epoch: epochs.append((epoch, logs)),
    )
    path = tmp_path_factory.mktemp("train") / "model.keras"
    result.model.save(path)
    return result, epochs, path


def test_base_model_writes_a_loadable_model(base_model: Path) -> None:
    from chestct.modeling import load_model

    assert base_model.name == "model.keras"
    assert [p.name for p in base_model.parent.iterdir()] == ["model.keras"]
    model = load_model(base_model)
    assert tuple(model.input_shape) == (None, IMAGE_SIZE, IMAGE_SIZE, 1)
    assert tuple(model.output_shape) == (None, len(CLASSES))
    assert [model.get_layer(f"conv{i}").filters for i in range(2)] == [4, 8]
    proba = model.predict(np.zeros((2, IMAGE_SIZE, IMAGE_SIZE, 1), np.float32), verbose=0)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)


def test_base_model_weights_depend_on_the_seed_only(tmp_path: Path, base_model: Path) -> None:
    from chestct.modeling import load_model
    from chestct.stages.base_model import run_base_model

    same = load_model(run_base_model(TINY_MODEL, IMAGE_SIZE, 0, tmp_path / "same"))
    other = load_model(run_base_model(TINY_MODEL, IMAGE_SIZE, 1, tmp_path / "other"))
    reference = load_model(base_model).get_layer("conv0").get_weights()[0]
    np.testing.assert_array_equal(same.get_layer("conv0").get_weights()[0], reference)
    assert not np.array_equal(other.get_layer("conv0").get_weights()[0], reference)


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
    from chestct.modeling import make_dataset

    result = trained[0]
    root, data = tiny_data
    valid = data["valid"]
    ds = make_dataset([root / p for p in valid["path"]], list(valid["label"]), 4, one_hot=True)
    loss = result.model.evaluate(ds, verbose=0, return_dict=True)["loss"]
    assert loss == pytest.approx(result.history["val_loss"].min(), rel=1e-4)


def test_train_changes_the_weights(trained, base_model: Path) -> None:
    from chestct.modeling import load_model

    before = load_model(base_model).get_layer("logits").get_weights()[0]
    after = trained[0].model.get_layer("logits").get_weights()[0]
    assert not np.allclose(before, after)


def test_class_weights() -> None:
    from chestct.stages.train import class_weights

    labels = pd.Series(["normal"] * 6 + ["adenocarcinoma"] * 2)
    assert class_weights(labels, "none") is None
    weights = class_weights(labels, "balanced")
    assert weights == pytest.approx(
        {CLASSES.index("adenocarcinoma"): 2.0, CLASSES.index("normal"): 8 / 12}
    )


def test_evaluate_scores_every_test_image(trained, tiny_data) -> None:
    from chestct.scoring import score

    root, data = tiny_data
    test = data["test"]
    metrics, predictions = score(trained[2], test, EvaluateParams(batch_size=3).batch_size, root)

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


# --------------------------------------------------------------------------- promote


@pytest.mark.parametrize(("score", "promoted"), [(0.49, False), (0.5, True), (0.9, True)])
def test_decide_first_model_needs_the_minimum(score: float, promoted: bool) -> None:
    decision = decide(PromoteParams(metric="macro_f1", minimum=0.5), {"macro_f1": score}, None)
    assert decision.promote is promoted
    assert decision.champion is None
    assert decision.candidate == score
    if promoted:
        assert decision.rule == "first model"
        assert decision.reason.startswith("promoted (first model): no champion")
    else:
        assert decision.rule == "below promote.minimum"
        assert decision.reason == (
            "rejected (below promote.minimum): candidate macro_f1 0.4900 < promote.minimum 0.5"
            " (no champion)"
        )


@pytest.mark.parametrize(
    ("candidate", "champion", "margin", "promoted", "rule"),
    [
        (0.60, 0.70, 0.0, False, "not better than champion + margin"),
        (0.80, 0.70, 0.0, True, "better than champion + margin"),
        (0.70, 0.70, 0.0, False, "tie with the champion"),
        (0.70, 0.70, -0.05, False, "tie with the champion"),  # a tie whatever the margin
        (0.74, 0.70, 0.05, False, "not better than champion + margin"),
        (0.76, 0.70, 0.05, True, "better than champion + margin"),
        (0.40, 0.20, 0.0, False, "below promote.minimum"),  # better, yet below the minimum
    ],
)
def test_decide_against_a_champion(
    candidate: float, champion: float, margin: float, promoted: bool, rule: str
) -> None:
    params = PromoteParams(metric="macro_f1", minimum=0.5, margin=margin)
    decision = decide(params, {"macro_f1": candidate}, {"macro_f1": champion}, True)
    assert decision.promote is promoted
    assert (decision.candidate, decision.champion) == (candidate, champion)
    assert decision.champion_rescored is True
    assert decision.rule == rule
    verdict = "promoted" if promoted else "kept the champion" if "tie" in rule else "rejected"
    assert decision.reason.startswith(f"{verdict} ({rule}): candidate macro_f1 {candidate:.4f}")


def test_decide_reason_names_the_minimum_not_the_champion() -> None:
    # The example: 0.375 beats a 0.1667 champion but is below promote.minimum.
    params = PromoteParams(metric="macro_f1", minimum=0.5)
    decision = decide(params, {"macro_f1": 0.375}, {"macro_f1": 0.1667})
    assert not decision.promote
    assert decision.reason == (
        "rejected (below promote.minimum): candidate macro_f1 0.3750 < promote.minimum 0.5"
        " (champion 0.1667)"
    )


def test_decide_uses_the_configured_metric() -> None:
    params = PromoteParams(metric="accuracy", minimum=0.0)
    candidate = {"accuracy": 0.9, "macro_f1": 0.1}
    decision = decide(params, candidate, {"accuracy": 0.8, "macro_f1": 0.9})
    assert decision.promote
    assert decision.metric == "accuracy"


def test_rescore_champion_after_image_size_changed(tmp_path: Path, base_model: Path) -> None:
    from chestct.stages.promote import rescore_champion

    model_dir = tmp_path / "model"
    install_model(base_model, {"image_size": IMAGE_SIZE, "model_file": "model.keras"}, model_dir)
    test = tiny_split(tmp_path, "test", 1, 0)  # 32x32 images ...
    for path in test["path"]:  # ... now made at a new base.image_size of 16
        grey = cv2.imread(str(tmp_path / path), cv2.IMREAD_GRAYSCALE)
        cv2.imwrite(str(tmp_path / path), cv2.resize(grey, (16, 16)))
    metrics = rescore_champion(model_dir, read_card(model_dir), test, tmp_path, batch_size=4)
    assert 0.0 <= metrics["macro_f1"] <= 1.0


def staging_leftovers(model_dir: Path) -> list[str]:
    return [p.name for p in model_dir.parent.iterdir() if p.name.startswith(f".{model_dir.name}")]


def test_install_model_first_and_replacing(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    first = tmp_path / "first.keras"
    first.write_bytes(b"model one")
    install_model(first, {"version": "1", "model_file": "model.keras"}, model_dir)
    assert (model_dir / "model.keras").read_bytes() == b"model one"
    assert read_card(model_dir) == {"version": "1", "model_file": "model.keras"}
    assert staging_leftovers(model_dir) == []

    (model_dir / "stale.txt").write_text("from the old champion", encoding="utf-8")
    second = tmp_path / "second.keras"
    second.write_bytes(b"model two")
    install_model(second, {"version": "2", "model_file": "model.keras"}, model_dir)
    assert sorted(p.name for p in model_dir.iterdir()) == ["model.json", "model.keras"]
    assert (model_dir / "model.keras").read_bytes() == b"model two"
    assert read_card(model_dir)["version"] == "2"
    assert staging_leftovers(model_dir) == []


def test_install_model_over_an_empty_model_folder(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()  # what a rejected first promote leaves
    assert read_card(model_dir) is None
    candidate = tmp_path / "c.keras"
    candidate.write_bytes(b"m")
    install_model(candidate, {"version": "1"}, model_dir)
    assert read_card(model_dir) == {"version": "1"}
    assert staging_leftovers(model_dir) == []


def test_install_model_failure_leaves_the_champion(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    first = tmp_path / "first.keras"
    first.write_bytes(b"model one")
    install_model(first, {"version": "1"}, model_dir)
    with pytest.raises(FileNotFoundError):
        install_model(tmp_path / "missing.keras", {"version": "2"}, model_dir)
    assert (model_dir / "model.keras").read_bytes() == b"model one"
    assert read_card(model_dir) == {"version": "1"}
    assert staging_leftovers(model_dir) == []


def test_read_card_treats_broken_cards_as_no_champion(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model.json").write_text("{not json", encoding="utf-8")
    (model_dir / "model.keras").write_bytes(b"m")
    assert read_card(model_dir) is None
    (model_dir / "model.json").write_text('{"model_file": "other.keras"}', encoding="utf-8")
    assert read_card(model_dir) is None  # names a file that is not there


@pytest.mark.parametrize("content", ["null", "[]", '"model"'])
def test_read_card_treats_a_non_object_card_as_no_champion(tmp_path: Path, content: str) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model.json").write_text(content, encoding="utf-8")
    (model_dir / "model.keras").write_bytes(b"m")
    assert read_card(model_dir) is None
