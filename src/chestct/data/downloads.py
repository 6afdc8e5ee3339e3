"""Downloads that cannot go astray: a digest checked before the file appears, bounded.

`download` fetches an http(s) URL to a `.part` file, hashing on the way, and renames it into
place only when the sha256 matches, so a failed or tampered download leaves nothing behind. It
is bounded (SourceLimits): its size, a total-time deadline after which every socket is shut,
the hosts a redirect may lead to and the addresses a connection may reach. A bearer token in
CHESTCT_SOURCE_TOKEN goes to the URL's own host only.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import ipaddress
import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from tqdm import tqdm

from chestct.data.source_limits import CHUNK, MB, SourceError, SourceLimits

log = logging.getLogger(__name__)

# Environment variables that carry what must not be written to params.yaml.
TOKEN_ENV = "CHESTCT_SOURCE_TOKEN"  # sent as `Authorization: Bearer`, to the source's host only


def redact(url: str) -> str:
    """A URL without credentials or query string (signed download links carry tokens)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


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
    part = dest.with_name(f"{dest.name}.part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    transfer = _Transfer(url, limits)
    opener = _opener(url, transfer.guard)
    transfer.deadline = time.monotonic() + limits.deadline_s
    watchdog = threading.Timer(limits.deadline_s, transfer.guard.expire)
    watchdog.daemon = True
    watchdog.start()
    try:
        with (
            opener.open(transfer.request(), timeout=limits.timeout_s) as resp,
            part.open("wb") as out,
        ):
            transfer.receive(resp, out, dest.name)
        transfer.check_complete()
    except SourceError:
        part.unlink(missing_ok=True)
        raise
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        part.unlink(missing_ok=True)
        raise transfer.failure(exc) from None
    except BaseException:  # an interrupt: nothing stays behind
        part.unlink(missing_ok=True)
        raise
    finally:
        watchdog.cancel()
        for sock in transfer.guard.sockets:
            sock.close()
    actual = transfer.digest.hexdigest()
    if actual != sha256.lower():
        part.unlink(missing_ok=True)
        raise SourceError(
            f"download of {transfer.shown}: sha256 is {actual} but ingest.sha256 is "
            f"{sha256.lower()}; the file changed or was corrupted on the way. Nothing was "
            "unpacked. If you trust the new file, set ingest.sha256 to its digest"
        )
    part.replace(dest)
    log.info("downloaded %s (%d bytes, sha256 verified)", transfer.shown, transfer.received)
    return dest


class _Transfer:
    """One download under way: its guarded sockets, the bytes and digest so far, and the
    error each way of failing turns into."""

    def __init__(self, url: str, limits: SourceLimits) -> None:
        self.url = url
        self.limits = limits
        self.shown = redact(url)
        self.digest = hashlib.sha256()
        self.received = 0
        self.total: int | None = None
        self.deadline = 0.0
        self.guard = _Guard(limits)
        parts = urllib.parse.urlsplit(url)
        try:
            self.guard.check_target(parts.hostname or "", _port(parts))
        except ValueError as exc:  # a port out of range; SourceError passes as it is
            if isinstance(exc, SourceError):
                raise
            raise SourceError(f"ingest.source {self.shown!r} is not a valid URL ({exc})") from None

    def request(self) -> urllib.request.Request:
        request = urllib.request.Request(self.url, headers={"User-Agent": "chestct-ingest"})
        token = os.environ.get(TOKEN_ENV, "").strip()
        if token:
            request.add_unredirected_header("Authorization", f"Bearer {token}")
        return request

    def receive(self, resp: Any, out: Any, name: str) -> None:
        """Copy the answer's body to `out`, hashing it, within the size cap and deadline."""
        cap = self.limits.max_download_bytes
        length = resp.headers.get("Content-Length")
        self.total = int(length) if length and length.isdigit() else None
        if self.total is not None and self.total > cap:
            raise SourceError(
                f"download of {self.shown} declares {self.total:,} bytes, more than "
                f"ingest.max_download_mb ({cap / MB:,.0f} MB); raise it if the archive is "
                "genuine"
            )
        with tqdm(
            total=self.total, unit="B", unit_scale=True, desc=f"download {name}", leave=False
        ) as bar:
            # read1: what one receive gives, so the checks run however slow the sender
            while chunk := resp.read1(CHUNK):
                out.write(chunk)
                self.digest.update(chunk)
                self.received += len(chunk)
                bar.update(len(chunk))
                if self.received > cap:
                    raise SourceError(
                        f"download of {self.shown} passed ingest.max_download_mb "
                        f"({cap / MB:,.0f} MB); stopped"
                    )
                if time.monotonic() > self.deadline:
                    raise self.late()

    def check_complete(self) -> None:
        if self.guard.expired:
            raise self.late()
        if self.total is not None and self.received != self.total:
            raise SourceError(
                f"download of {self.shown} stopped after {self.received} of {self.total} "
                "bytes; try again"
            )

    def late(self) -> SourceError:
        return SourceError(
            f"download of {self.shown} did not finish within ingest.deadline_s = "
            f"{self.limits.deadline_s:g} s ({self.received:,} bytes so far); stopped. Raise "
            "ingest.deadline_s for a slow mirror"
        )

    def failure(self, exc: BaseException) -> SourceError:
        """What an HTTP, network or socket error means for the user."""
        if isinstance(exc, urllib.error.HTTPError):
            return SourceError(
                f"download of {self.shown} failed: HTTP {exc.code} {exc.reason}; check "
                "ingest.source"
            )
        if self.guard.expired:
            return self.late()
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, SourceError):
            return reason
        if isinstance(exc, TimeoutError) or isinstance(reason, TimeoutError):
            return SourceError(
                f"download of {self.shown} timed out (no answer within ingest.timeout_s = "
                f"{self.limits.timeout_s:g} s); check the network or raise ingest.timeout_s"
            )
        return SourceError(f"download of {self.shown} failed: {reason}; check the URL and network")
