"""sources bounded (issue 12): redirects, download size and deadline, archive caps, secrets."""

from __future__ import annotations

import hashlib
import http.server
import io
import tarfile
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from chestct.data.sources import SourceError, SourceLimits, resolve, safe_extract
from chestct.settings import SettingsError, load_settings
from helpers import image_bytes

MB = 1024 * 1024


def _archive(path: Path) -> bytes:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("Data/train/normal/a.png", image_bytes(seed=1))
        zf.writestr("Data/train/adenocarcinoma/b.png", image_bytes(seed=2))
    return path.read_bytes()


class _Server:
    """127.0.0.1: /set.zip serves the archive; /hop redirects to `self.target`; /slow
    trickles the archive; records the Authorization header of each request."""

    def __init__(self, payload: bytes) -> None:
        self.payload, self.target, self.auth = payload, "", []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.auth.append(self.headers.get("Authorization"))
                path = self.path.split("?")[0]
                if path == "/hop":
                    self.send_response(302)
                    self.send_header("Location", server.target)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(server.payload)))
                self.end_headers()
                if path == "/slow":
                    for i in range(0, len(server.payload), 64):
                        self.wfile.write(server.payload[i : i + 64])
                        self.wfile.flush()
                        time.sleep(0.05)
                    return
                self.wfile.write(server.payload)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[_Server]:
    srv = _Server(_archive(tmp_path / "served.zip"))
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


def _fetch(server: _Server, url: str, tmp_path: Path, **limits: object):
    digest = hashlib.sha256(server.payload).hexdigest()
    caps = SourceLimits(timeout_s=5, allow_private_hosts=True, **limits)
    return resolve(url, tmp_path, tmp_path / "staging", digest, limits=caps)


def test_redirect_to_another_host_is_refused_unless_allowed(
    tmp_path: Path, server: _Server
) -> None:
    server.target = server.url("/set.zip", host="localhost")  # same server, another host name
    with pytest.raises(
        SourceError, match=r"redirects \(302\) to http://localhost.*redirect_hosts"
    ):
        _fetch(server, server.url("/hop"), tmp_path)
    assert not (tmp_path / "staging" / "unpacked").exists()
    source = _fetch(server, server.url("/hop"), tmp_path, redirect_hosts=("localhost",))
    assert (source.folder / "train" / "normal" / "a.png").is_file()


def test_redirect_to_another_scheme_is_refused(tmp_path: Path, server: _Server) -> None:
    server.target = f"ftp://127.0.0.1:{server.port}/set.zip"
    with pytest.raises(SourceError, match="another scheme, host or port"):
        _fetch(server, server.url("/hop"), tmp_path, redirect_hosts=("127.0.0.1",))


def test_redirect_on_the_same_host_is_followed(tmp_path: Path, server: _Server) -> None:
    server.target = "/set.zip"
    assert _fetch(server, server.url("/hop"), tmp_path).kind == "url"


def test_download_size_cap_and_deadline(tmp_path: Path, server: _Server) -> None:
    with pytest.raises(SourceError, match="max_download_mb"):
        _fetch(server, server.url("/set.zip"), tmp_path, max_download_bytes=100)
    with pytest.raises(SourceError, match=r"deadline_s = 0\.3 s"):
        _fetch(server, server.url("/slow"), tmp_path, deadline_s=0.3)
    assert list((tmp_path / "staging" / "download").iterdir()) == []  # no .part left


def test_token_from_the_environment_goes_to_the_source_host_only(
    tmp_path: Path, server: _Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHESTCT_SOURCE_TOKEN", "t0ken")
    server.target = server.url("/set.zip", host="localhost")
    _fetch(server, server.url("/hop"), tmp_path, redirect_hosts=("localhost",))
    assert server.auth == ["Bearer t0ken", None]  # not forwarded on the redirect


def test_source_url_from_the_environment_is_not_recorded(
    tmp_path: Path, server: _Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHESTCT_SOURCE_URL", server.url("/set.zip?X-Amz-Signature=abc"))
    source = _fetch(server, "env:CHESTCT_SOURCE_URL", tmp_path)
    assert source.origin == "env:CHESTCT_SOURCE_URL"
    assert "abc" not in source.describe(source.folder / "train" / "normal" / "a.png")
    monkeypatch.delenv("CHESTCT_SOURCE_URL")
    with pytest.raises(SourceError, match="CHESTCT_SOURCE_URL is empty"):
        _fetch(server, "env:CHESTCT_SOURCE_URL", tmp_path)


@pytest.mark.parametrize(
    "url",
    [
        "https://host/set.zip?X-Amz-Signature=s3cr3t&X-Amz-Credential=k",
        "https://host/set.zip?token=s3cr3t",
        "https://user:s3cr3t@host/set.zip",
        "https://host/set.zip?sig=s3cr3t",
    ],
)
def test_url_with_credentials_in_params_is_refused_before_any_stage(
    tmp_path: Path, url: str
) -> None:
    """Refused when settings load: before a stage logs params to MLflow or writes a pointer,
    and so before DVC could lock them."""
    root = Path(__file__).resolve().parents[2]
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text((root / "config" / "config.yaml").read_text())
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["ingest"].update(source=url, sha256="ab" * 32)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(SettingsError, match="CHESTCT_SOURCE_URL") as info:
        load_settings(tmp_path)
    assert "s3cr3t" not in str(info.value)
    params["ingest"].update(source="https://host/set.zip?download=1")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert load_settings(tmp_path).params.ingest.source.endswith("download=1")


# --------------------------------------------------------------------------- archives


def test_archive_member_count_cap(tmp_path: Path) -> None:
    path = tmp_path / "many.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(50):
            zf.writestr(f"train/normal/{i}.png", b"x")
    with pytest.raises(SourceError, match=r"more than 20 entries \(ingest\.max_members\)"):
        safe_extract(path, tmp_path / "out", SourceLimits(max_members=20))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["zip", "tgz"])
def test_archive_bomb_is_refused_by_ratio_and_by_size(tmp_path: Path, kind: str) -> None:
    zeros = bytes(20 * MB)
    path = tmp_path / f"bomb.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("train/normal/a.png", image_bytes(seed=1))
            zf.writestr("train/normal/zeros.bin", zeros)
    else:
        with tarfile.open(path, "w:gz") as tf:
            for name, data in (("train/normal/a.png", image_bytes(seed=1)), ("z.bin", zeros)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    with pytest.raises(SourceError, match=r"a ratio over 100 \(ingest\.max_ratio\)"):
        safe_extract(path, tmp_path / "out", SourceLimits())
    with pytest.raises(SourceError, match=r"unpacks to more than 10 MB \(ingest\.max_unpacked_mb"):
        safe_extract(path, tmp_path / "out", SourceLimits(max_unpacked_bytes=10 * MB))
    assert not (tmp_path / "out").exists()
    folder = safe_extract(path, tmp_path / "out", SourceLimits(max_ratio=100_000))
    assert (folder / "train" / "normal" / "a.png").is_file()
