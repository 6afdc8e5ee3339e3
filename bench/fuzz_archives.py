"""Structured fuzzing of ingest's archive unpacking (chestct.data.archives.safe_extract).

Hypothesis draws tar and zip archives header by header rather than as random bytes: tar
members of every type (file, folder, symbolic and hard link, character and block device, FIFO,
sparse, an unknown type), GNU long-name and long-link headers, pax records (path, size,
linkpath, GNU sparse maps, lengths that lie), size fields in octal, base-256, negative or far
past the data, broken checksums, names that climb out (`..`), are absolute, repeat an earlier
name (spelled alike or otherwise), make a file/folder clash or run past the file system's
limits; plain, gzip, bzip2 or xz, maybe truncated. Zip archives get drawn names, Unix modes in
`external_attr` (links, FIFOs, devices), the encryption flag, and central-directory sizes and
name lengths patched to lie, maybe truncated.

The property, for every archive: `safe_extract` either unpacks it, leaving only regular files
and folders inside the target, or raises `SourceError`; never another exception, never a file
outside the target, never a partial target; and Python's allocations while it runs stay under
`PEAK_LIMIT_MB` (headers are capped before they are read).

    python bench/fuzz_archives.py [--examples 2000] [--seed 0]

Prints the outcome counts, the slowest archive and the largest allocation peak; exits 1 when
the property fails, printing the offending archives. tests/unit/test_archive_fuzz.py runs the
same strategies (40 archives; 300 in the `slow` tier).
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import io
import lzma
import os
import stat
import struct
import sys
import tempfile
import time
import tracemalloc
import warnings
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from chestct.data.archives import safe_extract  # noqa: E402
from chestct.data.source_limits import SourceError, SourceLimits  # noqa: E402

MB = 1024 * 1024
PEAK_LIMIT_MB = 16.0
# Small caps, so that a drawn size near them is reached quickly.
LIMITS = SourceLimits(max_members=64, max_unpacked_bytes=4 * MB, max_ratio=100.0)

# ----------------------------------------------------------------------------- names

_PLAIN = st.sampled_from(
    ["train/normal/a.png", "valid/adenocarcinoma/b.png", "normal/c.dcm", "Data/train/normal/d"]
)
_NAMES = st.one_of(
    _PLAIN,
    st.sampled_from(
        [
            "../escape.png",
            "train/../../escape.png",
            "/etc/passwd",
            "C:/windows/x.png",
            "train\\..\\..\\x.png",
            "./train/normal/a.png",
            "train//normal/a.png",
            "train/normal",
            "train/normal/a.png/inner",
            "",
            ".",
            "train/normal/\u00e9\u00e8.png",
            "train/normal/nul\x00byte.png",
        ]
    ),
    st.integers(90, 5000).map(lambda n: "train/normal/" + "n" * n + ".png"),
    st.integers(2, 40).map(lambda n: "/".join(["d" * 120] * n) + "/a.png"),
    st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=40).map(
        lambda t: f"train/normal/{t}"
    ),
)

# ----------------------------------------------------------------------------- tar


def _octal(value: int, width: int) -> bytes:
    return f"{value:0{width - 1}o}".encode() + b"\0"


def _size_field(size: int, how: str) -> bytes:
    if how == "octal" and 0 <= size < 8**11:
        return _octal(size, 12)
    if how == "base256" or size >= 8**11:
        return b"\x80" + (size % 256**11).to_bytes(11, "big")
    if how == "negative":
        return b"\xff" * 12  # base-256 of -1
    return b"zzzzzzzzzzz\0"  # not a number


def tar_header(
    name: bytes,
    kind: bytes,
    size: int,
    *,
    size_how: str = "octal",
    link: bytes = b"",
    checksum_ok: bool = True,
    extra: bytes = b"",
) -> bytes:
    """One 512-byte ustar header, with fields as drawn (possibly lying)."""
    buf = bytearray(512)
    buf[0:100] = name[:100].ljust(100, b"\0")
    buf[100:108] = b"0000644\0"
    buf[108:116] = b"0000000\0"
    buf[116:124] = b"0000000\0"
    buf[124:136] = _size_field(size, size_how)
    buf[136:148] = _octal(0, 12)
    buf[148:156] = b" " * 8
    buf[156:157] = kind[:1]
    buf[157:257] = link[:100].ljust(100, b"\0")
    buf[257:265] = b"ustar\x0000"
    buf[329:337] = b"0000001\0"  # devmajor
    buf[337:345] = b"0000003\0"  # devminor
    if extra:
        buf[482 : 482 + len(extra[:29])] = extra[:29]  # GNU sparse / isextended area
    total = sum(buf)
    buf[148:156] = f"{total if checksum_ok else total + 1:06o}".encode() + b"\0 "
    return bytes(buf)


def _pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 512)


def _pax(records: list[tuple[str, str]], lie: int) -> bytes:
    out = b""
    for key, value in records:
        body = f" {key}={value}\n".encode()
        n = len(body) + 1
        while len(str(n)) + len(body) != n:
            n = len(str(n)) + len(body)
        out += str(n + lie).encode() + body
    return out


@dataclass(frozen=True)
class Drawn:
    """One drawn archive: its bytes and how it was made (for the report)."""

    kind: str
    data: bytes
    recipe: list[str] = field(default_factory=list)
    files: tuple[str, ...] = ()  # the names of regular-file entries, as drawn

    def describe(self) -> str:
        return f"{self.kind} {len(self.data)} bytes: " + "; ".join(self.recipe)[:400]


# Extended-header sizes around what matters: small, and either side of the 1 MB header cap.
_HEADER_SIZES = st.one_of(st.integers(0, 2048), st.integers(MB - 1024, MB + 1024))
_TYPES = st.sampled_from(
    [b"0", b"0", b"0", b"5", b"5", b"2", b"1", b"3", b"4", b"6", b"S", b"Z", b"\0", b"7"]
)


@st.composite
def tar_member(draw: st.DrawFn, previous: list[str]) -> tuple[bytes, str, str, bytes]:
    """One member (optional extended headers, a header, its data), its recipe, name, type."""
    name = draw(st.one_of(_NAMES, st.sampled_from(previous or ["train/normal/a.png"])))
    kind = draw(_TYPES)
    data = draw(st.binary(max_size=600)) if kind in (b"0", b"\0", b"7", b"S", b"Z") else b""
    size_how = draw(st.sampled_from(["octal", "octal", "octal", "base256", "negative", "junk"]))
    size = draw(
        st.one_of(
            st.just(len(data)),
            st.just(len(data)),
            st.integers(0, 2048),
            st.integers(LIMITS.max_unpacked_bytes - 10, LIMITS.max_unpacked_bytes + 10),
            st.integers(2**33, 2**40),
        )
    )
    link = draw(st.sampled_from([b"", b"train/normal/a.png", b"../../etc/passwd", b"/etc"]))
    checksum_ok = draw(st.booleans()) or draw(st.booleans())
    raw = name.encode("utf-8", "surrogateescape")
    out = b""
    notes = [f"{kind!r} {name[:60]!r} size={size}({size_how}) data={len(data)}"]
    extended = draw(st.sampled_from(["none", "none", "gnu-name", "gnu-link", "pax", "pax-global"]))
    if extended in ("gnu-name", "gnu-link"):
        length = draw(st.one_of(st.just(len(raw) + 1), _HEADER_SIZES))
        body = (raw + b"\0")[:length].ljust(length, b"a")
        gnu = b"L" if extended == "gnu-name" else b"K"
        out += tar_header(b"././@LongLink", gnu, length) + _pad(body)
        notes.append(f"{extended} header of {length} bytes")
    elif extended.startswith("pax"):
        records = draw(
            st.lists(
                st.sampled_from(
                    [
                        ("path", name),
                        ("path", "../pax-escape.png"),
                        ("size", str(size)),
                        ("size", "-5"),
                        ("size", "99999999999999999999"),
                        ("linkpath", "/etc/passwd"),
                        ("GNU.sparse.map", "0,10,20,30"),
                        ("GNU.sparse.major", "1"),
                        ("GNU.sparse.minor", "0"),
                        ("GNU.sparse.size", "1000"),
                        ("hdrcharset", "BINARY"),
                        ("comment", "x" * 2000),
                        ("mtime", "nan"),
                    ]
                ),
                max_size=5,
            )
        )
        lie = draw(st.sampled_from([0, 0, 0, 1, -3, 10**6]))
        body = _pax(records, lie)
        declared = draw(st.one_of(st.just(len(body)), _HEADER_SIZES))
        pax_kind = b"x" if extended == "pax" else b"g"
        out += tar_header(b"PaxHeaders/x", pax_kind, declared) + _pad(body)
        notes.append(f"{extended} {records[:3]} lie={lie} declared={declared}")
    sparse = struct.pack(">12s12s", _octal(0, 12), _octal(0, 12)) if kind == b"S" else b""
    out += tar_header(
        raw, kind, size, size_how=size_how, link=link, checksum_ok=checksum_ok, extra=sparse
    )
    out += _pad(data)
    # Extended headers may rename the member: only a plain header's name is known for sure.
    return out, "; ".join(notes), name, kind if extended == "none" else b"?"


@st.composite
def tar_archives(draw: st.DrawFn) -> Drawn:
    names: list[str] = []
    parts, recipe, files = [], [], []
    for _ in range(draw(st.integers(1, 6))):
        member, note, name, kind = draw(tar_member(names))
        parts.append(member)
        recipe.append(note)
        names.append(name)
        if kind in (b"0", b"\0", b"7"):
            files.append(name)
    body = b"".join(parts) + b"\0" * draw(st.sampled_from([1024, 1024, 0, 512]))
    codec = draw(st.sampled_from(["none", "gz", "gz", "bz2", "xz"]))
    data = {
        "none": lambda b: b,
        "gz": gzip.compress,
        "bz2": bz2.compress,
        "xz": lzma.compress,
    }[codec](body)
    if draw(st.integers(0, 9)) == 0:
        data = data[: draw(st.integers(0, max(len(data) - 1, 0)))]
        recipe.append("truncated")
    return Drawn(f"tar/{codec}", data, recipe, tuple(files))


# ----------------------------------------------------------------------------- zip

_MODES = st.sampled_from(
    [0, 0, stat.S_IFREG | 0o644, stat.S_IFDIR | 0o755, stat.S_IFLNK | 0o777,
     stat.S_IFIFO | 0o644, stat.S_IFCHR | 0o600, stat.S_IFBLK | 0o600, stat.S_IFSOCK | 0o600]
)  # fmt: skip


@st.composite
def zip_archives(draw: st.DrawFn) -> Drawn:
    buf = io.BytesIO()
    recipe: list[str] = []
    names: list[str] = []
    files: list[str] = []
    with zipfile.ZipFile(buf, "w") as zf:
        for _ in range(draw(st.integers(1, 6))):
            name = draw(st.one_of(_NAMES, st.sampled_from(names or ["train/normal/a.png"])))
            name = name.replace("\x00", "_") or "x"
            bomb = draw(st.integers(0, 7)) == 0  # 1.2 MB of zeros: over the ratio when deflated
            data = b"\0" * (MB + MB // 5) if bomb else draw(st.binary(max_size=400))
            info = zipfile.ZipInfo(name)
            info.compress_type = draw(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))
            mode = draw(_MODES)
            info.external_attr = mode << 16
            if draw(st.integers(0, 9)) == 0:
                info.flag_bits |= 0x1
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # duplicate names are drawn on purpose
                zf.writestr(info, data)
            names.append(name)
            if not name.endswith("/") and stat.S_IFMT(mode) in (0, stat.S_IFREG):
                files.append(name)
            recipe.append(f"{name[:60]!r} mode={oct(mode)} {len(data)} bytes")
    data = bytearray(buf.getvalue())
    # Patch central-directory fields to lie: sizes and name lengths.
    central = [i for i in range(len(data) - 4) if data[i : i + 4] == b"PK\x01\x02"]
    for offset in central:
        what = draw(st.sampled_from(["keep", "keep", "keep", "size", "csize", "namelen"]))
        if what == "size":
            struct.pack_into("<I", data, offset + 24, draw(st.integers(0, 2**32 - 1)))
        elif what == "csize":
            struct.pack_into("<I", data, offset + 20, draw(st.integers(0, 2**32 - 1)))
        elif what == "namelen":
            struct.pack_into("<H", data, offset + 28, draw(st.integers(0, 2**16 - 1)))
        if what != "keep":
            recipe.append(f"central {what} patched")
    end = bytes(data)
    if draw(st.integers(0, 9)) == 0:
        end = end[: draw(st.integers(0, max(len(end) - 1, 0)))]
        recipe.append("truncated")
    patched = any("patched" in r for r in recipe)  # names may no longer be the drawn ones
    return Drawn("zip", end, recipe, () if patched else tuple(files))


def archives() -> st.SearchStrategy[Drawn]:
    return st.one_of(tar_archives(), zip_archives())


# ----------------------------------------------------------------------------- property


@dataclass
class Tally:
    outcomes: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    worst_peak_mb: float = 0.0
    slowest_s: float = 0.0
    slowest: str = ""


def check_one(drawn: Drawn, workdir: Path, tally: Tally) -> None:
    """Unpack one archive and record whether the property held."""
    case = Path(tempfile.mkdtemp(dir=workdir))
    suffix = ".zip" if drawn.kind == "zip" else ".tar"
    archive = case / f"drawn{suffix}"
    archive.write_bytes(drawn.data)
    target = case / "out"
    start = time.perf_counter()
    tracemalloc.start()
    try:
        safe_extract(archive, target, LIMITS)
        outcome = "unpacked"
    except SourceError:
        outcome = "refused"
    except Exception as exc:  # the property: nothing but SourceError escapes
        outcome = f"CRASH {type(exc).__name__}"
        tally.failures.append(f"{type(exc).__name__}: {exc!s:.200} <- {drawn.describe()}")
    finally:
        peak = tracemalloc.get_traced_memory()[1] / MB
        tracemalloc.stop()
    elapsed = time.perf_counter() - start
    tally.outcomes[f"{drawn.kind.split('/')[0]} {outcome}"] += 1
    tally.worst_peak_mb = max(tally.worst_peak_mb, peak)
    if elapsed > tally.slowest_s:
        tally.slowest_s, tally.slowest = elapsed, drawn.describe()
    if peak > PEAK_LIMIT_MB:
        tally.failures.append(f"allocated {peak:.0f} MB <- {drawn.describe()}")
    if outcome == "unpacked":
        spelled = [tuple(p for p in n.replace("\\", "/").split("/") if p not in ("", "."))
                   for n in drawn.files]  # fmt: skip
        spelled = [name for name in spelled if name]
        if len(set(spelled)) < len(spelled):
            tally.failures.append(f"unpacked a duplicate name (one file replaced another) <- "
                                  f"{drawn.describe()}")  # fmt: skip
        for path in target.rglob("*"):
            if path.is_symlink() or not (path.is_file() or path.is_dir()):
                tally.failures.append(f"left {path} (not a plain file) <- {drawn.describe()}")
            elif not path.resolve().is_relative_to(target.resolve()):
                tally.failures.append(f"wrote outside the target: {path} <- {drawn.describe()}")
    elif target.exists():
        tally.failures.append(f"a refused archive left {target} behind <- {drawn.describe()}")
    leftovers = {p.name for p in case.iterdir()} - {archive.name, "out"}
    if leftovers:
        tally.failures.append(f"left {sorted(leftovers)} beside the target <- {drawn.describe()}")
    escaped = [p for p in workdir.iterdir() if p.name not in _cases(workdir)]
    if escaped:
        tally.failures.append(f"wrote {escaped} outside its folder <- {drawn.describe()}")


def _cases(workdir: Path) -> set[str]:
    return {p.name for p in workdir.iterdir() if p.is_dir() and p.name.startswith("tmp")}


def run(examples: int, seed_value: int | None, workdir: Path, progress: bool = False) -> Tally:
    tally = Tally()

    @settings(
        max_examples=examples,
        derandomize=seed_value is None,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(archives())
    def check(drawn: Drawn) -> None:
        check_one(drawn, workdir, tally)
        done = sum(tally.outcomes.values())
        if progress and done % 100 == 0:
            print(f"{done} archives: {dict(tally.outcomes)}", file=sys.stderr, flush=True)

    if seed_value is not None:
        check = seed(seed_value)(check)
    check()
    return tally


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        tally = run(args.examples, args.seed, Path(tmp), progress=True)
        total = time.perf_counter() - start
    print(f"{sum(tally.outcomes.values())} archives in {total:.1f} s: {dict(tally.outcomes)}")
    print(f"largest allocation peak {tally.worst_peak_mb:.1f} MB (limit {PEAK_LIMIT_MB:g} MB)")
    print(f"slowest {tally.slowest_s * 1000:.0f} ms: {tally.slowest[:200]}")
    for failure in tally.failures[:20]:
        print("FAIL", failure)
    return 1 if tally.failures else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
