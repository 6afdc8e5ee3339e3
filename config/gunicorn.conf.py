"""gunicorn settings for the chestct predictor (`make serve`; README "Serving").

Environment overrides: CHESTCT_BIND, CHESTCT_WORKERS, CHESTCT_THREADS, CHESTCT_TIMEOUT,
CHESTCT_FORWARDED_ALLOW_IPS, CHESTCT_LOG_LEVEL, OPENCV_IO_MAX_IMAGE_PIXELS (default:
serving.max_image_pixels). Metrics of all workers are summed through
PROMETHEUS_MULTIPROC_DIR, which this file points at a fresh private folder unless the
environment sets one.
"""

import os
import shutil
import tempfile
from pathlib import Path

bind = os.environ.get("CHESTCT_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("CHESTCT_WORKERS", "2"))
# Two threads per worker: /health and /metrics are answered while a prediction runs. The
# model itself runs one request at a time per worker (LiteRT interpreters are not thread-safe).
worker_class = "gthread"
threads = int(os.environ.get("CHESTCT_THREADS", "2"))
# The app (and the model with it) is built in each worker after fork, never in the master.
preload_app = False
timeout = int(os.environ.get("CHESTCT_TIMEOUT", "60"))
graceful_timeout = 20  # SIGTERM: finish in-flight requests for up to 20 s, then exit
keepalive = 5
# Recycle workers now and then so that slow leaks cannot grow; jitter avoids all at once.
max_requests = 2000
max_requests_jitter = 200
# Request line and header limits well below gunicorn's maxima: clients send images in bodies.
# nginx in front (deploy/k8s/proxy/chestct.conf.template) holds requests to the same limits, and
# its header and body read timeouts are what bare gunicorn lacks: a gthread worker reads a
# request on one of its `threads`, however slowly the client sends it (docs/serving-hardening.md).
limit_request_line = 4094
limit_request_fields = 50
limit_request_field_size = 8190
# No control socket: nothing but HTTP reaches a running server.
control_socket_disable = True
# Behind a load balancer: trust its X-Forwarded-* headers only from the addresses named here.
forwarded_allow_ips = os.environ.get("CHESTCT_FORWARDED_ALLOW_IPS", "127.0.0.1")
# Worker heartbeats in memory where available: a container's overlay disk can stall them.
if Path("/dev/shm").is_dir():
    worker_tmp_dir = "/dev/shm"
accesslog = "-"
errorlog = "-"
loglevel = os.environ.get("CHESTCT_LOG_LEVEL", "info")
capture_output = True

# One single-threaded worker per core: BLAS and OpenCV thread pools inside a worker would only
# fight the other workers for the same cores (measured: MC-dropout's small matrix products
# took 4x longer with OpenBLAS threads under load). Set before any worker imports NumPy.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

# OpenCV's own pixel limit per image, as a second guard behind chestct's header checks. OpenCV
# reads it once, when a process first imports cv2, so it is set here in the master, before any
# worker (which inherits the environment) imports it: serving.max_image_pixels.
if "OPENCV_IO_MAX_IMAGE_PIXELS" not in os.environ:
    from chestct.settings import load_settings

    os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(load_settings().config.serving.max_image_pixels)

_OWN_METRICS_DIR = "PROMETHEUS_MULTIPROC_DIR" not in os.environ
if _OWN_METRICS_DIR:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="chestct-metrics-")


def on_starting(server):
    """Start from empty metric files: values of a previous server must not leak in."""
    folder = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.db"):
        stale.unlink()


def post_fork(server, worker):
    """In the worker, before the app loads: OpenCV's own pool to one thread, as BLAS above;
    chestct's log lines (model loads and hot swaps) go to gunicorn's error log."""
    import logging

    import cv2

    cv2.setNumThreads(1)
    chestct_log = logging.getLogger("chestct")
    if not chestct_log.handlers:
        for handler in server.log.error_log.handlers:
            chestct_log.addHandler(handler)
        chestct_log.setLevel(server.log.error_log.level)
        chestct_log.propagate = False


def child_exit(server, worker):
    """Drop a dead worker's live gauges (its counters stay counted)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    if _OWN_METRICS_DIR:
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
