"""gunicorn settings for the chestct predictor (`make serve`)."""

import os

bind = os.environ.get("CHESTCT_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("CHESTCT_WORKERS", "2"))
threads = int(os.environ.get("CHESTCT_THREADS", "1"))
# The app (and TensorFlow with it) is built in each worker after fork, never in the master:
# TF state copied across a fork hangs every request.
preload_app = False
timeout = 60
graceful_timeout = 20
keepalive = 5
# Recycle workers now and then so that slow leaks cannot grow; jitter avoids all at once.
max_requests = 2000
max_requests_jitter = 200
accesslog = "-"
errorlog = "-"
loglevel = os.environ.get("CHESTCT_LOG_LEVEL", "info")
