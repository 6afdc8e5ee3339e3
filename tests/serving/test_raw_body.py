"""A raw image body under gunicorn is read whole from gunicorn's length reader
(chestct.serving.prediction.raw_body), with Werkzeug's limits and errors kept."""

from __future__ import annotations

import io
import socket

import pytest
from flask import Flask
from gunicorn.http import body as gbody
from gunicorn.http.unreader import SocketUnreader
from werkzeug.exceptions import ClientDisconnected, RequestEntityTooLarge

from chestct.serving.prediction import raw_body

PAYLOAD = bytes(range(256)) * 300  # 76.8 kB, about a 512 x 512 PNG slice


def gunicorn_body(sent: bytes, declared: int) -> tuple[gbody.Body, socket.socket]:
    """gunicorn's wsgi.input for a request declaring `declared` bytes, of which the client
    sent `sent` and then closed its side."""
    server, client = socket.socketpair()
    client.sendall(sent)
    client.close()
    return gbody.Body(gbody.LengthReader(SocketUnreader(server), declared)), server


def call(stream: object, length: int, limit: int | None = None) -> bytes:
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = limit
    # As gunicorn builds the environ (the test client would count an empty body of its own).
    environ = {"wsgi.input": stream, "CONTENT_TYPE": "image/png", "CONTENT_LENGTH": str(length)}
    with app.test_request_context("/predict", method="POST", environ_overrides=environ):
        return raw_body()


def test_gunicorn_body_is_read_from_its_length_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    def kilobyte_steps(self: gbody.Body, size: int | None = None) -> bytes:
        raise AssertionError("Body.read hands the body on 1 kB per step")

    monkeypatch.setattr(gbody.Body, "read", kilobyte_steps)
    # What the client pipelined behind the body stays for gunicorn's next request.
    stream, sock = gunicorn_body(PAYLOAD + b"GET /health", len(PAYLOAD))
    with sock:
        assert call(stream, len(PAYLOAD)) == PAYLOAD
        assert stream.reader.length == 0
        assert stream.reader.unreader.read() == b"GET /health"


def test_gunicorn_body_keeps_the_upload_limit() -> None:
    stream, sock = gunicorn_body(PAYLOAD, len(PAYLOAD))
    with sock, pytest.raises(RequestEntityTooLarge):
        call(stream, len(PAYLOAD), limit=len(PAYLOAD) - 1)


def test_gunicorn_body_cut_short_is_a_client_disconnect() -> None:
    stream, sock = gunicorn_body(PAYLOAD[:1000], len(PAYLOAD))
    with sock, pytest.raises(ClientDisconnected):
        call(stream, len(PAYLOAD))


def test_other_streams_are_read_by_werkzeug() -> None:
    assert call(io.BytesIO(PAYLOAD), len(PAYLOAD)) == PAYLOAD
    # Partly read already (nothing in chestct does it, but then the fast path must not apply).
    stream, sock = gunicorn_body(PAYLOAD, len(PAYLOAD))
    with sock:
        head = stream.read(10)
        assert head + call(stream, len(PAYLOAD) - 10) == PAYLOAD
