"""Fixtures of the serving tier: one real gunicorn shared by the modules that drive it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from services import free_port, get, worker_pids
from shipped import config_text

REPO = Path(__file__).resolve().parents[2]
TOKEN = "gunicorn-test-token"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_dir: Path):
    """One gunicorn for this module's tests (the reload test runs last: it swaps the model)."""
    tmp_path = tmp_path_factory.mktemp("gunicorn")
    live = tmp_path / "model"
    shutil.copytree(model_dir, live)
    root = tmp_path / "root"
    (root / "config").mkdir(parents=True)
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    config = {
        "model_dir": str(live),
        "serving": {"audit_log": True, "audit_db": str(tmp_path / "audit.sqlite")},
    }
    (root / "config" / "config.yaml").write_text(config_text(config), encoding="utf-8")
    port = free_port()
    env = {
        **os.environ,
        "CHESTCT_ROOT": str(root),
        "CHESTCT_BIND": f"127.0.0.1:{port}",
        "CHESTCT_WORKERS": "2",
        "CHESTCT_HISTORY_TOKEN": TOKEN,
        "CHESTCT_FEEDBACK_TOKEN": "gunicorn-feedback-token",
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    log = (tmp_path / "gunicorn.log").open("wb")
    proc = subprocess.Popen(
        [str(REPO / ".venv/bin/gunicorn"), "-c", "config/gunicorn.conf.py", "app:app"],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (tmp_path / "gunicorn.log").read_text()
            try:
                if get(f"{base}/ready")[0] == 200 and len(worker_pids(proc.pid)) == 2:
                    break
            except (OSError, urllib.error.URLError):
                pass
            assert time.monotonic() < deadline, "gunicorn did not become ready in 90 s"
            time.sleep(0.3)
        yield base, proc, live
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
