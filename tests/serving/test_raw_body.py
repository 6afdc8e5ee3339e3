"""Under gunicorn a request body of declared length is read from gunicorn's length reader
(chestct.serving.GunicornInput), not 1 kB per step through gunicorn's Body; raw, multipart and
JSON bodies alike, with Werkzeug's limit (413) and short-body error (400) kept."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from flask import Flask, request
from gunicorn.http import body as gbody
from gunicorn.http.unreader import SocketUnreader
from werkzeug.test import EnvironBuilder

from chestct.serving import GunicornInput, gunicorn_input

PAYLOAD = bytes(range(256)) * 300  # 76.8 kB, about a 512 x 512 PNG slice


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


def gunicorn_body(sockets: list[socket.socket], sent: bytes, declared: int) -> gbody.Body:
    """gunicorn's wsgi.input for a request declaring `declared` bytes, of which the client
    sent `sent` and then closed its side."""
    server, client = socket.socketpair()
    client.sendall(sent)
    client.close()
    sockets.append(server)
    return gbody.Body(gbody.LengthReader(SocketUnreader(server), declared))


@pytest.fixture
def no_kilobyte_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    def kilobyte_steps(self: gbody.Body, size: int | None = None) -> bytes:
        raise AssertionError("Body.read hands the body on 1 kB per step")

    monkeypatch.setattr(gbody.Body, "read", kilobyte_steps)


def served(body: gbody.Body, data: bytes, content_type: str, limit: int | None = None):
    """What an app behind gunicorn_input answers for a POST whose wsgi.input is `body`:
    (status, the view's answer); the view reads the raw body, or the multipart field."""
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = limit

    @app.post("/")
    def view() -> bytes:
        if request.mimetype == "multipart/form-data":
            return request.files["file"].read()
        return request.get_data(cache=False)

    app.wsgi_app = gunicorn_input(app.wsgi_app)  # type: ignore[method-assign]
    environ = EnvironBuilder("/", method="POST", data=data, content_type=content_type)
    environ = environ.get_environ()
    environ["wsgi.input"] = body
    status: list[str] = []
    out = b"".join(app(environ, lambda s, headers, exc_info=None: status.append(s)))
    return int(status[0].split()[0]), out


@pytest.mark.usefixtures("no_kilobyte_steps")
def test_raw_body_is_read_from_the_length_reader(sockets: list[socket.socket]) -> None:
    # What the client pipelined behind the body stays for gunicorn's next request.
    body = gunicorn_body(sockets, PAYLOAD + b"GET /health", len(PAYLOAD))
    assert served(body, PAYLOAD, "image/png") == (200, PAYLOAD)
    assert body.reader.length == 0
    assert body.reader.unreader.read() == b"GET /health"


@pytest.mark.usefixtures("no_kilobyte_steps")
def test_multipart_body_is_read_from_the_length_reader(sockets: list[socket.socket]) -> None:
    from io import BytesIO

    builder = EnvironBuilder(method="POST", data={"file": (BytesIO(PAYLOAD), "slice.png")})
    environ = builder.get_environ()
    wire, content_type = environ["wsgi.input"].read(), environ["CONTENT_TYPE"]
    body = gunicorn_body(sockets, wire, len(wire))
    assert served(body, wire, content_type) == (200, PAYLOAD)


def test_upload_limit_and_short_body_keep_their_errors(sockets: list[socket.socket]) -> None:
    body = gunicorn_body(sockets, PAYLOAD, len(PAYLOAD))
    assert served(body, PAYLOAD, "image/png", limit=len(PAYLOAD) - 1)[0] == 413
    # Declares the full length, sends 1000 bytes and hangs up: Werkzeug's 400.
    short = gunicorn_body(sockets, PAYLOAD[:1000], len(PAYLOAD))
    assert served(short, PAYLOAD, "image/png")[0] == 400


def test_readline_then_read_agree(sockets: list[socket.socket]) -> None:
    text = b"first line\n" + PAYLOAD
    stream = GunicornInput(gunicorn_body(sockets, text, len(text)))
    assert stream.readline() == b"first line\n"
    assert stream.read(100) == PAYLOAD[:100]  # the Body's read-ahead is served first
    assert stream.read() == PAYLOAD[100:]
    assert stream.read() == b""
