"""Processes and memory for image work: a worker pool, one-thread OpenCV, malloc_trim.

resize and ingest fan decoding out over processes; each worker runs OpenCV on one thread
so that workers do not fight over the two cores, and freed image buffers go back to the OS.
"""

from __future__ import annotations

import ctypes
import functools
import multiprocessing
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from typing import Any

import cv2


@contextmanager
def single_threaded() -> Iterator[None]:
    """OpenCV on one thread while the block runs, restored after.

    Wrap the creation of a process pool with it: forked workers inherit the setting, so N
    processes use N cores instead of N x N threads contending for them. (Changing it inside a
    forked worker instead can deadlock OpenCV's thread pool.)
    """
    previous = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(previous)


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_image_buffers(limit_mb: int = 32) -> bool:
    """Let this process reuse freed image buffers instead of returning them to the kernel.

    glibc hands allocations above its mmap threshold (128 kB at first) to fresh mmaps, and
    shrinks the heap whenever its free top passes the trim threshold; a decoded slice (0.2 to
    several MB) then costs a round of page faults each time. Raising both keeps at most
    `limit_mb` (per threshold) of freed memory for the next image: measured in the resize
    stage, 7x fewer page faults per image. A no-op (False) where the C library is not glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        # The process's own symbol table holds the C library's (no library search needed).
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # a C library without mallopt
        return False
    size = limit_mb * 1024 * 1024
    return bool(mallopt(_M_MMAP_THRESHOLD, size)) and bool(mallopt(_M_TRIM_THRESHOLD, 2 * size))


def release_memory() -> bool:
    """Give freed heap memory back to the kernel now (glibc malloc_trim).

    A decoded image's temporaries come and go inside the heap; without this a long-lived
    process (a gunicorn worker) keeps the largest image's worth of freed pages resident and
    the next large image stacks on top (measured: a batch of sixteen images at the byte budget
    took a worker from 210 to 304 MB peak). The trim costs about 0.1 ms, and the pages it
    hands back are faulted in again by the next image (about 0.4 ms more on a 512 x 512
    slice), so call it after large images only. False where the C library is not glibc.
    """
    trim = _malloc_trim()
    return trim is not None and bool(trim(0))


@functools.cache
def _malloc_trim() -> Any:
    """glibc's malloc_trim, looked up once (a CDLL lookup costs more than the trim of a small
    heap); None where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def _worker_setup(threads_too: bool) -> None:
    if threads_too:
        cv2.setNumThreads(1)
    keep_image_buffers()


@contextmanager
def worker_pool(workers: int) -> Iterator[ProcessPoolExecutor]:
    """A process pool for per-image work: N processes on N cores, each OpenCV single-threaded.

    A caller without TensorFlow (the pipeline's data stages) forks, which starts workers in
    milliseconds; OpenCV is set to one thread before the fork because reconfiguring it inside
    a forked child can deadlock. A caller that has loaded TensorFlow (a test session, a
    notebook) cannot be forked safely, so its workers come from a fork server instead (about a
    second to start) and set OpenCV themselves. Each worker keeps its freed image buffers
    (`keep_image_buffers`).
    """
    if "tensorflow" in sys.modules:
        context = multiprocessing.get_context("forkserver")
        with ProcessPoolExecutor(
            workers, mp_context=context, initializer=_worker_setup, initargs=(True,)
        ) as pool:
            yield pool
    else:
        context = multiprocessing.get_context("fork")
        with (
            single_threaded(),
            ProcessPoolExecutor(
                workers, mp_context=context, initializer=_worker_setup, initargs=(False,)
            ) as pool,
        ):
            yield pool
