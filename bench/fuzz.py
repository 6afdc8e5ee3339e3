"""Property-based fuzzing of the predictor's request surface against real gunicorn.

Hypothesis draws whole HTTP requests: a method, an endpoint (or a random path) with random
query arguments, a Content-Type (real, near-miss or random) and a body (random bytes, a good
PNG/JPEG/DICOM slice mutated by truncation, bit flips and splices, random JSON, JSON with a
base64 image, or a hand-built multipart body with random field names, file names and parts).
Each request goes to gunicorn (config/gunicorn.conf.py, 2 workers) on 127.0.0.1; the statuses
are counted. The property: no answer is a 5xx and no connection fails; every 4xx is
application/problem+json. After the run the service must still answer a good /predict.

    python bench/fuzz.py [--examples 1500] [--seed 0]

Exits 1 when the property fails, printing the offending requests. The strategies are also
used by tests/serving/test_fuzz.py through Flask's test client (100 examples), so CI exercises
them.

`format_files()` draws structured files per format instead (PNG, JPEG, TIFF, BMP, DICOM with
drawn attribute values and transfer syntaxes; see "structured files" below):
tests/serving/test_fuzz.py sends them through the app with small decode limits (150 by default,
1500 in the slow tier) and bench/hostile.py measures each against gunicorn.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import shutil
import string
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[1]
# (method, path): the upload endpoints weigh more, as they parse what clients send.
ENDPOINTS = (
    *[("POST", "/predict")] * 4,
    *[("POST", "/predict/batch")] * 3,
    *[("POST", "/explain")] * 2,
    ("GET", "/health"),
    ("GET", "/ready"),
    ("GET", "/metadata"),
    ("GET", "/metrics"),
    ("GET", "/history"),
    ("GET", "/"),
)
METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD")
CONTENT_TYPES = (
    "multipart/form-data",
    "image/png",
    "image/jpeg",
    "application/dicom",
    "application/json",
    "application/octet-stream",
    "text/plain",
    "image/gif",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=",
    "application/json; charset=latin-1",
    "image/png; charset=utf-8",
)
BOUNDARY = "chestctfuzzBoundary7MA4YWxk"


@dataclass(frozen=True)
class Request:
    """One drawn HTTP request."""

    method: str
    path: str
    content_type: str | None
    body: bytes

    def describe(self) -> str:
        head = self.body[:80]
        return (
            f"{self.method} {self.path[:120]} Content-Type={self.content_type!r} "
            f"body={len(self.body)} bytes {head!r}"
        )


def good_images() -> dict[str, bytes]:
    """A synthetic 128 x 128 slice as PNG, JPEG and CT DICOM: the seeds for mutations."""
    import cv2
    import numpy as np

    from chestct.data.synthetic import render_slice
    from chestct.imaging.encoding import encode_dicom

    grey = render_slice("adenocarcinoma", np.random.default_rng(0), size=128)
    png = cv2.imencode(".png", grey)[1].tobytes()
    jpg = cv2.imencode(".jpg", grey)[1].tobytes()
    return {"png": png, "jpeg": jpg, "dicom": encode_dicom(grey)}


@st.composite
def mutated(draw: st.DrawFn, seeds: dict[str, bytes]) -> bytes:
    """A good image with a few damaging edits (or none: good requests belong in the mix)."""
    data = bytearray(seeds[draw(st.sampled_from(sorted(seeds)))])
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(("truncate", "flip", "insert", "zero_header", "splice")))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if op == "truncate":
            del data[at:]
        elif op == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif op == "zero_header":
            data[: min(len(data), 32)] = bytes(min(len(data), 32))
        else:
            other = seeds[draw(st.sampled_from(sorted(seeds)))]
            data[at:] = other[draw(st.integers(0, len(other) - 1)) :]
    return bytes(data)


def json_values() -> st.SearchStrategy:
    scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40)
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner),
        max_leaves=20,
    )


def multipart_body(parts: list[tuple[str, str, bytes]]) -> bytes:
    """A multipart/form-data body with BOUNDARY; names go in raw, as a hostile client sends."""
    out = bytearray()
    for field, filename, data in parts:
        out += f"--{BOUNDARY}\r\n".encode()
        disposition = f'Content-Disposition: form-data; name="{field}"; filename="{filename}"'
        out += disposition.encode("utf-8", "surrogatepass") + b"\r\n"
        out += b"Content-Type: application/octet-stream\r\n\r\n" + data + b"\r\n"
    out += f"--{BOUNDARY}--\r\n".encode()
    return bytes(out)


def names() -> st.SearchStrategy[str]:
    alphabet = st.characters(codec="utf-8", exclude_characters='"\r\n')
    fixed = st.sampled_from(["slice.png", "../../etc/passwd", "..\\..\\boot.ini", "/dev/zero"])
    return fixed | st.text(alphabet, max_size=40)


@st.composite
def requests(draw: st.DrawFn, seeds: dict[str, bytes]) -> Request:
    """Whole requests to the predictor, hostile and benign mixed."""
    method, path = draw(st.sampled_from(ENDPOINTS))
    if draw(st.integers(0, 9)) == 0:
        method = draw(st.sampled_from(METHODS))
    if draw(st.integers(0, 9)) == 0:
        path = "/" + draw(st.text(string.ascii_letters + string.digits + "/._-%~", max_size=40))
    if draw(st.booleans()):
        key = draw(st.sampled_from(["class", "format", "limit", "x"]))
        value = draw(
            st.sampled_from(["json", "normal", "adenocarcinoma", "0", "-1", "1e9", "%00", ""])
            | st.text(string.ascii_letters + string.digits, max_size=12)
        )
        path += f"?{key}={value}"
    image = mutated(seeds)
    kind = draw(st.sampled_from(("raw", "binary", "json", "json_image", "multipart", "empty")))
    content_type: str | None
    if kind == "raw":
        body = draw(image)
        content_type = draw(st.sampled_from(("image/png", "image/jpeg", "application/dicom")))
    elif kind == "binary":
        body = draw(st.binary(max_size=2048))
        content_type = draw(st.sampled_from(CONTENT_TYPES))
    elif kind == "json":
        body = json.dumps(draw(json_values())).encode()
        content_type = "application/json"
    elif kind == "json_image":
        text = base64.b64encode(draw(image)).decode()
        if draw(st.booleans()):
            at = draw(st.integers(0, len(text)))
            text = text[:at] + draw(st.text(max_size=8)) + text[at:]
        body = json.dumps({"image": text}).encode()
        content_type = "application/json"
    elif kind == "multipart":
        fields = st.sampled_from(["file", "files", "image", ""]) | st.text(
            string.ascii_letters, max_size=8
        )
        part = st.tuples(fields, names(), image | st.binary(max_size=512))
        body = multipart_body(draw(st.lists(part, max_size=20)))
        content_type = f"multipart/form-data; boundary={BOUNDARY}"
    else:
        body, content_type = b"", None
    if draw(st.integers(0, 9)) == 0:
        content_type = draw(st.sampled_from(CONTENT_TYPES) | st.none())
    return Request(method, path, content_type, body)


# --------------------------------------------------------------------------- structured files
# Files built field by field, so that the header readers and decoders see plausible headers
# with hostile values (sizes up to 2^31, contradictory tags, odd transfer syntaxes) rather than
# noise that fails at the first byte. Pixel data is a zlib stream of a constant row, so a
# declared 6000 x 6000 image costs this process nothing and the decoder all of it.

SIDES = st.one_of(
    st.integers(1, 600), st.sampled_from([0, 4096, 4097, 6000, 65535, 65536, 2**31 - 1, 2**32 - 1])
)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def _rows(width: int, height: int, row_bytes: int, value: int, limit: int = 48 << 20) -> bytes:
    """A zlib stream of `height` rows of `row_bytes` (each with a filter byte), cut at `limit`
    raw bytes: real data for what a decoder will inflate."""
    comp = zlib.compressobj(1)
    row = b"\0" + bytes([value]) * row_bytes
    out, total = [], 0
    for _ in range(height):
        out.append(comp.compress(row))
        total += len(row)
        if total > limit:
            break
    return b"".join(out) + comp.flush()


@st.composite
def png_files(draw: st.DrawFn) -> bytes:
    if draw(st.integers(0, 3)) == 0:  # a well-formed large image: the decoder will allocate it
        width = height = draw(st.integers(1000, 4000))
        colour, depth = draw(st.sampled_from([(0, 8), (0, 16), (2, 8), (6, 8), (6, 16)]))
        channels = {0: 1, 2: 3, 6: 4}[colour]
        data = _rows(width, height, width * channels * depth // 8, draw(st.integers(0, 255)))
        ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
        return b"\x89PNG\r\n\x1a\n" + b"".join(
            _png_chunk(k, v) for k, v in ((b"IHDR", ihdr), (b"IDAT", data), (b"IEND", b""))
        )
    width, height = draw(SIDES), draw(SIDES)
    colour = draw(st.sampled_from([0, 2, 3, 4, 6, 1, 7]))
    depth = draw(st.sampled_from([8, 16, 1, 2, 4, 3, 32]))
    interlace = draw(st.sampled_from([0, 0, 1, 2]))
    ihdr = struct.pack(">IIBBBBB", width % 2**32, height % 2**32, depth, colour, 0, 0, interlace)
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(colour, 1)
    row_bytes = min(width * channels * max(1, depth // 8), 1 << 20)
    chunks = [_png_chunk(b"IHDR", ihdr)]
    if colour == 3 and draw(st.booleans()):
        chunks.append(_png_chunk(b"PLTE", bytes(range(256)) * 3))
    data = _rows(width, min(height, 70_000), row_bytes, draw(st.integers(0, 255)))
    cut = draw(st.sampled_from([None, None, len(data) // 2, 3]))
    chunks.append(_png_chunk(b"IDAT", data[:cut]))
    if draw(st.booleans()):
        chunks.append(_png_chunk(b"IHDR", ihdr))  # a second header
    chunks.append(_png_chunk(b"IEND", b""))
    return b"\x89PNG\r\n\x1a\n" + b"".join(draw(st.permutations(chunks)) if draw(
        st.integers(0, 9)) == 0 else chunks)  # fmt: skip


@st.composite
def jpeg_files(draw: st.DrawFn, seed_jpeg: bytes) -> bytes:
    """A real JPEG, its frame header patched, junk inserted before markers, segments
    duplicated (a second SOF, many scans)."""
    data = bytearray(seed_jpeg)
    sof = data.index(b"\xff\xc0")
    if draw(st.booleans()):
        data[sof + 5 : sof + 9] = struct.pack(">HH", draw(SIDES) % 65536, draw(SIDES) % 65536)
    if draw(st.booleans()):
        data[sof + 1] = draw(st.sampled_from([0xC1, 0xC2, 0xC3, 0xC5, 0xC9, 0xCA, 0xCF]))
    if draw(st.booleans()):
        data[sof + 9] = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 255]))
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.sampled_from([m for m in range(2, len(data) - 1) if data[m] == 0xFF][:40]))
        data[at:at] = draw(st.binary(min_size=1, max_size=4))
    if draw(st.integers(0, 4)) == 0:
        sos = data.index(b"\xff\xda")
        segment = bytes(data[sof : sof + 2 + int.from_bytes(data[sof + 2 : sof + 4], "big")])
        data[sos:sos] = segment  # a second frame header
    if draw(st.integers(0, 4)) == 0:
        sos = data.index(b"\xff\xda")
        length = int.from_bytes(data[sos + 2 : sos + 4], "big")
        scan = bytes(data[sos : sos + 2 + length]) + b"\x00" * 8
        data[sos:sos] = scan * draw(st.integers(1, 200))
    return bytes(data)


_TIFF_TAGS = [256, 257, 258, 259, 262, 273, 277, 278, 279, 322, 323, 324, 325, 284, 339]


@st.composite
def tiff_files(draw: st.DrawFn) -> bytes:
    """A little- or big-endian TIFF with a drawn first IFD: tags from the ones decoders read,
    with random types (some unknown), counts and values, duplicates, and a deflated strip."""
    order = draw(st.sampled_from(["<", ">"]))
    width, height = draw(SIDES) % 2**32, draw(SIDES) % 2**32
    spp = draw(st.sampled_from([1, 1, 3, 4, 2, 0, 9]))
    strip = zlib.compress(bytes(min(width * spp, 1 << 16)) * min(height, 64))
    base = {
        256: (4, width), 257: (4, height), 258: (3, draw(st.sampled_from([8, 16, 1, 12, 32]))),
        259: (3, draw(st.sampled_from([1, 8, 5, 32773, 7, 99]))), 262: (3, 1),
        273: (4, 0), 277: (3, spp), 278: (4, draw(st.sampled_from([height, 1, 0, 2**32 - 1]))),
        279: (4, len(strip)),
    }  # fmt: skip
    entries = [(tag, kind, 1, value) for tag, (kind, value) in base.items()]
    for _ in range(draw(st.integers(0, 4))):
        entries.append(
            (
                draw(st.sampled_from(_TIFF_TAGS)),
                draw(st.sampled_from([3, 4, 1, 0, 14, 99])),
                draw(st.sampled_from([1, 1, 2, 1000, 2**31])),
                draw(st.integers(0, 2**16)),
            )
        )
    if draw(st.booleans()):
        entries.sort(key=lambda e: e[0])
    ifd = 8
    strip_at = ifd + 2 + 12 * len(entries) + 4
    out = bytearray((b"II*\x00" if order == "<" else b"MM\x00*") + struct.pack(order + "I", ifd))
    out += struct.pack(order + "H", len(entries))
    for tag, kind, count, value in entries:
        value = strip_at if tag == 273 else value
        field = struct.pack(order + ("HH" if kind == 3 else "I"), *(
            (value % 65536, 0) if kind == 3 else (value % 2**32,)))  # fmt: skip
        out += struct.pack(order + "HHI", tag, kind, count) + field
    return bytes(out) + b"\0\0\0\0" + strip


@st.composite
def bmp_files(draw: st.DrawFn) -> bytes:
    dib = draw(st.sampled_from([40, 40, 12, 124, 108, 64, 0, 200]))
    width = draw(st.one_of(SIDES, st.integers(-(2**31), 0)))
    height = draw(st.one_of(SIDES, st.integers(-(2**31), 0)))
    bits = draw(st.sampled_from([24, 8, 32, 1, 4, 16, 0, 64]))
    compression = draw(st.sampled_from([0, 0, 1, 2, 3, 4, 5]))
    pixels = bytes(draw(st.integers(0, 1 << 16)))
    offset = 14 + max(dib, 12)
    head = b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset)
    if dib == 12:
        info = struct.pack("<IHHHH", 12, width % 65536, height % 65536, 1, bits)
    else:
        info = struct.pack(
            "<IiiHHIIiiII", dib, max(-(2**31), min(width, 2**31 - 1)),
            max(-(2**31), min(height, 2**31 - 1)), draw(st.sampled_from([1, 1, 0, 2])), bits,
            compression, len(pixels), 2835, 2835, 0, 0,
        )  # fmt: skip
        info += bytes(max(0, dib - 40))
    return head + info + pixels


TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.70", "1.2.3.4.5.6",
)  # fmt: skip


@st.composite
def dicom_files(draw: st.DrawFn) -> bytes:
    """A CT dataset with drawn attribute values (sizes, bits, samples, photometric, rescale
    with several values, frames) in a drawn transfer syntax, pixel data of a drawn length."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import CTImageStorage

    syntax = draw(st.sampled_from(TRANSFER_SYNTAXES[:3] * 2 + TRANSFER_SYNTAXES))
    rows, columns = draw(SIDES) % 65536, draw(SIDES) % 65536
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CTImageStorage, "1.2.3.4", "CT"
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = draw(st.sampled_from([1, 1, 1, 1, 3, 0, 4]))
    ds.PhotometricInterpretation = draw(
        st.sampled_from(
            ["MONOCHROME2"] * 4 + ["MONOCHROME1", "RGB", "YBR_FULL", "PALETTE COLOR", ""]
        )
    )
    bits = draw(st.sampled_from([16, 16, 16, 8, 1, 12, 32, 0]))
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, max(0, bits - 1)
    ds.PixelRepresentation = draw(st.sampled_from([0, 1, 1, 2]))
    number = st.sampled_from(["1", "-1024", "1", "-1024", "0", "1e308", "NaN", "inf"])
    several = st.lists(number, min_size=2, max_size=3)
    ds.RescaleSlope = draw(st.one_of(number, number, number, several))
    ds.RescaleIntercept = draw(st.one_of(number, number, number, several))
    if draw(st.integers(0, 3)) == 0:
        ds.NumberOfFrames = draw(st.sampled_from(["1", "2", "0", "1000000"]))
    size = rows * columns * max(1, bits // 8) * max(1, ds.SamplesPerPixel)
    length = draw(st.sampled_from([min(size, 1 << 20)] * 3 + [min(size, 1 << 20) // 2, 7, 0]))
    pixels = bytes(length + length % 2)
    compressed = syntax.startswith("1.2.840.10008.1.2.4") or syntax.endswith(".5")
    ds.PixelData = encapsulate([pixels or b"\0\0"]) if compressed else pixels
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, "1.2.3.4"
    meta.TransferSyntaxUID = syntax
    head = DicomBytesIO()
    head.is_little_endian, head.is_implicit_VR = True, False
    write_file_meta_info(head, meta, enforce_standard=True)
    body = DicomBytesIO()
    body.is_little_endian = syntax != "1.2.840.10008.1.2.2"
    body.is_implicit_VR = syntax == "1.2.840.10008.1.2"
    write_dataset(body, ds)
    dataset = body.getvalue()
    if syntax.endswith(".99"):
        comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        dataset = comp.compress(dataset) + comp.flush()
        if draw(st.integers(0, 3)) == 0:
            at = draw(st.integers(0, max(0, len(dataset) - 1)))
            dataset = dataset[:at] + b"\xff\xff\xff" + dataset[at + 3 :]
    preamble = draw(st.sampled_from([b"\0" * 128 + b"DICM", b"\0" * 128 + b"DICM", b""]))
    return preamble + (head.getvalue() if preamble else b"") + dataset


# ---------------------------------------------------------------- structured DICOM (issue 21)
# Nested sequences, transfer syntaxes and pixel-data encodings, each drawn: RLE frames with
# drawn segment counts, offsets and runs (expanding far past Rows x Columns or falling short),
# real JPEG / JPEG 2000 frames of a drawn size against drawn Rows x Columns, PALETTE COLOR with
# drawn lookup-table descriptors and data, deflated datasets.

_SQ_TAGS = ((0x0008, 0x1140), (0x0040, 0xA730), (0x0008, 0x1115), (0x0029, 0x1010))


def _element(tag: tuple[int, int], vr: bytes, value: bytes, implicit: bool) -> bytes:
    if implicit:
        return struct.pack("<HHI", *tag, len(value)) + value
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
        return struct.pack("<HH2sHI", *tag, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", *tag, vr, len(value)) + value


@st.composite
def _nesting(draw: st.DrawFn, implicit: bool) -> bytes:
    """Sequences nested a drawn number of levels (past the parser's limit at times), each
    with a defined or undefined length, items with a small element or none."""
    depth = draw(st.sampled_from([0, 0, 1, 2, 3, 8, 16, 17, 40, 300, 3000]))
    # pydicom parses undefined-length sequences as it reads, defined-length ones only when
    # used: a whole chain of undefined lengths is what reaches its recursion.
    lengths = draw(st.sampled_from(["undefined", "undefined", "defined", "mixed"]))
    # Drawn once, not per level: thousands of draws would overrun hypothesis's buffer.
    tag = draw(st.sampled_from(_SQ_TAGS))
    code = _element((0x0008, 0x0100), b"SH", b"CODE01", implicit) if draw(st.booleans()) else b""
    inner = b""
    for level in range(depth):
        item_body = inner + code
        undefined = lengths == "undefined" or (lengths == "mixed" and level % 3 != 0)
        if not undefined:
            item = struct.pack("<HHI", 0xFFFE, 0xE000, len(item_body)) + item_body
        else:
            item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + item_body
            item += struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
        if undefined:
            head = (
                struct.pack("<HHI", *tag, 0xFFFFFFFF)
                if implicit
                else struct.pack("<HH2sHI", *tag, b"SQ", 0, 0xFFFFFFFF)
            )
            inner = head + item + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
        else:
            inner = _element(tag, b"SQ", item, implicit)
    return inner


@st.composite
def _rle_frame(draw: st.DrawFn, rows: int, columns: int, segments: int) -> bytes:
    count = draw(st.sampled_from([segments, segments, segments, segments + 1, 0, 16]))
    parts = []
    for _ in range(max(0, min(count, 15))):
        kind = draw(st.sampled_from(["exact", "exact", "expand", "short", "random"]))
        need = rows * columns
        if kind == "exact":
            body = b"".join(b"\x81\x20" for _ in range(need // 128)) + (
                bytes([need % 128 - 1]) + b"\x30" * (need % 128) if need % 128 else b""
            )
        elif kind == "expand":
            # Up to 80 MB of runs from 1.25 MB of segment.
            body = b"\x81\x40" * draw(st.sampled_from([1, 40_000, 640_000]))
        elif kind == "short":
            body = b"\x05" + b"\x01" * 6
        else:
            body = draw(st.binary(max_size=512))
        parts.append(body + b"\0" * (len(body) % 2))
    offsets, at = [], 64
    for part in parts:
        offsets.append(at)
        at += len(part)
    if offsets and draw(st.integers(0, 4)) == 0:
        offsets[-1] = draw(st.sampled_from([0, 63, at + 10, offsets[0]]))
    header = struct.pack("<I", count) + b"".join(struct.pack("<I", o) for o in offsets[:15])
    return header.ljust(64, b"\0") + b"".join(parts)


@st.composite
def _codec_frame(draw: st.DrawFn, ext: str, rows: int, columns: int, samples: int) -> bytes:
    import cv2
    import numpy as np

    side = draw(st.sampled_from([rows, rows, 8, 200, 640, 4000]))
    width = draw(st.sampled_from([columns, columns, side]))
    shape = (max(1, side), max(1, width)) + ((3,) if samples == 3 else ())
    img = (np.indices(shape[:2]).sum(axis=0) % 256).astype(np.uint8)
    if samples == 3:
        img = np.dstack([img] * 3)
    ok, buf = cv2.imencode(ext, img)
    if not ok:  # a size the encoder refuses (a 1-pixel JPEG 2000): a bare codestream start
        return b"\xff\x4f\xff\x51" if ext == ".jp2" else b"\xff\xd8\xff\xd9"
    frame = buf.tobytes()
    if draw(st.integers(0, 3)) == 0:  # corrupt a byte past the header
        at = draw(st.integers(min(len(frame) - 1, 200), len(frame) - 1))
        frame = frame[:at] + bytes([frame[at] ^ 0xFF]) + frame[at + 1 :]
    return frame


@st.composite
def dicom_structured(draw: st.DrawFn) -> bytes:
    """A CT dataset with drawn nesting before its pixel data, in a drawn transfer syntax whose
    pixel data is really encoded that way (or subtly not)."""
    from pydicom.encaps import encapsulate

    syntax = draw(
        st.sampled_from([
            "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.1.99",
            "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.50",
            "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.80",
        ])
    )  # fmt: skip
    implicit = syntax == "1.2.840.10008.1.2"
    rows = draw(st.sampled_from([64, 64, 128, 1, 4096]))
    columns = draw(st.sampled_from([rows, rows, 64, 3]))
    palette = draw(st.integers(0, 4)) == 0
    samples = 1 if palette else draw(st.sampled_from([1, 1, 1, 3]))
    bits = 8 if (palette or samples == 3) else draw(st.sampled_from([16, 16, 8]))
    signed = int(bits == 16 and draw(st.booleans()))
    photometric = "PALETTE COLOR" if palette else ("RGB" if samples == 3 else "MONOCHROME2")
    attrs = [
        ((0x0008, 0x0016), b"UI", b"1.2.840.10008.5.1.4.1.1.2\0"),
        ((0x0008, 0x0018), b"UI", b"1.2.3.4\0"),
        ((0x0008, 0x0060), b"CS", b"CT"),
        ((0x0028, 0x0002), b"US", struct.pack("<H", samples)),
        (
            (0x0028, 0x0004),
            b"CS",
            photometric.encode().ljust(len(photometric) + len(photometric) % 2),
        ),
        ((0x0028, 0x0010), b"US", struct.pack("<H", rows)),
        ((0x0028, 0x0011), b"US", struct.pack("<H", columns)),
        ((0x0028, 0x0100), b"US", struct.pack("<H", bits)),
        ((0x0028, 0x0101), b"US", struct.pack("<H", draw(st.sampled_from([bits, bits, 12])))),
        ((0x0028, 0x0102), b"US", struct.pack("<H", bits - 1)),
        ((0x0028, 0x0103), b"US", struct.pack("<H", signed)),
    ]
    if palette:
        entries = draw(st.sampled_from([256, 256, 0, 4096, 1]))
        lut_bits = draw(st.sampled_from([16, 8, 16]))
        data_len = draw(st.sampled_from([entries * 2, entries * 2, 10, 0]))
        table = (bytes(range(256)) * (data_len // 256 + 1))[:data_len]
        for first in (0x1101, 0x1102, 0x1103):
            descriptor = struct.pack("<HHH", entries % 65536, 0, lut_bits)
            attrs.append(((0x0028, first), b"US", descriptor))
        if draw(st.integers(0, 4)):
            for first in (0x1201, 0x1202, 0x1203):
                attrs.append(((0x0028, first), b"OW", table + b"\0" * (len(table) % 2)))
    plane = rows * columns * samples * (bits // 8)
    if syntax == "1.2.840.10008.1.2.5":
        frame = draw(_rle_frame(rows, columns, samples * bits // 8))
    elif syntax in ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.80"):
        frame = draw(_codec_frame(".jpg", rows, columns, samples))
    elif syntax == "1.2.840.10008.1.2.4.90":
        frame = draw(_codec_frame(".jp2", rows, columns, samples))
    else:
        frame = None
    if frame is None:
        pixels = bytes(min(plane, 1 << 22))
        pixel_element = _element(
            (0x7FE0, 0x0010), b"OW", pixels + b"\0" * (len(pixels) % 2), implicit
        )
    else:
        fragments = encapsulate([frame])
        pixel_element = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF) + fragments
        pixel_element += struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    dataset = b"".join(_element(tag, vr, value, implicit) for tag, vr, value in attrs)
    dataset += draw(_nesting(implicit)) + pixel_element
    if syntax.endswith(".99"):
        comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        dataset = comp.compress(dataset) + comp.flush()
    uid = syntax.encode() + b"\0" * (len(syntax) % 2)
    meta_body = (
        _element((0x0002, 0x0001), b"OB", b"\0\1", False)
        + _element((0x0002, 0x0002), b"UI", b"1.2.840.10008.5.1.4.1.1.2\0", False)
        + _element((0x0002, 0x0003), b"UI", b"1.2.3.4\0", False)
        + _element((0x0002, 0x0010), b"UI", uid, False)
    )
    meta = _element((0x0002, 0x0000), b"UL", struct.pack("<I", len(meta_body)), False) + meta_body
    return b"\0" * 128 + b"DICM" + meta + dataset


def format_files(seeds: dict[str, bytes] | None = None) -> st.SearchStrategy[tuple[str, bytes]]:
    """(format, file) drawn from the per-format strategies."""
    seed_jpeg = (seeds or good_images())["jpeg"]
    return st.one_of(
        png_files().map(lambda d: ("png", d)),
        jpeg_files(seed_jpeg).map(lambda d: ("jpeg", d)),
        tiff_files().map(lambda d: ("tiff", d)),
        bmp_files().map(lambda d: ("bmp", d)),
        dicom_files().map(lambda d: ("dicom", d)),
        dicom_structured().map(lambda d: ("dicom", d)),
    )


@dataclass
class Tally:
    """Statuses seen and the requests that broke the property."""

    statuses: Counter
    failures: list[str]

    def record(self, request: Request, status: int, problem_json: bool, note: str = "") -> None:
        self.statuses[status] += 1
        if status == 0 or status >= 500:
            self.failures.append(f"{status} {note} <- {request.describe()}")
        elif 400 <= status < 500 and request.method != "HEAD" and not problem_json:
            self.failures.append(f"{status} not problem+json <- {request.describe()}")


def send(port: int, request: Request) -> tuple[int, bool, str]:
    """(status, is problem+json, note); status 0 when the connection failed."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": request.content_type} if request.content_type else {}
    try:
        conn.request(request.method, request.path, body=request.body, headers=headers)
        resp = conn.getresponse()
        resp.read()
        ctype = resp.getheader("Content-Type", "")
        return resp.status, ctype.startswith("application/problem+json"), ""
    except (OSError, http.client.HTTPException) as exc:
        return 0, False, f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()


def run(port: int, examples: int, seed_value: int) -> Tally:
    tally = Tally(Counter(), [])
    seeds = good_images()

    @seed(seed_value)
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(requests(seeds))
    def fuzz(request: Request) -> None:
        status, problem_json, note = send(port, request)
        tally.record(request, status, problem_json, note)

    fuzz()
    return tally


def main() -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from serve import BUILD, PYTHON, Server

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--examples", type=int, default=1500, help="requests to draw (>= 1000)")
    ap.add_argument("--seed", type=int, default=0, help="hypothesis seed")
    args = ap.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="chestct-bench-fuzz-"))
    try:
        model_dir = scratch / "model"
        print("building the default untrained model (TensorFlow, ~20 s) ...", flush=True)
        subprocess.run([PYTHON, "-c", BUILD, str(model_dir)], check=True, cwd=REPO)
        server = Server(model_dir, scratch)
        try:
            server.wait_ready()
            workers_before = server.worker_pids()
            started = time.perf_counter()
            tally = run(server.port, args.examples, args.seed)
            elapsed = time.perf_counter() - started
            good = Request("POST", "/predict", "image/png", good_images()["png"])
            after = send(server.port, good)[0]
            workers_after = server.worker_pids()
        finally:
            server.stop()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    total = sum(tally.statuses.values())
    print(
        f"\nfuzzed {total} requests in {elapsed:.1f} s against gunicorn (2 workers), "
        f"seed {args.seed}"
    )
    for status, count in sorted(tally.statuses.items()):
        label = "connection failed" if status == 0 else http.client.responses.get(status, "")
        print(f"  {status:3d} {label:32} {count:6d}")
    five = sum(c for s, c in tally.statuses.items() if s >= 500 or s == 0)
    print(f"5xx or failed connections: {five}")
    print(f"4xx not problem+json: {sum('not problem+json' in f for f in tally.failures)}")
    print(f"good /predict afterwards: {after}")
    print(f"workers replaced during the run: {len(set(workers_before) - set(workers_after))}")
    for failure in tally.failures[:20]:
        print("  FAIL", failure)
    if tally.failures or after != 200:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
