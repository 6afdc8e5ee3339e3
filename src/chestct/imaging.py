"""Decoding and preprocessing shared by the pipeline (ingest, resize) and the predictor.

One function, `prepare`, turns raw file bytes into the model's input, so that a slice is seen
the same way in training and in serving. DICOM files are windowed to 8-bit grey by
`decode_dicom` (Hounsfield units through RescaleSlope/Intercept, then a lung window).
"""

from __future__ import annotations

import ctypes
import io
import multiprocessing
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import cv2
import numpy as np

INTERPOLATIONS = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR, "cubic": cv2.INTER_CUBIC}

# How a slice that is not square becomes square (params `resize.mode`).
RESIZE_MODES: tuple[str, ...] = ("stretch", "pad", "crop")

# The default lung window (params `ingest.window`): level -600 HU, width 1500 HU.
LUNG_WINDOW: tuple[float, float] = (-600.0, 1500.0)

# Magic numbers, so the format comes from content, never from a (possibly wrong) extension.
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
)


class ImageError(ValueError):
    """Bytes that are not a decodable image."""


@dataclass(frozen=True)
class Decoded:
    """A decoded slice as 8-bit grey, with what the file itself was."""

    grey: np.ndarray  # uint8, H x W
    format: str  # by content: png, jpeg, ...
    mode: str  # as stored: L, LA, RGB, RGBA, I;16
    width: int
    height: int


def has_dicom_preamble(data: bytes) -> bool:
    """A DICOM Part 10 file: 128 bytes of preamble, then "DICM"."""
    return len(data) > 132 and data[128:132] == b"DICM"


def _headerless_dicom(data: bytes) -> bool:
    """DICOM written without the 128-byte preamble and "DICM" (raw datasets from older
    systems): it opens on a little-endian element of group 0002 (file meta) or 0008
    (identification), followed by an explicit VR (two capital letters) or, implicit, an even
    value length that fits the file."""
    if len(data) < 16 or data[:2] not in (b"\x02\x00", b"\x08\x00"):
        return False
    vr = data[4:6]
    if vr.isalpha() and vr.isupper():
        return True
    length = int.from_bytes(data[4:8], "little")
    return length % 2 == 0 and 0 < length < len(data) - 8


def sniff_format(data: bytes) -> str:
    """Image format from the first bytes ('unknown' when no signature matches)."""
    for magic, name in _SIGNATURES:
        if data.startswith(magic):
            return name
    if has_dicom_preamble(data) or _headerless_dicom(data):
        return "dicom"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "unknown"


def jpeg_frame(data: bytes) -> tuple[int, int, int] | None:
    """Width, height and number of components from a JPEG's frame header (SOF), found by
    walking the segment list; None when the bytes reach the scan, or end, without one."""
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length field
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if pos + 10 > len(data):
                return None
            height = int.from_bytes(data[pos + 5 : pos + 7], "big")
            width = int.from_bytes(data[pos + 7 : pos + 9], "big")
            return width, height, data[pos + 9]
        if marker == 0xDA:  # start of scan before any frame header
            return None
        pos += 2 + length
    return None


def _to_grey(img: np.ndarray) -> tuple[np.ndarray, str]:
    """Any decoded array to 8-bit grey, plus the mode it had."""
    depth16 = img.dtype == np.uint16
    if img.ndim == 2:
        mode = "I;16" if depth16 else "L"
        grey = img
    elif img.shape[2] == 4:
        mode = "RGBA"
        alpha = img[:, :, 3]
        if alpha.min() == np.iinfo(img.dtype).max:
            # Fully opaque (most exports): no blending, and no float copy of a large image.
            grey = cv2.cvtColor(img, cv2.COLOR_BGRA2GRAY)
        else:
            # Transparent pixels become black, the background of a CT slice.
            weight = alpha[:, :, None].astype(np.float32) / (65535.0 if depth16 else 255.0)
            bgr = (img[:, :, :3].astype(np.float32) * weight).astype(img.dtype)
            grey = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    elif img.shape[2] == 3:
        mode = "RGB"
        grey = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    elif img.shape[2] == 2:
        mode = "LA"
        grey = img[:, :, 0]
    else:
        mode = "L"
        grey = img[:, :, 0]
    if grey.dtype != np.uint8:
        grey = (grey.astype(np.float32) / 257.0).round().clip(0, 255).astype(np.uint8)
    return grey, mode


def decode(data: bytes, window: tuple[float, float] | None = None) -> Decoded:
    """Decode image bytes (PNG, JPEG, BMP, TIFF; DICOM when given a window) into 8-bit grey.

    Args:
        data: the file's bytes; the format comes from the content, never from a name.
        window: (level, width) in Hounsfield units for DICOM files; without it a DICOM file
            is refused, because the same bytes would look different under another window.

    Raises:
        ImageError: empty, truncated or non-image bytes, or a DICOM file without a window,
            without pixel data or in a transfer syntax that cannot be decoded here.
    """
    if not data:
        raise ImageError("empty file")
    fmt = sniff_format(data)
    if fmt == "dicom" and window is not None:
        return decode_dicom(data, *window)
    if fmt in ("unknown", "dicom", "gif"):
        hint = (
            "; DICOM needs a window (level, width) to become 8-bit grey"
            if fmt == "dicom"
            else "; use PNG, JPEG, BMP, TIFF or DICOM"
        )
        raise ImageError(f"not a supported image (format by content: {fmt}){hint}")
    buf = np.frombuffer(data, dtype=np.uint8)
    if fmt == "jpeg":
        # JPEG keeps luma apart from colour: decoding straight to grey reads the luma plane and
        # skips the colour planes (half the time on colour JPEGs), and it is the picture's own
        # grey, without the rounding of colour decoding and converting back. EXIF orientation
        # is ignored, as for every other format.
        frame = jpeg_frame(data)
        grey = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE | cv2.IMREAD_IGNORE_ORIENTATION)
        if frame is None or grey is None or grey.size == 0:
            raise ImageError("jpeg data could not be decoded (truncated or corrupt)")
        height, width = grey.shape
        return Decoded(
            grey=grey, format=fmt, mode="L" if frame[2] == 1 else "RGB", width=width, height=height
        )
    img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        raise ImageError(f"{fmt} data could not be decoded (truncated or corrupt)")
    grey, mode = _to_grey(img)
    height, width = grey.shape
    return Decoded(grey=grey, format=fmt, mode=mode, width=width, height=height)


def apply_window(values: np.ndarray, level: float, width: float) -> np.ndarray:
    """Map values (e.g. Hounsfield units) through a window to uint8: level - width/2 is black,
    level + width/2 is white."""
    low = level - width / 2.0
    scaled = (values.astype(np.float32) - np.float32(low)) * np.float32(255.0 / width)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def decode_dicom(data: bytes, level: float, width: float) -> Decoded:
    """A single-frame DICOM slice to 8-bit grey through Hounsfield units and a window.

    Stored values become Hounsfield units through RescaleSlope and RescaleIntercept (1 and 0 when
    absent), then the window (level, width) maps them to 0..255. MONOCHROME1 is inverted so
    that air is dark as in MONOCHROME2; colour DICOM is converted to grey without windowing.

    Raises:
        ImageError: not DICOM, no pixel data, a transfer syntax without an available decoder,
            several frames, or pixel data that cannot be decoded.
    """
    if width <= 0:
        raise ImageError(f"DICOM window width must be > 0, got {width}")
    import pydicom  # imported here: only DICOM sources and uploads pay for it
    from pydicom.errors import InvalidDicomError
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    try:
        # force: a file without the preamble is read from its first element (sniff_format
        # has already checked that it opens like a DICOM dataset).
        ds = pydicom.dcmread(io.BytesIO(data), force=not has_dicom_preamble(data))
    except (InvalidDicomError, EOFError, ValueError, TypeError, KeyError, OSError) as exc:
        raise ImageError(f"not a readable DICOM file ({exc})") from None
    if "TransferSyntaxUID" not in ds.file_meta:
        # A raw dataset has no file meta; its encoding, as read, names the transfer syntax.
        implicit, little = ds.original_encoding
        if not little:
            raise ImageError("big-endian DICOM without file meta is not supported; convert it")
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
        )
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        kind = getattr(ds, "Modality", "") or str(getattr(ds, "SOPClassUID", "")) or "unknown"
        raise ImageError(
            f"DICOM file has no pixel data (modality/class: {kind}): a report, a presentation "
            "state or a truncated file, not an image; leave it out"
        )
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ImageError(
            f"DICOM file holds {frames} frames; chestct reads 2D slices: export one file per slice"
        )
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for codecs; all mean the same here
        if syntax is not None and syntax.is_compressed and not _decoder_available(syntax):
            raise ImageError(
                f"DICOM transfer syntax {syntax.name} ({syntax}) is not supported here (no "
                "decoder installed); decompress the file first, e.g. `gdcmconv --raw in.dcm "
                "out.dcm`"
            ) from None
        raise ImageError(f"DICOM pixel data could not be decoded ({exc})") from None
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if pixels.ndim == 3 and photometric not in ("MONOCHROME1", "MONOCHROME2"):
        rgb = pixels.astype(np.uint8) if pixels.dtype != np.uint8 else pixels
        if photometric.startswith("YBR"):
            from pydicom.pixels import convert_color_space

            rgb = convert_color_space(rgb, photometric, "RGB")
        grey = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
        mode = "RGB"
    elif pixels.ndim == 2:
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        hounsfield = pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)
        grey = apply_window(hounsfield, level, width)
        if photometric == "MONOCHROME1":
            grey = 255 - grey
        mode = "L" if int(getattr(ds, "BitsAllocated", 16)) <= 8 else "I;16"
    else:
        raise ImageError(
            f"DICOM pixel data has shape {pixels.shape} and photometric interpretation "
            f"{photometric}; chestct reads single grey or colour slices"
        )
    height, width_px = grey.shape
    return Decoded(grey=grey, format="dicom", mode=mode, width=width_px, height=height)


def _decoder_available(syntax: object) -> bool:
    try:
        from pydicom.pixels import get_decoder

        return bool(get_decoder(syntax).is_available)
    except (NotImplementedError, ValueError, KeyError):
        return False


def resize(
    grey: np.ndarray, size: int, interpolation: str = "area", mode: str = "stretch"
) -> np.ndarray:
    """A grey slice to size x size.

    Args:
        grey: uint8 H x W.
        size: side of the square output.
        interpolation: area | linear | cubic.
        mode: stretch (scale each axis on its own; shape distorts), pad (scale the longer side
            to `size`, centre on black; anatomy keeps its proportions but the bands show the
            aspect ratio), crop (cut the centred square, then scale; loses the sides).
    """
    flag = INTERPOLATIONS[interpolation]
    height, width = grey.shape[:2]
    if mode == "stretch" or height == width:
        return cv2.resize(grey, (size, size), interpolation=flag)
    if mode == "crop":
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        return cv2.resize(
            grey[top : top + side, left : left + side], (size, size), interpolation=flag
        )
    if mode == "pad":
        scale = size / max(height, width)
        new_w = max(1, round(width * scale))
        new_h = max(1, round(height * scale))
        small = cv2.resize(grey, (new_w, new_h), interpolation=flag)
        top, left = (size - new_h) // 2, (size - new_w) // 2
        return cv2.copyMakeBorder(
            small, top, size - new_h - top, left, size - new_w - left, cv2.BORDER_CONSTANT, value=0
        )
    raise ValueError(f"resize mode {mode!r} is not one of {', '.join(RESIZE_MODES)}")


def prepare(
    data: bytes,
    size: int,
    interpolation: str = "area",
    *,
    mode: str = "stretch",
    window: tuple[float, float] | None = None,
) -> np.ndarray:
    """Raw bytes -> uint8 (size, size) grey: the one preprocessing of training and serving.

    `mode` is params `resize.mode`; `window` is params `ingest.window` (level, width), used only
    for DICOM bytes.
    """
    return resize(decode(data, window).grey, size, interpolation, mode)


@contextmanager
def single_threaded() -> Iterator[None]:
    """OpenCV on one thread while the block runs, restored after.

    Wrap the creation of a process pool with it: forked workers inherit the setting, so N
    processes use N cores instead of N x N threads contending for them. (Changing it inside a
    forked worker instead can deadlock OpenCV's thread pool.)
    """
    previous = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(previous)


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_image_buffers(limit_mb: int = 32) -> bool:
    """Let this process reuse freed image buffers instead of returning them to the kernel.

    glibc hands allocations above its mmap threshold (128 kB at first) to fresh mmaps, and
    shrinks the heap whenever its free top passes the trim threshold; a decoded slice (0.2 to
    several MB) then costs a round of page faults each time. Raising both keeps at most
    `limit_mb` (per threshold) of freed memory for the next image: measured in the resize
    stage, 7x fewer page faults per image. A no-op (False) where the C library is not glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        # The process's own symbol table holds the C library's (no library search needed).
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # a C library without mallopt
        return False
    size = limit_mb * 1024 * 1024
    return bool(mallopt(_M_MMAP_THRESHOLD, size)) and bool(mallopt(_M_TRIM_THRESHOLD, 2 * size))


def _worker_setup(threads_too: bool) -> None:
    if threads_too:
        cv2.setNumThreads(1)
    keep_image_buffers()


@contextmanager
def worker_pool(workers: int) -> Iterator[ProcessPoolExecutor]:
    """A process pool for per-image work: N processes on N cores, each OpenCV single-threaded.

    A caller without TensorFlow (the pipeline's data stages) forks, which starts workers in
    milliseconds; OpenCV is set to one thread before the fork because reconfiguring it inside
    a forked child can deadlock. A caller that has loaded TensorFlow (a test session, a
    notebook) cannot be forked safely, so its workers come from a fork server instead (about a
    second to start) and set OpenCV themselves. Each worker keeps its freed image buffers
    (`keep_image_buffers`).
    """
    if "tensorflow" in sys.modules:
        context = multiprocessing.get_context("forkserver")
        with ProcessPoolExecutor(
            workers, mp_context=context, initializer=_worker_setup, initargs=(True,)
        ) as pool:
            yield pool
    else:
        context = multiprocessing.get_context("fork")
        with (
            single_threaded(),
            ProcessPoolExecutor(
                workers, mp_context=context, initializer=_worker_setup, initargs=(False,)
            ) as pool,
        ):
            yield pool


def encode_png(grey: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", grey)
    if not ok:
        raise ImageError("could not encode PNG")
    return buf.tobytes()


def encode_dicom(grey: np.ndarray, level: float = -600.0, width: float = 1500.0) -> bytes:
    """An 8-bit grey slice as a CT DICOM file in Hounsfield units, the inverse of `decode_dicom`.

    Grey levels are mapped back through the window (level, width) to HU and stored as signed
    16-bit values with RescaleIntercept -1024, uncompressed (Explicit VR Little Endian); signed,
    because the bottom of a lung window lies below -1024 HU. Used to make sample files for trying
    the service: `decode_dicom` with the same window gives the grey slice back.
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    hu = (level - width / 2.0) + grey.astype(np.float32) / 255.0 * width
    stored = np.clip(np.rint(hu + 1024.0), -32768, 32767).astype(np.int16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("slice.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.WindowCenter, ds.WindowWidth = level, width
    ds.PixelData = stored.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
