"""DICOM: a bounded walk of the data elements, then Hounsfield units through a window.

The walk (`_walk_dicom`) checks lengths, nesting and the pixel tag before pydicom reads a
byte, so a hostile file is refused cheaply; `decode_dicom` windows HU to 8-bit grey
(RescaleSlope/Intercept, then a lung window).
"""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

import cv2
import numpy as np

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
    has_dicom_preamble,
)

# The default lung window (params `ingest.window`): level -600 HU, width 1500 HU.
LUNG_WINDOW: tuple[float, float] = (-600.0, 1500.0)


def apply_window(values: np.ndarray, level: float, width: float) -> np.ndarray:
    """Map values (e.g. Hounsfield units) through a window to uint8: level - width/2 is black,
    level + width/2 is white."""
    low = level - width / 2.0
    scaled = (values.astype(np.float32) - np.float32(low)) * np.float32(255.0 / width)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


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
        from chestct.imaging.dicom_pixels import PixelDataError, palette_to_grey

        try:
            grey, colour = palette_to_grey(pixels, ds, COLOUR_SPREAD)
        except PixelDataError as exc:
            raise ImageError(str(exc)) from None
        mode = "P"
    elif pixels.ndim == 2 and photometric in ("MONOCHROME1", "MONOCHROME2"):
        grey = np.empty(pixels.shape, np.uint8)
        for top in range(0, pixels.shape[0], STRIP_ROWS):
            strip = pixels[top : top + STRIP_ROWS].astype(np.float32)
            grey[top : top + STRIP_ROWS] = apply_window(
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
