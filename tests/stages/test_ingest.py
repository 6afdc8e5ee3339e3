"""ingest from every kind of source, DICOM windowing, and what it does with bad files."""

from __future__ import annotations

import io
import shutil
import tarfile
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEGLSLossless, generate_uid

from chestct.data.dedup import HEX_DIGITS
from chestct.data.manifest import INGEST_COLUMNS
from chestct.fsutil import sha256_file
from chestct.imaging.decoding import decode
from chestct.imaging.dicom import apply_window, decode_dicom
from chestct.imaging.formats import ImageError, sniff_format
from chestct.imaging.preparation import Preprocessing, prepare
from chestct.labels import CLASSES
from chestct.runner import StageFailed
from chestct.settings import BaseParams, IngestParams, WindowParams
from chestct.stages.ingest import run_ingest
from helpers import (
    LONG_FOLDERS,
    SHORT_FOLDERS,
    image_bytes,
    ingest_folder,
    make_kaggle_folder,
    write_image,
)
from shipped import shipped

LUNG = (-600.0, 1500.0)


def dicom_bytes(
    stored: np.ndarray,
    slope: float = 1.0,
    intercept: float = -1024.0,
    photometric: str = "MONOCHROME2",
    syntax: object = ExplicitVRLittleEndian,
    pixels: bool = True,
    frames: int = 1,
) -> bytes:
    """A CT DICOM file (Part 10, with preamble) holding `stored` as 16-bit values."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    if pixels:
        ds.Rows, ds.Columns = stored.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 0
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        if frames > 1:
            ds.NumberOfFrames = frames
        raw = np.concatenate([stored.astype(np.uint16)] * frames).tobytes()
        ds.PixelData = (
            encapsulate([b"\xff\xd8\xff\xe0" + bytes(32)]) if syntax.is_compressed else raw
        )
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def ingest(root: Path, source: str, **params) -> tuple:
    return run_ingest(
        shipped(BaseParams, seed=1, image_size=32),
        shipped(IngestParams, source=source, **params),
        root / "artifacts" / "ingest",
        root,
        workers=1,
    )


# --------------------------------------------------------------------------- DICOM decoding


def test_dicom_goes_through_hounsfield_units_and_the_window() -> None:
    # stored 0 -> -1024 HU (air), 424 -> -600 HU (window centre), 1174 -> 150 HU (top).
    stored = np.array([[0, 424, 1174, 4000]], dtype=np.uint16)
    decoded = decode(dicom_bytes(stored), LUNG)
    assert decoded.format == "dicom"
    assert decoded.mode == "I;16"
    assert (decoded.width, decoded.height) == (4, 1)
    np.testing.assert_array_equal(decoded.grey, [[55, 128, 255, 255]])
    # Slope and intercept are applied before the window: stored 212 * 2 - 1024 = -600 HU.
    halved = decode_dicom(dicom_bytes(np.array([[212]]), slope=2.0), *LUNG)
    assert halved.grey[0, 0] == 128


def test_monochrome1_is_inverted_and_the_window_is_a_parameter() -> None:
    stored = np.array([[0, 424]], dtype=np.uint16)
    np.testing.assert_array_equal(
        decode(dicom_bytes(stored, photometric="MONOCHROME1"), LUNG).grey, [[200, 127]]
    )
    mediastinum = decode(dicom_bytes(stored), (40.0, 400.0))
    np.testing.assert_array_equal(mediastinum.grey, [[0, 0]])
    np.testing.assert_array_equal(
        apply_window(np.array([-160.0, 40.0, 240.0]), 40, 400), [0, 128, 255]
    )


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"pixels": False}, "has no pixel data"),
        (
            {"syntax": JPEGLSLossless},
            "JPEG-LS Lossless Image Compression (1.2.840.10008.1.2.4.80) is not supported here",
        ),
        ({"frames": 3}, "holds 3 frames"),
    ],
    ids=["no-pixels", "unsupported-syntax", "multi-frame"],
)
def test_bad_dicom_raises_a_clear_image_error(kwargs: dict, reason: str) -> None:
    with pytest.raises(ImageError) as info:
        decode(dicom_bytes(np.zeros((4, 4)), **kwargs), LUNG)
    assert reason in str(info.value)


def _without_preamble(data: bytes, meta: bool, implicit: bool = False) -> bytes:
    """The same slice as older systems write it: no 128-byte preamble and no "DICM"; with
    `meta` False, a bare dataset without file meta either."""
    if meta:
        return data[132:]
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.preamble = None
    ds.file_meta = FileMetaDataset()
    out = io.BytesIO()
    pydicom.dcmwrite(out, ds, enforce_file_format=False, implicit_vr=implicit, little_endian=True)
    return out.getvalue()


@pytest.mark.parametrize(
    ("meta", "implicit"),
    [(True, False), (False, False), (False, True)],
    ids=["file-meta", "bare-explicit-vr", "bare-implicit-vr"],
)
def test_dicom_without_preamble_is_decoded_alike(meta: bool, implicit: bool) -> None:
    data = dicom_bytes(np.array([[0, 424, 1174, 4000]], dtype=np.uint16))
    stripped = _without_preamble(data, meta, implicit)
    assert stripped[128:132] != b"DICM"
    assert sniff_format(stripped) == "dicom"
    np.testing.assert_array_equal(decode(stripped, LUNG).grey, decode(data, LUNG).grey)


def test_bytes_that_merely_start_like_dicom_are_not_taken_for_it() -> None:
    assert sniff_format(b"\x08\x00\x05\x00" + b"\xff" * 40) == "unknown"
    assert sniff_format(b"\x08\x00") == "unknown"


def test_dicom_without_a_window_is_refused_and_prepare_passes_it_on() -> None:
    data = dicom_bytes(np.full((10, 20), 424))
    with pytest.raises(ImageError, match=r"format by content: dicom.*needs a window"):
        decode(data)
    out = prepare(data, Preprocessing(8, resize="pad", window=LUNG))
    assert out.shape == (8, 8)
    assert (out[2:6] == 128).all() and (out[0] == 0).all()  # the slice, then black bands


# --------------------------------------------------------------------------- ingest


def test_ingest_a_dicom_tree_stores_windowed_pngs_and_skips_bad_files(tmp_path: Path) -> None:
    tree = tmp_path / "dicom"
    for n, label in enumerate(CLASSES):
        for i in range(2):
            # DICOM trees nest (patient/series) and often have no extension.
            path = tree / label / f"patient{i}" / "series1" / f"IM{i:04d}"
            path.parent.mkdir(parents=True)
            stored = np.full((24, 20), 300 + 100 * n + 10 * i, dtype=np.uint16)
            path.write_bytes(dicom_bytes(stored))
    (tree / "normal" / "report.dcm").write_bytes(dicom_bytes(np.zeros((2, 2)), pixels=False))
    (tree / "normal" / "lossless.dcm").write_bytes(
        dicom_bytes(np.zeros((2, 2)), syntax=JPEGLSLossless)
    )

    frame, summary = ingest(
        tmp_path, "dicom", window=shipped(WindowParams, level=-600, width=1500)
    )

    assert len(frame) == 8
    assert set(frame["format"]) == {"dicom"}
    assert set(frame["split"]) == {""}
    reasons = {Path(s["path"]).name: s["reason"] for s in summary.skipped}
    assert set(reasons) == {"report.dcm", "lossless.dcm"}
    assert "no pixel data" in reasons["report.dcm"]
    assert "is not supported here" in reasons["lossless.dcm"]
    row = frame[frame["label"] == "adenocarcinoma"].iloc[0]
    stored = cv2.imread(str(tmp_path / row["path"]), cv2.IMREAD_UNCHANGED)
    assert row["path"].endswith("IM0000.png")
    assert stored.shape == (24, 20) and stored.dtype == np.uint8
    assert (row["width"], row["height"], row["mode"]) == (20, 24, "I;16")
    expected = apply_window(np.full((1,), 300 - 1024.0), *LUNG)[0]
    assert (stored == expected).all()
    assert (
        row["bytes"]
        == (tree / "adenocarcinoma" / "patient0" / "series1" / "IM0000").stat().st_size
    )


def test_ingest_from_a_zip_and_a_tgz_names_files_inside_the_archive(tmp_path: Path) -> None:
    folder = make_kaggle_folder(tmp_path / "kaggle", {"train": 2, "valid": 1})
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    with zipfile.ZipFile(tmp_path / "set.zip", "w") as zf:
        for p in files:
            zf.write(p, f"Data/{p.relative_to(folder).as_posix()}")
    with tarfile.open(tmp_path / "set.tgz", "w:gz") as tf:
        tf.add(folder, arcname="Data")

    for name in ("set.zip", "set.tgz"):
        frame, summary = ingest(tmp_path, name)
        assert len(frame) == len(files) == 12
        assert summary.source["kind"] == "archive"
        assert len(summary.source["sha256"]) == 64
        assert frame["source_path"].str.startswith(f"{tmp_path / name}::train/").sum() == 8
        assert all((tmp_path / p).is_file() for p in frame["path"])
        # The unpacked copy is gone: only the ingested images remain.
        assert sorted(p.name for p in (tmp_path / "artifacts" / "ingest").iterdir()) == ["images"]


def test_ingest_manifest_has_a_perceptual_hash_and_runs_in_parallel(tmp_path: Path) -> None:
    make_kaggle_folder(tmp_path / "kaggle", {"train": 9, "valid": 4, "test": 4})
    serial, _ = ingest(tmp_path, "kaggle")
    parallel, _ = run_ingest(
        shipped(BaseParams, seed=1),
        shipped(IngestParams, source="kaggle"),
        tmp_path / "par",
        tmp_path,
        workers=2,
    )
    assert list(serial.columns) == list(INGEST_COLUMNS)
    assert serial["phash"].str.fullmatch(f"[0-9a-f]{{{HEX_DIGITS}}}").all()
    keys = ["source_path", "sha256", "phash", "width", "height", "mode", "format", "bytes"]
    assert serial[keys].equals(parallel[keys])


def test_every_kind_of_bad_file_is_reported_by_path(tmp_path: Path) -> None:
    source = make_kaggle_folder(tmp_path / "kaggle", {"train": 2, "valid": 1})
    normal = source / "train" / "normal"
    (normal / "zero.png").write_bytes(b"")
    good = image_bytes(40, 40, seed=7)
    (normal / "truncated.png").write_bytes(good[: len(good) // 2])
    (normal / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(200))
    (normal / "notes.pdf").write_bytes(b"%PDF-1.4 not an image")
    unreadable = normal / "locked.png"
    unreadable.write_bytes(good)
    unreadable.chmod(0)

    try:
        frame, summary = ingest(tmp_path, "kaggle")
    finally:
        unreadable.chmod(0o644)

    reasons = {Path(s["path"]).name: s["reason"] for s in summary.skipped}
    assert reasons["zero.png"] == "empty file"
    assert "png data could not be decoded" in reasons["truncated.png"]
    assert "jpeg" in reasons["corrupt.jpg"].lower()  # a named header or decode problem
    assert "not a supported image" in reasons["notes.pdf"]
    if "locked.png" in reasons:  # root reads any file; everyone else gets a reason
        assert "cannot be read" in reasons["locked.png"]
    assert all(str(normal) in s["path"] for s in summary.skipped)
    assert len(frame) == 12 + (0 if "locked.png" in reasons else 1)


def test_a_class_with_no_usable_file_stops_naming_it(tmp_path: Path) -> None:
    source = make_kaggle_folder(tmp_path / "kaggle", {"train": 1})
    for path in (source / "train" / LONG_FOLDERS["normal"]).iterdir():
        path.write_bytes(b"junk")
    with pytest.raises(StageFailed, match=r"no usable file for class\(es\) normal"):
        ingest(tmp_path, "kaggle")


def test_an_empty_source_stops(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(StageFailed, match="no class folders in it"):
        ingest(tmp_path, "empty")


def test_a_missing_class_folder_stops_naming_the_class(tmp_path: Path) -> None:
    for label in CLASSES[:3]:
        write_image(tmp_path / "three" / label / "a.png", seed=len(label))
    with pytest.raises(StageFailed, match=r"class\(es\) normal"):
        ingest(tmp_path, "three")


def test_a_bad_archive_source_stops_with_the_reason(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as zf:
        zf.writestr("../evil.png", b"x")
    with pytest.raises(StageFailed, match="climbs out of the target folder"):
        ingest(tmp_path, "evil.zip")
    assert not (tmp_path / "evil.png").exists()
    assert not (tmp_path / "artifacts" / "ingest" / ".source").exists()


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
        shipped(BaseParams, seed=3),
        shipped(IngestParams, synthetic_per_class=per_class),
        tmp_path / "again",
        tmp_path,
    )
    assert sorted(again["sha256"]) == sorted(frame["sha256"])
