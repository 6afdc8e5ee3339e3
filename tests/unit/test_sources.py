"""sources: archives are unpacked safely and atomically; URLs need a matching sha256."""

from __future__ import annotations

import hashlib
import http.server
import io
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from chestct.data.sources import (
    SourceError,
    SourceLimits,
    layout_root,
    redact,
    resolve,
    safe_extract,
)
from chestct.settings import DOWNLOAD_CACHE_ENV, download_cache
from helpers import image_bytes

# A local server answers at once; tests reach it on 127.0.0.1 (ingest.allow_private_hosts).
QUICK = SourceLimits(timeout_s=5, allow_private_hosts=True)


def _zip(path: Path, entries: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = 0o120777 << 16  # a symbolic link, as `zip -y` stores it
            zf.writestr(info, target)
    return path


def _tgz(
    path: Path, entries: dict[str, bytes], link: tuple[str, str, bytes] | None = None
) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        if link:
            info = tarfile.TarInfo(link[0])
            info.type = link[2]
            info.linkname = link[1]
            tf.addfile(info)
    return path


def _kaggle_entries(prefix: str = "Data/") -> dict[str, bytes]:
    return {
        f"{prefix}train/normal/a.png": image_bytes(seed=1),
        f"{prefix}train/adenocarcinoma_left.lower.lobe_T2_N0_M0_Ib/b.png": image_bytes(seed=2),
    }


@pytest.mark.parametrize("kind", ["zip", "tgz"])
def test_archive_is_unpacked_and_its_wrapper_folder_descended(tmp_path: Path, kind: str) -> None:
    archive = tmp_path / f"set.{kind}"
    (_zip if kind == "zip" else _tgz)(archive, _kaggle_entries())
    source = resolve(str(archive), tmp_path, tmp_path / "staging", limits=QUICK)
    assert source.kind == "archive"
    assert source.folder == tmp_path / "staging" / "unpacked" / "Data"
    assert (source.folder / "train" / "normal" / "a.png").read_bytes() == image_bytes(seed=1)
    assert source.archive_sha256 == hashlib.sha256(archive.read_bytes()).hexdigest()
    assert (
        source.describe(source.folder / "train/normal/a.png") == f"{archive}::train/normal/a.png"
    )


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("../evil.png", "climbs out of the target folder"),
        ("Data/../../evil.png", "climbs out of the target folder"),
        ("/etc/evil.png", "absolute path"),
        ("C:/evil.png", "absolute path"),
        ("..\\evil.png", "climbs out of the target folder"),
    ],
)
@pytest.mark.parametrize("kind", ["zip", "tgz"])
def test_archive_entries_that_escape_are_refused(
    tmp_path: Path, kind: str, name: str, reason: str
) -> None:
    archive = tmp_path / f"bad.{kind}"
    (_zip if kind == "zip" else _tgz)(archive, {"ok/a.png": b"x", name: b"evil"})
    with pytest.raises(SourceError) as info:
        safe_extract(archive, tmp_path / "out")
    assert reason in str(info.value)
    assert repr(name) in str(info.value)
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "evil.png").exists()
    assert list(tmp_path.iterdir()) == [archive]  # no half-unpacked folder either


def test_zip_symlink_is_refused(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "l.zip", {"a/x.png": b"x"}, links={"a/link": "/etc/passwd"})
    with pytest.raises(SourceError, match="'a/link' is a symbolic link"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("kind", "word"), [(tarfile.SYMTYPE, "link"), (tarfile.LNKTYPE, "link")])
def test_tar_links_are_refused(tmp_path: Path, kind: bytes, word: str) -> None:
    archive = _tgz(
        tmp_path / "l.tgz", {"a/x.png": b"x"}, link=("a/y.png", "../../etc/passwd", kind)
    )
    with pytest.raises(SourceError, match=f"'a/y.png' is a {word}"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_corrupt_and_non_archives_are_refused_clearly(tmp_path: Path) -> None:
    good = _zip(tmp_path / "g.zip", _kaggle_entries()).read_bytes()
    truncated = tmp_path / "t.zip"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(SourceError, match="not a readable zip archive"):
        safe_extract(truncated, tmp_path / "out")
    notes = tmp_path / "notes.txt"
    notes.write_text("hello", encoding="utf-8")
    with pytest.raises(SourceError, match=r"is a file but not a \.zip, \.tar\.gz or \.tgz"):
        resolve(str(notes), tmp_path, tmp_path / "staging", limits=QUICK)
    assert not (tmp_path / "out").exists()


def test_local_archive_with_a_wrong_sha256_is_refused(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "set.zip", _kaggle_entries())
    with pytest.raises(SourceError, match="the archive changed"):
        resolve(str(archive), tmp_path, tmp_path / "staging", "0" * 64, limits=QUICK)
    assert not (tmp_path / "staging").exists()


def test_missing_source_names_the_choices(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="is not a folder, an archive or a URL"):
        resolve("nowhere", tmp_path, tmp_path / "staging", limits=QUICK)


def test_layout_root_stops_at_split_or_class_folders(tmp_path: Path) -> None:
    (tmp_path / "wrap" / "Data" / "train" / "normal").mkdir(parents=True)
    (tmp_path / "wrap" / "__MACOSX").mkdir()
    assert layout_root(tmp_path / "wrap") == tmp_path / "wrap" / "Data"
    (tmp_path / "wrap" / "README.md").write_text("about the data", encoding="utf-8")
    assert layout_root(tmp_path / "wrap") == tmp_path / "wrap" / "Data"
    (tmp_path / "flat" / "normal").mkdir(parents=True)
    (tmp_path / "flat" / "adenocarcinoma").mkdir()
    assert layout_root(tmp_path / "flat") == tmp_path / "flat"
    (tmp_path / "one" / "normal").mkdir(parents=True)  # a lone class folder is not a wrapper
    assert layout_root(tmp_path / "one") == tmp_path / "one"


# --------------------------------------------------------------------------- URL


class _Server:
    """An HTTP server on 127.0.0.1 serving one payload at /set.zip (or a 404, or silence)."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.stall = False
        server = self

        self.requests = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests += 1
                if self.path.split("?")[0] != "/set.zip":
                    self.send_error(404, "Not Found")
                    return
                if server.stall:
                    threading.Event().wait(3)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(server.payload)))
                self.end_headers()
                self.wfile.write(server.payload)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[_Server]:
    srv = _Server(_zip(tmp_path / "served.zip", _kaggle_entries()).read_bytes())
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


def test_url_download_is_verified_then_unpacked(tmp_path: Path, server: _Server) -> None:
    digest = hashlib.sha256(server.payload).hexdigest()
    staging = tmp_path / "staging"
    source = resolve(f"{server.url}/set.zip?token=secret", tmp_path, staging, digest, limits=QUICK)
    assert source.kind == "url"
    assert source.origin == f"{server.url}/set.zip"  # the token is not recorded
    assert (source.folder / "train" / "normal" / "a.png").is_file()
    assert not (staging / "download" / "set.zip").exists()  # archive removed once unpacked


def test_url_with_a_wrong_sha256_unpacks_nothing(tmp_path: Path, server: _Server) -> None:
    staging = tmp_path / "staging"
    with pytest.raises(SourceError) as info:
        resolve(f"{server.url}/set.zip", tmp_path, staging, "ab" * 32, limits=QUICK)
    message = str(info.value)
    assert hashlib.sha256(server.payload).hexdigest() in message
    assert "Nothing was unpacked" in message
    assert not (staging / "unpacked").exists()
    assert list((staging / "download").iterdir()) == []  # no .part left behind


def test_url_http_error_and_timeout(tmp_path: Path, server: _Server) -> None:
    staging = tmp_path / "staging"
    with pytest.raises(SourceError, match="HTTP 404"):
        resolve(f"{server.url}/other.zip", tmp_path, staging, "ab" * 32, limits=QUICK)
    server.stall = True
    with pytest.raises(SourceError, match=r"timed out .*ingest\.timeout_s"):
        url, slow = f"{server.url}/set.zip", SourceLimits(timeout_s=0.5, allow_private_hosts=True)
        resolve(url, tmp_path, staging, "ab" * 32, limits=slow)
    assert list((staging / "download").iterdir()) == []


def test_url_download_cache_is_reused_verified_and_repaired(
    tmp_path: Path, server: _Server
) -> None:
    digest = hashlib.sha256(server.payload).hexdigest()
    cache = tmp_path / "cache"
    url = f"{server.url}/set.zip"

    def fetch(run: str) -> Path:
        source = resolve(url, tmp_path, tmp_path / run, digest, cache=cache, limits=QUICK)
        assert (source.folder / "train" / "normal" / "a.png").is_file()
        return cache / digest / "set.zip"

    cached = fetch("first")
    assert server.requests == 1 and cached.read_bytes() == server.payload
    fetch("second")
    assert server.requests == 1  # unpacked from the cache, no download
    cached.write_bytes(b"damaged")
    fetch("third")
    assert server.requests == 2 and cached.read_bytes() == server.payload
    assert sorted(p.name for p in (cache / digest).iterdir()) == ["set.zip"]  # no .part


def test_download_cache_location(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(DOWNLOAD_CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert download_cache() == tmp_path / "xdg" / "chestct" / "downloads"
    monkeypatch.setenv(DOWNLOAD_CACHE_ENV, str(tmp_path / "mine"))
    assert download_cache() == tmp_path / "mine"


def test_url_needs_a_sha256(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"ingest\.sha256 is required"):
        resolve("https://example.invalid/set.zip", tmp_path, tmp_path / "s", limits=QUICK)


def test_redact_drops_credentials_and_query() -> None:
    assert redact("https://u:p@host:8443/a/b.zip?sig=1") == "https://host:8443/a/b.zip"
