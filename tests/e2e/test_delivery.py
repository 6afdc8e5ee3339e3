"""Delivery: the Dockerfile, .dockerignore, the GitHub workflows and the README's pipeline diagram.

No Docker engine runs here, so the images are checked by what can be checked without one:
hadolint on the Dockerfile, and the serve image's dependency list proven by building a fresh
virtual environment from exactly `requirements-serve.txt`, laying out the files the serve stage
copies, and answering /predict from it under gunicorn.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from chestct.data.synthetic import render_slice
from chestct.labels import CLASSES

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
WORKFLOWS = REPO / ".github" / "workflows"


# --------------------------------------------------------------------------- Dockerfile


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """Dockerfile stages by name, each a list of (INSTRUCTION, arguments), continuations joined."""
    text = (REPO / "Dockerfile").read_text(encoding="utf-8")
    logical, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        current = f"{current} {line}" if current else line
        if current.endswith("\\"):
            current = current[:-1].rstrip()
            continue
        logical.append(current)
        current = ""
    stages: dict[str, list[tuple[str, str]]] = {}
    name = ""
    for line in logical:
        instruction, _, args = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            match = re.search(r"\bAS\s+(\S+)$", args, re.IGNORECASE)
            name = match.group(1) if match else f"stage{len(stages)}"
            stages[name] = []
        if name:
            stages[name].append((instruction, args.strip()))
    return stages


def _instructions(stage: list[tuple[str, str]], kind: str) -> list[str]:
    return [args for instruction, args in stage if instruction == kind]


def _copies(stage: list[tuple[str, str]]) -> list[tuple[list[str], str]]:
    """(sources, destination) of each COPY from the build context (flags dropped)."""
    out = []
    for args in _instructions(stage, "COPY"):
        if "--from" in args:
            continue
        *sources, dest = [word for word in args.split() if not word.startswith("--")]
        out.append((sources, dest))
    return out


def test_dockerfile_passes_hadolint() -> None:
    proc = subprocess.run(
        [str(BIN / "hadolint"), "--no-color", "Dockerfile"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, f"hadolint found problems:\n{proc.stdout}{proc.stderr}"


def test_serve_is_the_default_target_and_runs_gunicorn_unprivileged() -> None:
    stages = dockerfile_stages()
    assert list(stages)[-1] == "serve", "the last stage is what `docker build .` builds"
    serve = stages["serve"]
    assert "requirements-serve.txt" in " ".join(_instructions(serve, "RUN"))
    users = _instructions(serve, "USER")
    assert users and users[-1].split(":")[0] not in ("0", "root")
    (health,) = _instructions(serve, "HEALTHCHECK")
    assert "/health" in health
    (cmd,) = _instructions(serve, "CMD")
    assert json.loads(cmd) == ["gunicorn", "-c", "config/gunicorn.conf.py", "app:app"]
    assert (["model"], "./model") in _copies(serve)
    # The serving image installs neither the training stack nor the test tools.
    assert "requirements.txt" not in " ".join(_instructions(serve, "COPY"))


def test_train_target_runs_the_pipeline_unprivileged() -> None:
    train = dockerfile_stages()["train"]
    assert json.loads(_instructions(train, "CMD")[-1]) == ["dvc", "repro"]
    assert _instructions(train, "USER")[-1].split(":")[0] not in ("0", "root")
    assert "-r requirements.txt" in " ".join(_instructions(train, "RUN"))


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes; a match covers subpaths."""

    def to_regex(pattern: str) -> str:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                out, i = out + pattern[i : end + 1], end + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return out + "(?:/.*)?"

    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        if re.fullmatch(to_regex(body.strip("/")), path):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_data_and_caches_out_and_what_images_copy_in() -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    out = [
        ".git/HEAD",
        ".venv/bin/python",
        "artifacts/resize/images/a.png",
        "data/train/normal/1.png",
        "mlflow.db",
        "mlruns/0/meta.yaml",
        ".dvc/cache/files/md5/ab/cd",
        ".dvc/config.local",
        "src/chestct/__pycache__/settings.cpython-311.pyc",
        ".pytest_cache/v/cache",
        "research/.ipynb_checkpoints/01-eda-checkpoint.ipynb",
        ".env",
    ]
    copied = {
        source
        for stage in dockerfile_stages().values()
        for sources, _ in _copies(stage)
        for source in sources
    }
    inside = [
        "model/model.json",
        "src/chestct/settings/__init__.py",
        "src/chestct/serving/__init__.py",
        "config/config.yaml",
        ".dvc/config",
    ]
    assert {"requirements-serve.txt", "model", "src", "config"} <= copied
    for path in out:
        assert _dockerignored(path, patterns), f"{path} would be sent to the docker build"
    for path in sorted(copied) + inside:
        assert not _dockerignored(path, patterns), f"{path} is copied but .dockerignore drops it"


# --------------------------------------------------------------------------- workflows


def _workflow(name: str) -> dict:
    data = yaml.safe_load((WORKFLOWS / name).read_text(encoding="utf-8"))
    data["on"] = data.pop(True, data.get("on"))  # YAML 1.1 reads the key `on` as true
    return data


def _steps(workflow: dict) -> list[dict]:
    return [step for job in workflow["jobs"].values() for step in job["steps"]]


def test_workflows_pass_actionlint() -> None:
    files = sorted(str(p) for p in WORKFLOWS.glob("*.yml"))
    assert {Path(f).name for f in files} >= {"ci.yml", "cd.yml", "retrain.yml"}
    proc = subprocess.run(
        [str(BIN / "actionlint"), "-no-color", *files],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"actionlint found problems:\n{proc.stdout}{proc.stderr}"


@pytest.mark.parametrize("name", ["ci.yml", "cd.yml", "retrain.yml"])
def test_every_action_is_pinned_to_a_release(name: str) -> None:
    uses = [step["uses"] for step in _steps(_workflow(name)) if "uses" in step]
    assert uses
    for ref in uses:
        assert re.fullmatch(r"[\w.-]+/[\w./-]+@(v\d+(\.\d+){0,2}|[0-9a-f]{40})", ref), ref


def test_ci_lints_tests_reproduces_reports_and_builds_both_images() -> None:
    ci = _workflow("ci.yml")
    assert {"push", "pull_request"} <= set(ci["on"])
    steps = _steps(ci)
    script = "\n".join(step.get("run", "") for step in steps)
    assert "ruff check" in script and "ruff format --check" in script
    assert "pytest" in script
    repro = next(s["run"] for s in steps if "dvc exp run" in s.get("run", ""))
    assert "-S base.image_size=" in repro and "-S train.epochs=" in repro
    summary = next(s["run"] for s in steps if "GITHUB_STEP_SUMMARY" in s.get("run", ""))
    assert "dvc metrics diff --md" in summary and "dvc params diff --md" in summary
    builds = [s["with"] for s in steps if s.get("uses", "").startswith("docker/build-push-action")]
    assert {b["target"] for b in builds} == {"train", "serve"}
    assert all(b["push"] is False for b in builds)
    setups = [s["with"] for s in steps if s.get("uses", "").startswith("actions/setup-python")]
    assert setups and all(s.get("cache") == "pip" for s in setups)


def test_cd_pushes_the_serve_image_to_ghcr_on_version_tags() -> None:
    cd = _workflow("cd.yml")
    assert cd["on"] == {"push": {"tags": ["v*"]}}
    assert cd["permissions"]["packages"] == "write"
    steps = _steps(cd)
    meta = next(s["with"] for s in steps if s.get("uses", "").startswith("docker/metadata-action"))
    assert meta["images"].startswith("ghcr.io/")
    assert "type=semver" in meta["tags"] and "type=sha" in meta["tags"]
    login = next(s["with"] for s in steps if s.get("uses", "").startswith("docker/login-action"))
    assert login["password"] == "${{ secrets.GITHUB_TOKEN }}"
    (build,) = [s["with"] for s in steps if s.get("uses", "").startswith("docker/build-push")]
    assert build["target"] == "serve" and build["push"] is True
    # Nothing secret is handed to the build: no build-args or secrets inputs at all.
    assert not {"build-args", "secrets", "secret-files"} & set(build)


def test_retrain_is_manual_or_scheduled_and_reports_metrics_and_decision() -> None:
    retrain = _workflow("retrain.yml")
    # Started from the Actions tab or by the clock; nothing the service exposes can start it.
    assert set(retrain["on"]) == {"workflow_dispatch", "schedule"}
    assert retrain["on"]["schedule"][0]["cron"]
    assert retrain["permissions"] == {"contents": "read"}
    steps = _steps(retrain)
    script = "\n".join(step.get("run", "") for step in steps)
    assert "dvc pull" in script and "dvc exp run" in script
    summary = next(s["run"] for s in steps if "GITHUB_STEP_SUMMARY" in s.get("run", ""))
    assert "dvc metrics diff --md" in summary and "decision.json" in summary
    # Workflow inputs reach the shell through env, never spliced into the script.
    assert "${{" not in script


# --------------------------------------------------------------------------- README diagram


def _mermaid_lines(text: str) -> list[str]:
    return [line.strip() for line in text.strip().splitlines() if line.strip()]


def test_readme_pipeline_diagram_is_dvc_dag_output() -> None:
    proc = subprocess.run(
        [str(BIN / "dvc"), "dag", "--mermaid"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "DVC_NO_ANALYTICS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```mermaid\n(.*?)```", readme, re.DOTALL)
    assert len(blocks) == 1, "README should hold exactly one mermaid block: the pipeline"
    assert _mermaid_lines(blocks[0]) == _mermaid_lines(proc.stdout), (
        "README's pipeline diagram is stale; replace its mermaid block with the output of "
        f"`dvc dag --mermaid`:\n{proc.stdout}"
    )


# --------------------------------------------------------------------------- serving venv


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _multipart(field: str, filename: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (
        (
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def _run(cmd: list[str], env: dict[str, str], cwd: Path) -> None:
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"{shlex.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr}"


@pytest.mark.slow
def test_serving_requirements_alone_serve_predict_under_gunicorn(
    tmp_path: Path,
    model_dir: Path,
) -> None:
    """The serve image's dependency list is enough: venv + files the serve stage copies."""
    requirements = REPO / "requirements-serve.txt"
    assert requirements.is_file(), (
        "requirements-serve.txt is missing: the serve image installs exactly that file"
    )
    serve = dockerfile_stages()["serve"]
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PYTHON", "VIRTUAL_ENV", "PIP_NO_CACHE", "CHESTCT_", "MLFLOW_"))
    }
    venv = tmp_path / "venv"
    # A venv of the base interpreter without system site-packages: nothing from .venv leaks in.
    # This environment's pip installs into it (--python), which spares ensurepip; pip's cache
    # is left on, so that a second run installs from it. --no-compile: byte-compiling
    # TensorFlow takes longer than the rest of the install.
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], env, tmp_path)
    python = str(venv / "bin" / "python")
    pip = [sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-compile"]
    _run([*pip, "-r", str(requirements)], env, tmp_path)

    # The build context as the serve stage sees it: COPY sources, then `pip install --no-deps .`
    app = tmp_path / "app"
    app.mkdir()
    for sources, dest in _copies(serve):
        for source in sources:
            origin = model_dir if source == "model" else REPO / source
            # "COPY a b ./" keeps the names; "COPY src ./src" names the target.
            target = app / source if dest.endswith("/") else app / dest
            if origin.is_dir():
                shutil.copytree(origin, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, target)
    _run([*pip, "--no-deps", str(app)], env, app)
    shutil.rmtree(app / "src")
    has_dvc = subprocess.run(
        [python, "-c", "import importlib.util as u; print(u.find_spec('dvc') is not None)"],
        capture_output=True,
        text=True,
        env=env,
    ).stdout.strip()
    assert has_dvc == "False", "the serving environment should not carry the pipeline's DVC"

    port = _free_port()
    env |= {
        "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        "CHESTCT_ROOT": str(app),
        "CHESTCT_BIND": f"127.0.0.1:{port}",
        "CHESTCT_WORKERS": "1",
    }
    log = (tmp_path / "gunicorn.log").open("w")
    server = subprocess.Popen(
        [str(venv / "bin" / "gunicorn"), "-c", "config/gunicorn.conf.py", "app:app"],
        cwd=app,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        loaded = False
        while time.monotonic() < deadline and server.poll() is None and not loaded:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as resp:
                    loaded = json.loads(resp.read()).get("model_loaded") is True
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if not loaded:
                time.sleep(0.5)
        log.flush()
        output = (tmp_path / "gunicorn.log").read_text(encoding="utf-8", errors="replace")
        assert loaded, f"gunicorn never reported a loaded model:\n{output[-4000:]}"

        # A synthetic slice: the service turns away pictures that are not CT-like (422).
        ok, png = cv2.imencode(".png", render_slice("normal", np.random.default_rng(3)))
        assert ok
        body, content_type = _multipart("file", "slice.png", png.tobytes())
        request = urllib.request.Request(
            f"{base}/predict", data=body, headers={"Content-Type": content_type}, method="POST"
        )
        with urllib.request.urlopen(request, timeout=60) as resp:
            assert resp.status == 200
            answer = json.loads(resp.read())
        assert answer["label"] in CLASSES
        assert sum(answer["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
