"""What a client sends, checked before and after decoding.

Three gates, in order: the declared size in the file header (a decompression bomb is refused
before a single pixel is decoded), decoding by content through chestct.imaging, and a few
plain-image checks that turn away what is clearly not a chest CT slice (422 with the reason).
Everything happens on bytes in memory; nothing a client sends is written to disk.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import cv2
import numpy as np

from chestct import imaging

# Formats the predictor accepts, by content (imaging.sniff_format names).
ACCEPTED_FORMATS: tuple[str, ...] = ("png", "jpeg", "bmp", "tiff", "dicom")
# Raw-body Content-Types the predictor accepts (multipart and JSON are handled by the app).
RAW_TYPES: tuple[str, ...] = ("image/png", "image/jpeg", "application/dicom")

MIN_SIDE = 32  # a CT slice is 512 px; below this nothing can be read from it
MAX_ASPECT = 3.0  # slices are roughly square; a 3:1 strip is a banner or a crop
NEAR_BLANK_STD = 4.0  # grey-level std (0..255) of an image with nothing in it
FLAT_TOP2 = 0.80  # share of pixels in the 2 commonest grey levels: flat graphics, text
WHITE_SHARE = 0.50  # share of near-white pixels: CT surroundings are air, i.e. black
COLOUR_SHARE = 0.05  # share of pixels whose channels differ by more than COLOUR_SPREAD
COLOUR_SPREAD = 40


class InputError(ValueError):
    """A client input the predictor refuses; `status` is the HTTP status to answer."""

    def __init__(self, status: int, title: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail


class NotCTSlice(InputError):
    """Decoded fine, but clearly not a chest CT slice (422)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(422, "Not a chest CT slice", detail)
        self.reason = reason


def _png_size(data: bytes) -> tuple[int, int] | None:
    # IHDR is always the first chunk: length(4) "IHDR"(4) width(4) height(4).
    if len(data) < 24 or data[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", data[16:24])


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    frame = imaging.jpeg_frame(data)
    return None if frame is None else (frame[0], frame[1])


def _bmp_size(data: bytes) -> tuple[int, int] | None:
    if len(data) < 26:
        return None
    width, height = struct.unpack("<ii", data[18:26])
    return abs(width), abs(height)


def _tiff_size(data: bytes) -> tuple[int, int] | None:
    """ImageWidth (256) and ImageLength (257) from the first IFD."""
    if len(data) < 8:
        return None
    order = "<" if data[:2] == b"II" else ">"
    (ifd,) = struct.unpack(order + "I", data[4:8])
    if ifd + 2 > len(data):
        return None
    (count,) = struct.unpack(order + "H", data[ifd : ifd + 2])
    found: dict[int, int] = {}
    for i in range(count):
        entry = ifd + 2 + 12 * i
        if entry + 12 > len(data):
            break
        tag, kind = struct.unpack(order + "HH", data[entry : entry + 4])
        if tag in (256, 257):
            fmt = "H" if kind == 3 else "I"
            (found[tag],) = struct.unpack(
                order + fmt, data[entry + 8 : entry + 8 + struct.calcsize(fmt)]
            )
    if 256 in found and 257 in found:
        return found[256], found[257]
    return None


def _dicom_size(data: bytes) -> tuple[int, int] | None:
    """Columns and Rows from the DICOM header, read without touching the pixel data."""
    import io

    import pydicom

    try:
        # force for DICOM without the preamble, which imaging.sniff_format has recognised.
        ds = pydicom.dcmread(
            io.BytesIO(data),
            stop_before_pixels=True,
            force=not imaging.has_dicom_preamble(data),
        )
        return int(ds.Columns), int(ds.Rows)
    except Exception:  # pydicom raises many types for bad headers; imaging reports them
        return None


_HEADER_READERS = {
    "png": _png_size,
    "jpeg": _jpeg_size,
    "bmp": _bmp_size,
    "tiff": _tiff_size,
    "dicom": _dicom_size,
}


def declared_size(data: bytes, fmt: str) -> tuple[int, int] | None:
    """(width, height) that the file header declares, or None when it cannot be read."""
    reader = _HEADER_READERS.get(fmt)
    if reader is None:
        return None
    try:
        return reader(data)
    except struct.error:
        return None


def check_format(data: bytes) -> str:
    """The format by content, refusing what the predictor does not take.

    Raises:
        InputError: 400 for empty or unrecognisable bytes, 415 for a known but unsupported
            image format (GIF, WebP).
    """
    if not data:
        raise InputError(400, "Empty upload", "the image is empty; send the file's bytes")
    fmt = imaging.sniff_format(data)
    if fmt == "unknown":
        raise InputError(
            400,
            "Undecodable image",
            "the bytes are not a PNG, JPEG, BMP, TIFF or DICOM file (checked by content); "
            "send the slice as one of those",
        )
    if fmt not in ACCEPTED_FORMATS:
        raise InputError(
            415,
            "Unsupported image format",
            f"{fmt.upper()} is not supported; convert the slice to PNG, JPEG or DICOM",
        )
    return fmt


def check_header(data: bytes, fmt: str, max_pixels: int) -> None:
    """Refuse a decompression bomb from the declared size, before decoding.

    Raises:
        InputError: 413 when width x height exceeds `max_pixels`.
    """
    size = declared_size(data, fmt)
    if size is None:
        return  # the decoder will reject a header it cannot read either
    width, height = size
    if width * height > max_pixels:
        raise InputError(
            413,
            "Image too large",
            f"the {fmt.upper()} header declares {width} x {height} pixels, more than the "
            f"limit of {max_pixels:,} (serving.max_image_pixels); send the slice at its "
            "native size (CT slices are about 512 x 512)",
        )


def decode(data: bytes, window: tuple[float, float]) -> imaging.Decoded:
    """Decode through chestct.imaging, as the pipeline does; DICOM goes through the HU window.

    Args:
        data: the file's bytes.
        window: (level, width) in Hounsfield units, used only for DICOM (the ingest window).

    Raises:
        InputError: 400 when the bytes do not decode.
    """
    try:
        return imaging.decode(data, window)
    except imaging.ImageError as exc:
        raise InputError(400, "Undecodable image", str(exc)) from None


def _colour_share(data: bytes) -> float:
    """Share of clearly coloured pixels, from a reduced decode (cheap for JPEG)."""
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_REDUCED_COLOR_2)
    if img is None or img.ndim != 3:
        return 0.0
    img = img.astype(np.int16)
    spread = img.max(axis=2) - img.min(axis=2)
    return float((spread > COLOUR_SPREAD).mean())


def check_slice(decoded: imaging.Decoded, data: bytes) -> None:
    """Turn away images that are clearly not a chest CT slice.

    These are plain checks on the picture itself (colour, flatness, background); they catch
    photos, blank images and screenshots. Subtler strangers are the job of the feature-space
    out-of-distribution score.

    Raises:
        NotCTSlice: with a machine-readable `reason` and a sentence for people.
    """
    width, height = decoded.width, decoded.height
    if min(width, height) < MIN_SIDE:
        raise NotCTSlice(
            "too_small",
            f"the image is {width} x {height} pixels; a CT slice needs at least "
            f"{MIN_SIDE} px a side (send it at its native size)",
        )
    if max(width, height) / min(width, height) > MAX_ASPECT:
        raise NotCTSlice(
            "aspect_ratio",
            f"the image is {width} x {height} pixels; a CT slice is roughly square",
        )
    if decoded.mode in ("RGB", "RGBA"):
        share = _colour_share(data)
        if share > COLOUR_SHARE:
            raise NotCTSlice(
                "colour",
                f"{share:.0%} of the pixels are coloured; CT slices are greyscale "
                "(this looks like a photo or a colour picture)",
            )
    # Statistics on every n-th pixel (about 256 x 256 of them): exact values, no smoothing,
    # and a quarter of the time on a 512 x 512 slice.
    step = max(1, min(height, width) // 256)
    grey = np.ascontiguousarray(decoded.grey[::step, ::step])
    std = float(cv2.meanStdDev(grey)[1][0, 0])
    if std < NEAR_BLANK_STD:
        raise NotCTSlice(
            "blank",
            f"the image is blank or nearly so (grey-level std {std:.1f}); send a slice "
            "with visible anatomy",
        )
    counts = cv2.calcHist([grey], [0], None, [256], [0, 256]).ravel()
    white = float(counts[235:].sum()) / grey.size
    if white > WHITE_SHARE:
        raise NotCTSlice(
            "white_background",
            f"{white:.0%} of the image is white; CT slices lie on black air "
            "(this looks like a document, chart or screenshot)",
        )
    top2 = float(np.sort(counts)[-2:].sum()) / grey.size
    if top2 > FLAT_TOP2:
        raise NotCTSlice(
            "flat_graphic",
            f"{top2:.0%} of the pixels share two grey levels; CT slices have continuous "
            "tones (this looks like text, a drawing or a screenshot)",
        )


@dataclass(frozen=True)
class Upload:
    """One image to classify: its bytes and a name to report back (never used as a path)."""

    data: bytes
    name: str
