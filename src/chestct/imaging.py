"""Decoding and preprocessing shared by the pipeline (ingest, resize) and the predictor.

One function, `prepare`, turns raw file bytes into the model's input, so that a slice is seen
the same way in training and in serving: decode, then (params `resize`) the body crop
(`body_box`), the resize to a square and the intensity normalisation (`Normalise`). DICOM files
are windowed to 8-bit grey by `decode_dicom` (Hounsfield units through RescaleSlope/Intercept,
then a lung window).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import io
import multiprocessing
import os
import struct
import sys
import zlib
from collections.abc import Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from chestct.lungs import lung_field

INTERPOLATIONS = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR, "cubic": cv2.INTER_CUBIC}

# How a slice that is not square becomes square (params `resize.mode`).
RESIZE_MODES: tuple[str, ...] = ("stretch", "pad", "crop")

# The default lung window (params `ingest.window`): level -600 HU, width 1500 HU.
LUNG_WINDOW: tuple[float, float] = (-600.0, 1500.0)

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
_STRIP = 256  # rows converted at a time: float temporaries stay a few MB whatever the image


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


# --------------------------------------------------------------------------- headers


def _png_header(data: bytes) -> Header:
    # The signature, then IHDR: length 13, "IHDR", width, height, depth, colour type, ...
    if len(data) < 33 or data[8:16] != b"\x00\x00\x00\x0dIHDR":
        raise ImageError("PNG header is truncated or does not start with an IHDR chunk")
    width, height, depth, colour, comp, filt, interlace = struct.unpack(">IIBBBBB", data[16:29])
    depths = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
    if colour not in depths or depth not in depths[colour]:
        raise ImageError(f"PNG header has an invalid bit depth {depth} for colour type {colour}")
    if comp != 0 or filt != 0 or interlace > 1:
        raise ImageError("PNG header names an unknown compression, filter or interlace method")
    if not (0 < width < 2**31 and 0 < height < 2**31):
        raise ImageError(f"PNG header declares an impossible size {width} x {height}")
    # As OpenCV holds them: grey 1 channel, RGB 3, palette (maybe with tRNS) and alpha 4.
    channels = {0: 1, 2: 3, 3: 4, 4: 4, 6: 4}[colour]
    return Header("png", width, height, channels, 2 if depth == 16 else 1)


@dataclass(frozen=True)
class JpegInfo:
    """A JPEG's frame header and scan count, from a walk over every marker."""

    width: int
    height: int
    components: int
    precision: int
    progressive: bool
    scans: int
    junk_bytes: int  # bytes between markers that the decoder skips (with a warning)


_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Bytes that, after an FF, do not make a marker: 00 (a stuffed FF) and FF (fill). Inside a scan
# the restart markers RST0-RST7 do not end it either.
NOT_MARKER = np.zeros(256, bool)
NOT_MARKER[[0x00, 0xFF]] = True
NOT_SCAN_END = NOT_MARKER.copy()
NOT_SCAN_END[0xD0:0xD8] = True
_FIRST_WINDOW = 512  # bytes looked at first: a marker is usually near


def next_marker(data: bytes, pos: int, not_marker: np.ndarray) -> int:
    """Where the code byte of the next marker lies whose FF is at or after `pos`, or -1.

    Vectorised over windows that double from _FIRST_WINDOW to 1 MB: a scan stuffed with FF 00
    pairs or a run of fill FFs costs a few numpy passes, never a Python step per byte (nor a
    regex step per position)."""
    arr = np.frombuffer(data, np.uint8)
    size, start, window = len(arr), pos, _FIRST_WINDOW
    while start < size - 1:
        stop = min(size, start + window + 1)
        hits = (arr[start : stop - 1] == 0xFF) & ~not_marker[arr[start + 1 : stop]]
        first = int(hits.argmax())
        if hits[first]:
            return start + 1 + first
        start, window = stop - 1, min(window * 4, 1 << 20)
    return -1


def jpeg_info(data: bytes) -> JpegInfo:
    """Walk a JPEG's markers as libjpeg does: junk between segments is skipped, entropy-coded
    data after each SOS is stepped over, every SOF and SOS is seen.

    Raises:
        ImageError: no SOI, a second SOI or frame header, a scan before the frame header, a
            bad segment length, a zero size, or more than MAX_JPEG_SCANS scans.
    """
    if not data.startswith(b"\xff\xd8"):
        raise ImageError("JPEG does not start with SOI (FF D8)")
    pos, size, junk, scans = 2, len(data), 0, 0
    frame: tuple[int, int, int, int, bool] | None = None
    while True:
        # The next marker: FF (any fill FFs) then a byte that is neither 00 (a stuffed FF in
        # junk) nor FF, found by numpy: junk is skipped at C speed, never byte by byte.
        at = next_marker(data, pos, NOT_MARKER)
        if at < 0:
            break
        marker = data[at]
        junk += at - 1 - pos  # the bytes before the marker's FF (fill included)
        pos = at + 1
        if marker == 0xD9:  # EOI
            break
        if marker == 0xD8:
            raise ImageError("JPEG holds a second start-of-image marker (concatenated files?)")
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # TEM, RSTn: no length
            continue
        if pos + 2 > size:
            break
        length = int.from_bytes(data[pos : pos + 2], "big")
        if length < 2:
            raise ImageError(f"JPEG segment FF{marker:02X} has an invalid length {length}")
        segment = data[pos + 2 : pos + length]
        if marker in _SOF_MARKERS:
            if frame is not None:
                raise ImageError("JPEG holds two frame headers (SOF); the decoder refuses them")
            if len(segment) < 6:
                raise ImageError("JPEG frame header (SOF) is truncated")
            precision, height, width, comps = struct.unpack(">BHHB", segment[:6])
            if width == 0 or height == 0:
                raise ImageError(
                    f"JPEG frame header declares {width} x {height} pixels (a height set by a "
                    "DNL marker is not supported)"
                )
            if comps not in (1, 3, 4) or precision not in (8, 12, 16):
                raise ImageError(
                    f"JPEG frame header declares {comps} components of {precision} bits; "
                    "chestct reads 8/12/16-bit grey, colour or CMYK JPEG"
                )
            progressive = marker in (0xC2, 0xC6, 0xCA, 0xCE)
            frame = (width, height, comps, precision, progressive)
        pos += length
        if marker == 0xDA:  # SOS: entropy-coded data follows up to the next real marker
            if frame is None:
                raise ImageError("JPEG has a scan (SOS) before any frame header (SOF)")
            scans += 1
            if scans > MAX_JPEG_SCANS:
                raise ImageTooLarge(
                    f"JPEG holds more than {MAX_JPEG_SCANS} scans; each is a pass over the "
                    "whole image (a progressive JPEG has about 10): re-encode it"
                )
            # Past stuffed FF 00, fill FFs and restart markers, in one vectorised search.
            end = next_marker(data, pos, NOT_SCAN_END)
            pos = size if end < 0 else end - 1
    if frame is None:
        raise ImageError("JPEG has no frame header (SOF): truncated or not an image")
    return JpegInfo(*frame, scans=scans, junk_bytes=junk)


def jpeg_frame(data: bytes) -> tuple[int, int, int] | None:
    """Width, height and number of components from a JPEG's frame header (SOF), found by
    walking every marker (jpeg_info); None when there is no usable one."""
    try:
        info = jpeg_info(data)
    except ImageError:
        return None
    return info.width, info.height, info.components


def _jpeg_header(data: bytes, info: JpegInfo | None = None) -> Header:
    info = info or jpeg_info(data)
    sample = 1 if info.precision == 8 else 2
    # Decoded straight to grey; a progressive file also keeps every component's DCT
    # coefficients (2 bytes each) for the whole image; a colour one gets a half-size colour
    # decode for the colour check.
    working = info.width * info.height * info.components * 2 if info.progressive else 0
    if info.components > 1:
        working += (info.width // 2 + 1) * (info.height // 2 + 1) * 3
    return Header("jpeg", info.width, info.height, 1, sample, working, parsed=info)


def _bmp_header(data: bytes) -> Header:
    if len(data) < 26:
        raise ImageError("BMP header is truncated")
    dib = int.from_bytes(data[14:18], "little")
    if dib == 12:  # OS/2 core header
        width, height, planes, bits = struct.unpack("<HHHH", data[18:26])
        compression = 0
    elif dib in (40, 52, 56, 64, 108, 124):
        if len(data) < 14 + 40:
            raise ImageError("BMP header is truncated")
        width, height, planes, bits, compression = struct.unpack("<iiHHI", data[18:34])
    else:
        raise ImageError(f"BMP header has an unknown size {dib}; save it as a standard BMP")
    if planes != 1 or bits not in (1, 4, 8, 16, 24, 32) or compression not in (0, 1, 2, 3):
        raise ImageError(
            f"BMP header declares {planes} planes, {bits} bits per pixel, compression "
            f"{compression}; chestct reads uncompressed, RLE and bit-field BMP"
        )
    if width <= 0 or height == 0 or height == -(2**31):
        raise ImageError(f"BMP header declares an impossible size {width} x {height}")
    return Header("bmp", width, abs(height), 4 if bits == 32 else 3, 1)


# TIFF field types (TIFF 6.0 + IFD): bytes per value.
_TIFF_TYPES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4}
_TIFF_INTS = {1: "B", 3: "H", 4: "I", 6: "b", 8: "h", 9: "i", 13: "I"}
_TIFF_NAMES = {256: "ImageWidth", 257: "ImageLength", 258: "BitsPerSample", 259: "Compression",
               262: "PhotometricInterpretation", 273: "StripOffsets", 277: "SamplesPerPixel",
               278: "RowsPerStrip", 279: "StripByteCounts", 322: "TileWidth",
               323: "TileLength", 324: "TileOffsets", 325: "TileByteCounts"}  # fmt: skip
# Compression schemes OpenCV's libtiff reads: none, CCITT, LZW, (old) JPEG, deflate, PackBits.
_TIFF_COMPRESSIONS = frozenset({1, 2, 3, 4, 5, 6, 7, 8, 32773, 32946})


def _tiff_header(data: bytes) -> Header:
    """The first IFD, read strictly: the decoder must not see what this cannot."""
    order = "<" if data[:2] == b"II" else ">"
    if len(data) < 8:
        raise ImageError("TIFF header is truncated")
    (ifd,) = struct.unpack(order + "I", data[4:8])
    if ifd < 8 or ifd + 2 > len(data):
        raise ImageError(f"TIFF first IFD offset {ifd} lies outside the file (truncated?)")
    (count,) = struct.unpack(order + "H", data[ifd : ifd + 2])
    if count == 0 or ifd + 2 + 12 * count > len(data):
        raise ImageError(f"TIFF first IFD declares {count} entries that the file does not hold")
    tags: dict[int, list[int]] = {}
    for i in range(count):
        entry = ifd + 2 + 12 * i
        tag, kind, n = struct.unpack(order + "HHI", data[entry : entry + 8])
        name = _TIFF_NAMES.get(tag, str(tag))
        if kind not in _TIFF_TYPES:
            raise ImageError(f"TIFF tag {name} has an unknown field type {kind}")
        if tag in tags:
            raise ImageError(
                f"TIFF tag {name} appears twice in the first IFD; the file contradicts itself"
            )
        size = _TIFF_TYPES[kind] * n
        at = entry + 8
        if size > 4:
            (at,) = struct.unpack(order + "I", data[entry + 8 : entry + 12])
            if at + size > len(data):
                raise ImageError(f"TIFF tag {name}'s values lie outside the file (truncated?)")
        if tag in _TIFF_NAMES:
            if kind not in _TIFF_INTS:
                raise ImageError(f"TIFF tag {name} has non-integer field type {kind}")
            if n > 1 << 20:
                raise ImageError(f"TIFF tag {name} holds {n:,} values")
            fmt = f"{order}{n}{_TIFF_INTS[kind]}"
            tags[tag] = list(struct.unpack(fmt, data[at : at + size]))
        else:
            tags[tag] = []

    def single(tag: int, default: int | None = None) -> int:
        values = tags.get(tag)
        if values is None:
            if default is None:
                raise ImageError(f"TIFF first IFD has no {_TIFF_NAMES[tag]} tag")
            return default
        if len(values) != 1:
            raise ImageError(f"TIFF tag {_TIFF_NAMES[tag]} holds {len(values)} values, not one")
        return values[0]

    width, height = single(256), single(257)
    spp = single(277, 1)
    bits = tags.get(258, [1])
    compression = single(259, 1)
    if width <= 0 or height <= 0:
        raise ImageError(f"TIFF header declares an impossible size {width} x {height}")
    if not 1 <= spp <= 4:
        raise ImageError(f"TIFF SamplesPerPixel is {spp}; chestct reads 1 to 4 samples")
    if len(bits) not in (1, spp) or len(set(bits)) != 1 or bits[0] not in (1, 2, 4, 8, 16):
        raise ImageError(
            f"TIFF BitsPerSample {bits} contradicts SamplesPerPixel {spp} or is not 1-16 bits "
            "the same for every sample"
        )
    if compression not in _TIFF_COMPRESSIONS:
        raise ImageError(f"TIFF compression {compression} is not supported; save it with LZW")
    strips, tiles = 273 in tags or 279 in tags, any(t in tags for t in (322, 323, 324, 325))
    if strips and tiles:
        raise ImageError("TIFF first IFD declares both strips and tiles; it contradicts itself")
    sample = 2 if bits[0] == 16 else 1
    if tiles:
        tile_w, tile_h = single(322), single(323)
        if tile_w <= 0 or tile_h <= 0 or len(tags.get(324, [])) != len(tags.get(325, [])):
            raise ImageError("TIFF tile size or tile offsets/byte counts are inconsistent")
        working = tile_w * tile_h * max(spp, 4) * sample
    else:
        rows = min(single(278, height), height)
        if rows <= 0 or len(tags.get(273, [])) != len(tags.get(279, [])):
            raise ImageError("TIFF RowsPerStrip or strip offsets/byte counts are inconsistent")
        working = width * rows * max(spp, 4) * sample
    channels = 1 if spp == 1 and single(262, 1) != 3 else (3 if spp == 3 else 4)
    return Header("tiff", width, height, channels, sample, working)


_HEADERS = {"png": _png_header, "jpeg": _jpeg_header, "bmp": _bmp_header, "tiff": _tiff_header}


def read_header(data: bytes, fmt: str | None = None) -> Header:
    """What the header of a PNG, JPEG, BMP or TIFF file declares (DICOM: `dicom_header`).

    Raises:
        ImageError: a header that cannot be read strictly, naming what is wrong.
    """
    fmt = fmt or sniff_format(data)
    if fmt == "dicom":
        return dicom_header(data)[0]
    reader = _HEADERS.get(fmt)
    if reader is None:
        raise ImageError(f"no header reader for format {fmt!r}")
    try:
        return reader(data)
    except struct.error:
        raise ImageError(f"{fmt.upper()} header is truncated") from None


# --------------------------------------------------------------------------- decoding


def _colour_share(img: np.ndarray) -> float:
    """Share of pixels whose colour channels (BGR first) differ by more than COLOUR_SPREAD."""
    spread_at = COLOUR_SPREAD * (257 if img.dtype == np.uint16 else 1)
    coloured = 0
    for top in range(0, img.shape[0], _STRIP):
        strip = img[top : top + _STRIP, :, :3]
        spread = strip.max(axis=2).astype(np.int32) - strip.min(axis=2)
        coloured += int(np.count_nonzero(spread > spread_at))
    return coloured / max(1, img.shape[0] * img.shape[1])


def _to_grey(img: np.ndarray) -> tuple[np.ndarray, str, float | None]:
    """Any decoded array to 8-bit grey, the mode it had and its colour share (None for grey).

    Converted a strip of rows at a time, so that the float temporaries of alpha blending and
    16-bit scaling stay small whatever the image's size.
    """
    depth16 = img.dtype == np.uint16
    if img.ndim == 2 or img.shape[2] in (1, 2):
        mode = ("I;16" if depth16 else "L") if img.ndim == 2 or img.shape[2] == 1 else "LA"
        plane = img if img.ndim == 2 else img[:, :, 0]
        if not depth16:
            return np.ascontiguousarray(plane), mode, None
        grey = np.empty(plane.shape, np.uint8)
        for top in range(0, plane.shape[0], _STRIP):
            grey[top : top + _STRIP] = _to_8bit(plane[top : top + _STRIP])
        return grey, mode, None
    channels = img.shape[2]
    mode = "RGBA" if channels == 4 else "RGB"
    opaque = channels == 3 or img[:, :, 3].min() == np.iinfo(img.dtype).max
    grey = np.empty(img.shape[:2], np.uint8)
    for top in range(0, img.shape[0], _STRIP):
        strip = img[top : top + _STRIP]
        if opaque:
            plane = cv2.cvtColor(strip[:, :, :3], cv2.COLOR_BGR2GRAY)
        else:
            # Transparent pixels become black, the background of a CT slice.
            weight = strip[:, :, 3:4].astype(np.float32) / (65535.0 if depth16 else 255.0)
            bgr = (strip[:, :, :3].astype(np.float32) * weight).astype(img.dtype)
            plane = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
        grey[top : top + _STRIP] = _to_8bit(plane) if depth16 else plane
    return grey, mode, _colour_share(img)


def _to_8bit(plane: np.ndarray) -> np.ndarray:
    return (plane.astype(np.float32) / 257.0).round().clip(0, 255).astype(np.uint8)


def _imdecode(buf: np.ndarray, flags: int, fmt: str) -> np.ndarray | None:
    try:
        return cv2.imdecode(buf, flags)
    except cv2.error as exc:  # OpenCV's own size limit (OPENCV_IO_MAX_IMAGE_PIXELS) or asserts
        raise ImageTooLarge(
            f"{fmt} data refused by the decoder ({str(exc).strip().splitlines()[-1]})"
        ) from None


def decode(
    data: bytes,
    window: tuple[float, float] | None = None,
    *,
    limits: DecodeLimits = DEFAULT_LIMITS,
    header: Header | None = None,
) -> Decoded:
    """Decode image bytes (PNG, JPEG, BMP, TIFF; DICOM when given a window) into 8-bit grey.

    The header is read strictly first and its declared cost checked against `limits`, so a
    decompression bomb is refused before the decoder allocates anything.

    Args:
        data: the file's bytes; the format comes from the content, never from a name.
        window: (level, width) in Hounsfield units for DICOM files; without it a DICOM file
            is refused, because the same bytes would look different under another window.
        limits: pixels, bytes and DICOM elements one image may cost.
        header: what `read_header` / `dicom_header` already read from these bytes (not read
            again).

    Raises:
        ImageTooLarge: the header declares more than `limits`.
        ImageError: empty, truncated or non-image bytes, a header that cannot be read, or a
            DICOM file without a window, without pixel data or in a transfer syntax that
            cannot be decoded here.
    """
    if not data:
        raise ImageError("empty file")
    fmt = sniff_format(data)
    if header is not None and header.format != fmt:
        header = None
    if fmt == "dicom" and window is not None:
        return decode_dicom(data, *window, limits=limits, header=header)
    if fmt in ("unknown", "dicom", "gif", "webp"):
        hint = (
            "; DICOM needs a window (level, width) to become 8-bit grey"
            if fmt == "dicom"
            else "; use PNG, JPEG, BMP, TIFF or DICOM"
        )
        raise ImageError(f"not a supported image (format by content: {fmt}){hint}")
    if header is None:
        header = read_header(data, fmt)
    info = header.parsed if fmt == "jpeg" else None
    check_budget(header, limits)
    buf = np.frombuffer(data, dtype=np.uint8)
    if info is not None:
        # JPEG keeps luma apart from colour: decoding straight to grey reads the luma plane and
        # skips the colour planes (half the time on colour JPEGs), and it is the picture's own
        # grey, without the rounding of colour decoding and converting back. EXIF orientation
        # is ignored, as for every other format.
        grey = _imdecode(buf, cv2.IMREAD_GRAYSCALE | cv2.IMREAD_IGNORE_ORIENTATION, fmt)
        if grey is None or grey.size == 0:
            raise ImageError("jpeg data could not be decoded (truncated or corrupt)")
        _check_decoded(grey, header)
        if grey.dtype != np.uint8:  # 12/16-bit JPEG
            grey = _to_8bit(grey)
        colour = None
        if info.components > 1:
            small = _imdecode(buf, cv2.IMREAD_REDUCED_COLOR_2 | cv2.IMREAD_IGNORE_ORIENTATION, fmt)
            colour = None if small is None or small.ndim != 3 else _colour_share(small)
        height, width = grey.shape
        mode = "L" if colour is None else "RGB"
        return Decoded(grey, fmt, mode, width, height, colour)
    img = _imdecode(buf, cv2.IMREAD_UNCHANGED, fmt)
    if img is None or img.size == 0:
        raise ImageError(f"{fmt} data could not be decoded (truncated or corrupt)")
    if img.dtype not in (np.uint8, np.uint16):
        raise ImageError(f"{fmt} holds {img.dtype} samples; chestct reads 8 or 16-bit images")
    if img.nbytes > limits.max_bytes:  # the decoder made more than the header declared
        raise ImageTooLarge(f"{fmt} decoded to {img.nbytes:,} bytes, more than its header said")
    _check_decoded(img, header)
    grey, mode, colour = _to_grey(img)
    del img
    height, width = grey.shape
    return Decoded(grey, fmt, mode, width, height, colour)


def _check_decoded(img: np.ndarray, header: Header) -> None:
    """After decoding: the codec must have made the size the header declared (the budget was
    checked on that size)."""
    if img.shape[:2] != (header.height, header.width):
        raise ImageError(
            f"{header.format} decoded to {img.shape[1]} x {img.shape[0]} pixels, not the "
            f"{header.width} x {header.height} its header declares (corrupt or forged)"
        )


def apply_window(values: np.ndarray, level: float, width: float) -> np.ndarray:
    """Map values (e.g. Hounsfield units) through a window to uint8: level - width/2 is black,
    level + width/2 is white."""
    low = level - width / 2.0
    scaled = (values.astype(np.float32) - np.float32(low)) * np.float32(255.0 / width)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- DICOM

# Explicit VRs whose length field is 4 bytes (after 2 reserved ones).
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_UNDEFINED = 0xFFFFFFFF
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
# How deep sequences may nest (a CT slice nests two or three: a referenced image's code, say).
MAX_DICOM_DEPTH = 16
DEFLATED_SYNTAX = "1.2.840.10008.1.2.1.99"
# Attributes chestct reads from a dataset: each must hold a short single value.
_DICOM_ATTRIBUTES = (
    "Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "BitsStored", "HighBit",
    "PixelRepresentation", "NumberOfFrames", "PhotometricInterpretation", "RescaleSlope",
    "RescaleIntercept", "PlanarConfiguration", "Modality", "SOPClassUID",
)  # fmt: skip


def _walk_dicom(data: bytes, pos: int, implicit: bool, limit: int, stop_group: int = 0) -> int:
    """Step over a dataset's elements from `pos` without building any, items of sequences
    included; returns where it stopped (the end, or the first element of a group above
    `stop_group` when one is given).

    Raises:
        ImageError: an element that runs past the end, or sequences nested more than
            MAX_DICOM_DEPTH deep (pydicom reads each level with a few recursive calls).
        ImageTooLarge: more than `limit` elements.
    """
    from pydicom.datadict import dictionary_VR

    end, count = len(data), 0
    # The open sequences and items, innermost last: (is a sequence, where it ends; None for
    # an undefined length, closed by its delimiter).
    nesting: list[tuple[bool, int | None]] = []

    def opened(sequence: bool, closes: int | None) -> None:
        nesting.append((sequence, closes))
        depth = sum(is_sequence for is_sequence, _ in nesting)
        if depth > MAX_DICOM_DEPTH:
            raise ImageError(
                f"DICOM sequences are nested more than {MAX_DICOM_DEPTH} levels deep (a CT "
                "slice nests a few); refusing to parse it"
            )

    def closed(sequence: bool) -> None:
        while nesting:
            if nesting.pop()[0] == sequence:
                return

    while pos < end:
        while nesting and nesting[-1][1] is not None and nesting[-1][1] <= pos:
            nesting.pop()
        if pos + 8 > end:
            raise ImageError(f"DICOM data is truncated at byte {pos}")
        group, elem, length = struct.unpack_from("<HHI", data, pos)
        if stop_group and group > stop_group:
            return pos
        count += 1
        if count > limit:
            raise ImageTooLarge(
                f"DICOM file holds more than {limit:,} data elements (a slice has a few "
                "hundred); refusing to parse it"
            )
        tag, vr = (group << 16) | elem, b""
        if group == 0xFFFE:  # item and delimiters: an item's elements follow
            pos += 8
            if elem == 0xE000:
                opened(False, None if length == _UNDEFINED else pos + length)
            elif elem == 0xE00D:
                closed(False)
            elif elem == 0xE0DD:
                closed(True)
            continue
        if implicit:
            pos += 8
        else:
            vr = data[pos + 4 : pos + 6]
            if vr in _LONG_VRS:
                if pos + 12 > end:
                    raise ImageError(f"DICOM data is truncated at byte {pos}")
                (length,) = struct.unpack_from("<I", data, pos + 8)
                pos += 12
            else:
                (length,) = struct.unpack_from("<H", data, pos + 6)
                pos += 8
        if length == _UNDEFINED:
            if tag in _PIXEL_TAGS or vr in (b"OB", b"OW"):
                pos, fragments = _skip_fragments(data, pos, limit - count)
                count += fragments
            elif vr == b"UN":  # a sequence in implicit VR: step to its end as bytes
                close = data.find(b"\xfe\xff\xdd\xe0\x00\x00\x00\x00", pos)
                if close < 0:
                    raise ImageError(f"DICOM sequence at byte {pos} has no end")
                if data.count(b"\xfe\xff\x00\xe0", pos, close) > limit:
                    raise ImageTooLarge(f"DICOM sequence at byte {pos} holds over {limit} items")
                count += (close - pos) // 8
                pos = close + 8
            else:
                opened(True, None)
            continue  # a sequence: its items follow
        if vr == b"SQ":
            opened(True, pos + length)
            continue
        if implicit and group % 2 == 0:
            try:
                if dictionary_VR(tag) == "SQ":
                    opened(True, pos + length)
                    continue
            except KeyError:
                pass
        if pos + length > end and tag not in _PIXEL_TAGS:
            raise ImageError(
                f"DICOM element ({group:04X},{elem:04X}) declares {length:,} bytes past the end "
                "of the file (truncated or forged)"
            )
        pos += length
    return pos


def _skip_fragments(data: bytes, pos: int, limit: int) -> tuple[int, int]:
    """Past encapsulated pixel data (items of bytes up to a sequence delimiter), refusing
    more than `limit` fragments."""
    count = 0
    while True:
        if count > limit:
            raise ImageTooLarge(
                f"DICOM pixel data holds more than {limit:,} fragments (a slice has a few)"
            )
        if pos + 8 > len(data):
            raise ImageError("DICOM encapsulated pixel data is truncated")
        group, elem, length = struct.unpack_from("<HHI", data, pos)
        pos += 8
        count += 1
        if (group, elem) == (0xFFFE, 0xE0DD):
            return pos, count
        if (group, elem) != (0xFFFE, 0xE000) or length == _UNDEFINED:
            raise ImageError("DICOM encapsulated pixel data is malformed (not a fragment item)")
        pos += length


def _inflate(data: bytes, cap: int) -> bytes:
    """A raw deflate stream, refused once it inflates past `cap` bytes (before allocating
    more)."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        out = inflater.decompress(data, cap + 1)
    except zlib.error as exc:
        raise ImageError(f"DICOM deflated dataset is corrupt ({exc})") from None
    if len(out) > cap or inflater.unconsumed_tail:
        raise ImageTooLarge(
            f"DICOM deflated dataset inflates to more than {cap / 2**20:.0f} MB "
            "(serving.max_decoded_mb); refusing a decompression bomb"
        )
    if not inflater.eof:
        raise ImageError("DICOM deflated dataset is truncated (the deflate stream does not end)")
    if inflater.unused_data.strip(b"\0"):  # one pad byte makes the length even (PS3.5 A.5)
        raise ImageError(
            f"DICOM deflated dataset is corrupt (the deflate stream ends "
            f"{len(inflater.unused_data):,} bytes before the file does)"
        )
    return out


def _read_dicom(data: bytes, limits: DecodeLimits) -> Any:
    """The dataset, parsed by pydicom only after its structure was walked within `limits`;
    a deflated dataset is inflated here, bounded, instead of by pydicom (which is not)."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.errors import InvalidDicomError
    from pydicom.filereader import read_dataset

    preamble = has_dicom_preamble(data)
    start = 132 if preamble else 0
    meta_end = start
    if data[start : start + 2] == b"\x02\x00":  # file meta: always explicit VR little endian
        meta_end = _walk_dicom(data, start, False, limits.max_dicom_elements, stop_group=2)
    try:
        meta = read_dataset(
            io.BytesIO(data[start:meta_end]), is_implicit_VR=False, is_little_endian=True
        )
        syntax = str(meta.get("TransferSyntaxUID", "") or "")
        if syntax == DEFLATED_SYNTAX:
            body = _inflate(data[meta_end:], limits.max_bytes)
            _walk_dicom(body, 0, False, limits.max_dicom_elements)
            file_meta = FileMetaDataset(meta)
            dataset = read_dataset(io.BytesIO(body), is_implicit_VR=False, is_little_endian=True)
            return FileDataset(
                "upload", dataset, preamble=data[:128] if preamble else None,
                file_meta=file_meta, is_implicit_VR=False, is_little_endian=True,
            )  # fmt: skip
        vr = data[meta_end + 4 : meta_end + 6]
        implicit = syntax == "1.2.840.10008.1.2" or (
            not syntax and not (vr.isalpha() and vr.isupper())
        )
        if syntax == "1.2.840.10008.1.2.2":
            raise ImageError(
                "DICOM transfer syntax Explicit VR Big Endian (1.2.840.10008.1.2.2) is retired "
                "and not supported; convert the file (`gdcmconv --raw in.dcm out.dcm`)"
            )
        _walk_dicom(data, meta_end, implicit, limits.max_dicom_elements)
        # force: a file without the preamble is read from its first element (sniff_format
        # has already checked that it opens like a DICOM dataset).
        return pydicom.dcmread(io.BytesIO(data), force=not preamble)
    except ImageError:
        raise
    except RecursionError:  # nesting the walk above did not see (inside a UN value)
        raise ImageError(
            "DICOM sequences are nested too deeply to parse; refusing the file"
        ) from None
    except (InvalidDicomError, EOFError, ValueError, TypeError, KeyError, OSError,
            struct.error, AttributeError, NotImplementedError) as exc:  # fmt: skip
        raise ImageError(f"not a readable DICOM file ({type(exc).__name__}: {exc})") from None


def _attribute(ds: Any, keyword: str, default: Any) -> Any:
    """One attribute's value, refused unless it is a single short value."""
    from pydicom.multival import MultiValue

    try:
        raw = ds.get_item(keyword)
        if raw is None:
            return default
        length = getattr(raw, "length", None)
        if length is None:
            length = len(raw.value) if isinstance(raw.value, bytes | str) else 0
        if length > 64:
            raise ImageError(f"DICOM attribute {keyword} is {length:,} bytes; it holds one value")
        value = ds.get(keyword, default)
    except ImageError:
        raise
    except Exception as exc:  # pydicom converts values lazily and raises many types for them
        raise ImageError(f"DICOM attribute {keyword} cannot be read ({exc})") from None
    if isinstance(value, MultiValue | list | tuple):
        raise ImageError(f"DICOM attribute {keyword} holds {len(value)} values; a slice has one")
    return default if value is None or value == "" else value


def _number(ds: Any, keyword: str, default: float) -> float:
    value = _attribute(ds, keyword, default)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ImageError(f"DICOM attribute {keyword} is {value!r}, not a number") from None
    if not np.isfinite(number):
        raise ImageError(f"DICOM attribute {keyword} is {value!r}, not a finite number")
    return number


def dicom_header(data: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> tuple[Header, Any]:
    """The header of a DICOM file and its dataset, read within `limits`.

    Raises:
        ImageError: unreadable, no pixel data, several frames, or a transfer syntax chestct
            does not decode (named).
    """
    ds = _read_dicom(data, limits)
    if "TransferSyntaxUID" not in ds.file_meta:
        # A raw dataset has no file meta; its encoding, as read, names the transfer syntax.
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

        implicit, little = ds.original_encoding
        if not little:
            raise ImageError("big-endian DICOM without file meta is not supported; convert it")
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
        )
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        kind = (
            _attribute(ds, "Modality", "") or str(_attribute(ds, "SOPClassUID", "")) or "unknown"
        )
        raise ImageError(
            f"DICOM file has no pixel data (modality/class: {kind}): a report, a presentation "
            "state or a truncated file, not an image; leave it out"
        )
    syntax = ds.file_meta.TransferSyntaxUID
    if not syntax.is_transfer_syntax:
        raise ImageError(
            f"DICOM transfer syntax {syntax!s:.64} is not a transfer syntax chestct knows; "
            "convert the file to Explicit VR Little Endian (`gdcmconv --raw in.dcm out.dcm`)"
        )
    if syntax.is_compressed and not _decoder_available(syntax):
        raise ImageError(
            f"DICOM transfer syntax {syntax.name} ({syntax}) is not supported here (no "
            "decoder installed); decompress the file first, e.g. `gdcmconv --raw in.dcm "
            "out.dcm`"
        )
    frames = int(_number(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ImageError(
            f"DICOM file holds {frames} frames; chestct reads 2D slices: export one file per slice"
        )
    rows, columns = int(_number(ds, "Rows", 0)), int(_number(ds, "Columns", 0))
    if rows <= 0 or columns <= 0:
        raise ImageError(f"DICOM Rows x Columns is {rows} x {columns}; not an image")
    samples = int(_number(ds, "SamplesPerPixel", 1))
    bits = int(_number(ds, "BitsAllocated", 16))
    if samples not in (1, 3) or bits not in (1, 8, 16, 32, 64):
        raise ImageError(
            f"DICOM declares {samples} samples of {bits} bits; chestct reads 1 or 3 samples "
            "of 8 or 16 bits"
        )
    sample = max(1, bits // 8)
    # Working memory: the stored values, then float32 Hounsfield units a strip at a time.
    header = Header(
        "dicom", columns, rows, samples, sample, columns * rows * samples * sample, parsed=ds
    )
    return header, ds


def decode_dicom(
    data: bytes,
    level: float,
    width: float,
    *,
    limits: DecodeLimits = DEFAULT_LIMITS,
    header: Header | None = None,
) -> Decoded:
    """A single-frame DICOM slice to 8-bit grey through Hounsfield units and a window.

    Stored values become Hounsfield units through RescaleSlope and RescaleIntercept (1 and 0 when
    absent), then the window (level, width) maps them to 0..255. MONOCHROME1 is inverted so
    that air is dark as in MONOCHROME2; colour DICOM is converted to grey without windowing.
    The dataset's structure, a deflated dataset's size and the declared pixels are checked
    against `limits` before pydicom parses or decodes anything.

    Raises:
        ImageTooLarge: more pixels, bytes or data elements than `limits`.
        ImageError: not DICOM, no pixel data, a transfer syntax without an available decoder,
            several frames, an attribute that is not one value, or undecodable pixel data.
    """
    if width <= 0:
        raise ImageError(f"DICOM window width must be > 0, got {width}")
    if header is None or header.parsed is None:
        header = dicom_header(data, limits)[0]
    ds = header.parsed
    check_budget(header, limits)
    photometric = str(_attribute(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    slope = _number(ds, "RescaleSlope", 1.0) or 1.0
    intercept = _number(ds, "RescaleIntercept", 0.0)
    for keyword in ("BitsStored", "HighBit", "PixelRepresentation", "PlanarConfiguration"):
        _attribute(ds, keyword, 0)  # read by pydicom's decoder: refuse odd values here
    pixels = _dicom_pixels(ds, header, limits)
    colour: float | None = None
    if pixels.ndim == 3 and photometric not in ("MONOCHROME1", "MONOCHROME2"):
        rgb = pixels.astype(np.uint8) if pixels.dtype != np.uint8 else pixels
        if photometric.startswith("YBR"):
            from pydicom.pixels import convert_color_space

            rgb = convert_color_space(rgb, photometric, "RGB")
        grey = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
        mode = "RGB"
    elif pixels.ndim == 2 and photometric == "PALETTE COLOR":
        from chestct.dicom_pixels import PixelDataError, palette_to_grey

        try:
            grey, colour = palette_to_grey(pixels, ds, COLOUR_SPREAD)
        except PixelDataError as exc:
            raise ImageError(str(exc)) from None
        mode = "P"
    elif pixels.ndim == 2 and photometric in ("MONOCHROME1", "MONOCHROME2"):
        grey = np.empty(pixels.shape, np.uint8)
        for top in range(0, pixels.shape[0], _STRIP):
            strip = pixels[top : top + _STRIP].astype(np.float32)
            grey[top : top + _STRIP] = apply_window(
                strip * np.float32(slope) + np.float32(intercept), level, width
            )
        if photometric == "MONOCHROME1":
            grey = 255 - grey
        mode = "L" if header.sample_bytes == 1 else "I;16"
    else:
        raise ImageError(
            f"DICOM pixel data has shape {pixels.shape} and photometric interpretation "
            f"{photometric}; chestct reads MONOCHROME1/2, PALETTE COLOR, RGB and YBR slices"
        )
    height, width_px = grey.shape
    return Decoded(
        grey=grey, format="dicom", mode=mode, width=width_px, height=height, colour_share=colour
    )


def _dicom_pixels(ds: Any, header: Header, limits: DecodeLimits) -> np.ndarray:
    """The stored values of a single-frame dataset, decoded within `limits` (see
    chestct.dicom_pixels): RLE by a decoder that never writes past Rows x Columns, JPEG-family
    frames only when their own header declares the dataset's size; then the decoded size is
    checked again.

    Raises:
        ImageError: pixel data that does not decode to the size its header declares.
    """
    from chestct.dicom_pixels import (
        RLE_LOSSLESS,
        PixelDataError,
        check_frame,
        decode_rle,
        first_frame,
    )

    syntax = ds.file_meta.TransferSyntaxUID
    try:
        if syntax == RLE_LOSSLESS:
            frame = first_frame(ds)
            pixels = decode_rle(frame, ds, header.height, header.width)
        else:
            if syntax.is_compressed:
                bits = int(_number(ds, "BitsAllocated", 16))
                check_frame(
                    first_frame(ds), header.height, header.width,
                    header.channels, bits,
                )  # fmt: skip
                # Pillow (a decoder pydicom may use) refuses frames past its own limit too.
                from PIL import Image

                Image.MAX_IMAGE_PIXELS = limits.max_pixels // 2
            pixels = ds.pixel_array
    except PixelDataError as exc:
        raise ImageError(str(exc)) from None
    except ImageError:
        raise
    except Exception as exc:  # pydicom raises many types for codecs; all mean the same here
        raise ImageError(f"DICOM pixel data could not be decoded ({exc})") from None
    if pixels.nbytes > limits.max_bytes or pixels.shape[:2] != (header.height, header.width):
        raise ImageError(
            f"DICOM pixel data decoded to shape {pixels.shape}, not the {header.height} x "
            f"{header.width} its header declares"
        )
    return pixels


def _decoder_available(syntax: object) -> bool:
    try:
        from pydicom.pixels import get_decoder

        return bool(get_decoder(syntax).is_available)
    except (NotImplementedError, ValueError, KeyError):
        return False


# Body crop (params `resize.crop`). The mask is worked out on a copy whose longer side is at most
# this many pixels: the box is coarse by nature, and the kernel sizes below were checked on the
# real slices at this scale (a larger work copy left a mottled fat rim outside the box).
_BODY_WORK_SIDE = 256
# Components at least this share of the largest are kept (both halves of a split body).
BODY_KEEP_SHARE = 0.25
# A body box smaller than this share of the frame is a speck, not a body: the frame is kept.
BODY_MIN_SHARE = 0.02
# Where the body threshold lies between the darkest level (0) and Otsu's (1).
BODY_LEVEL = 0.5
# The smallest side (pixels) a slice needs before looking for a body makes sense.
BODY_MIN_SIDE = 16


@dataclass(frozen=True)
class BodyBox:
    """Where the body lies in a slice, in that slice's pixel coordinates.

    `reason` is empty when a body was found; otherwise the box is the whole frame and
    `reason` says why (blank slice, nothing stood out, only a speck...).
    """

    x: int
    y: int
    w: int
    h: int
    reason: str = ""

    @property
    def found(self) -> bool:
        return not self.reason

    def grown(self, margin: float) -> BodyBox:
        """The box with `margin` (a share of its side) added on every side, even past the
        frame's edge: `crop` fills what lies outside with the slice's background."""
        pad_x, pad_y = round(self.w * margin), round(self.h * margin)
        return dataclasses.replace(
            self, x=self.x - pad_x, y=self.y - pad_y, w=self.w + 2 * pad_x, h=self.h + 2 * pad_y
        )

    def crop(self, grey: np.ndarray) -> np.ndarray:
        """The part of `grey` inside the box. Where the box lies past the frame, the slice's
        darkest level fills it (its background: black, or the grey an export lifted it to)."""
        height, width = grey.shape[:2]
        x0, y0 = max(0, self.x), max(0, self.y)
        x1, y1 = min(width, self.x + self.w), min(height, self.y + self.h)
        inside = grey[y0:y1, x0:x1]
        if (x0 - self.x, y0 - self.y, self.x + self.w - x1, self.y + self.h - y1) == (0, 0, 0, 0):
            return inside
        return cv2.copyMakeBorder(
            inside,
            y0 - self.y,
            self.y + self.h - y1,
            x0 - self.x,
            self.x + self.w - x1,
            cv2.BORDER_CONSTANT,
            value=int(grey.min()),
        )


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """A 0/255 mask with every region the background cannot reach filled (the dark lungs
    inside the body), so the body is one solid blob."""
    padded = cv2.copyMakeBorder(mask, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    reach = padded.copy()
    flood = np.zeros((padded.shape[0] + 2, padded.shape[1] + 2), np.uint8)
    cv2.floodFill(reach, flood, (0, 0), 255)
    return (padded | ~reach)[1:-1, 1:-1]


def shrink(grey: np.ndarray, side: int) -> tuple[np.ndarray, float]:
    """`grey` scaled down (area interpolation) so its longer side is at most `side`, and the
    scale used (1.0: returned as it is)."""
    height, width = grey.shape[:2]
    scale = min(1.0, side / max(height, width))
    if scale >= 1.0:
        return grey, 1.0
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(grey, size, interpolation=cv2.INTER_AREA), scale


# Below this share of the frame outside the body box, "background" is the frame's darkest grey.
_MIN_OUTSIDE = 0.01


def grey_percentiles(values: np.ndarray, quantiles: tuple[float, ...]) -> list[float]:
    """Percentiles of uint8 values through a histogram (cheaper than sorting)."""
    counts = np.bincount(values.reshape(-1), minlength=256)
    cumulative = np.cumsum(counts)
    total = int(cumulative[-1])
    return [float(np.searchsorted(cumulative, q * total, side="left")) for q in quantiles]


def body_features(grey: np.ndarray, box: BodyBox) -> dict[str, float]:
    """How the body sits in the frame and its grey levels, given its box in `grey`'s
    coordinates (within the frame): the acquisition cues of chestct.acquisition (ingest,
    validate) and chestct.monitoring (serving, the reference profile), one implementation.

    Returns body_share (box area over the frame's), body_aspect (box width over height),
    body_found, background (mean grey outside the box; the frame's 1st percentile when the box
    fills it) and body_p05/p50/p95 (grey-level percentiles inside the box).
    """
    inside = box.crop(grey)
    outside = grey.size - inside.size
    if outside >= _MIN_OUTSIDE * grey.size:
        background = (float(grey.sum(dtype=np.int64)) - float(inside.sum(dtype=np.int64))) / (
            outside
        )
    else:
        background = grey_percentiles(grey, (0.01,))[0]
    p05, p50, p95 = grey_percentiles(inside, (0.05, 0.50, 0.95))
    return {
        "body_share": round(inside.size / grey.size, 4),
        "body_aspect": round(box.w / max(box.h, 1), 4),
        "body_found": float(box.found),
        "background": round(background, 3),
        "body_p05": p05,
        "body_p50": p50,
        "body_p95": p95,
    }


def body_box(grey: np.ndarray, margin: float = 0.02) -> BodyBox:
    """The bounding box of the body in a grey CT slice, or the whole frame and why.

    The body is what stands out from the dark surround: a light blur, a threshold halfway
    between the darkest level and Otsu's (`BODY_LEVEL`), then a round opening that removes thin
    strokes (burned-in text, rulers, the scanner table seen edge-on), the holes (lungs) filled,
    and a tall thin opening that removes any band flatter than about 6 % of the frame (a thicker
    table under the body) while the filled body is far taller. Connected components at least
    `BODY_KEEP_SHARE` of the largest are kept together, so a body the threshold split in two
    keeps both halves.

    Args:
        grey: uint8 H x W.
        margin: added on every side, as a share of the box's side, clipped to the frame
            (`prepare` asks for 0 and grows the box past the frame with `BodyBox.grown`).
    """
    height, width = grey.shape[:2]
    whole = BodyBox(0, 0, width, height)
    if min(height, width) < BODY_MIN_SIDE:
        return dataclasses.replace(
            whole, reason=f"slice too small ({width}x{height} px) to look for a body"
        )
    small, scale = shrink(grey, _BODY_WORK_SIDE)
    small = cv2.GaussianBlur(small, (5, 5), 0)
    low, high = int(small.min()), int(small.max())
    if high - low < 10:
        level = "black" if high < 128 else "bright"
        return dataclasses.replace(
            whole,
            reason=f"slice is uniformly {level} (grey {low:.0f}..{high:.0f}): no body to find",
        )
    otsu, _ = cv2.threshold(small, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    # Below Otsu's level, nearer the background: Otsu alone splits a soft-tissue-window slice
    # between fat and muscle and keeps only the mediastinum of a body with a mottled fat rim.
    _, mask = cv2.threshold(small, low + (otsu - low) * BODY_LEVEL, 255, cv2.THRESH_BINARY)
    share = float(np.count_nonzero(mask)) / mask.size
    if share > 0.97:
        return dataclasses.replace(
            whole, reason=f"{share:.0%} of the slice is bright: no dark surround around a body"
        )
    # Thin strokes go before the holes are filled, so a table that touches the body cannot
    # close a pocket under it that the filling would then count as body.
    round_k = max(3, round(min(small.shape) * 0.03) | 1)
    mask = cv2.morphologyEx(
        mask, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (round_k, round_k))
    )
    mask = _fill_holes(mask)
    tall_k = max(3, round(small.shape[0] * 0.06) | 1)
    mask = cv2.morphologyEx(
        mask, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_RECT, (1, tall_k))
    )
    # 4-connectivity: half the time of 8 here, and the opened mask has no diagonal-only links.
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=4)
    if count <= 1:
        return dataclasses.replace(
            whole, reason="nothing but thin strokes stood out from the background: no body"
        )
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = stats[1:][areas >= BODY_KEEP_SHARE * areas.max()]
    left = int(keep[:, cv2.CC_STAT_LEFT].min())
    top = int(keep[:, cv2.CC_STAT_TOP].min())
    right = int((keep[:, cv2.CC_STAT_LEFT] + keep[:, cv2.CC_STAT_WIDTH]).max())
    bottom = int((keep[:, cv2.CC_STAT_TOP] + keep[:, cv2.CC_STAT_HEIGHT]).max())
    # Back to the slice's own pixels, rounding outwards.
    x0, y0 = int(np.floor(left / scale)), int(np.floor(top / scale))
    x1 = min(width, int(np.ceil(right / scale)))
    y1 = min(height, int(np.ceil(bottom / scale)))
    box_share = (x1 - x0) * (y1 - y0) / (width * height)
    if box_share < BODY_MIN_SHARE:
        return dataclasses.replace(
            whole,
            reason=f"the largest bright region covers only {box_share:.1%} of the slice: "
            "too small to be a body",
        )
    pad_x, pad_y = round((x1 - x0) * margin), round((y1 - y0) * margin)
    x0, y0 = max(0, x0 - pad_x), max(0, y0 - pad_y)
    x1, y1 = min(width, x1 + pad_x), min(height, y1 + pad_y)
    return BodyBox(x0, y0, x1 - x0, y1 - y0)


def resize(
    grey: np.ndarray, size: int, interpolation: str = "area", mode: str = "stretch"
) -> np.ndarray:
    """A grey slice to size x size.

    Args:
        grey: uint8 H x W.
        size: side of the square output.
        interpolation: area | linear | cubic.
        mode: stretch (scale each axis on its own; shape distorts), pad (scale the longer side
            to `size`, centre on black; anatomy keeps its proportions but the bands show the
            aspect ratio), crop (cut the centred square, then scale; loses the sides).
    """
    flag = INTERPOLATIONS[interpolation]
    height, width = grey.shape[:2]
    if mode == "stretch" or height == width:
        return cv2.resize(grey, (size, size), interpolation=flag)
    if mode == "crop":
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        return cv2.resize(
            grey[top : top + side, left : left + side], (size, size), interpolation=flag
        )
    if mode == "pad":
        scale = size / max(height, width)
        new_w = max(1, round(width * scale))
        new_h = max(1, round(height * scale))
        small = cv2.resize(grey, (new_w, new_h), interpolation=flag)
        top, left = (size - new_h) // 2, (size - new_w) // 2
        return cv2.copyMakeBorder(
            small, top, size - new_h - top, left, size - new_w - left, cv2.BORDER_CONSTANT, value=0
        )
    raise ValueError(f"resize mode {mode!r} is not one of {', '.join(RESIZE_MODES)}")


# Params `resize.crop` and `resize.intensity`.
CROPS: tuple[str, ...] = ("body", "lungs", "none")
INTENSITIES: tuple[str, ...] = ("percentile", "equalize", "clahe", "none")
CLAHE_TILES = 8  # tiles per side of the prepared image
# A slice whose percentile window spans fewer grey levels is near-blank and left as it is.
PERCENTILE_MIN_SPREAD = 32


@dataclass(frozen=True)
class Normalise:
    """What makes slices from different acquisitions alike before the model sees them.

    The defaults here do nothing (the behaviour of models made before these settings existed);
    params `resize` and the model card choose what a pipeline and a served model use.
    """

    crop: str = "none"  # body: cut to `body_box` first; lungs: to chestct.lungs' box; none
    crop_margin: float = 0.02  # share of the body box's side added on every side
    intensity: str = "none"  # percentile | equalize | clahe | none
    percentiles: tuple[float, float] = (1.0, 99.5)  # percentile: this window -> 0..255
    clahe_clip: float = 2.0  # clahe: contrast limit

    def __post_init__(self) -> None:
        if self.crop not in CROPS:
            raise ValueError(f"crop {self.crop!r} is not one of {', '.join(CROPS)}")
        if self.intensity not in INTENSITIES:
            raise ValueError(
                f"intensity {self.intensity!r} is not one of {', '.join(INTENSITIES)}"
            )
        low, high = self.percentiles
        if not 0.0 <= low < high <= 100.0:
            raise ValueError(
                f"percentiles {list(self.percentiles)} must be 0 <= low < high <= 100"
            )
        if not 0.0 <= self.crop_margin <= 0.5:
            raise ValueError(f"crop_margin {self.crop_margin} must be within 0..0.5")
        if self.clahe_clip <= 0:
            raise ValueError(f"clahe_clip {self.clahe_clip} must be > 0")

    def card(self) -> dict[str, object]:
        """The settings as the model card records them."""
        return {
            "crop": self.crop,
            "crop_margin": self.crop_margin,
            "intensity": self.intensity,
            "percentiles": list(self.percentiles),
            "clahe_clip": self.clahe_clip,
        }

    @classmethod
    def from_spec(cls, spec: Mapping[str, object]) -> Normalise:
        """From a card's `preprocessing` or params `resize` (same key names). A card without
        these keys gets no normalisation, which is how its model was trained."""
        pair = spec.get("percentiles", (1.0, 99.5))
        if not isinstance(pair, list | tuple) or len(pair) != 2:
            raise ValueError(f"percentiles {pair!r} must be a pair [low, high]")
        low, high = pair
        return cls(
            crop=str(spec.get("crop", "none")),
            crop_margin=float(spec.get("crop_margin", cls.crop_margin)),  # type: ignore[arg-type]
            intensity=str(spec.get("intensity", "none")),
            percentiles=(float(low), float(high)),
            clahe_clip=float(spec.get("clahe_clip", cls.clahe_clip)),  # type: ignore[arg-type]
        )


@dataclass(frozen=True)
class Prepared:
    """The model input and where in the original slice it came from."""

    image: np.ndarray  # uint8 size x size
    box: BodyBox  # the region of the original slice that was resized (whole frame: no crop)
    # The body box as found (no margin) when the crop looked for one: monitoring reuses it
    # (chestct.monitoring.image_signals) rather than looking for the body a second time.
    body: BodyBox | None = None


def percentile_window(grey: np.ndarray, low: float, high: float) -> np.ndarray:
    """Stretch grey levels so the `low`..`high` percentiles span 0..255 (clipped outside).

    Percentiles come from the histogram (uint8 has 256 levels), far cheaper than sorting."""
    hist = np.bincount(grey.ravel(), minlength=256).cumsum()
    total = hist[-1]
    lo = int(np.searchsorted(hist, total * low / 100.0, side="left"))
    hi = int(np.searchsorted(hist, total * high / 100.0, side="left"))
    if hi - lo < PERCENTILE_MIN_SPREAD:
        # A near-blank slice: stretching would turn its noise into contrast, and validate's
        # near-blank check (the std of the resized slice) would no longer see it.
        return grey
    lut = np.clip(np.rint((np.arange(256) - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)
    return cv2.LUT(grey, lut)


def equalize(grey: np.ndarray) -> np.ndarray:
    """Histogram equalisation: each grey level becomes its rank in the slice.

    A rank does not change under any increasing grey-level map, so a gamma, window or contrast
    change of the acquisition leaves the output nearly as it was; the percentile window undoes
    only linear ones. A near-blank slice is left as it is, as in `percentile_window`."""
    hist = np.bincount(grey.ravel(), minlength=256).cumsum()
    total = hist[-1]
    lo = int(np.searchsorted(hist, total * 0.01, side="left"))
    hi = int(np.searchsorted(hist, total * 0.995, side="left"))
    if hi - lo < PERCENTILE_MIN_SPREAD:
        return grey
    return cv2.equalizeHist(grey)


def normalise_intensity(grey: np.ndarray, normalise: Normalise) -> np.ndarray:
    """The grey-level normalisation of `normalise.intensity` on a prepared slice."""
    if normalise.intensity == "percentile":
        return percentile_window(grey, *normalise.percentiles)
    if normalise.intensity == "equalize":
        return equalize(grey)
    if normalise.intensity == "clahe":
        tiles = max(1, min(CLAHE_TILES, min(grey.shape) // 8))
        clahe = cv2.createCLAHE(clipLimit=normalise.clahe_clip, tileGridSize=(tiles, tiles))
        return clahe.apply(grey)
    return grey


def prepare_slice(
    grey: np.ndarray,
    size: int,
    interpolation: str = "area",
    mode: str = "stretch",
    normalise: Normalise = Normalise(),
) -> Prepared:
    """A decoded grey slice -> the model input: body crop, resize, intensity normalisation.

    The intensity is normalised after resizing: the percentiles of the small image are those of
    the crop within a grey level, at a fraction of the cost.
    """
    if normalise.crop == "body":
        # The margin goes past the frame's edge, so a body that touches the edge is
        # framed like the same body seen with a wider field (measured on the real slices: the
        # prepared image of a 80 % zoom-out moved 31 % of its spread with the margin clipped
        # at the edge, 8 % this way).
        body: BodyBox | None = body_box(grey, 0.0)
        box = body.grown(normalise.crop_margin) if body.found else body
    elif normalise.crop == "lungs":
        body, box = None, lung_box(grey, normalise.crop_margin)
    else:
        body = None
        box = BodyBox(0, 0, grey.shape[1], grey.shape[0], reason="crop: none")
    image = resize(box.crop(grey), size, interpolation, mode)
    return Prepared(normalise_intensity(image, normalise), box, body)


def lung_box(grey: np.ndarray, margin: float) -> BodyBox:
    """The box of `chestct.lungs.lung_field` grown by `margin` (`resize.crop: lungs`); a
    slice without a lung field is cut to its body box instead, the reason kept."""
    field = lung_field(grey)
    if field.found:
        return BodyBox(field.x, field.y, field.w, field.h).grown(margin)
    body = body_box(grey, 0.0)
    box = body.grown(margin) if body.found else body
    return dataclasses.replace(box, reason=f"no lungs ({field.reason}); body box used")


def map_to_frame(
    values: np.ndarray, box: BodyBox, frame: tuple[int, ...], mode: str = "stretch"
) -> np.ndarray:
    """A map over a prepared image (e.g. a class activation map, any square resolution) put
    back into the original slice's coordinates: float32 (H, W), zero outside what the model saw.

    The inverse of `prepare_slice`'s geometry: the square covers the body box stretched (stretch),
    the box fitted between black bands (pad) or the box's centred square (crop).
    """
    height, width = frame[:2]
    # A canvas wide enough for a box that lies past the frame (the margin), cut back at the end.
    left_pad, top_pad = max(0, -box.x), max(0, -box.y)
    right_pad = max(0, box.x + box.w - width)
    bottom_pad = max(0, box.y + box.h - height)
    out = np.zeros((height + top_pad + bottom_pad, width + left_pad + right_pad), np.float32)
    box = dataclasses.replace(box, x=box.x + left_pad, y=box.y + top_pad)
    values = values.astype(np.float32)
    if mode == "crop" and box.w != box.h:
        side = min(box.w, box.h)
        left, top = box.x + (box.w - side) // 2, box.y + (box.h - side) // 2
        out[top : top + side, left : left + side] = cv2.resize(values, (side, side))
    elif mode == "pad" and box.w != box.h:
        side = max(box.w, box.h)
        full = cv2.resize(values, (side, side))
        top, left = (side - box.h) // 2, (side - box.w) // 2
        out[box.y : box.y + box.h, box.x : box.x + box.w] = full[
            top : top + box.h, left : left + box.w
        ]
    else:
        out[box.y : box.y + box.h, box.x : box.x + box.w] = cv2.resize(values, (box.w, box.h))
    return np.ascontiguousarray(out[top_pad : top_pad + height, left_pad : left_pad + width])


def prepare(
    data: bytes,
    size: int,
    interpolation: str = "area",
    *,
    mode: str = "stretch",
    window: tuple[float, float] | None = None,
    normalise: Normalise = Normalise(),
) -> np.ndarray:
    """Raw bytes -> uint8 (size, size) grey: the one preprocessing of training and serving.

    `mode` is params `resize.mode`, `normalise` params `resize.crop`/`intensity`/...; `window`
    is params `ingest.window` (level, width), used only for DICOM bytes.
    """
    return prepare_slice(decode(data, window).grey, size, interpolation, mode, normalise).image


@contextmanager
def single_threaded() -> Iterator[None]:
    """OpenCV on one thread while the block runs, restored after.

    Wrap the creation of a process pool with it: forked workers inherit the setting, so N
    processes use N cores instead of N x N threads contending for them. (Changing it inside a
    forked worker instead can deadlock OpenCV's thread pool.)
    """
    previous = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(previous)


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_image_buffers(limit_mb: int = 32) -> bool:
    """Let this process reuse freed image buffers instead of returning them to the kernel.

    glibc hands allocations above its mmap threshold (128 kB at first) to fresh mmaps, and
    shrinks the heap whenever its free top passes the trim threshold; a decoded slice (0.2 to
    several MB) then costs a round of page faults each time. Raising both keeps at most
    `limit_mb` (per threshold) of freed memory for the next image: measured in the resize
    stage, 7x fewer page faults per image. A no-op (False) where the C library is not glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        # The process's own symbol table holds the C library's (no library search needed).
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # a C library without mallopt
        return False
    size = limit_mb * 1024 * 1024
    return bool(mallopt(_M_MMAP_THRESHOLD, size)) and bool(mallopt(_M_TRIM_THRESHOLD, 2 * size))


def release_memory() -> bool:
    """Give freed heap memory back to the kernel now (glibc malloc_trim).

    A decoded image's temporaries come and go inside the heap; without this a long-lived
    process (a gunicorn worker) keeps the largest image's worth of freed pages resident and
    the next large image stacks on top (measured: a batch of sixteen images at the byte budget
    took a worker from 210 to 304 MB peak). The trim costs about 0.1 ms, and the pages it
    hands back are faulted in again by the next image (about 0.4 ms more on a 512 x 512
    slice), so call it after large images only. False where the C library is not glibc.
    """
    trim = _malloc_trim()
    return trim is not None and bool(trim(0))


@functools.cache
def _malloc_trim() -> Any:
    """glibc's malloc_trim, looked up once (a CDLL lookup costs more than the trim of a small
    heap); None where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def _worker_setup(threads_too: bool) -> None:
    if threads_too:
        cv2.setNumThreads(1)
    keep_image_buffers()


@contextmanager
def worker_pool(workers: int) -> Iterator[ProcessPoolExecutor]:
    """A process pool for per-image work: N processes on N cores, each OpenCV single-threaded.

    A caller without TensorFlow (the pipeline's data stages) forks, which starts workers in
    milliseconds; OpenCV is set to one thread before the fork because reconfiguring it inside
    a forked child can deadlock. A caller that has loaded TensorFlow (a test session, a
    notebook) cannot be forked safely, so its workers come from a fork server instead (about a
    second to start) and set OpenCV themselves. Each worker keeps its freed image buffers
    (`keep_image_buffers`).
    """
    if "tensorflow" in sys.modules:
        context = multiprocessing.get_context("forkserver")
        with ProcessPoolExecutor(
            workers, mp_context=context, initializer=_worker_setup, initargs=(True,)
        ) as pool:
            yield pool
    else:
        context = multiprocessing.get_context("fork")
        with (
            single_threaded(),
            ProcessPoolExecutor(
                workers, mp_context=context, initializer=_worker_setup, initargs=(False,)
            ) as pool,
        ):
            yield pool


def encode_png(grey: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", grey)
    if not ok:
        raise ImageError("could not encode PNG")
    return buf.tobytes()


def encode_dicom(grey: np.ndarray, level: float = -600.0, width: float = 1500.0) -> bytes:
    """An 8-bit grey slice as a CT DICOM file in Hounsfield units, the inverse of `decode_dicom`.

    Grey levels are mapped back through the window (level, width) to HU and stored as signed
    16-bit values with RescaleIntercept -1024, uncompressed (Explicit VR Little Endian); signed,
    because the bottom of a lung window lies below -1024 HU. Used to make sample files for trying
    the service: `decode_dicom` with the same window gives the grey slice back.
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    hu = (level - width / 2.0) + grey.astype(np.float32) / 255.0 * width
    stored = np.clip(np.rint(hu + 1024.0), -32768, 32767).astype(np.int16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("slice.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.WindowCenter, ds.WindowWidth = level, width
    ds.PixelData = stored.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
