"""chestct.cpu: the portable kernel caps, set by chestct.stages before NumPy/TF load."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from chestct.cpu import (
    PORTABLE_ENV,
    CpuError,
    cpu_flags,
    mode,
    portability_note,
    portable_environment,
)

SRC = Path(__file__).resolve().parents[2] / "src"
AVX512 = {"avx2", "fma", "avx512f", "avx512cd", "avx512bw", "avx512_vnni"}


def test_portable_environment_caps_every_library_at_avx2() -> None:
    caps = portable_environment({}, flags=AVX512)
    assert caps["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    assert caps["NPY_DISABLE_CPU_FEATURES"].split() == ["X86_V4", "AVX512_ICL", "AVX512_SPR"]
    assert caps["OPENBLAS_CORETYPE"] == "Haswell"
    assert caps["TF_NUM_INTRAOP_THREADS"] == PORTABLE_ENV["TF_NUM_INTRAOP_THREADS"]
    # OpenCV is told only about the AVX-512 targets this CPU has (it warns about others).
    assert caps["OPENCV_CPU_DISABLE"] == "AVX512F,AVX512-COMMON,AVX512-SKX,AVX512-CLX"
    assert "OPENCV_CPU_DISABLE" not in portable_environment({}, flags={"avx2", "fma"})


def test_a_stricter_user_setting_stays_and_a_looser_one_is_capped() -> None:
    assert portable_environment({"ONEDNN_MAX_CPU_ISA": "avx"}, AVX512)["ONEDNN_MAX_CPU_ISA"] == (
        "AVX"
    )
    for looser in ("AVX512_CORE", "AVX512_CORE_AMX", "ALL", "nonsense"):
        env = {"ONEDNN_MAX_CPU_ISA": looser}
        assert portable_environment(env, AVX512)["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    merged = portable_environment({"NPY_DISABLE_CPU_FEATURES": "X86_V3"}, AVX512)
    assert merged["NPY_DISABLE_CPU_FEATURES"].split()[0] == "X86_V3"


def test_mode_refuses_an_unknown_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHESTCT_CPU", "fast")
    with pytest.raises(CpuError, match="CHESTCT_CPU='fast': use portable"):
        mode()
    monkeypatch.setenv("CHESTCT_CPU", "Native")
    assert mode() == "native"


def test_portability_note_names_what_breaks_portability(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CHESTCT_CPU", raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert "capped at AVX2" in portability_note(AVX512, "x86_64")
    # XNNPACK (evaluate's scoring) has no cap: the note names the kernels it will pick.
    assert "XNNPACK's AVX-512 kernels" in portability_note(AVX512, "x86_64")
    assert "XNNPACK's AVX2 kernels" in portability_note({"avx2", "fma"}, "x86_64")
    assert "lacks avx2" in portability_note({"avx", "fma"}, "x86_64")
    assert "not x86-64" in portability_note(AVX512, "aarch64")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX")
    assert "ONEDNN_MAX_CPU_ISA=AVX is set" in portability_note(AVX512, "x86_64")
    monkeypatch.setenv("CHESTCT_CPU", "native")
    assert "CHESTCT_CPU=native" in portability_note(AVX512, "x86_64")


def test_cpu_flags_reads_proc_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 fma\n", encoding="utf-8")
    assert cpu_flags(info) == {"fpu", "sse", "avx2", "fma"}
    assert cpu_flags(tmp_path / "missing") is None


PROBE = """
import json, os, sys
import chestct.stages  # what `python -m chestct.stages.<x>` runs first
import numpy as np
from numpy._core._multiarray_umath import __cpu_features__ as npf
print(json.dumps({"env": {k: os.environ.get(k) for k in ("ONEDNN_MAX_CPU_ISA",
    "TF_NUM_INTRAOP_THREADS")}, "numpy_avx512": npf.get("X86_V4"),
    "numpy_avx2": npf.get("X86_V3")}))
"""


def _probe(extra: dict[str, str]) -> dict:
    import os

    env = {k: v for k, v in os.environ.items() if k not in PORTABLE_ENV} | extra
    env["PYTHONPATH"] = str(SRC)
    done = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout)


def test_importing_the_stages_package_caps_numpy_before_it_loads() -> None:
    probe = _probe({})
    assert probe["env"] == {"ONEDNN_MAX_CPU_ISA": "AVX2", "TF_NUM_INTRAOP_THREADS": "2"}
    assert probe["numpy_avx512"] is False  # NumPy's AVX-512 loops: disabled, or absent
    flags = cpu_flags() or set()
    if "avx2" in flags:
        assert probe["numpy_avx2"] is True  # AVX2 itself stays on
    native = _probe({"CHESTCT_CPU": "native"})
    assert native["env"]["ONEDNN_MAX_CPU_ISA"] is None
    if "avx512f" in flags:
        assert native["numpy_avx512"] is True
