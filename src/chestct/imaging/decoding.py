"""Bytes -> 8-bit grey slice: the one decoder of the pipeline and the service.

`decode` sniffs the format by content, checks the budget from the header, decodes with
OpenCV (DICOM through `chestct.imaging.dicom`) and converts to grey, noting how coloured the
file was.
"""

from __future__ import annotations

import cv2
import numpy as np

from chestct.imaging.dicom import decode_dicom
from chestct.imaging.formats import (
    COLOUR_SPREAD,
    DEFAULT_LIMITS,
    STRIP_ROWS,
    Decoded,
    DecodeLimits,
    Header,
    ImageError,
    ImageTooLarge,
    check_budget,
    sniff_format,
)
from chestct.imaging.headers import read_header


def _colour_share(img: np.ndarray) -> float:
    """Share of pixels whose colour channels (BGR first) differ by more than COLOUR_SPREAD."""
    spread_at = COLOUR_SPREAD * (257 if img.dtype == np.uint16 else 1)
    coloured = 0
    for top in range(0, img.shape[0], STRIP_ROWS):
        strip = img[top : top + STRIP_ROWS, :, :3]
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
        for top in range(0, plane.shape[0], STRIP_ROWS):
            grey[top : top + STRIP_ROWS] = _to_8bit(plane[top : top + STRIP_ROWS])
        return grey, mode, None
    channels = img.shape[2]
    mode = "RGBA" if channels == 4 else "RGB"
    opaque = channels == 3 or img[:, :, 3].min() == np.iinfo(img.dtype).max
    grey = np.empty(img.shape[:2], np.uint8)
    for top in range(0, img.shape[0], STRIP_ROWS):
        strip = img[top : top + STRIP_ROWS]
        if opaque:
            plane = cv2.cvtColor(strip[:, :, :3], cv2.COLOR_BGR2GRAY)
        else:
            # Transparent pixels become black, the background of a CT slice.
            weight = strip[:, :, 3:4].astype(np.float32) / (65535.0 if depth16 else 255.0)
            bgr = (strip[:, :, :3].astype(np.float32) * weight).astype(img.dtype)
            plane = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
        grey[top : top + STRIP_ROWS] = _to_8bit(plane) if depth16 else plane
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
