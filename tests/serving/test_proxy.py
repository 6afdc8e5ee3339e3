"""Issue 21 item 1: nginx (Debian's, as CI installs it) in front of a real gunicorn on
127.0.0.1, with the configuration compose and the Kubernetes sidecar use
(deploy/k8s/proxy/chestct.conf.template, rendered by chestct.serving.proxy).

The property: 50 clients that trickle a byte a second (headers or bodies) for 20 s do not
delay /health or /predict through the proxy beyond 1 s. Bare gunicorn (2 threads a worker)
has no read timeouts: the same clients hold its threads (docs/serving-hardening.md).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from chestct.serving import proxy
from model_folder import slice_png
from services import free_port, require_program, service
from shipped import config_text

REPO = Path(__file__).resolve().parents[2]
SLOW_CLIENTS = 50
SLOW_FOR_S = 20.0
DELAY_LIMIT_S = 1.0


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory, model_dir: Path):
    """(proxy port, gunicorn port): nginx in front of gunicorn, both on 127.0.0.1."""
    require_program(proxy.NGINX_CANDIDATES[1], "the buffering proxy in front of gunicorn")
    tmp_path = tmp_path_factory.mktemp("proxy")
    root = tmp_path / "root"
    (root / "config").mkdir(parents=True)
    (root / "params.yaml").write_bytes((REPO / "params.yaml").read_bytes())
    config = {"model_dir": str(model_dir), "serving": {"max_upload_mb": 2}}
    (root / "config" / "config.yaml").write_text(config_text(config), encoding="utf-8")
    upstream, port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env |= {"CHESTCT_ROOT": str(root), "CHESTCT_BIND": f"127.0.0.1:{upstream}"}
    env |= {"CHESTCT_WORKERS": "1", "CHESTCT_THREADS": "2", "MC_DROPOUT_SAMPLES": "0"}
    conf = proxy.write_config(
        tmp_path / "nginx", f"127.0.0.1:{port}", f"127.0.0.1:{upstream}", 2, REPO
    )
    gunicorn = [str(REPO / ".venv/bin/gunicorn"), "-c", "config/gunicorn.conf.py", "app:app"]
    with (
        service(gunicorn, tmp_path / "gunicorn.log", f"http://127.0.0.1:{upstream}/ready",
                env=env, cwd=REPO),
        service(proxy.nginx_command(tmp_path / "nginx", conf), tmp_path / "nginx.log",
                f"http://127.0.0.1:{port}/health"),
    ):  # fmt: skip
        yield port, upstream


def trickle(port: int, kind: str, until: float, stop: threading.Event) -> None:
    """One slow client: a byte a second of a request's headers (or, after complete headers,
    of its body), reconnecting whenever the server cuts it off, until `until`."""
    head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
    while time.monotonic() < until and not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                if kind == "body":
                    sock.sendall(head + b"Content-Length: 100000\r\n\r\n")
                    payload = b"\x89" * 100_000
                else:
                    payload = head + b"X-Slow: " + b"a" * 1000
                for byte in payload:
                    if time.monotonic() >= until or stop.is_set():
                        return
                    sock.sendall(bytes([byte]))
                    time.sleep(1.0)
        except OSError:
            time.sleep(0.2)  # cut off (timeout, 408): come back, as a hostile client would


def probe(port: int, png: bytes) -> tuple[float, float]:
    """Seconds for GET /health and for POST /predict of a small slice (inf: no answer)."""
    times = []
    for method, path, body in (("GET", "/health", None), ("POST", "/predict", png)):
        started = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            headers = {"Content-Type": "image/png"} if body else {}
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            resp.read()
            ok = resp.status == 200
        except OSError:
            ok = False
        finally:
            conn.close()
        times.append(time.monotonic() - started if ok else float("inf"))
    return times[0], times[1]


def under_slow_clients(port: int, clients: int = SLOW_CLIENTS, for_s: float = SLOW_FOR_S):
    """Probe latencies while `clients` trickle requests at `port` for `for_s` seconds."""
    png = slice_png(2)
    until = time.monotonic() + for_s
    stop = threading.Event()
    threads = [
        threading.Thread(
            target=trickle, args=(port, "body" if i % 2 else "header", until, stop), daemon=True
        )
        for i in range(clients)
    ]
    for thread in threads:
        thread.start()
    time.sleep(3.0)  # let them all connect and start trickling
    probes = []
    try:
        while time.monotonic() < until - 0.5:
            probes.append(probe(port, png))
            time.sleep(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=5)
    return probes


def test_slow_clients_do_not_delay_health_or_predict_behind_the_proxy(proxied) -> None:
    port, _ = proxied
    probes = under_slow_clients(port)
    worst_health = max(h for h, _ in probes)
    worst_predict = max(p for _, p in probes)
    print(
        f"{len(probes)} probes: worst /health {worst_health:.3f} s, /predict {worst_predict:.3f} s"
    )
    assert len(probes) >= 10
    assert worst_health < DELAY_LIMIT_S and worst_predict < DELAY_LIMIT_S, probes


def test_proxy_refuses_bodies_over_the_serving_limit_and_huge_headers(proxied) -> None:
    port, _ = proxied
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/predict", body=b"\0" * (3 << 20), headers={"Content-Type": "image/png"})
    assert conn.getresponse().status == 413  # serving.max_upload_mb is 2 here
    conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/health", headers={"X-Big": "a" * 20_000})
    assert conn.getresponse().status in (400, 431, 494)
    conn.close()
    # A good request passes through with its answer intact.
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/predict", body=slice_png(1), headers={"Content-Type": "image/png"})
    resp = conn.getresponse()
    assert resp.status == 200 and json.loads(resp.read())["label"]
    conn.close()


def test_the_rendered_config_follows_serving_max_upload_mb() -> None:
    template = (REPO / proxy.TEMPLATE).read_text(encoding="utf-8")
    conf = proxy.render(template, "127.0.0.1:1", "127.0.0.1:2", 10, Path("/p"))
    assert "client_max_body_size 10240k;" in conf and "client_body_buffer_size 10240k;" in conf
    assert "server 127.0.0.1:2;" in conf and "listen 127.0.0.1:1;" in conf
    assert "${" not in conf and "$host" in conf  # nginx's own variables are kept
    assert "client_header_timeout 10s;" in conf and "client_body_timeout 10s;" in conf


def test_serve_proxy_starts_and_stops_both(tmp_path: Path, model_dir: Path) -> None:
    """`make serve-proxy`'s command: nginx answers for gunicorn; SIGTERM stops both."""
    import signal
    import subprocess
    import sys
    import urllib.request

    from services import wait_http

    require_program(proxy.NGINX_CANDIDATES[1], "make serve-proxy")
    root = tmp_path / "root"
    (root / "config").mkdir(parents=True)
    (root / "params.yaml").write_bytes((REPO / "params.yaml").read_bytes())
    (root / "deploy").symlink_to(REPO / "deploy")
    config = {"model_dir": str(model_dir)}
    (root / "config" / "config.yaml").write_text(config_text(config), encoding="utf-8")
    (root / "config" / "gunicorn.conf.py").write_bytes(
        (REPO / "config" / "gunicorn.conf.py").read_bytes()
    )
    (root / "app.py").write_bytes((REPO / "app.py").read_bytes())
    upstream, port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env |= {"CHESTCT_ROOT": str(root), "CHESTCT_WORKERS": "1"}
    log = tmp_path / "serve-proxy.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "chestct.serving.proxy", "--port", str(port),
             "--upstream-port", str(upstream)],
            cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{port}/ready", proc, log)  # nginx is up
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # and then gunicorn behind it (502 until then)
            assert proc.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=5):
                    break
            except OSError:
                time.sleep(0.5)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
            assert json.loads(resp.read())["status"] == "ok"
        with urllib.request.urlopen(f"http://127.0.0.1:{upstream}/health", timeout=5) as resp:
            assert resp.status == 200  # gunicorn itself, on 127.0.0.1
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()
    for p in (port, upstream):
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{p}/health", timeout=2)
