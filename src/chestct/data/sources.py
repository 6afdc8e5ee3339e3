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

import bz2
import contextlib
import gzip
import hashlib
import http.client
import io
import ipaddress
import logging
import lzma
import os
import re
import shutil
import socket
import stat
import struct
import tarfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterator
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
    """What a source may cost and reach (params ingest.timeout_s, deadline_s, max_download_mb,
    redirect_hosts, allow_private_hosts, max_members, max_unpacked_mb, max_ratio,
    max_file_mb)."""

    timeout_s: float = 60.0  # a download's wait for each answer
    deadline_s: float = 3600.0  # the whole transfer, headers included
    max_download_bytes: int = 10 * 1024 * MB
    redirect_hosts: tuple[str, ...] = ()  # `host` (any port) or `host:port`
    allow_private_hosts: bool = False  # loopback, private, link-local addresses
    max_members: int = 100_000
    max_unpacked_bytes: int = 20 * 1024 * MB
    max_ratio: float = 100.0
    max_file_bytes: int = 512 * MB  # one file of a folder source


def limits_from(ingest: Any) -> SourceLimits:
    """SourceLimits from the ingest params (settings.IngestParams)."""
    return SourceLimits(
        timeout_s=float(ingest.timeout_s),
        deadline_s=float(ingest.deadline_s),
        max_download_bytes=int(ingest.max_download_mb * MB),
        redirect_hosts=tuple(ingest.redirect_hosts),
        allow_private_hosts=bool(ingest.allow_private_hosts),
        max_members=int(ingest.max_members),
        max_unpacked_bytes=int(ingest.max_unpacked_mb * MB),
        max_ratio=float(ingest.max_ratio),
        max_file_bytes=int(ingest.max_file_mb * MB),
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
    """'zip' or 'tar' by content (plain, gzip, bzip2 or xz), else None.

    A tar is recognised by reading its first header through the same bounded reader that
    unpacks it (never `tarfile.is_tarfile`, which reads a long-name header whole).
    """
    with path.open("rb") as fh:
        head = fh.read(4)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    try:
        with _open_tar(path, SourceLimits()):
            return "tar"
    except SourceError:
        return "tar"  # a tar whose header is refused: unpacking says why
    except (OSError, EOFError, tarfile.TarError, zlib.error, lzma.LZMAError):
        return None


# A tar member's extended headers (GNU long name or link, pax records) are read whole by
# tarfile; more than this before one member is refused: a path is at most 4 KB, and pax
# records of genuine archives (times, xattrs) a few KB.
MAX_HEADER_BYTES = 1 * MB
# A member's data is read in pieces of this size (tarfile copies 16 KB at a time).
_PIECE = 64 * 1024
# A zip's central directory may hold this many bytes per allowed member (names of genuine
# archives are well under 1 KB); a larger directory is refused before zipfile parses it.
_ZIP_DIRECTORY_PER_MEMBER = 1024
# Longest name and path unpacked (Linux NAME_MAX and a margin under PATH_MAX for the target).
_MAX_NAME_BYTES = 255
_MAX_PATH_BYTES = 3072


class _Bounded(io.RawIOBase):
    """The decompressed tar stream as tarfile reads it, with caps applied before each read.

    While headers are read (`headers = True`), at most MAX_HEADER_BYTES are read between two
    members (`member_done()` resets the count), so a GNU long-name or pax header of any size
    is refused before it is read, and so is a chain of them. Every read or seek is refused
    past `limit` bytes of stream (the unpacked-size cap plus header room), which bounds the
    time a bomb costs.
    """

    def __init__(self, inner: Any, archive: Path, limit: int) -> None:
        self.inner, self.archive, self.limit = inner, archive, limit
        self.headers = True
        self._since_member = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def member_done(self) -> None:
        self._since_member = 0

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0 or size > max(MAX_HEADER_BYTES, _PIECE):
            raise SourceError(
                f"{self.archive}: a tar header of {size if size and size > 0 else 'unknown'} "
                f"bytes, larger than {MAX_HEADER_BYTES // MB} MB (a long-name or pax header "
                "no genuine archive has); refusing the archive"
            )
        if self.headers:
            self._since_member += size
            if self._since_member > MAX_HEADER_BYTES:
                raise SourceError(
                    f"{self.archive}: the headers of one tar member run over "
                    f"{MAX_HEADER_BYTES // MB} MB (long-name or pax headers no genuine "
                    "archive has); refusing the archive"
                )
        self._check(self.inner.tell() + size)
        return self.inner.read(size)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            self._check(offset)
        elif whence == io.SEEK_CUR:
            self._check(self.inner.tell() + offset)
        return self.inner.seek(offset, whence)

    def tell(self) -> int:
        return self.inner.tell()

    def _check(self, position: int) -> None:
        if position > self.limit:
            raise SourceError(
                f"{self.archive}: the tar stream runs past {self.limit / MB:,.0f} MB "
                "(ingest.max_unpacked_mb plus header room); refusing it"
            )


@contextlib.contextmanager
def _open_tar(archive: Path, limits: SourceLimits) -> Iterator[tuple[tarfile.TarFile, _Bounded]]:
    """The archive as a TarFile reading through `_Bounded` (decompressed here, by magic)."""
    with archive.open("rb") as raw:
        magic = raw.read(6)
        raw.seek(0)
        inner: Any
        # Closed in `finally` below (a `with` per codec would triple this block).
        if magic[:2] == b"\x1f\x8b":
            inner = gzip.GzipFile(fileobj=raw, mode="rb")
        elif magic[:3] == b"BZh":
            inner = bz2.BZ2File(raw, mode="rb")
        elif magic == b"\xfd7zXZ\x00":
            inner = lzma.LZMAFile(raw, mode="rb")  # noqa: SIM115
        else:
            inner = raw
        room = limits.max_members * 3 * tarfile.BLOCKSIZE + MAX_HEADER_BYTES + 1 * MB
        bounded = _Bounded(inner, archive, limits.max_unpacked_bytes + room)
        try:
            with tarfile.open(fileobj=bounded, mode="r:") as tf:  # type: ignore[call-overload]
                yield tf, bounded
        except RecursionError:
            raise SourceError(
                f"{archive}: tar headers nested too deeply (a chain of extended headers); "
                "refusing it"
            ) from None
        finally:
            if inner is not raw:
                inner.close()


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
    for part in rel.parts:
        if len(os.fsencode(part)) > _MAX_NAME_BYTES:
            raise SourceError(
                f"{archive}: entry {name!r} has a name of {len(os.fsencode(part))} bytes, too "
                f"long for the file system (at most {_MAX_NAME_BYTES}); rename it and pack "
                "the archive again"
            )
    if len(os.fsencode(rel.as_posix())) > _MAX_PATH_BYTES:
        raise SourceError(
            f"{archive}: entry {name[:80]!r}… has a path of {len(os.fsencode(rel.as_posix()))} "
            f"bytes, too long to unpack (at most {_MAX_PATH_BYTES}); shorten its folders"
        )
    return rel


def _check_layout(entries: list[tuple[str, bool]], archive: Path) -> None:
    """Refuse two entries for one file, and a name that is both a file and a folder.

    `entries` are (name, is_folder); names are compared as normalised paths, so
    `a//b` and `./a/b` are `a/b`.
    """
    files: dict[tuple[str, ...], str] = {}
    folders: set[tuple[str, ...]] = set()
    for name, is_folder in entries:
        parts = _checked_name(name, archive).parts
        if not parts:
            continue
        for depth in range(1, len(parts)):
            folders.add(parts[:depth])
        if is_folder:
            folders.add(parts)
        elif parts in files:
            raise SourceError(
                f"{archive}: entry {'/'.join(parts)!r} appears twice (as {files[parts]!r} and "
                f"{name!r}); one would silently replace the other. Pack the archive again "
                "without duplicates"
            )
        else:
            files[parts] = name
    clash = next((p for p in files if p in folders), None)
    if clash is not None:
        raise SourceError(
            f"{archive}: entry {'/'.join(clash)!r} is both a file and a folder in the "
            "archive; it cannot be unpacked. Rename one of them and pack it again"
        )


def _write_member(
    read: Callable[[int], bytes], dest: Path, size: int, name: str, archive: Path
) -> None:
    """Copy one member's data to `dest` in pieces, never more than its declared `size`."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with dest.open("wb") as out:
        written = 0
        while chunk := read(min(_PIECE, size + 1 - written)):
            written += len(chunk)
            if written > size:
                raise SourceError(
                    f"{archive}: entry {name!r} holds more than the {size:,} bytes its header "
                    "declares; refusing it"
                )
            out.write(chunk)
        if written != size:
            raise SourceError(
                f"{archive}: entry {name!r} ends after {written:,} of {size:,} bytes (a "
                "truncated archive?)"
            )


def _unpack_error(archive: Path, name: str, exc: OSError) -> SourceError:
    """An OSError while writing an entry, as a SourceError naming the entry and the cause."""
    reason = exc.strerror or str(exc)
    return SourceError(
        f"{archive}: cannot unpack entry {name!r}: {reason} (errno {exc.errno}); free disk "
        "space or fix the entry, then run ingest again"
    )


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


def _check_zip_directory(archive: Path, limits: SourceLimits) -> None:
    """Count a zip's central-directory entries without building them, and refuse more than
    ingest.max_members, or a directory over 1 KB per allowed member, before zipfile reads it
    whole (zipfile builds an object per entry, about ten times the entry's bytes)."""
    with archive.open("rb") as fh:
        zf: Any = zipfile  # its end-of-directory reader and field indexes are private
        try:
            end = zf._EndRecData(fh)
        except OSError:
            end = None
        if not end:
            raise SourceError(f"{archive}: not a readable zip archive (no end of directory)")
        size = end[zf._ECD_SIZE]
        cap = max(1 * MB, limits.max_members * _ZIP_DIRECTORY_PER_MEMBER)
        if size > cap:
            raise SourceError(
                f"{archive}: a central directory of {size:,} bytes, more than "
                f"{_ZIP_DIRECTORY_PER_MEMBER} bytes for each of ingest.max_members = "
                f"{limits.max_members:,}; refusing it. Raise ingest.max_members if the archive "
                "is genuine"
            )
        start = end[zf._ECD_LOCATION] - size
        if end[zf._ECD_SIGNATURE] == zf.stringEndArchive64:
            start -= zf.sizeEndCentDir64 + zf.sizeEndCentDir64Locator
        fh.seek(max(start, 0))
        count, walked = 0, 0
        while walked + 46 <= size:
            head = fh.read(46)
            if len(head) < 46 or head[:4] != b"PK\x01\x02":
                return  # zipfile reports the damage
            n, m, k = struct.unpack("<HHH", head[28:34])
            count += 1
            if count > limits.max_members:
                _check_totals(archive, count, 0, limits)
            fh.seek(n + m + k, io.SEEK_CUR)
            walked += 46 + n + m + k


def _extract_zip(archive: Path, target: Path, limits: SourceLimits) -> None:
    _check_zip_directory(archive, limits)
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise SourceError(f"{archive}: not a readable zip archive ({exc})") from None
    with zf:
        infos = zf.infolist()
        _check_totals(archive, len(infos), 0, limits)
        for info in infos:
            _checked_name(info.filename, archive)
            kind = stat.S_IFMT(info.external_attr >> 16)
            if kind == stat.S_IFLNK:
                raise SourceError(
                    f"{archive}: entry {info.filename!r} is a symbolic link; refusing to unpack "
                    "an archive with links (they can point outside the target folder)"
                )
            if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise SourceError(
                    f"{archive}: entry {info.filename!r} is a device, FIFO or socket; refusing "
                    "to unpack it"
                )
            if info.flag_bits & 0x1:
                raise SourceError(
                    f"{archive}: entry {info.filename!r} is encrypted; unpack it yourself and "
                    "point ingest.source at the folder"
                )
        _check_layout([(i.filename, i.is_dir()) for i in infos], archive)
        _check_totals(archive, len(infos), sum(i.file_size for i in infos), limits)
        for info in infos:  # one bomb member inside an otherwise plain archive
            if info.file_size > MB and info.file_size > limits.max_ratio * max(
                info.compress_size, 1
            ):
                _check_totals(archive, 1, info.file_size, limits, info.compress_size)
        _check_space(sum(i.file_size for i in infos), target, archive)
        for info in infos:
            dest = target.joinpath(*_checked_name(info.filename, archive).parts)
            try:
                if info.is_dir():
                    dest.mkdir(parents=True, exist_ok=True)
                    continue
                with zf.open(info) as src:
                    _write_member(src.read, dest, info.file_size, info.filename, archive)
            except (zipfile.BadZipFile, EOFError, zipfile.LargeZipFile, ValueError) as exc:
                raise SourceError(f"{archive}: corrupt zip archive ({exc})") from None
            except OSError as exc:
                raise _unpack_error(archive, info.filename, exc) from None


def _extract_tar(archive: Path, target: Path, limits: SourceLimits) -> None:
    try:
        with _open_tar(archive, limits) as (tf, bounded):
            # Headers one by one through the bounded reader, the totals checked before the
            # next header is looked for: in a compressed tar that means inflating the previous
            # member's data, which a bomb makes endless.
            members: list[tarfile.TarInfo] = []
            unpacked = 0
            while True:
                bounded.member_done()
                member = tf.next()  # the first call returns the member read on opening
                if member is None:
                    break
                members.append(member)
                unpacked += member.size if member.isfile() else 0
                _check_totals(archive, len(members), unpacked, limits)
            for member in members:
                _checked_name(member.name, archive)
                if member.issym() or member.islnk():
                    raise SourceError(
                        f"{archive}: entry {member.name!r} is a link (to {member.linkname!r}); "
                        "refusing to unpack an archive with links"
                    )
                if member.issparse() or not (member.isfile() or member.isdir()):
                    raise SourceError(
                        f"{archive}: entry {member.name!r} is a device, FIFO or sparse file; "
                        "refusing to unpack it"
                    )
            _check_layout([(m.name, m.isdir()) for m in members], archive)
            _check_space(sum(m.size for m in members if m.isfile()), target, archive)
            bounded.headers = False
            for member in members:
                dest = target.joinpath(*_checked_name(member.name, archive).parts)
                try:
                    if member.isdir():
                        dest.mkdir(parents=True, exist_ok=True)
                        continue
                    src = tf.extractfile(member)
                    if src is None:
                        raise SourceError(f"{archive}: entry {member.name!r} has no data")
                    _write_member(src.read, dest, member.size, member.name, archive)
                except gzip.BadGzipFile:
                    raise  # the archive's data, reported below
                except OSError as exc:
                    raise _unpack_error(archive, member.name, exc) from None
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as exc:
        raise SourceError(f"{archive}: corrupt or truncated tar archive ({exc})") from None


def safe_extract(archive: Path, target: Path, limits: SourceLimits | None = None) -> Path:
    """Unpack a zip or tar archive into `target` (which must not exist), atomically.

    Entries are checked first; the archive is unpacked into a temporary sibling folder that is
    renamed to `target` only when everything is out, and removed on any failure.

    Raises:
        SourceError: not an archive, a refused entry (link, device, duplicate, file/folder
            clash, over-long name, oversized header), corrupt data, too little disk space, a
            write that fails, or more entries, unpacked bytes or compression than `limits`
            allow.
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


def _port(parts: urllib.parse.SplitResult) -> int:
    return parts.port or (443 if parts.scheme == "https" else 80)


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only when it keeps the scheme, host and port, or leads to a host of
    params ingest.redirect_hosts (`host` for any port, `host:port` for one) over the scheme it
    came with or https."""

    def __init__(self, origin: str, guard: _Guard) -> None:
        self.origin = urllib.parse.urlsplit(origin)
        self.guard = guard
        self.allowed = {
            h.lower().replace("[", "").replace("]", "") for h in guard.limits.redirect_hosts
        }

    def redirect_request(  # type: ignore[override]
        self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> urllib.request.Request | None:
        new = urllib.parse.urlsplit(urllib.parse.urljoin(req.full_url, newurl))
        host = (new.hostname or "").lower()
        try:
            port = _port(new)
        except ValueError:
            port = -1
        same = (new.scheme, host, port) == (
            self.origin.scheme,
            (self.origin.hostname or "").lower(),
            _port(self.origin),
        )
        listed = host in self.allowed or f"{host}:{port}" in self.allowed
        scheme_ok = new.scheme in (self.origin.scheme, "https")
        if not (same or (listed and scheme_ok)):
            raise SourceError(
                f"download of {redact(self.origin.geturl())} redirects ({code}) to "
                f"{new.scheme}://{host}:{port}, another scheme, host or port; add "
                f"{f'{host}:{port}'!r} to ingest.redirect_hosts if you trust it"
            )
        self.guard.check_target(host, port)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


class _Guard:
    """The sockets of one download: every connection goes only to addresses checked here
    (public ones unless ingest.allow_private_hosts), and `expire` closes them all at the
    deadline, so that neither a slow answer nor a slow body outlives ingest.deadline_s."""

    def __init__(self, limits: SourceLimits) -> None:
        self.limits = limits
        self.expired = False
        self.sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        proxies = urllib.request.getproxies()
        self.proxy_hosts = {
            (urllib.parse.urlsplit(u).hostname or "").lower()
            for k, u in proxies.items()
            if k != "no"
        }

    def addresses(self, host: str, port: int) -> list[tuple[Any, ...]]:
        """getaddrinfo of `host`, refused when any address is not public (unless allowed)."""
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise SourceError(f"cannot resolve {host!r} ({exc}); check the URL") from None
        if not self.limits.allow_private_hosts and host.lower() not in self.proxy_hosts:
            for info in infos:
                address = str(info[4][0])
                if not _public(address):
                    raise SourceError(
                        f"{host} resolves to {address}, a loopback, private or link-local "
                        "address; URL sources must be public hosts. Set "
                        "ingest.allow_private_hosts: true to download from your own network "
                        "(a local mirror, tests)"
                    )
        return infos

    def check_target(self, host: str, port: int) -> None:
        """Through a proxy the connection goes to the proxy: the URL's own host is resolved
        and checked here instead (the proxy may resolve it otherwise; documented)."""
        if self.proxy_hosts:
            self.addresses(host, port)

    def connect(
        self, address: tuple[str, int], timeout: Any = None, source_address: Any = None
    ) -> socket.socket:
        """socket.create_connection's contract, to checked addresses only (http.client calls
        it as `_create_connection`)."""
        host, port = address
        error: OSError | None = None
        for family, kind, proto, _, sockaddr in self.addresses(host, port):
            sock = socket.socket(family, kind, proto)
            with self._lock:
                if self.expired:
                    sock.close()
                    raise TimeoutError("ingest.deadline_s passed")
                self.sockets.append(sock)
            try:
                if isinstance(timeout, int | float):
                    sock.settimeout(timeout)
                if source_address:
                    sock.bind(source_address)
                sock.connect(sockaddr)
                return sock
            except OSError as exc:
                error = exc
                sock.close()
        raise error or OSError(f"no address for {host}")

    def track(self, sock: socket.socket) -> None:
        with self._lock:
            self.sockets.append(sock)
            if self.expired:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self.sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


def _opener(url: str, guard: _Guard) -> urllib.request.OpenerDirector:
    """urllib with the redirect policy and every connection made through `guard`."""

    class Http(http.client.HTTPConnection):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._create_connection = guard.connect

    class Https(http.client.HTTPSConnection):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._create_connection = guard.connect

        def connect(self) -> None:
            super().connect()
            guard.track(self.sock)  # the TLS socket replaces the plain one guard made

    class HttpHandler(urllib.request.HTTPHandler):
        def http_open(self, req: urllib.request.Request) -> Any:
            return self.do_open(Http, req)

    class HttpsHandler(urllib.request.HTTPSHandler):
        def https_open(self, req: urllib.request.Request) -> Any:
            return self.do_open(Https, req, context=self._context)  # type: ignore[attr-defined]

    return urllib.request.build_opener(_Redirects(url, guard), HttpHandler(), HttpsHandler())


def download(url: str, dest: Path, sha256: str, limits: SourceLimits | None = None) -> Path:
    """Download `url` to `dest`, verifying its sha256 before `dest` appears.

    `limits` bounds the download: its size (declared or received), the whole transfer's time
    (`deadline_s`: every socket is shut when it passes, however slowly bytes trickle in; each
    wait for an answer is at most `timeout_s`), where redirects may lead and which addresses
    may be reached (public ones unless `allow_private_hosts`). A bearer token in
    CHESTCT_SOURCE_TOKEN is sent to the URL's own host (never on a redirect).

    Raises:
        SourceError: HTTP error, timeout, unreachable host, short read, a refused redirect or
            address, a download over the size cap or the deadline, or a digest mismatch.
            Nothing is left at `dest` or beside it.
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
    guard = _Guard(limits)
    parts = urllib.parse.urlsplit(url)
    try:
        guard.check_target(parts.hostname or "", _port(parts))
    except ValueError as exc:  # a port out of range; SourceError passes as it is
        if isinstance(exc, SourceError):
            raise
        raise SourceError(f"ingest.source {shown!r} is not a valid URL ({exc})") from None
    opener = _opener(url, guard)
    deadline = time.monotonic() + limits.deadline_s
    watchdog = threading.Timer(limits.deadline_s, guard.expire)
    watchdog.daemon = True
    watchdog.start()
    cap = limits.max_download_bytes

    def late() -> SourceError:
        return SourceError(
            f"download of {shown} did not finish within ingest.deadline_s = "
            f"{limits.deadline_s:g} s ({received:,} bytes so far); stopped. Raise "
            "ingest.deadline_s for a slow mirror"
        )

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
                # read1: what one receive gives, so the checks run however slow the sender
                while chunk := resp.read1(_CHUNK):
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
                        raise late()
        if guard.expired:
            raise late()
        if total is not None and received != total:
            raise SourceError(
                f"download of {shown} stopped after {received} of {total} bytes; try again"
            )
    except urllib.error.HTTPError as exc:
        part.unlink(missing_ok=True)
        raise SourceError(
            f"download of {shown} failed: HTTP {exc.code} {exc.reason}; check ingest.source"
        ) from None
    except SourceError:
        part.unlink(missing_ok=True)
        raise
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        part.unlink(missing_ok=True)
        if guard.expired:
            raise late() from None
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, SourceError):
            raise reason from None
        if isinstance(exc, TimeoutError) or isinstance(reason, TimeoutError):
            raise SourceError(
                f"download of {shown} timed out (no answer within ingest.timeout_s = "
                f"{limits.timeout_s:g} s); check the network or raise ingest.timeout_s"
            ) from None
        raise SourceError(
            f"download of {shown} failed: {reason}; check the URL and network"
        ) from None
    except BaseException:  # an interrupt: nothing stays behind
        part.unlink(missing_ok=True)
        raise
    finally:
        watchdog.cancel()
        for sock in guard.sockets:
            sock.close()
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
