"""DICOM pixel data decoded within the decode budget (chestct.imaging.dicom.decode_dicom).

pydicom's decoders trust what they are given: its RLE decoder expands every run a segment
holds (a 3 MB segment of repeat runs is 200 MB) in a Python loop, and a JPEG or JPEG 2000 frame
is decoded at the size its own codestream declares, whatever Rows x Columns say. So, before any
decoder runs: RLE is decoded here, each segment by libtiff's PackBits decoder (through OpenCV)
into exactly Rows x Columns bytes, never more; a JPEG, JPEG-LS or JPEG 2000 frame's own header
must declare the Rows x Columns x SamplesPerPixel that the budget was checked against.
PALETTE COLOR indices go through their lookup table straight to grey (or are refused, naming
why), without a full-size RGB image in between.
"""

from __future__ import annotations

import itertools
import struct
from typing import Any

import cv2
import numpy as np

from chestct.imaging.jpeg import NOT_MARKER, next_marker

RLE_LOSSLESS = "1.2.840.10008.1.2.5"
# Start-of-frame markers of JPEG (SOF0-SOF15 without DHT, JPG, DAC) and JPEG-LS (SOF55).
_JPEG_FRAMES = (frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}) | {0xF7}
_J2K_SIZ = b"\xff\x4f\xff\x51"  # a JPEG 2000 codestream: SOC, then the SIZ marker
MAX_JPEG_FILL = 16  # fill FFs allowed before a marker of a DICOM JPEG frame


class PixelDataError(ValueError):
    """Pixel data that cannot be decoded within what its header declares (a 400)."""


def first_frame(ds: Any) -> bytes:
    """The bytes of the (single) frame of encapsulated pixel data."""
    from pydicom.encaps import generate_frames

    try:
        return next(generate_frames(ds.PixelData, number_of_frames=1))
    except StopIteration:
        raise PixelDataError("DICOM encapsulated pixel data holds no frame") from None
    except (ValueError, KeyError, struct.error) as exc:
        raise PixelDataError(f"DICOM encapsulated pixel data is malformed ({exc})") from None


def _packbits_tiff(segment: bytes, rows: int, columns: int) -> bytes:
    """A one-strip 8-bit grey TIFF of rows x columns whose strip is `segment`, PackBits
    compressed: DICOM's RLE segment format is TIFF's PackBits (PS3.5 G.3)."""
    entries = (
        (256, 4, columns), (257, 4, rows), (258, 3, 8), (259, 3, 32773), (262, 3, 1),
        (273, 4, 0), (277, 3, 1), (278, 4, rows), (279, 4, len(segment)),
    )  # fmt: skip
    strip_at = 8 + 2 + 12 * len(entries) + 4
    out = bytearray(b"II*\x00" + struct.pack("<IH", 8, len(entries)))
    for tag, kind, value in entries:
        value = strip_at if tag == 273 else value
        packed = struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
        out += struct.pack("<HHI", tag, kind, 1) + packed
    out += b"\0\0\0\0"
    return bytes(out) + segment


def _rle_segment(segment: bytes, rows: int, columns: int) -> np.ndarray:
    """One RLE segment as rows x columns bytes: libtiff stops at the strip's size, so runs
    past it are never expanded; a short segment leaves its missing rows 0."""
    buf = np.frombuffer(_packbits_tiff(segment, rows, columns), np.uint8)
    try:
        plane = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        raise PixelDataError(f"DICOM RLE segment could not be decoded ({exc})") from None
    if plane is None or plane.shape != (rows, columns):
        raise PixelDataError("DICOM RLE segment could not be decoded (corrupt)")
    return plane


def decode_rle(frame: bytes, ds: Any, rows: int, columns: int) -> np.ndarray:
    """An RLE Lossless frame as an array of rows x columns (x samples), in the stored sample
    type, holding no more than Rows x Columns x samples x bytes at any time.

    Raises:
        PixelDataError: a header whose segment count or offsets do not fit the frame.
    """
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    bits = int(ds.get("BitsAllocated", 8) or 8)
    if bits % 8 or bits > 32:
        raise PixelDataError(f"DICOM RLE pixel data of {bits} bits allocated is not supported")
    width = bits // 8
    if len(frame) < 64:
        raise PixelDataError("DICOM RLE frame is shorter than its 64-byte header")
    count, *offsets = struct.unpack("<16I", frame[:64])
    if count != samples * width:
        raise PixelDataError(
            f"DICOM RLE frame holds {count} segments; {samples} sample(s) of {bits} bits "
            f"need {samples * width}"
        )
    offsets = [*offsets[:count], len(frame)]
    if offsets[0] != 64 or any(b <= a for a, b in itertools.pairwise(offsets)):
        raise PixelDataError(f"DICOM RLE segment offsets {offsets[:-1]} do not fit the frame")
    # Each segment is decoded straight into its byte of the output (segments hold the most
    # significant byte first), one at a time: the peak is the output plus one plane.
    out = np.empty((rows, columns, samples), f"<u{width}")
    by_byte = out.view(np.uint8).reshape(rows, columns, samples, width)
    for i in range(count):
        segment = frame[offsets[i] : offsets[i + 1]]
        by_byte[:, :, i // width, width - 1 - i % width] = _rle_segment(segment, rows, columns)
    values = out[:, :, 0] if samples == 1 else out
    stored = int(ds.get("BitsStored", bits) or bits)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    if signed:
        values = values.view(f"<i{width}")
        if 0 < stored < bits:  # sign-extend from the stored bits
            values <<= bits - stored
            values >>= bits - stored
    elif 0 < stored < bits:
        values &= (1 << stored) - 1
    return values


def _jpeg_frame_size(frame: bytes) -> tuple[int, int, int, int]:
    """(width, height, components, precision) from a JPEG or JPEG-LS frame header, walking the
    segments up to the first scan. Bytes between segments are refused (beyond a few fill
    FFs): Pillow, which pydicom may decode with, reads them one Python call per byte (9 MB of
    them cost 1.9 s of CPU)."""
    pos, size = 2, None
    while True:
        code = next_marker(frame, pos, NOT_MARKER)  # vectorised: no loop per stuffed byte
        at = code - 1
        if code < 0 or at + 4 > len(frame):
            raise PixelDataError("DICOM JPEG frame has no scan (SOS) after its frame header")
        if at - pos > MAX_JPEG_FILL or frame[pos:at].strip(b"\xff"):
            raise PixelDataError(
                f"DICOM JPEG frame holds {at - pos:,} bytes between two segments (junk or "
                f"fill before marker FF{frame[code]:02X}); re-encode the frame"
            )
        marker = frame[code]
        length = int.from_bytes(frame[at + 2 : at + 4], "big")
        if marker == 0xDA or marker == 0xD9:
            if size is None:
                raise PixelDataError("DICOM JPEG frame has a scan before its frame header (SOF)")
            return size
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            pos = at + 2
            continue
        if marker in _JPEG_FRAMES and size is None:
            if length < 8 or at + 10 > len(frame):
                raise PixelDataError("DICOM JPEG frame header (SOF) is truncated")
            precision, height, width, components = struct.unpack(">BHHB", frame[at + 4 : at + 10])
            size = (width, height, components, precision)
        if length < 2:
            raise PixelDataError(f"DICOM JPEG segment FF{marker:02X} has length {length}")
        pos = at + 2 + length


def _j2k_frame_size(frame: bytes) -> tuple[int, int, int, int]:
    """(width, height, components, precision) from a JPEG 2000 codestream's SIZ marker."""
    at = frame.find(_J2K_SIZ, 0, 4096)  # a JP2 file's boxes come first: look a little way in
    if at < 0 or at + 4 + 38 + 3 > len(frame):
        raise PixelDataError("DICOM JPEG 2000 frame has no SIZ marker (truncated?)")
    siz = frame[at + 4 :]
    xsiz, ysiz, x0, y0 = struct.unpack(">IIII", siz[4:20])
    (components,) = struct.unpack(">H", siz[36:38])
    precision = (siz[38] & 0x7F) + 1
    return xsiz - x0, ysiz - y0, components, precision


def check_frame(frame: bytes, rows: int, columns: int, samples: int, bits: int) -> None:
    """Refuse a JPEG, JPEG-LS or JPEG 2000 frame whose own header declares another size,
    sample count or a deeper precision than the dataset (whose size the budget was checked
    on): the codec would allocate what the frame says.

    Raises:
        PixelDataError: naming both sizes.
    """
    if frame.startswith(b"\xff\xd8"):
        width, height, components, precision = _jpeg_frame_size(frame)
    elif frame.startswith(b"\xff\x4f") or frame[4:8] == b"jP  ":
        width, height, components, precision = _j2k_frame_size(frame)
    else:
        raise PixelDataError("DICOM compressed frame is neither a JPEG nor a JPEG 2000 codestream")
    if (width, height, components) != (columns, rows, samples) or precision > bits:
        raise PixelDataError(
            f"DICOM compressed frame declares {width} x {height} pixels x {components} "
            f"component(s) of {precision} bits, but the dataset's Columns x Rows x "
            f"SamplesPerPixel is {columns} x {rows} x {samples} of {bits} bits allocated: "
            "refusing to decode a frame its header does not describe"
        )


def palette_to_grey(indices: np.ndarray, ds: Any, spread: int) -> tuple[np.ndarray, float]:
    """PALETTE COLOR indices through their lookup table to 8-bit grey, and the share of
    pixels whose colour has a channel spread above `spread` (of 255).

    The table is applied to every possible index once (at most 65,536 entries), then indexed
    by the image: no RGB image of the slice's size is made.

    Raises:
        PixelDataError: indices that are not 8 or 16-bit unsigned, or a lookup table pydicom
            cannot read (missing, segmented wrongly, or inconsistent with its descriptor).
    """
    from pydicom.pixels import apply_color_lut

    if indices.ndim != 2 or indices.dtype not in (np.uint8, np.uint16):
        raise PixelDataError(
            f"DICOM PALETTE COLOR indices are {indices.dtype} of shape {indices.shape}; "
            "chestct reads one plane of 8 or 16-bit unsigned indices"
        )
    domain = np.arange(np.iinfo(indices.dtype).max + 1, dtype=indices.dtype)
    try:
        rgb = apply_color_lut(domain, ds)
    except Exception as exc:  # pydicom raises several types for a bad table
        raise PixelDataError(
            f"DICOM PALETTE COLOR lookup table cannot be applied ({exc}); convert the slice "
            "to MONOCHROME2 or RGB"
        ) from None
    if rgb.shape != (domain.size, 3):
        raise PixelDataError(f"DICOM PALETTE COLOR lookup table gave shape {rgb.shape}")
    if rgb.dtype != np.uint8:
        top = float(rgb.max()) if rgb.size else 0.0
        scale = 255.0 / 65535.0 if top > 255 else 1.0
        rgb = np.clip(np.rint(rgb.astype(np.float32) * scale), 0, 255).astype(np.uint8)
    table = cv2.cvtColor(rgb[None], cv2.COLOR_RGB2GRAY)[0].reshape(-1)
    coloured = (rgb.max(axis=1).astype(np.int16) - rgb.min(axis=1)) > spread
    counts = np.bincount(indices.reshape(-1), minlength=domain.size)
    share = float(counts[coloured].sum()) / max(1, indices.size)
    return table[indices], share
