"""What an image file is, by its content, and what decoding it may cost.

The format comes from magic numbers, never from a (possibly wrong) extension; `DecodeLimits`
is the budget (pixels, bytes, frames) that every decoder checks against a file's `Header`
before a pixel is decoded.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

# Magic numbers, so the format comes from content, never from a (possibly wrong) extension.
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
)


class ImageError(ValueError):
    """Bytes that are not a decodable image."""


@dataclass(frozen=True)
class Decoded:
    """A decoded slice as 8-bit grey, with what the file itself was."""

    grey: np.ndarray  # uint8, H x W
    format: str  # by content: png, jpeg, ...
    mode: str  # as stored: L, LA, RGB, RGBA, I;16
    width: int
    height: int
    colour_share: float | None = None  # share of clearly coloured pixels; None: stored grey


def has_dicom_preamble(data: bytes) -> bool:
    """A DICOM Part 10 file: 128 bytes of preamble, then "DICM"."""
    return len(data) > 132 and data[128:132] == b"DICM"


def _headerless_dicom(data: bytes) -> bool:
    """DICOM written without the 128-byte preamble and "DICM" (raw datasets from older
    systems): it opens on a little-endian element of group 0002 (file meta) or 0008
    (identification), followed by an explicit VR (two capital letters) or, implicit, an even
    value length that fits the file."""
    if len(data) < 16 or data[:2] not in (b"\x02\x00", b"\x08\x00"):
        return False
    vr = data[4:6]
    if vr.isalpha() and vr.isupper():
        return True
    length = int.from_bytes(data[4:8], "little")
    return length % 2 == 0 and 0 < length < len(data) - 8


def sniff_format(data: bytes) -> str:
    """Image format from the first bytes ('unknown' when no signature matches)."""
    for magic, name in _SIGNATURES:
        if data.startswith(magic):
            return name
    if has_dicom_preamble(data) or _headerless_dicom(data):
        return "dicom"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "unknown"


@dataclass(frozen=True)
class DecodeLimits:
    """What one image may cost to decode, checked from its header before any pixel is made.

    `max_pixels` is width x height; `max_bytes` is what the decoder will hold: width x height x
    channels x bytes per sample as decoded, plus the decoder's own working buffers (a
    progressive JPEG's coefficients, a TIFF strip or tile, a deflated DICOM dataset).
    `max_dicom_elements` bounds the data elements a DICOM file may hold (each costs pydicom an
    object, so a file of millions of empty elements is a memory bomb without a single pixel).
    """

    max_pixels: int = 16_777_216  # 4096 x 4096; a CT slice is 512 x 512 (0.26 Mpx)
    max_bytes: int = 32 * 1024 * 1024
    max_dicom_elements: int = 20_000

    def __post_init__(self) -> None:
        if self.max_pixels < 1024 or self.max_bytes < 4096 or self.max_dicom_elements < 16:
            raise ValueError(f"decode limits are too small to decode any slice: {self}")


DEFAULT_LIMITS = DecodeLimits()
# The environment variable through which OpenCV bounds the pixels its decoders allocate. It is
# read once, when OpenCV loads, so it must be set before `import cv2` (config/gunicorn.conf.py
# and the Dockerfile do; see opencv_pixel_limit()).
OPENCV_PIXELS_ENV = "OPENCV_IO_MAX_IMAGE_PIXELS"
MAX_JPEG_SCANS = 64  # a progressive JPEG has about 10; each scan is a pass over the image
COLOUR_SPREAD = 40  # channel spread (of 255) above which a pixel counts as coloured
STRIP_ROWS = 256  # rows converted at a time: float temporaries stay a few MB whatever the image


class ImageTooLarge(ImageError):
    """A header that declares more pixels or bytes than the decode limits allow."""


@dataclass(frozen=True)
class Header:
    """What a file's header declares, read without decoding a pixel."""

    format: str
    width: int
    height: int
    channels: int  # as the decoder will hold them
    sample_bytes: int  # bytes per sample as decoded (1 or 2)
    working_bytes: int = 0  # further buffers the decoder needs (see DecodeLimits)
    # What reading the header built (a JPEG's JpegInfo, a DICOM dataset), handed to `decode`
    # so that a request parses each file once.
    parsed: Any = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def nbytes(self) -> int:
        return self.pixels * self.channels * self.sample_bytes + self.working_bytes


def opencv_pixel_limit() -> int | None:
    """OpenCV's own per-image pixel limit as this process set it (None: OpenCV's default of
    2^30, i.e. unset or unreadable)."""
    raw = os.environ.get(OPENCV_PIXELS_ENV, "")
    return int(raw) if raw.isdigit() else None


def check_budget(header: Header, limits: DecodeLimits) -> None:
    """Refuse a header whose image would cost more than `limits`.

    Raises:
        ImageTooLarge: naming the declared size, what it costs and the limit.
    """
    what = f"the {header.format.upper()} header declares {header.width} x {header.height} pixels"
    if header.pixels > limits.max_pixels:
        raise ImageTooLarge(
            f"{what}, more than the limit of {limits.max_pixels:,} (serving.max_image_pixels); "
            "send the slice at its native size (CT slices are about 512 x 512)"
        )
    if header.nbytes > limits.max_bytes:
        raise ImageTooLarge(
            f"{what} x {header.channels} channel(s) x {header.sample_bytes} byte(s)"
            + (
                f" + {header.working_bytes:,} bytes of decoder buffers"
                if header.working_bytes
                else ""
            )
            + f": {header.nbytes / 2**20:.0f} MB to decode, more than the limit of "
            f"{limits.max_bytes / 2**20:.0f} MB (serving.max_decoded_mb); send the slice as "
            "8-bit grey at its native size"
        )
