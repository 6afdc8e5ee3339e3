"""Locust load profile for the chestct predictor: the realistic mix of a clinic's viewer.

Per user, weighted: single /predict (PNG and DICOM) 10, /predict/batch of 4 slices 2,
/explain (PNG heatmap) 1, /health 2; 0.1-0.5 s think time. Any answer other than 200 is an
error. The slices are synthetic 512 x 512 CT renders made at start-up (no data needed).

Headless, against a running server (`make serve`, or gunicorn with CHESTCT_WORKERS=2):

    locust -f bench/locustfile.py --headless -u 16 -r 4 -t 2m \\
        --host http://127.0.0.1:8000 --only-summary --csv /tmp/chestct-locust
"""

from __future__ import annotations

import numpy as np
from locust import HttpUser, between, events, task

from chestct.data.synthetic import render_slice
from chestct.imaging.encoding import encode_dicom, encode_png
from chestct.labels import CLASSES

SLICES: list[bytes] = []
DICOMS: list[bytes] = []


@events.init.add_listener
def make_slices(**_: object) -> None:
    """Eight PNG and two DICOM slices, rendered once per Locust process."""
    rng = np.random.default_rng(0)
    for i in range(8):
        SLICES.append(encode_png(render_slice(CLASSES[i % len(CLASSES)], rng, 512)))
    for i in range(2):
        DICOMS.append(encode_dicom(render_slice(CLASSES[i], rng, 512)))


class Viewer(HttpUser):
    """A radiology viewer sending slices as they are opened."""

    wait_time = between(0.1, 0.5)

    def on_start(self) -> None:
        self.turn = 0

    def _next(self) -> bytes:
        self.turn += 1
        return SLICES[self.turn % len(SLICES)]

    @task(8)
    def predict_png(self) -> None:
        self.client.post("/predict", data=self._next(), headers={"Content-Type": "image/png"})

    @task(2)
    def predict_dicom(self) -> None:
        self.client.post(
            "/predict",
            data=DICOMS[self.turn % len(DICOMS)],
            headers={"Content-Type": "application/dicom"},
            name="/predict (dicom)",
        )

    @task(2)
    def predict_batch(self) -> None:
        files = [("files", (f"s{i}.png", self._next(), "image/png")) for i in range(4)]
        self.client.post("/predict/batch", files=files)

    @task(1)
    def explain(self) -> None:
        self.client.post("/explain", files={"file": ("slice.png", self._next(), "image/png")})

    @task(2)
    def health(self) -> None:
        self.client.get("/health")
