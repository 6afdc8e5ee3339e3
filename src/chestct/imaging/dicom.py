"""DICOM: the header and Hounsfield units through a window.

The file is read through chestct.imaging.dicom_walk (a bounded walk of the data elements before
pydicom reads a byte, so a hostile file is refused cheaply); `dicom_header` checks what a slice
must be, and `decode_dicom` windows HU to 8-bit grey (RescaleSlope/Intercept, then a lung
window).
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from chestct.imaging import formats
from chestct.imaging.dicom_walk import read_dicom
from chestct.imaging.formats import Decoded, DecodeLimits, Header, ImageError

# The default lung window (params `ingest.window`): level -600 HU, width 1500 HU.
LUNG_WINDOW: tuple[float, float] = (-600.0, 1500.0)


def apply_window(values: np.ndarray, level: float, width: float) -> np.ndarray:
    """Map values (e.g. Hounsfield units) through a window to uint8: level - width/2 is black,
    level + width/2 is white."""
    low = level - width / 2.0
    scaled = (values.astype(np.float32) - np.float32(low)) * np.float32(255.0 / width)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


# Attributes chestct reads from a dataset: each must hold a short single value.
_DICOM_ATTRIBUTES = (
    "Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "BitsStored", "HighBit",
    "PixelRepresentation", "NumberOfFrames", "PhotometricInterpretation", "RescaleSlope",
    "RescaleIntercept", "PlanarConfiguration", "Modality", "SOPClassUID",
)  # fmt: skip


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


def dicom_header(data: bytes, limits: DecodeLimits = formats.DEFAULT_LIMITS) -> tuple[Header, Any]:
    """The header of a DICOM file and its dataset, read within `limits`.

    Raises:
        ImageError: unreadable, no pixel data, several frames, or a transfer syntax chestct
            does not decode (named).
    """
    ds = read_dicom(data, limits)
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
    limits: DecodeLimits = formats.DEFAULT_LIMITS,
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
    formats.check_budget(header, limits)
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
        from chestct.imaging.dicom_pixels import PixelDataError, palette_to_grey

        try:
            grey, colour = palette_to_grey(pixels, ds, formats.COLOUR_SPREAD)
        except PixelDataError as exc:
            raise ImageError(str(exc)) from None
        mode = "P"
    elif pixels.ndim == 2 and photometric in ("MONOCHROME1", "MONOCHROME2"):
        grey = np.empty(pixels.shape, np.uint8)
        for top in range(0, pixels.shape[0], formats.STRIP_ROWS):
            strip = pixels[top : top + formats.STRIP_ROWS].astype(np.float32)
            grey[top : top + formats.STRIP_ROWS] = apply_window(
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
    chestct.imaging.dicom_pixels): RLE by a decoder that never writes past Rows x Columns,
    JPEG-family
    frames only when their own header declares the dataset's size; then the decoded size is
    checked again.

    Raises:
        ImageError: pixel data that does not decode to the size its header declares.
    """
    from chestct.imaging.dicom_pixels import (
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
