"""Hostile uploads against a real gunicorn: the answer, CPU time and worker peak RSS of each.

The cases are issue 12's six (small files that got past the header checks on main), issue
21's (a JPEG scan stuffed with FF 00, DICOM nested 300 levels deep, RLE runs far past Rows x
Columns, JPEG / JPEG 2000 frames larger than the dataset, PALETTE COLOR, 100,000-deep JSON),
the largest images the decode limits still accept (what a worker must be able to hold), sent
several at once (/predict and /explain: four per worker), a batch of sixteen of them, and the
worst request found by a structured fuzzing run (bench/fuzz.py's per-format strategies, each
request measured the same way). Every request goes to gunicorn
(config/gunicorn.conf.py, 2 workers x 2 threads) on 127.0.0.1 serving an untrained model built
like bench/serve.py's. Before each request the workers' peak RSS is reset
(/proc/<pid>/clear_refs), so "peak RSS" is the high-water mark during that request alone; CPU
is user + system time of both workers during it.

    python bench/hostile.py [--fuzz 200] [--seed 0]

Prints the worst worker peak RSS and the worst CPU per request (per image of a batch; the
workers' CPU over a parallel case divided by its requests) over the whole corpus. Exits 1 when
a case gets a 5xx or no answer, a worker peaks over 250 MB, a request costs more than 0.5 s of
CPU, or a worker was replaced (the server must stay up).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BOUNDARY = "chestctHostileBoundary"
RSS_LIMIT_MB = 250.0
CPU_LIMIT_S = 0.5
MB = 1 << 20


# --------------------------------------------------------------------------- files


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def png_rows(width: int, height: int, depth: int, colour: int, row: bytes) -> bytes:
    """A complete PNG whose every row is `row` (filter byte 0 + samples), deflated as a stream
    so that a huge image never exists in memory here."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    comp = zlib.compressobj(9)
    line = b"\0" + row
    idat = b"".join(comp.compress(line) for _ in range(height)) + comp.flush()
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def png16_rgba(side: int) -> bytes:
    """16-bit RGBA, semi-transparent grey: the issue's 7000 x 7000 PNG at another size."""
    pixel = struct.pack(">HHHH", 30000, 30000, 30000, 40000)
    return png_rows(side, side, 16, 6, pixel * side)


def png_grey_gradient(side: int) -> bytes:
    """An 8-bit grey PNG with a horizontal gradient (compresses well, decodes fully)."""
    row = (np.arange(side) * 255 // max(1, side - 1)).astype(np.uint8).tobytes()
    return png_rows(side, side, 8, 0, row)


def jpeg_with_junk(side: int) -> bytes:
    """A real side x side JPEG with one junk byte before its frame header (libjpeg skips it
    with a warning; a header reader that stops at it sees no size)."""
    import cv2

    grey = np.full((side, side), 90, np.uint8)
    grey[:, : side // 2] = 160
    data = cv2.imencode(".jpg", grey, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
    sof = data.index(b"\xff\xc0")
    return data[:sof] + b"\x00" + data[sof:]


def jpeg_progressive_colour(side: int) -> bytes:
    import cv2

    img = np.zeros((side, side, 3), np.uint8)
    img[..., 0] = 60
    img[..., 1] = (np.arange(side) % 256).astype(np.uint8)[None, :]
    img[..., 2] = 120
    flags = [cv2.IMWRITE_JPEG_QUALITY, 90, cv2.IMWRITE_JPEG_PROGRESSIVE, 1]
    return cv2.imencode(".jpg", img, flags)[1].tobytes()


def tiff_duplicate_size() -> bytes:
    """A deflated 8-bit grey TIFF whose ImageWidth/ImageLength appear twice: 100 x 100, then
    8000 x 8000 (the strip holds 8000 x 8000 zeros)."""
    side = 8000
    comp = zlib.compressobj(9)
    row = bytes(side)
    strip = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    entries = [
        (256, 3, 1, 100),
        (256, 4, 1, side),
        (257, 3, 1, 100),
        (257, 4, 1, side),
        (258, 3, 1, 8),
        (259, 3, 1, 8),  # Adobe deflate
        (262, 3, 1, 1),
        (273, 4, 1, 0),  # patched below: the strip follows the IFD
        (277, 3, 1, 1),
        (278, 4, 1, side),
        (279, 4, 1, len(strip)),
    ]
    ifd_at = 8
    strip_at = ifd_at + 2 + 12 * len(entries) + 4
    out = bytearray(b"II*\x00" + struct.pack("<I", ifd_at) + struct.pack("<H", len(entries)))
    for tag, kind, count, value in entries:
        value = strip_at if tag == 273 else value
        packed = struct.pack("<H", value) + b"\0\0" if kind == 3 else struct.pack("<I", value)
        out += struct.pack("<HHI", tag, kind, count) + packed
    out += b"\0\0\0\0" + strip
    return bytes(out)


def _ct_dataset(rows: int, columns: int, stored: np.ndarray | None = None):
    """A CT dataset (pydicom) of rows x columns signed 16-bit values."""
    from pydicom.dataset import Dataset
    from pydicom.uid import CTImageStorage, generate_uid

    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CTImageStorage, generate_uid(), "CT"
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    if stored is None:
        yy, xx = np.mgrid[:rows, :columns]
        stored = (((xx + yy) % 512) * 3).astype(np.int16)
    ds.PixelData = stored.astype(np.int16).tobytes()
    return ds


def _dataset_bytes(ds) -> bytes:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def _meta(syntax: str) -> bytes:
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import CTImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_file_meta_info(fp, meta, enforce_standard=True)
    return b"\0" * 128 + b"DICM" + fp.getvalue()


def deflated_dicom(chunks: Iterable[bytes]) -> bytes:
    """A DICOM file in the deflated transfer syntax whose dataset is `chunks`, deflated as a
    stream (raw deflate, as PS3.5 A.5 says)."""
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = b"".join(comp.compress(c) for c in chunks) + comp.flush()
    return _meta("1.2.840.10008.1.2.1.99") + body


def dicom_deflate_bomb(size: int = 300 * MB) -> bytes:
    """A 64 x 64 CT slice, then a private OB element of `size` zero bytes, all deflated."""
    head = _dataset_bytes(_ct_dataset(64, 64))
    creator = struct.pack("<HH2sH", 0x7FE1, 0x0010, b"LO", 6) + b"CHESTX"
    element = struct.pack("<HH2sHI", 0x7FE1, 0x1010, b"OB", 0, size)
    zeros = bytes(MB)
    return deflated_dicom([head, creator, element, *([zeros] * (size // MB))])


def dicom_deflate_corrupt() -> bytes:
    good = deflated_dicom([_dataset_bytes(_ct_dataset(128, 128))])
    meta_len = len(_meta("1.2.840.10008.1.2.1.99"))
    data = bytearray(good)
    data[meta_len] = 0xFF  # the first block's type: 11, reserved ("invalid block type")
    return bytes(data)


def dicom_deflated_at_budget(side: int) -> bytes:
    """A side x side 16-bit CT slice, deflated: small on the wire, `side`^2 x 2 bytes inside."""
    return deflated_dicom([_dataset_bytes(_ct_dataset(side, side))])


def dicom_multivalued_slope() -> bytes:
    ds = _ct_dataset(128, 128)
    ds.RescaleSlope = [1, 2]
    return _meta("1.2.840.10008.1.2.1") + _dataset_bytes(ds)


def jpeg_stuffed(megabytes: int = 9) -> bytes:
    """A real 512 x 512 JPEG whose scan carries `megabytes` MB of stuffed FF 00 pairs (issue
    21: a per-byte header walk spent seconds on it)."""
    import cv2

    grey = np.full((512, 512), 90, np.uint8)
    grey[:, :256] = 160
    data = cv2.imencode(".jpg", grey)[1].tobytes()
    eoi = data.rindex(b"\xff\xd9")
    return data[:eoi] + b"\xff\x00" * (megabytes * MB // 2) + data[eoi:]


def dicom_nested(depth: int = 300) -> bytes:
    """A 64 x 64 slice with a ContentSequence nested `depth` levels (undefined lengths)."""
    ds = _ct_dataset(64, 64)
    body = _dataset_bytes(ds)
    pixel = body.rindex(struct.pack("<HH2s", 0x7FE0, 0x0010, b"OW"))
    opening = struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF)
    opening += struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    closing = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    nested = body[:pixel] + opening * depth + closing * depth + body[pixel:]
    return _meta("1.2.840.10008.1.2.1") + nested


def _encapsulated(rows: int, columns: int, frame: bytes, syntax: str) -> bytes:
    """An 8-bit grey dataset of rows x columns whose one frame is `frame`."""
    from pydicom.encaps import encapsulate

    ds = _ct_dataset(rows, columns, np.zeros((rows, columns), np.int16))
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.RescaleIntercept = 0
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return _meta(syntax) + _dataset_bytes(ds)


def dicom_rle_bomb(expanded: int = 200 * MB) -> bytes:
    """64 x 64 RLE whose one segment repeats runs to `expanded` bytes (issue: 0.6-0.7 GB)."""
    frame = struct.pack("<16I", 1, 64, *([0] * 14)) + b"\x81\x40" * (expanded // 128)
    return _encapsulated(64, 64, frame, "1.2.840.10008.1.2.5")


def dicom_codec_frame(ext: str, side: int, syntax: str) -> bytes:
    """A 64 x 64 dataset whose JPEG / JPEG 2000 frame is side x side (issue: 0.3-0.5 GB)."""
    import cv2

    grey = np.tile((np.arange(side) % 251).astype(np.uint8), (side, 1))
    return _encapsulated(64, 64, cv2.imencode(ext, grey)[1].tobytes(), syntax)


def dicom_palette(side: int = 512) -> bytes:
    """A PALETTE COLOR slice (8-bit indices of a CT-like gradient, an inverted grey table)."""
    ds = _ct_dataset(side, side, np.zeros((side, side), np.int16))
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PhotometricInterpretation = "PALETTE COLOR"
    yy, xx = np.mgrid[:side, :side]
    inside = (xx - side / 2) ** 2 + (yy - side / 2) ** 2 < (side * 0.4) ** 2
    ds.PixelData = np.where(inside, (xx + yy) % 200 + 40, 250).astype(np.uint8).tobytes()
    table = (np.arange(256)[::-1] * 257).astype("<u2").tobytes()
    for name in ("Red", "Green", "Blue"):
        setattr(ds, f"{name}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(ds, f"{name}PaletteColorLookupTableData", table)
    return _meta("1.2.840.10008.1.2.1") + _dataset_bytes(ds)


def png16_grey(side: int) -> bytes:
    """A 16-bit grey PNG with a gradient: side^2 x 2 bytes decoded (4096: the byte budget)."""
    row = (np.arange(side) * 65535 // max(1, side - 1)).astype(">u2").tobytes()
    return png_rows(side, side, 16, 0, row)


def deep_json(depth: int = 100_000) -> bytes:
    return b"[" * depth + b"]" * depth


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], list[bytes]]  # one file per part (a raw body: one)
    note: str
    endpoint: str = ""  # default: /predict/batch for batch_*, else /predict
    parallel: int = 1  # the same request sent this many times at once
    raw_type: str = ""  # send the one file as the raw body with this Content-Type

    @property
    def path(self) -> str:
        if self.endpoint:
            return self.endpoint
        return "/predict/batch" if self.name.startswith("batch") else "/predict"


def cases() -> list[Case]:
    """The issue's six, then the largest images the default limits accept, then a full batch."""
    return [
        Case("dicom_deflate_300mb", lambda: [dicom_deflate_bomb()], "issue: 200, 739 MB"),
        Case("tiff_duplicate_8000", lambda: [tiff_duplicate_size()], "issue: 422, 425 MB"),
        Case("png16_rgba_7000", lambda: [png16_rgba(7000)], "issue: 422 after 4.5 s, 1816 MB"),
        Case("jpeg_junk_8000", lambda: [jpeg_with_junk(8000)], "issue: 400 after a decode"),
        Case("dicom_deflate_corrupt", lambda: [dicom_deflate_corrupt()], "issue: 500"),
        Case("dicom_slope_2_values", lambda: [dicom_multivalued_slope()], "issue: 500"),
        Case("png16_rgba_2048", lambda: [png16_rgba(2048)], "at the byte budget"),
        Case("png_grey_4096", lambda: [png_grey_gradient(4096)], "at the pixel cap"),
        Case("jpeg_junk_4096", lambda: [jpeg_with_junk(4096)], "at the pixel cap"),
        Case("jpeg_prog_rgb_2000", lambda: [jpeg_progressive_colour(2000)], "near the budget"),
        Case("dicom_deflated_2800", lambda: [dicom_deflated_at_budget(2800)], "near the budget"),
        Case("batch_16_png16_rgba_2048", lambda: [png16_rgba(2048)] * 16, "16 at the budget"),
        Case("jpeg_ff00_9mb", lambda: [jpeg_stuffed(9)], "issue 21: 3.6-6.6 s CPU"),
        Case("dicom_nested_300", lambda: [dicom_nested(300)], "issue 21: 500"),
        Case("batch_dicom_nested_300", lambda: [dicom_nested(300)] * 2, "issue 21: 500 each"),
        Case("dicom_rle_200mb", lambda: [dicom_rle_bomb()], "issue 21: 0.6-0.7 GB"),
        Case("dicom_rle_200mb_x2", lambda: [dicom_rle_bomb()], "issue 21: 1.2 GB", parallel=2),
        Case(
            "dicom_jpeg_4000_in_64",
            lambda: [dicom_codec_frame(".jpg", 4000, "1.2.840.10008.1.2.4.50")],
            "issue 21: 0.3-0.5 GB",
        ),
        Case(
            "dicom_j2k_4000_in_64",
            lambda: [dicom_codec_frame(".jp2", 4000, "1.2.840.10008.1.2.4.90")],
            "issue 21: 0.3-0.5 GB",
        ),
        Case("dicom_palette_512", lambda: [dicom_palette()], "issue 21: read as grey"),
        Case(
            "predict_json_100000_deep",
            lambda: [deep_json()],
            "nested JSON",
            raw_type="application/json",
        ),
        Case(
            "png16_grey_4096_x8",
            lambda: [png16_grey(4096)],
            "issue 21: 300-350 MB; 4 per worker",
            parallel=8,
        ),
        Case(
            "explain_png_grey_4096_x8",
            lambda: [png_grey_gradient(4096)],
            "issue 21: 330-380 MB; 4 per worker",
            endpoint="/explain",
            parallel=8,
        ),
        Case(
            "explain_png16_grey_4096_x8",
            lambda: [png16_grey(4096)],
            "4 per worker at the byte budget",
            endpoint="/explain",
            parallel=8,
        ),
    ]


def multipart(files: list[bytes], field: str) -> bytes:
    out = bytearray()
    for i, data in enumerate(files):
        out += f"--{BOUNDARY}\r\n".encode()
        out += f'Content-Disposition: form-data; name="{field}"; filename="f{i}"\r\n'.encode()
        out += b"Content-Type: application/octet-stream\r\n\r\n" + data + b"\r\n"
    out += f"--{BOUNDARY}--\r\n".encode()
    return bytes(out)


# --------------------------------------------------------------------------- measuring


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak(pid: int) -> None:
    """Reset the process's peak RSS to its current RSS (Linux >= 4.0)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


@dataclass
class Measured:
    status: int
    title: str
    cpu_s: float
    peak_mb: float
    wire_mb: float
    files: int
    statuses: list[int]  # per file for a batch


def _post(port: int, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": content_type})
        resp = conn.getresponse()
        return resp.status, resp.read()
    except (OSError, http.client.HTTPException) as exc:
        return 0, str(exc).encode()
    finally:
        conn.close()


def measure(
    server, path: str, body: bytes, content_type: str, files: int, parallel: int = 1
) -> Measured:
    """One request (or `parallel` identical ones at once): the answer of the first (the worst
    status of all), the workers' CPU over all of them and the highest worker peak RSS."""
    from serve import cpu_seconds

    pids = server.worker_pids()
    for pid in pids:
        reset_peak(pid)
    cpu = sum(cpu_seconds(pid) for pid in pids)
    answers: list[tuple[int, bytes]] = [(0, b"")] * parallel

    def send(i: int) -> None:
        answers[i] = _post(server.port, path, body, content_type)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(parallel)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    status, payload = answers[0]
    if any(s == 0 or s >= 500 for s, _ in answers):
        status, payload = next((s, p) for s, p in answers if s == 0 or s >= 500)
    time.sleep(0.05)  # let the worker's accounting settle
    cpu = sum(cpu_seconds(pid) for pid in pids) - cpu
    peak = max(peak_rss_mb(pid) for pid in pids)
    title, statuses = "", []
    if payload.startswith(b"\x89PNG"):
        payload = b'{"title": "heat map PNG"}'
    try:
        doc = json.loads(payload)
        title = doc.get("title") or doc.get("label") or ""
        if "results" in doc:
            statuses = [r.get("error", {}).get("status", 200) for r in doc["results"]]
            title = f"{doc['failed']} of {doc['count']} failed"
    except (ValueError, AttributeError):
        title = payload[:60].decode("latin-1")
    return Measured(status, title, cpu, peak, len(body) / MB, files * parallel, statuses)


def header_cpu_ms(files: list[bytes]) -> float:
    """The most CPU (ms, this process) the serving header checks spend on one of `files`:
    format by content, the header read strictly (a JPEG's marker walk, a DICOM's structure
    walk and dataset) and its budget; what a request pays before any pixel is decoded."""
    from chestct.imaging import formats
    from chestct.serving import inputs

    worst = 0.0
    for data in files:
        started = time.process_time()
        with contextlib.suppress(inputs.InputError):
            inputs.check_header(data, inputs.check_format(data), formats.DEFAULT_LIMITS)
        worst = max(worst, (time.process_time() - started) * 1000)
    return worst


def fuzz_worst(server, examples: int, seed_value: int) -> tuple[str, bytes, Measured]:
    """Run the per-format strategies of bench/fuzz.py against the server, one request at a
    time, each measured; returns the request with the highest worker peak RSS."""
    from hypothesis import HealthCheck, given, seed, settings

    from fuzz import format_files

    worst: list[tuple[str, bytes, Measured]] = []

    @seed(seed_value)
    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(format_files())
    def run(drawn: tuple[str, bytes]) -> None:
        fmt, data = drawn
        got = measure(server, "/predict", multipart([data], "file"), _ctype(), 1)
        if got.status == 0 or got.status >= 500:
            print(f"  FUZZ FAIL {fmt}: {got.status} {got.title}")
        if not worst or got.peak_mb > worst[0][2].peak_mb or got.status >= 500:
            worst[:] = [(fmt, data, got)]

    run()
    return worst[0]


def _ctype() -> str:
    return f"multipart/form-data; boundary={BOUNDARY}"


def main() -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from serve import BUILD, PYTHON, Server

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fuzz", type=int, default=200, help="fuzzed files to measure (0: none)")
    ap.add_argument("--seed", type=int, default=0, help="hypothesis seed for the fuzzed files")
    ap.add_argument("--only", nargs="*", help="run only these cases (names as printed)")
    args = ap.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="chestct-bench-hostile-"))
    rows: list[tuple[str, str, Measured]] = []
    headers: list[tuple[float, str]] = []  # (header check CPU ms, case)
    try:
        model_dir = scratch / "model"
        print("building the default untrained model (TensorFlow, ~20 s) ...", flush=True)
        subprocess.run([PYTHON, "-c", BUILD, str(model_dir)], check=True, cwd=REPO)
        server = Server(model_dir, scratch)
        try:
            server.wait_ready()
            before = server.worker_pids()
            wanted = set(args.only or [])
            for case in cases():
                if wanted and case.name not in wanted:
                    continue
                files = case.build()
                if case.raw_type:
                    body, ctype = files[0], case.raw_type
                else:
                    field = "files" if case.path == "/predict/batch" else "file"
                    body, ctype = multipart(files, field), _ctype()
                got = measure(server, case.path, body, ctype, len(files), case.parallel)
                if not case.raw_type:
                    headers.append((header_cpu_ms(files), case.name))
                rows.append((case.name, case.note, got))
                print(f"  {case.name}: {got.status} {got.title}", flush=True)
            if args.fuzz:
                print(f"fuzzing {args.fuzz} files, each measured ...", flush=True)
                fmt, data, got = fuzz_worst(server, args.fuzz, args.seed)
                (scratch / "worst").write_bytes(data)
                rows.append((f"fuzz_worst_{fmt}", f"of {args.fuzz} fuzzed files", got))
            after = server.worker_pids()
            health = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            health.request("GET", "/health")
            alive = health.getresponse().status
            health.close()
            baseline = [round(peak_rss_mb(pid)) for pid in after]
        finally:
            server.stop()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    print(
        f"\ngunicorn 2 workers x 2 threads on 127.0.0.1, default limits "
        f"(serving.max_image_pixels, max_decoded_mb), {time.strftime('%Y-%m-%d')}"
    )
    print("| case | wire MB | answer | CPU s (per request) | worker peak RSS MB | note |")
    print("| --- | --- | --- | --- | --- | --- |")
    bad = []
    for name, note, m in rows:
        per_image = m.cpu_s / m.files
        answer = f"{m.status} {m.title}"
        print(
            f"| {name} | {m.wire_mb:.2f} | {answer} | {m.cpu_s:.2f} ({per_image:.2f}) | "
            f"{m.peak_mb:.0f} | {note} |"
        )
        if m.status == 0 or m.status >= 500 or any(s >= 500 for s in m.statuses):
            bad.append(f"{name}: answer {m.status}")
        if m.peak_mb > RSS_LIMIT_MB:
            bad.append(f"{name}: peak RSS {m.peak_mb:.0f} MB > {RSS_LIMIT_MB:.0f}")
        if per_image > CPU_LIMIT_S:
            bad.append(f"{name}: {per_image:.2f} s CPU per request > {CPU_LIMIT_S}")
    worst_rss = max(rows, key=lambda r: r[2].peak_mb)
    worst_cpu = max(rows, key=lambda r: r[2].cpu_s / r[2].files)
    print(
        f"\nworst worker peak RSS: {worst_rss[2].peak_mb:.0f} MB ({worst_rss[0]}; target "
        f"<= {RSS_LIMIT_MB:.0f}); worst CPU per request: "
        f"{worst_cpu[2].cpu_s / worst_cpu[2].files:.3f} s ({worst_cpu[0]}; "
        f"target <= {CPU_LIMIT_S})"
    )
    # A deflated DICOM dataset must be inflated before its header can be read: that is its
    # decoding (bounded by max_decoded_mb), reported apart from the header walks.
    walks = [h for h in headers if not h[1].startswith("dicom_deflate")]
    inflating = [h for h in headers if h[1].startswith("dicom_deflate")]
    if walks:
        ms, name = max(walks)
        print(f"worst header check CPU per upload: {ms:.1f} ms ({name}; target <= 50)")
        if ms > 50:
            bad.append(f"{name}: header checks {ms:.1f} ms CPU > 50")
    if inflating:
        ms, name = max(inflating)
        print(f"worst deflated-DICOM header check (inflates the dataset): {ms:.1f} ms ({name})")
    print(f"workers replaced: {len(set(before) - set(after))}; /health afterwards: {alive}; "
          f"worker RSS after the run: {baseline} MB")  # fmt: skip
    if set(before) != set(after) or alive != 200:
        bad.append("the server did not stay up")
    for line in bad:
        print("  FAIL", line)
    if bad:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
