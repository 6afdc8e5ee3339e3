"""resize: the three modes, parallel = serial, and incremental reuse that never serves stale
or half-written images."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from chestct.data.manifest import INDEX_COLUMNS, INGEST_COLUMNS
from chestct.fsutil import sha256_file
from chestct.imaging.preparation import Preprocessing, prepare, resize
from chestct.settings import (
    ResizeParams,
    SplitParams,
)
from chestct.stages.resize import run_resize
from chestct.stages.split import run_split
from helpers import (
    IMAGE_SIZE,
    encode,
    ingest_folder,
    ingest_row,
    make_kaggle_folder,
    write_image,
)
from shipped import shipped


def test_stretch_pad_and_crop() -> None:
    grey = np.full((10, 40), 200, dtype=np.uint8)  # wide: 4:1
    grey[:, :10] = 50  # a dark left quarter
    stretched = resize(grey, 8, "area", "stretch")
    assert (stretched[:, :2] == 50).all() and (stretched[:, 2:] == 200).all()
    padded = resize(grey, 8, "area", "pad")
    # 40x10 -> 8x2, centred on black: rows 0-2 and 5-7 are padding.
    assert (padded[:3] == 0).all() and (padded[5:] == 0).all()
    assert (padded[3:5, :2] == 50).all() and (padded[3:5, 2:] == 200).all()
    cropped = resize(grey, 8, "area", "crop")
    assert (cropped == 200).all()  # the centred 10x10 misses the dark quarter
    tall = resize(grey.T.copy(), 8, "area", "pad")
    assert (tall[:, :3] == 0).all() and (tall[:, 5:] == 0).all()
    square = np.arange(64, dtype=np.uint8).reshape(8, 8)
    for mode in ("stretch", "pad", "crop"):
        np.testing.assert_array_equal(resize(square, 8, "area", mode), square)


def test_prepare_takes_the_mode_as_a_keyword() -> None:
    data = encode(np.full((10, 40), 90, dtype=np.uint8))
    assert (prepare(data, Preprocessing(8)) == 90).all()
    assert (prepare(data, Preprocessing(8, "area", resize="pad"))[0] == 0).all()
    with pytest.raises(ValueError, match="not one of stretch, pad, crop"):
        Preprocessing(8, resize="fit")


def _manifest(root: Path, count: int) -> pd.DataFrame:
    rows = []
    for i in range(count):
        path = write_image(root / "in" / f"{i}.png", width=30 + i, height=20, seed=i)
        rows.append(
            ingest_row("train", "normal", str(i), path.relative_to(root).as_posix())
            | {"sha256": sha256_file(path)}
        )
    return pd.DataFrame(rows, columns=list(INGEST_COLUMNS))


def test_parallel_resize_equals_serial(tmp_path: Path) -> None:
    frame = _manifest(tmp_path, 40)
    serial, _ = run_resize(
        {"train": frame},
        Preprocessing.from_params(shipped(ResizeParams, mode="pad"), 16),
        tmp_path / "a",
        tmp_path,
        workers=1,
    )
    parallel, _ = run_resize(
        {"train": frame},
        Preprocessing.from_params(shipped(ResizeParams, mode="pad"), 16),
        tmp_path / "b",
        tmp_path,
        workers=2,
    )
    pd.testing.assert_frame_equal(serial.drop(columns="resized"), parallel.drop(columns="resized"))
    for sha in frame["sha256"]:
        a = (tmp_path / "a" / "images" / f"{sha}.png").read_bytes()
        assert a == (tmp_path / "b" / "images" / f"{sha}.png").read_bytes()


def test_resize_is_incremental(tmp_path: Path) -> None:
    frame = _manifest(tmp_path, 6)
    out = tmp_path / "out"
    params = shipped(ResizeParams)

    def run(manifest: pd.DataFrame, p: ResizeParams = params, size: int = 16):
        return run_resize(
            {"train": manifest}, Preprocessing.from_params(p, size), out, tmp_path, workers=1
        )

    first, summary = run(frame)
    assert (summary.resized, summary.reused) == (6, 0)
    assert json.loads((out / "images.json").read_text())["mode"] == "stretch"
    images = {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()}

    again, summary = run(frame)
    assert (summary.resized, summary.reused) == (0, 6)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()} == images
    pd.testing.assert_frame_equal(first, again)

    # A half-written file (what a crash leaves) is redone; an image no split lists is removed.
    half = out / "images" / f"{frame['sha256'][0]}.png"
    half.write_bytes(half.read_bytes()[:40])
    (out / "images" / ".stale.123.tmp.png").write_bytes(b"x")
    _, summary = run(frame.iloc[:5])
    assert (summary.resized, summary.reused, summary.pruned) == (1, 4, 2)
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(
        f"{s}.png" for s in frame["sha256"][:5]
    )
    assert cv2.imread(str(half), cv2.IMREAD_GRAYSCALE).shape == (16, 16)

    # Another mode or size rebuilds everything.
    _, summary = run(frame, shipped(ResizeParams, mode="crop"))
    assert (summary.resized, summary.reused) == (6, 0)
    _, summary = run(frame, shipped(ResizeParams, mode="crop"), size=24)
    assert (summary.resized, summary.reused) == (6, 0)
    img = cv2.imread(str(out / "images" / f"{frame['sha256'][0]}.png"), cv2.IMREAD_GRAYSCALE)
    assert img.shape == (24, 24)


def test_workers_param_and_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    frame = _manifest(tmp_path, 3)
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    index, _ = run_resize(
        {"train": frame},
        Preprocessing.from_params(shipped(ResizeParams, workers=0), 16),
        tmp_path / "o",
        tmp_path,
    )
    assert index["ok"].all()


def test_resize_writes_one_png_per_content(tmp_path: Path) -> None:
    source = make_kaggle_folder(tmp_path / "kaggle", {"train": 2, "valid": 1, "test": 1})
    # The same content in two splits is resized once.
    copy = next((source / "train" / "normal").iterdir())
    shutil.copy(copy, source / "test" / "normal" / "c.png")
    frame, _ = ingest_folder(tmp_path)
    parts, _ = run_split(frame, shipped(SplitParams), seed=0)
    out = tmp_path / "artifacts" / "resize"

    index, _ = run_resize(
        parts,
        Preprocessing.from_params(shipped(ResizeParams), IMAGE_SIZE),
        out,
        tmp_path,
        workers=1,
    )

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
            Preprocessing.from_params(shipped(ResizeParams), IMAGE_SIZE),
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
        manifests,
        Preprocessing.from_params(shipped(ResizeParams, interpolation="cubic"), IMAGE_SIZE),
        out,
        tmp_path,
        workers=1,
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
