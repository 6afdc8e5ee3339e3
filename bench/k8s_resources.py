"""Memory and CPU of one serving container, for the requests and limits in deploy/k8s/.

gunicorn with config/gunicorn.conf.py and CHESTCT_WORKERS workers serves the default model
(the untrained small CNN of params.yaml at its image size: the same compute and size as a
trained one) on 127.0.0.1; 4 clients post a 512 x 512 PNG for --seconds. Printed: the resident
memory (VmRSS) and its peak (VmHWM) of the master and of each worker, their sum (what the
container holds), and the CPU seconds per second the workers used under that load.

    python bench/k8s_resources.py [--workers 2] [--seconds 20]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import BUILD, PYTHON, REPO, Server, cpu_seconds, load_run, make_image


def status_mb(pid: int, key: str) -> float:
    """A memory figure (VmRSS, VmHWM) of a process from /proc, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=20.0)
    args = ap.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="chestct-bench-k8s-"))
    model_dir = scratch / "model"
    subprocess.run([PYTHON, "-c", BUILD, str(model_dir)], check=True, cwd=REPO)
    image = scratch / "slice.png"
    make_image(image)
    server = Server(model_dir, scratch, workers=args.workers)
    try:
        server.wait_ready()
        master, workers = server.proc.pid, server.worker_pids()
        idle = {pid: status_mb(pid, "VmRSS") for pid in [master, *workers]}
        cpu0, t0 = sum(cpu_seconds(p) for p in workers), time.monotonic()
        loaded = load_run(server, image.read_bytes(), args.seconds, "/predict")
        cores = (sum(cpu_seconds(p) for p in workers) - cpu0) / (time.monotonic() - t0)
        rss = {pid: status_mb(pid, "VmRSS") for pid in [master, *workers]}
        hwm = {pid: status_mb(pid, "VmHWM") for pid in [master, *workers]}
    finally:
        server.stop()
    cores_note = f"{os.cpu_count()} cores"
    print(f"gunicorn, {args.workers} workers, 4 clients for {args.seconds:.0f} s, {cores_note}")
    print(f"  throughput        {loaded['throughput']:.0f} requests/s")
    print(f"  workers' CPU      {cores:.2f} cores")
    for name, pid in [("master", master)] + [("worker", pid) for pid in workers]:
        print(
            f"  {name} RSS{'':<8}{idle[pid]:.0f} MB idle, {rss[pid]:.0f} MB after, "
            f"peak {hwm[pid]:.0f} MB"
        )
    print(
        f"  container total   {sum(rss.values()):.0f} MB after, "
        f"{sum(hwm.values()):.0f} MB sum of peaks"
    )


if __name__ == "__main__":
    main()
