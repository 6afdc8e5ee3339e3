"""The bounded walk of a DICOM file's data elements, before pydicom reads a byte.

`walk_dicom` steps over every element, items of sequences included, checking lengths, the
element count and how deep sequences nest, so a hostile file is refused cheaply;
`read_dicom` walks the file meta and the dataset (inflating a deflated one, bounded) and only
then lets pydicom parse it.
"""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

from chestct.imaging.formats import DecodeLimits, ImageError, ImageTooLarge, has_dicom_preamble

# Explicit VRs whose length field is 4 bytes (after 2 reserved ones).
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_UNDEFINED = 0xFFFFFFFF
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
# How deep sequences may nest (a CT slice nests two or three: a referenced image's code, say).
MAX_DICOM_DEPTH = 16
DEFLATED_SYNTAX = "1.2.840.10008.1.2.1.99"


def walk_dicom(data: bytes, pos: int, implicit: bool, limit: int, stop_group: int = 0) -> int:
    """Step over a dataset's elements from `pos` without building any, items of sequences
    included; returns where it stopped (the end, or the first element of a group above
    `stop_group` when one is given).

    Raises:
        ImageError: an element that runs past the end, or sequences nested more than
            MAX_DICOM_DEPTH deep (pydicom reads each level with a few recursive calls).
        ImageTooLarge: more than `limit` elements.
    """
    return _Walk(data, limit).run(pos, implicit, stop_group)


class _Walk:
    """One walk: the elements counted so far and the open sequences and items, innermost
    last: (is a sequence, where it ends; None for an undefined length, closed by its
    delimiter)."""

    def __init__(self, data: bytes, limit: int) -> None:
        self.data, self.end, self.limit, self.count = data, len(data), limit, 0
        self.nesting: list[tuple[bool, int | None]] = []

    def run(self, pos: int, implicit: bool, stop_group: int) -> int:
        data, end, nesting = self.data, self.end, self.nesting
        while pos < end:
            while nesting and nesting[-1][1] is not None and nesting[-1][1] <= pos:
                nesting.pop()
            if pos + 8 > end:
                raise ImageError(f"DICOM data is truncated at byte {pos}")
            group, elem, length = struct.unpack_from("<HHI", data, pos)
            if stop_group and group > stop_group:
                return pos
            self.count += 1
            if self.count > self.limit:
                raise ImageTooLarge(
                    f"DICOM file holds more than {self.limit:,} data elements (a slice has a "
                    "few hundred); refusing to parse it"
                )
            tag = (group << 16) | elem
            if group == 0xFFFE:  # item and delimiters: an item's elements follow
                self.item(elem, length, pos + 8)
                pos += 8
                continue
            pos, vr, length = self.element(pos, implicit, length)
            if length == _UNDEFINED:
                pos = self.undefined(pos, tag, vr)
                continue  # a sequence: its items follow
            if vr == b"SQ" or (implicit and group % 2 == 0 and _is_sequence(tag)):
                self.opened(True, pos + length)
                continue
            if pos + length > end and tag not in _PIXEL_TAGS:
                raise ImageError(
                    f"DICOM element ({group:04X},{elem:04X}) declares {length:,} bytes past "
                    "the end of the file (truncated or forged)"
                )
            pos += length
        return pos

    def element(self, pos: int, implicit: bool, length: int) -> tuple[int, bytes, int]:
        """Where an element's value starts, its VR (b"" when implicit) and its length."""
        if implicit:
            return pos + 8, b"", length
        vr = self.data[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            if pos + 12 > self.end:
                raise ImageError(f"DICOM data is truncated at byte {pos}")
            (length,) = struct.unpack_from("<I", self.data, pos + 8)
            return pos + 12, vr, length
        (length,) = struct.unpack_from("<H", self.data, pos + 6)
        return pos + 8, vr, length

    def item(self, elem: int, length: int, start: int) -> None:
        """An item opens (its elements follow), or an item or sequence delimiter closes."""
        if elem == 0xE000:
            self.opened(False, None if length == _UNDEFINED else start + length)
        elif elem == 0xE00D:
            self.closed(False)
        elif elem == 0xE0DD:
            self.closed(True)

    def undefined(self, pos: int, tag: int, vr: bytes) -> int:
        """Past an element of undefined length: encapsulated pixel data, an implicit-VR
        sequence (stepped over as bytes), or a sequence whose items follow."""
        if tag in _PIXEL_TAGS or vr in (b"OB", b"OW"):
            pos, fragments = _skip_fragments(self.data, pos, self.limit - self.count)
            self.count += fragments
        elif vr == b"UN":  # a sequence in implicit VR: step to its end as bytes
            close = self.data.find(b"\xfe\xff\xdd\xe0\x00\x00\x00\x00", pos)
            if close < 0:
                raise ImageError(f"DICOM sequence at byte {pos} has no end")
            if self.data.count(b"\xfe\xff\x00\xe0", pos, close) > self.limit:
                raise ImageTooLarge(f"DICOM sequence at byte {pos} holds over {self.limit} items")
            self.count += (close - pos) // 8
            pos = close + 8
        else:
            self.opened(True, None)
        return pos

    def opened(self, sequence: bool, closes: int | None) -> None:
        self.nesting.append((sequence, closes))
        depth = sum(is_sequence for is_sequence, _ in self.nesting)
        if depth > MAX_DICOM_DEPTH:
            raise ImageError(
                f"DICOM sequences are nested more than {MAX_DICOM_DEPTH} levels deep (a CT "
                "slice nests a few); refusing to parse it"
            )

    def closed(self, sequence: bool) -> None:
        while self.nesting:
            if self.nesting.pop()[0] == sequence:
                return


def _is_sequence(tag: int) -> bool:
    """A standard tag whose VR is SQ (what an implicit-VR file leaves unsaid)."""
    from pydicom.datadict import dictionary_VR

    try:
        return dictionary_VR(tag) == "SQ"
    except KeyError:
        return False


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


def read_dicom(data: bytes, limits: DecodeLimits) -> Any:
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
        meta_end = walk_dicom(data, start, False, limits.max_dicom_elements, stop_group=2)
    try:
        meta = read_dataset(
            io.BytesIO(data[start:meta_end]), is_implicit_VR=False, is_little_endian=True
        )
        syntax = str(meta.get("TransferSyntaxUID", "") or "")
        if syntax == DEFLATED_SYNTAX:
            body = _inflate(data[meta_end:], limits.max_bytes)
            walk_dicom(body, 0, False, limits.max_dicom_elements)
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
        walk_dicom(data, meta_end, implicit, limits.max_dicom_elements)
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
