"""Reliability drills for chestct, each measured and printed.

1. worker: gunicorn (2 workers) under 4 clients of POST /predict; one worker gets kill -9.
   Counts the failed requests (only those in flight may fail) and the seconds until the
   replacement worker answers a request (target ≤ 5 s).
2. model: a new model folder whose model.tflite is truncated replaces model/ under the running
   server; it must be refused and the previous version keep answering every request.
3. train: in a tiny /tmp copy of the project (tests/project_copy.py), SIGKILL of
   `python -m chestct.stages.train` mid-training; then no pointer or model file may be half
   written, and `dvc repro` must complete with every pointer verifying against its files.
4. tracking: MLFLOW_TRACKING_URI pointing at a closed port, then `dvc repro -f -s evaluate`:
   a clear error (or a recorded degradation) within 10 s, and the trained model not lost.

    python bench/reliability.py [--only worker,model,train,tracking]
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(REPO / "tests"))

from serve import BUILD, PYTHON, Server, free_port, make_image  # noqa: E402


def post(port: int, body: bytes, timeout: float = 30) -> tuple[int, dict]:
    """(status, JSON body) of one POST /predict on a fresh connection; status 0 on failure."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/predict", body=body, headers={"Content-Type": "image/png"})
        resp = conn.getresponse()
        data = resp.read()
        try:
            return resp.status, json.loads(data)
        except ValueError:
            return resp.status, {}
    except (OSError, http.client.HTTPException):
        return 0, {}
    finally:
        conn.close()


class Load:
    """`clients` threads posting /predict until stopped; every outcome kept with its time."""

    def __init__(self, port: int, body: bytes, clients: int = 4) -> None:
        self.port, self.body = port, body
        self.stop = threading.Event()
        self.outcomes: list[tuple[float, float, int, str]] = []  # start, end, status, version
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._loop) for _ in range(clients)]

    def _loop(self) -> None:
        while not self.stop.is_set():
            start = time.monotonic()
            status, body = post(self.port, self.body)
            version = str((body.get("model") or {}).get("version", ""))
            with self.lock:
                self.outcomes.append((start, time.monotonic(), status, version))

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


def access_log_pids(log: Path) -> set[str]:
    """Worker pids that have written an access-log line (format '%(p)s %(s)s')."""
    text = log.read_text(errors="replace")
    return {line.split()[0].strip("<>") for line in text.splitlines() if line.startswith("<")}


def drill_worker(model_dir: Path, scratch: Path, body: bytes) -> dict:
    server = Server(model_dir, scratch / "worker", workers=2)
    log = Path(server.log.name)
    try:
        server.wait_ready()
        with Load(server.port, body) as load:
            time.sleep(3)
            before = server.worker_pids()
            victim = before[0]
            killed_at = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            replacement, whole_at = None, None
            while time.monotonic() - killed_at < 30:
                new = [p for p in server.worker_pids() if p not in before]
                if new:
                    replacement = new[0]
                    if str(replacement) in access_log_pids(log):
                        whole_at = time.monotonic()
                        break
                time.sleep(0.02)
            time.sleep(2)
        outcomes = load.outcomes
    finally:
        server.stop()
    failed = [o for o in outcomes if o[2] != 200]
    in_flight = [o for o in outcomes if o[0] <= killed_at <= o[1]]
    late = [o for o in failed if o[0] > killed_at]
    return {
        "requests": len(outcomes),
        "failed": len(failed),
        "in_flight_at_kill": len(in_flight),
        "failed_started_after_kill": len(late),
        "replacement_pid": replacement,
        "whole_again_s": None if whole_at is None else round(whole_at - killed_at, 2),
    }


def drill_model(model_dir: Path, scratch: Path, body: bytes) -> dict:
    from chestct.fsutil import replace_dir

    live = scratch / "model-live" / "model"
    shutil.copytree(model_dir, live)
    server = Server(live, scratch / "model", workers=2)
    try:
        server.wait_ready()
        broken = scratch / "model-broken"
        shutil.copytree(model_dir, broken)
        card = json.loads((broken / "model.json").read_text())
        card["version"] = "2"
        (broken / "model.json").write_text(json.dumps(card))
        tflite = broken / card["inference"]["file"]
        tflite.write_bytes(tflite.read_bytes()[: tflite.stat().st_size // 3])
        with Load(server.port, body) as load:
            time.sleep(2)
            swapped_at = time.monotonic()
            replace_dir(broken, live)
            time.sleep(6)
        after = [o for o in load.outcomes if o[0] > swapped_at]
        ready = post(server.port, body)
    finally:
        server.stop()
    log = Path(server.log.name).read_text(errors="replace")
    return {
        "requests_after_swap": len(after),
        "failed_after_swap": sum(o[2] != 200 for o in after),
        "versions_after_swap": sorted({o[3] for o in after}),
        "refusal_logged": "refused the new model" in log,
        "final_status": ready[0],
        "final_version": (ready[1].get("model") or {}).get("version"),
    }


def _pointer_check(root: Path, env: dict[str, str]) -> str:
    """'ok' when every stage's pointer verifies against its files, else the error."""
    code = (
        "from chestct.settings import load_settings, STAGES\n"
        "from chestct.pointers import read_pointer\n"
        "s = load_settings()\n"
        "for st in STAGES: read_pointer(s.paths, st, verify=True)\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [PYTHON, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )
    return done.stdout.strip() if done.returncode == 0 else done.stderr.strip()[-400:]


def drill_train(scratch: Path) -> dict:
    from project_copy import BIN, TINY, merge, pipeline_env, project_copy, run

    root = scratch / "train-project"
    root.mkdir()
    project_copy(root, merge(TINY, {"train": {"epochs": 40, "batch_size": 8}}))
    env = pipeline_env(root)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        run(cmd, root, env)
    dvc = str(BIN / "dvc")
    run([dvc, "repro", "validate", "base-model"], root, env)  # everything train reads
    proc = subprocess.Popen(
        [PYTHON, "-m", "chestct.stages.train"],
        cwd=root,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    started = time.monotonic()
    train_dir = root / "artifacts" / "train"
    stage_log = root / "artifacts" / "runs" / "train.log"
    while time.monotonic() - started < 120 and proc.poll() is None:
        if stage_log.exists() and "training on" in stage_log.read_text(errors="replace"):
            break
        time.sleep(0.1)
    time.sleep(4)  # into the epochs
    alive_at_kill = proc.poll() is None
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_after = round(time.monotonic() - started, 1)
    left = sorted(str(p.relative_to(train_dir)) for p in train_dir.glob("**/*") if p.is_file())
    pointer_left = (train_dir / "pointer.json").exists()
    started = time.monotonic()
    repro = subprocess.run([dvc, "repro"], cwd=root, env=env, capture_output=True, text=True)
    repro_s = round(time.monotonic() - started, 1)
    status = subprocess.run([dvc, "status"], cwd=root, env=env, capture_output=True, text=True)
    return {
        "killed_after_s": killed_after,
        "train_was_running_at_kill": alive_at_kill,
        "files_left_by_killed_train": left,
        "pointer_left_by_killed_train": pointer_left,
        "repro_returncode": repro.returncode,
        "repro_s": repro_s,
        "repro_tail": repro.stdout.strip().splitlines()[-1:]
        + repro.stderr.strip()[-300:].split("\n")[-2:],
        "dvc_status": status.stdout.strip()[-200:],
        "pointers": _pointer_check(root, env),
        "root": root,
        "env": env,
    }


def drill_tracking(root: Path, env: dict[str, str]) -> dict:
    from project_copy import BIN

    model = root / "artifacts" / "train"
    before = {
        str(p.relative_to(model)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in model.glob("**/*")
        if p.is_file()
    }
    bad = {**env, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}
    started = time.monotonic()
    try:
        done = subprocess.run(
            [str(BIN / "dvc"), "repro", "-f", "-s", "evaluate"],
            cwd=root,
            env=bad,
            capture_output=True,
            text=True,
            timeout=300,
        )
        code, text = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        code, text = None, f"timed out after 300 s: {exc.stdout!r}"[-400:]
    elapsed = round(time.monotonic() - started, 1)
    after = {
        str(p.relative_to(model)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in model.glob("**/*")
        if p.is_file()
    }
    errors = [ln for ln in text.splitlines() if "rror" in ln or "MLflow" in ln or "track" in ln]
    return {
        "returncode": code,
        "seconds": elapsed,
        "message": errors[-3:],
        "trained_model_unchanged": before == after and bool(before),
        "model_files": sorted(before),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="worker,model,train,tracking", help="drills to run")
    args = ap.parse_args()
    only = set(args.only.split(","))
    # The replacement worker is seen answering in the access log: pid and status per line.
    os.environ["GUNICORN_CMD_ARGS"] = "--access-logformat '%(p)s %(s)s'"
    scratch = Path(tempfile.mkdtemp(prefix="chestct-bench-reliability-"))
    results: dict[str, dict] = {}
    try:
        if only & {"worker", "model"}:
            model_dir = scratch / "built" / "model"
            print("building the default untrained model (TensorFlow, ~20 s) ...", flush=True)
            subprocess.run([PYTHON, "-c", BUILD, str(model_dir)], check=True, cwd=REPO)
            image = scratch / "slice.png"
            make_image(image)
            body = image.read_bytes()
            if "worker" in only:
                results["worker"] = drill_worker(model_dir, scratch, body)
                print("worker:", json.dumps(results["worker"]), flush=True)
            if "model" in only:
                results["model"] = drill_model(model_dir, scratch, body)
                print("model:", json.dumps(results["model"]), flush=True)
        if only & {"train", "tracking"}:
            train = drill_train(scratch)
            root, env = train.pop("root"), train.pop("env")
            results["train"] = train
            print("train:", json.dumps(train, default=str), flush=True)
            if "tracking" in only:
                results["tracking"] = drill_tracking(root, env)
                print("tracking:", json.dumps(results["tracking"]), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"\nchestct reliability drills, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    for name, result in results.items():
        print(f"[{name}]")
        for key, value in result.items():
            print(f"  {key:32} {value}")


if __name__ == "__main__":
    main()
