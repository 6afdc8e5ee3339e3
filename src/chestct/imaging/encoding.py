"""Grey slices back to files: PNG, and DICOM in Hounsfield units (samples, tests)."""

from __future__ import annotations

import io

import cv2
import numpy as np

from chestct.imaging.formats import ImageError


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
