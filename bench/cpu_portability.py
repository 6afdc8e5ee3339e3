"""Which CPU settings change the bytes of train, evaluate and promote (docs/reproducibility.md).

    .venv/bin/python bench/cpu_portability.py [--stages train,evaluate,promote] [--keep DIR]

Makes a tiny git + DVC copy of the project (tests/project_copy.py's params), runs it up to
validate and base-model, then reruns the given stages once per setting below and prints a short
sha256 of what each wrote (artifacts/<stage>/ and reports/<stage>/; model/ without
promotion.json) with the seconds it took. Equal hashes on a row mean equal bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from project_copy import pipeline_env, project_copy, run  # noqa: E402

# name -> extra environment. "native" turns chestct's caps off (chestct.cpu).
SETTINGS = {
    "portable (default)": {},
    "portable, ONEDNN_MAX_CPU_ISA=AVX512_CORE": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"},
    "portable, TF_ENABLE_ONEDNN_OPTS=0": {"TF_ENABLE_ONEDNN_OPTS": "0"},
    "portable, TF_NUM_INTRAOP_THREADS=4": {"TF_NUM_INTRAOP_THREADS": "4"},
    "native": {"CHESTCT_CPU": "native"},
    "native, ONEDNN_MAX_CPU_ISA=AVX2": {"CHESTCT_CPU": "native", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "native, TF_ENABLE_ONEDNN_OPTS=0": {"CHESTCT_CPU": "native", "TF_ENABLE_ONEDNN_OPTS": "0"},
    "native, TF_NUM_INTRAOP_THREADS=1": {"CHESTCT_CPU": "native", "TF_NUM_INTRAOP_THREADS": "1"},
}


def digest(path: Path) -> str | None:
    if not path.exists():
        return None
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if f.name != "promotion.json":
            h.update(f.relative_to(path.parent).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default="train,evaluate,promote")
    parser.add_argument("--keep", type=Path, help="make the copy here and keep it")
    args = parser.parse_args()
    stages = args.stages.split(",")
    root = args.keep or Path(tempfile.mkdtemp(prefix="chestct-cpu-"))
    try:
        if not (root / "dvc.yaml").exists():
            root.mkdir(parents=True, exist_ok=True)
            project_copy(root)
            env = pipeline_env(root)
            for cmd in (
                ["git", "init", "-q"],
                ["git", "add", "-A"],
                ["git", "commit", "-qm", "c"],
            ):
                run(cmd, root, env)
            run(["dvc", "repro", "validate", "base-model"], root, env)
        print(f"{'setting':44s} {'seconds':>7s}  hashes")
        for name, extra in SETTINGS.items():
            env = pipeline_env(root) | extra
            shutil.rmtree(root / "model", ignore_errors=True)  # no champion: promote promotes
            hashes: dict[str, str | None] = {}
            start = time.monotonic()
            for stage in stages:
                done = subprocess.run(
                    [sys.executable, "-m", f"chestct.stages.{stage.replace('-', '_')}"],
                    cwd=root,
                    env=env,
                    capture_output=True,
                    text=True,
                )
                if done.returncode:
                    hashes[stage] = "FAILED: " + done.stderr.strip().splitlines()[-1]
                    break
                hashes[stage] = digest(root / "artifacts" / stage)
                if (root / "reports" / stage).is_dir():
                    hashes[f"{stage} reports"] = digest(root / "reports" / stage)
            if "promote" in stages:
                hashes["model"] = digest(root / "model")
            print(f"{name:44s} {time.monotonic() - start:7.1f}  {json.dumps(hashes)}", flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
