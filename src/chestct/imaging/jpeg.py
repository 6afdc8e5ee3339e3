"""The JPEG marker walk, shared by the upload header check (`headers`) and the DICOM JPEG frame
check (`dicom_pixels`): markers found by numpy, never one Python step per byte.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from chestct.imaging.formats import MAX_JPEG_SCANS, ImageError, ImageTooLarge


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
