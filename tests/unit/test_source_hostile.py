"""Hostile sources, third round (issue 21): archive headers bounded before they are read, the
download deadline on the whole transfer, redirects that keep scheme, host and port, private
addresses, secrets anywhere in a URL, and folder sources that leave the folder or are not
regular files."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import socket
import stat
import tarfile
import threading
import time
import tracemalloc
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from chestct.data.archives import archive_kind
from chestct.data.sources import SourceError, SourceLimits, resolve, safe_extract, scan_source
from chestct.settings import SettingsError, load_settings, secret_in_url
from helpers import image_bytes

MB = 1024 * 1024
REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- archive headers


def _header(name: str, kind: bytes, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size
    return info.tobuf(tarfile.GNU_FORMAT)


def _huge_header_tgz(path: Path, kind: bytes, size: int, repeat: int = 1) -> Path:
    """A .tar.gz whose first member hides behind `repeat` extended headers of `size` bytes
    each (GNU long name or pax), written in 1 MB pieces: the file stays small."""
    with gzip.open(path, "wb") as gz:
        for _ in range(repeat):
            gz.write(_header("././@LongLink" if kind != tarfile.XHDTYPE else "pax", kind, size))
            if kind == tarfile.XHDTYPE:
                body = b"comment=" + b"a" * (size - 20)
                record = f"{len(body) + 1 + len(str(size))} ".encode()
                data = (record + body + b"\n").ljust(size, b"\n")[:size]
                gz.write(data)
            else:
                left = size
                while left:
                    n = min(left, MB)
                    gz.write(b"a" * n)
                    left -= n
            gz.write(b"\0" * (-size % 512))
        png = image_bytes(seed=1)
        gz.write(_header("train/normal/a.png", tarfile.REGTYPE, len(png)))
        gz.write(png + b"\0" * (-len(png) % 512))
        gz.write(b"\0" * 1024)
    return path


@pytest.mark.parametrize(
    ("kind", "size", "repeat"),
    [
        (tarfile.GNUTYPE_LONGNAME, 40 * MB, 1),  # one long-name header of 40 MB
        (tarfile.XHDTYPE, 40 * MB, 1),  # one pax header of 40 MB
        (tarfile.GNUTYPE_LONGNAME, 900 * 1024, 60),  # a chain of headers under the cap each
    ],
    ids=["gnu-long-name", "pax", "header-chain"],
)
def test_a_huge_tar_header_is_refused_before_it_is_read(
    tmp_path: Path, kind: bytes, size: int, repeat: int
) -> None:
    archive = _huge_header_tgz(tmp_path / "header.tar.gz", kind, size, repeat)
    assert archive.stat().st_size < 2 * MB
    tracemalloc.start()
    try:
        with pytest.raises(SourceError, match=r"header.* (larger than|over) "):
            safe_extract(archive, tmp_path / "out", SourceLimits())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * MB, f"peak {peak / MB:.0f} MB while reading the headers"
    assert not (tmp_path / "out").exists()


def test_a_zip_directory_over_the_member_cap_is_refused_before_it_is_parsed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "many.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(3000):
            zf.writestr(f"train/normal/{i}.png", b"")
    built: list[object] = []
    real = zipfile.ZipFile

    def recording(*args: object, **kwargs: object) -> zipfile.ZipFile:
        built.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(zipfile, "ZipFile", recording)
    with pytest.raises(SourceError, match=r"more than 100 entries \(ingest\.max_members\)"):
        safe_extract(path, tmp_path / "out", SourceLimits(max_members=100))
    assert built == []  # refused from a walk of the directory, before zipfile builds 3000 infos


def _zip(path: Path, entries: list[tuple[str, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries:
            if name.endswith("/"):
                zf.mkdir(name.rstrip("/"))
            else:
                zf.writestr(name, data)
    return path


def _tar(path: Path, entries: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in entries:
            info = tarfile.TarInfo(name.rstrip("/"))
            if name.endswith("/"):
                info.type = tarfile.DIRTYPE
            info.size = 0 if name.endswith("/") else len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("write", [_zip, _tar], ids=["zip", "tar"])
@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (
            [("train/normal/a.png", b"one"), ("train/normal/a.png", b"two")],
            r"'train/normal/a\.png' appears twice",
        ),
        (
            [("train/normal/a.png", b"one"), ("train//normal/./a.png", b"two")],
            r"appears twice",
        ),
        (
            [("train/normal", b"file"), ("train/normal/a.png", b"png")],
            r"'train/normal' is both a file and a folder",
        ),
        (
            [("train/normal/a.png/", b""), ("train/normal/a.png", b"png")],
            r"'train/normal/a\.png' is both a file and a folder",
        ),
        ([("train/normal/" + "n" * 300 + ".png", b"png")], r"name .* too long"),
        ([("/".join(["d" * 200] * 25) + "/a.png", b"png")], r"path .* too long"),
    ],
    ids=[
        "duplicate",
        "duplicate-spelled-otherwise",
        "file-folder",
        "folder-file",
        "long-name",
        "long-path",
    ],
)
def test_archive_layouts_that_cannot_be_unpacked_are_refused_by_name(
    tmp_path: Path, write, entries: list[tuple[str, bytes]], message: str
) -> None:
    suffix = ".zip" if write is _zip else ".tar.gz"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about a duplicate name it writes
        archive = write(tmp_path / f"bad{suffix}", entries)
    with pytest.raises(SourceError, match=message):
        safe_extract(archive, tmp_path / "out", SourceLimits())
    assert not (tmp_path / "out").exists()


def test_a_malformed_pax_record_is_a_source_error(tmp_path: Path) -> None:
    """tarfile raises ValueError on an empty GNU.sparse.map (found by bench/fuzz_archives.py):
    it is a corrupt archive, refused by name like any other."""
    body = io.BytesIO()
    with tarfile.open(fileobj=body, mode="w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("train/normal/a.png")
        data = image_bytes(seed=1)
        info.size = len(data)
        info.pax_headers = {"GNU.sparse.map": ""}
        tf.addfile(info, io.BytesIO(data))
    archive = tmp_path / "sparse.tar"
    archive.write_bytes(body.getvalue())
    assert archive_kind(archive) == "tar"
    with pytest.raises(SourceError, match="corrupt or truncated tar archive"):
        safe_extract(archive, tmp_path / "out", SourceLimits())
    assert not (tmp_path / "out").exists()


def test_an_os_error_while_unpacking_is_a_source_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = _zip(tmp_path / "set.zip", [("train/normal/a.png", image_bytes(seed=1))])
    real_open = Path.open

    def full_disk(self: Path, mode: str = "r", *args: object, **kwargs: object):
        if "w" in mode and self.name == "a.png":
            raise OSError(28, "No space left on device")
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", full_disk)
    with pytest.raises(SourceError, match=r"'train/normal/a\.png'.*No space left on device"):
        safe_extract(archive, tmp_path / "out", SourceLimits())


# --------------------------------------------------------------------------- downloads


class _Trickle:
    """127.0.0.1 raw socket server: `mode` "body" sends headers then one byte a second;
    "headers" sends the status line one byte a second; "redirect" answers 302 to `target`.
    Stops after `limit` seconds whatever happens (bounded)."""

    def __init__(self, mode: str, target: str = "", limit: float = 12.0) -> None:
        self.mode, self.target, self.limit = mode, target, limit
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        end = time.monotonic() + self.limit
        with conn:
            conn.recv(65536)
            if self.mode == "redirect":
                conn.sendall(
                    f"HTTP/1.1 302 Found\r\nLocation: {self.target}\r\n"
                    "Content-Length: 0\r\n\r\n".encode()
                )
                return
            head = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n"
            if self.mode == "body":
                conn.sendall(head)
                head = b"x" * 100000
            try:
                for byte in head:
                    if self.stop.is_set() or time.monotonic() > end:
                        return
                    conn.sendall(bytes([byte]))
                    time.sleep(1.0)
            except OSError:
                return

    def url(self, path: str = "/set.zip", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


@pytest.fixture
def trickle() -> Iterator[list[_Trickle]]:
    servers: list[_Trickle] = []
    yield servers
    for server in servers:
        server.close()


@pytest.mark.parametrize("mode", ["body", "headers"])
def test_the_deadline_cuts_a_one_byte_per_second_server(
    tmp_path: Path, trickle: list[_Trickle], mode: str
) -> None:
    """Each byte comes within ingest.timeout_s, so only the deadline can end the transfer."""
    server = _Trickle(mode)
    trickle.append(server)
    limits = SourceLimits(timeout_s=5, deadline_s=2.0, allow_private_hosts=True)
    start = time.monotonic()
    with pytest.raises(SourceError, match=r"deadline_s = 2 s"):
        resolve(server.url(), tmp_path, tmp_path / "staging", "ab" * 32, limits=limits)
    assert time.monotonic() - start < 4.5
    assert list((tmp_path / "staging" / "download").iterdir()) == []


def _served_zip(tmp_path: Path) -> tuple[bytes, str]:
    data = _zip(tmp_path / "served.zip", [("train/normal/a.png", image_bytes(seed=1))])
    payload = data.read_bytes()
    return payload, hashlib.sha256(payload).hexdigest()


@pytest.mark.parametrize(
    ("target", "allowed"),
    [
        ("http://127.0.0.1:{other}/set.zip", ()),  # same host, another port
        ("https://127.0.0.1:{port}/set.zip", ()),  # same host and port, another scheme
        ("http://127.0.0.1:{other}/set.zip", ("127.0.0.1:1",)),  # allowed host, other port
    ],
    ids=["port", "scheme", "allowed-host-other-port"],
)
def test_a_redirect_must_keep_scheme_host_and_port(
    tmp_path: Path, trickle: list[_Trickle], target: str, allowed: tuple[str, ...]
) -> None:
    landing = _Trickle("redirect", target="/never")
    trickle.append(landing)
    hop = _Trickle("redirect")
    trickle.append(hop)
    hop.target = target.format(port=hop.port, other=landing.port)
    limits = SourceLimits(timeout_s=5, redirect_hosts=allowed, allow_private_hosts=True)
    with pytest.raises(SourceError, match=r"another scheme, host or port"):
        resolve(hop.url("/hop"), tmp_path, tmp_path / "staging", "ab" * 32, limits=limits)


def test_a_redirect_to_an_allowed_host_and_port_is_followed(tmp_path: Path) -> None:
    import http.server

    payload, digest = _served_zip(tmp_path)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    hop = _Trickle("redirect", target=f"http://localhost:{httpd.server_address[1]}/set.zip")
    try:
        limits = SourceLimits(
            timeout_s=5,
            redirect_hosts=(f"localhost:{httpd.server_address[1]}",),
            allow_private_hosts=True,
        )
        source = resolve(hop.url("/hop"), tmp_path, tmp_path / "staging", digest, limits=limits)
        assert (source.folder / "train" / "normal" / "a.png").is_file()
    finally:
        hop.close()
        httpd.shutdown()
        httpd.server_close()


def test_private_and_loopback_hosts_are_refused_unless_allowed(
    tmp_path: Path, trickle: list[_Trickle]
) -> None:
    server = _Trickle("redirect", target="/elsewhere")
    trickle.append(server)
    for url in (server.url(), server.url(host="localhost"), "http://[::1]:9/set.zip"):
        with pytest.raises(SourceError, match=r"ingest\.allow_private_hosts"):
            resolve(
                url, tmp_path, tmp_path / "staging", "ab" * 32, limits=SourceLimits(timeout_s=5)
            )


def test_a_redirect_to_a_private_address_is_refused(tmp_path: Path) -> None:
    """The address check runs on every connection, so a redirect (or a name that resolves
    to loopback) cannot reach the local network either."""
    from chestct.data.downloads import _Guard

    guard = _Guard(SourceLimits(redirect_hosts=("localhost",)))
    with pytest.raises(SourceError, match=r"127\.0\.0\.1.*ingest\.allow_private_hosts"):
        guard.connect(("localhost", 80), 1.0)


@pytest.mark.parametrize(
    "url",
    [
        "https://host/dl/token=s3cr3t/set.zip",
        "https://host/dl;jsessionid=s3cr3t/set.zip",
        "https://host/set.zip#access_token=s3cr3t",
        "https://host/ghp_16C7e42F292c6912E7710c838347Ae178B4a/set.zip",
        "https://host/AKIAIOSFODNN7EXAMPLE/set.zip",
        "https://host/eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.s3cr3tsignature/set.zip",
        "https://host/dl/Zx81kQp2LmN7vB4cR9sT3wY6uE0aH5jD/set.zip",
        "https://host/set.zip?download=Zx81kQp2LmN7vB4cR9sT3wY6uE0aH5jD",
    ],
)
def test_a_secret_anywhere_in_the_url_is_refused(tmp_path: Path, url: str) -> None:
    assert secret_in_url(url)
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text((REPO / "config" / "config.yaml").read_text())
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["ingest"].update(source=url, sha256="ab" * 32)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(SettingsError, match=r"env:CHESTCT_SOURCE_URL") as info:
        load_settings(tmp_path)
    assert "s3cr3t" not in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "https://zenodo.org/records/1234567/files/chest-ct-scan-images.zip?download=1",
        "https://github.com/org/repo/archive/3f2c1a9e8b7d6c5f4e3d2c1b0a9f8e7d6c5b4a39.tar.gz",
        "https://host/datasets/ChestCTScanImages/Data.zip",
        "https://host/a/0f8b3c2e-4d5a-4b6c-9d7e-1a2b3c4d5e6f/set.tgz",
    ],
)
def test_ordinary_urls_are_not_taken_for_secrets(url: str) -> None:
    assert secret_in_url(url) is None


# --------------------------------------------------------------------------- folder sources


def _layout(root: Path) -> Path:
    for label in ("normal", "adenocarcinoma"):
        (root / "train" / label).mkdir(parents=True)
        (root / "train" / label / "a.png").write_bytes(image_bytes(seed=1))
    return root


def test_a_symlink_leaving_the_folder_is_refused(tmp_path: Path) -> None:
    source = _layout(tmp_path / "source")
    outside = tmp_path / "secret.png"
    outside.write_bytes(image_bytes(seed=2))
    (source / "train" / "normal" / "inside.png").symlink_to(source / "train" / "normal" / "a.png")
    assert len(scan_source(source, {})) == 3  # a link that stays inside is followed
    (source / "train" / "normal" / "escape.png").symlink_to(outside)
    with pytest.raises(SourceError, match=r"escape\.png.*symbolic link.*outside"):
        scan_source(source, {})
    (source / "train" / "normal" / "escape.png").unlink()
    (source / "train" / "large_cell_carcinoma").symlink_to(tmp_path)
    with pytest.raises(SourceError, match=r"large_cell_carcinoma.*outside"):
        scan_source(source, {})


def test_fifos_and_devices_are_refused(tmp_path: Path) -> None:
    source = _layout(tmp_path / "source")
    os.mkfifo(source / "train" / "normal" / "pipe.png")
    with pytest.raises(SourceError, match=r"pipe\.png.*FIFO"):
        scan_source(source, {})
    (source / "train" / "normal" / "pipe.png").unlink()
    try:
        os.mknod(source / "train" / "normal" / "dev.png", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("creating a device node needs root")
    with pytest.raises(SourceError, match=r"dev\.png.*device"):
        scan_source(source, {})


def test_a_file_over_the_size_cap_is_refused(tmp_path: Path) -> None:
    source = _layout(tmp_path / "source")
    (source / "train" / "normal" / "big.png").write_bytes(b"\0" * (2 * MB))
    with pytest.raises(SourceError, match=r"big\.png.*ingest\.max_file_mb"):
        scan_source(source, {}, max_file_bytes=MB)
    assert len(scan_source(source, {}, max_file_bytes=3 * MB)) == 3


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"max_file_mb": 0}, r"ingest\.max_file_mb"),
        ({"allow_private_hosts": "yes"}, r"ingest\.allow_private_hosts"),
        ({"redirect_hosts": ["host/path"]}, r"ingest\.redirect_hosts"),
    ],
)
def test_new_ingest_params_are_validated(tmp_path: Path, change: dict, message: str) -> None:
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text((REPO / "config" / "config.yaml").read_text())
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["ingest"].update(change)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(SettingsError, match=message):
        load_settings(tmp_path)


def test_a_file_swapped_for_a_fifo_after_the_scan_is_skipped_not_waited_on(
    tmp_path: Path,
) -> None:
    """ingest reads every file through read_file: a FIFO is refused on the open descriptor."""
    from chestct.data.sources import read_file

    fifo = tmp_path / "slice.png"
    os.mkfifo(fifo)
    start = time.monotonic()
    with pytest.raises(SourceError, match="FIFO"):
        read_file(fifo, MB)
    assert time.monotonic() - start < 1.0
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * (2 * MB))
    with pytest.raises(SourceError, match=r"ingest\.max_file_mb"):
        read_file(big, MB)
    assert read_file(big, 3 * MB) == b"\0" * (2 * MB)


def test_a_listing_row_naming_an_oversized_file_stops_ingest(tmp_path: Path) -> None:
    from chestct.data.listing import scan_listing

    (tmp_path / "a.png").write_bytes(image_bytes(seed=1))
    listing = tmp_path / "slices.csv"
    listing.write_text("path,label\na.png,normal\n")
    assert len(scan_listing(listing, {}, MB)) == 1
    (tmp_path / "big.png").write_bytes(b"\0" * (2 * MB))
    listing.write_text("path,label\na.png,normal\nbig.png,normal\n")
    with pytest.raises(SourceError, match=r"row 3: .*big\.png.*ingest\.max_file_mb"):
        scan_listing(listing, {}, MB)
