"""bench/fuzz_archives.py's strategies in CI: drawn tar and zip archives (long names, pax
headers, lying sizes, duplicates, links, devices, truncation) are unpacked whole or refused
with a SourceError, never anything else, never outside the target, never a large allocation.
40 derandomised archives by default, 300 from a fixed seed in the `slow` tier."""

from __future__ import annotations

import importlib.util
import io
import sys
import warnings
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def load_fuzz():
    path = REPO / "bench" / "fuzz_archives.py"
    spec = importlib.util.spec_from_file_location("chestct_bench_fuzz_archives", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


fuzz = load_fuzz()


def test_drawn_archives_are_unpacked_or_refused_cleanly(tmp_path: Path) -> None:
    tally = fuzz.run(40, None, tmp_path)
    assert tally.failures == []
    assert sum(tally.outcomes.values()) == 40
    assert tally.worst_peak_mb < fuzz.PEAK_LIMIT_MB


def _zip(entries: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buf, "w") as zf:
        warnings.simplefilter("ignore")
        for name, data in entries:
            zf.writestr(name, data)
    return buf.getvalue()


@pytest.mark.parametrize(
    "entries",
    [
        [("train/normal/a.png", b"one"), ("train/normal/a.png", b"two")],
        [("train/normal", b"file"), ("train/normal/a.png", b"png")],
        [("train/normal/" + "n" * 300, b"png")],
    ],
    ids=["duplicate", "file-folder", "long-name"],
)
def test_known_hostile_zip_layouts_are_refused(tmp_path: Path, entries: list) -> None:
    tally = fuzz.Tally()
    drawn = fuzz.Drawn("zip", _zip(entries), ["known"], tuple(n for n, _ in entries))
    fuzz.check_one(drawn, tmp_path, tally)
    assert tally.failures == []
    assert tally.outcomes == {"zip refused": 1}


def test_known_hostile_headers_are_refused(tmp_path: Path) -> None:
    """The headers the fuzzer draws at random, each at least once."""
    huge = 24 * 1024 * 1024
    cases = {
        "gnu-long-name-24MB": fuzz.tar_header(b"././@LongLink", b"L", huge) + b"a" * huge,
        "fifo": fuzz.tar_header(b"train/normal/p.png", b"6", 0),
        "char-device": fuzz.tar_header(b"train/normal/d.png", b"3", 0),
        "symlink": fuzz.tar_header(b"train/normal/l.png", b"2", 0, link=b"/etc/passwd"),
        "size-past-cap": fuzz.tar_header(b"train/normal/a.png", b"0", 2**40, size_how="base256"),
    }
    for name, body in cases.items():
        tally = fuzz.Tally()
        fuzz.check_one(fuzz.Drawn(f"tar/{name}", body + b"\0" * 1024, [name]), tmp_path, tally)
        assert tally.failures == [], name
        assert tally.outcomes == {"tar refused": 1}, name


@pytest.mark.slow
def test_drawn_archives_slow_tier(tmp_path: Path) -> None:
    """The same property on 300 archives from a fixed seed (the bench run in the docs)."""
    tally = fuzz.run(300, 20261206, tmp_path)
    assert tally.failures == []
