"""nginx in front of gunicorn on one machine: `make serve-proxy` (docs/serving-hardening.md).

gunicorn's gthread workers read a request on a worker thread with no header or body timeout,
so a few clients that send a byte a second hold every thread of a worker. nginx reads each
request whole on its event loop, within its timeouts and size limits, and only then hands it
to gunicorn in one fast write. The server block is deploy/k8s/proxy/chestct.conf.template,
the same file compose and the Kubernetes sidecar use; here it is wrapped in a main
configuration whose pid, logs and temporary folders live in a private folder, so nginx runs
as any user.

    python -m chestct.serving.proxy [--host 127.0.0.1] [--port 8080] [--upstream-port 8000]
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import signal
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from chestct.settings import find_root, load_settings

log = logging.getLogger(__name__)

TEMPLATE = Path("deploy/k8s/proxy/chestct.conf.template")  # relative to the project root
NGINX_CANDIDATES = ("nginx", "/usr/sbin/nginx", "/usr/local/sbin/nginx")
MB = 1024 * 1024


def nginx_binary() -> str:
    """The nginx executable (Debian installs it in /usr/sbin, often not on a user's PATH).

    Raises:
        FileNotFoundError: naming how to install it.
    """
    for candidate in NGINX_CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    raise FileNotFoundError(
        "nginx is not installed; install it (`sudo apt-get install nginx`) or serve without "
        "the proxy (`make serve`)"
    )


def max_body(max_upload_mb: float) -> str:
    """serving.max_upload_mb as nginx's client_max_body_size (whole kilobytes, rounded up)."""
    return f"{math.ceil(max_upload_mb * 1024)}k"


def render(template: str, listen: str, upstream: str, max_upload_mb: float, prefix: Path) -> str:
    """A complete nginx.conf: the server block of `template` with its ${CHESTCT_*} filled in,
    inside a main configuration whose files all live under `prefix`."""
    server = string.Template(template).safe_substitute(
        CHESTCT_PROXY_LISTEN=listen,
        CHESTCT_UPSTREAM=upstream,
        CHESTCT_MAX_BODY=max_body(max_upload_mb),
    )
    temp = "\n".join(
        f"    {kind}_temp_path {prefix / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return (
        "worker_processes 1;\n"
        f"pid {prefix / 'nginx.pid'};\n"
        "error_log stderr warn;\n"
        "events { worker_connections 1024; }\n"
        "http {\n"
        f"    access_log {prefix / 'access.log'};\n"
        f"{temp}\n"
        f"{server}\n"
        "}\n"
    )


def write_config(
    prefix: Path, listen: str, upstream: str, max_upload_mb: float, root: Path | None = None
) -> Path:
    """Render the proxy's nginx.conf into `prefix` (written to a temporary name, then renamed)
    and check it with `nginx -t`; returns its path.

    Raises:
        subprocess.CalledProcessError: nginx refuses the configuration (its message attached).
    """
    template = ((root or find_root()) / TEMPLATE).read_text(encoding="utf-8")
    prefix.mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    partial = prefix / "nginx.conf.partial"
    partial.write_text(render(template, listen, upstream, max_upload_mb, prefix), "utf-8")
    partial.replace(conf)
    subprocess.run(
        [*nginx_command(prefix, conf), "-t", "-q"], check=True, capture_output=True, text=True
    )
    return conf


def nginx_command(prefix: Path, conf: Path) -> list[str]:
    """nginx in the foreground with `conf`, its prefix and early error log private."""
    return [nginx_binary(), "-p", str(prefix), "-c", str(conf), "-e", "stderr", "-g",
            "daemon off;"]  # fmt: skip


def serve(host: str, port: int, upstream_port: int) -> int:
    """gunicorn on 127.0.0.1:`upstream_port` behind nginx on `host`:`port` until either
    stops or this process gets SIGINT/SIGTERM; returns the exit status."""
    root = find_root()
    settings = load_settings(root)
    prefix = Path(tempfile.mkdtemp(prefix="chestct-proxy-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        conf = write_config(
            prefix,
            f"{host}:{port}",
            f"127.0.0.1:{upstream_port}",
            settings.config.serving.max_upload_mb,
            root,
        )
        env = {**os.environ, "CHESTCT_BIND": f"127.0.0.1:{upstream_port}"}
        gunicorn = Path(sys.executable).with_name("gunicorn")
        procs.append(
            subprocess.Popen(
                [str(gunicorn), "-c", "config/gunicorn.conf.py", "app:app"], cwd=root, env=env
            )
        )
        procs.append(subprocess.Popen(nginx_command(prefix, conf)))
        log.info(
            "nginx on http://%s:%d in front of gunicorn on 127.0.0.1:%d (Ctrl-C stops both)",
            host,
            port,
            upstream_port,
        )
        stop = {"signal": 0}

        def on_signal(signum: int, frame: object) -> None:
            stop["signal"] = signum

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        while not stop["signal"] and all(p.poll() is None for p in procs):
            time.sleep(0.2)
        return next((p.returncode for p in procs if p.returncode), 0)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=25)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(prefix, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address nginx listens on")
    parser.add_argument("--port", type=int, default=8080, help="port nginx listens on")
    parser.add_argument("--upstream-port", type=int, default=8000, help="gunicorn's port")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        raise SystemExit(serve(args.host, args.port, args.upstream_port))
    except FileNotFoundError as exc:
        raise SystemExit(f"error: {exc}") from None
    except subprocess.CalledProcessError as exc:
        raise SystemExit(f"error: nginx refused its configuration: {exc.stderr}") from None


if __name__ == "__main__":
    main()
