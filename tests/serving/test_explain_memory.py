"""Issue 21 item 3: /explain on the largest allowed upload maps the heat map at the output's
size (at most 512 px a side), never as a float32 map of the full frame.

Peak RSS of this process over one request is compared with what the upload itself must cost
(its decoded grey, 16 MB at 4096 x 4096); bench/hostile.py measures workers under gunicorn.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from chestct.serving import create_app
from model_folder import ct_slice

SIDE = 4096
# The decoded grey (16 MB) and its PNG and multipart copies, the prepared input and the
# 512-px overlay stay well under this; a float32 full-frame map alone is 64 MB.
GROWTH_LIMIT_MB = 56.0


def _field(name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise AssertionError(name)


def test_explain_on_the_largest_upload_stays_small(model_dir: Path) -> None:
    app = create_app({"MODEL_DIR": str(model_dir), "MC_DROPOUT_SAMPLES": 0})
    client = app.test_client()
    big = cv2.resize(ct_slice(5, size=512), (SIDE, SIDE), interpolation=cv2.INTER_NEAREST)
    png = cv2.imencode(".png", big)[1].tobytes()
    warm = cv2.imencode(".png", ct_slice(5, size=512))[1].tobytes()
    assert client.post("/explain", data=warm, content_type="image/png").status_code == 200
    Path("/proc/self/clear_refs").write_text("5")
    before = _field("VmRSS")
    resp = client.post("/explain", data=png, content_type="image/png")
    growth = (_field("VmHWM") - before) / 1024
    print(f"/explain {SIDE} x {SIDE}: peak RSS grew {growth:.1f} MB")
    assert resp.status_code == 200, resp.get_data(as_text=True)[:300]
    overlay = cv2.imdecode(np.frombuffer(resp.data, np.uint8), cv2.IMREAD_COLOR)
    assert overlay.shape == (512, 512, 3)
    assert growth < GROWTH_LIMIT_MB, f"/explain on {SIDE} x {SIDE} grew peak RSS {growth:.0f} MB"


def png16_grey(side: int) -> bytes:
    """A 16-bit grey slice at the byte budget: side^2 x 2 bytes decoded (32 MB at 4096)."""
    grey = cv2.resize(ct_slice(6, size=512), (side, side), interpolation=cv2.INTER_NEAREST)
    return cv2.imencode(".png", grey.astype(np.uint16) * 257)[1].tobytes()


# Four at once, each decoded into 48 MB (the 16-bit image and its grey): one at a time stays
# under this (measured 106 MB with the request bodies and heap), four together (232 MB) do not.
PARALLEL_GROWTH_LIMIT_MB = 150.0


def test_four_largest_images_at_once_are_decoded_one_at_a_time(model_dir: Path) -> None:
    import threading

    app = create_app({"MODEL_DIR": str(model_dir), "MC_DROPOUT_SAMPLES": 0})
    png = png16_grey(SIDE)
    warm = app.test_client().post("/predict", data=png, content_type="image/png")
    assert warm.status_code == 200, warm.get_data(as_text=True)[:300]
    statuses: list[int] = []
    start = threading.Barrier(4)

    def send(path: str) -> None:
        client = app.test_client()
        start.wait()
        statuses.append(client.post(path, data=png, content_type="image/png").status_code)

    Path("/proc/self/clear_refs").write_text("5")
    before = _field("VmRSS")
    threads = [
        threading.Thread(target=send, args=(path,))
        for path in ("/predict", "/predict", "/explain", "/explain")
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    growth = (_field("VmHWM") - before) / 1024
    print(f"4 x {SIDE} x {SIDE} 16-bit at once: peak RSS grew {growth:.1f} MB")
    assert statuses == [200] * 4
    assert growth < PARALLEL_GROWTH_LIMIT_MB, growth
