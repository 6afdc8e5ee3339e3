"""resize: the three modes, parallel = serial, and incremental reuse that never serves stale
or half-written images."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from chestct.fsutil import sha256_file
from chestct.imaging import prepare, resize
from chestct.manifest import INGEST_COLUMNS
from chestct.settings import ResizeParams
from chestct.stages.resize import run_resize
from helpers import encode, ingest_row, write_image


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
    assert (prepare(data, 8) == 90).all()
    assert (prepare(data, 8, "area", mode="pad")[0] == 0).all()
    with pytest.raises(ValueError, match="not one of stretch, pad, crop"):
        prepare(data, 8, mode="fit")


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
        {"train": frame}, ResizeParams(mode="pad"), 16, tmp_path / "a", tmp_path, workers=1
    )
    parallel, _ = run_resize(
        {"train": frame}, ResizeParams(mode="pad"), 16, tmp_path / "b", tmp_path, workers=2
    )
    pd.testing.assert_frame_equal(serial.drop(columns="resized"), parallel.drop(columns="resized"))
    for sha in frame["sha256"]:
        a = (tmp_path / "a" / "images" / f"{sha}.png").read_bytes()
        assert a == (tmp_path / "b" / "images" / f"{sha}.png").read_bytes()


def test_resize_is_incremental(tmp_path: Path) -> None:
    frame = _manifest(tmp_path, 6)
    out = tmp_path / "out"
    params = ResizeParams()

    def run(manifest: pd.DataFrame, p: ResizeParams = params, size: int = 16):
        return run_resize({"train": manifest}, p, size, out, tmp_path, workers=1)

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
    _, summary = run(frame, ResizeParams(mode="crop"))
    assert (summary.resized, summary.reused) == (6, 0)
    _, summary = run(frame, ResizeParams(mode="crop"), size=24)
    assert (summary.resized, summary.reused) == (6, 0)
    img = cv2.imread(str(out / "images" / f"{frame['sha256'][0]}.png"), cv2.IMREAD_GRAYSCALE)
    assert img.shape == (24, 24)


def test_workers_param_and_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    frame = _manifest(tmp_path, 3)
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    index, _ = run_resize({"train": frame}, ResizeParams(workers=0), 16, tmp_path / "o", tmp_path)
    assert index["ok"].all()
