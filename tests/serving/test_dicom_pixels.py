"""Issue 21 item 2, DICOM: nested sequences, RLE runs past Rows x Columns, compressed frames
that declare another size than the dataset, and PALETTE COLOR.

Each hostile file must be a quick 4xx problem+json with a one-line log (no traceback) from
/predict and a 4xx entry (never a 500) from /predict/batch; the decoders' memory is checked by
this process's peak RSS over the decode (/proc/self/clear_refs resets it).
"""

from __future__ import annotations

import io
import logging
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest

from chestct.imaging import decoding, formats
from chestct.serving import create_app
from model_folder import ct_slice

WINDOW = (-600.0, 1500.0)
GROWTH_LIMIT_MB = 24.0


def _ct(rows: int, columns: int, bits: int = 16, syntax: str = "1.2.840.10008.1.2.1"):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = FileDataset("x.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CTImageStorage, generate_uid(), "CT"
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    ds.PixelRepresentation = 1 if bits == 16 else 0
    ds.RescaleIntercept, ds.RescaleSlope = (-1024, 1) if bits == 16 else (0, 1)
    return ds


def _save(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def ct_values(side: int = 64) -> np.ndarray:
    """A CT slice as signed stored values (HU + 1024)."""
    grey = ct_slice(3, size=side).astype(np.float32)
    return np.rint(-1350.0 + grey / 255.0 * 1500.0 + 1024.0).astype(np.int16)


def plain_dicom(side: int = 64) -> bytes:
    ds = _ct(side, side)
    ds.PixelData = ct_values(side).tobytes()
    return _save(ds)


def encapsulated(rows: int, columns: int, frame: bytes, syntax: str, bits: int = 16) -> bytes:
    from pydicom.encaps import encapsulate

    ds = _ct(rows, columns, bits, syntax)
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return _save(ds)


def nested_dicom(depth: int) -> bytes:
    """A valid 64 x 64 slice with a ContentSequence nested `depth` levels deep before its
    pixel data (undefined lengths, closed by delimiters), as the issue's 20 KB file."""
    data = plain_dicom()
    pixel = data.rindex(struct.pack("<HH2s", 0x7FE0, 0x0010, b"OW"))
    opening = struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF)
    opening += struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    closing = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return data[:pixel] + opening * depth + closing * depth + data[pixel:]


def rle_bomb(side: int = 64, expanded: int = 200 << 20) -> bytes:
    """An 8-bit 64 x 64 RLE slice whose one segment repeats runs to `expanded` bytes."""
    runs = b"\x81\x40" * (expanded // 128)  # each: 128 copies of 0x40
    frame = struct.pack("<16I", 1, 64, *([0] * 14)) + runs
    return encapsulated(side, side, frame, "1.2.840.10008.1.2.5", bits=8)


def jpeg_frame(side: int) -> bytes:
    grey = np.tile((np.arange(side) % 256).astype(np.uint8), (side, 1))
    return cv2.imencode(".jpg", grey)[1].tobytes()


def j2k_frame(side: int) -> bytes:
    grey = np.tile((np.arange(side) % 256).astype(np.uint8), (side, 1))
    return cv2.imencode(".jp2", grey)[1].tobytes()


def palette_dicom(
    red: np.ndarray, green: np.ndarray, blue: np.ndarray
) -> tuple[bytes, np.ndarray]:
    """A 64 x 64 PALETTE COLOR slice of 8-bit indices (a CT slice's grey levels) with the
    given 256-entry 16-bit tables."""
    ds = _ct(64, 64, bits=8)
    ds.Modality = "OT"
    ds.PhotometricInterpretation = "PALETTE COLOR"
    indices = ct_slice(4, size=64)
    ds.PixelData = indices.tobytes()
    for name, table in (("Red", red), ("Green", green), ("Blue", blue)):
        setattr(ds, f"{name}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(ds, f"{name}PaletteColorLookupTableData", table.astype("<u2").tobytes())
    return _save(ds), indices


def peak_growth_mb(fn) -> tuple[object, float]:
    """fn()'s result (or exception) and how far this process's peak RSS rose over it."""

    def field(name: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
        raise AssertionError(name)

    Path("/proc/self/clear_refs").write_text("5")
    before = field("VmRSS")
    try:
        result: object = fn()
    except Exception as exc:  # the refusal is the result here
        result = exc
    return result, (field("VmHWM") - before) / 1024


# ------------------------------------------------------------------ decode level


def test_deeply_nested_sequences_are_refused_before_pydicom_recurses() -> None:
    assert decoding.decode(nested_dicom(3), WINDOW).width == 64  # a few levels are fine
    with pytest.raises(formats.ImageError, match="nested more than"):
        decoding.decode(nested_dicom(300), WINDOW)


def test_rle_runs_past_rows_x_columns_are_never_expanded() -> None:
    result, growth = peak_growth_mb(lambda: decoding.decode(rle_bomb(), WINDOW))
    assert growth < GROWTH_LIMIT_MB, growth
    # The segment's first 64 x 64 bytes are what the image holds (as pydicom reads padding).
    assert isinstance(result, formats.Decoded) and result.grey.shape == (64, 64)


def test_rle_decodes_as_the_uncompressed_slice() -> None:
    from pydicom import dcmread
    from pydicom.uid import RLELossless

    plain = plain_dicom(96)
    ds = dcmread(io.BytesIO(plain))
    ds.compress(RLELossless)
    rle = _save(ds)
    got, want = decoding.decode(rle, WINDOW), decoding.decode(plain, WINDOW)
    assert np.array_equal(got.grey, want.grey)
    # 12 bits stored in 16, signed: the sign is extended from bit 11 as pydicom does.
    ds = dcmread(io.BytesIO(plain))
    ds.BitsStored, ds.HighBit = 12, 11
    ds.compress(RLELossless)
    assert np.array_equal(decoding.decode(_save(ds), WINDOW).grey, want.grey)


@pytest.mark.parametrize("codec", ["jpeg", "j2k"])
def test_compressed_frames_larger_than_the_dataset_are_refused_before_decoding(codec) -> None:
    frame = jpeg_frame(3000) if codec == "jpeg" else j2k_frame(2000)
    syntax = "1.2.840.10008.1.2.4.50" if codec == "jpeg" else "1.2.840.10008.1.2.4.90"
    data = encapsulated(64, 64, frame, syntax, bits=8)
    result, growth = peak_growth_mb(lambda: decoding.decode(data, WINDOW))
    assert isinstance(result, formats.ImageError), result
    assert "declares" in str(result) and "64 x 64" in str(result)
    assert growth < GROWTH_LIMIT_MB, growth
    # The same frame in a dataset of its own size decodes.
    side = 3000 if codec == "jpeg" else 2000
    good = encapsulated(side, side, frame, syntax, bits=8)
    assert decoding.decode(good, WINDOW).width == side


def test_palette_color_goes_through_its_lookup_table() -> None:
    ramp = np.arange(256) * 257
    inverted = ramp[::-1]
    data, indices = palette_dicom(inverted, inverted, inverted)
    decoded = decoding.decode(data, WINDOW)
    assert decoded.mode == "P" and decoded.colour_share == 0.0
    assert np.array_equal(decoded.grey, 255 - indices)  # not the indices read as grey
    # A colourful table: the share of coloured pixels reaches the not-a-CT-slice check.
    data, _ = palette_dicom(ramp, np.zeros(256), np.zeros(256))
    assert decoding.decode(data, WINDOW).colour_share > 0.3


def test_palette_color_without_a_table_is_refused_clearly() -> None:
    from pydicom import dcmread

    data, _ = palette_dicom(np.arange(256), np.arange(256), np.arange(256))
    ds = dcmread(io.BytesIO(data))
    del ds.RedPaletteColorLookupTableData
    with pytest.raises(formats.ImageError, match="PALETTE COLOR lookup table"):
        decoding.decode(_save(ds), WINDOW)


# ------------------------------------------------------------------ through the app


@pytest.fixture(scope="module")
def client(model_dir: Path):
    return create_app({"MODEL_DIR": str(model_dir), "MC_DROPOUT_SAMPLES": 0}).test_client()


@pytest.mark.parametrize(
    "build",
    [
        lambda: nested_dicom(300),
        lambda: encapsulated(64, 64, jpeg_frame(3000), "1.2.840.10008.1.2.4.50", bits=8),
        lambda: palette_dicom(np.arange(256) * 257, np.zeros(256), np.zeros(256))[0],
    ],
    ids=["nested_300", "jpeg_frame_3000_in_64", "palette_red"],
)
def test_hostile_dicom_is_a_4xx_with_one_log_line(client, build, caplog) -> None:
    data = build()
    with caplog.at_level(logging.INFO):
        resp = client.post("/predict", data=data, content_type="application/dicom")
        batch = client.post(
            "/predict/batch",
            data={"files": [(io.BytesIO(data), "a.dcm"), (io.BytesIO(plain_dicom()), "b.dcm")]},
            content_type="multipart/form-data",
        )
    assert 400 <= resp.status_code < 500, resp.get_data(as_text=True)[:300]
    assert resp.mimetype == "application/problem+json"
    results = batch.get_json()["results"]
    assert 400 <= results[0]["error"]["status"] < 500 and results[1]["ok"] is True
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


def test_junk_between_segments_of_a_dicom_jpeg_frame_is_refused() -> None:
    """Pillow (pydicom's JPEG decoder here) reads junk before a marker one Python call per
    byte: 9 MB of stuffed pairs cost 1.9 s of CPU; the frame walk refuses them first."""
    frame = jpeg_frame(64)
    sos = frame.index(b"\xff\xda")
    junk = frame[:sos] + b"\xff\x00" * 500_000 + frame[sos:]
    data = encapsulated(64, 64, junk, "1.2.840.10008.1.2.4.50", bits=8)
    with pytest.raises(formats.ImageError, match="between two segments"):
        decoding.decode(data, WINDOW)
    fill = frame[:sos] + b"\xff" * 8 + frame[sos:]  # a few fill bytes are allowed
    assert decoding.decode(encapsulated(64, 64, fill, "1.2.840.10008.1.2.4.50", 8), WINDOW).width
