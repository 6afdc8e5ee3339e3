"""Where ingest finds its images: a local folder, an archive, or an archive behind a URL.

Every source ends as a folder in the Kaggle layout (`[train|valid|test/]<class>/<file>`) that
`scan_source` lists, for ingest and for the research helpers (chestct.research.eda). `resolve`
makes a source local: an archive is unpacked through chestct.data.archives (every entry checked
before anything is written), a URL is fetched through chestct.data.downloads (the archive's
sha256 checked before it appears), both bounded by SourceLimits (params `ingest.*`).

Secrets stay out of params (which DVC writes to dvc.lock and stages log to MLflow and
pointer.json): a URL that needs a signature goes in the environment
(`ingest.source: env:CHESTCT_SOURCE_URL`), a bearer token in CHESTCT_SOURCE_TOKEN.
"""

from __future__ import annotations

import logging
import os
import stat
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from chestct.data.archives import archive_kind, safe_extract
from chestct.data.downloads import download, redact
from chestct.data.source_limits import MB, SourceError, SourceLimits
from chestct.fsutil import sha256_file
from chestct.labels import CLASSES, label_for_folder

log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "valid", "test")
ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz", ".tar")
# Folders that archivers and desktops add and that never hold data.
IGNORED_DIRS = frozenset({"__MACOSX", ".DS_Store", "@eaDir", "$RECYCLE.BIN"})
ENV_PREFIX = "env:"  # a source read from the environment variable it names


def source_url(source: str) -> str:
    """`source` itself, or the URL in the environment variable an `env:NAME` source names."""
    if not source.startswith(ENV_PREFIX):
        return source
    name = source[len(ENV_PREFIX) :]
    value = os.environ.get(name, "").strip()
    if not value:
        raise SourceError(
            f"ingest.source is {source!r} but the environment variable {name} is empty; "
            "export it with the archive's URL"
        )
    if not is_url(value):
        raise SourceError(f"{name} must hold an http(s) URL, got {redact(value)!r}")
    return value


@dataclass(frozen=True)
class Source:
    """A source made local: `folder` holds the files; `origin` is what the user named."""

    kind: str  # folder | archive | url
    origin: str
    folder: Path
    archive_sha256: str | None = None  # for archives and URLs

    def describe(self, path: Path) -> str:
        """How a file of this source is named in the manifest (its origin, not the staging)."""
        if self.kind == "folder":
            return str(path)
        return f"{self.origin}::{path.relative_to(self.folder).as_posix()}"


def is_url(source: str) -> bool:
    return source.lower().startswith(("http://", "https://"))


def _hidden(path: Path) -> bool:
    """Dot files and the folders archivers and desktops add (IGNORED_DIRS): never data."""
    return path.name.startswith(".") or path.name in IGNORED_DIRS


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not _hidden(p))


def _class_folders(folder: Path, class_map: dict[str, str]) -> list[tuple[Path, str]]:
    found = []
    for child in _visible_dirs(folder):
        label = label_for_folder(child.name, class_map)
        if label is None:
            raise SourceError(
                f"{child}: folder name does not name a class ({', '.join(CLASSES)}); rename it "
                "or map it in params.yaml under ingest.class_map"
            )
        if label not in CLASSES:
            raise SourceError(
                f"ingest.class_map maps {child.name!r} to {label!r}, which is not one of "
                f"{', '.join(CLASSES)}"
            )
        found.append((child, label))
    return found


def _kind_error(mode: int) -> str | None:
    """Why a file of this mode cannot be ingested, or None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISFIFO(mode):
        return "is a FIFO (named pipe): reading it would wait forever"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device file"
    if stat.S_ISSOCK(mode):
        return "is a socket"
    return "is not a regular file"


def check_file(path: Path, max_bytes: int, st: os.stat_result | None = None) -> None:
    """Refuse a source file that is not a regular file (FIFO, device, socket) or is larger
    than `max_bytes` (params ingest.max_file_mb), with a SourceError naming it."""
    try:
        st = st or path.stat()
    except OSError as exc:
        raise SourceError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    reason = _kind_error(st.st_mode)
    if reason:
        raise SourceError(f"{path} {reason}; remove it from the source")
    if st.st_size > max_bytes:
        raise SourceError(
            f"{path} is {st.st_size / MB:,.1f} MB, over ingest.max_file_mb = "
            f"{max_bytes / MB:g} MB; remove it from the source, or raise ingest.max_file_mb if "
            "slices really are that large"
        )


def read_file(path: Path, max_bytes: int) -> bytes:
    """A source file's bytes, checked on the open file (a file swapped for a FIFO or a larger
    file after the scan is refused, not waited on), at most `max_bytes`."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        check_file(path, max_bytes, os.fstat(fd))
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(max_bytes + 1)
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise SourceError(f"{path} grew over ingest.max_file_mb while it was read")
    return data


def _inside(path: Path, root: Path, what: str) -> Path:
    """`path` resolved, refused when it (through a symbolic link) leads outside `root`."""
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError) as exc:
        raise SourceError(f"{path}: a broken or looping symbolic link ({exc})") from None
    if not real.is_relative_to(root):
        raise SourceError(
            f"{path}: {what} is a symbolic link to {real}, outside the source folder {root}; "
            "copy the files into the folder instead (links leaving it are refused)"
        )
    return real


def _files_under(folder: Path, root: Path, max_bytes: int) -> list[Path]:
    """Every visible file below `folder` (any extension: DICOM files often have none).

    Symbolic links are followed only while they stay inside `root` (the resolved source
    folder); FIFOs, devices, sockets and files over `max_bytes` are refused.
    """
    files = []
    seen = {_inside(folder, root, "the folder")}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        here = Path(dirpath)
        keep = []
        for name in sorted(d for d in dirnames if not _hidden(Path(d))):
            real = _inside(here / name, root, "the folder")
            if real not in seen:  # a link back up the tree is walked once
                seen.add(real)
                keep.append(name)
        dirnames[:] = keep
        for name in sorted(f for f in filenames if not f.startswith(".")):
            path = here / name
            if path.is_symlink():
                _inside(path, root, "the file")
            try:
                st = path.stat()
            except OSError as exc:
                raise SourceError(f"{path}: cannot be read ({exc.strerror or exc})") from None
            check_file(path, max_bytes, st)
            files.append(path)
    return files


def scan_source(
    source: Path, class_map: dict[str, str], max_file_bytes: int | None = None
) -> list[tuple[str, str, Path]]:
    """(split, label, file) for every file in a Kaggle-layout folder.

    Split folders are optional: a folder with class folders directly in it has no splits ("").

    Raises:
        SourceError: a layout that names no class, a symbolic link that leaves `source`, a
            FIFO, device or socket, or a file over `max_file_bytes` (ingest.max_file_mb).
    """
    if not source.is_dir():
        raise SourceError(
            f"ingest.source {str(source)!r} is not a folder; use `synthetic` or a folder in the "
            "layout [train|valid|test/]<class>/<image>"
        )
    max_bytes = SourceLimits().max_file_bytes if max_file_bytes is None else max_file_bytes
    root = source.resolve()
    split_dirs = [source / s for s in SPLIT_NAMES if (source / s).is_dir()]
    groups = [(d.name, d) for d in split_dirs] if split_dirs else [("", source)]
    files: list[tuple[str, str, Path]] = []
    for split, folder in groups:
        _inside(folder, root, "the split folder")
        class_dirs = _class_folders(folder, class_map)
        if not class_dirs:
            raise SourceError(
                f"{folder}: no class folders in it; expected [train|valid|test/]<class>/<image> "
                f"with classes {', '.join(CLASSES)}"
            )
        for class_dir, label in class_dirs:
            images = _files_under(class_dir, root, max_bytes)
            if not images:
                raise SourceError(f"{class_dir}: class folder has no files")
            files.extend((split, label, p) for p in images)
    if not files:
        raise SourceError(f"{source}: no image files found")
    return files


def layout_root(folder: Path) -> Path:
    """The folder that holds the split or class folders, descending through wrapper folders.

    Archives often wrap their content in one folder (such as `Data/`, maybe beside a README); a
    folder whose only sub-folder names neither a split nor a class is descended into.
    """
    while True:
        dirs = _visible_dirs(folder)
        if (
            len(dirs) == 1
            and dirs[0].name.lower() not in SPLIT_NAMES
            and label_for_folder(dirs[0].name) is None
        ):
            folder = dirs[0]
            continue
        return folder


def _cached_download(url: str, name: str, sha256: str, cache: Path, limits: SourceLimits) -> Path:
    """The archive from `cache` when a file with this digest is there, else downloaded into it.

    The cache is keyed by the digest that params pin, so a hit is the same file whatever the
    URL; it is hashed again before use, and a damaged copy is replaced.
    """
    path = cache / sha256.lower() / name
    if path.is_file():
        if sha256_file(path) == sha256.lower():
            log.info("using the cached download %s (sha256 verified)", path)
            return path
        log.warning("cached download %s does not match its sha256; downloading again", path)
        path.unlink()
    return download(url, path, sha256, limits)


def resolve(
    source: str,
    root: Path,
    staging: Path,
    sha256: str = "",
    cache: Path | None = None,
    limits: SourceLimits | None = None,
) -> Source:
    """Make `source` (params `ingest.source`) a local folder; archives land in `staging`.

    Args:
        source: a folder, an archive, or an http(s) URL of an archive; relative paths are
            relative to the project root, `~` is expanded.
        root: project root.
        staging: an empty scratch folder the caller removes afterwards.
        sha256: the archive's expected digest ('' for local sources: then it is not checked).
        cache: keep downloaded archives here by digest and reuse them (None: download into
            `staging` and drop the archive once unpacked).
        limits: caps on downloads and archives (defaults: SourceLimits()).
    """
    limits = limits or SourceLimits()
    named = source
    source = source_url(source)
    if is_url(source):
        if not sha256:
            raise SourceError(
                "ingest.sha256 is required for a URL source: set it to the archive's sha256"
            )
        name = Path(urllib.parse.urlsplit(source).path).name or "download"
        if cache is not None:
            archive = _cached_download(source, name, sha256, cache, limits)
        else:
            archive = download(source, staging / "download" / name, sha256, limits)
        folder = safe_extract(archive, staging / "unpacked", limits)
        if cache is None:
            archive.unlink()  # only the cache keeps archives
        origin = named if named != source else redact(source)
        return Source("url", origin, layout_root(folder), sha256.lower())
    path = Path(source).expanduser()
    path = (path if path.is_absolute() else root / path).resolve()
    if path.is_dir():
        return Source("folder", str(path), path)
    if path.is_file():
        if archive_kind(path) is None:
            raise SourceError(
                f"ingest.source {source!r} is a file but not a .zip, .tar.gz or .tgz archive; "
                "point it at a folder, an archive or an http(s) URL"
            )
        actual = sha256_file(path)
        if sha256 and actual != sha256.lower():
            raise SourceError(
                f"ingest.source {source!r}: sha256 is {actual} but ingest.sha256 is "
                f"{sha256.lower()}; the archive changed. Set ingest.sha256 to '' or to the "
                "new digest"
            )
        folder = safe_extract(path, staging / "unpacked", limits)
        return Source("archive", str(path), layout_root(folder), actual)
    raise SourceError(
        f"ingest.source {str(path)!r} is not a folder, an archive or a URL (nothing exists "
        "there); use `synthetic`, a folder in the layout [train|valid|test/]<class>/<image>, "
        "a .zip/.tar.gz/.tgz archive of one, or an http(s) URL with ingest.sha256"
    )
