"""What a hostile tar header costs ingest: peak memory and time of `safe_extract` on a small
.tar.gz whose first member hides behind a huge GNU long-name or pax header.

The archive is written in 1 MB pieces (a 300 MB header compresses to about 300 KB); each case
runs in a fresh child process, whose peak RSS (ru_maxrss) is reported with the outcome.

    python bench/archive_headers.py [--header-mb 300] [--src PATH]

`--src` puts another checkout's `src/` first on the child's path, to measure older code the
same way (e.g. `git archive <commit> src | tar -x -C /tmp/old` then `--src /tmp/old/src`).
"""

from __future__ import annotations

import argparse
import gzip
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MB = 1024 * 1024

CHILD = """
import resource, sys, time
from pathlib import Path
from chestct.data.archives import safe_extract
from chestct.data.source_limits import SourceError
start = time.perf_counter()
try:
    safe_extract(Path(sys.argv[1]), Path(sys.argv[2]))
    outcome = "unpacked"
except SourceError as exc:
    outcome = "refused: " + str(exc).split(": ", 1)[-1][:110]
except Exception as exc:
    outcome = f"{type(exc).__name__}: {str(exc)[:110]}"
elapsed = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"{peak:.0f}\\t{elapsed:.2f}\\t{outcome}")
"""


def write_case(path: Path, kind: bytes, size: int) -> Path:
    """A .tar.gz: one extended header of `size` bytes, then a small regular member."""
    with gzip.open(path, "wb", compresslevel=9) as gz:
        info = tarfile.TarInfo("././@LongLink" if kind == tarfile.GNUTYPE_LONGNAME else "pax")
        info.type, info.size = kind, size
        gz.write(info.tobuf(tarfile.GNU_FORMAT))
        if kind == tarfile.XHDTYPE:
            prefix = f"{size} comment=".encode()
            gz.write(prefix)
            left = size - len(prefix) - 1
        else:
            left = size
        while left:
            n = min(left, MB)
            gz.write(b"a" * n)
            left -= n
        if kind == tarfile.XHDTYPE:
            gz.write(b"\n")
        gz.write(b"\0" * (-size % 512))
        member = tarfile.TarInfo("train/normal/a.png")
        member.size = 4
        gz.write(member.tobuf(tarfile.GNU_FORMAT) + b"data" + b"\0" * 508 + b"\0" * 1024)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--header-mb", type=int, default=300)
    parser.add_argument("--src", type=Path, default=REPO / "src")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(args.src.resolve())}
    print(f"chestct from {args.src}; header {args.header_mb} MB")
    print("case\tarchive KB\tpeak RSS MB\tseconds\toutcome")
    with tempfile.TemporaryDirectory() as tmp:
        for name, kind in (("gnu-long-name", tarfile.GNUTYPE_LONGNAME), ("pax", tarfile.XHDTYPE)):
            archive = write_case(Path(tmp) / f"{name}.tar.gz", kind, args.header_mb * MB)
            target = Path(tmp) / f"{name}-out"
            done = subprocess.run(
                [sys.executable, "-c", CHILD, str(archive), str(target)],
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
            )
            line = done.stdout.strip() or f"-\t-\tchild failed: {done.stderr[-200:]}"
            print(f"{name}\t{archive.stat().st_size / 1024:.0f}\t{line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
