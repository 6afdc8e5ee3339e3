"""Time a fresh `dvc repro` of the embedded default and a no-op `dvc repro` after it.

Runs in a temporary git + DVC copy of the project (code, dvc.yaml, params.yaml, config), with a
fresh MLflow store, so the figures include every stage's start-up and tracking cost.

    .venv/bin/python bench/repro.py [--keep]

Targets: fresh repro <= 300 s on 2 cores; no-op repro <= 3 s.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def make_copy(root: Path) -> dict[str, str]:
    for name in ("src", "config"):
        shutil.copytree(
            REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__", "node_modules")
        )
    for name in ("dvc.yaml", "params.yaml", "app.py", ".gitignore", ".dvcignore"):
        shutil.copy2(REPO / name, root / name)
    (root / ".dvc").mkdir()
    shutil.copy2(REPO / ".dvc" / "config", root / ".dvc" / "config")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env |= {
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "PYTHONPATH": str(root / "src"),
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "bench copy"]):
        subprocess.run(git + cmd, cwd=root, env=env, check=True)
    return env


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="chestct-bench-repro-"))
    try:
        env = make_copy(tmp)
        fresh = timed([str(BIN / "dvc"), "repro"], tmp, env)
        noop = timed([str(BIN / "dvc"), "repro"], tmp, env)
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
        print(f"fresh dvc repro : {fresh:7.1f} s   (target <= 300 s; ratio {fresh / 300:.2f})")
        print(f"no-op dvc repro : {noop:7.2f} s   (target <= 3 s;   ratio {noop / 3:.2f})")
    finally:
        if args.keep:
            print(f"copy kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
