"""What a client sends, checked before and after decoding.

Three gates, in order: the file header read strictly and its declared cost checked against the
decode limits (a decompression bomb or a header the decoder would read differently is refused
before a single pixel is decoded), decoding by content through chestct.imaging within the same
limits, and a few plain-image checks that turn away what is clearly not a chest CT slice (422
with the reason).
Everything happens on bytes in memory; nothing a client sends is written to disk.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from chestct.imaging import decoding, dicom, formats, headers

# Formats the predictor accepts, by content (imaging.sniff_format names).
ACCEPTED_FORMATS: tuple[str, ...] = ("png", "jpeg", "bmp", "tiff", "dicom")
# Raw-body Content-Types the predictor accepts (multipart and JSON are handled by the app).
RAW_TYPES: tuple[str, ...] = ("image/png", "image/jpeg", "application/dicom")

MIN_SIDE = 32  # a CT slice is 512 px; below this nothing can be read from it
MAX_ASPECT = 3.0  # slices are roughly square; a 3:1 strip is a banner or a crop
NEAR_BLANK_STD = 4.0  # grey-level std (0..255) of an image with nothing in it
FLAT_TOP2 = 0.80  # share of pixels in the 2 commonest grey levels: flat graphics, text
WHITE_SHARE = 0.50  # share of near-white pixels: CT surroundings are air, i.e. black
COLOUR_SHARE = 0.05  # share of pixels whose channels differ by more than imaging.COLOUR_SPREAD


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


def check_format(data: bytes) -> str:
    """The format by content, refusing what the predictor does not take.

    Raises:
        InputError: 400 for empty or unrecognisable bytes, 415 for a known but unsupported
            image format (GIF, WebP).
    """
    if not data:
        raise InputError(400, "Empty upload", "the image is empty; send the file's bytes")
    fmt = formats.sniff_format(data)
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


def limits(max_pixels: int, max_bytes: int) -> formats.DecodeLimits:
    """The decode limits of serving.max_image_pixels and serving.max_decoded_mb."""
    return formats.DecodeLimits(max_pixels=max_pixels, max_bytes=max_bytes)


def check_header(data: bytes, fmt: str, budget: formats.DecodeLimits) -> formats.Header:
    """Read the header strictly and refuse a decompression bomb, before decoding.

    A DICOM header is the dataset without its pixels, read within the same limits.

    Returns:
        What the header declares (its `nbytes` is what decoding will cost).

    Raises:
        InputError: 413 when the declared size or decoded bytes exceed `budget`, 400 when
            the header cannot be read (the detail names what is wrong).
    """
    try:
        if fmt == "dicom":
            header = dicom.dicom_header(data, budget)[0]
        else:
            header = headers.read_header(data, fmt)
        formats.check_budget(header, budget)
        return header
    except formats.ImageTooLarge as exc:
        raise InputError(413, "Image too large", str(exc)) from None
    except formats.ImageError as exc:
        raise InputError(400, "Undecodable image", str(exc)) from None


def decode(
    data: bytes,
    window: tuple[float, float],
    budget: formats.DecodeLimits = formats.DEFAULT_LIMITS,
    header: formats.Header | None = None,
) -> formats.Decoded:
    """Decode through chestct.imaging, as the pipeline does; DICOM goes through the HU window.

    Args:
        data: the file's bytes.
        window: (level, width) in Hounsfield units, used only for DICOM (the ingest window).
        budget: what one image may cost to decode.
        header: what `check_header` read from these bytes (each file is parsed once).

    Raises:
        InputError: 413 when the image would cost more than `budget`, 400 when the bytes do
            not decode.
    """
    try:
        return decoding.decode(data, window, limits=budget, header=header)
    except formats.ImageTooLarge as exc:
        raise InputError(413, "Image too large", str(exc)) from None
    except formats.ImageError as exc:
        raise InputError(400, "Undecodable image", str(exc)) from None


def check_slice(decoded: formats.Decoded) -> None:
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
    share = decoded.colour_share or 0.0  # measured by the decoder on the colour it had
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
