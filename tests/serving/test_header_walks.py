"""Issue 21 item 4: header walks at native speed, and each upload's header parsed once.

Speed itself is measured in bench/hostile.py; here the walk's Python-level work is counted
(line events of chestct.imaging under sys.settrace), which a per-byte loop makes grow with the
file and a regex search does not.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np
import pytest

from chestct.imaging import dicom, formats, headers


def lines_run(fn: Callable[[], Any]) -> int:
    """Line events in chestct/imaging/ while `fn` runs."""
    count = 0

    def tracer(frame, event, arg):
        nonlocal count
        if f"{os.sep}chestct{os.sep}imaging{os.sep}" in frame.f_code.co_filename:
            if event == "line":
                count += 1
            return tracer
        return None

    sys.settrace(tracer)
    try:
        fn()
    finally:
        sys.settrace(None)
    return count


def real_jpeg(side: int = 64) -> bytes:
    grey = np.full((side, side), 90, np.uint8)
    grey[:, : side // 2] = 160
    return cv2.imencode(".jpg", grey)[1].tobytes()


@pytest.mark.parametrize("where", ["scan", "junk", "fill"])
def test_jpeg_walk_does_no_per_byte_python_work(where: str) -> None:
    data = real_jpeg()
    sos = data.index(b"\xff\xda")
    eoi = data.rindex(b"\xff\xd9")
    stuffing = b"\xff\x00" * 500_000  # 1 MB: the 9 MB file, smaller
    if where == "scan":  # stuffed pairs inside the entropy-coded data
        forged = data[:eoi] + stuffing + data[eoi:]
    elif where == "junk":  # stuffed pairs between segments
        forged = data[:sos] + stuffing + data[sos:]
    else:  # a run of fill bytes before a marker
        forged = data[:sos] + b"\xff" * 1_000_000 + data[sos:]
    small = lines_run(lambda: headers.jpeg_info(data))
    big = lines_run(lambda: headers.jpeg_info(forged))
    assert small > 0  # the tracer sees the walk (it names the files of chestct/imaging/)
    assert big < small + 50, (small, big)
    info = headers.jpeg_info(forged)
    assert (info.width, info.height, info.scans) == (64, 64, 1)


def test_marker_after_a_segment_ending_in_ff_is_not_misread() -> None:
    data = real_jpeg()
    # An APP segment whose last payload byte is FF, then the next real marker: the FF inside
    # the segment must not pair with the byte after it.
    app = b"\xff\xe1" + (2 + 3).to_bytes(2, "big") + b"ab\xff"
    forged = data[:2] + app + data[2:]
    assert headers.jpeg_info(forged).width == 64


def test_each_upload_is_parsed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from chestct.serving import inputs

    calls = {"jpeg": 0, "dicom": 0}
    walk, read = headers.jpeg_info, dicom.read_dicom

    def counted_walk(data):
        calls["jpeg"] += 1
        return walk(data)

    def counted_read(data, limits):
        calls["dicom"] += 1
        return read(data, limits)

    monkeypatch.setattr(headers, "jpeg_info", counted_walk)
    monkeypatch.setattr(dicom, "read_dicom", counted_read)
    from model_folder import dicom_bytes

    for fmt, data in (("jpeg", real_jpeg()), ("dicom", dicom_bytes(1))):
        header = inputs.check_header(data, fmt, formats.DEFAULT_LIMITS)
        inputs.decode(data, (-600.0, 1500.0), formats.DEFAULT_LIMITS, header)
    assert calls == {"jpeg": 1, "dicom": 1}
