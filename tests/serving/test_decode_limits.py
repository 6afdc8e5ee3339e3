"""Decoders bounded (issue 12): the issue's six uploads, the limits, and the review list.

The six files come from bench/hostile.py, which sends them to a real gunicorn and measures
memory and CPU; here each is checked for its answer through the library, the app (alone and
inside a batch) and ingest.
"""

from __future__ import annotations

import importlib.util
import io
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from chestct.imaging import decoding, formats, headers
from chestct.imaging.formats import DecodeLimits, ImageError, ImageTooLarge
from chestct.serving import create_app
from helpers import make_kaggle_folder
from model_folder import multipart, slice_png
from shipped import shipped

REPO = Path(__file__).resolve().parents[2]
LUNG = (-600.0, 1500.0)


def _load(name: str):
    spec = importlib.util.spec_from_file_location(
        f"chestct_bench_{name}", REPO / "bench" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


hostile = _load("hostile")

# name -> (builder, status through the app, words the refusal must contain)
ISSUE_CASES: dict[str, tuple[Callable[[], bytes], int, str]] = {
    "dicom_deflate_bomb": (
        lambda: hostile.dicom_deflate_bomb(96 * hostile.MB),
        413,
        "inflates to more than",
    ),
    "tiff_duplicate_size": (hostile.tiff_duplicate_size, 400, "appears twice"),
    "png16_rgba_7000": (lambda: hostile.png16_rgba(7000), 413, "7000 x 7000"),
    "jpeg_junk_8000": (lambda: hostile.jpeg_with_junk(8000), 413, "8000 x 8000"),
    "dicom_deflate_corrupt": (hostile.dicom_deflate_corrupt, 400, "deflated dataset is corrupt"),
    "dicom_slope_2_values": (hostile.dicom_multivalued_slope, 400, "RescaleSlope holds 2 values"),
}


@pytest.fixture(scope="module")
def issue_files() -> dict[str, bytes]:
    return {name: build() for name, (build, _, _) in ISSUE_CASES.items()}


@pytest.fixture(scope="module")
def client(model_dir: Path):
    app = create_app({"MODEL_DIR": str(model_dir), "MC_DROPOUT_SAMPLES": 2})
    return app.test_client()


@pytest.mark.parametrize("name", sorted(ISSUE_CASES))
def test_issue_file_is_refused_by_the_decoder_with_its_reason(
    issue_files: dict[str, bytes], name: str
) -> None:
    _, status, words = ISSUE_CASES[name]
    with pytest.raises(ImageError) as info:
        decoding.decode(issue_files[name], LUNG)
    assert words in str(info.value)
    assert isinstance(info.value, ImageTooLarge) == (status == 413)


@pytest.mark.parametrize("name", sorted(ISSUE_CASES))
def test_issue_file_gets_a_4xx_problem(client, issue_files: dict[str, bytes], name: str) -> None:
    _, status, words = ISSUE_CASES[name]
    resp = client.post("/predict", **multipart(issue_files[name], f"{name}.bin"))
    assert resp.status_code == status, resp.get_data(as_text=True)
    assert resp.mimetype == "application/problem+json"
    assert words in resp.get_json()["detail"]


def test_batch_reports_each_issue_file_in_its_own_entry(
    client, issue_files: dict[str, bytes]
) -> None:
    names = sorted(ISSUE_CASES)
    files = [(io.BytesIO(issue_files[n]), n) for n in names]
    files.insert(2, (io.BytesIO(slice_png(4)), "good.png"))
    resp = client.post("/predict/batch", data={"files": files}, content_type="multipart/form-data")
    assert resp.status_code == 200, resp.get_data(as_text=True)
    results = resp.get_json()["results"]
    assert [r["ok"] for r in results] == [False, False, True] + [False] * (len(names) - 2)
    bad = [r for r in results if not r["ok"]]
    assert [r["error"]["status"] for r in bad] == [ISSUE_CASES[n][1] for n in names]
    assert results[2]["label"]


def test_ingest_skips_and_reports_each_issue_file(
    tmp_path: Path, issue_files: dict[str, bytes]
) -> None:
    from chestct.settings import BaseParams, IngestParams
    from chestct.stages.ingest import run_ingest

    source = make_kaggle_folder(tmp_path / "kaggle", {"train": 2, "valid": 1})
    folder = source / "train" / "normal"
    for name, data in issue_files.items():
        (folder / f"{name}.bin").write_bytes(data)
    frame, summary = run_ingest(
        shipped(BaseParams, seed=1, image_size=32),
        shipped(IngestParams, source="kaggle"),
        tmp_path / "artifacts" / "ingest",
        tmp_path,
        workers=1,
    )
    reasons = {Path(s["path"]).stem: s["reason"] for s in summary.skipped}
    assert set(reasons) == set(ISSUE_CASES)
    for name, (_, _, words) in ISSUE_CASES.items():
        assert words in reasons[name]
    assert len(frame) == 12


# --------------------------------------------------------------------------- headers


def test_tiff_header_refuses_unknown_types_and_contradictions() -> None:
    tiff = bytearray(hostile.tiff_duplicate_size())
    # Drop the duplicate entries: a consistent 8000 x 8000 TIFF, refused by its size.
    with pytest.raises(ImageTooLarge, match="8000 x 8000"):
        decoding.decode(_tiff_without(bytes(tiff), [0, 2]), LUNG)
    unknown = bytearray(_tiff_without(bytes(tiff), [0, 2]))
    unknown[10 + 12 * 2 + 2 : 10 + 12 * 2 + 4] = (99).to_bytes(2, "little")  # BitsPerSample
    with pytest.raises(ImageError, match="unknown field type 99"):
        decoding.decode(bytes(unknown), LUNG)


def _tiff_without(tiff: bytes, drop: list[int]) -> bytes:
    """The TIFF with the given IFD entries removed (offsets after the IFD shifted back)."""
    import struct

    count = struct.unpack("<H", tiff[8:10])[0]
    entries = [tiff[10 + 12 * i : 22 + 12 * i] for i in range(count)]
    kept = [e for i, e in enumerate(entries) if i not in drop]
    shift = 12 * len(drop)
    fixed = []
    for e in kept:
        tag = struct.unpack("<H", e[:2])[0]
        if tag == 273:  # StripOffsets
            value = struct.unpack("<I", e[8:12])[0] - shift
            e = e[:8] + struct.pack("<I", value)
        fixed.append(e)
    tail = tiff[10 + 12 * count :]
    return tiff[:8] + struct.pack("<H", len(kept)) + b"".join(fixed) + tail


def test_jpeg_frame_is_found_past_junk_and_scans_are_counted() -> None:
    data = hostile.jpeg_with_junk(64)
    info = headers.jpeg_info(data)
    assert (info.width, info.height, info.junk_bytes) == (64, 64, 1)
    assert decoding.decode(data, LUNG).width == 64  # libjpeg skips the junk byte too
    sos = data.index(b"\xff\xda")
    length = int.from_bytes(data[sos + 2 : sos + 4], "big")
    scan = data[sos : sos + 2 + length] + b"\0" * 4
    many = data[:sos] + scan * (formats.MAX_JPEG_SCANS + 1) + data[sos:]
    with pytest.raises(ImageTooLarge, match="scans"):
        decoding.decode(many, LUNG)
    sof = data.index(b"\xff\xc0")
    segment = data[sof : sof + 2 + int.from_bytes(data[sof + 2 : sof + 4], "big")]
    two = data[:sof] + segment + data[sof:]
    with pytest.raises(ImageError, match="two frame headers"):
        decoding.decode(two, LUNG)


def test_byte_budget_counts_channels_and_sample_size() -> None:
    png = hostile.png16_rgba(300)  # 300 x 300 x 4 channels x 2 bytes = 720 000 bytes
    assert headers.read_header(png).nbytes == 720_000
    with pytest.raises(ImageTooLarge, match="4 channel"):
        decoding.decode(png, LUNG, limits=DecodeLimits(max_pixels=10**6, max_bytes=700_000))
    decoded = decoding.decode(png, LUNG, limits=DecodeLimits(max_pixels=10**6, max_bytes=720_000))
    assert (decoded.width, decoded.mode) == (300, "RGBA")


def test_dicom_with_too_many_elements_is_refused_before_parsing() -> None:
    import struct

    head = hostile._dataset_bytes(hostile._ct_dataset(32, 32))
    # 30 000 empty private elements before the pixel data's group: each would cost pydicom
    # an object.
    empty = b"".join(
        struct.pack("<HH2sH", 0x0009, 0x1000 + i % 0xF000, b"UN", 0) + b"\0\0\0\0"
        for i in range(30_000)
    )
    data = hostile._meta("1.2.840.10008.1.2.1") + empty + head
    with pytest.raises(ImageTooLarge, match="data elements"):
        decoding.decode(data, LUNG)


def test_deflated_dicom_within_the_budget_decodes() -> None:
    decoded = decoding.decode(hostile.dicom_deflated_at_budget(256), LUNG)
    assert (decoded.width, decoded.height, decoded.format) == (256, 256, "dicom")


def test_gunicorn_config_sets_opencvs_own_pixel_limit() -> None:
    env = {k: v for k, v in os.environ.items() if k != "OPENCV_IO_MAX_IMAGE_PIXELS"}
    code = (
        "import os, runpy; runpy.run_path('config/gunicorn.conf.py'); "
        "print(os.environ['OPENCV_IO_MAX_IMAGE_PIXELS'])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True
    )
    from chestct.settings import load_settings

    assert int(out.stdout.split()[-1]) == load_settings(REPO).config.serving.max_image_pixels


# --------------------------------------------------------------------------- review list


def test_upload_page_sends_a_content_security_policy(client) -> None:
    resp = client.get("/")
    policy = resp.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in policy and "default-src 'none'" in policy
    assert "'unsafe-inline'" not in policy and "script-src 'sha256-" in policy
    assert resp.headers["Referrer-Policy"] == "no-referrer"
    assert resp.headers["X-Frame-Options"] == "DENY"


def test_history_refuses_non_ascii_tokens_and_odd_limits(tmp_path: Path, model_dir) -> None:
    app = create_app(
        {
            "MODEL_DIR": str(model_dir),
            "AUDIT_LOG": True,
            "AUDIT_DB": str(tmp_path / "audit.sqlite"),
            "HISTORY_TOKEN": "sécret-token",
            "MC_DROPOUT_SAMPLES": 0,
        }
    )
    client = app.test_client()
    assert client.post("/predict", **multipart(slice_png(1))).status_code == 200
    for header in ("Bearer \xe9\xff", "Bearer sécret-token", "Bearer ☃", "Basic x", ""):
        resp = client.get("/history", headers={"Authorization": header})
        assert resp.status_code == 401, (header, resp.get_data(as_text=True))
    good = {"Authorization": "Bearer " + "sécret-token".encode().decode("latin-1")}
    assert client.get("/history", headers=good).get_json()["count"] == 1
    for limit in ("²", "0", "-1", "1e3", "99999999999999999999", "１", "%00", "1001"):
        resp = client.get(f"/history?limit={limit}", headers=good)
        assert resp.status_code == 400, (limit, resp.get_data(as_text=True))
        assert resp.mimetype == "application/problem+json"
