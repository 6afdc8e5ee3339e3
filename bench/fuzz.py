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
used by tests/test_fuzz.py through Flask's test client (100 examples), so CI exercises them.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import shutil
import string
import subprocess
import sys
import tempfile
import time
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

    from chestct.imaging import encode_dicom
    from chestct.synthetic import render_slice

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
