"""The predictor under gunicorn vs bare in-process inference, measured side by side in one run.

1. bare: in a fresh process without TensorFlow, `chestct.imaging.preparation.prepare` with the
card's
   preprocessing (resize mode, body crop, intensity) + the LiteRT model on the same PNG,
   single-threaded like a worker; median latency, rate (1 / mean) and CPU time per call.
2. gunicorn with config/gunicorn.conf.py, 2 workers, on 127.0.0.1: POST /predict (raw PNG
   body) from one client (median latency), then from 4 concurrent clients (throughput), and
   the resident memory (VmRSS) of each worker after the run.

3. naive: the same model behind a Flask app of the common kind, written here as the baseline:
   the upload saved to disk, read back with Keras's image utilities and `model.predict()` on
   model.keras per request (Flask's threaded server); median latency from one client.

Targets (issue 5): p50 ≤ 1.5 × bare; throughput ≥ 0.8 × 2 × bare rate; RSS ≤ 300 MB a worker;
(issue 7) chestct p50 ≤ 0.2 × the naive app's p50; (issue 14) worker CPU per request under
4 clients ≤ 1.2 × bare. The breakdown of a request's CPU comes from the app's Server-Timing
header on the 1-client series.
Without --model-dir the model is the untrained small CNN of params.yaml (same compute as a
trained one), exported with chestct.model.export and completed as promote does (head, OOD, and
the preprocessing of params.yaml's `resize` group in its card: the default crops to the body).

    python bench/serve.py [--model-dir model] [--requests 300] [--seconds 10] [--rounds 3]
                          [--keras] [--record docs/results/<name>.json]

--keras also measures a worker serving the Keras fallback (TensorFlow in the worker).
--record also writes the table and the 1-client step breakdown as a results file for the docs
(bench/results.py; `python bench/docsgen.py` renders it).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

BUILD = r"""
import sys
from pathlib import Path
import numpy as np
from chestct.model.calibration import Mahalanobis
from chestct.model.export import LightModel, export_light, light_outputs
from chestct.model.gradcam import CamHead
from chestct.imaging.encoding import encode_png
from chestct.imaging.preparation import Preprocessing, prepare
from chestct.labels import CLASSES, DISPLAY_NAMES
from chestct.model.modeling import build_model
from chestct.modelfolder import OOD_FILE, ood_bytes, write_model_folder
from chestct.settings import load_settings
from chestct.data.synthetic import render_slice

folder = Path(sys.argv[1])
s = load_settings()
# The preprocessing params.yaml asks for (body crop, intensity), recorded as promote does.
prep = Preprocessing.from_params(s.params.resize, s.params.base.image_size, s.params.ingest.window)
model = build_model(s.params.base_model, prep.size, s.params.base.seed)
parts = folder.with_name(folder.name + ".parts")  # inside the bench's scratch folder
parts.mkdir(parents=True)
model.save(parts / "model.keras")
inference = export_light(model, parts / "model.tflite")
rng = np.random.default_rng(0)
images = np.stack([prepare(encode_png(render_slice(CLASSES[i % 4], rng, 256)), prep)
                   for i in range(64)]).astype(np.float32)[..., None]
gap = light_outputs(LightModel.load(parts / "model.tflite"), images)["features"].mean(axis=(1, 2))
ood = Mahalanobis.fit(gap)  # the product's fit, as evaluate makes ood.npz
CamHead.from_model(model).save(parts / "cam_head.npz")
card = {
    "name": "chestct-bench", "version": "1", "classes": list(CLASSES),
    "display_names": DISPLAY_NAMES, **prep.to_card(),
    "model_file": "model.keras", "mlflow_run_ids": {"train": None},
    "inference": inference, "temperature": 1.0, "thresholds": {"abstain_entropy": 0.9},
    "cam": {"file": "cam_head.npz"},
    "ood": {"method": "mahalanobis_gap", "file": OOD_FILE,
            "threshold": float(ood.distance(gap).max())},
}
files = {name: parts / name for name in ("model.keras", "model.tflite", "cam_head.npz")}
write_model_folder(folder, card, {**files, OOD_FILE: ood_bytes(ood)})
"""

BARE = r"""
import os
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = "1"  # as config/gunicorn.conf.py sets for each worker
import json, statistics, sys, time
import cv2
cv2.setNumThreads(1)
from pathlib import Path
import numpy as np
from chestct.model.export import LightModel
from chestct.imaging.decoding import decode
from chestct.imaging.preparation import Preprocessing, prepare_slice
folder, image, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
card = json.loads((folder / "model.json").read_text())
light = LightModel.load(folder / card["inference"]["file"], threads=1)
data = image.read_bytes()
prep = Preprocessing.from_card(card)
steps = []
def once():
    # imaging.preparation.prepare's two halves, timed apart like the app's Server-Timing steps.
    a = time.perf_counter()
    grey = decode(data, None).grey
    b = time.perf_counter()
    grey = prepare_slice(grey, prep).image
    c = time.perf_counter()
    light.run(grey.astype(np.float32)[None, :, :, None])
    steps.append((b - a, c - b, time.perf_counter() - c))
for _ in range(20):
    once()
times, steps = [], []
cpu = time.process_time()
for _ in range(n):
    t = time.perf_counter(); once(); times.append(time.perf_counter() - t)
cpu = time.process_time() - cpu
print(json.dumps({"p50_ms": statistics.median(times) * 1e3,
                  "rate": 1.0 / statistics.mean(times),
                  "cpu_ms": cpu / n * 1e3,
                  "steps": {k: statistics.median(s[i] for s in steps) * 1e3
                            for i, k in enumerate(("decode", "prepare", "infer"))},
                  "tf_imported": "tensorflow" in sys.modules}))
"""


NAIVE = r"""
import json, sys
from pathlib import Path
import keras
import numpy as np
from flask import Flask, jsonify, request

folder, port, uploads = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
card = json.loads((folder / "model.json").read_text())
model = keras.models.load_model(folder / card["model_file"])
size = card["image_size"]
app = Flask(__name__)

@app.get("/ready")
def ready():
    return "ok"

@app.post("/predict")
def predict():
    f = request.files["file"]
    path = uploads / f.filename
    f.save(path)
    img = keras.utils.load_img(path, color_mode="grayscale", target_size=(size, size))
    x = keras.utils.img_to_array(img)[None]
    probs = model.predict(x)[0]
    i = int(np.argmax(probs))
    return jsonify(label=card["classes"][i], probabilities=[float(p) for p in probs])

app.run(host="127.0.0.1", port=port, threaded=True)
"""


# The steps of POST /predict as the app's Server-Timing header names them.
STEP_HELP = {
    "receive": "from the view's start: routing, reading the body, the model's freshness check",
    "checks": "format, header budget, not-a-CT-slice checks, sha256 of the body",
    "decode": "PNG/JPEG/DICOM to 8-bit grey (as bare)",
    "prepare": "body crop, resize, intensity (as bare)",
    "infer": "the LiteRT model (as bare)",
    "analyse": "calibration, entropy, MC-dropout, OOD distance, the answer's fields",
    "monitor": "request signals, Prometheus metrics, audit log (when on)",
}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (from /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_image(path: Path) -> None:
    """A 512 x 512 synthetic slice, the native size of the Kaggle set's PNGs."""
    code = (
        "import sys, numpy as np; from chestct.data.synthetic import render_slice; "
        "from chestct.imaging.encoding import encode_png; "
        "open(sys.argv[1], 'wb').write(encode_png(render_slice('adenocarcinoma', "
        "np.random.default_rng(1), 512)))"
    )
    subprocess.run([PYTHON, "-c", code, str(path)], check=True)


class Server:
    """gunicorn with the repo's config, serving `model_dir`, on a free port."""

    def __init__(self, model_dir: Path, scratch: Path, workers: int = 2) -> None:
        root = scratch / f"root-{model_dir.name}"
        (root / "config").mkdir(parents=True)
        shutil.copy(REPO / "params.yaml", root / "params.yaml")
        config = yaml.safe_load((REPO / "config" / "config.yaml").read_text(encoding="utf-8"))
        config["model_dir"] = str(model_dir)  # every other key as the repository sets it
        (root / "config" / "config.yaml").write_text(json.dumps(config))
        self.port = free_port()
        env = {
            **os.environ,
            "CHESTCT_ROOT": str(root),
            "CHESTCT_BIND": f"127.0.0.1:{self.port}",
            "CHESTCT_WORKERS": str(workers),
            "CHESTCT_LOG_LEVEL": "warning",
        }
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.log = (scratch / f"gunicorn-{model_dir.name}.log").open("wb")
        gunicorn = Path(PYTHON).with_name("gunicorn")
        self.proc = subprocess.Popen(
            # No recycling during the run: a restarted worker would lose its CPU account.
            [str(gunicorn), "-c", "config/gunicorn.conf.py", "--max-requests", "0", "app:app"],
            cwd=REPO,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.workers = workers

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"gunicorn exited; see {self.log.name}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/ready")
                ok = conn.getresponse().status == 200
                conn.close()
                if ok and len(self.worker_pids()) == self.workers:
                    return
            except OSError:
                pass
            time.sleep(0.3)
        raise SystemExit("gunicorn did not become ready")

    def worker_pids(self) -> list[int]:
        pid = self.proc.pid
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)
        self.log.close()


def post_loop(
    port: int,
    body: bytes | None,
    stop: threading.Event | None,
    count: int | None,
    path: str = "/predict",
    steps: list[dict[str, float]] | None = None,
) -> list:
    """Requests over one keep-alive connection (POST `body` as a PNG, or GET when there is
    none); returns per-request seconds. With `steps`, each answer's Server-Timing (ms per
    step of the app) is appended to it."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "image/png"} if body is not None else {}
    method = "POST" if body is not None else "GET"
    times: list[float] = []
    while (stop is None or not stop.is_set()) and (count is None or len(times) < count):
        t = time.perf_counter()
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        resp.read()
        if resp.status != 200:
            raise SystemExit(f"{path} answered {resp.status}")
        times.append(time.perf_counter() - t)
        if steps is not None:
            steps.append(server_timing(resp.getheader("Server-Timing", "")))
    conn.close()
    return times


def server_timing(header: str) -> dict[str, float]:
    """{"decode": 1.7, ...} from a Server-Timing header ("decode;dur=1.7, infer;dur=1.8")."""
    steps = {}
    for item in header.split(","):
        name, _, params = item.strip().partition(";")
        if params.startswith("dur="):
            steps[name] = float(params[4:])
    return steps


def bare_run(model_dir: Path, image: Path, requests: int) -> dict:
    """The bare figures from a fresh process that never imports TensorFlow."""
    out = subprocess.run(
        [PYTHON, "-c", BARE, str(model_dir), str(image), str(requests)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.splitlines()[-1])


def load_run(server: Server, body: bytes | None, seconds: float, path: str) -> dict:
    """4 concurrent clients for `seconds`: requests/s, and CPU ms per request spent by the
    workers and by the clients (threads of this process)."""
    stop = threading.Event()
    results: list[list[float]] = [[] for _ in range(4)]

    def client(i: int) -> None:
        results[i] = post_loop(server.port, body, stop, None, path)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    workers = server.worker_pids()
    cpu_before = sum(cpu_seconds(pid) for pid in workers)
    own_before = time.process_time()
    started = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    done = sum(len(r) for r in results)
    cpu = sum(cpu_seconds(pid) for pid in workers) - cpu_before
    return {
        "throughput": done / elapsed,
        "cpu_ms": cpu / done * 1e3,
        "client_cpu_ms": (time.process_time() - own_before) / done * 1e3,
    }


def measure_server(server: Server, body: bytes, requests: int, seconds: float) -> dict:
    post_loop(server.port, body, None, 30)  # warm both connections' paths
    workers = server.worker_pids()
    cpu_before = sum(cpu_seconds(pid) for pid in workers)
    steps: list[dict[str, float]] = []
    single = post_loop(server.port, body, None, requests, steps=steps)
    single_cpu = (sum(cpu_seconds(pid) for pid in workers) - cpu_before) / requests
    loaded = load_run(server, body, seconds, "/predict")
    # The same load on GET /health: what gunicorn and Flask cost per request by themselves.
    floor = load_run(server, None, min(seconds, 3.0), "/health")
    return {
        "p50_ms": statistics.median(single) * 1e3,
        "throughput": loaded["throughput"],
        "cpu_ms": loaded["cpu_ms"],
        "client_cpu_ms": loaded["client_cpu_ms"],
        "http_cpu_ms": floor["cpu_ms"],
        "single_cpu_ms": single_cpu * 1e3,
        # Median ms of each app step over the 1-client series (no contention: wall ~ CPU).
        "steps": {name: statistics.median(s.get(name, 0.0) for s in steps) for name in steps[0]},
        "rss_mb": [round(rss_mb(pid), 1) for pid in server.worker_pids()],
    }


def naive_run(model_dir: Path, image: Path, scratch: Path, requests: int) -> dict:
    """Median /predict latency of the naive Flask baseline, one client, multipart upload."""
    port = free_port()
    uploads = scratch / "naive-uploads"
    uploads.mkdir(exist_ok=True)
    log = (scratch / "naive.log").open("wb")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.Popen(
        [PYTHON, "-c", NAIVE, str(model_dir), str(port), str(uploads)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    boundary = "chestctNaiveBench"
    body = (
        (
            f"--{boundary}\r\n"
            'Content-Disposition: form-data; name="file"; filename="slice.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + image.read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the naive app did not start; see {log.name}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/ready")
                if conn.getresponse().status == 200:
                    conn.close()
                    break
            except OSError:
                time.sleep(0.3)
        times: list[float] = []
        for i in range(requests + 10):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            t = time.perf_counter()
            conn.request("POST", "/predict", body=body, headers=headers)
            resp = conn.getresponse()
            resp.read()
            conn.close()
            if resp.status != 200:
                raise SystemExit(f"the naive /predict answered {resp.status}; see {log.name}")
            if i >= 10:  # the first calls trace the graph
                times.append(time.perf_counter() - t)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()
    return {"p50_ms": statistics.median(times) * 1e3, "p99_ms": _p99(times) * 1e3}


def _p99(times: list[float]) -> float:
    return sorted(times)[min(len(times) - 1, int(0.99 * len(times)))]


def add_run_arguments(ap: argparse.ArgumentParser, seconds: float, rounds: int) -> None:
    """The options bench/serve.py and bench/serve_ab.py share (model, series sizes, rounds)."""
    ap.add_argument("--model-dir", type=Path, help="a promoted model folder (default: build one)")
    ap.add_argument("--requests", type=int, default=300, help="sequential requests per series")
    ap.add_argument("--seconds", type=float, default=seconds, help="each 4-client run")
    ap.add_argument("--rounds", type=int, default=rounds, help="alternating rounds with bare")


def model_folder(model_dir: Path | None, scratch: Path) -> Path:
    """`model_dir`, or the default untrained model built under `scratch` when it is None."""
    if model_dir is None:
        model_dir = scratch / "model"
        print("building the default untrained model (TensorFlow, ~20 s) ...", flush=True)
        subprocess.run([PYTHON, "-c", BUILD, str(model_dir)], check=True, cwd=REPO)
    return model_dir.resolve()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_run_arguments(ap, seconds=10.0, rounds=3)
    ap.add_argument("--keras", action="store_true", help="also measure a TensorFlow worker")
    ap.add_argument("--record", type=Path, help="also write the figures as a docs results file")
    args = ap.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="chestct-bench-serve-"))
    try:
        model_dir = model_folder(args.model_dir, scratch)
        image = scratch / "slice.png"
        make_image(image)
        body = image.read_bytes()

        # Bare and served series alternate over --rounds, so that load from other processes
        # hits both alike; each figure is the median over the rounds.
        bares, serves = [], []
        server = Server(model_dir, scratch)
        try:
            server.wait_ready()
            for _ in range(args.rounds):
                bares.append(bare_run(model_dir, image, args.requests))
                serves.append(measure_server(server, body, args.requests, args.seconds))
        finally:
            server.stop()
        bare = {k: statistics.median(b[k] for b in bares) for k in ("p50_ms", "rate", "cpu_ms")}
        bare["tf_imported"] = any(b["tf_imported"] for b in bares)
        bare["steps"] = {
            k: statistics.median(b["steps"][k] for b in bares)
            for k in ("decode", "prepare", "infer")
        }
        served = {
            k: statistics.median(r[k] for r in serves)
            for k in (
                "p50_ms",
                "throughput",
                "cpu_ms",
                "client_cpu_ms",
                "http_cpu_ms",
                "single_cpu_ms",
            )
        }
        served["steps"] = {
            name: statistics.median(r["steps"][name] for r in serves)
            for name in serves[0]["steps"]
        }
        served["rss_mb"] = serves[-1]["rss_mb"]
        print("measuring the naive Flask baseline (TensorFlow, upload saved to disk) ...")
        naive = naive_run(model_dir, image, scratch, min(args.requests, 100))
        keras = None
        if args.keras:
            keras_dir = scratch / "model-keras"
            shutil.copytree(model_dir, keras_dir)
            card = json.loads((keras_dir / "model.json").read_text())
            card.pop("inference", None)
            (keras_dir / "model.json").write_text(json.dumps(card))
            ks = Server(keras_dir, scratch)
            try:
                ks.wait_ready(timeout=300)
                post_loop(ks.port, body, None, 30)
                keras = [round(rss_mb(pid), 1) for pid in ks.worker_pids()]
            finally:
                ks.stop()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    cores = os.cpu_count()
    print(f"\nchestct predictor, {cores} cores, image {len(body) / 1024:.0f} kB PNG 512x512")
    print(f"bare process imported TensorFlow: {bare['tf_imported']}")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"load average during the run (1, 5, 15 min): {load}; other work skews the ratios")
    rows = [
        (
            "p50 /predict, 1 client (ms)",
            f"{served['p50_ms']:.2f}",
            f"bare {bare['p50_ms']:.2f}",
            served["p50_ms"] / bare["p50_ms"],
            "<= 1.5",
            served["p50_ms"] <= 1.5 * bare["p50_ms"],
        ),
        (
            "throughput, 4 clients (req/s)",
            f"{served['throughput']:.1f}",
            f"2 x bare {2 * bare['rate']:.1f}",
            served["throughput"] / (2 * bare["rate"]),
            ">= 0.8",
            served["throughput"] >= 0.8 * 2 * bare["rate"],
        ),
        (
            "p50 /predict vs naive Flask (ms)",
            f"{served['p50_ms']:.2f}",
            f"naive {naive['p50_ms']:.2f}",
            served["p50_ms"] / naive["p50_ms"],
            "<= 0.2",
            served["p50_ms"] <= 0.2 * naive["p50_ms"],
        ),
        (
            "RSS per worker (MB)",
            " / ".join(f"{r:.0f}" for r in served["rss_mb"]),
            "300",
            max(served["rss_mb"]) / 300,
            "<= 1.0",
            max(served["rss_mb"]) <= 300,
        ),
    ]
    print(f"{'measure':32} {'served':>12} {'reference':>18} {'ratio':>7} {'target':>8}  ok")
    for name, value, ref, ratio, target, ok in rows:
        print(f"{name:32} {value:>12} {ref:>18} {ratio:7.2f} {target:>8}  {'yes' if ok else 'NO'}")
    # CPU time per request does not depend on what else the machine runs: with 2 idle cores
    # the server's throughput is bounded by cores / (worker CPU per request).
    bare_cpu = f"bare {bare['cpu_ms']:.2f}"
    cpu_ok = served["cpu_ms"] <= 1.2 * bare["cpu_ms"]
    print(
        f"{'CPU per request, 4 clients (ms)':32} {served['cpu_ms']:12.2f} {bare_cpu:>18}"
        f" {served['cpu_ms'] / bare['cpu_ms']:7.2f} {'<= 1.2':>8}  {'yes' if cpu_ok else 'NO'}"
    )
    print(
        f"{'idle-core bound (req/s)':32} {cores / served['cpu_ms'] * 1e3:12.1f}"
        f" {'2 x bare ' + format(2e3 / bare['cpu_ms'], '.1f'):>18}"
        f" {bare['cpu_ms'] * cores / 2 / served['cpu_ms']:7.2f}"
    )
    # Where a request's CPU goes, all figures from this run. 1 client: the worker CPU per
    # request, split by the app's own Server-Timing steps (wall ms with no other request in the
    # worker, so close to CPU); what no step covers is gunicorn and Flask around the view
    # (parsing, reading the 75 kB body through gunicorn, routing, JSON, the access log).
    steps = served["steps"]
    print(f"CPU per /predict, 1 client: {served['single_cpu_ms']:.2f} ms; its steps (median ms):")
    for name, ms in steps.items():
        print(f"  {name:10} {ms:6.2f}  {STEP_HELP.get(name, '')}")
    outside = served["single_cpu_ms"] - sum(steps.values())
    print(f"  {'(outside)':10} {outside:6.2f}  gunicorn + Flask around the view, JSON encoding")
    work = steps.get("decode", 0.0) + steps.get("prepare", 0.0) + steps.get("infer", 0.0)
    # Like with like: the app's steps are wall-clock medians, and so are bare's (the same calls
    # timed apart in the bare loop); bare's CPU per call is another clock.
    bare_work = sum(bare["steps"].values())
    print(
        f"  decode + prepare + infer {work:.2f} ms vs bare {bare_work:.2f} (wall medians: "
        + ", ".join(f"{k} {steps.get(k, 0.0):.2f} vs {v:.2f}" for k, v in bare["steps"].items())
        + f"); everything else {served['single_cpu_ms'] - work:.2f} ms"
    )
    # Under 4 clients: the bare work, what gunicorn and Flask cost by themselves (GET /health
    # under the same load), the rest (the steps above beyond the bare work, the body, and two
    # threads of a worker contending), and the load generator, which shares the 2 cores.
    app_ms = served["cpu_ms"] - bare["cpu_ms"] - served["http_cpu_ms"]
    print("CPU per /predict under 4 clients (ms):")
    print(f"  bare decode + inference         {bare['cpu_ms']:6.2f}")
    print(f"  gunicorn + Flask (GET /health)  {served['http_cpu_ms']:6.2f}")
    print(f"  the rest (app steps, body, threads) {app_ms:5.2f}")
    print(f"  load generator (client)         {served['client_cpu_ms']:6.2f}")
    bound = cores * 1e3 / (served["cpu_ms"] + served["client_cpu_ms"])
    print(
        f"  bound for cores / (worker + client CPU): {bound:.1f} req/s "
        f"= {bound / (2 * bare['rate']):.2f} x 2 x bare"
    )
    if keras is not None:
        print(f"{'RSS per Keras/TF worker (MB)':32} {' / '.join(f'{r:.0f}' for r in keras):>12}")
    if args.record is not None:
        record(args.record, rows, served, bare, work, load)


def record(
    path: Path, rows: list[tuple], served: dict, bare: dict, work: float, load: str
) -> None:
    """The printed table, the CPU per request and the 1-client steps as a docs results file."""
    from results import write_result

    table = [
        [name, value, ref, f"{ratio:.2f}", target, "yes" if ok else "no"]
        for name, value, ref, ratio, target, ok in rows
    ]
    table.append(
        [
            "CPU per request, 4 clients (ms)",
            f"{served['cpu_ms']:.2f}",
            f"bare {bare['cpu_ms']:.2f}",
            f"{served['cpu_ms'] / bare['cpu_ms']:.2f}",
            "<= 1.2",
            "yes" if served["cpu_ms"] <= 1.2 * bare["cpu_ms"] else "no",
        ]
    )
    bare_work = sum(bare["steps"].values())
    table.append(
        [
            "decode + prepare + infer, 1 client (wall ms)",
            f"{work:.2f}",
            f"bare {bare_work:.2f}",
            f"{work / bare_work:.2f}",
            "",
            "",
        ]
    )
    for name, ms in served["steps"].items():
        ref = f"bare {bare['steps'][name]:.2f}" if name in bare["steps"] else ""
        table.append([f"step `{name}`, 1 client (wall ms)", f"{ms:.2f}", ref, "", "", ""])
    write_result(
        path,
        "Serving speed: POST /predict under gunicorn against bare decode + LiteRT",
        ["measure", "served", "reference", "ratio", "target", "met"],
        table,
        note=f"load average during the run (1, 5, 15 min): {load}",
    )
    print(f"recorded {path}")


if __name__ == "__main__":
    main()
