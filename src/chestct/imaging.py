"""Decoding and preprocessing shared by the pipeline (resize) and the predictor.

One function, `prepare`, turns raw file bytes into the model's input, so that a slice is seen
the same way in training and in serving.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

INTERPOLATIONS = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR, "cubic": cv2.INTER_CUBIC}

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


def sniff_format(data: bytes) -> str:
    """Image format from the first bytes ('unknown' when no signature matches)."""
    for magic, name in _SIGNATURES:
        if data.startswith(magic):
            return name
    if len(data) > 132 and data[128:132] == b"DICM":
        return "dicom"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "unknown"


def _to_grey(img: np.ndarray) -> tuple[np.ndarray, str]:
    """Any decoded array to 8-bit grey, plus the mode it had."""
    depth16 = img.dtype == np.uint16
    if img.ndim == 2:
        mode = "I;16" if depth16 else "L"
        grey = img
    elif img.shape[2] == 4:
        mode = "RGBA"
        # Transparent pixels become black, the background of a CT slice.
        alpha = img[:, :, 3:4].astype(np.float32) / (65535.0 if depth16 else 255.0)
        bgr = (img[:, :, :3].astype(np.float32) * alpha).astype(img.dtype)
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


def decode(data: bytes) -> Decoded:
    """Decode image bytes (PNG, JPEG, BMP, TIFF) by content into 8-bit grey.

    Raises:
        ImageError: empty, truncated or non-image bytes.
    """
    if not data:
        raise ImageError("empty file")
    fmt = sniff_format(data)
    if fmt in ("unknown", "dicom", "gif"):
        raise ImageError(
            f"not a supported image (format by content: {fmt}); use PNG, JPEG, BMP or TIFF"
        )
    buf = np.frombuffer(data, dtype=np.uint8)
    img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        raise ImageError(f"{fmt} data could not be decoded (truncated or corrupt)")
    grey, mode = _to_grey(img)
    height, width = grey.shape
    return Decoded(grey=grey, format=fmt, mode=mode, width=width, height=height)


def resize(grey: np.ndarray, size: int, interpolation: str = "area") -> np.ndarray:
    """Stretch a grey slice to size x size."""
    return cv2.resize(grey, (size, size), interpolation=INTERPOLATIONS[interpolation])


def prepare(data: bytes, size: int, interpolation: str = "area") -> np.ndarray:
    """Raw bytes -> uint8 (size, size) grey: the one preprocessing of training and serving."""
    return resize(decode(data).grey, size, interpolation)


def encode_png(grey: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", grey)
    if not ok:
        raise ImageError("could not encode PNG")
    return buf.tobytes()
