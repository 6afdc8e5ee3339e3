"""A git + DVC copy of the project (code, dvc.yaml, config; no data, no outputs) with tiny
params, for tests that run the real pipeline in a temporary folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# The embedded default, shrunk so that the whole pipeline runs in about a minute.
TINY = {
    "base": {"image_size": 32},
    # One slice per patient: 3 valid and 3 test slices a class cannot hold series, and a
    # monitoring reference of 8 patients would be too lumpy to compare a stream with.
    "ingest": {"synthetic_per_class": {"train": 8, "valid": 3, "test": 3}, "synthetic_series": 1},
    "base_model": {"filters": [4, 8]},
    "train": {"epochs": 2, "batch_size": 8},
    # Two epochs on 8 slices a class: no figure to hold the model to (the memorizer included).
    "promote": {"minimum": 0.0, "beat_memorizer": False},
}


def merge(base: dict, override: dict) -> dict:
    """`base` with the nested keys of `override` replaced."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(base[key], value) if isinstance(value, dict) and value else value
    return out


def project_copy(root: Path, override: dict | None = None) -> Path:
    """Copy the project's code and config under `root`, with TINY (or `override`) params."""
    for name in ("src", "config"):
        shutil.copytree(
            REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__", "node_modules")
        )
    for name in ("dvc.yaml", "app.py", ".gitignore", ".dvcignore"):
        shutil.copy2(REPO / name, root / name)
    (root / ".dvc").mkdir()
    for name in ("config", ".gitignore"):  # as a clone has them: cache and tmp stay untracked
        shutil.copy2(REPO / ".dvc" / name, root / ".dvc" / name)
    # dvc plots' offline page template, as `make venv` wrote it (.dvc/config names it).
    template = REPO / "build" / "plots" / "template.html"
    if template.is_file():
        (root / "build" / "plots").mkdir(parents=True)
        shutil.copy2(template, root / "build" / "plots" / template.name)
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    params = merge(params, TINY if override is None else override)
    (root / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    return root


def pipeline_env(root: Path) -> dict[str, str]:
    """Environment for DVC in the copy: this venv first on PATH, the copy's code importable,
    no MLflow or DVC variables inherited from the caller."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env |= {
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "PYTHONPATH": str(root / "src"),
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    return env


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run a command; on failure, fail the test with its output."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr}"
    return proc


def reproduced_copy(root: Path) -> tuple[Path, dict[str, str]]:
    """A committed git copy with tiny params, after a full `dvc repro`."""
    project_copy(root)
    env = pipeline_env(root)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        run(cmd, root, env)
    run([str(BIN / "dvc"), "repro"], root, env)
    return root, env
