"""Archives unpacked without trust: every entry checked before anything is written.

`safe_extract` unpacks a zip or a tar (plain, gzip, bzip2 or xz) into a folder. An entry that
would land outside the target folder (`../`, an absolute path, a drive letter) or that is a
link or a device is refused, with its name; the member count, total unpacked size and
compression ratio (SourceLimits) are checked from the headers, and again while bytes are
read, before the unpacked folder takes its place.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import lzma
import os
import re
import shutil
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from chestct.data.source_limits import MB, SourceError, SourceLimits


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
    except (SourceError, ValueError):
        return "tar"  # a tar whose header is refused or malformed: unpacking says why
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
                else:
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
    # ValueError: tarfile's own parsing of a malformed PAX record (an empty GNU.sparse.map).
    except (tarfile.TarError, EOFError, OSError, ValueError, zlib.error, lzma.LZMAError) as exc:
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
