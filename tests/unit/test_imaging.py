"""imaging: bytes are decoded by content into 8-bit grey, or refused with a clear ImageError."""

from __future__ import annotations

import platform
import subprocess
import sys

import cv2
import numpy as np
import pytest

from chestct.imaging.decoding import decode
from chestct.imaging.encoding import encode_png
from chestct.imaging.formats import ImageError, sniff_format
from chestct.imaging.jpeg import jpeg_frame
from chestct.imaging.preparation import Preprocessing, prepare, resize
from helpers import encode, image_bytes, pixels, write_image


def test_jpeg_saved_under_a_png_name_is_decoded_as_jpeg(tmp_path) -> None:
    path = write_image(tmp_path / "slice.png", width=30, height=20, fmt="jpeg")
    decoded = decode(path.read_bytes())
    assert decoded.format == "jpeg"
    assert (decoded.width, decoded.height) == (30, 20)
    assert decoded.grey.shape == (20, 30)


@pytest.mark.parametrize(("mode", "components"), [("L", 1), ("RGB", 3)])
def test_jpeg_is_decoded_to_its_luma_with_the_stored_mode(mode: str, components: int) -> None:
    grey = cv2.GaussianBlur(pixels(40, 24, "L", seed=2), (5, 5), 0)
    img = grey if mode == "L" else cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
    data = encode(img, "jpeg")
    assert jpeg_frame(data) == (40, 24, components)
    decoded = decode(data)
    assert (decoded.format, decoded.mode, decoded.width, decoded.height) == ("jpeg", mode, 40, 24)
    # The luma plane itself, not colour decoded and converted back.
    luma = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    np.testing.assert_array_equal(decoded.grey, luma)
    assert np.abs(decoded.grey.astype(int) - grey.astype(int)).max() <= 12  # JPEG is lossy


def test_jpeg_frame_needs_a_frame_header_before_the_scan() -> None:
    data = image_bytes(20, 10, fmt="jpeg")
    assert jpeg_frame(data) == (20, 10, 1)
    assert jpeg_frame(data[:4]) is None
    assert jpeg_frame(b"\xff\xd8\xff\xda\x00\x02" + bytes(20)) is None  # scan, no frame


@pytest.mark.parametrize("fmt", ["png", "jpeg", "bmp", "tiff"])
def test_format_comes_from_content(fmt: str) -> None:
    data = image_bytes(12, 10, fmt=fmt)
    assert sniff_format(data) == fmt
    assert decode(data).format == fmt


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
def test_8bit_modes_decode_to_grey_with_their_mode(mode: str) -> None:
    img = pixels(17, 11, mode, seed=3)
    decoded = decode(encode(img))
    assert decoded.mode == mode
    assert decoded.grey.dtype == np.uint8
    assert decoded.grey.shape == (11, 17)
    assert (decoded.width, decoded.height) == (17, 11)
    expected = img if mode == "L" else cv2.cvtColor(img[:, :, :3], cv2.COLOR_BGR2GRAY)
    np.testing.assert_array_equal(decoded.grey, expected)


def test_grey_stored_as_colour_keeps_its_grey_levels() -> None:
    grey = pixels(9, 7, "L", seed=1)
    for img in (cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR), cv2.cvtColor(grey, cv2.COLOR_GRAY2BGRA)):
        np.testing.assert_array_equal(decode(encode(img)).grey, grey)


def test_16bit_grey_is_scaled_to_8bit() -> None:
    img = np.array([[0, 257, 257 * 100, 65535]], dtype=np.uint16)
    decoded = decode(encode(img))
    assert decoded.mode == "I;16"
    assert decoded.grey.dtype == np.uint8
    np.testing.assert_array_equal(decoded.grey, [[0, 1, 100, 255]])


def test_transparent_pixels_become_black() -> None:
    img = np.full((4, 6, 4), 200, dtype=np.uint8)
    img[:, :3, 3] = 0  # left half fully transparent
    img[:, 3:, 3] = 255
    decoded = decode(encode(img))
    assert decoded.mode == "RGBA"
    assert (decoded.grey[:, :3] == 0).all()
    assert (decoded.grey[:, 3:] == 200).all()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty file"),
        (np.random.default_rng(0).bytes(500), "not a supported image (format by content: unknown"),
        (b"GIF89a" + bytes(100), "format by content: gif"),
        (bytes(128) + b"DICM" + bytes(100), "format by content: dicom"),
        (
            b"\x89PNG\r\n\x1a\n" + bytes(60),
            "PNG header is truncated or does not start with an IHDR",
        ),
    ],
    ids=["empty", "random", "gif", "dicom", "png-magic-only"],
)
def test_bad_bytes_raise_image_error_with_a_clear_message(data: bytes, message: str) -> None:
    with pytest.raises(ImageError) as info:
        decode(data)
    assert message in str(info.value)


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_truncated_image_raises_image_error(fmt: str) -> None:
    data = image_bytes(40, 40, fmt=fmt, seed=5)
    with pytest.raises(ImageError, match=f"{fmt} data could not be decoded"):
        decode(data[: len(data) // 2])


def test_image_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="empty file"):
        decode(b"")


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
@pytest.mark.parametrize("interpolation", ["area", "linear", "cubic"])
def test_prepare_returns_square_uint8(mode: str, interpolation: str) -> None:
    out = prepare(image_bytes(45, 23, mode=mode), Preprocessing(32, interpolation))
    assert out.shape == (32, 32)
    assert out.dtype == np.uint8


def test_prepare_keeps_a_flat_image_flat() -> None:
    flat = np.full((20, 50), 77, dtype=np.uint8)
    np.testing.assert_array_equal(prepare(encode(flat), Preprocessing(16)), np.full((16, 16), 77))


def test_prepare_equals_decode_then_resize() -> None:
    data = image_bytes(33, 21, mode="RGB", seed=9)
    np.testing.assert_array_equal(
        prepare(data, Preprocessing(16, "linear")), resize(decode(data).grey, 16, "linear")
    )


def test_prepare_refuses_undecodable_bytes() -> None:
    with pytest.raises(ImageError):
        prepare(b"not an image at all", Preprocessing(32))


def test_encode_png_round_trips() -> None:
    grey = pixels(8, 5, "L", seed=2)
    data = encode_png(grey)
    assert sniff_format(data) == "png"
    np.testing.assert_array_equal(decode(data).grey, grey)


@pytest.mark.parametrize(
    ("data", "fmt"),
    [
        (b"\x89PNG\r\n\x1a\n" + bytes(8), "png"),
        (b"\xff\xd8\xff\xe0" + bytes(8), "jpeg"),
        (bytes(128) + b"DICM" + bytes(16), "dicom"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "webp"),
        (b"BM" + bytes(10), "bmp"),
        (b"II*\x00", "tiff"),
        (b"MM\x00*", "tiff"),
        (b"GIF87a", "gif"),
        (bytes(200), "unknown"),
        (b"", "unknown"),
        (b"\x89PN", "unknown"),
    ],
)
def test_sniff_format(data: bytes, fmt: str) -> None:
    assert sniff_format(data) == fmt


_FAULTS_SCRIPT = """
import resource, sys
import numpy as np
from chestct.imaging.workers import keep_image_buffers
if sys.argv[1] == "keep":
    assert keep_image_buffers()
np.ones(3_000_000, np.uint8)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(40):  # buffers of varying size, as decoded slices of varying size are
    buffer = np.ones(2_000_000 + (i % 5) * 100_000, np.uint8)
    del buffer
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="mallopt is glibc's",
)
def test_keep_image_buffers_stops_page_faults_per_buffer() -> None:
    def faults(mode: str) -> int:
        out = subprocess.run(
            [sys.executable, "-c", _FAULTS_SCRIPT, mode], capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        return int(out.stdout.strip())

    default, kept = faults("default"), faults("keep")
    assert default > 100  # each 2 MB buffer comes from fresh, page-faulted memory
    assert kept < default / 10
