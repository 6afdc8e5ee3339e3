"""Where ingest finds its images: a local folder, an archive, or an archive behind a URL.

Every source ends as a folder in the Kaggle layout (`[train|valid|test/]<class>/<file>`) that
`scan_source` lists, for ingest and for the research helpers (chestct.research.eda). Archives
are checked entry by entry before anything is written: an entry that would land outside the
target folder (`../`, an absolute path, a drive letter) or that is a link or a device is refused,
with its name. A URL needs the archive's sha256: the download goes to a
`.part` file, is hashed on the way, and is renamed into place (and unpacked) only when the digest
matches, so a failed or tampered download leaves nothing behind.

Both are bounded (SourceLimits, params `ingest.*`): a download by its size, a total-time deadline
and the hosts a redirect may lead to; an archive by its member count, its total unpacked size
and its compression ratio, checked from the headers before anything is written. Secrets stay
out of params (which DVC writes to dvc.lock and stages log to MLflow and pointer.json): a URL
that needs a signature goes in the environment (`ingest.source: env:CHESTCT_SOURCE_URL`), a
bearer token in CHESTCT_SOURCE_TOKEN.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import stat
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from tqdm import tqdm

from chestct.fsutil import sha256_file
from chestct.labels import CLASSES, label_for_folder

log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "valid", "test")
ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz", ".tar")
# Folders that archivers and desktops add and that never hold data.
IGNORED_DIRS = frozenset({"__MACOSX", ".DS_Store", "@eaDir", "$RECYCLE.BIN"})
_CHUNK = 1 << 20


# Environment variables that carry what must not be written to params.yaml.
TOKEN_ENV = "CHESTCT_SOURCE_TOKEN"  # sent as `Authorization: Bearer`, to the source's host only
ENV_PREFIX = "env:"
MB = 1024 * 1024


class SourceError(ValueError):
    """A source that cannot be used; the message names it and says what to do."""


@dataclass(frozen=True)
class SourceLimits:
    """What a source may cost (params ingest.timeout_s, deadline_s, max_download_mb,
    redirect_hosts, max_members, max_unpacked_mb, max_ratio)."""

    timeout_s: float = 60.0  # a download's wait for each answer
    deadline_s: float = 3600.0
    max_download_bytes: int = 10 * 1024 * MB
    redirect_hosts: tuple[str, ...] = ()
    max_members: int = 100_000
    max_unpacked_bytes: int = 20 * 1024 * MB
    max_ratio: float = 100.0


def limits_from(ingest: Any) -> SourceLimits:
    """SourceLimits from the ingest params (settings.IngestParams)."""
    return SourceLimits(
        timeout_s=float(ingest.timeout_s),
        deadline_s=float(ingest.deadline_s),
        max_download_bytes=int(ingest.max_download_mb * MB),
        redirect_hosts=tuple(ingest.redirect_hosts),
        max_members=int(ingest.max_members),
        max_unpacked_bytes=int(ingest.max_unpacked_mb * MB),
        max_ratio=float(ingest.max_ratio),
    )


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


def redact(url: str) -> str:
    """A URL without credentials or query string (signed download links carry tokens)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


def archive_kind(path: Path) -> str | None:
    """'zip' or 'tar' by content (any compression tarfile reads), else None."""
    with path.open("rb") as fh:
        head = fh.read(4)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    try:
        if tarfile.is_tarfile(path):
            return "tar"
    except (OSError, tarfile.TarError):
        return None
    return None


def _checked_name(name: str, archive: Path) -> PurePosixPath:
    """An archive entry's name as a safe relative path, or SourceError naming the entry."""
    clean = name.replace("\\", "/")
    if clean.startswith("/") or re.match(r"^[A-Za-z]:", clean):
        raise SourceError(
            f"{archive}: entry {name!r} has an absolute path; refusing to unpack an archive "
            "whose entries could land outside the target folder"
        )
    rel = PurePosixPath(clean)
    if ".." in rel.parts:
        raise SourceError(
            f"{archive}: entry {name!r} climbs out of the target folder ('..'); refusing to "
            "unpack it (path traversal)"
        )
    return rel


def _check_space(total: int, target: Path, archive: Path) -> None:
    free = shutil.disk_usage(target.parent).free
    if total > free:
        raise SourceError(
            f"{archive}: unpacking needs {total / 1e9:.1f} GB but only {free / 1e9:.1f} GB is "
            f"free under {target.parent}; free some space"
        )


def _check_totals(
    archive: Path, members: int, unpacked: int, limits: SourceLimits, packed: int | None = None
) -> None:
    """Refuse an archive over its member count, unpacked size or compression ratio."""
    if members > limits.max_members:
        raise SourceError(
            f"{archive}: more than {limits.max_members:,} entries (ingest.max_members); "
            "refusing to unpack it. Raise the limit if the archive is genuine"
        )
    if unpacked > limits.max_unpacked_bytes:
        raise SourceError(
            f"{archive}: unpacks to more than {limits.max_unpacked_bytes / MB:,.0f} MB "
            "(ingest.max_unpacked_mb); refusing to unpack it"
        )
    size = archive.stat().st_size if packed is None else packed
    if unpacked > 1 * MB and unpacked > limits.max_ratio * max(size, 1):
        raise SourceError(
            f"{archive}: {size:,} bytes unpack to {unpacked:,}, a ratio over "
            f"{limits.max_ratio:g} (ingest.max_ratio): a decompression bomb? Refusing it"
        )


def _extract_zip(archive: Path, target: Path, limits: SourceLimits) -> None:
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise SourceError(f"{archive}: not a readable zip archive ({exc})") from None
    with zf:
        infos = zf.infolist()
        for info in infos:
            _checked_name(info.filename, archive)
            kind = stat.S_IFMT(info.external_attr >> 16)
            if kind == stat.S_IFLNK:
                raise SourceError(
                    f"{archive}: entry {info.filename!r} is a symbolic link; refusing to unpack "
                    "an archive with links (they can point outside the target folder)"
                )
            if info.flag_bits & 0x1:
                raise SourceError(
                    f"{archive}: entry {info.filename!r} is encrypted; unpack it yourself and "
                    "point ingest.source at the folder"
                )
        _check_totals(archive, len(infos), sum(i.file_size for i in infos), limits)
        for info in infos:  # one bomb member inside an otherwise plain archive
            if info.file_size > MB and info.file_size > limits.max_ratio * max(
                info.compress_size, 1
            ):
                _check_totals(archive, 1, info.file_size, limits, info.compress_size)
        _check_space(sum(i.file_size for i in infos), target, archive)
        try:
            for info in infos:
                dest = target.joinpath(*_checked_name(info.filename, archive).parts)
                if info.is_dir():
                    dest.mkdir(parents=True, exist_ok=True)
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, dest.open("wb") as out:
                    # At most the declared size: a forged header cannot write more.
                    while chunk := src.read(min(_CHUNK, info.file_size + 1 - out.tell())):
                        out.write(chunk)
                        if out.tell() > info.file_size:
                            raise SourceError(
                                f"{archive}: entry {info.filename!r} holds more than the "
                                f"{info.file_size:,} bytes its header declares; refusing it"
                            )
        except (zipfile.BadZipFile, EOFError, zipfile.LargeZipFile) as exc:
            raise SourceError(f"{archive}: corrupt zip archive ({exc})") from None


def _extract_tar(archive: Path, target: Path, limits: SourceLimits) -> None:
    try:
        tf = tarfile.open(archive, "r:*")  # noqa: SIM115 - closed by the `with tf` below
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise SourceError(f"{archive}: not a readable tar archive ({exc})") from None
    with tf:
        # Headers one by one, the totals checked before the next header is looked for: in a
        # compressed tar that means inflating the previous member's data, which a bomb makes
        # endless.
        members: list[tarfile.TarInfo] = []
        unpacked = 0
        try:
            while (member := tf.next()) is not None:
                members.append(member)
                unpacked += member.size if member.isfile() else 0
                _check_totals(archive, len(members), unpacked, limits)
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise SourceError(f"{archive}: corrupt or truncated tar archive ({exc})") from None
        for member in members:
            _checked_name(member.name, archive)
            if member.issym() or member.islnk():
                raise SourceError(
                    f"{archive}: entry {member.name!r} is a link (to {member.linkname!r}); "
                    "refusing to unpack an archive with links"
                )
            if not (member.isfile() or member.isdir()):
                raise SourceError(
                    f"{archive}: entry {member.name!r} is a device or FIFO; refusing to unpack it"
                )
        _check_space(sum(m.size for m in members if m.isfile()), target, archive)
        try:
            # The checks above already refuse what the 'data' filter would; it stays as a
            # second guard (and drops set-uid bits and odd permissions).
            tf.extractall(target, members=members, filter="data")
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise SourceError(f"{archive}: corrupt or truncated tar archive ({exc})") from None


def safe_extract(archive: Path, target: Path, limits: SourceLimits | None = None) -> Path:
    """Unpack a zip or tar archive into `target` (which must not exist), atomically.

    Entries are checked first; the archive is unpacked into a temporary sibling folder that is
    renamed to `target` only when everything is out, and removed on any failure.

    Raises:
        SourceError: not an archive, a refused entry, corrupt data, too little disk space, or
            more entries, unpacked bytes or compression than `limits` allow.
    """
    limits = limits or SourceLimits()
    kind = archive_kind(archive)
    if kind is None:
        raise SourceError(
            f"{archive}: not a .zip, .tar.gz or .tgz archive (by content); point ingest.source "
            "at a folder, an archive, or an http(s) URL of an archive"
        )
    tmp = target.with_name(f".{target.name}.unpacking")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        (_extract_zip if kind == "zip" else _extract_tar)(archive, tmp, limits)
        tmp.replace(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only to the same scheme and host, to https on the same host, or to a
    host listed in params ingest.redirect_hosts (over https, or the scheme it came with)."""

    def __init__(self, origin: str, allowed: tuple[str, ...]) -> None:
        self.origin = urllib.parse.urlsplit(origin)
        self.allowed = {h.lower() for h in allowed}

    def redirect_request(  # type: ignore[override]
        self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> urllib.request.Request | None:
        new = urllib.parse.urlsplit(urllib.parse.urljoin(req.full_url, newurl))
        host = (new.hostname or "").lower()
        same_host = host == (self.origin.hostname or "").lower()
        scheme_ok = new.scheme == self.origin.scheme or new.scheme == "https"
        if not (scheme_ok and (same_host or host in self.allowed)):
            raise SourceError(
                f"download of {redact(self.origin.geturl())} redirects ({code}) to "
                f"{new.scheme}://{host}, another scheme or host; add {host!r} to "
                "ingest.redirect_hosts if you trust it"
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def download(url: str, dest: Path, sha256: str, limits: SourceLimits | None = None) -> Path:
    """Download `url` to `dest`, verifying its sha256 before `dest` appears.

    `limits` bounds the download: its size (declared or received), the total time (checked
    between reads, each of which waits at most `limits.timeout_s`) and where redirects may
    lead. A bearer token in CHESTCT_SOURCE_TOKEN is sent to the URL's own host (never on a
    redirect).

    Raises:
        SourceError: HTTP error, timeout, unreachable host, short read, a refused redirect, a
            download over the size cap or the deadline, or a digest mismatch. Nothing is left
            at `dest` or beside it.
    """
    limits = limits or SourceLimits()
    shown = redact(url)
    part = dest.with_name(f"{dest.name}.part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    received = 0
    request = urllib.request.Request(url, headers={"User-Agent": "chestct-ingest"})
    token = os.environ.get(TOKEN_ENV, "").strip()
    if token:
        request.add_unredirected_header("Authorization", f"Bearer {token}")
    opener = urllib.request.build_opener(_Redirects(url, limits.redirect_hosts))
    deadline = time.monotonic() + limits.deadline_s
    cap = limits.max_download_bytes
    try:
        with opener.open(request, timeout=limits.timeout_s) as resp, part.open("wb") as out:
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            if total is not None and total > cap:
                raise SourceError(
                    f"download of {shown} declares {total:,} bytes, more than "
                    f"ingest.max_download_mb ({cap / MB:,.0f} MB); raise it if the archive is "
                    "genuine"
                )
            with tqdm(
                total=total, unit="B", unit_scale=True, desc=f"download {dest.name}", leave=False
            ) as bar:
                while chunk := resp.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
                    if received > cap:
                        raise SourceError(
                            f"download of {shown} passed ingest.max_download_mb "
                            f"({cap / MB:,.0f} MB); stopped"
                        )
                    if time.monotonic() > deadline:
                        raise SourceError(
                            f"download of {shown} did not finish within ingest.deadline_s = "
                            f"{limits.deadline_s:g} s ({received:,} bytes so far); stopped"
                        )
        if total is not None and received != total:
            raise SourceError(
                f"download of {shown} stopped after {received} of {total} bytes; try again"
            )
    except urllib.error.HTTPError as exc:
        part.unlink(missing_ok=True)
        raise SourceError(
            f"download of {shown} failed: HTTP {exc.code} {exc.reason}; check ingest.source"
        ) from None
    except TimeoutError as exc:
        part.unlink(missing_ok=True)
        raise SourceError(
            f"download of {shown} timed out (no answer within ingest.timeout_s = "
            f"{limits.timeout_s:g} s: {exc}); check the network or raise ingest.timeout_s"
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        part.unlink(missing_ok=True)
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, TimeoutError):
            raise SourceError(
                f"download of {shown} timed out (no connection within ingest.timeout_s = "
                f"{limits.timeout_s:g} s); check the network or raise ingest.timeout_s"
            ) from None
        raise SourceError(
            f"download of {shown} failed: {reason}; check the URL and network"
        ) from None
    except BaseException:  # SourceError above, or an interrupt: nothing stays behind
        part.unlink(missing_ok=True)
        raise
    actual = digest.hexdigest()
    if actual != sha256.lower():
        part.unlink(missing_ok=True)
        raise SourceError(
            f"download of {shown}: sha256 is {actual} but ingest.sha256 is {sha256.lower()}; "
            "the file changed or was corrupted on the way. Nothing was unpacked. If you trust "
            "the new file, set ingest.sha256 to its digest"
        )
    part.replace(dest)
    log.info("downloaded %s (%d bytes, sha256 verified)", shown, received)
    return dest


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


def _files_under(folder: Path) -> list[Path]:
    """Every visible file below `folder` (any extension: DICOM files often have none)."""
    files = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not _hidden(Path(d)))
        files.extend(Path(dirpath) / f for f in sorted(filenames) if not f.startswith("."))
    return files


def scan_source(source: Path, class_map: dict[str, str]) -> list[tuple[str, str, Path]]:
    """(split, label, file) for every file in a Kaggle-layout folder.

    Split folders are optional: a folder with class folders directly in it has no splits ("").
    """
    if not source.is_dir():
        raise SourceError(
            f"ingest.source {str(source)!r} is not a folder; use `synthetic` or a folder in the "
            "layout [train|valid|test/]<class>/<image>"
        )
    split_dirs = [source / s for s in SPLIT_NAMES if (source / s).is_dir()]
    groups = [(d.name, d) for d in split_dirs] if split_dirs else [("", source)]
    files: list[tuple[str, str, Path]] = []
    for split, folder in groups:
        class_dirs = _class_folders(folder, class_map)
        if not class_dirs:
            raise SourceError(
                f"{folder}: no class folders in it; expected [train|valid|test/]<class>/<image> "
                f"with classes {', '.join(CLASSES)}"
            )
        for class_dir, label in class_dirs:
            images = _files_under(class_dir)
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
