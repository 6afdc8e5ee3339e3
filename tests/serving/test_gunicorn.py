"""Real gunicorn on 127.0.0.1 with config/gunicorn.conf.py, driven by the docs' curl lines.

The examples are extracted from the Serving page (docs/serving.md) and run verbatim through bash;
the only change is the address, http://127.0.0.1:8000 → the free port this test bound.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from chestct.fsutil import replace_dir
from runbook import readme_commands
from services import get, worker_pids

REPO = Path(__file__).resolve().parents[2]
README_URL = "http://127.0.0.1:8000"
TOKEN = "gunicorn-test-token"
FEEDBACK_TOKEN = "gunicorn-feedback-token"


def readme_curls() -> list[str]:
    return [c for _, c in readme_commands("## Serving") if c.startswith("curl ")]


def test_readme_curl_examples_against_gunicorn(server, tmp_path: Path) -> None:
    base, proc, live = server
    work = tmp_path / "client"
    work.mkdir()
    # The README's way to get sample files: `python -m chestct.cli.samples` in the current folder.
    subprocess.run([sys.executable, "-m", "chestct.cli.samples"], cwd=work, check=True, timeout=60)
    curls = readme_curls()
    assert len(curls) >= 10, curls
    env = {**os.environ, "CHESTCT_HISTORY_TOKEN": TOKEN, "CHESTCT_FEEDBACK_TOKEN": FEEDBACK_TOKEN}
    outputs: dict[str, str] = {}
    for line in curls:
        command = line.replace(README_URL, base)
        done = subprocess.run(
            ["bash", "-c", command], cwd=work, env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, (line, done.stderr)
        outputs[line] = done.stdout
        if "/metrics" in line:
            continue
        if "-o heatmap.png" in line:
            assert (work / "heatmap.png").read_bytes().startswith(b"\x89PNG")
            continue
        body = json.loads(done.stdout)
        assert "status" not in body or body["status"] == "ok", (line, body)

    predictions = [json.loads(v) for k, v in outputs.items() if k.endswith("/predict")]
    assert len(predictions) == 4  # multipart, raw PNG, DICOM, JSON base64
    by_png = [p for p in predictions if p["input"]["format"] == "png"]
    assert len({json.dumps(p["probabilities"], sort_keys=True) for p in by_png}) == 1
    batch = json.loads(next(v for k, v in outputs.items() if "/predict/batch" in k))
    assert [r["ok"] for r in batch["results"]] == [True, True]
    history = json.loads(next(v for k, v in outputs.items() if "/history" in k))
    assert history["count"] == 5 and history["entries"][0]["sha256"]

    # Counters of both workers are summed: 4 single + 2 batch predictions so far.
    metrics = next(v for k, v in outputs.items() if "/metrics" in k)
    assert 'chestct_requests_total{endpoint="/predict",status="200"} 4.0' in metrics
    total = sum(
        float(m.group(1))
        for m in re.finditer(r"^chestct_predictions_total\{[^}]*\} (\S+)$", metrics, re.M)
    )
    assert total == 6.0
    # The drift window is summed over both workers too (monitoring, README "Monitoring").
    assert re.search(r"^chestct_window_predictions 6\.0$", metrics, re.M), metrics
    feedback = json.loads(next(v for k, v in outputs.items() if "/feedback" in k))
    assert feedback["recorded"] is True and feedback["label"] == "normal"

    # process_* metrics of each worker (multiprocess mode gives none by itself), by pid.
    reported = set(re.findall(r'^process_resident_memory_bytes\{pid="(\d+)"\} ', metrics, re.M))
    assert {str(pid) for pid in worker_pids(proc.pid)} <= reported, reported
    assert re.search(r'^process_cpu_seconds_total\{pid="\d+"\} ', metrics, re.M)

    # The light runtime serves: no worker has TensorFlow mapped into its memory.
    for pid in worker_pids(proc.pid):
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert "ai_edge_litert" in maps
        assert "libtensorflow" not in maps and "_pywrap_tensorflow" not in maps

    status, body = get(f"{base}/predict")
    assert status == 405 and json.loads(body)["status"] == 405

    # Each worker said in the server log which model it loaded, from which run and folder.
    loads = [
        line
        for line in (live.parent / "gunicorn.log").read_text().splitlines()
        if "serving model chestct version 1" in line
    ]
    assert len(loads) == 2, loads
    assert all(f"(train run {0:032d}, litert) from {live}" in line for line in loads)


def test_workers_switch_to_a_new_champion_without_restart(
    server,
    second_model: Path,
    tmp_path: Path,
) -> None:
    base, proc, live = server
    workers = worker_pids(proc.pid)
    staged = tmp_path / ".model.new"
    shutil.copytree(second_model, staged)
    replace_dir(staged, live)  # what promote does
    deadline, streak = time.monotonic() + 30, 0
    while streak < 12:  # consecutive answers, spread over both workers
        assert time.monotonic() < deadline, "workers kept serving version 1"
        status, body = get(f"{base}/metadata")
        streak = streak + 1 if status == 200 and json.loads(body)["version"] == "2" else 0
        time.sleep(0.1)
    assert worker_pids(proc.pid) == workers  # no restart
    log = (live.parent / "gunicorn.log").read_text()
    swaps = [line for line in log.splitlines() if "replacing version 1" in line]
    assert swaps and all(
        f"serving model chestct version 2 (train run {7:032d}, litert) from {live}" in line
        for line in swaps
    ), swaps
