"""Bit-identical outputs across x86-64 machines (docs/reproducibility.md).

One machine cannot be another, but each library that picks kernels by CPU reads a cap from the
environment, which is how a machine with fewer instructions is imitated here: an AVX2-only
machine is ONEDNN_MAX_CPU_ISA=AVX2 + NumPy, OpenBLAS and OpenCV capped alike. The tiny pipeline's
train, evaluate and promote outputs must hash the same under the product's portable caps,
whatever machine is imitated and whether TF_ENABLE_ONEDNN_OPTS is on or off. The control:
with the caps off (CHESTCT_CPU=native), an AVX-512 machine's weights differ from an AVX2
machine's, which is the failure the caps fix. A one-core machine is imitated with taskset.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from chestct.cpu import PORTABLE_ENV, cpu_flags, portable_environment
from project_copy import pipeline_env, project_copy, run

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

FLAGS = cpu_flags() or set()
# The caps chestct.cpu sets in os.environ when a test before this one imported chestct.stages:
# a child would inherit them, and "native" keeps a cap it finds (it is the user's), so each
# imitated machine starts from an environment without them.
CAP_VARIABLES = {*PORTABLE_ENV, "OPENCV_CPU_DISABLE", "CHESTCT_CPU"}
# An AVX2-only machine, imitated: every library capped as the portable mode caps it.
AVX2_MACHINE = portable_environment({}, flags=FLAGS) | {"CHESTCT_CPU": "native"}


def digest(path: Path) -> str:
    """sha256 over a file, or over a folder's files (names and bytes, sorted)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if f.name == "promotion.json":  # run-specific, outside DVC's hash (.dvcignore)
            continue
        h.update(f.relative_to(path.parent).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = project_copy(tmp_path_factory.mktemp("portable"))
    env = pipeline_env(root)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "c"]):
        run(cmd, root, env)
    run(["dvc", "repro", "validate", "base-model"], root, env)
    return root


def outputs(
    root: Path, extra: dict[str, str], stages: tuple[str, ...], prefix: tuple[str, ...] = ()
) -> dict[str, str]:
    """Run `stages` in order with `extra` in the environment (after the command `prefix`, e.g.
    taskset); the hashes of what they wrote."""
    env = {k: v for k, v in pipeline_env(root).items() if k not in CAP_VARIABLES} | extra
    if "promote" in stages:
        shutil.rmtree(root / "model", ignore_errors=True)  # no champion: promote promotes
    hashes = {}
    for stage in stages:
        done = subprocess.run(
            [*prefix, sys.executable, "-m", f"chestct.stages.{stage.replace('-', '_')}"],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        hashes[stage] = digest(root / "artifacts" / stage)
        if (root / "reports" / stage).is_dir():  # metrics and plot tables (git-tracked)
            hashes[f"{stage} reports"] = digest(root / "reports" / stage)
    if "promote" in stages:
        hashes["model"] = digest(root / "model")
    return hashes


ALL = ("train", "evaluate", "promote")


def outputs_of(hashes: dict[str, str], stages: tuple[str, ...]) -> list[str]:
    """The keys of `hashes` that `stages` wrote (their folders, reports and model/)."""
    return [k for k in hashes if k.split()[0] in stages or (k == "model" and "promote" in stages)]


def test_portable_outputs_match_across_imitated_machines(copy: Path) -> None:
    here = outputs(copy, {}, ALL)
    # promote's inputs are then the same; its own kernels (LiteRT, parity) are checked once.
    quick = ("train", "evaluate")
    machines = {
        "AVX2 machine": AVX2_MACHINE,
        "AVX-512 machine, oneDNN ops off": {
            "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16",
            "TF_ENABLE_ONEDNN_OPTS": "0",
        },
    }
    for name, env in machines.items():
        stages = ALL if name == "AVX2 machine" else quick
        assert outputs(copy, env, stages) == {k: here[k] for k in outputs_of(here, stages)}, name
    # A one-core machine: TensorFlow would size its thread pool to one core; the pin keeps 2.
    if shutil.which("taskset"):
        one_core = outputs(copy, {}, quick, ("taskset", "-c", "0"))
        assert one_core == {k: here[k] for k in outputs_of(here, quick)}


@pytest.mark.skipif("avx512f" not in FLAGS, reason="the control needs an AVX-512 CPU")
def test_without_the_caps_an_avx512_machine_trains_other_weights(copy: Path) -> None:
    native = outputs(copy, {"CHESTCT_CPU": "native"}, ("train",))
    assert outputs(copy, AVX2_MACHINE, ("train",)) != native
