"""File helpers: content digests and writes that never leave a half-written file behind."""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's content, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_tree(folder: Path) -> str:
    """Digest of a folder: relative paths and contents of all files, in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(b"\0")
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def digest_of(path: Path) -> str:
    """sha256 of a file, or of a folder's tree."""
    return sha256_tree(path) if path.is_dir() else sha256_file(path)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


@contextmanager
def staged_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it into place only if the block succeeds.

    For writers (Keras, matplotlib, pandas) that want a file name rather than bytes.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        yield tmp
        Path(tmp).replace(path)
    finally:
        if tmp.exists():
            tmp.unlink()


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (names created, renamed or removed in it) to disk."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(folder: Path) -> None:
    """fsync every file below `folder`, then every folder, deepest first: all of it is on disk
    before a rename makes it visible."""
    folders = [folder]
    for path in sorted(folder.rglob("*"), reverse=True):
        if path.is_symlink():
            continue
        if path.is_dir():
            folders.append(path)
            continue
        with path.open("rb") as fh:
            os.fsync(fh.fileno())
    for path in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        fsync_dir(path)


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False if unsupported."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    if not hasattr(libc, "renameat2"):
        return False
    at_fdcwd = -100
    rc = libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def swap_dir(new: Path, target: Path) -> Path | None:
    """Put folder `new` in place of `target`, keeping what `target` held: returns the folder
    that now holds it (None when `target` did not exist). Readers see either folder whole.

    On Linux the swap is a single renameat2 exchange; elsewhere two renames leave a window of
    microseconds in which `target` is missing, which the predictor tolerates.
    """
    if not target.exists():
        Path(new).replace(target)
        return None
    if _exchange(new, target):
        return Path(new)  # `new` now holds the old contents
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    Path(target).replace(old)
    Path(new).replace(target)
    return old


def replace_dir(new: Path, target: Path) -> None:
    """Put folder `new` in place of `target` (see swap_dir) and delete the old contents."""
    old = swap_dir(new, target)
    if old is not None:
        shutil.rmtree(old)


def reset_dir(path: Path) -> Path:
    """Empty a stage's output folder (DVC also does this) and return it."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path
