"""Image headers read without decoding: PNG, JPEG (its marker walk in `jpeg`), BMP and TIFF.

Each parser gives a `Header` (size, mode, frames) that `formats.check_budget` holds against
the decode budget, so a decompression bomb is refused before any pixel is made.
"""

from __future__ import annotations

import struct

from chestct.imaging.dicom import dicom_header
from chestct.imaging.formats import Header, ImageError, sniff_format
from chestct.imaging.jpeg import JpegInfo, jpeg_info


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
