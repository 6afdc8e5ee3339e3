"""Portable CPU kernels: every stage computes with the same instruction set on any x86-64
machine with AVX2 and FMA, so that the same inputs give the same bytes (and dvc.lock) there.

oneDNN (TensorFlow's convolutions and matrix products, with or without TF_ENABLE_ONEDNN_OPTS),
OpenBLAS (NumPy's and SciPy's linear algebra), NumPy's own loops and OpenCV each pick kernels
by the CPU they find, and an AVX-512 kernel sums in another order than an AVX2 one: the weights
differ in the last bits after one epoch. Each library reads a cap from the environment once,
when it first runs, so `pin_kernels()` must run before NumPy, OpenCV or TensorFlow are imported:
chestct.stages/__init__.py calls it, which Python runs before any stage module's imports.

`CHESTCT_CPU=native` turns the caps off (every instruction the CPU has; faster on AVX-512
machines, and results that only machines of the same kind reproduce). docs/reproducibility.md
has what was measured.
"""

from __future__ import annotations

import os
from pathlib import Path

MODE_ENV = "CHESTCT_CPU"  # portable (default) | native

# oneDNN's instruction sets, weakest first (ONEDNN_MAX_CPU_ISA values; dnnl_cpu_isa_t).
ONEDNN_ISAS = (
    "SSE41",
    "AVX",
    "AVX2",
    "AVX2_VNNI",
    "AVX2_VNNI_2",
    "AVX512_CORE",
    "AVX512_CORE_VNNI",
    "AVX512_CORE_BF16",
    "AVX10_1_512",
    "AVX512_CORE_FP16",
    "AVX10_1_512_AMX",
    "AVX512_CORE_AMX",
    "AVX10_1_512_AMX_FP16",
    "AVX512_CORE_AMX_FP16",
    "DEFAULT",
    "ALL",
)
PORTABLE_ISA = "AVX2"
# Threads of TensorFlow's (and oneDNN's) pool: a matrix product is split among them and each
# part summed apart, so 1, 2 and 4 threads give three different sets of weights (measured).
# Fixed, then, whatever the machine's core count; 2 is this project's CI and test machine.
PORTABLE_THREADS = "2"
# What a portable run needs from the CPU (/proc/cpuinfo flag names).
REQUIRED_FLAGS = ("avx2", "fma")

# The caps, all at the AVX2 + FMA level (x86-64-v3). Values a user set stay when they are at
# least as strict (a lower oneDNN ISA, more disabled features).
PORTABLE_ENV = {
    "ONEDNN_MAX_CPU_ISA": PORTABLE_ISA,
    # NumPy >= 2.4 dispatch groups above x86-64-v3 (AVX-512).
    "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR",
    "OPENBLAS_CORETYPE": "Haswell",  # OpenBLAS' AVX2 kernels
    "OPENBLAS_NUM_THREADS": "1",  # NumPy's linear algebra here is small: one thread, one order
    "TF_NUM_INTRAOP_THREADS": PORTABLE_THREADS,
    # TensorFlow's oneDNN ops (on by default on x86 Linux): off, convolutions run Eigen's
    # kernels, which round otherwise (measured: other weights). Kept on whatever the shell says.
    "TF_ENABLE_ONEDNN_OPTS": "1",
}
# OpenCV's AVX-512 dispatch targets and the /proc/cpuinfo flags that reveal each: OpenCV warns
# about disabling a target the CPU lacks, so only those present are named.
OPENCV_AVX512 = {
    "AVX512F": "avx512f",
    "AVX512-COMMON": "avx512cd",
    "AVX512-SKX": "avx512bw",
    "AVX512-CNL": "avx512ifma",
    "AVX512-CLX": "avx512_vnni",
    "AVX512-ICL": "avx512_vbmi2",
}


class CpuError(ValueError):
    """CHESTCT_CPU has a value other than portable or native."""


def mode() -> str:
    """portable (the default) or native, from CHESTCT_CPU."""
    value = os.environ.get(MODE_ENV, "portable").strip().lower() or "portable"
    if value not in ("portable", "native"):
        raise CpuError(
            f"{MODE_ENV}={os.environ[MODE_ENV]!r}: use portable (the default: the same bytes on "
            "every x86-64 machine with AVX2) or native (every instruction this CPU has)"
        )
    return value


def _stricter_isa(current: str | None) -> str:
    """The lower of `current` (a user's ONEDNN_MAX_CPU_ISA) and the portable cap."""
    isa = (current or "").upper()
    if isa in ONEDNN_ISAS and ONEDNN_ISAS.index(isa) < ONEDNN_ISAS.index(PORTABLE_ISA):
        return isa
    return PORTABLE_ISA


def _union(current: str | None, extra: str, sep: str) -> str:
    items = [i for i in (current or "").replace(",", " ").split() if i]
    items += [i for i in extra.replace(",", " ").split() if i not in items]
    return sep.join(items)


def portable_environment(
    env: dict[str, str] | None = None, flags: set[str] | None = None
) -> dict[str, str]:
    """The cap variables for `env` (default: os.environ) in portable mode, merged with what is
    already set there; `flags` are the CPU's (default: read from /proc/cpuinfo)."""
    env = dict(os.environ if env is None else env)
    flags = (cpu_flags() or set()) if flags is None else flags
    opencv = ",".join(name for name, flag in OPENCV_AVX512.items() if flag in flags)
    caps = {
        "ONEDNN_MAX_CPU_ISA": _stricter_isa(env.get("ONEDNN_MAX_CPU_ISA")),
        "NPY_DISABLE_CPU_FEATURES": _union(
            env.get("NPY_DISABLE_CPU_FEATURES"), PORTABLE_ENV["NPY_DISABLE_CPU_FEATURES"], " "
        ),
        "OPENBLAS_CORETYPE": env.get("OPENBLAS_CORETYPE") or PORTABLE_ENV["OPENBLAS_CORETYPE"],
        "OPENBLAS_NUM_THREADS": PORTABLE_ENV["OPENBLAS_NUM_THREADS"],
        "TF_NUM_INTRAOP_THREADS": PORTABLE_THREADS,
        "TF_ENABLE_ONEDNN_OPTS": PORTABLE_ENV["TF_ENABLE_ONEDNN_OPTS"],
    }
    if opencv or env.get("OPENCV_CPU_DISABLE"):
        caps["OPENCV_CPU_DISABLE"] = _union(env.get("OPENCV_CPU_DISABLE"), opencv, ",")
    return caps


def pin_kernels() -> dict[str, str]:
    """Set the caps in os.environ (portable mode); returns what was set ({} when native).

    They take effect for the libraries not yet loaded and for child processes: a stage run as
    `python -m chestct.stages.<x>` gets all of them (chestct.stages runs this first); a process
    that imported NumPy before (a test, a notebook) keeps NumPy's kernels as they were.
    """
    if mode() == "native":
        return {}
    caps = portable_environment()
    os.environ.update(caps)
    return caps


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str] | None:
    """This CPU's feature flags (Linux), or None where /proc/cpuinfo cannot say."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return None


def portability_note(flags: set[str] | None = None, machine: str | None = None) -> str:
    """One line for the user: will this machine's outputs match other machines' dvc.lock?"""
    import platform

    machine = (machine or platform.machine()).lower()
    try:
        chosen = mode()
    except CpuError as exc:
        return str(exc)
    if machine not in ("x86_64", "amd64"):
        return (
            f"CPU {machine}: not x86-64, so train, evaluate and promote give other bytes than "
            "dvc.lock made on x86-64; `dvc repro` reruns them (docs/reproducibility.md)"
        )
    if chosen == "native":
        return (
            f"{MODE_ENV}=native: every instruction this CPU has; train onwards match only "
            "machines of the same kind (unset it for portable outputs)"
        )
    flags = cpu_flags() if flags is None else flags
    missing = [f for f in REQUIRED_FLAGS if flags is not None and f not in flags]
    if missing:
        return (
            f"this CPU lacks {', '.join(missing)}: train onwards give other bytes than a "
            "dvc.lock made on an AVX2 machine (docs/reproducibility.md)"
        )
    isa = _stricter_isa(os.environ.get("ONEDNN_MAX_CPU_ISA"))
    if isa != PORTABLE_ISA:
        return (
            f"ONEDNN_MAX_CPU_ISA={isa} is set: train onwards give other bytes than a dvc.lock "
            "made with the portable AVX2 kernels (unset it)"
        )
    # evaluate scores the served LiteRT file with XNNPACK, which reads CPUID itself: no cap.
    xnnpack = "AVX-512" if flags is not None and "avx512f" in flags else "AVX2"
    return (
        "CPU kernels capped at AVX2 + FMA: ingest to train match any x86-64 machine with AVX2; "
        f"evaluate and promote score with XNNPACK's {xnnpack} kernels (no cap) and match "
        f"other {xnnpack} machines only (docs/reproducibility.md)"
    )
